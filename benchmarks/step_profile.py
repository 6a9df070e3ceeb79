r"""Where a train step's time goes, for the README's speed section.

  python benchmarks/step_profile.py --step=sparse_small   # or dense_small, gpt2, torch

`gpt2` is this project's dense step on the peers' plain GPT-2 shape and
`torch` the Hugging Face peer on it (`peers.py`); the others are the twins'
configs, on one CPU device (no `num_cpu_devices`). A JAX step is traced
with `jax.profiler` and its XLA ops summed over the CPU worker threads (by
op kind: `ynn_fusion` is a matmul in XLA's YNNPACK library, `*_fusion` the
loop fusions that XLA named after their first ops), with each thread's busy
time per step: on a CPU, a thread that is busy for less than the step's
wall time waited. The torch step goes through
`torch.profiler`, by ATen op.
"""

import collections
import glob
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # pylint: disable=g-import-not-at-top
import run  # pylint: disable=g-import-not-at-top
from sparse_gpt2 import cli  # pylint: disable=g-import-not-at-top
from configs import dense_small  # pylint: disable=g-import-not-at-top
from configs import sparse_small  # pylint: disable=g-import-not-at-top

_STEP = flags.DEFINE_enum('step', 'sparse_small',
                          ['sparse_small', 'dense_small', 'gpt2', 'torch'],
                          'Which train step to profile.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Steps traced (after 3 warm-up).')


def _wall_ms(step, steps):
  start = time.perf_counter()
  for _ in range(steps):
    step()
  return 1e3 * (time.perf_counter() - start) / steps


def profile_torch(steps):
  from torch import profiler  # pylint: disable=g-import-not-at-top
  step = peers.torch_step(peers.Shape())
  for _ in range(3):
    step()
  print(f'step: {_wall_ms(step, steps):.0f} ms wall')
  with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step()
  print(prof.key_averages().table(sort_by='self_cpu_time_total',
                                  row_limit=20, max_name_column_width=45))


def profile_jax(config, steps):
  step = run.project_step(config)[0]
  for _ in range(3):
    step()
  print(f'step: {_wall_ms(step, steps):.0f} ms wall, on one device')
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(steps):
      step()
    jax.profiler.stop_trace()
    trace, = glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True)
    data = jax.profiler.ProfileData.from_file(trace)
  by_op, busy = collections.Counter(), collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if not (plane.name.startswith('/host:CPU')
              and line.name.startswith('tf_XLA')):
        continue
      for event in line.events:
        if not event.name.startswith('ThunkExecutor'):  # Spans, not ops.
          by_op[event.name] += event.duration_ns / 1e6 / steps
          busy[line.name] += event.duration_ns / 1e6 / steps
  print('busy ms per step, by thread:',
        ', '.join(f'{ms:.0f}' for ms in busy.values()))
  by_kind = collections.Counter()
  for name, ms in by_op.items():
    by_kind[name.rstrip('0123456789').rstrip('.')] += ms
  total = sum(by_kind.values())
  print('\n| op kind | ms per step | share |\n|---|---:|---:|')
  for kind, ms in by_kind.most_common(15):
    print(f'| {kind} | {ms:.1f} | {100 * ms / total:.1f}% |')


def main(argv):
  del argv
  cli.keep_freed_memory()
  if _STEP.value == 'torch':
    profile_torch(_STEPS.value)
    return
  if _STEP.value == 'gpt2':
    config = run.project_config(peers.Shape(), 'gpt2', 'none')
  else:
    config = {'sparse_small': sparse_small,
              'dense_small': dense_small}[_STEP.value].get_config()
  profile_jax(config, _STEPS.value)


if __name__ == '__main__':
  app.run(main)
