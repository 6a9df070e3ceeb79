"""Orbax glue: periodic async saves of the whole TrainState, and a restore
that survives a truncated newest checkpoint.

The data position needs no saving: the batch at step s is a pure function of
(seed, s), so the restored `step` is the data position.
"""

import os
import shutil
import time

from absl import logging
import jax
import orbax.checkpoint as ocp


def manager(workdir, keep, keep_every=0):
  """Keeps the newest `keep` checkpoints and, if `keep_every`, every one
  whose step is a multiple of it (orbax's `keep_period`)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, keep_period=keep_every or None, create=True,
      enable_async_checkpointing=True)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'), options=options)


def save(mngr, step, state):
  mngr.save(int(step), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state)))


def restore(mngr, step, abstract_state):
  """The state saved at `step`."""
  return mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state))).state


def restore_latest(mngr, abstract_state, workdir):
  """The newest checkpoint that reads back, or None if there is none.

  An unreadable one (e.g. files truncated by a crash outside orbax's atomic
  rename) is moved to `workdir/corrupt_checkpoints/` with a warning, never
  deleted, and the one before it is tried.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      return restore(mngr, step, abstract_state)
    except Exception as e:  # pylint: disable=broad-except
      if jax.process_index() == 0:
        aside = os.path.join(workdir, 'corrupt_checkpoints',
                             f'{step}-{int(time.time())}')
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        shutil.move(os.path.join(mngr.directory, str(step)), aside)
      logging.warning('Checkpoint at step %d is unreadable (%s: %s); moved '
                      'it to %s and falling back to the previous one.', step,
                      type(e).__name__, str(e).splitlines()[0][:200],
                      'corrupt_checkpoints/')
      mngr.reload()
  return None
