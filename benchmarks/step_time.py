r"""Train-step time of one model in the three sparsity modes, in one process.

  python benchmarks/step_time.py [--arch=paper|gpt2 --d_model=256
      --num_layers=4 --seq_len=256 --batch_size=16 --steps=20]

Same shapes, data and optimizer; modes are timed round-robin so that machine
noise hits them alike. Also times the top-k of the model's sparse tensors
alone (the project's radix select vs lax.top_k vs a full sort) and the
matmul peak that MFU is measured against. Writes
benchmarks/out/step_time_ARCH.json and .md.
"""

import functools
import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparse_gpt2 import defaults  # pylint: disable=g-import-not-at-top
from sparse_gpt2 import metrics
from sparse_gpt2 import optim
from sparse_gpt2 import sparsity
from sparse_gpt2 import train

_D = flags.DEFINE_integer('d_model', 256, 'Width.')
_L = flags.DEFINE_integer('num_layers', 4, 'Layers.')
_T = flags.DEFINE_integer('seq_len', 256, 'Tokens per sequence.')
_B = flags.DEFINE_integer('batch_size', 16, 'Sequences per step.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per mode.')
_ARCH = flags.DEFINE_enum(
    'arch', 'paper', ['paper', 'gpt2'], "'paper': d_head 16, untied, RMSNorm, "
    "bigram table, sinks; 'gpt2': plain GPT-2 (d_head 64, tied, positions).")
_OUT = flags.DEFINE_string('out', 'benchmarks/out', 'Output directory.')
MODES = ('none', 'static', 'topk')


def _config(mode):
  config = defaults.base()
  if _ARCH.value == 'paper':
    config = defaults.paper_architecture(config)
  config.seq_len, config.batch_size, config.train_steps = (
      _T.value, _B.value, 1000)
  m = config.model
  m.num_layers, m.d_model = _L.value, _D.value
  m.d_head = 16 if _ARCH.value == 'paper' else 64
  m.num_heads = _D.value // m.d_head
  m.d_mlp, m.max_len, m.vocab_size = 4 * _D.value, _T.value, 2048
  config.sparsity.mode = mode
  config.sparsity.density = 1.0 if mode == 'none' else 0.1
  return config


def _timed(fn, *args, repeats=5):
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / repeats


def main(argv):
  del argv
  tokens = jax.random.randint(jax.random.key(0), (_B.value, _T.value + 1), 0,
                              2048)
  steps, states = {}, {}
  for mode in MODES:
    config = _config(mode)
    model = train.make_model(config)
    tx = optim.make(config, config.train_steps)
    states[mode] = jax.jit(functools.partial(
        train.init_state, config, model, tx))(jax.random.key(0), None)
    steps[mode] = jax.jit(functools.partial(
        train.train_step, model=model, tx=tx, config=config),
                          donate_argnums=0)
    states[mode], _ = steps[mode](states[mode], tokens)  # Compile.
  times = {mode: [] for mode in MODES}
  for _ in range(_STEPS.value):
    for mode in MODES:
      start = time.perf_counter()
      states[mode], out = steps[mode](states[mode], tokens)
      jax.block_until_ready(out)
      times[mode].append(time.perf_counter() - start)
  median = {mode: float(np.median(t)) for mode, t in times.items()}

  params = sparsity.flat(states['topk'].params)
  sparse = {p: params[p] for p in sparsity.flat(states['topk'].masks)}
  ks = {p: int(round(0.1 * v.size)) for p, v in sparse.items()}
  radix = jax.jit(lambda s: sparsity.topk_masks(s, ks, {p: 4 for p in s}))
  lax_topk = jax.jit(lambda s: {p: jax.lax.top_k(jnp.abs(v).ravel(), ks[p])[1]
                                for p, v in s.items()})
  full_sort = jax.jit(lambda s: {p: jnp.argsort(-jnp.abs(v).ravel())
                                 for p, v in s.items()})
  topk_s = {name: _timed(fn, sparse) for name, fn in
            (('radix_select', radix), ('lax_top_k', lax_topk),
             ('argsort', full_sort))}

  config = _config('none')
  peak = metrics.measure_peak_flops()
  flops = metrics.flops_per_token(config.model, config.seq_len)
  tokens_per_step = _B.value * _T.value
  result = {
      'shape': dict(arch=_ARCH.value, d_model=_D.value, num_layers=_L.value,
                    seq_len=_T.value,
                    batch_size=_B.value, sparse_weights=sum(
                        v.size for v in sparse.values())),
      'device': str(jax.devices()[0].device_kind),
      'step_s': median,
      'tokens_per_s': {m: tokens_per_step / s for m, s in median.items()},
      'ratio_to_dense': {m: median[m] / median['none'] for m in MODES},
      'mfu': {m: tokens_per_step / s * flops / peak
              for m, s in median.items()},
      'matmul_peak_flops': peak,
      'topk_of_all_sparse_tensors_s': topk_s,
  }
  os.makedirs(_OUT.value, exist_ok=True)
  name = f'step_time_{_ARCH.value}'
  with open(os.path.join(_OUT.value, name + '.json'), 'w') as f:
    json.dump(result, f, indent=2)
  lines = ['| mode | step (ms) | tokens/s | vs dense | MFU |',
           '|---|---|---|---|---|']
  for m in MODES:
    lines.append(f"| {m} | {1e3 * median[m]:.0f} | "
                 f"{result['tokens_per_s'][m]:,.0f} | "
                 f"{result['ratio_to_dense'][m]:.3f} | "
                 f"{100 * result['mfu'][m]:.1f}% |")
  lines.append('')
  lines.append(f'Matmul peak: {peak / 1e9:.0f} GFLOP/s. Top-k of all '
               f"{result['shape']['sparse_weights']:,} sparse weights: " +
               ', '.join(f'{k} {1e3 * v:.1f} ms' for k, v in topk_s.items()))
  text = '\n'.join(lines)
  with open(os.path.join(_OUT.value, name + '.md'), 'w') as f:
    f.write(text + '\n')
  print(text)


if __name__ == '__main__':
  app.run(main)
