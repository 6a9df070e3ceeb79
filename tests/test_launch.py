"""The launch scripts' --dry_run output: every command they would run, with
overrides that survive both the local and the remote shell."""

import os
import re
import shlex
import signal
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATTERN = '--config.sparsity.pattern=^(?!.*(norm|bigram|sink))'


def _dry_run(script, *args):
  result = subprocess.run(['bash', os.path.join(ROOT, 'launch', script),
                           '--dry_run', *args], capture_output=True,
                          text=True, timeout=60, check=True)
  return result.stdout.splitlines()


def _refused(script, *args):
  """The one stderr line of a --dry_run that refuses `args`, printing no
  command."""
  result = subprocess.run(['bash', os.path.join(ROOT, 'launch', script),
                           '--dry_run', *args], capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 2 and result.stdout == '', result
  [line] = result.stderr.splitlines()
  return line


def _remote(line):
  """The command a `gcloud ... ssh --command=...` line runs on the hosts."""
  argv = shlex.split(line)
  return next(a for a in argv if a.startswith('--command='))[len('--command='):]


def test_tpu_create_queues_spot_or_on_demand_capacity():
  spot = _dry_run('tpu_vm.sh', 'create', 'tpu1', 'us-east5-a',
                  'v5litepod-16', '--spot')
  assert shlex.split(spot[0]) == [
      'gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'tpu1',
      '--node-id=tpu1', '--zone=us-east5-a',
      '--accelerator-type=v5litepod-16',
      '--runtime-version=v2-alpha-tpuv5-lite', '--spot']
  assert 'queued-resources describe tpu1' in spot[1]
  on_demand = _dry_run('tpu_vm.sh', 'create', 'tpu1', 'us-east5-a',
                       'v4-32')
  assert '--spot' not in on_demand[0]
  assert '--runtime-version=tpu-ubuntu2204-base' in on_demand[0]


_FAKE_GCLOUD = """#!/bin/bash
echo "$*" >> "$(dirname "$0")/calls"
case "$*" in
  *"tpu-vm describe"*) [[ -n $VM_STATE ]] && echo "$VM_STATE" || exit 1 ;;
  *"queued-resources describe"*)  # Once created, or made before if QR_EXISTS.
    [[ -n $QR_EXISTS ]] || grep -qs "queued-resources create" \
      "$(dirname "$0")/calls" || exit 1
    echo "${QR_STATE:-ACTIVE}" ;;
esac
"""


def test_tpu_create_reuses_a_ready_vm_and_refuses_a_preempted_one(tmp_path):
  """create against a stand-in `gcloud`: an existing VM is reused only if
  READY; a PREEMPTED spot VM (which `describe` still finds) is refused
  with what to do, and no capacity is queued under its name."""
  (tmp_path / 'gcloud').write_text(_FAKE_GCLOUD)
  (tmp_path / 'gcloud').chmod(0o755)

  def create(state):
    (tmp_path / 'calls').unlink(missing_ok=True)
    result = subprocess.run(
        ['bash', os.path.join(ROOT, 'launch', 'tpu_vm.sh'), 'create', 'tpu1',
         'z', 'v5litepod-16', '--spot'], capture_output=True, text=True,
        timeout=60, env={**os.environ, 'VM_STATE': state,
                         'PATH': f"{tmp_path}:{os.environ['PATH']}"})
    return result, (tmp_path / 'calls').read_text()

  result, calls = create('READY')
  assert result.returncode == 0 and result.stdout == 'reusing TPU VM tpu1\n'
  assert 'queued-resources create' not in calls
  assert "--format=value(state,acceleratorType)" in calls
  result, calls = create('READY\tv5litepod-16')  # The type asked for.
  assert result.returncode == 0 and result.stdout == 'reusing TPU VM tpu1\n'
  result, calls = create('READY\tv4-8')  # Another: not reused unsaid.
  assert result.returncode == 1 and 'queued-resources create' not in calls
  assert result.stderr == (
      'error: TPU VM tpu1 exists as a v4-8, not the v5litepod-16 asked for: '
      f'delete it ({ROOT}/launch/tpu_vm.sh delete tpu1 z) or name another '
      'VM\n')
  result, calls = create('PREEMPTED')
  assert result.returncode == 1 and 'queued-resources create' not in calls
  assert result.stderr == (
      'error: TPU VM tpu1 exists but is PREEMPTED, not READY (a PREEMPTED '
      f'spot VM stays so): delete it ({ROOT}/launch/tpu_vm.sh delete tpu1 z) '
      'and create it again\n')
  result, calls = create('')  # No such VM: queued, then waited for.
  assert result.returncode == 0, result.stderr
  assert 'queued-resources create tpu1' in calls and '--spot' in calls


def test_tpu_create_picks_each_types_runtime_unless_runtime_is_set():
  for type_, runtime in (('v4-8', 'tpu-ubuntu2204-base'),
                         ('v5litepod-8', 'v2-alpha-tpuv5-lite'),
                         ('v5p-8', 'v2-alpha-tpuv5'),
                         ('v6e-8', 'v2-alpha-tpuv6e')):
    create = shlex.split(_dry_run('tpu_vm.sh', 'create', 'n', 'z', type_)[0])
    assert [a for a in create if a.startswith('--runtime-version=')] == [
        f'--runtime-version={runtime}'], (type_, create)
  # An unknown type: refused, unless RUNTIME names the software version.
  assert _refused('tpu_vm.sh', 'create', 'n', 'z', 'v9-8') == (
      'error: unknown TPU type v9-8; set RUNTIME')
  result = subprocess.run(
      ['bash', os.path.join(ROOT, 'launch', 'tpu_vm.sh'), '--dry_run',
       'create', 'n', 'z', 'v9-8'], capture_output=True, text=True,
      timeout=60, env={**os.environ, 'RUNTIME': 'x'})
  assert result.returncode == 0 and not result.stderr, result
  create = shlex.split(result.stdout.splitlines()[0])
  assert '--accelerator-type=v9-8' in create
  assert [a for a in create if a.startswith('--runtime-version=')] == [
      '--runtime-version=x']
  # RUNTIME overrides a known type's default too.
  create = subprocess.run(
      ['bash', os.path.join(ROOT, 'launch', 'tpu_vm.sh'), '--dry_run',
       'create', 'n', 'z', 'v5p-8'], capture_output=True, text=True,
      timeout=60, check=True, env={**os.environ, 'RUNTIME': 'x'}).stdout
  assert '--runtime-version=x ' in create.splitlines()[0]


def test_tpu_project_goes_to_every_gcloud_command():
  env = {**os.environ, 'PROJECT': 'p'}
  for args in (['create', 'n', 'z', 'v5p-8'], ['logs', 'n', 'z'],
               ['stop', 'n', 'z'], ['delete', 'n', 'z']):
    lines = subprocess.run(
        ['bash', os.path.join(ROOT, 'launch', 'tpu_vm.sh'), '--dry_run',
         *args], capture_output=True, text=True, timeout=60, check=True,
        env=env).stdout.splitlines()
    assert lines, args
    for line in lines:
      assert shlex.split(line)[:4] == [
          'gcloud', 'compute', 'tpus', '--project=p'], (args, line)
  # Without PROJECT, gcloud's own default project.
  assert '--project' not in _dry_run('tpu_vm.sh', 'delete', 'n', 'z')[0]


def _fake_gcloud(tmp_path):
  (tmp_path / 'gcloud').write_text(_FAKE_GCLOUD)
  (tmp_path / 'gcloud').chmod(0o755)
  return {**os.environ, 'PATH': f"{tmp_path}:{os.environ['PATH']}"}


def _run_bounded(argv, env, timeout=20):
  """Runs `argv` in a session of its own, killed whole (its `sleep`s too)
  if it has not finished after `timeout` seconds."""
  proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env, start_new_session=True)
  try:
    stdout, stderr = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    raise AssertionError(f'{argv} still running after {timeout} s')
  return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def test_tpu_create_gives_up_on_a_failed_or_suspended_request(tmp_path):
  env = _fake_gcloud(tmp_path)
  for state in ('FAILED', 'SUSPENDED'):
    result = _run_bounded(
        ['bash', os.path.join(ROOT, 'launch', 'tpu_vm.sh'), 'create', 'tpu1',
         'z', 'v5p-8'], {**env, 'QR_STATE': state, 'VM_STATE': ''})
    assert result.returncode == 1, (state, result)
    assert result.stderr == (
        f'error: queued resource tpu1 is {state}: delete it '
        f'({ROOT}/launch/tpu_vm.sh delete tpu1 z) and create it again\n')


def test_tpu_dry_run_create_calls_no_gcloud(tmp_path):
  """--dry_run only prints: not even the read-only `describe` of an
  existing VM runs (a READY one would end the dry run early)."""
  env = _fake_gcloud(tmp_path)
  for vm_state in ('', 'READY'):
    result = subprocess.run(
        ['bash', os.path.join(ROOT, 'launch', 'tpu_vm.sh'), '--dry_run',
         'create', 'tpu1', 'z', 'v5p-8'], capture_output=True, text=True,
        timeout=60, env={**env, 'VM_STATE': vm_state})
    assert result.returncode == 0, result
    assert not (tmp_path / 'calls').exists(), (tmp_path / 'calls').read_text()
    create, describe = result.stdout.splitlines()
    assert 'queued-resources create tpu1' in create
    assert 'queued-resources describe tpu1' in describe


def test_tpu_start_ships_fresh_code_and_starts_detached_on_all_workers():
  lines = _dry_run('tpu_vm.sh', 'start', 'tpu1', 'us-east5-a',
                   'configs/sparse_gpt2_124m.py', '--workdir=gs://b/run',
                   '--', PATTERN, '--config.seed=1')
  check, pack, copy, install, start = lines
  assert '--worker=all' in check and 'sparse_gpt2.pid' in _remote(check)
  # What git sees: ignored paths such as runs/ never travel.
  assert 'ls-files -z --cached --others --exclude-standard' in pack
  assert 'tpu-vm scp' in copy and '--worker=all' in copy
  # The old code goes, so a relaunch runs the new code and nothing nested;
  # runs/ stays, so the default workdir resumes.
  remote = shlex.split(_remote(install))
  assert remote[:13] == [
      'mkdir', '-p', '~/sparse_gpt2', '&&', 'find', '~/sparse_gpt2',
      '-mindepth', '1', '-maxdepth', '1', '!', '-name', 'runs']
  assert remote.index('tar') < remote.index('pip')
  assert "jax[tpu]==0.10.2" in remote and 'gcsfs' in remote
  # Into a Python 3.11 of uv's: the pins need it, the TPU images ship 3.10.
  venv = remote.index('venv')
  assert remote[venv + 1:venv + 6] == [
      '-q', '--allow-existing', '--python', '3.11', '~/sparse_gpt2_venv']
  assert '~/sparse_gpt2_venv/bin/python' in remote[remote.index('pip', venv):]
  assert '--worker=all' in start
  remote = shlex.split(_remote(start))
  assert 'SPARSE_GPT2_DISTRIBUTED=1' in remote and 'nohup' in remote
  main = remote.index('sparse_gpt2.main')
  assert remote[main - 2] == '~/sparse_gpt2_venv/bin/python' 
  assert remote[main + 1:main + 5] == [
      '--config=configs/sparse_gpt2_124m.py', '--workdir=gs://b/run',
      PATTERN, '--config.seed=1']
  assert remote[remote.index('>') + 1] == '~/sparse_gpt2.log'


def test_tpu_start_keeps_runs_and_refuses_what_it_would_lose(tmp_path):
  start = _dry_run('tpu_vm.sh', 'start', 'tpu1', 'z',
                   'configs/sparse_small.py')[-1]
  assert '--workdir=runs/sparse_small' in shlex.split(_remote(start))
  # A run's files and the code copy are one sandbox: the VM's home.
  home = tmp_path / 'home'
  (home / 'sparse_gpt2' / 'runs' / 'r' / 'checkpoints').mkdir(parents=True)
  (home / 'sparse_gpt2' / 'old_module.py').write_text('')
  install = _dry_run('tpu_vm.sh', 'start', 'tpu1', 'z',
                     'configs/sparse_small.py')[3]
  clean = _remote(install).split(' && tar')[0]
  subprocess.run(['bash', '-c', clean], env={**os.environ, 'HOME': str(home)},
                 check=True)
  assert os.listdir(home / 'sparse_gpt2') == ['runs']
  assert os.listdir(home / 'sparse_gpt2' / 'runs' / 'r') == ['checkpoints']
  assert _refused('tpu_vm.sh', 'start', 'tpu1', 'z', 'configs/nope.py') == (
      f'error: no config file configs/nope.py in {ROOT}')
  assert _refused('tpu_vm.sh', 'start', 'tpu1', 'z', 'configs/sparse_small.py',
                  '--workdir=out/r').startswith(
                      'error: --workdir=out/r is inside the code copy')


def test_missing_arguments_print_the_whole_usage():
  """Too few arguments: the script's header comment, every line of it
  (tpu_vm.sh's stopped mid-sentence, before RUNTIME's and PROJECT's
  line), and exit code 2."""
  for script, args in (('tpu_vm.sh', ['start', 'n']),
                       ('tpu_vm.sh', ['create', 'n', 'z']),
                       ('gpu_slurm.sh', ['2'])):
    path = os.path.join(ROOT, 'launch', script)
    with open(path) as f:
      header = []
      for line in f.read().splitlines()[1:]:
        if not line.startswith('#'):
          break
        header.append(line)
    result = subprocess.run(['bash', path, *args], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, (script, args, result)
    assert result.stdout.splitlines() == header, (script, args)


def test_tpu_logs_stop_and_delete():
  logs, = _dry_run('tpu_vm.sh', 'logs', 'tpu1', 'z', '--worker=3')
  assert '--worker=3' in logs and 'sparse_gpt2.log' in _remote(logs)
  logs, = _dry_run('tpu_vm.sh', 'logs', 'tpu1', 'z')  # Worker 0's.
  assert [a for a in shlex.split(logs) if a.startswith('--worker=')] == [
      '--worker=0']
  stop, = _dry_run('tpu_vm.sh', 'stop', 'tpu1', 'z')
  assert '--worker=all' in stop and 'kill -TERM' in _remote(stop)
  delete, = _dry_run('tpu_vm.sh', 'delete', 'tpu1', 'z')
  assert shlex.split(delete) == [
      'gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'tpu1',
      '--zone=z', '--force', '--quiet']


def test_tpu_stop_signals_the_run_that_start_started(tmp_path):
  """start's and stop's remote commands, run here in a home of their own
  with a stand-in `python`: the pid start records is the run's own, so
  stop's SIGTERM reaches it (a pid of the shell around it left the run
  training, orphaned), and stop returns once it is gone. While it lives,
  start refuses before it changes anything; a pid that the recorded one
  became after a restart is neither waited for nor signalled."""
  check = _dry_run('tpu_vm.sh', 'start', 'tpu1', 'z',
                   'configs/sparse_small.py')[0]
  stop, = _dry_run('tpu_vm.sh', 'stop', 'tpu1', 'z')
  pid, env = _start_stand_in(
      tmp_path, 'exec -a "$0" sleep 60',
      lambda pid: _cmdline(pid).endswith(b'/bin/python\x0060\x00'))
  home = tmp_path / 'home'
  refused = subprocess.run(['bash', '-c', _remote(check)], env=env,
                           capture_output=True, text=True, timeout=30)
  assert refused.returncode == 1
  assert refused.stderr == (f'error: {os.uname().nodename} is still running '
                            f'the run of pid {pid}: {ROOT}/launch/tpu_vm.sh '
                            'stop tpu1 z first\n')
  subprocess.run(['bash', '-c', _remote(stop)], env=env, check=True,
                 timeout=30)
  assert not _running(pid)  # stop returned after the run had gone.
  assert not (home / 'sparse_gpt2.pid').exists()
  subprocess.run(['bash', '-c', _remote(check)], env=env, check=True,
                 timeout=30)
  other = subprocess.Popen(['sleep', '60'])
  try:
    (home / 'sparse_gpt2.pid').write_text(str(other.pid))
    subprocess.run(['bash', '-c', _remote(check)], env=env, check=True,
                   timeout=30)
    subprocess.run(['bash', '-c', _remote(stop)], env=env, check=True,
                   timeout=30)
    assert other.poll() is None
  finally:
    other.kill()
    other.wait()


def _cmdline(pid):
  with open(f'/proc/{pid}/cmdline', 'rb') as f:
    return f.read()


def _running(pid):
  """Whether `pid` is alive: not gone and not a zombie left to reap."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def _start_stand_in(tmp_path, body, ready):
  """start's remote command, run here in a home of its own, with a
  stand-in `python` (a bash script running `body`); its pid and env once
  `ready(pid)` holds. A fixed 0.3 s for its trap to be set was not always
  enough on a loaded machine, and a SIGTERM before it ended the run."""
  start = _dry_run('tpu_vm.sh', 'start', 'tpu1', 'z',
                   'configs/sparse_small.py')[-1]
  home = tmp_path / 'home'
  (home / 'sparse_gpt2').mkdir(parents=True)
  stand_in = home / 'sparse_gpt2_venv' / 'bin'
  stand_in.mkdir(parents=True)
  (stand_in / 'python').write_text(f'#!/bin/bash\n{body}\n')
  (stand_in / 'python').chmod(0o755)
  env = {**os.environ, 'HOME': str(home)}
  subprocess.run(['bash', '-c', _remote(start)], env=env, check=True,
                 timeout=30)
  pid = int((home / 'sparse_gpt2.pid').read_text())
  deadline = time.time() + 60  # A hang guard only.
  while not ready(pid):  # nohup, then the stand-in, exec in turn.
    assert time.time() < deadline, _cmdline(pid)
    time.sleep(0.05)
  return pid, env


def _trap_set(tmp_path):
  """A stand-in's line that says its trap is set, and the check of it."""
  return ('touch "$HOME/trap_set"',
          lambda pid: (tmp_path / 'home' / 'trap_set').exists())


def test_tpu_stop_waits_while_the_run_saves(tmp_path):
  """A run that takes a second to save its checkpoint after SIGTERM: stop
  returns only once it has exited."""
  trap_set, ready = _trap_set(tmp_path)
  pid, env = _start_stand_in(
      tmp_path, f"trap 'sleep 1; exit 0' TERM\n{trap_set}\n"
      'while :; do sleep 0.1; done', ready)
  try:
    stop, = _dry_run('tpu_vm.sh', 'stop', 'tpu1', 'z')
    subprocess.run(['bash', '-c', _remote(stop)], env=env, check=True,
                   timeout=30)
    assert not _running(pid)  # Not still saving when stop returned.
  finally:
    if _running(pid):
      os.kill(pid, signal.SIGKILL)


def test_tpu_stop_reports_a_run_still_saving(tmp_path):
  """A run that ignores SIGTERM: stop gives up (after its 300 waits, made
  instant here by a stand-in `sleep`) and says so, rc 1."""
  trap_set, ready = _trap_set(tmp_path)
  pid, env = _start_stand_in(
      tmp_path, f"trap '' TERM\n{trap_set}\nwhile :; do sleep 0.1; done",
      ready)
  try:
    bin_ = tmp_path / 'bin'
    bin_.mkdir()
    (bin_ / 'sleep').write_text('#!/bin/sh\nexit 0\n')
    (bin_ / 'sleep').chmod(0o755)
    stop, = _dry_run('tpu_vm.sh', 'stop', 'tpu1', 'z')
    result = subprocess.run(
        ['bash', '-c', _remote(stop)], capture_output=True, text=True,
        timeout=60, env={**env, 'PATH': f"{bin_}:{os.environ['PATH']}"})
    assert result.returncode == 1, result
    assert result.stderr == (f'error: {os.uname().nodename}: the run of pid '
                             f'{pid} is still saving after 10 minutes\n')
    assert _running(pid)
    assert (tmp_path / 'home' / 'sparse_gpt2.pid').exists()
  finally:
    os.kill(pid, signal.SIGKILL)


def test_slurm_dry_run_prints_commands_that_submit_the_job(tmp_path):
  """Run as printed (with a stand-in `sbatch` that records its file), the
  dry run's lines write the job file that they then submit."""
  lines = _dry_run('gpu_slurm.sh', '1', 'configs/tiny.py')
  (tmp_path / 'sbatch').write_text('#!/bin/sh\ncp "$1" "$(dirname "$0")/job"\n')
  (tmp_path / 'sbatch').chmod(0o755)
  home = tmp_path / 'repo'
  printed = '\n'.join(lines).replace(ROOT, str(home)) + '\n'
  subprocess.run(['bash', '-c', printed], check=True, timeout=30,
                 env={**os.environ, 'PATH': f"{tmp_path}:{os.environ['PATH']}"})
  job = (tmp_path / 'job').read_text()
  assert job.startswith('#!/usr/bin/env bash\n#SBATCH --job-name=')
  assert job == (home / 'logs' / 'sparse_gpt2-tiny.sbatch').read_text()
  assert '.venv/bin/python -m sparse_gpt2.main' in job


def test_slurm_script_installs_once_and_runs_a_process_per_node():
  lines = _dry_run('gpu_slurm.sh', '2', 'configs/dense_gpt2_124m.py',
                   '--time=01:30:00', '--', PATTERN)
  directives = [l for l in lines if l.startswith('#SBATCH')]
  for expected in ('--nodes=2', '--ntasks-per-node=1', '--gpus-per-node=8',
                   '--exclusive', '--time=01:30:00'):
    assert f'#SBATCH {expected}' in directives, expected
  # One log per job, not one overwritten by the next job of the name.
  assert [d for d in directives if d.startswith('#SBATCH --output=')] == [
      f'#SBATCH --output="{ROOT}/logs/%x-%j.out"']
  assert not any(d.startswith('#SBATCH --partition') for d in directives)
  pip = next(i for i, l in enumerate(lines) if 'pip install' in l)
  srun = next(i for i, l in enumerate(lines) if l.startswith('srun '))
  assert pip < srun and 'jax[cuda12]' in lines[pip]  # Once, not per node.
  # The pinned jax, as on TPU.
  assert lines[pip] == (
      ".venv/bin/pip install -q -r requirements.txt 'jax[cuda12]==0.10.2'")
  # The job's first node, resolved when the job runs (not at submission).
  assert ('export JAX_COORDINATOR_ADDRESS=$(scontrol show hostnames '
          '"$SLURM_JOB_NODELIST" | head -n 1):12345') in lines
  assert 'export SPARSE_GPT2_DISTRIBUTED=1' in lines
  # Each node's process drives all 8 of its GPUs, not only GPU 0.
  assert 'export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7' in lines
  # Shared: jax writes entries from process 0 only, every node reads them.
  assert ('export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-'
          f'{ROOT}/.jax_cache}}') in lines
  assert shlex.split(lines[srun])[-3:] == [
      '--config=configs/dense_gpt2_124m.py', '--workdir=runs/dense_gpt2_124m',
      PATTERN]
  assert lines[-1].startswith('sbatch ')
  for args, error in (
      (['0', 'configs/dense_gpt2_124m.py'],
       "NODES must be a positive integer, got '0'"),
      (['2', 'configs/dense_gpt2_124m.py', '--gpus_per_node=x'],
       "--gpus_per_node must be a positive integer, got 'x'"),
      (['2', 'configs/nope.py'], f'no config file configs/nope.py in {ROOT}')):
    assert _refused('gpu_slurm.sh', *args) == f'error: {error}'


def test_slurm_partition_is_a_directive():
  lines = _dry_run('gpu_slurm.sh', '1', 'configs/tiny.py', '--partition=p')
  assert [l for l in lines if l.startswith('#SBATCH --partition')] == [
      '#SBATCH --partition=p']


def _slurm_checkout(repo, config_name):
  """A copy of gpu_slurm.sh in a checkout at `repo` (its logs/ then a
  temporary one) with an empty configs/`config_name`; returns the script."""
  (repo / 'launch').mkdir(parents=True)
  (repo / 'configs').mkdir()
  (repo / 'configs' / config_name).write_text('')
  script = repo / 'launch' / 'gpu_slurm.sh'
  with open(os.path.join(ROOT, 'launch', 'gpu_slurm.sh')) as f:
    script.write_text(f.read())
  return script


def test_slurm_submits_the_job_it_writes(tmp_path):
  """Without --dry_run (in a copy of the script, so its logs/ is a
  temporary one), the job file is written and given to `sbatch`."""
  repo = tmp_path / 'repo'
  script = _slurm_checkout(repo, 'tiny.py')
  bin_ = tmp_path / 'bin'
  bin_.mkdir()
  (bin_ / 'sbatch').write_text(
      '#!/bin/sh\necho "$*" >> "$(dirname "$0")/calls"\n'
      'cp "$1" "$(dirname "$0")/job"\n')
  (bin_ / 'sbatch').chmod(0o755)
  subprocess.run(['bash', str(script), '1', 'configs/tiny.py'], check=True,
                 capture_output=True, timeout=60,
                 env={**os.environ, 'PATH': f"{bin_}:{os.environ['PATH']}"})
  job_file = repo / 'logs' / 'sparse_gpt2-tiny.sbatch'
  assert (bin_ / 'calls').read_text() == f'{job_file}\n'
  job = (bin_ / 'job').read_text()
  assert job == job_file.read_text()
  assert job.startswith('#!/usr/bin/env bash\n#SBATCH --job-name=')
  assert f'#SBATCH --output="{repo}/logs/%x-%j.out"\n' in job


def _sbatch_options(job):
  """The options of a job file's #SBATCH lines, split as sbatch splits
  them: quotes and backslashes group, whitespace and an unquoted `#` (the
  rest of the line a comment) end an option."""
  return [option for line in job.splitlines() if line.startswith('#SBATCH ')
          for option in shlex.split(line[len('#SBATCH '):], comments=True)]


def test_slurm_directives_survive_spaces_and_hashes_in_paths(tmp_path):
  """A checkout under a path with a space and a `#`, and a config file
  with a space in its name: sbatch reads the log path and job name whole
  (unquoted, it wrote the log to the path's first word)."""
  repo = tmp_path / 'my code #2'
  script = _slurm_checkout(repo, 'my tiny.py')
  bin_ = tmp_path / 'bin'
  bin_.mkdir()
  (bin_ / 'sbatch').write_text('#!/bin/sh\ncp "$1" "$(dirname "$0")/job"\n')
  (bin_ / 'sbatch').chmod(0o755)
  subprocess.run(['bash', str(script), '1', 'configs/my tiny.py',
                  '--partition=p'], check=True, capture_output=True,
                 timeout=60,
                 env={**os.environ, 'PATH': f"{bin_}:{os.environ['PATH']}"})
  job = (bin_ / 'job').read_text()
  assert _sbatch_options(job) == [
      '--job-name=sparse_gpt2-my tiny', '--nodes=1', '--ntasks-per-node=1',
      '--gpus-per-node=8', '--exclusive', '--time=24:00:00',
      f'--output={repo}/logs/%x-%j.out', '--partition=p']
  srun = next(l for l in job.splitlines() if l.startswith('srun '))
  assert shlex.split(srun)[-2:] == ['--config=configs/my tiny.py',
                                    '--workdir=runs/my tiny']


def _slurm_file_name(pattern, job_name, job_id):
  """A --output value as Slurm expands it: %x the job's name, %j its id,
  %% a plain `%` (and %u, say, the user's name: never left as written)."""
  def expand(match):
    return {'%': '%', 'x': job_name, 'j': job_id}.get(match[1],
                                                      f'<{match[1]}>')
  return re.sub(r'%(.)', expand, pattern)


def test_slurm_log_path_keeps_a_percent_in_the_checkout_path(tmp_path):
  """A checkout under a path with a `%`: the job's log goes to its logs/
  (unescaped, Slurm read `%j` of /data/top%jobs as the job's id)."""
  repo = tmp_path / 'top%jobs 100%'
  script = _slurm_checkout(repo, 'tiny.py')
  lines = subprocess.run(['bash', str(script), '--dry_run', '1',
                          'configs/tiny.py'], capture_output=True, text=True,
                         timeout=60, check=True).stdout
  [output] = [o for o in _sbatch_options(lines) if o.startswith('--output=')]
  assert _slurm_file_name(output[len('--output='):], 'sparse_gpt2-tiny',
                          '42') == f'{repo}/logs/sparse_gpt2-tiny-42.out'


def test_tpu_start_refuses_a_workdir_that_the_next_start_deletes(tmp_path):
  """A workdir in ~/sparse_gpt2 but not in its runs/ goes with the old
  code at the next start: refused, whether it leaves runs/ by a `..` (here)
  or is an absolute path, or ~/... (which the local shell leaves as it is
  and `main` reads as the home folder's), into the copy (on the workers,
  where ~ is known, before anything changes there)."""
  for workdir in ('runs/../x', 'runs/a/../../x', '/h/sparse_gpt2/runs/../x',
                  '~/sparse_gpt2/runs/../x'):
    assert _refused('tpu_vm.sh', 'start', 'tpu1', 'z',
                    'configs/sparse_small.py', f'--workdir={workdir}') == (
                        f"error: --workdir={workdir} has a '..' component, "
                        'which can leave runs/; name the directory without '
                        'one')
  home = tmp_path / 'home'
  (home / 'sparse_gpt2' / 'runs').mkdir(parents=True)
  (tmp_path / 'link').symlink_to(home / 'sparse_gpt2')
  for workdir, refused in (
      (home / 'sparse_gpt2' / 'x', True), (home / 'sparse_gpt2', True),
      (tmp_path / 'link' / 'x', True),
      (home / 'sparse_gpt2' / 'runs' / 'x', False),
      (tmp_path / 'my runs' / 'x', False), ('~/sparse_gpt2/x', True),
      ('~/sparse_gpt2', True), ('~/sparse_gpt2/runs/x', False),
      ('~/ckpt/x', False), ('~/my ckpt', False)):
    lines = _dry_run('tpu_vm.sh', 'start', 'tpu1', 'z',
                     'configs/sparse_small.py', f'--workdir={workdir}')
    # main gets a ~ as it is: its --workdir expands it on the worker.
    assert f'--workdir={workdir}' in shlex.split(_remote(lines[-1])), workdir
    result = subprocess.run(['bash', '-c', _remote(lines[0])],
                            capture_output=True, text=True, timeout=30,
                            env={**os.environ, 'HOME': str(home)})
    if refused:
      assert result.returncode == 2, (workdir, result)
      shown = (f'{home}{workdir[1:]}' if str(workdir).startswith('~')
               else workdir)  # As the worker has it.
      assert result.stderr == (
          f'error: --workdir={shown} is inside ~/sparse_gpt2, the code copy '
          'that each start replaces; use ~/sparse_gpt2/runs/..., another '
          'absolute path or gs://...\n'), workdir
    else:
      assert result.returncode == 0 and result.stderr == '', (workdir, result)


def test_tpu_create_rerun_after_an_interrupted_one_says_what_to_do(tmp_path):
  """create stopped by Ctrl-C, run again: a request still queued is waited
  for (another of its name would be refused); a VM still CREATING is to be
  waited for, not deleted; a STOPPED one started; a DELETING one gone."""
  env = _fake_gcloud(tmp_path)

  def create(**states):
    (tmp_path / 'calls').unlink(missing_ok=True)
    result = _run_bounded(
        ['bash', os.path.join(ROOT, 'launch', 'tpu_vm.sh'), 'create', 'tpu1',
         'z', 'v5p-8'], {**env, 'VM_STATE': '', **states})
    return result, (tmp_path / 'calls').read_text()

  result, calls = create(QR_EXISTS='1')  # Queued, not yet a VM.
  assert result.returncode == 0, result
  assert 'queued-resources create' not in calls
  assert result.stdout == ('queued resource tpu1 was requested before '
                           '(ACTIVE): waiting for it\n')
  result, calls = create(QR_EXISTS='1', QR_STATE='DELETING')
  assert result.returncode == 1 and 'queued-resources create' not in calls
  assert result.stderr == ('error: queued resource tpu1 is DELETING: wait '
                           'until it is gone, then create it again\n')
  for state, todo in (
      ('CREATING', 'wait until it is, then run this create again to reuse '
                   'it'),
      ('REPAIRING', 'wait until it is, then run this create again to reuse '
                    'it'),
      ('STOPPED', 'start it once STOPPED (gcloud compute tpus tpu-vm start '
                  'tpu1 --zone=z), then run this create again'),
      ('DELETING', 'wait until it is gone, then create it again')):
    result, calls = create(VM_STATE=state, QR_EXISTS='1',
                           QR_STATE='PROVISIONING')
    assert result.returncode == 1, (state, result)
    assert 'queued-resources create' not in calls, state
    assert result.stderr == (f'error: TPU VM tpu1 exists but is {state}, not '
                             f'READY: {todo}\n'), state


def test_an_empty_workdir_is_refused_not_replaced_by_the_default():
  """`--workdir=$DIR` with DIR unset: both scripts ran into runs/CONFIG_NAME
  (on Slurm resuming whatever run was there, on a TPU the VM's own disk),
  where `main` refuses an empty --workdir."""
  error = 'error: --workdir is empty; leave it out for runs/CONFIG_NAME'
  assert _refused('tpu_vm.sh', 'start', 'tpu1', 'z', 'configs/sparse_small.py',
                  '--workdir=') == error
  assert _refused('gpu_slurm.sh', '1', 'configs/tiny.py', '--workdir=') == error


def test_tpu_delete_removes_a_vm_that_no_queued_resource_made(tmp_path):
  """create reuses a READY VM made by `gcloud compute tpus tpu-vm create`,
  and its advice for a PREEMPTED one is `delete`: such a VM has no queued
  resource, whose delete was all `delete` ran (NOT_FOUND, the VM left
  running). A VM a request made goes with its request (--force)."""
  env = _fake_gcloud(tmp_path)

  def delete(**states):
    (tmp_path / 'calls').unlink(missing_ok=True)
    result = _run_bounded(
        ['bash', os.path.join(ROOT, 'launch', 'tpu_vm.sh'), 'delete', 'tpu1',
         'z'], {**env, 'VM_STATE': 'READY', **states})
    assert result.returncode == 0, result
    return (tmp_path / 'calls').read_text()

  calls = delete()
  assert 'tpu-vm delete tpu1 --zone=z --quiet' in calls, calls
  assert 'queued-resources delete' not in calls, calls
  calls = delete(QR_EXISTS='1')
  assert 'queued-resources delete tpu1 --zone=z --force --quiet' in calls
  assert 'tpu-vm delete' not in calls, calls
