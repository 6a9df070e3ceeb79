"""Orbax glue: periodic async saves of the whole TrainState with a digest of
each array, and a restore that checks them, moves a corrupt newest checkpoint
aside but stops on any other failure, and reads the bool masks of checkpoints
older than bit-packed masks.

The data position needs no saving: the batch at step s is a pure function of
(seed, s), so the restored `step` is the data position.
"""

import asyncio
import functools
import json
import logging as std_logging
import sys
import time
import traceback

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sparse_gpt2 import multihost
from sparse_gpt2 import sparsity
from sparse_gpt2 import workdir as workdir_lib

# Tensorstore status codes that mean a checkpoint's own files are damaged: a
# chunk shorter than its index says, undecodable, or missing.
_CORRUPT_STATUS = ('DATA_LOSS:', 'OUT_OF_RANGE:', 'NOT_FOUND:')
# What TensorStore says, under other codes (FAILED_PRECONDITION, or none),
# of bytes that do not decode: a zeroed, flipped or missing stretch of a
# compressed chunk or b-tree node, or of a JSON file it reads. Every one was
# met by damaging one file of a saved checkpoint at a time.
_CORRUPT_SIGNS = ('Data corruption detected', 'ZSTD_decompressStream() failed',
                  'Truncated Zstd-compressed stream', 'Error decoding',
                  'Invalid JSON')
# The item beside `state` that holds its `digests`. Checkpoints saved before
# it (2026-12-06) have none and are read unchecked.
_DIGESTS = 'digests'
# What names orbax's and TensorStore's code and errors in a never-retrieved
# error's log: their paths, and the words TensorStore appends to its errors
# (its details, or the read's spec: all a Task of asyncio's own that wraps a
# TensorStore Future shows, its traceback being asyncio's).
_CHECKPOINT_IO = ('/orbax/', '/tensorstore/', 'TensorStore', 'tensorstore_spec=')


class DigestMismatch(ValueError):
  """A checkpoint read back without an error, but not as it was saved."""


def manager(workdir, keep, keep_every=0, read_only=False):
  """Keeps the newest `keep` checkpoints and, if `keep_every`, every one
  whose step is a multiple of it (orbax's `keep_period`). `read_only`, for
  analysis: creates, saves and deletes nothing."""
  if jax.process_count() == 1:
    _save_each_array_from_one_replica()
  drop_failed_read_echoes()  # A failed save echoes as a failed read does.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, keep_period=keep_every or None, create=not read_only,
      read_only=read_only, enable_async_checkpointing=True)
  return ocp.CheckpointManager(
      workdir_lib.path(workdir) / workdir_lib.CHECKPOINTS, options=options)


@functools.cache
def _save_each_array_from_one_replica():
  """Makes orbax save each replicated array from one replica. Its default
  off GPU, replica-parallel saving, splits an array's writing over its
  replicas to spread it over hosts; in one process that only adds a slicing
  program per shape: `sparse_small`'s first save blocked its loop for 1.59 s
  instead of 0.18 (a compile per shape), each later one 0.21 s instead of
  0.06. Registered as orbax's emergency checkpointer registers it, without
  the per-process array metadata files (`array_metadatas/`)."""
  warned = std_logging.getLogger('absl')  # Its one line on the override.
  unwarned = lambda record: 'overriding' not in record.getMessage()
  warned.addFilter(unwarned)
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
        override=True)
  finally:
    warned.removeFilter(unwarned)


def save(mngr, step, state):
  mngr.save(int(step), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      **{_DIGESTS: ocp.args.JsonSave(host_digests(state))}))


@jax.jit
def digests(tree):
  """{leaf path: uint32[2]}: the sum of each array's bits as uint32 words,
  and the sum of their squares, wrapping at 2^32.

  Why: orbax keeps no checksum of an array's chunks, and TensorStore decodes
  some damaged ones without an error (a zeroed or flipped byte in a
  compressed chunk read back as other values of the token embedding or its
  Adam moment). Any change to one word changes the first sum. Both are
  integer sums, so they do not depend on how the array is sharded or in
  which order its shards are added: a checkpoint saved on one mesh checks on
  another, and every process reads the same digest. One pass over the
  state, on its devices, at each save and restore.
  """
  def digest(x):  # [...] -> uint32[2]
    words = lax.bitcast_convert_type(
        x, jnp.dtype(f'uint{8 * x.dtype.itemsize}')).astype(jnp.uint32)
    return jnp.stack([words.sum(dtype=jnp.uint32),
                      (words * words).sum(dtype=jnp.uint32)])

  return {jax.tree_util.keystr(path): digest(x)
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def host_digests(tree):
  """`digests` as JSON: {leaf path: [int, int]}."""
  return {path: [int(word) for word in digest]
          for path, digest in jax.device_get(digests(tree)).items()}


def restore(mngr, step, abstract_state):
  """The state saved at `step`. Masks saved bool, as every checkpoint was
  before masks were bit-packed (2026-12-02), are read as bool and packed:
  older runs resume, and the circuits CLIs read them."""
  drop_failed_read_echoes()  # Before any read: a failed one echoes at once.
  if not _saved_bool_masks(mngr, step):
    return _restore(mngr, step, abstract_state)
  params = sparsity.flat(abstract_state.params)
  packed = sparsity.flat(abstract_state.masks)
  bool_masks = {p: jax.ShapeDtypeStruct(params[p].shape, bool,
                                        sharding=params[p].sharding)
                for p in packed}
  state = _restore(mngr, step, abstract_state.replace(
      masks=sparsity.unflat(bool_masks)))
  pack = jax.jit(lambda masks: jax.tree.map(sparsity.pack, masks),
                 out_shardings={p: m.sharding for p, m in packed.items()})
  logging.info('Checkpoint at step %d holds bool masks; packed them.', step)
  return state.replace(masks=sparsity.unflat(pack(sparsity.flat(state.masks))))


def _restore(mngr, step, abstract_state):
  """The state at `step`, checked against its digests where it has them."""
  items = {'state': ocp.args.StandardRestore(abstract_state)}
  checked = (mngr.directory / str(step) / _DIGESTS).exists()
  if checked:
    items[_DIGESTS] = ocp.args.JsonRestore()
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  if checked:
    saved, read = restored[_DIGESTS], host_digests(restored.state)
    differ = sorted(path for path in saved.keys() | read.keys()
                    if saved.get(path) != read.get(path))
    if differ:
      more = f' and {len(differ) - 1} more' if len(differ) > 1 else ''
      raise DigestMismatch(
          f'{differ[0]}{more} read back other values than were saved at step '
          f'{step} (digests differ)')
  return restored.state


def _saved_bool_masks(mngr, step):
  saved = ocp.StandardCheckpointHandler().metadata(
      mngr.directory / str(step) / 'state')
  return any(leaf.dtype == bool
             for leaf in jax.tree.leaves(saved.get('masks', {})))


def is_corrupt(error):
  """Whether a restore failed because the checkpoint's files are damaged
  (truncated or garbled metadata, a short, missing or undecodable chunk, an
  array that does not match its digest), rather than because of what reads
  them: a changed model or optimizer (tree or shape mismatch), memory,
  permissions or the network. Only the first is the checkpoint's fault; the
  rest would fail the same way on every checkpoint."""
  while error is not None:
    message = str(error)
    if (isinstance(error, (json.JSONDecodeError, UnicodeDecodeError,
                           FileNotFoundError, DigestMismatch))
        or message.startswith(_CORRUPT_STATUS)
        or any(sign in message for sign in _CORRUPT_SIGNS)):
      return True
    error = error.__cause__ or error.__context__
  return False


def _interrupted(error):
  """Whether a Ctrl-C (or a cancelled read it caused) is in `error`'s chain."""
  while error is not None:
    if isinstance(error, (KeyboardInterrupt, asyncio.CancelledError)):
      return True
    error = error.__cause__ or error.__context__
  return False


def restore_latest(mngr, abstract_state, workdir, set_aside=True):
  """The newest checkpoint that reads back, or None if there is none.

  A corrupt one (`is_corrupt`, e.g. files truncated by a crash outside
  orbax's atomic rename) is moved to `workdir/corrupt_checkpoints/` with a
  warning, never deleted, and the one before it is tried; with
  `set_aside=False` (analysis, which changes nothing in a run) it is only
  named in the warning. Any other failure stops with a ValueError and
  moves nothing. Every process takes the same decision: one that fails
  for another reason stops them all.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    state, error = None, None
    try:
      state = restore(mngr, step, abstract_state)
    except Exception as e:  # pylint: disable=broad-except  Classified below.
      if _interrupted(e):  # A Ctrl-C that orbax's reads wrapped: not the
        raise KeyboardInterrupt from e  # checkpoint's fault, nor the model's.
      error = e
    corrupt = error is not None and is_corrupt(error)
    if multihost.any_process(error is not None and not corrupt):
      reason = (f'{type(error).__name__}: {first_line(error)}'
                if error is not None and not corrupt else
                'it failed on another process; see its log')
      raise ValueError(
          f'cannot restore the checkpoint at step {step} in {workdir} '
          f'({reason}). The checkpoint is not corrupt and was left in place; '
          'a changed model or optimizer, too little memory or a storage '
          'error does this. Fix the cause and rerun.') from error
    if not multihost.any_process(corrupt):
      return state
    if not set_aside:
      logging.warning('The checkpoint at step %d in %s is damaged (%s); '
                      'reading the one before it.', step, workdir,
                      first_line(error) if error else 'on another process')
      continue
    aside = (workdir_lib.path(workdir) / workdir_lib.CORRUPT /
             f'{step}-{int(time.time())}')
    if jax.process_index() == 0:
      aside.parent.mkdir(parents=True, exist_ok=True)
      (mngr.directory / str(step)).rename(aside)
    logging.warning('Checkpoint at step %d is corrupt (%s); moved it to %s '
                    'and falling back to the previous one.', step,
                    first_line(error) if error else 'on another process',
                    aside)
    multihost.barrier(f'checkpoint.aside.{step}')
    mngr.reload()
  return None


def drop_failed_read_echoes():
  """Keeps a failed read of a corrupt checkpoint to `restore_latest`'s one
  warning line, in any process that restores (`main`, a notebook); and
  a save that a full disk stopped to `cli.run`'s one line, its writes
  echoing alike (`manager` calls it).

  When one of orbax's concurrent array reads fails, the others are left
  unfinished: asyncio can log each one's copy of the error as never
  retrieved, with its TensorStore spec (1,500 lines for one corrupt chunk;
  rare with orbax-checkpoint 0.12.8: one in a CI run of the tests); as
  they are collected they raise again through `sys.unraisablehook`, as do
  TensorStore reads that complete after orbax closed their event loop
  (~7,200 lines in all around the warning, for one truncated checkpoint of
  the tiny config). Some surface while the read fails, others after the
  restore has returned, so every read installs the filters first and they
  stay for the rest of the process; they drop exactly those echoes
  (`is_failed_read_echo`) and pass everything else on. Called again, it
  leaves a hook that is already its own as it is.
  """
  if not getattr(sys.unraisablehook, 'drops_failed_read_echoes', False):
    previous = sys.unraisablehook

    def hook(unraisable):
      if not is_failed_read_echo(unraisable):
        previous(unraisable)

    hook.drops_failed_read_echoes = True
    sys.unraisablehook = hook
  asyncio_logger = std_logging.getLogger('asyncio')
  if _keeps_all_but_read_echoes not in asyncio_logger.filters:
    asyncio_logger.addFilter(_keeps_all_but_read_echoes)


def _keeps_all_but_read_echoes(record):
  """asyncio's log filter: False for a never-retrieved error of orbax or
  TensorStore, which is how orbax's other reads (Tasks of its coroutines,
  Futures of TensorStore's) report the failed one again. A never-retrieved
  error of other code (a notebook's own tasks) is kept: asyncio names the
  Task's coroutine and the error in the message, and the error's traceback
  says where it was raised."""
  message = record.getMessage()
  if 'exception was never retrieved' not in message:
    return True
  error = record.exc_info[1] if record.exc_info else None
  where = [frame.filename for frame in traceback.extract_tb(
      error.__traceback__)] if error is not None else []
  return not any(name in text for name in _CHECKPOINT_IO
                 for text in [message, *where])


def is_failed_read_echo(unraisable):
  """Whether an unraisable exception (`sys.unraisablehook`'s argument) is
  an echo of a checkpoint read that failed: orbax's other read coroutines,
  never finished, raising the error again as they are collected, and
  TensorStore's reads that complete after orbax closed their event loop."""
  code = getattr(unraisable.object, 'cr_code', None)
  if code is not None:
    return '/orbax/' in code.co_filename
  return (unraisable.exc_type is RuntimeError
          and str(unraisable.exc_value) == 'Event loop is closed'
          and any(frame.name == 'call_soon_threadsafe' for frame in
                  traceback.extract_tb(unraisable.exc_traceback)))


def first_line(error):
  """The error's first line, without the TensorStore spec (~60 lines) that
  a failed read appends."""
  line = str(error).splitlines()[0] if str(error) else ''
  return line.split(' See full TensorStore details')[0][:200]
