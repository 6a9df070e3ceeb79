"""What a run records: metrics.jsonl, TensorBoard events, a console line,
and the FLOP accounting behind MFU."""

import errno
import json
import logging as std_logging
import math
import os
import sys
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from sparse_gpt2 import model as model_lib
from sparse_gpt2 import workdir as workdir_lib

# Dense bf16 peak FLOP/s of one device, from the vendors' datasheets, by
# `device_kind` (first match wins, so longer names come first). MFU is
# conventionally quoted against this peak whatever dtype a run uses.
# jax names one chip more than one way ('TPU v5 lite' and 'TPU v5e'), and a
# variant's name holds its family's ('TPU v4 lite', 'H100 NVL', 'GB200').
DATASHEET_PEAKS = (
    ('TPU v6 lite', 918e12),   # v6e
    ('TPU v6e', 918e12),
    ('TPU v5 lite', 197e12),   # v5e
    ('TPU v5e', 197e12),
    ('TPU v5', 459e12),        # v5p
    ('TPU v4 lite', 138e12),   # v4i
    ('TPU v4', 275e12),
    ('H100 PCIe', 756e12),
    ('H100 NVL', 835e12),
    ('H100', 989e12),          # SXM
    ('H200 NVL', 835e12),
    ('H200', 989e12),          # Also GH200.
    ('GB200', 2500e12),
    ('B200', 2250e12),
    ('A100', 312e12),
)


# The side of the matmul that times an accelerator missing from
# DATASHEET_PEAKS, as benchmarks/gpu.sh times one. At the CPU's 2048, 17
# GFLOP, an H100-class chip computes for about 20 us, less than a jitted
# call's dispatch and sync take (~30 us): the reading would be under half
# the chip's peak, and the MFU over twice the real one. 8192^3 runs ~1.5 ms
# there, 128 MiB an operand in bf16.
ACCELERATOR_MATMUL_N = 8192


def flops_per_token(model_config, seq_len):
  """Training FLOPs per token of the dense computation, as MaxText counts
  them (`calculate_tflops_training_per_device`): 6 per weight of every
  matmul, plus attention's scores and mixing over the causal half of the
  T x T square, 6 x T x d_attn per layer (PaLM's appendix counts the whole
  square, twice that; the model computes about 5/8 of it, in query blocks).

  A sparse model is charged the same: unstructured sparsity does not make
  dense kernels cheaper, so its MFU says how well the hardware is used.
  """
  m = model_config
  d_head, d_mlp = model_lib.derived_sizes(m)
  d_attn = m.num_heads * d_head
  per_layer = 4 * m.d_model * d_attn + 2 * m.d_model * d_mlp
  matmul = m.num_layers * per_layer + m.d_model * m.vocab_size
  causal_attention = m.num_layers * seq_len * d_attn
  return 6 * matmul + 6 * causal_attention


def peak_flops(dtype='float32', fastest_yet=0.0, repeats=5):
  """The MFU denominator, FLOP/s of all devices together: a known
  accelerator's datasheet peak times the device count. A CPU has no useful
  datasheet number (and fake CPU devices share its cores), so there a timed
  matmul is the ceiling, the fastest of `repeats` and of `fastest_yet` (an
  earlier reading): a run times it again at every evaluation, so that a
  busy moment when it started cannot inflate all its MFUs (one run on a
  shared machine logged 80-106% against a start that read half the
  rate). An accelerator missing from DATASHEET_PEAKS is timed the same way
  per device, with a warning, on a matmul of ACCELERATOR_MATMUL_N^3."""
  device = jax.devices()[0]
  if device.platform == 'cpu':
    return max(fastest_yet, measure_peak_flops(dtype, repeats=repeats))
  per_device = next((peak for kind, peak in DATASHEET_PEAKS
                     if kind in device.device_kind), None)
  if per_device is None:
    if not fastest_yet:
      logging.warning('No datasheet peak for %r; MFU is against a timed '
                      'matmul.', device.device_kind)
    per_device = measure_peak_flops(dtype, n=ACCELERATOR_MATMUL_N,
                                    repeats=repeats)
  return max(fastest_yet, per_device * jax.device_count())


# Compiled at the first reading, so that a later one times only the matmul.
_square = jax.jit(lambda a: a @ a)


def measure_peak_flops(dtype='float32', n=2048, repeats=5):
  """FLOP/s of one n^3 matmul on this process's first device: the
  hardware's real ceiling where no datasheet number applies. The fastest of
  `repeats`: a ceiling, which a moment of load on a shared machine would
  lower (and so inflate the MFU divided by it). A process's first reading
  also compiles the matmul, so it takes several."""
  # On a mesh of its own: under the run's mesh (`jax.set_mesh`) the matmul
  # is replicated, every device doing all of it (half the rate on 2 CPUs).
  with jax.set_mesh(jax.sharding.Mesh(jax.local_devices()[:1], ('one',))):
    x = jnp.ones((n, n), dtype)
    fastest = math.inf
    for _ in range(repeats):
      start = time.perf_counter()
      _square(x).block_until_ready()
      fastest = min(fastest, time.perf_counter() - start)
  return 2 * n**3 / fastest


def peak_memory_bytes():
  """The most memory any of this process's devices has held since it
  started, where the device keeps count (GPU, TPU): what decides whether a
  config fits a chip, read off the real run rather than a plan. None on
  the CPU, whose devices report no memory statistics."""
  peaks = [stats['peak_bytes_in_use'] for stats in
           (d.memory_stats() for d in jax.local_devices())
           if stats and 'peak_bytes_in_use' in stats]
  return max(peaks, default=None)


def _import_tensorboardx():
  """tensorboardX (TF-free event files), imported without torch.

  tensorboardX imports torch wherever torch is installed, only to accept
  torch tensors, which this project never logs: 2.7 s of CPU at the start of
  every run on a 2-core machine. So torch is hidden from that one import,
  unless the process already has it. Imported here, not at the top, so that
  only a process that writes a run's logs pays even the rest (0.4 s).
  """
  if 'torch' in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  sys.modules['torch'] = None  # Makes `import torch` raise ImportError.
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules['torch']
  return tensorboardX


_EVENTS_FLUSH_SECS = 1


def _await_a_new_event_file_name(logdir):
  """Waits, at most a second, until no event file in `logdir` is named by
  the current second. tensorboardX names its file by the second it opens
  in and the host, and opens it truncating: a resumed run's writer that
  opened in the same second as the one before emptied that one's file, and
  TensorBoard lost the steps before the resume. A later second also sorts
  the new file after the old ones, the order TensorBoard reads them in,
  which its purge marker needs."""
  while any(logdir.glob(f'events.out.tfevents.{int(time.time())}.*')):
    time.sleep(0.01)


class Writer:
  """Adds one JSON object per logged step to metrics.jsonl and mirrors
  scalars to TensorBoard; only process 0 writes.

  metrics.jsonl is rewritten whole (atomically) at each log, since object
  stores such as gs:// cannot append; a run logs hundreds of lines, not
  millions. A resumed run drops the lines past its checkpoint, which it is
  about to log again, and its event file starts with TensorBoard's purge
  marker at the step after the checkpoint, which hides the earlier files'
  events from there on (else TensorBoard would show those steps twice).

  tensorboardX writes events from a thread of its own, which flushes them
  to the file at most every `flush_secs`; its `flush()` does not wait for
  that thread. At its default 120 s, TensorBoard showed a log's scalars up
  to two minutes late, some of them a log later than others, and a killed
  run lost them. Flushed every second, they are on disk within a second of
  the log, for one wake-up a second of an idle thread.
  """

  def __init__(self, workdir, start_step):
    self._active = jax.process_index() == 0
    if self._active:
      self._file = workdir_lib.path(workdir) / workdir_lib.METRICS
      self._lines = [json.dumps(r) for r in workdir_lib.read_metrics(workdir)
                     if r['step'] <= start_step]
      _await_a_new_event_file_name(workdir_lib.path(workdir))
      self._tb = _import_tensorboardx().SummaryWriter(
          str(workdir_lib.path(workdir)), purge_step=start_step + 1,
          flush_secs=_EVENTS_FLUSH_SECS)

  def write(self, step, metrics):
    if not self._active:
      return
    metrics = {k: _plain(v) for k, v in metrics.items()}
    record = {'step': int(step), **metrics}
    if self._lines and json.loads(self._lines[-1])['step'] == step:
      # The step logged before it was evaluated (`train._evaluated`).
      record = {**json.loads(self._lines.pop()), **record}
    self._lines.append(json.dumps(record))
    workdir_lib.write_atomic(self._file, '\n'.join(self._lines) + '\n')
    for key, value in metrics.items():
      if isinstance(value, dict):
        for sub, v in value.items():
          self._tb.add_scalar(f'{key}/{sub}', v, step)
      else:
        self._tb.add_scalar(key, value, step)

  def close(self):
    if self._active:
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
            f"MFU {100 * metrics['mfu']:.1f}%"]
  if 'peak_memory_gib' in metrics:
    parts.append(f"peak mem {metrics['peak_memory_gib']:.1f} GiB")
  days, rest = divmod(int(eta_s), 86400)  # %H alone wraps at a day.
  parts += [f'ETA {f"{days}d " if days else ""}'
            f'{time.strftime("%H:%M:%S", time.gmtime(rest))}']
  logging.info(' | '.join(parts))


def quiet_library_logs():
  """Keeps the console to this project's lines: orbax and TFDS log every
  save and read at INFO, and a save that a full disk stopped at ERROR
  (`_not_a_save_the_machine_stopped`)."""
  absl_logger = std_logging.getLogger('absl')
  absl_logger.addFilter(
      lambda r: not ('/orbax/' in r.pathname and r.levelno < std_logging.WARNING
                     or '/tensorflow_datasets/' in r.pathname
                     and r.levelno < std_logging.ERROR))
  absl_logger.addFilter(_not_a_save_the_machine_stopped)
  std_logging.getLogger('jax._src.xla_bridge').setLevel(std_logging.WARNING)


# What the system says of a full disk, a quota, a read-only mount
# (`cli.FULL_OR_READ_ONLY`), in the errors TensorStore raises.
_FULL_OR_READ_ONLY = tuple(os.strerror(n) for n in (errno.ENOSPC, errno.EDQUOT,
                                                    errno.EROFS))


def _not_a_save_the_machine_stopped(record):
  """False for orbax's logs of a checkpoint save that a full disk (a quota,
  a read-only mount) stopped in its threads: four, each with the error's
  traceback (320 lines for the tiny config), before the run raises that
  error at its next save or as it closes the manager, which `cli.run` says
  in one line."""
  error = record.exc_info[1] if record.exc_info else None
  return not ('/orbax/' in record.pathname and error is not None
              and any(words in str(error) for words in _FULL_OR_READ_ONLY))
