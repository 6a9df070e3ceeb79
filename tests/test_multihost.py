"""Two jax.distributed processes on this machine (CPU backend, loopback
coordinator, two fake devices each) train, checkpoint and resume like one
process with the same four-device mesh; a SIGTERM (a preemption notice)
makes a run save and stop.

The mesh is data 1 x model 4: the model axis spans both processes, so each
needs every row of every batch, which only a batch built from the batch
sharding (not from process_index) gets right.
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sparse_gpt2 import multihost
from sparse_gpt2 import train
from sparse_gpt2 import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Trains to each of `stops` in turn (resuming from the last checkpoint), in
# each of `num_processes` processes; exit code 3 if preempted.
_WORKER = '''
import json, sys
import jax
port, num_processes, process_id, devices, workdir, overrides, stops = (
    sys.argv[1:])
jax.config.update('jax_num_cpu_devices', int(devices))
jax.distributed.initialize(f'127.0.0.1:{port}', int(num_processes),
                           int(process_id))
from configs import tiny
from sparse_gpt2 import train
from sparse_gpt2 import workdir as workdir_lib
# Each process a host of its own name, as on a slice: else the event files
# of two writers (a process that should not write) could share a name.
from sparse_gpt2 import metrics
metrics._import_tensorboardx()
import types, tensorboardX.event_file_writer as event_file_writer
event_file_writer.socket = types.SimpleNamespace(
    gethostname=lambda: f'host{process_id}')
for steps in json.loads(stops):
  config = tiny.get_config('topk')
  for key, value in json.loads(overrides).items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  config.train_steps = steps
  try:
    state = train.train_and_evaluate(config, workdir)
  except train.Preempted as e:
    print(e, flush=True)
    sys.exit(3)
  assert int(state.step) == steps, int(state.step)
'''


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(num_processes, workdir, overrides, stops, env=None):
  port = _free_port()
  devices = 4 // num_processes
  return [subprocess.Popen(
      [sys.executable, '-c', _WORKER, str(port), str(num_processes), str(p),
       str(devices), workdir, json.dumps(overrides), json.dumps(stops)],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for p in range(num_processes)]


def _run(num_processes, workdir, overrides, stops, env=None):
  for proc in _start(num_processes, workdir, overrides, stops, env):
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]


def _overrides(config):
  return {
      'data.source': config.data.source,
      'data.data_dir': config.data.data_dir,
      'schedule_steps': 8, 'checkpoint_every': 4, 'log_every': 2,
      'eval_every': 4, 'model.num_layers': 1, 'model.num_heads': 4,
      'mesh.data': 1, 'mesh.model': 4}


def test_two_processes_train_and_resume_like_one(tiny_config, tmp_path):
  overrides = _overrides(tiny_config())
  # XLA:CPU's fusion emitters, which conftest turns off: under its loop
  # emitters the two programs round apart enough to flip top-k choices.
  env = {**os.environ, 'XLA_FLAGS': os.environ.get('XLA_FLAGS', '') +
         ' --xla_cpu_use_fusion_emitters=true'}
  runs = {}
  for n, stops in ((2, [4, 8]), (1, [8])):  # Resumed at 4 / uninterrupted.
    workdir = str(tmp_path / f'processes{n}')
    _run(n, workdir, overrides, stops, env)
    runs[n] = train.load_run(workdir)[2]
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      assert [json.loads(l)['step'] for l in f] == [2, 4, 6, 8]
  assert sorted(os.listdir(tmp_path / 'processes2' / 'checkpoints'),
                key=int) == ['4', '8']
  # Only process 0 writes TensorBoard events: one file a run it started.
  events = sorted(os.listdir(tmp_path / 'processes2'))
  events = [n for n in events if n.startswith('events.out.tfevents')]
  assert events and all(n.endswith('.host0') for n in events), events
  for a, b in zip(jax.tree.leaves(runs[2]), jax.tree.leaves(runs[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-6)


def test_sigterm_saves_a_checkpoint_and_stops(tiny_config, tmp_path):
  """jax.distributed turns SIGTERM into orbax's preemption sync point."""
  workdir = tmp_path / 'run'
  # Dense: what a preemption does is the same in every sparsity mode, and a
  # dense step, without the top-k, compiles in a fraction of the time.
  overrides = {**_overrides(tiny_config()), 'schedule_steps': 1000,
               'checkpoint_every': 1000, 'log_every': 1,
               'sparsity.mode': 'none', 'sparsity.density': 1.0}
  proc, = _start(1, str(workdir), overrides, [1000])
  deadline = time.time() + 240
  while not (workdir / 'metrics.jsonl').exists() and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 3, err[-3000:]
  saved = os.listdir(workdir / 'checkpoints')
  assert len(saved) == 1 and 0 < int(saved[0]) < 1000
  assert f'preempted at step {saved[0]}' in out


@pytest.mark.parametrize('index, failed_at, message', [
    (0, None, None),                      # Both built it.
    (0, 'another process', 'another process failed to prepare the data'),
    (1, 'process 0', 'process 0 failed to prepare the data'),
    (1, 'here', 'a broken cache'),        # Its own error, and the others told.
])
def test_process_0_first_stops_every_process_on_any_failure(
    monkeypatch, index, failed_at, message):
  """One process of two, the other's part played by `any_process`: a
  failure on any process raises on all, so none waits at a barrier."""
  monkeypatch.setattr(jax, 'process_index', lambda: index)
  turns = iter(('process 0', 'another process'))
  told = []

  def any_process(flag):  # This process's flag, or the other's failure.
    told.append(flag)
    return flag or next(turns) == failed_at
  monkeypatch.setattr(multihost, 'any_process', any_process)

  def fn():
    if failed_at == 'here':
      raise ValueError('a broken cache')
    return 'corpus'
  if message is None:
    assert multihost.process_0_first(fn) == 'corpus'
  else:
    with pytest.raises(ValueError, match=message):
      multihost.process_0_first(fn)
  assert told[-1] == (failed_at == 'here')  # Told the others, then raised.


@pytest.mark.parametrize('index', [0, 1])
def test_process_0_first_runs_fn_on_process_0_before_the_others(
    monkeypatch, index):
  """fn runs in the first turn on process 0, in the second on the others
  (a turn ends at the `any_process` all of them call)."""
  monkeypatch.setattr(jax, 'process_index', lambda: index)
  told = []
  monkeypatch.setattr(multihost, 'any_process',
                      lambda flag: told.append(flag) or flag)
  turns_before = []

  def fn():
    turns_before.append(len(told))
    return 'corpus'
  assert multihost.process_0_first(fn) == 'corpus'
  assert turns_before == [index] and told == [False, False]


def test_barrier_and_any_process_with_two_processes(monkeypatch):
  """Two processes, the other's part played by `process_allgather`: a
  barrier syncs, and one process's true flag is every process's."""
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  synced = []
  monkeypatch.setattr(multihost.multihost_utils, 'sync_global_devices',
                      synced.append)
  multihost.barrier('corpus built')
  assert synced == ['corpus built']
  for theirs, want in ((0, False), (1, True)):
    monkeypatch.setattr(
        multihost.multihost_utils, 'process_allgather',
        lambda ours, theirs=theirs: np.array([ours, theirs], np.int32))
    assert multihost.any_process(False) is want
    assert multihost.any_process(True) is True


def test_same_on_all_compares_every_process(monkeypatch):
  """Two processes' digests, the other's played by `process_allgather`:
  hosts that built different corpora on disks of their own are told."""
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  for other, same in (('corpus a', True), ('corpus b', False)):
    theirs = np.frombuffer(hashlib.sha256(other.encode()).digest()[:8],
                           np.uint32)
    monkeypatch.setattr(multihost.multihost_utils, 'process_allgather',
                        lambda ours, theirs=theirs: np.stack([ours, theirs]))
    assert multihost.same_on_all('corpus a') == same


def test_a_run_directory_of_each_host_its_own_is_refused(monkeypatch,
                                                         tmp_path,
                                                         tiny_config):
  """Process 1 of two, process 0's part played by `same_on_all`: where the
  config.json process 0 wrote is not in process 1's folder (a local path
  on a slice of several hosts), the run is refused before any step."""
  config = tiny_config()
  written = config.to_json(indent=2)
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  monkeypatch.setattr(multihost, 'barrier', lambda name: None)
  monkeypatch.setattr(multihost, 'same_on_all', lambda text: text == written)
  shared = tmp_path / 'shared'
  shared.mkdir()
  (shared / 'config.json').write_text(written)
  workdir_lib.create(config, str(shared), {})
  with pytest.raises(ValueError, match=r'^the processes do not share the '
                     r'run directory .*own.* e\.g\. --workdir=gs://'):
    workdir_lib.create(config, str(tmp_path / 'own'), {})
  assert not (tmp_path / 'own').exists()  # Only process 0 writes there.
