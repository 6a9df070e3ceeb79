r"""The plain GPT-2 step's weight matmuls alone, XLA:CPU against PyTorch.

  python benchmarks/matmuls.py           # ~1 min
  python benchmarks/matmuls.py --quick   # tiny shapes, seconds (in the tests)

What bounds this project's step against its PyTorch peer (`run.py`'s peers
section). At the peers' shape (`peers.Shape`) every weight's three matmuls
of a train step: the forward x @ W, the input's gradient dY @ W^T and the
kernel's gradient X^T dY, as this project's step runs them (`model.matmul`
and its gradient, on `run.py`'s --num_cpu_devices, each device its share of
the tokens, no collective), and as PyTorch runs the same products with
`torch.mm` on its intra-op threads (HF GPT-2's `Conv1D` takes its kernel's
gradient as X^T dY too). The two trainers' whole steps are timed in the
same rounds, so the table says, from one run, whether a step 1.3x faster
than PyTorch's leaves room for anything but matmuls. Each contender in
turns, medians. Attention's products are left out: PyTorch runs them in a
fused flash kernel.
"""

import os
import statistics
import sys
import time

from absl import flags
import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # pylint: disable=g-import-not-at-top
import provenance  # pylint: disable=g-import-not-at-top
import run  # pylint: disable=g-import-not-at-top
from sparse_gpt2 import cli  # pylint: disable=g-import-not-at-top
from sparse_gpt2 import model  # pylint: disable=g-import-not-at-top

# run.py's flags that this script reads, listed by its --help.
flags.declare_key_flag('quick')
flags.declare_key_flag('num_cpu_devices')

_TINY = peers.Shape(vocab_size=64, d_model=32, num_layers=1, num_heads=2,
                    seq_len=16, batch_size=4)
_KINDS = ('forward', 'input gradient', 'kernel gradient')


def weight_shapes(shape):
  """[I, O] of every weight matmul of a plain GPT-2 step: per layer query,
  key and value (stacked, as the project's block runs them), the attention
  output, the MLP's two; then the tied unembedding."""
  d = shape.d_model
  layer = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]
  return layer * shape.num_layers + [(d, shape.vocab_size)]


def _operands(shape, rng):
  """Per weight, x [N, I], W [I, O], dY [N, O]: each its own, so that XLA
  cannot share one product between layers."""
  n = shape.batch_size * shape.seq_len
  return [tuple(rng.standard_normal(s, np.float32) * 0.1
                for s in ((n, i), (i, o), (n, o)))
          for i, o in weight_shapes(shape)]


def jax_matmuls(operands):
  """{kind: fn() that runs every weight's product of that kind}, on the CPU
  devices as the step runs them: the tokens split over the devices, the
  weights replicated, the kernel gradients left as each device's part."""
  mesh = jax.make_mesh((len(jax.devices()),), ('data',))
  tokens = jax.NamedSharding(mesh, jax.P('data'))
  whole = jax.NamedSharding(mesh, jax.P())
  xs, ws, dys = ([jax.device_put(o[i], s) for o in operands]
                 for i, s in ((0, tokens), (1, whole), (2, tokens)))

  def grads(x, w, dy):
    return jax.vjp(model.matmul, x, w)[1](dy)

  per_device = {  # Each device's products; kernel gradients: its part.
      'forward': lambda x, w, dy: model.matmul(x, w),
      'input gradient': lambda x, w, dy: grads(x, w, dy)[0],
      'kernel gradient': lambda x, w, dy: grads(x, w, dy)[1][None],
  }
  fns = {}
  for kind, product in per_device.items():
    f = jax.jit(jax.shard_map(
        lambda xs, ws, dys, product=product: [
            product(*a) for a in zip(xs, ws, dys)],
        mesh=mesh, in_specs=(jax.P('data'), jax.P(), jax.P('data')),
        out_specs=jax.P('data'), check_vma=False))
    fns[kind] = lambda f=f: jax.block_until_ready(f(xs, ws, dys))
  return fns


def torch_matmuls(operands):
  """{kind: fn()}, the same products with `torch.mm`."""
  import torch  # pylint: disable=g-import-not-at-top
  ts = [tuple(map(torch.from_numpy, o)) for o in operands]
  return {
      'forward': lambda: [x @ w for x, w, _ in ts],
      'input gradient': lambda: [dy @ w.t() for _, w, dy in ts],
      'kernel gradient': lambda: [x.t() @ dy for x, _, dy in ts],
  }


def time_in_turns(contenders, rounds):
  """{name: median seconds} of contenders {name: fn()}, one call of each in
  turn per round, after one call each to compile and warm."""
  for fn in contenders.values():
    fn()
  times = {name: [] for name in contenders}
  for _ in range(rounds):
    for name, fn in contenders.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def main():
  provenance.refuse_flags_of_run('matmuls.py', ('out', 'baseline'))
  quick = flags.FLAGS.quick
  if not quick:
    cli.keep_freed_memory()
  jax.config.update('jax_num_cpu_devices', flags.FLAGS.num_cpu_devices)
  shape = _TINY if quick else peers.Shape()
  provenance.refuse_batch_split(flags.FLAGS.num_cpu_devices,
                                [shape.batch_size])
  operands = _operands(shape, np.random.default_rng(0))
  flops = 2 * shape.batch_size * shape.seq_len * sum(
      i * o for i, o in weight_shapes(shape))  # Of each kind.
  torch_step = peers.torch_step(shape)  # No torch: one line, before compiling.
  ours = run.project_step(run.project_config(shape, 'gpt2', 'none'))[0]
  contenders = {('jax', 'step'): ours, ('torch', 'step'): torch_step}
  for framework, fns in (('jax', jax_matmuls(operands)),
                         ('torch', torch_matmuls(operands))):
    for kind, fn in fns.items():
      contenders[(framework, kind)] = fn
  median = time_in_turns(contenders, 2 if quick else 7)
  ms = {key: 1e3 * s for key, s in median.items()}
  print(f'Weight matmuls of the plain GPT-2 step ({shape}), '
        f'{len(weight_shapes(shape))} weights, '
        f'{flops / 1e9:.2f} GFLOP of each kind; this project on '
        f'{len(jax.devices())} CPU device(s); medians of rounds in turns:\n')
  print('| | this project (XLA:CPU) | PyTorch | PyTorch / this project |')
  print('|---|---:|---:|---:|')
  for kind in _KINDS:
    print(f'| {kind} (ms, GFLOP/s) | {ms[("jax", kind)]:.1f}, '
          f'{flops / median[("jax", kind)] / 1e9:.0f} | '
          f'{ms[("torch", kind)]:.1f}, '
          f'{flops / median[("torch", kind)] / 1e9:.0f} | '
          f'{ms[("torch", kind)] / ms[("jax", kind)]:.2f} |')
  total = {f: sum(ms[(f, k)] for k in _KINDS) for f in ('jax', 'torch')}
  print(f'| all weight matmuls (ms) | {total["jax"]:.1f} | '
        f'{total["torch"]:.1f} | {total["torch"] / total["jax"]:.2f} |')
  print(f'| train step (ms) | {ms[("jax", "step")]:.1f} | '
        f'{ms[("torch", "step")]:.1f} | '
        f'{ms[("torch", "step")] / ms[("jax", "step")]:.2f} |')
  print(f'\nA step 1.3x PyTorch\'s: {ms[("torch", "step")] / 1.3:.1f} ms; '
        f'this project\'s weight matmuls alone: {total["jax"]:.1f} ms.')


if __name__ == '__main__':
  cli.run(main, cli.USER_ERRORS + (ImportError,))  # No torch: one line.
