"""Circuits: the Python task suite, learned node pruning, circuit extraction."""
