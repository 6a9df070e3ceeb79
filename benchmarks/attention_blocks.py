r"""How many causal query blocks pay at each sequence length, for
`model._query_blocks`.

  python benchmarks/attention_blocks.py --batch=32 --heads=16

Times `model.softmax_attention`'s forward and backward (d_head 16, the
paper's) with the queries cut into 1, 2 and 4 blocks, at each of
`--lengths`, the splits in turns, and prints the median ms of each as a
markdown table. The circuit pruning runs prompts of 6-24 tokens, training
128; the table says where blocks start to gain.
"""

import os
import statistics
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparse_gpt2 import cli  # pylint: disable=g-import-not-at-top
from sparse_gpt2 import model  # pylint: disable=g-import-not-at-top

_BATCH = flags.DEFINE_integer('batch', 32, 'Sequences.', lower_bound=1)
_HEADS = flags.DEFINE_integer('heads', 16, 'Heads of 16 dimensions.',
                              lower_bound=1)
_LENGTHS = flags.DEFINE_list('lengths', '8,16,24,32,48,64,96,128',
                             'Sequence lengths.')
# Checked while parsing, before the first length is timed: else a bad
# length ended the table, the lengths before it timed, on an int() or jax
# error (a negative one on several lines), and --lengths= printed an empty
# table; --batch=0 timed empty arrays.
flags.register_validator(
    'lengths', lambda v: bool(v) and all(s.isdigit() and int(s) for s in v),
    message='one or more positive integers, comma-separated')
_BLOCKS = (1, 2, 4)
_ROUNDS, _CALLS = 7, 20


def _compiled(n, q, k, v, d_out, sink):
  """Forward and backward with n query blocks of any length, compiled
  (`model._query_blocks` is read while tracing, so each n is its own
  program)."""
  chosen = model._QUERY_BLOCKS, model._MIN_BLOCK_QUERIES  # pylint: disable=protected-access
  model._QUERY_BLOCKS, model._MIN_BLOCK_QUERIES = n, 1  # pylint: disable=protected-access
  try:
    f = jax.jit(lambda q, k, v: jax.vjp(
        lambda *a: model.softmax_attention(*a, sink), q, k, v)[1](d_out))
    jax.block_until_ready(f(q, k, v))
  finally:
    model._QUERY_BLOCKS, model._MIN_BLOCK_QUERIES = chosen  # pylint: disable=protected-access
  return f


def main():
  print('| T | ' + ' | '.join(f'{n} block{"s" * (n > 1)} (ms)'
                               for n in _BLOCKS) + ' | chosen |')
  print('|---:|' + '---:|' * (len(_BLOCKS) + 1))
  for t in map(int, _LENGTHS.value):
    shape = (_BATCH.value, t, _HEADS.value, 16)
    q, k, v, d_out = (jax.random.normal(key, shape) for key in
                      jax.random.split(jax.random.key(0), 4))
    sink = jnp.zeros((_HEADS.value,))
    steps = {n: _compiled(n, q, k, v, d_out, sink) for n in _BLOCKS}
    times = {n: [] for n in _BLOCKS}
    for _ in range(_ROUNDS):
      for n, f in steps.items():
        start = time.perf_counter()
        for _ in range(_CALLS):
          jax.block_until_ready(f(q, k, v))
        times[n].append(1e3 * (time.perf_counter() - start) / _CALLS)
    print(f'| {t} | ' + ' | '.join(f'{statistics.median(times[n]):.2f}'
                                   for n in _BLOCKS)
          + f' | {len(model._query_blocks(t))} |', flush=True)  # pylint: disable=protected-access


if __name__ == '__main__':
  cli.run(main)
