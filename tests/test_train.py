"""End to end: training, resume after SIGKILL, checkpoint fallback and
failed restores, schedules on resume, preemption, and the clear refusals of
bad configs and workdirs (which leave no files)."""

import asyncio
import errno
import gc
import importlib.util
import json
import logging as std_logging
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sparse_gpt2 import checkpoint
from sparse_gpt2 import data
from sparse_gpt2 import cli
from sparse_gpt2 import metrics
from sparse_gpt2 import optim
from sparse_gpt2 import sparsity
from sparse_gpt2 import train
from sparse_gpt2 import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(workdir, config, *flags, wait=True, env=None):
  cmd = [sys.executable, '-m', 'sparse_gpt2.main',
         '--config=configs/tiny.py', f'--workdir={workdir}',
         f'--config.data.source={config.data.source}',
         f'--config.data.data_dir={config.data.data_dir}', *flags]
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env=env)


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _assert_same_state(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _listing(workdir):
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      out[path] = os.path.getsize(path), os.path.getmtime(path)
  return out


# What the reference run's timed matmul peak reads: at the start, then after
# each evaluation (steps 10, 20, ... 60).
PEAK_READINGS = (1e9, 4e9, 2e9, 8e9, 1e9, 1e9, 1e9)


@pytest.fixture(scope='module')
def reference_run(tiny_config, tmp_path_factory):
  """An uninterrupted 60-step sparse run: (config, workdir, final state)."""
  config = tiny_config(train_steps=60, checkpoint_every=10, keep_every=20,
                       peak_flops=0.0)
  workdir = str(tmp_path_factory.mktemp('reference'))
  readings = iter(PEAK_READINGS)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(metrics, 'measure_peak_flops',
                  lambda dtype, repeats: next(readings))
    state = train.train_and_evaluate(config, workdir)
  assert next(readings, None) is None
  return config, workdir, state


@pytest.fixture
def untimed_peak(monkeypatch):
  """For tests that resume the reference run (its peak_flops 0.0) and assert
  nothing of its MFU: a matmul peak read at once, where the CPU's timed
  2048^3 matmuls took ~2 s of each resume."""
  monkeypatch.setattr(metrics, 'measure_peak_flops',
                      lambda *args, **kwargs: 1e9)


def test_training_lowers_the_loss_and_records_the_run(reference_run):
  config, workdir, state = reference_run
  assert int(state.step) == 60
  metrics = _metrics(workdir)
  assert metrics[-1]['loss'] < metrics[0]['loss'] - 0.5
  assert 'val_loss' in metrics[-1] and np.isfinite(metrics[-1]['val_loss'])
  for key in ('lr', 'grad_rms', 'tokens_per_s', 'mfu', 'l0', 'density',
              'l0_per_tensor'):
    assert key in metrics[-1], key
  assert metrics[-1]['density'] < metrics[0]['density']
  # Annealed to 25% of every sparse tensor: 32 x 128 -> 1024 nonzeros.
  assert metrics[-1]['l0_per_tensor']['block_0/mlp_fc/kernel'] == 1024
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['train_steps'] == config.train_steps
  assert any(n.startswith('events.out.tfevents') for n in os.listdir(workdir))
  # The newest keep_checkpoints=2, and every keep_every=20 steps.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')),
                key=int) == ['20', '40', '50', '60']


def _event_scalars(workdir):
  """{tag: (step, value)} of the TensorBoard event file in `workdir`, as far
  as it is on disk (a record still being written is left out)."""
  metrics._import_tensorboardx()  # The package, without torch.
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  [path] = [os.path.join(workdir, n) for n in os.listdir(workdir)
            if n.startswith('events.out.tfevents')]
  with open(path, 'rb') as f:
    data = f.read()
  scalars = {}
  while len(data) >= 8:  # TFRecord: length, its CRC, the event, its CRC.
    n = int.from_bytes(data[:8], 'little')
    if len(data) < 16 + n:
      break
    event = event_pb2.Event.FromString(data[12:12 + n])
    data = data[16 + n:]
    for v in event.summary.value:
      scalars[v.tag] = (event.step, v.simple_value)
  return scalars


def _event_writer_threads():
  """The TensorBoard event writers' threads alive in this process: each
  writer not closed keeps one, and its event file open."""
  metrics._import_tensorboardx()  # The package, without torch.
  from tensorboardX import event_file_writer  # pylint: disable=g-import-not-at-top
  thread = event_file_writer._EventLoggerThread  # pylint: disable=protected-access
  return {t for t in threading.enumerate() if isinstance(t, thread)}


def test_a_resumed_run_purges_its_old_events_past_the_checkpoint(tmp_path):
  """A run that logged steps 1-4 and resumes from step 2: its new event file
  opens with TensorBoard's purge marker (a SessionLog START) at step 3, so
  the old file's steps 3 and 4 are not shown beside the new ones."""
  metrics._import_tensorboardx()  # The package, without torch.
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  first = metrics.Writer(str(tmp_path), start_step=0)
  for step in (1, 2, 3, 4):
    first.write(step, {'loss': float(step)})
  first.close()
  old = set(os.listdir(tmp_path))
  time.sleep(1.1)  # Event files are named by the second they open in.
  resumed = metrics.Writer(str(tmp_path), start_step=2)
  resumed.write(3, {'loss': 3.5})
  resumed.close()
  [new] = set(os.listdir(tmp_path)) - old
  with open(tmp_path / new, 'rb') as f:
    data = f.read()
  events = []
  while data:  # TFRecord: length, its CRC, the event, its CRC.
    n = int.from_bytes(data[:8], 'little')
    events.append(event_pb2.Event.FromString(data[12:12 + n]))
    data = data[16 + n:]
  starts = [e.step for e in events if e.HasField('session_log')]
  assert starts == [3]
  assert [(e.step, e.summary.value[0].simple_value) for e in events
          if e.summary.value] == [(3, 3.5)]
  assert [m['step'] for m in _metrics(str(tmp_path))] == [1, 2, 3]


def test_a_writer_opened_in_the_same_second_keeps_the_events_before(
    tmp_path):
  """tensorboardX names an event file by the second it opens in and opens
  it truncating: a resumed run's writer opened within the second of the
  one before emptied that one's file, and TensorBoard lost steps 1 and 2.
  It waits for a new second instead: its own file, sorted after."""
  metrics._import_tensorboardx()  # The package, without torch.
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  while time.time() % 1 > 0.2:  # Both would open in one second.
    time.sleep(0.01)
  first = metrics.Writer(str(tmp_path), start_step=0)
  for step in (1, 2, 3, 4):
    first.write(step, {'loss': float(step)})
  first.close()
  resumed = metrics.Writer(str(tmp_path), start_step=2)
  resumed.write(3, {'loss': 3.5})
  resumed.close()
  scalars = []
  for name in sorted(os.listdir(tmp_path)):
    if name.startswith('events.out.tfevents'):
      data = (tmp_path / name).read_bytes()
      scalars.append([])
      while data:  # TFRecord: length, its CRC, the event, its CRC.
        n = int.from_bytes(data[:8], 'little')
        event = event_pb2.Event.FromString(data[12:12 + n])
        scalars[-1] += [(event.step, v.simple_value)
                        for v in event.summary.value]
        data = data[16 + n:]
  assert scalars == [[(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)], [(3, 3.5)]]


def test_event_files_are_written_without_importing_torch(tmp_path):
  """tensorboardX imports torch wherever it is installed (2.7 s of every
  run's start here); metrics.Writer hides it from that import. In a fresh
  process: the events hold the scalars, torch stays out, and imports after."""
  code = f'''
import importlib.util, sys
from sparse_gpt2 import metrics
writer = metrics.Writer({str(tmp_path)!r}, start_step=0)
writer.write(5, {{'loss': 2.5, 'l0_per_tensor': {{'w': 7}}}})
writer.close()
assert 'torch' not in sys.modules
if importlib.util.find_spec('torch'):
  import torch
  torch.ones(1)
'''
  subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True)
  assert _event_scalars(tmp_path) == {'loss': (5, 2.5),
                                      'l0_per_tensor/w': (5, 7.0)}


def test_each_log_reaches_tensorboard_within_seconds(tmp_path):
  """tensorboardX's thread flushes on its own clock (120 s by default, and
  `flush()` does not wait for it): TensorBoard showed a log up to two
  minutes late, and a killed run lost it. Each log must be on disk within
  seconds, the run still open."""
  writer = metrics.Writer(str(tmp_path), start_step=0)
  try:
    for step in (1, 2, 3):
      writer.write(step, {'loss': 4.0 - step, 'l0_per_tensor': {'w': step}})
      expected = {'loss': (step, 4.0 - step), 'l0_per_tensor/w': (step, step)}
      deadline = time.monotonic() + 10
      while (_event_scalars(tmp_path) != expected
             and time.monotonic() < deadline):
        time.sleep(0.05)
      assert _event_scalars(tmp_path) == expected
  finally:
    writer.close()


def test_load_run_at_a_kept_step(reference_run, tmp_path):
  _, workdir, reference = reference_run
  _, _, newest = train.load_run(workdir)
  _assert_same_state(newest, reference)
  _, _, early = train.load_run(workdir, step=20)
  assert int(early.step) == 20
  assert not np.array_equal(np.asarray(early.params['wte']['embedding']),
                            np.asarray(reference.params['wte']['embedding']))
  with pytest.raises(ValueError, match=r'no checkpoint at step 30; it has '
                     r'\[20, 40, 50, 60\]'):
    train.load_run(workdir, step=30)
  damaged = str(tmp_path / 'damaged')
  shutil.copytree(workdir, damaged)
  metadata = os.path.join(damaged, 'checkpoints', '60', 'state', '_METADATA')
  with open(metadata, 'r+b') as f:
    f.truncate(10)
  with pytest.raises(ValueError, match=r'checkpoint at step 60 in .*damaged '
                     r'is damaged \(.*\); pick another of \[20, 40, 50, 60\] '
                     r'\(circuits: --step\)$'):
    train.load_run(damaged, step=60)
  assert os.path.exists(metadata)  # Analysis reports it, moves nothing.
  # A file missing is damage too (orbax raises FileNotFoundError).
  os.remove(os.path.join(damaged, 'checkpoints', '50', 'state', '_METADATA'))
  with pytest.raises(ValueError, match=r'checkpoint at step 50 in .*damaged '
                     r'is damaged \(Metadata file'):
    train.load_run(damaged, step=50)


def test_resume_after_sigkill_is_bitwise_identical(reference_run, tmp_path):
  config, _, reference = reference_run
  workdir = str(tmp_path / 'killed')
  flags = ('--config.train_steps=60', '--config.checkpoint_every=10')
  proc = _main(workdir, config, *flags, wait=False)
  ckpt = os.path.join(workdir, 'checkpoints')
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt)):
      break
    time.sleep(0.02)
  assert proc.poll() is None, 'the run ended before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = [int(n) for n in os.listdir(ckpt) if n.isdigit()]
  assert done and max(done) < 60, done
  result = _main(workdir, config, *flags)
  assert result.returncode == 0, result.stderr[-2000:]
  _, _, resumed = train.load_run(workdir)
  _assert_same_state(resumed, reference)
  steps = [m['step'] for m in _metrics(workdir)]
  assert steps == sorted(set(steps)) and steps[-1] == 60  # No step twice.


def _flip_byte(path, offset):
  with open(path, 'r+b') as f:
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0xFF]))


@pytest.mark.parametrize('damaged, damage', [
    ('', 'truncated'),      # Every file: orbax's metadata fails first.
    ('/d/', 'truncated'),   # Only the arrays' data chunks: TensorStore's
    ('/d/', 'zeroed'),      # reads fail, under codes that do not say so.
    ('/_METADATA', 'flipped'),  # Not UTF-8 any more.
])
@pytest.mark.usefixtures('untimed_peak')
def test_damaged_newest_checkpoint_falls_back_to_the_previous(
    reference_run, tmp_path, caplog, damaged, damage, monkeypatch):
  config, ref_dir, reference = reference_run
  workdir = str(tmp_path / 'corrupt')
  shutil.copytree(ref_dir, workdir)
  newest = os.path.join(workdir, 'checkpoints', '60')
  for root, _, files in os.walk(newest):
    for name in files:
      path = os.path.join(root, name)
      if damaged not in path:
        continue
      size = os.path.getsize(path)
      with open(path, 'r+b') as f:
        if damage == 'truncated':
          f.truncate(size // 2)
        elif damage == 'zeroed':  # Blocks a crash left allocated, unwritten.
          f.write(bytes(min(64, size)))
      if damage == 'flipped':  # One byte, as storage that rots flips them.
        _flip_byte(path, os.path.getsize(path) // 2)
  printed = []  # What would reach stderr as "Exception ignored in: ...".
  monkeypatch.setattr(sys, 'unraisablehook', printed.append)
  # As a library user calls it, without `cli.run`: the restore itself keeps
  # the failed read's echoes off the console.
  state = train.train_and_evaluate(config, workdir)
  gc.collect()  # Orbax's unfinished read coroutines echo as collected.
  _assert_same_state(state, reference)  # Redid 51..60 from step 50.
  # And saved step 60 again: the manager forgot the one set aside (a
  # manager that still listed it skipped the save, the redone steps lost).
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')),
                key=int) == ['20', '40', '50', '60']
  aside = os.listdir(os.path.join(workdir, 'corrupt_checkpoints'))
  assert len(aside) == 1 and aside[0].startswith('60-')
  # One line says why, without the TensorStore spec a failed read appends.
  [warning] = [r.getMessage() for r in caplog.records
               if 'is corrupt' in r.getMessage()]
  assert 'TensorStore details' not in warning and '\n' not in warning, warning
  assert not printed, [str(u.exc_value)[:200] for u in printed]
  assert not [r for r in caplog.records if 'never retrieved' in r.getMessage()]
  other = types.SimpleNamespace(exc_type=RuntimeError,
                                exc_value=RuntimeError('Event loop is closed'),
                                exc_traceback=None, err_msg=None, object=None)
  sys.unraisablehook(other)  # Not from a read's callback: still printed.
  assert printed == [other]
  # asyncio's log of a never-retrieved error: dropped where it repeats a
  # TensorStore read's error, kept for any other code's.
  assert not _logs_never_retrieved(ValueError(
      'DATA_LOSS: Error reading "x" in OCDBT database [source locations='
      "'tensorstore/kvstore/ocdbt/io/io_handle_impl.cc:116'] See full "
      'TensorStore details'), caplog)
  # As a CI run saw it: a Task of asyncio's own wrapping TensorStore's Future,
  # whose error names only the read's spec.
  assert not _logs_never_retrieved(ValueError(
      'OUT_OF_RANGE: Error opening "zarr" driver: Error reading "x/.zarray" '
      'in OCDBT database [tensorstore_spec=\'{"driver":"zarr"}\']'), caplog)
  assert _logs_never_retrieved(ValueError('a notebook task failed'), caplog)


def _logs_never_retrieved(error, caplog):
  """Whether asyncio's log of a Future that failed with `error`, never
  awaited and then collected, passes the asyncio logger's filters."""
  loop = asyncio.new_event_loop()
  future = loop.create_future()
  future.set_exception(error)
  loop.close()
  caplog.clear()
  del future
  gc.collect()
  return any('never retrieved' in r.getMessage() for r in caplog.records)


@pytest.mark.usefixtures('untimed_peak')
def test_a_checkpoint_that_reads_back_altered_fails_its_digests(
    reference_run, tmp_path, caplog, monkeypatch):
  config, ref_dir, reference = reference_run
  workdir = str(tmp_path / 'altered')
  shutil.copytree(ref_dir, workdir)
  newest = os.path.join(workdir, 'checkpoints', '60')
  chunks = [os.path.join(root, name) for root, _, names in os.walk(newest)
            if os.sep + 'd' in root for name in names]
  # The embedding and its moments: one byte flipped inside a stored block,
  # where orbax alone reads back other values without an error. Where that
  # is depends on how zstd packed this CPU's floats: a byte in a block of
  # compressed sequences can fail to decode instead, so a few places are
  # tried, each put back if it does.
  largest = max(chunks, key=os.path.getsize)
  with monkeypatch.context() as unchecked:
    unchecked.setattr(checkpoint, '_DIGESTS', 'not saved')
    for sixteenths in (8, 9, 7, 10, 6, 11, 5, 12, 4, 13, 3, 14):
      offset = os.path.getsize(largest) * sixteenths // 16
      _flip_byte(largest, offset)
      try:
        _, _, altered = train.load_run(workdir, 60)
      except ValueError as e:
        assert 'is damaged' in str(e), e
      else:
        if any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves(altered), jax.tree.leaves(reference))):
          break
      _flip_byte(largest, offset)
    else:
      pytest.fail(f'no flipped byte of {largest} read back altered')
  with pytest.raises(ValueError, match='is damaged .*digests differ'):
    train.load_run(workdir, 60)
  state = train.train_and_evaluate(config, workdir)
  _assert_same_state(state, reference)  # Redid 51..60 from step 50.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')),
                key=int) == ['20', '40', '50', '60']
  [aside] = os.listdir(os.path.join(workdir, 'corrupt_checkpoints'))
  assert aside.startswith('60-')
  [warning] = [r.getMessage() for r in caplog.records
               if 'is corrupt' in r.getMessage()]
  assert 'digests differ' in warning, warning


def test_a_failed_read_is_reported_without_its_tensorstore_spec():
  # The text of a chunk that TensorStore could not decode (audited run).
  error = Exception(
      'Encountered error while reading array index: (slice(0, 512, 1), '
      'slice(0, 512, 1)). See full TensorStore details: <bound method '
      "pybind11_detail_function_record.spec of TensorStore({\n  'base': {\n"
      "    'driver': 'zarr',\n  },\n})>.")
  assert checkpoint.first_line(error) == (
      'Encountered error while reading array index: (slice(0, 512, 1), '
      'slice(0, 512, 1)).')


# Spelled out, not read off checkpoint._CORRUPT_SIGNS: a sign dropped there
# must fail here. Each was met damaging one file of a saved checkpoint.
@pytest.mark.parametrize('sign', [
    'Data corruption detected', 'ZSTD_decompressStream() failed',
    'Truncated Zstd-compressed stream', 'Error decoding', 'Invalid JSON'])
def test_each_sign_of_damaged_bytes_reads_as_corrupt(sign):
  # As TensorStore words them: under another status code, mid-message, and
  # as the cause of orbax's own error.
  error = ValueError(f'FAILED_PRECONDITION: reading "x": {sign} at 12')
  assert checkpoint.is_corrupt(error)
  try:
    try:
      raise error
    except ValueError as e:
      raise RuntimeError('Encountered error while reading array') from e
  except RuntimeError as wrapped:
    assert checkpoint.is_corrupt(wrapped)
  try:  # Raised while handling it, without `from`.
    try:
      raise error
    except ValueError:
      raise RuntimeError('Encountered error while reading array')  # pylint: disable=raise-missing-from
  except RuntimeError as wrapped:
    assert checkpoint.is_corrupt(wrapped)
  assert not checkpoint.is_corrupt(ValueError(
      'RESOURCE_EXHAUSTED: Out of memory allocating 4GB'))
  assert checkpoint.is_corrupt(ValueError('DATA_LOSS: short chunk'))


def test_a_save_that_a_full_disk_stops_is_said_once(tmp_path, monkeypatch):
  """A full disk (a quota, a read-only mount) during an async save: orbax
  logged the error four times with its traceback, and its threads' echoes
  followed (558 lines for the tiny config), before `cli.run`'s one line
  said it again. The logs of a save stopped so are dropped, as the echoes
  are from the moment a manager is made; orbax's other errors are kept."""
  absl_logger = std_logging.getLogger('absl')
  monkeypatch.setattr(absl_logger, 'filters', [])
  monkeypatch.setattr(std_logging.getLogger('asyncio'), 'filters', [])
  monkeypatch.setattr(sys, 'unraisablehook', sys.__unraisablehook__)
  metrics.quiet_library_logs()
  checkpoint.manager(str(tmp_path), keep=1).close()
  assert getattr(sys.unraisablehook, 'drops_failed_read_echoes', False)

  def logged(path, error):
    try:
      raise error
    except ValueError:
      return absl_logger.filter(std_logging.LogRecord(
          'absl', std_logging.ERROR, path, 1, 'save failed', None,
          sys.exc_info()))

  orbax = os.path.join(ocp.__path__[0], '_src', 'futures', 'future.py')
  full = ValueError(
      'RESOURCE_EXHAUSTED: Error writing "params.x/0" in OCDBT database: '
      'Failed to write 504496 bytes to file 11: No space left on device '
      "[os_error_code='28']")
  assert not logged(orbax, full)
  assert logged(orbax, ValueError('DATA_LOSS: Error writing "params.x/0"'))
  assert logged('/home/me/mine.py', full)


def test_the_manager_keeps_the_newest_and_every_keep_every(tmp_path):
  mngr = checkpoint.manager(str(tmp_path), keep=1, keep_every=2)
  try:
    for step in range(1, 5):
      checkpoint.save(mngr, step, {'w': np.full(2, step, np.float32)})
  finally:
    mngr.close()
  assert workdir_lib.checkpoint_steps(str(tmp_path)) == [2, 4]


@pytest.mark.parametrize('dtype', [np.float32, np.uint8, np.int32])
def test_a_flipped_lowest_bit_changes_the_first_digest(dtype):
  """Any change to one word changes the sum of the words: the lowest
  bit of one element too (a bit that rots reads back as other values)."""
  x = (np.arange(1, 25) * 37 % 251).astype(dtype).reshape(4, 6)
  words = x.view(f'uint{8 * x.itemsize}')
  flipped = words.copy()
  flipped[2, 3] ^= 1
  [before] = checkpoint.host_digests({'w': x}).values()
  [after] = checkpoint.host_digests({'w': flipped.view(dtype)}).values()
  assert (after[0] - before[0]) % 2**32 in (1, 2**32 - 1), (before, after)


def test_a_checkpoint_with_bool_masks_restores_them_packed(reference_run,
                                                          tmp_path):
  """Checkpoints saved before masks were bit-packed hold bool masks of the
  weights' shapes: they resume, and load for analysis, as packed masks."""
  config, ref_dir, final = reference_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(ref_dir, workdir,
                  ignore=shutil.ignore_patterns('checkpoints'))
  _, _, state = train.load_run(ref_dir)
  params = sparsity.flat(state.params)
  bool_masks = {p: sparsity.unpack(m, params[p].shape)
                for p, m in sparsity.flat(state.masks).items()}
  mngr = checkpoint.manager(workdir, keep=2)
  # As they were saved: without digests, which came later.
  mngr.save(60, args=ocp.args.Composite(state=ocp.args.StandardSave(
      state.replace(masks=sparsity.unflat(bool_masks)))))
  mngr.wait_until_finished()
  _, _, loaded = train.load_run(workdir)
  resumed = train.train_and_evaluate(config, workdir)  # At its last step.
  for restored in (loaded, resumed):
    dtypes = {m.dtype for m in jax.tree.leaves(restored.masks)}
    assert dtypes == {np.dtype(np.uint8)}
    _assert_same_state(restored, final)


@pytest.mark.parametrize('failure', ['changed model', 'out of memory'])
def test_a_restore_failing_for_another_reason_stops_and_moves_nothing(
    reference_run, tmp_path, monkeypatch, failure):
  config, ref_dir, _ = reference_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(ref_dir, workdir)
  before = _listing(os.path.join(workdir, 'checkpoints'))
  if failure == 'changed model':  # Same config, different code: shapes.
    make_model = train.make_model
    monkeypatch.setattr(train, 'make_model',
                        lambda c: make_model(c).clone(d_mlp=64))
  else:
    def restore(*args):
      del args
      raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 4GB')
    monkeypatch.setattr(checkpoint, 'restore', restore)
  closed = _count_closed_managers(monkeypatch)
  with pytest.raises(ValueError, match=r'cannot restore the checkpoint at '
                     r'step 60 .* left in place'):
    train.train_and_evaluate(config, workdir)
  assert _listing(os.path.join(workdir, 'checkpoints')) == before
  assert not os.path.exists(os.path.join(workdir, 'corrupt_checkpoints'))
  assert closed == {'opened': 1, 'closed': 1}


def _count_closed_managers(monkeypatch):
  """{'opened': n, 'closed': m} of the checkpoint managers made from now."""
  counts = {'opened': 0, 'closed': 0}
  make_manager = checkpoint.manager

  def manager(*args, **kwargs):
    mngr = make_manager(*args, **kwargs)
    close = mngr.close
    counts['opened'] += 1

    def counted_close():
      counts['closed'] += 1
      close()

    mngr.close = counted_close
    return mngr

  monkeypatch.setattr(checkpoint, 'manager', manager)
  return counts


def test_loading_a_run_closes_its_checkpoint_manager(reference_run,
                                                     monkeypatch):
  _, workdir, final = reference_run
  closed = _count_closed_managers(monkeypatch)
  _, _, state = train.load_run(workdir)
  assert int(state.step) == int(final.step)
  with pytest.raises(ValueError, match='no checkpoint at step 7'):
    train.load_run(workdir, step=7)
  assert closed == {'opened': 2, 'closed': 2}


def test_train_steps_moves_the_stop_not_the_schedules(tiny_config, tmp_path):
  """Stopped at 10 of a 20-step schedule and resumed to 20: the same run as
  an uninterrupted 20-step one, lr and annealing included."""
  whole = str(tmp_path / 'whole')
  reference = train.train_and_evaluate(tiny_config(train_steps=20), whole)
  parts = str(tmp_path / 'parts')
  train.train_and_evaluate(tiny_config(train_steps=10, schedule_steps=20),
                           parts)
  # Resumed with the mesh spelled differently: layout may change on resume.
  state = train.train_and_evaluate(tiny_config(train_steps=20, **{
      'mesh.data': 1}), parts)
  _assert_same_state(state, reference)
  assert ([m['lr'] for m in _metrics(parts)]
          == [m['lr'] for m in _metrics(whole)])
  with pytest.raises(ValueError, match='past the end of the lr and annealing'):
    train.train_and_evaluate(tiny_config(train_steps=30), parts)
  saved = sorted(os.listdir(os.path.join(parts, 'checkpoints')))
  with pytest.raises(ValueError, match=r'^train_steps 15 is before the newest '
                     r'checkpoint of .* \(step 20\)'):
    train.train_and_evaluate(tiny_config(train_steps=15), parts)
  assert sorted(os.listdir(os.path.join(parts, 'checkpoints'))) == saved
  assert workdir_lib.load_config(parts).train_steps == 20  # Not rewritten.
  with pytest.raises(ValueError, match=r'\(schedule_steps 20 there, 30 here\)'):
    train.train_and_evaluate(tiny_config(train_steps=20, schedule_steps=30),
                             parts)


def test_non_finite_loss_stops_with_a_clear_error(tiny_config, tmp_path):
  config = tiny_config(train_steps=20)
  config.optim.lr = 1e30  # Weights ~1e30 after one step: the logits overflow.
  writers = _event_writer_threads()
  with pytest.raises(FloatingPointError, match='non-finite loss .* at step 2; '
                     'stopped, before any good checkpoint of '):
    train.train_and_evaluate(config, str(tmp_path / 'nan'))
  assert not os.listdir(tmp_path / 'nan' / 'checkpoints')
  assert _event_writer_threads() <= writers  # Its writer closed.
  # Saved at step 1, those weights are not called good: step 2 read them.
  config.checkpoint_every = 1
  with pytest.raises(FloatingPointError, match=r'non-finite loss .* at step '
                     r"2; stopped, before any good checkpoint of .*nan1 "
                     r"\(step 1's holds the weights that gave it\)$"):
    train.train_and_evaluate(config, str(tmp_path / 'nan1'))


@pytest.mark.usefixtures('untimed_peak')
def test_a_resumed_run_that_diverges_names_the_checkpoint_it_resumed_from(
    reference_run, tmp_path, monkeypatch):
  """Resumed at step 50 and non-finite from step 52: step 51 read step
  50's weights to a finite loss, so the checkpoint the run resumed from is
  the good one to go back to, not 'before any good checkpoint'."""
  config, ref_dir, _ = reference_run
  workdir = str(tmp_path / 'resumed')
  shutil.copytree(ref_dir, workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '60'))
  train_step = train.train_step
  def diverging_step(state, tokens, **kwargs):
    state_after, step_metrics = train_step(state, tokens, **kwargs)
    return state_after, {**step_metrics, 'loss': jax.numpy.where(
        state.step >= 51, jax.numpy.nan, step_metrics['loss'])}
  monkeypatch.setattr(train, 'train_step', diverging_step)
  with pytest.raises(FloatingPointError, match=r'^non-finite loss nan at step '
                     r'52; stopped, the last good checkpoint is step 50 in '
                     r'.*resumed$'):
    train.train_and_evaluate(config, workdir)


def test_non_finite_gradients_stop_before_anything_is_saved(
    tiny_config, tmp_path, monkeypatch):
  loss = train._loss  # pylint: disable=protected-access
  def nan_gradient_loss(model, params, tokens, rng=None):
    # sqrt'(0) is inf, so the gradient is NaN while the loss stays finite.
    x = params['wte']['embedding'].sum() * 0.0
    return loss(model, params, tokens, rng) + 0.0 * jax.numpy.sqrt(x)
  monkeypatch.setattr(train, '_loss', nan_gradient_loss)
  with pytest.raises(FloatingPointError, match='non-finite grad_rms nan at '
                     'step 1'):
    train.train_and_evaluate(tiny_config(train_steps=20),
                             str(tmp_path / 'nan'))
  assert not os.listdir(tmp_path / 'nan' / 'checkpoints')


def test_a_plain_log_is_written_while_the_next_step_runs(
    tiny_config, tmp_path, monkeypatch):
  config = tiny_config(train_steps=20, log_every=5, eval_every=10,
                       checkpoint_every=10)
  events = []
  batch, write = train.global_batch, metrics.Writer.write
  def logged_batch(tokens, step, seed, *args):
    if seed == config.seed:  # A train step's, not an evaluation's.
      events.append(('batch', step))
    return batch(tokens, step, seed, *args)
  def logged_write(self, step, values):
    events.append(('write', step))
    return write(self, step, values)
  train_step = train.train_step
  def numbered_step(state, tokens, **kwargs):  # Metrics that say their step.
    state, _ = train_step(state, tokens, **kwargs)
    return state, {'loss': state.step * 1.0, 'grad_rms': state.step * 2.0}
  monkeypatch.setattr(train, 'global_batch', logged_batch)
  monkeypatch.setattr(metrics.Writer, 'write', logged_write)
  monkeypatch.setattr(train, 'train_step', numbered_step)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  # Batch i is step i + 1's: logs 5 and 15 are written after step 6's and
  # step 16's batches were made, logs 10 and 20 before the next.
  writes = [events.index(('write', s)) for s in (5, 10, 15, 20)]
  assert events[writes[0] - 1] == ('batch', 5)
  assert events[writes[1] + 1] == ('batch', 10)
  assert events[writes[2] - 1] == ('batch', 15)
  assert writes[3] == len(events) - 1
  # Each record is its own step's, not the next one's.
  lr = optim.learning_rate(config, workdir_lib.load_config(
      workdir).schedule_steps)
  logged = _metrics(workdir)
  assert [m['step'] for m in logged] == [5, 10, 15, 20]
  assert [m['lr'] for m in logged] == pytest.approx(
      [float(lr(s - 1)) for s in (5, 10, 15, 20)], rel=1e-6)
  assert [(m['loss'], m['grad_rms']) for m in logged] == [
      (s, 2 * s) for s in (5, 10, 15, 20)]


def test_a_preemption_notice_saves_then_stops(tiny_config, tmp_path,
                                              monkeypatch, caplog):
  """Step 7 (no evaluation) saved; a rerun that ends the run there (its
  train_steps lowered to 7) evaluates it once, into step 7's record, as a
  last step needs for `compare` (it said 'nothing to train' and left step
  7 without a validation loss), and prints it (its console said only
  'Done: 0 steps'), and says nothing to train after that. A notice at the
  last step ends the run as usual (it asked for a rerun). The preempted
  run closes its event writer (a Python caller kept its thread and file),
  and the evaluate-only rerun times no matmul peak and traces no train
  step, having no step to time or train."""
  manager = checkpoint.manager
  preempted_at = 7
  def preempted(*args):
    mngr = manager(*args)
    mngr.reached_preemption = lambda step: step == preempted_at
    return mngr
  monkeypatch.setattr(checkpoint, 'manager', preempted)
  workdir = str(tmp_path / 'run')
  writers = _event_writer_threads()
  with pytest.raises(train.Preempted, match='preempted at step 7'):
    train.train_and_evaluate(tiny_config(train_steps=20), workdir)
  assert _event_writer_threads() <= writers
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['7']
  assert 'val_loss' not in workdir_lib.read_metrics(workdir)[-1]
  monkeypatch.setattr(metrics, 'measure_peak_flops', lambda *args, **kwargs:
                      pytest.fail('timed a peak with no step to time'))
  for rerun in range(2):
    caplog.clear()
    with caplog.at_level('INFO', logger='absl'), monkeypatch.context() as (
        evaluate_only):  # absl's level: whatever its flags set.
      # Having no step to train, it traces no train step.
      evaluate_only.setattr(train, 'train_step', lambda *args, **kwargs:
                            pytest.fail('traced a train step'))
      train.train_and_evaluate(tiny_config(train_steps=7, peak_flops=0.0),
                               workdir)
    records = workdir_lib.read_metrics(workdir)
    assert [r['step'] for r in records] == [5, 7]
    assert {'loss', 'val_loss'} <= set(records[-1])
    lines = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith('step ')]
    assert lines == ([] if rerun else  # The second: nothing to train.
                     [f"step 7/7 | val {records[-1]['val_loss']:.4f}"])
  preempted_at = 9
  train.train_and_evaluate(tiny_config(train_steps=9, schedule_steps=20),
                           workdir)
  assert 'val_loss' in workdir_lib.read_metrics(workdir)[-1]


def test_a_run_of_no_steps_compiles_and_evaluates_nothing(tiny_config,
                                                          tmp_path,
                                                          monkeypatch):
  """train_steps 0 saves the initialized model, whose step 0 needs no
  validation loss (`train._evaluated`): no step is compiled, none is
  evaluated, no matmul peak is timed (`convert --from_hf` timed one), and
  the rerun has nothing to train."""
  monkeypatch.setattr(train, 'programs', None)  # Called, it fails.
  monkeypatch.setattr(metrics, 'measure_peak_flops', None)
  run = str(tmp_path / 'run')
  for _ in range(2):
    train.train_and_evaluate(tiny_config(train_steps=0, peak_flops=0.0), run)
    assert os.listdir(os.path.join(run, 'checkpoints')) == ['0']
    assert workdir_lib.read_metrics(run) == []


@pytest.mark.parametrize('overrides,message', [
    ({'sparsity.density': 0.0}, 'sparsity.density must be in'),
    ({'sparsity.density': 1.5}, 'sparsity.density must be in'),
    ({'sparsity.mode': 'dense'}, 'sparsity.mode must be one of'),
    ({'mesh.model': 3}, 'does not fit'),
    ({'mesh.data': 0}, r'mesh.data must be >= 1, or -1 for the devices'),
    ({'mesh.fsdp': -1}, 'at most one axis may be -1'),
    ({'mesh.rules': (('batch', ['data', 'tensor']),)},
     "'batch' maps to unknown mesh axis 'tensor'"),
    ({'batch_size': 0}, 'batch_size must be >= 1'),
    ({'model.norm': 'batchnorm'}, 'model.norm must be one of'),
    ({'model.num_heads': 0}, 'model.num_heads must be >= 1'),
    ({'model.dtype': 'float99'}, 'model.dtype must be one of'),
    ({'model.act_topk_locations': ('nowhere',)},
     r"model.act_topk_locations: unknown \['nowhere'\]"),
    # `--config.model.act_topk_locations=q,k` is the one name 'q,k'.
    ({'model.act_topk_locations': ('q,k',)},
     r"unknown \['q,k'\]; known: .*; several are a tuple: "
     r'--config.model.act_topk_locations="\(\'q\', \'k\'\)"$'),
    ({'model.dropout': 1.0}, r'model.dropout must be in \[0, 1\), got 1.0'),
    ({'optim.lr': -1.0}, 'optim.lr must be >= 0'),
    ({'optim.warmup_fraction': 1.5},
     r'optim.warmup_fraction must be in \[0, 1\], got 1.5'),
    ({'optim.b1': 1.0}, r'optim.b1 must be in \[0, 1\), got 1.0'),
    ({'optim.b2': 1.0}, r'optim.b2 must be in \[0, 1\), got 1.0'),
    ({'optim.weight_decay': -0.1}, 'optim.weight_decay must be >= 0'),
    ({'optim.grad_rms': 0.0},
     'optim.grad_rms must be > 0 and finite, got 0.0'),
    ({'optim.grad_rms': float('inf')},
     'optim.grad_rms must be > 0 and finite, got inf'),
    ({'sparsity.anneal_fraction': 1.5},
     r'sparsity.anneal_fraction must be in \[0, 1\], got 1.5'),
    ({'sparsity.static_init': 'random'},
     "sparsity.static_init must be 'uniform' or 'erk', got 'random'"),
    ({'sparsity.min_per_neuron': -1}, 'sparsity.min_per_neuron must be >= 0'),
    ({'sparsity.pattern': '(unclosed'}, "sparsity.pattern '\\(unclosed' is "
                                         'not a regex'),
    ({'train_steps': -1}, r'train_steps must be in \[0, 2\*\*31\), got -1'),
    # The step is an int32: a traceback at the first step, and a saved
    # config that a corrected command then inherited.
    ({'train_steps': 2**31, 'schedule_steps': 2**31},
     r'train_steps must be in \[0, 2\*\*31\), got 2147483648'),
    ({'schedule_steps': 3_000_000_000},
     r'schedule_steps must be in \[0, 2\*\*31\), got 3000000000'),
    ({'keep_every': -5}, 'keep_every must be >= 0, got -5'),
    # Kept forever are saved steps only: 15 of every 10 kept 30, 60, ...
    ({'keep_every': 15}, 'keep_every 15 must be a multiple of '
                         r'checkpoint_every 10 \(or 0\)'),
    ({'peak_flops': float('nan')}, 'peak_flops must be >= 0, got nan'),
    ({'microbatches': 3}, 'microbatches must be >= 1 and divide batch_size'),
    ({'seq_len': 33, 'model.pos_embedding': True},
     'seq_len 33 > model.max_len 32'),
    ({'optim.lr': float('nan')}, 'optim.lr must be >= 0 and finite, got nan'),
    ({'optim.lr': float('inf')}, 'optim.lr must be >= 0 and finite, got inf'),
    ({'optim.eps': float('nan')}, 'optim.eps must be > 0 and finite, got nan'),
    # Adam's 0 / 0 at every weight whose gradient is exactly zero.
    ({'optim.eps': 0.0}, 'optim.eps must be > 0 and finite, got 0.0'),
    ({'optim.weight_decay': float('inf')},
     'optim.weight_decay must be >= 0 and finite, got inf'),
    # Adam's second moment never decayed in bfloat16, where 0.999 is 1.
    ({'model.param_dtype': 'bfloat16', 'optim.b2': 0.999},
     r'optim.b2 0.999 is within half an ulp of 1 in model.param_dtype '
     r"bfloat16, which holds Adam's moments: they would never decay; use "
     r'param_dtype float32 or b2 <= 0.996$'),
    ({'seed': -1}, r'seed must be in \[0, 2\*\*31\), got -1'),
    ({'data.val_fraction': float('nan')},
     r'data.val_fraction must be in \(0, 1\), got nan'),
    ({'eval_batches': 0}, 'eval_batches must be >= 1'),
    ({'log_every': 0}, 'log_every must be >= 1, got 0'),
    ({'eval_every': 0}, 'eval_every must be >= 1, got 0'),
    ({'checkpoint_every': 0, 'keep_every': 0},
     'checkpoint_every must be >= 1, got 0'),
    ({'keep_checkpoints': 0}, 'keep_checkpoints must be >= 1, got 0'),
    ({'seq_len': 0}, 'seq_len must be >= 1, got 0'),
    ({'data.source': '/no/such/dir'}, 'does not exist'),
    ({'model.vocab_size': 256}, r'data.vocab_size must be in \[257,'),
    ({'train_steps': 30, 'schedule_steps': 20}, 'past the end'),
    ({'init_from_hf': '/no/such/hf_dir'}, 'expected a Hugging Face GPT-2'),
    # Found as the state is traced (`layout`), before the workdir is written.
    ({'sparsity.pattern': 'no_such_weight'}, 'matches no parameter'),
    ({'model.attention': 'cudnn', 'model.attention_sink': False,
      'model.dtype': 'bfloat16'}, "model.attention='cudnn' needs a GPU"),
    # cuDNN's flash attention raised NotImplementedError, a traceback.
    ({'model.attention': 'cudnn', 'model.attention_sink': False},
     "model.attention='cudnn' computes in bfloat16 or float16 only, got "
     "model.dtype='float32'"),
    # Init divided by the derived head size, 32 // 64.
    ({'model.d_head': None, 'model.num_heads': 64},
     'model.d_model 32 over model.num_heads 64 heads leaves d_head 0'),
    ({'model.attention': 'cudnn', 'model.attention_sink': True},
     'does not support attention sinks'),
])
def test_refused_starts_leave_no_files(tiny_config, tmp_path, overrides,
                                       message):
  """So the corrected command is not refused for a workdir it left."""
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(tiny_config(**overrides), str(workdir))
  assert not workdir.exists()


def test_an_adam_beta_is_refused_where_its_decay_rounds_away(tiny_config):
  """In bfloat16, whose ulp above 1 is 2**-7: a beta half an ulp below 1
  decays the moments and is taken; one nearer 1 (0.997, whose decay rounds
  away from every moment just above a power of two) is refused."""
  train.validate(tiny_config(**{'model.param_dtype': 'bfloat16',
                                'optim.b1': 1 - 2**-8, 'optim.b2': 1 - 2**-8}))
  for field in ('b1', 'b2'):
    with pytest.raises(ValueError, match=rf'^optim.{field} 0.997 is within '
                       'half an ulp of 1 in model.param_dtype bfloat16'
                       ) as refused:
      train.validate(tiny_config(**{'model.param_dtype': 'bfloat16',
                                    f'optim.{field}': 0.997}))
    # The value it advises is taken (printed to 4 places, rounded up, it
    # was refused again).
    advised = float(str(refused.value).rsplit('<= ', 1)[1])
    train.validate(tiny_config(**{'model.param_dtype': 'bfloat16',
                                  f'optim.{field}': advised}))


def test_a_resume_may_not_drop_checkpoints_kept_forever(tiny_config,
                                                       tmp_path):
  """orbax applies a manager's keep rule to every checkpoint on disk at its
  next save: a resume whose keep_every no longer keeps a step that the
  run's own kept forever is refused; one that keeps them all may go on."""
  workdir = str(tmp_path / 'run')
  first = workdir_lib.check(
      tiny_config(keep_every=5, keep_checkpoints=1, train_steps=20,
                  schedule_steps=40), workdir)
  workdir_lib.create(first, workdir, {})()  # Given back at once.
  for step in (5, 10, 15, 20):
    os.makedirs(os.path.join(workdir, workdir_lib.CHECKPOINTS, str(step)))
  for keep_every, lost in ((10, [5, 15]), (0, [5, 10, 15, 20]),
                           (3, [5, 10, 20])):
    with pytest.raises(ValueError) as refused:
      workdir_lib.check(tiny_config(keep_every=keep_every, keep_checkpoints=1,
                                    train_steps=30), workdir)
    assert str(refused.value) == (
        f'keep_every {keep_every} would delete checkpoint(s) {lost}, which '
        'keep_every 5 keeps forever: give a divisor of 5, or move those out '
        'of checkpoints/ first')
  # Among the newest two, 15 would still go at the next saves (25, 30)...
  with pytest.raises(ValueError, match=r'checkpoint\(s\) \[5, 15\], which'):
    workdir_lib.check(tiny_config(keep_every=10, keep_checkpoints=2,
                                  train_steps=30), workdir)
  # ... and is safe only where no save comes: the run is at its end.
  with pytest.raises(ValueError, match=r'checkpoint\(s\) \[5\], which'):
    workdir_lib.check(tiny_config(keep_every=10, keep_checkpoints=2,
                                  train_steps=20), workdir)
  with pytest.raises(ValueError, match=r'checkpoint\(s\) \[5, 15\], which'):
    workdir_lib.check(tiny_config(keep_every=10, keep_checkpoints=1,
                                  train_steps=20), workdir)
  for keep_every in (5, 1):  # Divisors of 5 keep every one of them.
    workdir_lib.check(tiny_config(keep_every=keep_every, keep_checkpoints=1,
                                  train_steps=30), workdir)


def test_a_model_the_mesh_refuses_is_refused_before_the_corpus_is_built(
    tiny_config, tmp_path):
  """A first start's corpus takes ~40 s to build (a TFDS source, a
  download): a pattern or mesh the model cannot take is refused first."""
  config = tiny_config(**{'data.data_dir': str(tmp_path / 'tfds'),
                          'sparsity.pattern': 'no_such_weight'})
  with pytest.raises(ValueError, match='matches no parameter'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'tfds').exists() and not (tmp_path / 'run').exists()
  # A mesh axis that does not divide a weight it splits: the abstract state
  # took the sharding, and only the init failed, with the workdir written.
  odd = _main(str(tmp_path / 'run'), config, '--config.num_cpu_devices=2',
              '--config.mesh.data=1', '--config.mesh.model=2',
              '--config.data.vocab_size=257')
  assert odd.returncode == 1 and _errors(odd) == [
      "error: the mesh {'data': 1, 'fsdp': 1, 'model': 2} does not divide "
      ".params['bigram'] (257, 257) as it splits it (P(None, 'model')): "
      'change mesh.* or that size'], odd.stderr[-2000:]
  assert not (tmp_path / 'tfds').exists() and not (tmp_path / 'run').exists()


def test_a_ctrl_c_during_a_restore_is_a_ctrl_c(monkeypatch, tmp_path):
  """orbax wraps a read that a Ctrl-C cancelled in its own exception: that
  is neither a corrupt checkpoint (moved aside) nor a model that does not
  fit it (a refusal), but the user stopping the run."""
  def interrupted(mngr, step, abstract):
    try:
      raise KeyboardInterrupt
    except KeyboardInterrupt:
      raise Exception('Encountered error while reading array index')  # pylint: disable=broad-exception-raised

  monkeypatch.setattr(checkpoint, 'restore', interrupted)
  mngr = types.SimpleNamespace(all_steps=lambda: [10],
                               directory=tmp_path / 'checkpoints')
  with pytest.raises(KeyboardInterrupt):
    checkpoint.restore_latest(mngr, None, str(tmp_path))
  assert not (tmp_path / 'corrupt_checkpoints').exists()


def test_a_remote_workdir_without_its_file_system_is_one_line(tiny_config):
  if importlib.util.find_spec('gcsfs'):
    pytest.skip('gcsfs is installed: the bucket would be looked up')
  with pytest.raises(ValueError, match=r'^workdir gs://no-bucket/run: Please '
                     r'install gcsfs .*\(pip install gcsfs '
                     r'google-cloud-storage, as launch/tpu_vm.sh does\)$'):
    workdir_lib.check(tiny_config(), 'gs://no-bucket/run')


def test_a_start_into_a_run_being_written_is_refused(tiny_config, tmp_path):
  """Another start holds the run directory (here: this process, between
  `create` and the end of its run): a second start, in another process, is
  refused in one line, naming the holder, and changes nothing; once the
  first gives it back, the same run starts. That start is made in this
  process (its lock is a `flock`, which another open of the file in the
  same process is refused too), on tiny's own 20 steps, whose programs
  other tests compile."""
  config = tiny_config()
  workdir = str(tmp_path / 'run')
  held = workdir_lib.check(config, workdir)
  unlock = workdir_lib.create(held, workdir, {})
  try:
    before = _listing(workdir)
    second = _main(workdir, config)
    assert second.returncode == 1 and _errors(second) == [
        f'error: another run is writing into {workdir} (pid {os.getpid()} '
        f'on {socket.gethostname()}): wait for it to end, or stop it'], (
            second.stderr[-2000:])
    assert _listing(workdir) == before
  finally:
    unlock()
  again = train.train_and_evaluate(config, workdir)
  assert int(again.step) == config.train_steps


def test_a_start_that_saved_nothing_leaves_the_next_start_free(tiny_config,
                                                               tmp_path):
  """A first start stopped before its first checkpoint (here: a NaN loss)
  holds no training: the corrected command starts the run anew instead of
  being refused for the config the failed start wrote."""
  workdir = str(tmp_path / 'run')
  with pytest.raises(FloatingPointError, match='before any good checkpoint'):
    train.train_and_evaluate(tiny_config(**{'optim.lr': 1e30}), workdir)
  assert workdir_lib.checkpoint_steps(workdir) == []
  state = train.train_and_evaluate(tiny_config(train_steps=20), workdir)
  assert int(state.step) == 20
  assert workdir_lib.load_config(workdir).optim.lr == 1e-2
  assert [r['step'] for r in workdir_lib.read_metrics(workdir)] == list(
      range(5, 21, 5))


def test_a_resume_on_another_corpus_is_refused(reference_run, tmp_path):
  """The run records what names its corpus; a start that finds another
  (here: the record altered, as another machine's stdlib would differ)
  is refused before it writes anything."""
  config, reference, _ = reference_run
  record = json.loads(open(os.path.join(reference, 'corpus.json')).read())
  assert record == data.fingerprint(data.load(config.data, config.seq_len))
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  (workdir / 'corpus.json').write_text(json.dumps(
      dict(record, train_tokens=record['train_tokens'] + 1)))
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob('*')}
  with pytest.raises(ValueError) as refused:
    train.train_and_evaluate(config, str(workdir))
  assert str(refused.value) == (
      f'the corpus here differs from the one {workdir} trained on '
      '(train_tokens): resuming would train on other data; build the same '
      'corpus (the same source files, or Python for stdlib) or start a new '
      'run')
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob('*')} == before


def test_a_damaged_metrics_file_is_refused_before_anything_is_written(
    reference_run, tmp_path):
  """A metrics.jsonl cut mid-line (a hand edit) is refused by the start's
  checks, not by the run's first log: that came after the start had
  rewritten config.json with its own train_steps."""
  config, reference, _ = reference_run
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / 'checkpoints' / '60')  # Steps 51-60 to train.
  text = (workdir / 'metrics.jsonl').read_text()
  (workdir / 'metrics.jsonl').write_text(text[:-20])
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob('*')}
  with pytest.raises(ValueError, match=r'metrics.jsonl line \d+ is not valid '
                     'JSON'):
    train.train_and_evaluate(config, str(workdir))
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob('*')} == before


def test_empty_corpus_fails_clearly(tiny_config, tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  config = tiny_config()
  config.data.source = str(empty)
  with pytest.raises(ValueError, match='empty corpus'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_a_different_config_never_touches_an_existing_run(reference_run):
  config, workdir, _ = reference_run
  before = _listing(workdir)
  changed = json.loads(config.to_json())
  other = type(config)(changed)
  other.optim.lr = 0.5
  other.model.d_head = None
  with pytest.raises(ValueError, match=(
      r"different config \(model\.d_head 16 there, None here; optim\.lr "
      r"0\.01 there, 0\.5 here\): use another --workdir, or the same values$")):
    train.train_and_evaluate(other, workdir)
  # What draws the batches, and what they are drawn from, are the run's too.
  for field, value, shown in (('seed', 1, 'seed 0 there, 1 here'),
                              ('batch_size', 16, 'batch_size 8 there, 16 here'),
                              ('data.val_fraction', 0.1,
                               'data.val_fraction 0.05 there, 0.1 here')):
    changed = type(config)(json.loads(config.to_json()))
    node, *parents, leaf = changed, *field.split('.')
    for name in parents:
      node = node[name]
    node[leaf] = value
    with pytest.raises(ValueError, match=r'different config \(' + re.escape(
        shown) + r'\)'):
      workdir_lib.check(changed, workdir)
  # How a step is laid out may change (a GPU run's cuDNN attention resumed
  # on a TPU was refused), what it computes may not.
  changed = type(config)(json.loads(config.to_json()))
  changed.model.attention, changed.model.remat = 'xla', 'full'
  changed.mesh.data = 1
  assert workdir_lib.check(changed, workdir).model.remat == 'full'
  changed.model.attention_sink = False
  with pytest.raises(ValueError, match=r'different config \(model\.'
                     r'attention_sink True there, False here\)'):
    workdir_lib.check(changed, workdir)
  assert _listing(workdir) == before


def test_workdirs_that_are_not_runs_are_refused(tiny_config, tmp_path):
  a_file = tmp_path / 'file'
  a_file.write_text('x')
  with pytest.raises(ValueError, match='not a directory'):
    train.train_and_evaluate(tiny_config(), str(a_file))
  other = tmp_path / 'notes'
  other.mkdir()
  (other / 'todo.txt').write_text('keep me')
  with pytest.raises(ValueError, match='not a run directory'):
    train.train_and_evaluate(tiny_config(), str(other))
  assert os.listdir(other) == ['todo.txt']
  # A first start killed while it wrote config.json left only that: no
  # run yet, and nothing of the user's, so the same command starts it.
  killed = tmp_path / 'killed'
  killed.mkdir()
  (killed / 'config.json.tmp4242').write_text('{"half": ')
  assert workdir_lib.check(tiny_config(), str(killed)).train_steps == 20
  # Orbax's background save into a file would never return.
  (other / 'config.json').write_text(tiny_config().to_json())
  (other / 'checkpoints').write_text('x')
  with pytest.raises(ValueError, match='checkpoints exists and is not a dir'):
    train.train_and_evaluate(tiny_config(), str(other))
  (other / 'checkpoints').unlink()  # Where corrupt ones would be set aside.
  (other / 'corrupt_checkpoints').write_text('x')
  with pytest.raises(ValueError, match='corrupt_checkpoints exists and is '
                     'not a dir'):
    workdir_lib.check(tiny_config(), str(other))
  # Below a file: the OSError, which every CLI says in one line.
  result = _main(a_file / 'run', tiny_config())
  assert result.returncode == 1 and _errors(result) == [
      f"error: [Errno 20] Not a directory: '{a_file / 'run'}'"], result.stderr
  assert a_file.read_text() == 'x'
  # Where no one may write (Linux's sysfs refuses root too).
  result = _main('/sys/sparse_gpt2_run', tiny_config())
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert re.fullmatch(r"error: \[Errno (1|13)\] (Operation not permitted|"
                      r"Permission denied): '/sys/sparse_gpt2_run'",
                      *_errors(result)), result.stderr


def test_a_workdir_under_a_link_to_nothing_is_refused_first(tiny_config,
                                                           tmp_path):
  """runs/ linked to a scratch disk that is not mounted: said at the start,
  not as "File exists: runs" from the mkdir after the corpus was built."""
  runs = tmp_path / 'runs'
  runs.symlink_to(tmp_path / 'scratch')
  for workdir in (runs, runs / 'a' / 'run'):
    with pytest.raises(ValueError, match=(
        f'^{re.escape(str(runs))} is a link to '
        f'{re.escape(str(tmp_path / "scratch"))}, which does not exist '
        r'\(a disk not mounted\?\): create its target, or give another '
        'workdir$')):
      workdir_lib.check(tiny_config(), str(workdir))
  (tmp_path / 'scratch').mkdir()
  assert workdir_lib.check(tiny_config(), str(runs / 'run')).train_steps == 20


@pytest.mark.parametrize('text,message', [
    ('{"seed": 0,', r'config.json is not valid JSON \(Expecting'),
    ('[1, 2]', r'config.json is not a run config \(not a JSON object\)'),
    ('{"seed": 0}', r"config.json is not a run config \(no \['batch_size'"),
])
def test_a_damaged_saved_config_is_named(tiny_config, tmp_path, text,
                                         message):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text(text)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(tiny_config(), str(workdir))
  assert (workdir / 'config.json').read_text() == text


def test_a_damaged_metrics_line_is_named(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1}\n{"step": 2, "lo')
  with pytest.raises(ValueError, match=r'metrics.jsonl line 2 is not valid'):
    workdir_lib.read_metrics(str(tmp_path))
  for line in ('{"loss": 1.0}', '[1, 2]', '{"step": "3"}'):
    (tmp_path / 'metrics.jsonl').write_text('{"step": 1}\n' + line)
    with pytest.raises(ValueError, match=r'metrics.jsonl line 2 is not a '
                       r'record of a step \(a JSON object with an integer '
                       r'"step"\)$'):
      workdir_lib.read_metrics(str(tmp_path))


def test_a_damaged_corpus_record_is_named(tmp_path):
  (tmp_path / 'checkpoints' / '10').mkdir(parents=True)
  (tmp_path / 'corpus.json').write_text('[]')
  with pytest.raises(ValueError, match=r'corpus.json is not a corpus record '
                     r'\(not a JSON object\)$'):
    workdir_lib.check_corpus(str(tmp_path), {'vocab_sha256': 'x'})


def test_a_corpus_record_kept_before_the_train_digest_still_resumes(
    tmp_path):
  """Runs saved before the train stream's digest was recorded resume on
  their corpus; once recorded, another train stream is refused."""
  (tmp_path / 'checkpoints' / '10').mkdir(parents=True)
  record = {'vocab_sha256': 'v', 'train_tokens': 5, 'validation_tokens': 2,
            'validation_sha256': 'w'}
  (tmp_path / 'corpus.json').write_text(json.dumps(record))
  workdir_lib.check_corpus(str(tmp_path), dict(record, train_sha256='t'))
  (tmp_path / 'corpus.json').write_text(json.dumps(
      dict(record, train_sha256='t')))
  with pytest.raises(ValueError, match=r'differs .* \(train_sha256\): '
                     'resuming would train on other data'):
    workdir_lib.check_corpus(str(tmp_path), dict(record, train_sha256='u'))
  # No other field may be missing.
  del record['vocab_sha256']
  (tmp_path / 'corpus.json').write_text(json.dumps(record))
  with pytest.raises(ValueError, match=r'differs .* \(vocab_sha256\)'):
    workdir_lib.check_corpus(str(tmp_path), dict(record, vocab_sha256='v'))


@pytest.mark.parametrize('name,read', [
    ('config.json', workdir_lib.load_config),
    ('metrics.jsonl', workdir_lib.read_metrics),
    ('corpus.json',
     lambda workdir: workdir_lib.check_corpus(workdir, {'vocab_sha256': 'x'})),
])
def test_a_run_file_that_is_not_utf8_is_named(tmp_path, name, read):
  """A run file with bytes that are not UTF-8 (damaged, or written by
  another tool): the refusal names the file (a bare decode error, which
  `main` printed, named none)."""
  (tmp_path / 'checkpoints' / '10').mkdir(parents=True)
  (tmp_path / name).write_bytes(b'{"step": "caf\xe9"}')
  with pytest.raises(ValueError, match=(
      f'^{re.escape(str(tmp_path / name))} is not UTF-8 text '
      r'\(byte 13 is 0xe9\)$')):
    read(str(tmp_path))


def test_a_failed_config_write_leaves_the_old_config(tmp_path, full_disk):
  """A write that fails midway (a full disk) leaves the old config.json
  whole, and no temporary file beside it."""
  file = workdir_lib.path(tmp_path) / workdir_lib.CONFIG
  file.write_text('{"old": true}')
  with full_disk(), pytest.raises(OSError):
    workdir_lib.write_atomic(file, '{"new": "' + 'x' * 10_000 + '"}')
  assert file.read_text() == '{"old": true}'
  assert os.listdir(tmp_path) == [workdir_lib.CONFIG]
  workdir_lib.write_atomic(file, '{"new": 1}')  # Room again: replaced whole.
  assert file.read_text() == '{"new": 1}'
  assert os.listdir(tmp_path) == [workdir_lib.CONFIG]


def test_a_run_file_is_synced_before_it_replaces_the_old(tmp_path,
                                                        sync_and_rename):
  """config.json, metrics.jsonl: the new file's bytes reach the disk before
  the rename does, as the corpus cache's do (test_data)."""
  file = workdir_lib.path(tmp_path) / workdir_lib.CONFIG
  workdir_lib.write_atomic(file, '{"new": 1}')
  assert sync_and_rename == ['fsync', 'replace']
  assert file.read_text() == '{"new": 1}'
  assert os.listdir(tmp_path) == [workdir_lib.CONFIG]


def test_a_config_saved_before_schedule_steps_loads_and_resumes(tiny_config,
                                                               tmp_path):
  """Runs from before the field planned their schedules over train_steps:
  their config.json, which lacks it, loads as such, and resumes."""
  saved = json.loads(tiny_config(train_steps=30).to_json())
  del saved['schedule_steps']
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  (tmp_path / 'checkpoints' / '10').mkdir(parents=True)
  assert workdir_lib.load_config(str(tmp_path)).schedule_steps == 30
  resumed = workdir_lib.check(tiny_config(train_steps=20), str(tmp_path))
  assert resumed.schedule_steps == 30


def test_a_run_whose_checkpoints_were_all_set_aside_is_still_a_run(
    tiny_config, tmp_path):
  """Its corrupt checkpoints hold training: a start with another config
  is refused, not taken for a new run."""
  workdir = str(tmp_path / 'run')
  workdir_lib.create(workdir_lib.check(tiny_config(), workdir), workdir, {})()
  os.makedirs(os.path.join(workdir, workdir_lib.CORRUPT, '10-1700000000'))
  with pytest.raises(ValueError, match=r'different config \(optim\.lr'):
    workdir_lib.check(tiny_config(**{'optim.lr': 0.5}), workdir)


def test_the_run_directorys_lock_names_its_holder_and_is_given_back(
    tiny_config, tmp_path):
  """A start refused names the start that holds the lock, not those
  before it; a start that `create` refuses gives the lock back, also while
  its error is kept (a notebook keeps the last one)."""
  workdir = str(tmp_path / 'run')
  config = workdir_lib.check(tiny_config(), workdir)
  workdir_lib.create(config, workdir, {})()  # Taken and given back.
  unlock = workdir_lib.create(config, workdir, {})
  try:
    with pytest.raises(ValueError) as refused:
      workdir_lib.create(config, workdir, {})
  finally:
    unlock()
  assert str(refused.value) == (
      f'another run is writing into {workdir_lib.path(workdir)} (pid '
      f'{os.getpid()} on {socket.gethostname()}): wait for it to end, or '
      'stop it')
  with pytest.raises(ValueError, match='past the end') as kept:
    workdir_lib.create(tiny_config(train_steps=30, schedule_steps=20),
                       workdir, {})
  assert kept.tb is not None  # Its frames, and what they hold, are kept:
  workdir_lib.create(config, workdir, {})()  # the lock was given back.


def test_a_start_that_saved_nothing_records_its_own_corpus(tiny_config,
                                                           tmp_path):
  """A first start that stopped before any checkpoint holds no training:
  a restart on another corpus is a new run, and corpus.json then names the
  new corpus (not the one no step trained on), so that the resume after
  its first checkpoint checks against the right one."""
  workdir = str(tmp_path / 'run')
  config = tiny_config()
  workdir_lib.create(workdir_lib.check(config, workdir), workdir,
                     {'vocab_sha256': 'first'})()
  workdir_lib.check_corpus(workdir, {'vocab_sha256': 'second'})
  workdir_lib.create(workdir_lib.check(config, workdir), workdir,
                     {'vocab_sha256': 'second'})()
  corpus = os.path.join(workdir, workdir_lib.CORPUS)
  assert json.loads(open(corpus).read()) == {'vocab_sha256': 'second'}
  os.makedirs(os.path.join(workdir, workdir_lib.CHECKPOINTS, '10'))
  workdir_lib.check_corpus(workdir, {'vocab_sha256': 'second'})
  with pytest.raises(ValueError, match=r'differs .* \(vocab_sha256\)'):
    workdir_lib.check_corpus(workdir, {'vocab_sha256': 'first'})
  # Once a checkpoint holds training, a start does not rewrite the record.
  workdir_lib.create(workdir_lib.check(config, workdir), workdir,
                     {'vocab_sha256': 'third'})()
  assert json.loads(open(corpus).read()) == {'vocab_sha256': 'second'}


def test_the_matmul_peak_is_the_fastest_of_its_repeats(monkeypatch):
  """2 n^3 FLOPs over the fastest reading (elapsed 2, 1 and 3 s): a
  moment of load lowers a reading, never raises it."""
  clock = iter([0.0, 2.0, 10.0, 11.0, 20.0, 23.0])
  monkeypatch.setattr(metrics.time, 'perf_counter', lambda: next(clock))
  assert metrics.measure_peak_flops(n=8, repeats=3) == 2 * 8**3 / 1.0


def test_the_console_line_says_each_metric(caplog):
  logged = {'loss': 2.0, 'val_loss': 2.5, 'lr': 1e-3, 'l0': 12_345,
            'tokens_per_s': 1234.4, 'mfu': 0.4567, 'peak_memory_gib': 3.25}
  with caplog.at_level('INFO'):
    metrics.console_line(5, 10, logged, 59.0)
  assert [r.getMessage() for r in caplog.records] == [
      'step 5/10 | loss 2.0000 | val 2.5000 | lr 1.00e-03 | L0 12,345 | '
      '1,234 tok/s | MFU 45.7% | peak mem 3.2 GiB | ETA 00:00:59']


def test_an_eta_of_days_says_so(caplog):
  logged = {'loss': 2.0, 'lr': 1e-3, 'l0': 10, 'tokens_per_s': 1.0,
            'mfu': 0.1}
  with caplog.at_level('INFO'):
    metrics.console_line(5, 10, logged, 3 * 86400 + 3661.7)
    metrics.console_line(5, 10, logged, 59.0)
  assert [r.getMessage().rsplit(' | ', 1)[1] for r in caplog.records] == [
      'ETA 3d 01:01:01', 'ETA 00:00:59']


def _errors(result):
  return [l for l in result.stderr.splitlines() if l.startswith('error:')]


@pytest.mark.parametrize('module,args,message', [
    ('sparse_gpt2.circuits', ['--bogus'], "Unknown command line flag 'bogus'"),
    ('sparse_gpt2.circuits.compare', ['--curve_every=0'],
     'flag --curve_every=0: 0 is not a positive integer'),
    ('sparse_gpt2.circuits.compare', ['--convergence_steps=100,abc'],
     '--convergence_steps must be step counts >= 1, e.g. 100,200'),
    # A NaN gap matched no checkpoint, and pairs[0] was an IndexError.
    ('sparse_gpt2.circuits.compare', ['--max_loss_gap=nan'],
     '--max_loss_gap must be >= 0 and finite'),
    ('sparse_gpt2.circuits.compare', ['--pairs=0'],
     'flag --pairs=0: 0 is not a positive integer'),
    ('sparse_gpt2.circuits', ['--evaluate', '--evaluate_every=-5'],
     'flag --evaluate_every=-5: -5 is not a non-negative integer'),
    ('sparse_gpt2.circuits.view', ['--snippets_per_node=-1'],
     'flag --snippets_per_node=-1: -1 is not a non-negative integer'),
    # 20,000 CPU devices took jax past 90 s before anything refused them.
    ('sparse_gpt2.circuits', ['--num_cpu_devices=20000'],
     'flag --num_cpu_devices=20000: 20000 is not an integer in the range '
     '[1, 1024]'),
    ('sparse_gpt2.plan', ['--config.sparsity.densty=0.5'],
     """no such config field: 'densty' (Did you mean "density" instead of """
     '"densty"?)'),
])
def test_every_cli_refuses_a_bad_command_line_in_one_line(module, args,
                                                          message, tmp_path):
  required = {'sparse_gpt2.circuits.compare': ['--sparse=a', '--dense=b',
                                               f'--out={tmp_path}/c'],
              'sparse_gpt2.circuits.view': [f'--out={tmp_path}/p.html'],
              'sparse_gpt2.plan': ['--config=configs/tiny.py']}
  result = subprocess.run(
      [sys.executable, '-m', module, *required.get(module, []), *args],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
  assert message in lines[0]
  assert os.listdir(tmp_path) == []


def test_help_lists_the_pruning_settings():
  # --target_loss, which the README's commands set, and the other settings
  # were in --helpfull only, under settings.py among absl's and orbax's.
  # compare's --help is its module's, read here without a second process.
  from absl import flags  # pylint: disable=g-import-not-at-top
  from sparse_gpt2.circuits import compare  # pylint: disable=g-import-not-at-top
  result = subprocess.run(
      [sys.executable, '-m', 'sparse_gpt2.circuits', '--help'], cwd=ROOT,
      capture_output=True, text=True, timeout=120)
  for text in (result.stdout, flags.FLAGS.module_help(compare)):
    listed = {line.split(':')[0].strip() for line in text.splitlines()
              if line.startswith('  --')}
    assert {'--target_loss', '--steps', '--num_cpu_devices',
            '--step'} <= listed, text


def test_every_required_flag_left_out_is_named(monkeypatch, capsys):
  # absl says each on a line of its own; only the first and the last were
  # kept, so compare run bare named --sparse and --out, not --dense.
  from absl import flags  # pylint: disable=g-import-not-at-top
  names = ('sparse', 'dense', 'out')
  flag_values = flags.FlagValues()
  for name in names:
    flags.DEFINE_string(name, None, 'A run.', flag_values=flag_values)
  flags.mark_flags_as_required(names, flag_values=flag_values)
  monkeypatch.setattr(cli.flags, 'FLAGS', flag_values)
  with pytest.raises(SystemExit) as exit_:
    cli._parse_flags(['compare'])
  assert exit_.value.code == 2
  error = capsys.readouterr().err
  assert error.startswith('error: ') and error.count('\n') == 1, error
  for name in names:
    assert f'Flag --{name} must have a value other than None' in error


def test_a_path_flags_home_is_the_home_folder(monkeypatch):
  """`~` after `--flag=`, which the shell leaves alone, in a path flag and
  in each path of a list flag (`compare --tasks=a,~/t.jsonl`)."""
  monkeypatch.setenv('HOME', '/home/u')
  assert cli._home('~/run') == '/home/u/run' and cli._home('~') == '/home/u'
  assert cli._home(['for_while', '~/t.jsonl']) == ['for_while',
                                                  '/home/u/t.jsonl']
  for kept in ('runs/~/x', '~user/x', 'a~', 3, None):
    assert cli._home(kept) == kept


def test_a_config_that_does_not_load_is_one_line(tmp_path):
  raising = tmp_path / 'raising.py'
  raising.write_text('def get_config():\n  raise RuntimeError("boom")\n')
  for config, message in (
      (raising, 'error: the config does not load: RuntimeError: boom'),
      # A config that takes no argument refuses one: not the default run.
      ('configs/sparse_small.py:bogus',
       "sparse_small takes no argument, got 'bogus'")):
    result = subprocess.run(
        [sys.executable, '-m', 'sparse_gpt2.plan', f'--config={config}'],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith('error: ') and message in line, line


def test_command_line_errors_are_one_line_and_non_zero(tiny_config, tmp_path):
  config = tiny_config()
  unknown = _main(str(tmp_path / 'a'), config, '--config.no_such_field=1')
  assert unknown.returncode == 2
  assert _errors(unknown) == ["error: no such config field: 'no_such_field'"]
  assert 'Traceback' not in unknown.stderr
  missing = subprocess.run(
      [sys.executable, '-m', 'sparse_gpt2.main', '--config=configs/nope.py',
       f'--workdir={tmp_path / "c"}'], cwd=ROOT, capture_output=True,
      text=True, timeout=300)
  assert missing.returncode == 2 and 'Traceback' not in missing.stderr
  assert _errors(missing) == [
      "error: [Errno 2] No such file or directory: 'configs/nope.py'"]
  bad_arg = subprocess.run(
      [sys.executable, '-m', 'sparse_gpt2.main',
       '--config=configs/sparse_medium.py:bogus',
       f'--workdir={tmp_path / "d"}'], cwd=ROOT, capture_output=True,
      text=True, timeout=300)
  assert bad_arg.returncode == 2 and 'Traceback' not in bad_arg.stderr
  assert _errors(bad_arg) == [
      'error: flag --config=configs/sparse_medium.py:bogus: Error whilst '
      "parsing config file: ValueError: sparse_medium: unknown arg 'bogus'; "
      "known: 'abstopk'"]
  assert not (tmp_path / 'd').exists()
  bad = _main(str(tmp_path / 'b'), config, '--config.sparsity.density=2')
  assert bad.returncode == 1
  errors = [l for l in bad.stderr.splitlines() if l.startswith('error:')]
  assert errors == ['error: sparsity.density must be in (0, 1], got 2.0']
  many = _main(str(tmp_path / 'e'), config, '--config.num_cpu_devices=20000')
  assert many.returncode == 1  # At once: jax made no device.
  assert _errors(many) == [
      'error: num_cpu_devices must be at most 1024, got 20000']
  assert not (tmp_path / 'e').exists()


def test_cpu_devices_above_the_bound_are_refused_before_any_is_made():
  """One more than the bound `plan`'s cpu:N shares is refused, before jax
  is told of it (a run's 20,000 ran past 90 s first)."""
  with pytest.raises(ValueError, match=r'^num_cpu_devices must be at most '
                     rf'{cli.MAX_CPU_DEVICES}, got {cli.MAX_CPU_DEVICES + 1}$'):
    cli.start_jax(cli.MAX_CPU_DEVICES + 1)


def test_sharded_training_on_8_devices_matches_one_device(tiny_config,
                                                         tmp_path, caplog):
  """data 4 x model 2 on CPU devices that `num_cpu_devices` makes (a mesh
  that did not get them would not fit): same losses as one device. Its
  saves slice no array over the 4 replicas (orbax's replica-parallel
  saving, which compiles a slicing program per shape), as one process
  writes each array from one replica. The one-device run is this
  process's (its one CPU device), with the same compile log."""
  config = tiny_config('none', train_steps=10, log_every=1)
  flags = ('--config=configs/tiny.py:none', '--config.train_steps=10',
           '--config.log_every=1', f'--config.data.source={config.data.source}',
           f'--config.data.data_dir={config.data.data_dir}')
  assert jax.device_count() == 1
  workdir = str(tmp_path / 'one')
  with jax.log_compiles(True), caplog.at_level('WARNING'):
    train.train_and_evaluate(config, workdir)
  compiles = caplog.text
  assert 'Compiling jit(train_step)' in compiles
  assert 'Compiling jit(slice)' not in compiles
  one = [m['loss'] for m in _metrics(workdir)]
  workdir = str(tmp_path / 'mesh')
  result = subprocess.run(
      [sys.executable, '-m', 'sparse_gpt2.main', f'--workdir={workdir}',
       *flags, '--config.mesh.model=2', '--config.num_cpu_devices=8'],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_LOG_COMPILES='1'))
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'Compiling jit(train_step)' in result.stderr
  assert 'Compiling jit(slice)' not in result.stderr
  np.testing.assert_allclose([m['loss'] for m in _metrics(workdir)], one,
                             rtol=1e-4)


_FAULTS_PER_STEP = r"""
import resource, sys
from sparse_gpt2 import cli
if sys.argv[1] == 'keep':
  cli.keep_freed_memory()
import jax, jax.numpy as jnp
step = jax.jit(lambda x: jnp.sum(jnp.sin(jnp.outer(x, x)) @ x))  # 64 MiB temp.
x = jnp.ones(4096)
faults = []
for _ in range(21):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults[1:])[10])  # The median call after the first.
"""


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_freed_memory_is_reused_without_page_faults():
  # Not every call reuses: now and then the heap grows by a temporary until
  # the freed pieces fit it (1-8 of 39 calls faulted in scratch runs of 40,
  # loaded or idle), so the median call is checked.
  faults = {how: int(subprocess.run(
      [sys.executable, '-c', _FAULTS_PER_STEP, how], capture_output=True,
      text=True, check=True, cwd=ROOT).stdout) for how in ('default', 'keep')}
  assert faults['default'] > 8000  # 16,384 pages of 4 KiB every call...
  assert faults['keep'] < 500      # ...or faulted in once, then reused.


_RAISES = r"""
import errno, os, sys
from sparse_gpt2 import cli
code = getattr(errno, sys.argv.pop(1))
def main():
  raise OSError(code, os.strerror(code), 'runs/x/checkpoints')
cli.run(main)
"""


@pytest.mark.parametrize('code, one_line', [
    ('ENOSPC', True), ('EDQUOT', True), ('EROFS', True), ('EIO', False)])
def test_a_full_or_read_only_disk_is_one_line(code, one_line):
  """A full disk, a quota or a read-only mount stops a command in one line
  naming the path; an I/O error, a fault, keeps its traceback."""
  result = subprocess.run([sys.executable, '-c', _RAISES, code],
                          capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 1
  number = getattr(errno, code)
  message = f"[Errno {number}] {os.strerror(number)}: 'runs/x/checkpoints'"
  if one_line:
    assert result.stderr == f'error: {message}\n'
  else:
    assert 'Traceback' in result.stderr and message in result.stderr


def test_a_write_the_disk_stops_names_its_file(tmp_path, full_disk):
  """metrics.jsonl, config.json, a circuit: a write that a full disk stops
  names no file, and `cli.run`'s line said only "No space left on device"
  of a run that writes to three disks."""
  file = workdir_lib.path(tmp_path) / workdir_lib.METRICS
  with full_disk(), pytest.raises(OSError) as stopped:
    workdir_lib.write_atomic(file, 'x' * 10_000)
  assert (stopped.value.errno, stopped.value.filename) == (errno.EFBIG,
                                                           str(file))
  assert not os.listdir(tmp_path)


_CTRL_C = r"""
import gc, os, signal, sys, time
from sparse_gpt2 import cli
# As a terminal starts a command: a suite run in the background (nohup, a
# CI job's `&`) starts its processes with Ctrl-C ignored, which Python keeps.
signal.signal(signal.SIGINT, signal.default_int_handler)
where = sys.argv.pop(1)
def in_a_gc_callback(phase, info):
  if phase == 'start':
    os.kill(os.getpid(), signal.SIGINT)
def main():
  if where == 'gc':
    gc.callbacks.append(in_a_gc_callback)
    gc.collect()
    gc.callbacks.remove(in_a_gc_callback)
  else:
    os.kill(os.getpid(), signal.SIGINT)
  time.sleep(5)  # Where a Ctrl-C raised again lands.
  print('went on')
cli.run(main)
"""


@pytest.mark.parametrize('where', ['main', 'gc'])
def test_a_ctrl_c_is_one_line(where):
  """The user stopping a command is no fault: one line and 130 (128 +
  SIGINT, as a shell reports it), not a traceback. In a gc callback (jax
  runs one at each collection), Python only printed it, and the command
  went on."""
  result = subprocess.run([sys.executable, '-c', _CTRL_C, where],
                          capture_output=True, text=True, cwd=ROOT)
  assert (result.returncode, result.stderr, result.stdout) == (
      130, 'error: interrupted\n', '')


_MAIN_WITH_A_SPY = r"""
import sys
import jax
from sparse_gpt2 import cli, main, train
cli.keep_freed_memory = lambda: print('kept')
train.train_and_evaluate = lambda config, workdir, compile_apart: print(
    'apart' if compile_apart else 'here', jax.config.jax_compilation_cache_dir)
sys.argv = ['main', '--config=configs/tiny.py',
            f'--config.train_steps={sys.argv[1]}']
cli.run(main.main)
"""


def _main_with_a_spy(steps, env=None):
  """main's output, run up to train_and_evaluate: 'kept' if it kept freed
  memory, where the run compiles its steps ('apart' in a child process or
  'here'), and the directory it keeps compiled programs in."""
  return subprocess.run([sys.executable, '-c', _MAIN_WITH_A_SPY, str(steps)],
                        capture_output=True, text=True, check=True, cwd=ROOT,
                        env=env).stdout.split()


_MAIN_AS_A_COMMAND = r"""
import runpy
import sys
from sparse_gpt2 import train
preempt = sys.argv[1] == 'preempt'
def spy(config, workdir, compile_apart):
  if preempt:
    raise train.Preempted('preempted at step 7; saved a checkpoint there, '
                          'rerun the same command to resume')
  print('workdir', workdir)
train.train_and_evaluate = spy
sys.argv = ['main', *sys.argv[2:]]
runpy.run_module('sparse_gpt2.main', run_name='__main__', alter_sys=True)
"""


@pytest.mark.parametrize('spy, args, code, out, error', [
    # The default workdir is named after the config file, not its argument.
    ('print', ['--config=configs/tiny.py'], 0, ['workdir runs/tiny'], None),
    ('print', ['--config=configs/tiny.py:none'], 0, ['workdir runs/tiny'],
     None),
    ('print', ['--config=configs/tiny.py', '--workdir=elsewhere'], 0,
     ['workdir elsewhere'], None),
    # `--workdir=` (an unset shell variable) is refused, not runs/tiny.
    ('print', ['--config=configs/tiny.py', '--workdir='], 1, [],
     'error: --workdir is empty; leave it out for runs/CONFIG_NAME'),
    ('preempt', ['--config=configs/tiny.py'], 1, [],
     'error: preempted at step 7; saved a checkpoint there, rerun the same '
     'command to resume'),
])
def test_main_hands_its_workdir_on_and_says_a_preemption_in_one_line(
    spy, args, code, out, error):
  result = subprocess.run([sys.executable, '-c', _MAIN_AS_A_COMMAND, spy,
                           *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
  assert result.returncode == code, result.stderr[-2000:]
  assert [l for l in result.stdout.splitlines() if l.strip()] == out
  assert 'Traceback' not in result.stderr
  assert _errors(result) == ([error] if error else [])
  if error:
    assert [l for l in result.stderr.splitlines() if l.strip()] == [error]


@pytest.mark.parametrize('steps', [cli.STEPS_TO_EARN_BACK_FREED_MEMORY - 1,
                                   cli.STEPS_TO_EARN_BACK_FREED_MEMORY])
def test_only_runs_long_enough_keep_freed_memory(steps):
  # Its one malloc arena slows compiles, which a short run never earns back;
  # a run that keeps it compiles its steps apart, out of that heap.
  long_enough = steps >= cli.STEPS_TO_EARN_BACK_FREED_MEMORY
  out = _main_with_a_spy(steps)
  assert ('kept' in out) == ('apart' in out) == long_enough


@pytest.mark.parametrize('platforms, kept', [('cpu', True), ('tpu', False),
                                              ('cuda', False)])
def test_only_cpu_runs_keep_freed_memory(platforms, kept):
  # With an accelerator the step's temporaries are not in host memory, and
  # the one arena only slowed the host's compiles.
  env = dict(os.environ, JAX_PLATFORMS=platforms)
  out = _main_with_a_spy(cli.STEPS_TO_EARN_BACK_FREED_MEMORY, env)
  assert ('kept' in out) == ('apart' in out) == kept


@pytest.mark.skipif(bool(jax.config.jax_platforms),
                    reason='JAX_PLATFORMS is set, and decides first')
@pytest.mark.parametrize('vendor, libtpu, gpu_files, plugins, on_cpu', [
    ('0x8086', True, False, [], True),             # No accelerator.
    ('0x1ae0', True, False, [], False),            # A TPU VM.
    ('0x1ae0', False, False, [], True),            # A TPU, CPU-only jax.
    ('0x8086', False, True, ['jax_plugins.xla_cuda12'], False),  # A GPU.
    ('0x8086', False, True, [], True),             # A GPU, CPU-only jax.
])
def test_runs_on_cpu_unless_jax_can_use_an_attached_accelerator(
    tmp_path, monkeypatch, vendor, libtpu, gpu_files, plugins, on_cpu):
  (tmp_path / 'vendor').write_text(vendor + '\n')
  if gpu_files:
    (tmp_path / 'nvidiactl').touch()
  monkeypatch.setattr(cli, 'PCI_VENDOR_FILES', str(tmp_path / 'vendor'))
  monkeypatch.setattr(cli, 'GPU_DEVICE_FILES', (str(tmp_path / 'nvidiactl'),))
  find_spec = cli.importlib.util.find_spec
  monkeypatch.setattr(cli.importlib.util, 'find_spec', lambda name: (
      libtpu if name == 'libtpu' else find_spec(name)))
  monkeypatch.setattr(cli, '_jax_plugins', lambda: plugins)
  assert cli.runs_on_cpu() == on_cpu


@pytest.mark.parametrize('platforms, on_cpu', [
    ('cpu', True), ('cpu,tpu', True), (' cpu ,cuda', True),
    ('tpu,cpu', False), ('cuda,cpu', False), ('tpu', False)])
def test_the_first_of_jax_platforms_decides_runs_on_cpu(monkeypatch,
                                                        platforms, on_cpu):
  # JAX_PLATFORMS=tpu,cpu runs on the TPU: the CPU is only a fallback there,
  # and its freed memory is not kept.
  monkeypatch.setattr(cli, 'jax', types.SimpleNamespace(
      config=types.SimpleNamespace(jax_platforms=platforms)))
  assert cli.runs_on_cpu() == on_cpu


def test_a_long_cpu_run_loads_the_steps_a_child_process_compiled(
    tiny_config, tmp_path, caplog, monkeypatch):
  # Compiled in the run's own one malloc heap, sparse_small's step trained
  # at ~13,000 tokens/s instead of ~15,000 (train.start_compiling_apart).
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'cache'),
             JAX_LOG_COMPILES='1')
  steps = cli.STEPS_TO_EARN_BACK_FREED_MEMORY
  config = tiny_config(train_steps=steps, eval_every=steps,
                       checkpoint_every=steps, log_every=steps)
  workdir = str(tmp_path / 'run')
  result = _main(workdir, config, f'--config.train_steps={steps}',
                 f'--config.eval_every={steps}',
                 f'--config.checkpoint_every={steps}',
                 f'--config.log_every={steps}', env=env)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'Steps compiled in a child process' in result.stderr
  for program in ('jit_train_step', 'jit_eval_loss', 'jit_digests',
                  'jit_stats'):
    assert f"Persistent compilation cache hit for '{program}'" in result.stderr
  assert [m['step'] for m in _metrics(workdir)] == [steps]
  # Rerun at its end (here, as `main` calls it for a run this long), it
  # neither starts the child nor compiles the steps, nor times the matmul
  # peak or adds an event file.
  events = sorted(p.name for p in (tmp_path / 'run').glob('events.out.*'))
  monkeypatch.setattr(train, 'start_compiling_apart', lambda config:
                      pytest.fail('started the compiling child'))
  with caplog.at_level('INFO'), jax.log_compiles(True):
    train.train_and_evaluate(config, workdir, compile_apart=True)
  assert f'Already at step {steps} of {steps}: nothing to train' in (
      caplog.text)
  assert 'child process' not in caplog.text
  assert 'train_step' not in caplog.text and '_square' not in caplog.text
  assert sorted(p.name for p in (tmp_path / 'run').glob(
      'events.out.*')) == events


def test_a_failed_compile_apart_leaves_the_compile_to_the_run(caplog):
  child = train.multiprocessing.get_context('spawn').Process(
      target=sys.exit, args=(3,))
  child.start()
  train.finish_compiling_apart(child)  # Does not raise.
  assert 'failed (exit code 3); this process compiles them' in caplog.text


_ARMED_CHILD = (
    'import sys, time\n'
    'from sparse_gpt2 import cli\n'
    'cli.die_with_parent(int(sys.argv[1]))\n'
    "print('armed', flush=True)\n"
    'time.sleep(120)\n')
_KILLED_PARENT = (
    'import os, signal, subprocess, sys\n'
    'child = subprocess.Popen([sys.executable, "-c", sys.argv[1],\n'
    '                          str(os.getpid())], stdout=subprocess.PIPE,\n'
    '                         text=True)\n'
    'assert child.stdout.readline() == "armed\\n"\n'
    'print(child.pid, flush=True)\n'
    'os.kill(os.getpid(), signal.SIGKILL)\n')


def _running(pid):
  """Whether `pid` runs: not gone, nor a zombie its new parent has not
  reaped yet."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


@pytest.mark.skipif(platform.system() != 'Linux', reason='Linux only')
def test_the_compiling_child_dies_with_its_run():
  """A run stopped by SIGKILL (or a SIGTERM with no handler) cleans up no
  child: the one compiling its steps went on for minutes beside the
  command that resumed the run. Armed, it dies with its parent, and one
  whose parent is gone already ends at once."""
  assert train.start_compiling_apart.__code__.co_names.count(
      '_compile_as_child') == 1
  parent = subprocess.run([sys.executable, '-c', _KILLED_PARENT,
                           _ARMED_CHILD], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
  assert parent.returncode == -signal.SIGKILL, parent.stderr[-2000:]
  child = int(parent.stdout)
  deadline = time.time() + 10
  while _running(child) and time.time() < deadline:
    time.sleep(0.05)
  assert not _running(child)
  orphan = subprocess.run([sys.executable, '-c', _ARMED_CHILD, '1'],
                          capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
  assert orphan.returncode == 1 and orphan.stdout == ''


def test_the_compiling_child_starts_ignoring_ctrl_c(monkeypatch):
  """A terminal's Ctrl-C reaches the whole process group: the child
  compiling the steps printed its own traceback beside the run's one line.
  It starts with SIGINT ignored, which it keeps through its exec (and dies
  with the run); the run's own handler is back once it has started."""
  started_with = []

  class Process:

    def __init__(self, **unused_kwargs):
      pass

    def start(self):
      started_with.append(signal.getsignal(signal.SIGINT))

  monkeypatch.setattr(train.multiprocessing, 'get_context',
                      lambda method: types.SimpleNamespace(Process=Process))
  run_handler = signal.getsignal(signal.SIGINT)
  train.start_compiling_apart(None)
  assert started_with == [signal.SIG_IGN]
  assert signal.getsignal(signal.SIGINT) is run_handler


def test_the_circuits_clis_do_not_keep_freed_memory():
  # In its one arena a pruning compiled in-process ran ~1.36x slower.
  spy = ('from absl import flags\n'
         'from sparse_gpt2 import cli\n'
         'from sparse_gpt2.circuits import settings\n'
         "cli.keep_freed_memory = lambda: print('kept')\n"
         'settings.define_flags()\n'
         "flags.FLAGS(['circuits', '--steps=3000'])\n"
         'settings.start_jax()\n'
         "print('started')\n")
  out = subprocess.run([sys.executable, '-c', spy], capture_output=True,
                       text=True, check=True, cwd=ROOT).stdout.split()
  assert out == ['started']


@pytest.mark.parametrize('cache', ['', 'chosen'])
def test_main_keeps_compiled_programs_where_the_environment_says(cache,
                                                                 tmp_path):
  # A rerun or a resumed run then loads its train step instead of compiling.
  env = {k: v for k, v in os.environ.items()
         if k != 'JAX_COMPILATION_CACHE_DIR'}
  env['HOME'] = str(tmp_path)
  if cache:
    env['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path / cache)
  assert _main_with_a_spy(1, env)[-1] == str(
      tmp_path / (cache or '.cache/sparse_gpt2/jax'))


def test_flops_per_token_counts_causal_attention_as_maxtext_does():
  """GPT-2 small at 1024 tokens, counted by hand: 6 x its 123,532,032
  matmul weights (12 layers of 12 x 768^2, the 768 x 50257 unembedding),
  plus 6 x 1024 x 768 a layer for the causal half of attention."""
  gpt2_small = types.SimpleNamespace(
      d_model=768, num_heads=12, num_layers=12, vocab_size=50257,
      d_head=None, d_mlp=None)
  assert 12 * 12 * 768**2 + 768 * 50257 == 123_532_032
  assert metrics.flops_per_token(gpt2_small, 1024) == (
      6 * 123_532_032 + 12 * 6 * 1024 * 768)
  # The paper's 16-wide heads: d_attn is heads x d_head, not d_model.
  paper = types.SimpleNamespace(
      d_model=128, num_heads=16, num_layers=4, vocab_size=2048, d_head=16,
      d_mlp=512)
  assert metrics.flops_per_token(paper, 128) == 6 * (
      4 * (4 * 128 * 256 + 2 * 128 * 512) + 128 * 2048) + 6 * 4 * 128 * 256


def test_mfu_divides_by_the_fastest_matmul_timed_so_far(reference_run):
  """A start timed in a busy moment stops counting at the first evaluation
  that reads faster; a slower reading later changes nothing."""
  config, workdir, _ = reference_run
  flops = metrics.flops_per_token(config.model, config.seq_len)
  fastest = {5: 1e9, 10: 4e9, 15: 4e9, 20: 4e9, 25: 4e9}
  for line in _metrics(workdir):
    peak = fastest.get(line['step'], 8e9)
    assert line['mfu'] == pytest.approx(line['tokens_per_s'] * flops / peak,
                                        rel=1e-12), line['step']


def test_mfu_peak_is_the_datasheet_peak_times_the_devices(monkeypatch):
  """So 8 GPUs at full speed read 100%, not 800%."""
  device = types.SimpleNamespace(platform='gpu', device_kind='NVIDIA H200')
  monkeypatch.setattr(jax, 'devices', lambda: [device] * 8)
  monkeypatch.setattr(jax, 'device_count', lambda: 8)
  assert metrics.peak_flops('bfloat16') == 8 * 989e12
  device.platform, device.device_kind = 'tpu', 'TPU v5 lite'
  assert metrics.peak_flops('bfloat16') == 8 * 197e12
  # A variant whose name holds its family's, or a chip's other name: not
  # the family's peak (a v5e read as a v5p put its MFU 2.3x too low).
  for kind, peak in (('TPU v5e', 197e12), ('TPU v6e', 918e12),
                     ('TPU v4 lite', 138e12), ('TPU v5', 459e12),
                     ('NVIDIA H100 80GB HBM3', 989e12),
                     ('NVIDIA H100 PCIe', 756e12), ('NVIDIA H100 NVL', 835e12),
                     ('NVIDIA H200 NVL', 835e12),
                     ('NVIDIA GB200', 2500e12), ('NVIDIA B200', 2250e12),
                     ('NVIDIA A100-SXM4-80GB', 312e12)):
    device.device_kind = kind
    assert metrics.peak_flops('bfloat16') == 8 * peak, kind


def test_an_unlisted_accelerator_is_timed_on_a_matmul_longer_than_a_call(
    monkeypatch):
  """Not on the CPU's 2048^3, which a fast chip computes in less time
  than the call's dispatch and sync take (its MFU would read over twice
  the real one). The CPU keeps its own size."""
  device = types.SimpleNamespace(platform='gpu', device_kind='NVIDIA L40S')
  monkeypatch.setattr(jax, 'devices', lambda: [device] * 4)
  monkeypatch.setattr(jax, 'device_count', lambda: 4)
  sizes = []
  monkeypatch.setattr(
      metrics, 'measure_peak_flops',
      lambda dtype, n=None, repeats=5: sizes.append(n) or 300e12)
  assert metrics.peak_flops('bfloat16') == 4 * 300e12
  device.platform = 'cpu'
  assert metrics.peak_flops('float32') == 300e12  # One device: all cores.
  assert sizes == [8192, None]


@pytest.fixture
def train_clock(monkeypatch):
  """`train`'s clock, moved only by `wait(seconds)`: the steps' own time,
  however busy the machine, counts for nothing, so a run's rates are exact
  (with real sleeps of 0.1 s a batch, one full run in six failed a bound)."""
  clock = types.SimpleNamespace(now=0.0)

  def wait(seconds):
    clock.now += seconds

  clock.wait = wait
  monkeypatch.setattr(train, 'time',
                      types.SimpleNamespace(perf_counter=lambda: clock.now))
  return clock


def test_tokens_per_second_time_training_not_evaluation(
    tiny_config, tmp_path, monkeypatch, caplog, train_clock):
  """An evaluation that takes a second, or a first call of the stats
  function that takes two, leaves the next interval's rate alone: each
  batch comes 0.1 s late. A rate is the interval's own steps over its time,
  never faster than the batches come; the ETA is the steps left at that
  rate."""
  evaluate, global_batch = train.evaluate, train.global_batch

  def slow_evaluate(*args):
    train_clock.wait(1.0)
    return evaluate(*args)

  def slow_batch(*args):
    train_clock.wait(0.1)
    return global_batch(*args)

  stats, first_stats = sparsity.stats, []

  def slow_first_stats(*args):  # As a first call's compile, or more.
    if not first_stats:
      first_stats.append(True)
      train_clock.wait(2.0)
    return stats(*args)

  monkeypatch.setattr(train, 'evaluate', slow_evaluate)
  monkeypatch.setattr(train, 'global_batch', slow_batch)
  monkeypatch.setattr(sparsity, 'stats', slow_first_stats)
  # tiny gives peak_flops: its MFU is against that, never a timed matmul.
  monkeypatch.setattr(metrics, 'measure_peak_flops', lambda *args, **kwargs:
                      pytest.fail('timed a peak that the config gives'))
  config = tiny_config('none', train_steps=15)
  with caplog.at_level('INFO', logger='absl'):  # Whatever absl's flags set.
    train.train_and_evaluate(config, str(tmp_path))
  logged = {m['step']: m for m in _metrics(str(tmp_path))}
  tokens = config.batch_size * config.seq_len
  assert [s for s in sorted(logged) if 'tokens_per_s' in logged[s]] == [
      5, 10, 15]
  # Step 5: steps 2-5 (the first step's run is left out), timed from the
  # first step's end to the log, written once step 6's batch came: 4 steps
  # in 0.5 s; the first stats call's 2 s came before the clock started.
  # Step 10: from that log to step 10's, which evaluates and so is written
  # at once: 5 steps in 0.4 s. Step 15: from the end of step 10's
  # evaluation, not its start: 5 steps in 0.5 s.
  assert {s: m['tokens_per_s'] / tokens for s, m in logged.items()
          if 'tokens_per_s' in m} == pytest.approx({5: 8, 10: 12.5, 15: 10})
  lines = [r.getMessage() for r in caplog.records
           if r.getMessage().startswith('step ')]
  assert lines[-1].startswith('step 15/15 ') and lines[-1].endswith(
      ' | ETA 00:00:00')
  assert lines[0].startswith('step 5/15 ') and lines[0].endswith(
      ' | ETA 00:00:01')  # Ten more steps at 8 a second.
  # Evaluated and saved every 10 steps (eval_every, checkpoint_every), and
  # at the last step, 15: a run's final weights always have a val_loss and
  # a checkpoint.
  assert [s for s, m in sorted(logged.items()) if 'val_loss' in m] == [10, 15]
  assert workdir_lib.checkpoint_steps(str(tmp_path)) == [10, 15]


def test_the_first_log_leaves_out_the_first_steps_warm_up(
    tiny_config, tmp_path, monkeypatch, train_clock):
  """A run's first step is slower than the next however its program was
  compiled or loaded (180 ms where the next took 6, tiny): the first log
  read 6,877 tokens/s where the next read 40,000. It times the steps after
  the first: a first step 2 s late leaves it alone."""
  global_batch, batches = train.global_batch, []

  def slow_first_batch(*args):
    train_clock.wait(2.0 if not batches else 0.1)
    batches.append(True)
    return global_batch(*args)

  monkeypatch.setattr(train, 'global_batch', slow_first_batch)
  config = tiny_config('none', train_steps=10)
  train.train_and_evaluate(config, str(tmp_path))
  logged = {m['step']: m for m in _metrics(str(tmp_path))}
  tokens = config.batch_size * config.seq_len
  assert logged[5]['tokens_per_s'] == pytest.approx(4 * tokens / 0.5)


def test_evaluation_is_the_mean_over_eval_batches_validation_batches(
    tiny_config):
  """val_loss: the mean loss of batches 0 .. eval_batches - 1 of the
  validation tokens, drawn with seed + 1 (not the training batches')."""
  config = tiny_config(eval_batches=3, seed=4)
  val_tokens = np.arange(2000) % config.data.vocab_size
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  seen = []

  def eval_step(params, batch):
    assert params == 'params'
    seen.append(np.asarray(batch))
    return np.float32(10.0 * len(seen))  # 10, 20, 30.

  state = types.SimpleNamespace(params='params')
  assert train.evaluate(eval_step, state, val_tokens, config,
                        sharding) == pytest.approx(20.0)
  assert len(seen) == 3
  for i, batch in enumerate(seen):
    np.testing.assert_array_equal(batch, data.get_batch(
        val_tokens, i, seed=5, batch_size=config.batch_size,
        seq_len=config.seq_len))


def test_peak_memory_is_the_largest_device_peak_and_absent_on_cpu(
    monkeypatch):
  """The CPU reports no memory statistics, so its runs log none; on
  accelerators the fullest device decides whether a config fits."""
  assert metrics.peak_memory_bytes() is None
  devices = [types.SimpleNamespace(memory_stats=lambda p=p: {
      'bytes_in_use': 1, 'peak_bytes_in_use': p}) for p in (3 << 30, 5 << 30)]
  monkeypatch.setattr(jax, 'local_devices', lambda: devices)
  assert metrics.peak_memory_bytes() == 5 << 30


def test_convert_exports_a_gpt2_run_and_refuses_the_paper_architecture(
    reference_run, tiny_config, tmp_path, capsys):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from sparse_gpt2 import convert  # pylint: disable=g-import-not-at-top
  _, paper_run, _ = reference_run
  with pytest.raises(ValueError, match='rmsnorm'):
    convert.run_to_hf(paper_run, str(tmp_path / 'paper_hf'))
  config = tiny_config(train_steps=6, checkpoint_every=3)
  m = config.model
  m.norm, m.tie_embeddings, m.pos_embedding = 'layernorm', True, True
  m.bigram_table = m.attention_sink = False
  run = str(tmp_path / 'gpt2_run')
  state = train.train_and_evaluate(config, run)
  convert.run_to_hf(run, str(tmp_path / 'hf'))
  assert f'{run} step 6 -> ' in capsys.readouterr().out
  # A second export into it is refused unless asked to replace it.
  exported = _listing(str(tmp_path / 'hf'))
  with pytest.raises(ValueError, match='is not empty; replace it with'):
    convert.run_to_hf(run, str(tmp_path / 'hf'))
  assert _listing(str(tmp_path / 'hf')) == exported
  hf_model = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / 'hf'))
  tokens = np.random.default_rng(0).integers(0, m.vocab_size, (2, 16))
  with torch.no_grad():
    theirs = hf_model(torch.from_numpy(tokens)).logits.numpy()
  ours = train.make_model(config).apply({'params': state.params}, tokens)
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)
  # The run's tokenizer goes with it: the same ids, and its end of text as
  # the ids transformers stops and pads at (not GPT-2's 50256).
  corpus = data.load(config.data, config.seq_len)
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'hf'))
  text = 'def f(x):\n    return  x.y\n'
  ids = corpus.tokenizer.encode(text).ids
  assert theirs(text)['input_ids'] == ids
  quoted = 'x = "<|endoftext|>"\n'  # Bytes in the run, not its end of text.
  assert theirs(quoted)['input_ids'] == corpus.tokenizer.encode(quoted).ids
  assert corpus.eot_id not in theirs(quoted)['input_ids']
  # Dropout as trained, not transformers' default 0.1 (none on attention
  # probabilities, which the model never drops out).
  assert (hf_model.config.resid_pdrop, hf_model.config.embd_pdrop,
          hf_model.config.attn_pdrop) == (m.dropout, m.dropout, 0.0)
  assert theirs.decode(ids) == text
  assert theirs.eos_token_id == corpus.eot_id
  assert hf_model.config.eos_token_id == hf_model.config.bos_token_id == (
      corpus.eot_id)
  generated = hf_model.generate(torch.tensor([ids[:4]]), max_new_tokens=3,
                                do_sample=False)
  assert generated.shape[1] <= 7 and int(generated.max()) < m.vocab_size
  # A damaged newest checkpoint: the one before it goes out, and the run is
  # left as it was (training, not an export, sets a damaged one aside).
  damaged = str(tmp_path / 'damaged')
  shutil.copytree(run, damaged)
  with open(os.path.join(damaged, 'checkpoints', '6', 'state', '_METADATA'),
            'r+b') as f:
    f.truncate(10)
  before = _listing(damaged)
  convert.run_to_hf(damaged, str(tmp_path / 'hf_3'))
  assert f'{damaged} step 3 -> ' in capsys.readouterr().out
  assert _listing(damaged) == before
  # A BPE that is not the run's (its corpus changed, then trained again on
  # another machine) is refused, not shipped with the weights.
  other = tmp_path / 'other_bpe'
  shutil.copytree(run, other)
  record = json.loads((other / 'corpus.json').read_text())
  (other / 'corpus.json').write_text(json.dumps({**record,
                                                 'vocab_sha256': '0' * 64}))
  with pytest.raises(ValueError, match=r'differs from the one .*other_bpe '
                     r'trained on \(vocab_sha256\): the export would hold '
                     'another tokenizer'):
    convert.run_to_hf(str(other), str(tmp_path / 'hf_other'))
  assert not (tmp_path / 'hf_other').exists()
  # Run from another folder, the default config is still the checkout's.
  result = subprocess.run(
      [sys.executable, '-m', 'sparse_gpt2.convert', '--from_hf=nowhere',
       '--to_run=r'], cwd=tmp_path, capture_output=True, text=True,
      timeout=120, env={**os.environ, 'PYTHONPATH': ROOT})
  assert result.returncode == 1 and _errors(result) == [
      'error: nowhere: no config.json; expected a Hugging Face GPT-2 '
      'directory with config.json and model.safetensors'], result.stderr


def test_convert_makes_a_run_from_a_hugging_face_gpt2(tiny_config, tmp_path):
  from sparse_gpt2 import convert  # pylint: disable=g-import-not-at-top
  from sparse_gpt2 import hf  # pylint: disable=g-import-not-at-top
  config = tiny_config('none')
  m = config.model
  m.norm, m.tie_embeddings, m.pos_embedding = 'layernorm', True, True
  m.bigram_table = m.attention_sink = False
  model = train.make_model(config)
  params = jax.tree.map(
      lambda x: np.asarray(x) + 0.01,
      train.init_state(config, model, optim.make(config, 1),
                       jax.random.key(5), None).params)
  hf_dir = str(tmp_path / 'hf')
  hf.save(params, dict(config.model), hf_dir)
  run = str(tmp_path / 'run')
  # The head size too comes from the Hugging Face config (n_embd / n_head),
  # as from a config file of GPT-2 small's 64 (`convert`'s default).
  other = config.copy_and_resolve_references()
  other.model.d_head = 64
  convert.hf_to_run(hf_dir, run, other)
  restored_config, _, state = train.load_run(run)
  assert restored_config.model.d_head == 16
  assert restored_config.init_from_hf == hf_dir
  assert int(state.step) == 0
  _assert_same_state(state.params, params)
  # The paper's architecture cannot hold GPT-2's weights: refused up front.
  paper = tmp_path / 'paper_run'
  with pytest.raises(ValueError, match=r'does not match the Hugging Face '
                     r'GPT-2 in .*hf: bigram_table=True, attention sinks'):
    convert.hf_to_run(hf_dir, str(paper), tiny_config('none'))
  assert not paper.exists()
  # The run resumes from its checkpoint without the folder it began from.
  shutil.rmtree(hf_dir)
  with restored_config.unlocked():
    restored_config.train_steps = 2
  assert int(train.train_and_evaluate(restored_config, run).step) == 2


def test_a_run_from_hugging_face_keeps_its_param_dtype(tiny_config,
                                                       tmp_path):
  """Hugging Face's float32 weights start a bfloat16 run as bfloat16: kept
  float32, they were saved so, read back as another digest on resume, and
  the checkpoint was set aside as damaged."""
  from sparse_gpt2 import convert  # pylint: disable=g-import-not-at-top
  from sparse_gpt2 import hf  # pylint: disable=g-import-not-at-top
  config = tiny_config('none')
  m = config.model
  m.norm, m.tie_embeddings, m.pos_embedding = 'layernorm', True, True
  m.bigram_table = m.attention_sink = False
  params = train.init_state(config, train.make_model(config),
                            optim.make(config, 1), jax.random.key(5),
                            None).params
  hf_dir = str(tmp_path / 'hf')
  hf.save(params, dict(config.model), hf_dir)
  config.model.param_dtype = 'bfloat16'
  run = str(tmp_path / 'run')
  convert.hf_to_run(hf_dir, run, config)
  restored_config, _, state = train.load_run(run)
  assert {str(x.dtype) for x in jax.tree.leaves(state.params)} == {
      'bfloat16'}
  _assert_same_state(state.params, jax.tree.map(
      lambda x: np.asarray(x, jax.numpy.bfloat16), params))
  with restored_config.unlocked():
    restored_config.train_steps = 2
  assert int(train.train_and_evaluate(restored_config, run).step) == 2
  assert int(train.load_run(run)[2].step) == 2
  assert not (tmp_path / 'run' / 'corrupt_checkpoints').exists()


def test_convert_refuses_both_directions_at_once(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'sparse_gpt2.convert', f'--from_run={tmp_path}/a',
       f'--to_hf={tmp_path}/b', f'--from_hf={tmp_path}/c',
       f'--to_run={tmp_path}/d'], cwd=ROOT, capture_output=True, text=True,
      timeout=120)
  assert result.returncode == 1, result.stderr[-2000:]
  assert [l for l in result.stderr.splitlines() if l.strip()] == [
      'error: give either --from_run and --to_hf, or --from_hf and --to_run']
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('args,message', [
    (['--from_run=a', '--to_hf=b', '--config=configs/tiny.py'],
     '--config is for --from_hf/--to_run: an export takes its model and '
     'config from the run'),
    (['--from_run=a', '--to_hf=b', '--config.model.vocab_size=50257'],
     '--config.model.vocab_size is for --from_hf/--to_run: an export takes '
     'its model and config from the run'),
    (['--from_hf=c', '--to_run=d', '--overwrite'],
     '--overwrite is for --from_run/--to_hf: it replaces an earlier export, '
     'never a run'),
])
def test_convert_refuses_the_other_directions_flags(args, message, tmp_path):
  # Each was silently ignored: a --config for the export, an --overwrite
  # for the run made from Hugging Face.
  result = subprocess.run(
      [sys.executable, '-m', 'sparse_gpt2.convert',
       *[re.sub(r'^(--(from|to)_\w+=)', rf'\1{tmp_path}/', a) for a in args]],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stderr[-2000:]
  assert [l for l in result.stderr.splitlines() if l.strip()] == [
      f'error: {message}']
  assert os.listdir(tmp_path) == []


def test_convert_says_a_config_that_does_not_load_as_the_config_flag(
    monkeypatch):
  # The default config is read only when --to_run needs it, and may be
  # missing (an install without configs/): named as --config, in one line.
  from sparse_gpt2 import convert  # pylint: disable=g-import-not-at-top

  class Missing:
    """As ml_collections 1.1 gives a default config file that is not
    there: a value that raises once it is used."""

    def __getattr__(self, name):
      raise OSError(
          'Configuration is not available because of an earlier failure to '
          'load: Failed loading config file config_config\n  Attempted '
          '[Relative path]:\n    /gone/configs/dense_gpt2_124m.py\n      '
          "[Errno 2] No such file or directory: "
          "'/gone/configs/dense_gpt2_124m.py'")

  for holder, value in (('_FROM_RUN', None), ('_TO_HF', None),
                        ('_FROM_HF', 'hf'), ('_TO_RUN', 'run')):
    monkeypatch.setattr(convert, holder, types.SimpleNamespace(value=value))
  monkeypatch.setattr(convert, '_CONFIG', types.SimpleNamespace(
      value=Missing()))
  monkeypatch.setattr(convert, 'hf_to_run', lambda *args: pytest.fail(
      'converted without a config'))
  with pytest.raises(ValueError) as raised:
    convert.main()
  assert str(raised.value) == (
      "--config: [Errno 2] No such file or directory: "
      "'/gone/configs/dense_gpt2_124m.py'")


def test_a_run_trained_with_cudnn_attention_loads_off_gpu(tiny_config,
                                                          tmp_path):
  """A GPU run with model.attention='cudnn' (bfloat16, no sinks) is read
  on a CPU for circuits and export: its model computes XLA's attention,
  the same function, where cuDNN's stopped every forward with 'cuDNN is not
  detected'. Training so on a CPU stays refused."""
  config = tiny_config('topk', train_steps=0, **{
      'model.dtype': 'bfloat16', 'model.attention_sink': False})
  run = tmp_path / 'run'
  train.train_and_evaluate(config, str(run))
  saved = json.loads((run / 'config.json').read_text())
  saved['model']['attention'] = 'cudnn'  # As the GPU run saved it.
  (run / 'config.json').write_text(json.dumps(saved))
  loaded, model, state = train.load_run(str(run))
  assert loaded.model.attention == 'cudnn' and model.attention == 'xla'
  tokens = np.arange(2 * config.seq_len).reshape(2, -1) % 50
  logits = model.apply({'params': state.params}, tokens)
  np.testing.assert_array_equal(logits, train.make_model(config).apply(
      {'params': state.params}, tokens))
  with pytest.raises(ValueError, match="'cudnn' needs a GPU"):
    train.validate(loaded)


def test_microbatch_gradients_are_summed_in_float32(tiny_config):
  """A bfloat16 model's gradients are summed over microbatches in float32
  and returned in bfloat16: the mean of 8 equal slices' gradients is
  exactly one slice's (summed in bfloat16, 8% of the entries differed)."""
  config = tiny_config('none', **{'model.dtype': 'bfloat16',
                                  'model.param_dtype': 'bfloat16'})
  model = train.make_model(config)
  params = train.init_state(config, model, optim.make(config, 1),
                            jax.random.key(0), None).params
  row = np.random.default_rng(0).integers(
      0, config.data.vocab_size, (1, config.seq_len + 1))
  rng = jax.random.key(0)
  _, one = jax.jit(lambda p, t: train._loss_and_grads(model, p, t, rng, 1))(
      params, row)
  _, mean = jax.jit(lambda p, t: train._loss_and_grads(model, p, t, rng, 8))(
      params, np.tile(row, (8, 1)))
  assert jax.tree.map(lambda g: g.dtype, mean) == jax.tree.map(
      lambda p: p.dtype, params)
  jax.tree.map(np.testing.assert_array_equal, mean, one)


def test_dropout_draws_new_masks_at_each_step_and_in_each_slice(tiny_config):
  """With model.dropout, the same weights and batch lose differently one
  step later, and equal slices of a batch draw masks of their own: the mean
  over 2 of them is not the mean over 4 (one key for every step, or for
  every slice, would drop the same units each time)."""
  config = tiny_config('none', **{'model.dropout': 0.5})
  model = train.make_model(config)
  tx = optim.make(config, 2)
  state = train.init_state(config, model, tx, jax.random.key(0), None)
  row = np.random.default_rng(0).integers(
      0, config.data.vocab_size, (1, config.seq_len + 1))
  step = jax.jit(lambda s, t: train.train_step(s, t, model=model, tx=tx,
                                               config=config)[1]['loss'])
  assert step(state, row) != step(state.replace(step=state.step + 1), row)
  rng = jax.random.key(0)
  sliced = {m: jax.jit(lambda p, t, m=m: train._loss_and_grads(
      model, p, t, rng, m)[0])(state.params, np.tile(row, (m, 1)))
            for m in (2, 4)}
  assert sliced[2] != sliced[4]
