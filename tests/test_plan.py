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
  assert re.search(r'compiled FLOPs per step per device: [\d.]+e\+\d+', out)
  assert 'fits: yes' in out


def test_plan_refuses_an_unknown_topology_in_one_line():
  result = _plan('--topology=v9-8')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(
      'error: --topology must be one of')
