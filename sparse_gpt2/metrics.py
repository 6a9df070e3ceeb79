"""What a run records: metrics.jsonl, TensorBoard events, a console line,
and the FLOP accounting behind MFU."""

import json
import logging as std_logging
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from tensorboardX import SummaryWriter  # TF-free event files.

from sparse_gpt2 import model as model_lib


def flops_per_token(model_config, seq_len):
  """Training FLOPs per token of the dense computation (6 per weight of every
  matmul, plus attention scores and mixing), as in the PaLM appendix.

  A sparse model is charged the same: unstructured sparsity does not make
  dense kernels cheaper, so its MFU says how well the hardware is used.
  """
  m = model_config
  d_head, d_mlp = model_lib.derived_sizes(m)
  d_attn = m.num_heads * d_head
  per_layer = 4 * m.d_model * d_attn + 2 * m.d_model * d_mlp
  matmul = m.num_layers * per_layer + m.d_model * m.vocab_size
  attention = m.num_layers * 2 * seq_len * d_attn
  return 6 * matmul + 6 * attention


def measure_peak_flops(dtype='float32', n=2048, repeats=5):
  """FLOP/s of one n^3 matmul on the first device: the MFU denominator when
  none is configured (the hardware's real ceiling, not a datasheet)."""
  x = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    f(x).block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - start)


class Writer:
  """Appends one JSON object per logged step and mirrors scalars to
  TensorBoard; only process 0 writes."""

  def __init__(self, workdir):
    self._active = jax.process_index() == 0
    if self._active:
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      self._tb = SummaryWriter(workdir)

  def write(self, step, metrics):
    if not self._active:
      return
    metrics = {k: _plain(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': int(step), **metrics}) + '\n')
    self._jsonl.flush()
    for key, value in metrics.items():
      if isinstance(value, dict):
        for sub, v in value.items():
          self._tb.add_scalar(f'{key}/{sub}', v, step)
      else:
        self._tb.add_scalar(key, value, step)
    self._tb.flush()

  def close(self):
    if self._active:
      self._jsonl.close()
      self._tb.close()


def _plain(value):
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  value = np.asarray(value)
  return value.item() if value.dtype.kind in 'fiub' else str(value)


def console_line(step, total, metrics, eta_s):
  parts = [f'step {step}/{total}', f"loss {metrics['loss']:.4f}"]
  if 'val_loss' in metrics:
    parts.append(f"val {metrics['val_loss']:.4f}")
  parts += [f"lr {metrics['lr']:.2e}", f"L0 {metrics['l0']:,}",
            f"{metrics['tokens_per_s']:,.0f} tok/s",
            f"MFU {100 * metrics['mfu']:.1f}%",
            f'ETA {time.strftime("%H:%M:%S", time.gmtime(eta_s))}']
  logging.info(' | '.join(parts))


def quiet_library_logs():
  """Keeps the console to this project's lines: orbax and TFDS log every
  save and read at INFO."""
  std_logging.getLogger('absl').addFilter(
      lambda r: not ('/orbax/' in r.pathname and r.levelno < std_logging.WARNING
                     or '/tensorflow_datasets/' in r.pathname
                     and r.levelno < std_logging.ERROR))
  std_logging.getLogger('jax._src.xla_bridge').setLevel(std_logging.WARNING)
