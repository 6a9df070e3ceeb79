r"""Where a train step's time goes, for the README's speed section.

  python benchmarks/step_profile.py --step=sparse_small   # or dense_small, gpt2, paper, torch

`gpt2` is this project's dense step on the peers' plain GPT-2 shape,
`paper` the paper's architecture (d_head 16, bigram table, sinks, untied)
on the same shape, as `run.py`'s sizes section builds them, and `torch`
the Hugging Face peer on it (`peers.py`); the others are the twins'
configs. JAX steps run on `--num_cpu_devices` CPU devices (`run.py`'s flag:
2, each batch split over them, as `main` runs the twins; 1 for one device
with both cores). A JAX step is traced with `jax.profiler` and its XLA ops
summed over the CPU worker threads (by op kind: `ynn_fusion` is a matmul in
XLA's YNNPACK library, `dot` one in Eigen (the kernel gradients' X^T dY,
whose transposed left operand YNNPACK does not take), `*_fusion` the loop
fusions that XLA named after their first ops; on two devices `all-reduce`
sums their gradients, and `Rendezvous` and `Wait` are a thread blocked until
the other device arrives), with each thread's busy time per step: on a CPU,
a thread that is busy for less than the step's wall time waited. An op
whose work goes on in the thread pool after its own event has ended (an
Eigen dot, a partitioned loop) ends at its `end: <op>` marker, which may
lie on the other thread: it is timed from its event's start to that
marker, else an Eigen dot would count ~0.1 ms of its ~20. The same times
are then summed by part of the step (attention, MLP, unembedding, bigram
table, top-k, optimizer, ...: `PARTS`), read off the name scope each op
carries, and the time no XLA op runs at all is the host's. The torch step
goes through `torch.profiler`, by ATen op.
"""

import collections
import glob
import os
import re
import sys
import tempfile
import time

from absl import flags
import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # pylint: disable=g-import-not-at-top
import provenance  # pylint: disable=g-import-not-at-top
import run  # pylint: disable=g-import-not-at-top
from sparse_gpt2 import cli  # pylint: disable=g-import-not-at-top
from configs import dense_small  # pylint: disable=g-import-not-at-top
from configs import sparse_small  # pylint: disable=g-import-not-at-top

# run.py's flag that this script reads, listed by its --help.
flags.declare_key_flag('num_cpu_devices')

_STEP = flags.DEFINE_enum('step', 'sparse_small',
                          ['sparse_small', 'dense_small', 'gpt2', 'paper',
                           'torch'],
                          'Which train step to profile.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Steps traced (after 3 warm-up).',
                              lower_bound=1)


def _wall_ms(step, steps):
  start = time.perf_counter()
  for _ in range(steps):
    step()
  return 1e3 * (time.perf_counter() - start) / steps


def profile_torch(steps):
  step = peers.torch_step(peers.Shape())  # Without torch: ImportError.
  from torch import profiler  # pylint: disable=g-import-not-at-top
  for _ in range(3):
    step()
  print(f'step: {_wall_ms(step, steps):.0f} ms wall')
  with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step()
  print(prof.key_averages().table(sort_by='self_cpu_time_total',
                                  row_limit=20, max_name_column_width=45))


def _op_spans(events):
  """(start_ns, end_ns, name, thread) of each op in `events` (start_ns,
  duration_ns, name, thread): an op with an `end: <name>` marker runs from
  its start to the end of that marker, which may be on another thread (the
  one that finished the op's last task); the first marker after a start
  closes it. The span stays with the thread that started the op."""
  closed_later = {n[len('end: '):] for _, _, n, _ in events
                  if n.startswith('end: ')}
  spans, open_starts = [], collections.defaultdict(collections.deque)
  for start, duration, name, thread in sorted(events):
    if name.startswith('end: '):
      op_start, op_thread = open_starts[name[len('end: '):]].popleft()
      spans.append((op_start, start + duration, name[len('end: '):],
                    op_thread))
    elif name in closed_later:
      open_starts[name].append((start, thread))
    else:
      spans.append((start, start + duration, name, thread))
  return spans


def _self_times(spans):
  """(name, ns) of one thread's spans (start_ns, end_ns, name), each
  without the spans nested in it (a collective holds its rendezvous, which
  holds the wait; a dot's span, the other device's ops that the thread ran
  meanwhile): every nanosecond counts once, in the innermost span."""
  out, stack = [], []  # stack: [end_ns, name, self_ns] of open spans.
  for start, end, name in sorted(spans, key=lambda s: (s[0], -s[1])):
    while stack and stack[-1][0] <= start:
      out.append(tuple(stack.pop()[1:]))
    if stack:
      stack[-1][2] -= min(end, stack[-1][0]) - start
    stack.append([end, name, end - start])
  return out + [tuple(s[1:]) for s in stack]


# A step's parts, by the name scopes its ops carry (XLA keeps on each op, a
# fusion too, the jax name stack of the operation it came from, e.g.
# `transpose(jvp(GPT2))/block_0/mlp/mlp_fc/dot_general`: the model's modules
# and the scopes that `model`, `train` and `sparsity` open). The first
# pattern that matches an op's name stack takes it; an op that XLA fused
# across two parts counts in the part of the fusion's root.
PARTS = (
    ('top-k and masks', r'\breproject\b|\bshard_map\b'),
    ('attention: scores, softmax, weighted values', r'\battention\b'),
    ('attention: q/k/v and output matmuls', r'\bqkv\b|\battn_proj\b'),
    ('MLP', r'\bmlp\b'),
    ('norms', r'\bnorm_[12f]\b'),
    ('unembedding', r'\bunembed\b'),  # Before wte: tied, it is wte's too.
    ('embedding', r'\bwte\b|\bwpe\b'),
    ('bigram table', r'\bbigram\b'),
    ('loss', r'\bloss\b'),
    ('optimizer (gradient RMS, AdamW)', r'\boptimizer\b'),
    ('residual adds', r'\bblock_\d+/add(_any)?$'),
)


def parts_of_ops(hlo_text):
  """{op name: part} of every op in a compiled module's text: a collective
  outside the top-k is the gradients' all-reduce; any other op goes to the
  first of PARTS whose pattern its name stack matches, else to 'other'."""
  out = {}
  for name, rest in re.findall(r'^\s*(?:ROOT )?%(\S+) = (.*)$', hlo_text,
                               re.M):
    stack = re.search(r'metadata=\{op_name="([^"]*)"', rest)
    stack = stack.group(1) if stack else ''
    part = next((p for p, pattern in PARTS if re.search(pattern, stack)),
                'other')
    if part != PARTS[0][0] and name.startswith(
        ('all-reduce', 'all-gather', 'reduce-scatter')):
      part = 'gradient all-reduce'
    out[name] = part
  return out


def _busy_ns(spans):
  """Nanoseconds covered by at least one of spans (start_ns, end_ns)."""
  total, reached = 0, None
  for start, end in sorted(spans):
    if reached is None or start > reached:
      total, reached = total + end - start, end
    elif end > reached:
      total, reached = total + end - reached, end
  return total


def profile_jax(config, steps):
  _, jitted, holder, tokens = run.project_step(config)
  compiled = jitted.lower(holder[0], tokens).compile()

  def step():
    holder[0], _ = compiled(holder[0], tokens)
    jax.block_until_ready(holder[0])

  for _ in range(3):
    step()
  print(f'step: {_wall_ms(step, steps):.0f} ms wall, on '
        f'{len(jax.devices())} device(s)')
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    traced_ms = _wall_ms(step, steps)
    jax.profiler.stop_trace()
    trace, = glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True)
    data = jax.profiler.ProfileData.from_file(trace)
  lines = [line for plane in data.planes for line in plane.lines
           if plane.name.startswith('/host:CPU')
           and line.name.startswith('tf_XLA')]
  events = [(e.start_ns, e.duration_ns, e.name, line.name)
            for line in lines for e in line.events
            if not e.name.startswith('ThunkExecutor')]  # Spans, not ops.
  by_thread = collections.defaultdict(list)
  op_spans = _op_spans(events)
  for start, end, name, thread in op_spans:
    by_thread[thread].append((start, end, name))
  by_op, busy = collections.Counter(), collections.Counter()
  for thread, spans in by_thread.items():
    for name, ns in _self_times(spans):
      by_op[name] += ns / 1e6 / steps
      busy[thread] += ns / 1e6 / steps
  print(f'busy ms per step, by thread, of {traced_ms:.0f} ms traced:',
        ', '.join(f'{ms:.0f}' for ms in busy.values()))
  by_kind = collections.Counter()
  for name, ms in by_op.items():
    by_kind[re.sub(r'\.\d+$', '', name)] += ms  # ynn_fusion.12 -> ynn_fusion
  total = sum(by_kind.values())
  print('\n| op kind | ms per step | share |\n|---|---:|---:|')
  for kind, ms in by_kind.most_common(15):
    print(f'| {kind} | {ms:.1f} | {100 * ms / total:.1f}% |')
  part_of = parts_of_ops(compiled.as_text())
  by_part = collections.Counter()
  for name, ms in by_op.items():
    by_part[part_of.get(name, 'waiting for the other device'
                        if name.startswith(('Wait', 'Rendezvous'))
                        else 'XLA runtime (launch, outputs)')] += ms
  print('\n| part of the step | ms per step | share |\n|---|---:|---:|')
  for part, ms in by_part.most_common():
    print(f'| {part} | {ms:.1f} | {100 * ms / total:.1f}% |')
  idle_ms = traced_ms - _busy_ns([s[:2] for s in op_spans]) / 1e6 / steps
  print(f'\nno XLA op running (the host: Python, dispatch, the step\'s '
        f'end): {idle_ms:.1f} of {traced_ms:.0f} ms per step')


def main():
  provenance.refuse_flags_of_run('step_profile.py',
                                 ('quick', 'out', 'baseline'))
  if _STEP.value == 'torch' and flags.FLAGS['num_cpu_devices'].present:
    # The torch peer runs on the CPU as its user runs it: not ignored.
    raise ValueError('--num_cpu_devices splits the JAX steps; --step=torch '
                     'does not read it')
  cli.keep_freed_memory()
  jax.config.update('jax_num_cpu_devices', flags.FLAGS.num_cpu_devices)
  # The compile cache's key leaves out the ops' name stacks: a program it
  # holds would name its parts by the scopes of the code that compiled it.
  jax.config.update('jax_enable_compilation_cache', False)
  if _STEP.value == 'torch':
    profile_torch(_STEPS.value)
    return
  if _STEP.value in ('gpt2', 'paper'):
    config = run.project_config(peers.Shape(), _STEP.value, 'none')
  else:
    config = {'sparse_small': sparse_small,
              'dense_small': dense_small}[_STEP.value].get_config()
  provenance.refuse_batch_split(flags.FLAGS.num_cpu_devices,
                                [config.batch_size])
  profile_jax(config, _STEPS.value)


if __name__ == '__main__':
  cli.run(main, cli.USER_ERRORS + (ImportError,))  # No torch: one line.
