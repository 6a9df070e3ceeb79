r"""The sparse twin the circuit results are measured on.

sparse_small's model (the paper's architecture at 4 layers x 128) trained 2x
as long, and sparser: 1 in 16 weights nonzero (6.25%) instead of 1 in 10.
The same nodes joined by a sparse model's weights can have at most ~1/density
times fewer edges than in a dense one, so the density caps the edge ratio a
comparison can show; 1/16 puts that cap at the paper's ~16x. Every 50 steps
a checkpoint is kept for the matched-loss comparison.

  python -m sparse_gpt2.main --config=configs/sparse_medium.py

Its dense twin is configs/dense_medium.py. With `:abstopk`
(`--config=configs/sparse_medium.py:abstopk`) it also keeps only the largest
quarter of the activations by magnitude at every node location, as the
paper does (AbsTopK), to measure what that does to its circuits.
"""

from sparse_gpt2 import defaults
from sparse_gpt2 import model


def get_config(arg=None):
  if arg not in (None, '', 'abstopk'):
    raise ValueError(f"sparse_medium: unknown arg {arg!r}; known: 'abstopk'")
  config = defaults.medium_run(defaults.base())
  config.sparsity.mode = 'topk'
  config.sparsity.density = 1 / 16
  config.optim.lr = 1e-2
  if arg == 'abstopk':
    config.model.act_topk_fraction = 0.25
    config.model.act_topk_locations = model.NODE_LOCATIONS
  return config
