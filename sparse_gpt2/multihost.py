"""What the processes of a multi-host run agree on: barriers, one decision
for all, and work done by process 0 before the others.

With one process every function here is a plain call, so single-host runs
pay nothing.
"""

import hashlib

import jax
from jax.experimental import multihost_utils
import numpy as np


def barrier(name):
  """Returns once every process has called barrier(name)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_process(flag):
  """True on every process if `flag` is true on any: a decision all take."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def same_on_all(text):
  """True on every process if `text` is the same on all of them (compared
  by a 64-bit digest)."""
  if jax.process_count() == 1:
    return True
  digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.uint32)
  gathered = multihost_utils.process_allgather(digest)  # [processes, 2]
  return bool(np.all(gathered == gathered[0]))


def process_0_first(fn):
  """fn() on process 0, then on the others: for work that fills a cache all
  of them read (the corpus), so it is built once and never written by two
  processes at the same time. An error on any process stops every process,
  so none waits for a cache that will not come, nor at a barrier for a
  process that failed on its own disk."""
  result = None
  for turn in ('process 0', 'another process'):
    error = None
    if (jax.process_index() == 0) == (turn == 'process 0'):
      try:
        result = fn()
      except Exception as e:  # pylint: disable=broad-except  Re-raised below.
        error = e
    if any_process(error is not None):
      raise error or ValueError(f'{turn} failed to prepare the data; its '
                                'log says why')
  return result
