"""`python -m sparse_gpt2.plan`: the initialization, the train step and the
evaluation compiled ahead of time for a target, here 8 fake CPU devices (TPU
targets need libtpu, not installed for the tests)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plan(*flags):
  return subprocess.run(
      [sys.executable, '-m', 'sparse_gpt2.plan', '--config=configs/tiny.py',
       *flags], cwd=ROOT, capture_output=True, text=True, timeout=600)


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


def test_plan_refuses_an_unknown_topology_in_one_line():
  result = _plan('--topology=v9-8')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(
      'error: --topology must be one of')


def test_plan_refuses_train_steps_past_the_schedules_as_a_run_does():
  result = _plan('--topology=cpu:1', '--config.train_steps=30',
                 '--config.schedule_steps=20')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      'error: train_steps 30 is past the end of the lr and annealing '
      'schedules (schedule_steps 20); a run cannot be extended past them, '
      'start a new one')


def test_plan_says_a_step_larger_than_the_host_does_not_fit():
  result = _plan('--topology=cpu:1', '--config.batch_size=16777216')
  assert result.returncode == 0, result.stderr[-2000:]
  assert re.search(r"fits: NO \(1 CPU device\(s\) x the largest program: "
                   r"\d{4,}\.\d\d of this host's", result.stdout), result.stdout


# `plan` defines flags (--config) that `convert`, which other tests import,
# defines too: its functions are tested in a process of their own.
_STANDINS = """
import re, types
from configs import tiny
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


def _run_standins(code):
  result = subprocess.run([sys.executable, '-c', _STANDINS + code], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]


def test_cpu_devices_need_n_times_the_largest_program():
  """The fake CPU devices share the host's memory: each holds its share."""
  _run_standins("""
gib = plan.GIB
mesh = types.SimpleNamespace(size=8, shape={'data': 8})
compiled = {'initialization': program(gib // 4, outputs=gib // 4),
            'train step': program(gib // 2, outputs=gib // 4,
                                  aliased=gib // 4, temps=gib // 2),
            'evaluation': program(gib // 4, temps=gib // 8)}
lines = plan.report(tiny.get_config(), 'cpu:8', 1000, mesh, compiled)
# The largest is the train step's 1 GiB (evaluation: 3/8 + 1/4 beside).
assert re.fullmatch(r"fits: (yes|NO) \\(8 CPU device\\(s\\) x the largest "
                    r"program: 8\\.00 of this host's [\\d.]+ GiB\\)",
                    lines[-1]), lines
""")


def test_compile_returns_out_of_memory_and_raises_anything_else():
  _run_standins("""
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
""")
