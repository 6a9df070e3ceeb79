"""`python -m sparse_gpt2.plan`: the initialization, the train step and the
evaluation compiled ahead of time for a target, here 8 fake CPU devices (TPU
targets need libtpu, not installed for the tests)."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plan(*flags, env=None):
  return subprocess.run(
      [sys.executable, '-m', 'sparse_gpt2.plan', '--config=configs/tiny.py',
       *flags], cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=None if env is None else {**os.environ, **env})


def test_plan_compiles_the_step_for_8_cpu_devices_with_fsdp():
  result = _plan('--topology=cpu:8', '--config.mesh.fsdp=2',
                 '--config.mesh.model=2', '--config.microbatches=2',
                 '--config.model.remat=full')
  assert result.returncode == 0, result.stderr[-2000:]
  out = result.stdout
  assert 'mesh data 2 x fsdp 2 x model 2' in out
  for program in ('initialization', 'train step', 'evaluation'):
    assert re.search(program + r' per device: arguments [\d.]+ [MG]iB, '
                     'outputs', out), out
  # The evaluation runs beside the whole train state, not its params alone.
  arguments = {program: float(re.search(
      program + r' per device: arguments ([\d.]+) MiB', out).group(1))
               for program in ('train step', 'evaluation')}
  alone = float(re.search(r'evaluation per device: .* total ([\d.]+) MiB',
                          out).group(1))
  beside = float(re.search(r'evaluation per device beside the rest of the '
                           r'train state \(moments, masks\): ([\d.]+) MiB',
                           out).group(1))
  assert beside > alone
  assert abs(beside - (alone + arguments['train step']
                       - arguments['evaluation'])) <= 0.15, out
  assert re.search(r'compiled FLOPs per step per device: [\d.]+e\+\d+', out)
  assert re.search(r"fits: yes \(8 CPU device\(s\) x the largest program: "
                   r"[\d.]+ of this host's [\d.]+ GiB\)", out), out


# Plans configs/tiny.py on one CPU device, runs the planned initialization
# and compares it with the first state a run of the same config starts from.
_SAME_INIT = """
import sys
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from configs import tiny
from sparse_gpt2 import optim, plan, train, workdir
config = tiny.get_config('topk')
_, mesh, compiled = plan.compile_programs(config, jax.devices()[:1])
key = jax.random.key(0)
planned = compiled['initialization'](
    jax.device_put(key, NamedSharding(mesh, P())), None)
run = workdir.check(config, sys.argv[1])
model = train.make_model(run)
tx = optim.make(run, run.schedule_steps)
started = jax.jit(lambda key: train.init_state(run, model, tx, key, None))(key)
jax.tree.map(np.testing.assert_array_equal, planned, started)
print('same state')
"""


def test_plan_compiles_the_initialization_a_run_starts_from(tmp_path):
  """tiny's top-k anneals from dense, so its first state keeps every weight;
  the plan once read the config's schedule_steps 0 as no annealing and
  compiled a top-k to the final density, a program no run compiles."""
  result = subprocess.run(
      [sys.executable, '-c', _SAME_INIT, str(tmp_path / 'run')], cwd=ROOT,
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'same state' in result.stdout


# Lowers the plan's programs for compile-only CPU devices, which (like a TPU
# topology's) run nothing, and the run's on real ones as a run's child
# process traces them (`train.compile_steps`). jaxlib (pinned) makes such
# devices only through its private `_jax`: `topologies` has no CPU ones.
_RUNS_NOTHING = """
import flax.linen as nn
import jax
from jax._src.lib import _jax
from configs import tiny
from sparse_gpt2 import plan, sharding, train, workdir
jax.config.update('jax_num_cpu_devices', 8)
plan._compile = lambda lower: lower().as_text()
config = tiny.get_config('topk')
config.mesh.fsdp = 2
compile_only = _jax.get_topology_for_devices(
    jax.devices())._make_compile_only_devices()
_, _, planned = plan.compile_programs(config, compile_only)
config.schedule_steps = workdir.schedule_steps(config)
mesh, _, lowerings = train.abstract_programs(config)
with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(config.mesh)):
  assert planned == {name: lower().as_text()
                     for name, lower in lowerings.items()}
print('same programs')
"""


def test_plan_traces_for_devices_that_run_nothing_the_programs_a_run_does():
  """A TPU topology's devices compile but run nothing: the plan of every
  top-k config failed on them ('Executable' object has no attribute
  'local_devices') once the top-k's final k came to be computed eagerly
  while its step is traced, which `jax.set_mesh` sent to those devices."""
  result = subprocess.run([sys.executable, '-c', _RUNS_NOTHING], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'same programs' in result.stdout


@pytest.mark.parametrize('topology', ['v9-8', 'cpu:0', 'cpu:100000'])
def test_plan_refuses_an_unknown_topology_in_one_line(topology):
  """cpu:100000 too, at once: made first, its devices took minutes."""
  result = _plan(f'--topology={topology}')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "error: --topology must be one of ['v4-8', 'v5e-16', 'v5e-8', "
      f"'v5p-8'] or cpu:N with N from 1 to 1024, got '{topology}'")


def test_plan_runs_on_the_cpu_whatever_jax_platforms_the_shell_exports():
  """A GPU machine's JAX_PLATFORMS=cuda (or a TPU VM's tpu) was kept, and
  the plan of CPU devices ended in a traceback."""
  result = _plan('--topology=cpu:1', env={'JAX_PLATFORMS': 'cuda'})
  assert result.returncode == 0, result.stderr[-2000:]
  assert re.search(r'^fits: yes ', result.stdout, re.M), result.stdout


def test_plan_refuses_train_steps_past_the_schedules_as_a_run_does():
  result = _plan('--topology=cpu:1', '--config.train_steps=30',
                 '--config.schedule_steps=20')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      'error: train_steps 30 is past the end of the lr and annealing '
      'schedules (schedule_steps 20); a run cannot be extended past them, '
      'start a new one')


def test_plan_refuses_num_cpu_devices_past_the_limit_as_a_run_does():
  """Refused by `train.validate`, as a run's start refuses it: the plan
  said 'fits: yes' and exited 0."""
  result = _plan('--topology=cpu:1', '--config.num_cpu_devices=1025')
  assert result.returncode == 1, result.stdout[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      'error: num_cpu_devices must be at most 1024, got 1025')
  assert 'fits' not in result.stdout


def test_plan_says_a_step_larger_than_the_host_does_not_fit():
  """And exits 1 (it exited 0), so that a script checking a config against
  its chips stops there."""
  result = _plan('--topology=cpu:1', '--config.batch_size=16777216')
  assert result.returncode == 1, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      'error: the run does not fit cpu:1: see the report above')
  assert re.search(r"fits: NO \(1 CPU device\(s\) x the largest program: "
                   r"\d{4,}\.\d\d of this host's", result.stdout), result.stdout


# `plan` defines flags (--config) that `convert`, which other tests import,
# defines too: its functions are tested in a process of their own.
_STANDINS = """
import re, types
from configs import tiny
from sparse_gpt2 import metrics
from sparse_gpt2 import plan

def program(arguments, outputs=0, aliased=0, temps=0):
  # A stand-in for a compiled program: its memory analysis, in bytes.
  memory = types.SimpleNamespace(
      argument_size_in_bytes=arguments, output_size_in_bytes=outputs,
      alias_size_in_bytes=aliased, temp_size_in_bytes=temps,
      generated_code_size_in_bytes=0)
  return types.SimpleNamespace(memory_analysis=lambda: memory,
                               cost_analysis=lambda: {'flops': 1e9})

def failing(message):
  def compile_():
    raise RuntimeError(message)
  return lambda: types.SimpleNamespace(compile=compile_)
"""


# Each test's code, run on the stand-ins.
_STANDIN_CHECKS = {
    'cpu_devices': """
gib = plan.GIB
mesh = types.SimpleNamespace(size=8, shape={'data': 8})
compiled = {'initialization': program(gib // 4, outputs=gib // 4),
            'train step': program(gib // 2, outputs=gib // 4,
                                  aliased=gib // 4, temps=gib // 2),
            'evaluation': program(gib // 4, temps=gib // 8)}
config = tiny.get_config()
lines = plan.report(config, 'cpu:8', 1000, mesh, compiled)
# A step's model FLOPs: those of its 8 x 32 tokens (batch x seq_len).
flops = metrics.flops_per_token(config.model, 32) * 8 * 32
assert lines[2].startswith(f'model FLOPs per step: {flops:.3e} ('), lines
# The largest is the train step's 1 GiB (evaluation: 3/8 + 1/4 beside).
assert re.fullmatch(r"fits: (yes|NO) \\(8 CPU device\\(s\\) x the largest "
                    r"program: 8\\.00 of this host's [\\d.]+ GiB\\)",
                    lines[-1]), lines
""",
    'tpu_fits': """
gib = plan.GIB
mesh = types.SimpleNamespace(size=4, shape={'data': 4})
compiled = {'initialization': program(gib),
            'train step': program(gib, outputs=gib, aliased=gib,
                                  temps=30 * gib),
            'evaluation': program(gib // 2)}
lines = plan.report(tiny.get_config(), 'v4-8', 1000, mesh, compiled)
assert lines[-1] == ('fits: NO (initialization 1.00, train step 31.00, '
                     'evaluation 1.00 of 30.75 GiB HBM per device)'), lines
""",
    'compile': """
out_of_memory = plan._compile(failing('RESOURCE_EXHAUSTED: 20G > 16G'))
assert isinstance(out_of_memory, RuntimeError)
for make, error in ((failing('INTERNAL: a compiler bug'), RuntimeError),
                    (lambda: (_ for _ in ()).throw(TypeError('lowering')),
                     TypeError)):
  try:
    plan._compile(make)
  except error:
    pass
  else:
    raise AssertionError(f'{error.__name__} not raised')
assert plan._compile(lambda: types.SimpleNamespace(
    compile=lambda: 'compiled')) == 'compiled'
""",
}


@pytest.fixture(scope='module')
def standins():
  """{check: '' if its code ran through, else its traceback} of every
  _STANDIN_CHECKS, all run in one process (each started one, 2 s of CPU,
  most of it importing jax), each on its own copy of _STANDINS' names."""
  code = _STANDINS + f"""
import json, traceback
results = {{}}
for name, check in {_STANDIN_CHECKS!r}.items():
  try:
    exec(check, dict(globals()))
    results[name] = ''
  except BaseException:  # pylint: disable=broad-except  Reported by its test.
    results[name] = traceback.format_exc()
print(json.dumps(results))
"""
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  return json.loads(result.stdout.splitlines()[-1])


def test_cpu_devices_need_n_times_the_largest_program(standins):
  """The fake CPU devices share the host's memory: each holds its share."""
  assert not standins['cpu_devices'], standins['cpu_devices']


def test_a_tpu_fits_what_libtpu_lets_a_program_use_not_the_datasheet(standins):
  """libtpu gives a v4 chip's programs 30.75 GiB of its 32 and a v5p's
  95.74 ("exceeds available HBM (30.75G)"); 31 GiB were said to fit a v4."""
  assert not standins['tpu_fits'], standins['tpu_fits']


def test_compile_returns_out_of_memory_and_raises_anything_else(standins):
  assert not standins['compile'], standins['compile']
