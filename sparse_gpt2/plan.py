r"""Will a config's run fit a target? Compile its programs there and see.

  python -m sparse_gpt2.plan --config=configs/dense_gpt2_124m.py \
      --topology=v5e-8 [--config.microbatches=4 ...]

In the spirit of MaxText's `train_compile`: every program a run compiles on
its state, the initialization (`train.init_state`: with the masks' top-k
unless the annealing starts dense), the real train step
(`train.train_step`, the same shardings and donation as a run) and the
evaluation (`train.eval_loss`, which a plan of the step alone once missed:
it held the whole batch at once), is compiled ahead of time for the
target's devices, without the hardware, and their per-device memory
(arguments, outputs, temporaries), the step's FLOPs and whether all of them
fit are printed. TPU targets are abstract devices from
`jax.experimental.topologies`, which need libtpu (`pip install
"jax[tpu]==0.10.2"`; JAX_PLATFORMS=cpu and TPU_SKIP_MDS_QUERY=1 are set
here, so nothing looks for a TPU); `cpu:N` compiles for N fake CPU devices.
A program too large for a TPU fails to compile with the sizes in the error,
which is reported as not fitting.
"""

import os
import re

# Whatever the shell exports: the targets are fake CPU devices and abstract
# TPUs, both made on the CPU backend; another platform first (a TPU VM's
# 'tpu', a GPU machine's 'cuda') failed in a traceback, or took the
# accelerator a run may be training on.
os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
import flax.linen as nn
import jax
from ml_collections import config_flags

from sparse_gpt2 import cli
from sparse_gpt2 import metrics
from sparse_gpt2 import sharding
from sparse_gpt2 import train
from sparse_gpt2 import workdir
# pylint: enable=g-import-not-at-top,wrong-import-position

# Name -> (jax topology name, HBM per device in GiB, options): the HBM a
# program may use, as libtpu's own out-of-memory error states it ("exceeds
# available HBM (30.75G)"), not the datasheets' 32 GiB a v4 chip and 95 a
# v5p chip, which said a v4 program of 31 GiB fit. v4 needs "megacore" (one
# device per chip, as a v4 VM runs): meshes on TPUs after v3 are built from
# whole chips.
TPU_TOPOLOGIES = {
    'v5e-8': ('v5e:2x4', 15.75, {}),
    'v5e-16': ('v5e:4x4', 15.75, {}),
    'v4-8': ('v4:2x2x1', 30.75, {'chip_config_name': 'megacore'}),
    'v5p-8': ('v5p:2x2x1', 95.74, {}),
}

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, `file.py[:arg]`; override fields with '
    '--config.FIELD=VALUE.', lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    'topology', 'cpu:8', f'{"|".join(TPU_TOPOLOGIES)}|cpu:N.')
flags.mark_flags_as_required(['config'])

GIB = 1024**3


def _size(n):
  return f'{n / GIB:.2f} GiB' if n >= GIB / 10 else f'{n / 2**20:.1f} MiB'


def devices(topology):
  """The target's devices: abstract TPUs, or N (fake) CPU devices."""
  if topology in TPU_TOPOLOGIES:
    from jax.experimental import topologies  # Only TPU targets need it.
    try:
      name, _, options = TPU_TOPOLOGIES[topology]
      return topologies.get_topology_desc(
          platform='tpu', topology_name=name, **options).devices
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'--topology={topology} needs libtpu (pip install '
                       f'"jax[tpu]==0.10.2"): {str(e).splitlines()[0]}'
                       ) from None
  match = re.fullmatch(r'cpu:(\d+)', topology)
  if not match or not 1 <= int(match.group(1)) <= cli.MAX_CPU_DEVICES:
    raise ValueError(f'--topology must be one of {sorted(TPU_TOPOLOGIES)} or '
                     f'cpu:N with N from 1 to {cli.MAX_CPU_DEVICES}, got '
                     f'{topology!r}')
  jax.config.update('jax_num_cpu_devices', int(match.group(1)))
  return jax.devices('cpu')[:int(match.group(1))]


def compile_programs(config, target_devices):
  """(parameter count, mesh, {program: compiled or the compiler's error})
  for the three programs a run compiles on its state: the initialization
  (a first start's random weights and their masks), the train step and the
  evaluation."""
  train.validate(config)
  # The schedules' length as a new run sets it: a run that anneals starts
  # dense, and its initialization computes no top-k.
  config = config.copy_and_resolve_references()
  config.schedule_steps = workdir.schedule_steps(config)
  mesh, state, lowerings = train.abstract_programs(config, target_devices)
  # Traced under the mesh's abstract form, not `jax.set_mesh` as a run
  # traces them: the same programs, but the constants a trace computes
  # eagerly (the top-k's final k, `sparsity._kept_per_tensor`) then run on
  # this host, where set_mesh sends them to the target's devices, and a
  # TPU's abstract devices run nothing ('Executable' object has no
  # attribute 'local_devices').
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
      nn.logical_axis_rules(sharding.rules(config.mesh)):
    params = sum(x.size for x in jax.tree.leaves(state.params))
    return params, mesh, {name: _compile(lower)
                          for name, lower in lowerings.items()}


def _compile(lower):
  """The compiled program, or the compiler's out-of-memory error."""
  try:
    return lower().compile()
  except Exception as e:  # pylint: disable=broad-except
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    return e


def report(config, topology, params, mesh, compiled):
  """The plan as lines of text."""
  n = mesh.size
  tokens = config.batch_size * config.seq_len
  model_flops = metrics.flops_per_token(config.model, config.seq_len) * tokens
  lines = [
      f'config: {params / 1e6:.1f}M parameters, batch {config.batch_size} x '
      f'{config.seq_len}, microbatches {config.microbatches}, remat '
      f'{config.model.remat!r}, dtype {config.model.dtype}, sparsity '
      f'{config.sparsity.mode}',
      f'target: {topology}, {n} devices, mesh ' + ' x '.join(
          f'{axis} {size}' for axis, size in mesh.shape.items()),
      f'model FLOPs per step: {model_flops:.3e} (6 per matmul weight per '
      'token, plus causal attention)']
  totals = {}
  for name, program in compiled.items():
    if isinstance(program, Exception):
      message = str(program)
      found = re.search(r'RESOURCE_EXHAUSTED:[^\n]*', message)
      lines.append(f'{name}: does not compile '
                   f'({found.group(0) if found else message[:300]})')
      totals[name] = None
      continue
    memory = program.memory_analysis()
    arguments = memory.argument_size_in_bytes
    outputs = memory.output_size_in_bytes
    aliased = memory.alias_size_in_bytes
    temps = memory.temp_size_in_bytes
    totals[name] = arguments + outputs - aliased + temps
    lines.append(
        f'{name} per device: arguments {_size(arguments)}, outputs '
        f'{_size(outputs)} ({_size(aliased)} of them aliased to arguments), '
        f'temporaries {_size(temps)}, code '
        f'{_size(memory.generated_code_size_in_bytes)}; total '
        f'{_size(totals[name])}')
  if None not in (totals['train step'], totals['evaluation']):
    # A run evaluates beside its whole state: the train step's arguments are
    # the state and a batch, the evaluation's the params and a batch.
    totals['evaluation'] += (
        compiled['train step'].memory_analysis().argument_size_in_bytes
        - compiled['evaluation'].memory_analysis().argument_size_in_bytes)
    lines.append('evaluation per device beside the rest of the train state '
                 f'(moments, masks): {_size(totals["evaluation"])}')
  if totals['train step'] is not None:
    cost = compiled['train step'].cost_analysis()
    flops = (cost[0] if isinstance(cost, (list, tuple)) else cost).get(
        'flops', 0)
    lines.append(
        f'compiled FLOPs per step per device: {flops:.3e} (x {n} devices = '
        f'{flops * n:.3e}; XLA counts a loop body once, so with microbatches '
        'this is about one microbatch\'s share plus the update)')
  if None in totals.values():
    lines.append('fits: NO')
  elif topology in TPU_TOPOLOGIES:
    hbm = TPU_TOPOLOGIES[topology][1]
    largest = max(totals.values())
    lines.append(f'fits: {"yes" if largest <= hbm * GIB else "NO"} ('
                 + ', '.join(f'{name} {total / GIB:.2f}'
                             for name, total in totals.items())
                 + f' of {hbm} GiB HBM per device)')
  else:  # The CPU devices share this host's memory.
    host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    needed = max(totals.values()) * n
    lines.append(f'fits: {"yes" if needed <= host else "NO"} ({n} CPU '
                 f'device(s) x the largest program: {needed / GIB:.2f} of '
                 f'this host\'s {host / GIB:.1f} GiB)')
  return lines


def main():
  """Prints the report; a run that does not fit also exits 1, so that a
  script or CI job checking a config against its chips stops there."""
  target = devices(_TOPOLOGY.value)
  params, mesh, compiled = compile_programs(_CONFIG.value, target)
  lines = report(_CONFIG.value, _TOPOLOGY.value, params, mesh, compiled)
  print('\n'.join(lines), flush=True)
  if lines[-1].startswith('fits: NO'):
    raise ValueError(f'the run does not fit {_TOPOLOGY.value}: see the '
                     'report above')


if __name__ == '__main__':
  cli.run(main)
