r"""The speed suite: every number of the README's speed section, in one run.

  python benchmarks/run.py [--quick] [--out=benchmarks/out] [--baseline=COMMIT]

Sections (each a table in run.md, all of them in run.json):
  peers     the plain GPT-2 shape trained by this project (dense), by Hugging
            Face `transformers` on CPU PyTorch, and by a textbook Flax +
            optax GPT-2 (`peers.py`); ratios against the PyTorch peer.
  modes     one model in the 'none', 'static' and 'topk' modes, and the
            top-k reprojection's own share of a topk step (the top-k
            alone timed in the same rounds as the steps).
            With each, the per-device memory of the compiled step
            (arguments, outputs, the outputs written over the donated
            arguments, temporaries), dense against topk: what masks and
            the top-k cost against the fp32 parameters.
  sizes     widths 128, 256 and 512, plain GPT-2 and the paper's architecture
            (d_head 16, RMSNorm, bigram table, attention sinks, untied).
  twins     sparse_small's and dense_small's step at the checkout against
            the same configs at --baseline (an older commit, unpacked with
            `git archive` and run in its own process; unpacked and checked
            before the first section, so that a commit missing, or one whose
            code lacks what `twin_worker.py` calls, is refused in one line
            before anything is measured): old/new, and
            each step's MFU (the same model's FLOPs, so the MFUs' ratio is
            about old/new; how near the matmul peak the new step runs
            bounds how much faster it could still get).

This project's steps run as `main` runs the small configs: the CPU split
into --num_cpu_devices (2), each taking half of every batch (one device left
two cores idle for much of a step). The peak a step's MFU is measured
against is one device's matmul, which uses every core.

Timing protocol: every section times its contenders in turns (a round = a
few steps of each), so that a busy moment hits them alike, and reports
medians; each contender steps untimed first (the twins' workers a round
right before their own rounds: they wait idle while the other config's
are timed). MFU counts attention as MaxText does (`metrics.flops_per_token`) and
divides by a matmul peak measured in the same round, right before the
contender's steps, so a machine that slows down cannot inflate it.
"""

import functools
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import provenance  # pylint: disable=g-import-not-at-top
ROOT = provenance.ROOT
sys.path.insert(0, ROOT)
import peers  # pylint: disable=g-import-not-at-top
import twin_worker  # pylint: disable=g-import-not-at-top
from sparse_gpt2 import cli  # pylint: disable=g-import-not-at-top
from sparse_gpt2 import defaults  # pylint: disable=g-import-not-at-top
from sparse_gpt2 import metrics  # pylint: disable=g-import-not-at-top
from sparse_gpt2 import optim  # pylint: disable=g-import-not-at-top
from sparse_gpt2 import sharding  # pylint: disable=g-import-not-at-top
from sparse_gpt2 import sparsity  # pylint: disable=g-import-not-at-top
from sparse_gpt2 import train  # pylint: disable=g-import-not-at-top

_QUICK = flags.DEFINE_bool('quick', False, "Tiny shapes, a smoke run: run.py's "
                           'whole suite in one round of two steps (~2 min on '
                           "2 cores), matmuls.py's products in seconds.")
_OUT = flags.DEFINE_string('out', os.path.join(ROOT, 'benchmarks', 'out'),
                           'Where run.json and run.md go.')
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    'num_cpu_devices', 2, "CPU devices this project's steps split each batch "
    "over, as `main` runs the small configs (`defaults.small_run`); the "
    'plain Flax peer runs on one, as its user would.', lower_bound=1)
_BASELINE = flags.DEFINE_string(
    'baseline', 'c25ae90', 'Commit whose step the twins section times against '
    "the checkout's ('' skips the section).")
MODES = ('none', 'static', 'topk')


def _settings():
  """(rounds, steps per round, the peers' shape, widths of `sizes`)."""
  if _QUICK.value:  # One head: `sizes` then reuses the other sections' steps;
    # one layer: a second adds nothing a smoke run checks, and half again to
    # the compile and build of each step (the modes' none and topk: 12.2 s
    # of CPU with one layer, 18.5 with two).
    return 1, 2, peers.Shape(256, 32, 1, 1, 32, 4), (32,)
  return 3, 2, peers.Shape(), (128, 256, 512)


def project_config(shape, arch, mode):
  """This project's config of `shape` in `arch` ('gpt2' | 'paper')."""
  config = defaults.base()
  if arch == 'paper':
    config = defaults.paper_architecture(config)
  config.seq_len, config.batch_size, config.train_steps = (
      shape.seq_len, shape.batch_size, 1000)
  m = config.model
  m.num_layers, m.d_model, m.vocab_size = (shape.num_layers, shape.d_model,
                                           shape.vocab_size)
  m.d_head = 16 if arch == 'paper' else shape.d_model // shape.num_heads
  m.num_heads = shape.d_model // m.d_head
  m.d_mlp, m.max_len = 4 * shape.d_model, shape.seq_len
  config.sparsity.mode = mode
  config.sparsity.density = 1.0 if mode == 'none' else 0.1
  # At its density from the first step: annealing from dense, the steps
  # timed (the first few of a run) would keep nearly every weight.
  config.sparsity.anneal_fraction = 0.0
  return config


def project_step(config):
  """(step() -> loss, the jitted step, [its state], its tokens), laid out
  on the CPU devices as `main` lays out a run."""
  jitted, state, tokens = twin_worker.make_data_parallel_step(
      config, train, optim, sharding)
  holder = [state]

  def step():
    holder[0], out = jitted(holder[0], tokens)
    jax.block_until_ready(holder[0])  # The whole update, not only the loss.
    return float(out['loss'])

  return step, jitted, holder, tokens


@functools.cache
def shared_step(shape, arch, mode):
  """`project_step` of `project_config(shape, arch, mode)`, built once per
  run: the peers, modes and sizes sections share the plain GPT-2 shape's
  dense step, so it is compiled once, not three times."""
  return project_step(project_config(shape, arch, mode))


def interleaved(contenders, rounds, steps, warmup=1):
  """{name: {'step_s': median, 'peak_flops': median, 'mfu': median}} of
  contenders {name: (run, flops_per_step)} timed in turns: `run(n)` takes n
  steps and returns their times in seconds (`timed`, or a twin worker's
  `steps`), `warmup` of them untimed first."""
  times = {name: [] for name in contenders}
  mfus = {name: [] for name in contenders}
  peaks = {name: [] for name in contenders}
  for run, _ in contenders.values():
    run(warmup)  # Compile, allocate, warm the caches.
  for _ in range(rounds):
    for name, (run, flops) in contenders.items():
      peak = metrics.measure_peak_flops(n=1024, repeats=10)
      for elapsed in run(steps):
        times[name].append(elapsed)
        mfus[name].append(flops / elapsed / peak)
      peaks[name].append(peak)
  return {name: {'step_s': float(np.median(times[name])),
                 'peak_flops': float(np.median(peaks[name])),
                 'mfu': float(np.median(mfus[name]))} for name in contenders}


def timed(step):
  """`interleaved`'s run(n) of a step() that this process runs."""

  def run(n):
    elapsed = []
    for _ in range(n):
      start = time.perf_counter()
      step()
      elapsed.append(time.perf_counter() - start)
    return elapsed

  return run


def _flops_per_step(config):
  return (metrics.flops_per_token(config.model, config.seq_len)
          * config.batch_size * config.seq_len)


def _tokens(shape):
  return shape.batch_size * shape.seq_len


def peers_section(shape, rounds, steps):
  config = project_config(shape, 'gpt2', 'none')
  flops = _flops_per_step(config)
  contenders = {'sparse_gpt2 (dense)': (
                    timed(shared_step(shape, 'gpt2', 'none')[0]), flops),
                'plain Flax + optax': (timed(peers.flax_step(shape)), flops)}
  note = None
  try:
    contenders['PyTorch + transformers'] = (timed(peers.torch_step(shape)),
                                            flops)
  except ImportError as e:
    note = f'PyTorch peer skipped: {e}'
  result = interleaved(contenders, rounds, steps)
  torch_result = result.get('PyTorch + transformers')
  for r in result.values():
    r['tokens_per_s'] = _tokens(shape) / r['step_s']
    if torch_result:
      r['vs_pytorch'] = torch_result['step_s'] / r['step_s']
  return {'shape': vars(shape), 'results': result, 'note': note}


def modes_section(shape, arch, rounds, steps):
  made = {m: shared_step(shape, arch, m) for m in MODES}
  flops = _flops_per_step(project_config(shape, arch, 'none'))
  # The reprojection alone, as the step calls it: the exact top-k of every
  # sparse tensor, the per-neuron guarantee and the weights' shardings, on
  # the topk step's current weights; timed in the same rounds as the steps,
  # so that the share compares times of the same moments.
  sparsity_config = project_config(shape, arch, 'topk').sparsity
  holder = made['topk'][2]
  params = sparsity.flat(holder[0].params)
  sparse = {p: params[p] for p in sparsity.flat(holder[0].masks)}
  ks = {p: int(sparsity.num_kept(v.size, sparsity_config.density))
        for p, v in sparse.items()}
  js = {p: sparsity.guaranteed_per_neuron(v.shape, ks[p],
                                          sparsity_config.min_per_neuron)
        for p, v in sparse.items()}
  shardings = {p: v.sharding for p, v in sparse.items()}
  topk = jax.jit(lambda s: sparsity.topk_masks(s, ks, js, shardings))

  def topk_alone():  # The step donates its state: read the newest weights.
    params = sparsity.flat(holder[0].params)
    jax.block_until_ready(topk({p: params[p] for p in sparse}))

  result = interleaved({**{m: (timed(made[m][0]), flops) for m in MODES},
                        'top-k alone': (timed(topk_alone), 0)}, rounds, steps)
  topk_s = result.pop('top-k alone')['step_s']
  for m, r in result.items():
    r['tokens_per_s'] = _tokens(shape) / r['step_s']
    r['vs_dense'] = r['step_s'] / result['none']['step_s']
  return {'shape': vars(shape), 'arch': arch, 'results': result,
          'topk_s': topk_s,
          'topk_share_of_step': topk_s / result['topk']['step_s'],
          'memory': memory(made)}


def memory(made):
  """Bytes of the compiled step per device, dense and topk, of the
  `project_step`s of modes_section. A step holds its arguments, the outputs
  not written over a donated argument (in topk mode the new masks: the step
  reads none) and its temporaries."""
  out = {}
  for mode in ('none', 'topk'):
    _, jitted, holder, tokens = made[mode]
    analysis = jitted.lower(holder[0], tokens).compile().memory_analysis()
    params = sum(x.size * 4 for x in jax.tree.leaves(holder[0].params))
    out[mode] = {'arguments': analysis.argument_size_in_bytes,
                 'outputs': analysis.output_size_in_bytes,
                 'aliased': analysis.alias_size_in_bytes,
                 'temporaries': analysis.temp_size_in_bytes,
                 'fp32_params': params}
  total = lambda r: (r['arguments'] + r['outputs'] - r['aliased']
                     + r['temporaries'])
  return {'results': out,
          'sparse_extra_vs_params': (total(out['topk']) - total(out['none']))
                                    / out['none']['fp32_params']}


def sizes_section(base, widths, rounds, steps):
  rows = []
  for width in widths:
    shape = peers.Shape(base.vocab_size, width, base.num_layers,
                        max(1, width // 64), base.seq_len, base.batch_size)
    contenders = {}
    for arch in ('gpt2', 'paper'):
      config = project_config(shape, arch, 'none')
      contenders[arch] = (timed(shared_step(shape, arch, 'none')[0]),
                          _flops_per_step(config))
    for arch, r in interleaved(contenders, rounds, steps).items():
      rows.append({'d_model': width, 'arch': arch,
                   'tokens_per_s': _tokens(shape) / r['step_s'], **r})
  return {'shape': vars(base), 'results': rows}


TWIN_WORKER = os.path.join(ROOT, 'benchmarks', 'twin_worker.py')


def twin_configs():
  """The configs (paths inside a code tree) the twins section times."""
  return (('configs/tiny.py',) if _QUICK.value else
          ('configs/sparse_small.py', 'configs/dense_small.py'))


def prepare_baseline(baseline, old_dir):
  """Unpacks `baseline` into `old_dir` and checks, in seconds, that its code
  has what the twin workers call and its configs load: before the first
  section, not after minutes of measuring."""
  try:
    provenance.unpack(baseline, old_dir)
  except ValueError as e:  # Not a commit, or no git: the way round it too.
    raise ValueError(f'{e}; --baseline= skips the twins') from None
  check = subprocess.run(
      [sys.executable, TWIN_WORKER, '--check', old_dir,
       *(os.path.join(old_dir, name) for name in twin_configs())],
      capture_output=True, text=True)
  if check.returncode:
    raise ValueError(f'--baseline={baseline} cannot run the twins '
                     '(--baseline= skips them): '
                     + provenance.last_line(check.stderr))


class _Worker:
  """A `twin_worker.py` process on one code tree and config; it compiles
  while the caller goes on, until `wait_ready`."""

  def __init__(self, code_dir, config_file, label=None):
    self.label = label or code_dir  # Who it is, in an error.
    self.stderr = tempfile.TemporaryFile('w+')  # Its log, read on failure.
    self.proc = subprocess.Popen(
        [sys.executable, TWIN_WORKER, code_dir, config_file],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
        text=True)

  def _failed(self, what):
    """A ValueError in one line (`cli.run` prints it): the finished sections
    are lost either way, but not under a traceback."""
    code = self.proc.wait()
    self.stderr.seek(0)
    raise ValueError(f'the twin worker of {self.label} {what} (exit {code}): '
                     f'{provenance.last_line(self.stderr.read())}')

  def wait_ready(self):
    if self.proc.stdout.readline().strip() != 'ready':
      self._failed('failed to start')

  def steps(self, n):
    self.proc.stdin.write(f'{n}\n')
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      self._failed('exited')
    return json.loads(line)

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()
    self.stderr.close()


def twins_section(baseline, old_dir, rounds, steps):
  """Old/new step time of the twins' configs, old and new in turns (each
  in its own process; one waits while the other runs); `old_dir` holds
  `baseline`'s tree, as `prepare_baseline` left it."""
  # All compile at once (a compile leaves part of two cores idle: the
  # twins' two steps compiled in 21.5 s at once, 24.2 s one after the
  # other), and all are ready before any is timed; each then waits, idle,
  # for its turn.
  all_workers = {
      name: {'old': _Worker(old_dir, os.path.join(old_dir, name),
                            f'{name} at commit {baseline}'),
             'new': _Worker(ROOT, os.path.join(ROOT, name),
                            f'{name} at the checkout')}
      for name in twin_configs()}
  try:
    return _time_twins(baseline, all_workers, rounds, steps)
  finally:  # After a failure, none left compiling or waiting.
    for workers in all_workers.values():
      for w in workers.values():
        if w.proc.poll() is None:
          w.proc.kill()


def _time_twins(baseline, all_workers, rounds, steps):
  """`twins_section`'s result, of its started workers."""
  for workers in all_workers.values():
    for w in workers.values():
      w.wait_ready()
  out = {}
  for name, workers in all_workers.items():
    # One count of FLOPs for both: the twins' configs have trained the
    # same model and batch since the baseline (c25ae90).
    flops = _flops_per_step(
        twin_worker.load_config(os.path.join(ROOT, name)))
    # Idle since they compiled: a round untimed warms them again. Their
    # steps are timed in the workers, which answer with the times.
    r = interleaved({k: (w.steps, flops) for k, w in workers.items()},
                    rounds, steps, warmup=steps)
    for w in workers.values():
      w.close()
    out[name] = {'old_step_s': r['old']['step_s'],
                 'new_step_s': r['new']['step_s'],
                 'speedup': r['old']['step_s'] / r['new']['step_s'],
                 'old_mfu': r['old']['mfu'], 'new_mfu': r['new']['mfu']}
  return {'baseline': baseline, 'results': out}


def to_markdown(result):
  lines = [f"Measured {result['date']} on {result['machine']} at commit "
           f"`{result['commit']}` (`{result['command']}`); this project's "
           f"steps on {result['num_cpu_devices']} CPU device(s), each batch "
           "split over them (the twins' on their configs' devices).", '']
  p = result['peers']
  lines += [f"**Peers** (plain GPT-2: {_shape(p['shape'])}, fp32, AdamW)", '',
            '| trainer | step (ms) | tokens/s | vs PyTorch | MFU |',
            '|---|---:|---:|---:|---:|']
  for name, r in p['results'].items():
    vs = f"{r['vs_pytorch']:.2f}x" if 'vs_pytorch' in r else '-'
    lines.append(f"| {name} | {1e3 * r['step_s']:.0f} | "
                 f"{r['tokens_per_s']:,.0f} | {vs} | {100 * r['mfu']:.1f}% |")
  if p['note']:
    lines += ['', p['note']]
  for m in result['modes']:
    lines += ['', f"**Sparsity modes** ({m['arch']} architecture, "
                  f"{_shape(m['shape'])}, density 0.1)", '',
              '| mode | step (ms) | tokens/s | vs dense | MFU |',
              '|---|---:|---:|---:|---:|']
    for mode, r in m['results'].items():
      lines.append(f"| {mode} | {1e3 * r['step_s']:.0f} | "
                   f"{r['tokens_per_s']:,.0f} | {r['vs_dense']:.3f} | "
                   f"{100 * r['mfu']:.1f}% |")
    lines += ['', f"The top-k reprojection alone: {1e3 * m['topk_s']:.1f} ms, "
                  f"{100 * m['topk_share_of_step']:.1f}% of a topk step.", '',
              'Memory of the compiled step, MiB per device:', '',
              '| mode | arguments | outputs | aliased | temporaries '
              '| fp32 params |', '|---|---:|---:|---:|---:|---:|']
    mem = m['memory']
    for mode, r in mem['results'].items():
      lines.append(f"| {mode} | " + ' | '.join(
          f'{r[k] / 2**20:.2f}' for k in ('arguments', 'outputs', 'aliased',
                                           'temporaries', 'fp32_params'))
                   + ' |')
    lines += ['', 'topk holds (arguments + outputs - aliased + temporaries) '
                  f"{100 * mem['sparse_extra_vs_params']:.1f}% of the fp32 "
                  'parameters more than dense.']
  s = result['sizes']
  lines += ['', f"**Sizes** (dense, {_shape(s['shape'], width=False)})", '',
            '| d_model | architecture | step (ms) | tokens/s | MFU |',
            '|---:|---|---:|---:|---:|']
  for r in s['results']:
    lines.append(f"| {r['d_model']} | {r['arch']} | {1e3 * r['step_s']:.0f} "
                 f"| {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% |")
  t = result['twins']
  if 'results' in t:
    lines += ['', f"**Twins** against commit `{t['baseline']}`", '',
              '| config | old step (ms) | new step (ms) | old / new '
              '| old MFU | new MFU |', '|---|---:|---:|---:|---:|---:|']
    for name, r in t['results'].items():
      lines.append(f"| {name} | {1e3 * r['old_step_s']:.0f} | "
                   f"{1e3 * r['new_step_s']:.0f} | {r['speedup']:.2f}x | "
                   f"{100 * r['old_mfu']:.1f}% | {100 * r['new_mfu']:.1f}% |")
  else:
    lines += ['', t['note']]
  spent = result['seconds']
  lines += ['', 'Wall time, compiles included: ' + ', '.join(
      f'{name} {s:.0f} s' for name, s in spent.items())
            + f'; {sum(spent.values()):.0f} s in all.']
  return '\n'.join(lines) + '\n'


def _shape(shape, width=True):
  parts = [f"d {shape['d_model']}"] if width else []
  parts += [f"{shape['num_layers']} layers", f"{shape['seq_len']} tokens",
            f"batch {shape['batch_size']}", f"vocab {shape['vocab_size']}"]
  return ', '.join(parts)


def main():
  provenance.prepare_out(_OUT.value, 'run')
  # Set up as `main` sets up a long run (the peers get it alike; --quick as
  # a short one), compiled programs kept on disk included: a rerun loads its
  # ~20 programs instead of compiling them again (a loaded program is the
  # compiled one; nothing here times a compile). The twins' workers inherit
  # the directory.
  cli.start_jax(_NUM_CPU_DEVICES.value, train_steps=0 if _QUICK.value else
                cli.STEPS_TO_EARN_BACK_FREED_MEMORY)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir
  rounds, steps, shape, widths = _settings()
  small = peers.Shape(2048, 128, 4, 8, 128, 32)  # sparse_small's shape.
  if _QUICK.value:
    small = shape
  provenance.refuse_batch_split(_NUM_CPU_DEVICES.value,
                                (shape.batch_size, small.batch_size))
  with tempfile.TemporaryDirectory() as old_dir:
    if _BASELINE.value:
      prepare_baseline(_BASELINE.value, old_dir)
    result = measure(shape, small, widths, rounds, steps, old_dir)
  provenance.write(_OUT.value, 'run', result, to_markdown(result))


def measure(shape, small, widths, rounds, steps, old_dir):
  """Every section's result and the run's provenance: `main`'s measuring,
  once all its input is checked."""
  result = {
      'date': time.strftime('%Y-%m-%d'),
      'machine': provenance.machine(),
      'commit': provenance.commit(),
      'command': provenance.command(),
      'num_cpu_devices': _NUM_CPU_DEVICES.value,
      'quick': _QUICK.value,
      'seconds': {},  # Each section's wall time, compiles included.
  }
  sections = {
      'peers': lambda: peers_section(shape, rounds, steps),
      'modes': lambda: [modes_section(small, 'paper', rounds, steps)] + (
          [] if _QUICK.value else [modes_section(shape, 'gpt2', rounds,
                                                 steps)]),
      'sizes': lambda: sizes_section(shape, widths, rounds, steps),
      'twins': lambda: twins_section(_BASELINE.value, old_dir, rounds, steps)
               if _BASELINE.value else {'note': 'twins skipped (--baseline=)'},
  }
  for name, section in sections.items():
    start = time.perf_counter()
    result[name] = section()
    result['seconds'][name] = time.perf_counter() - start
  return result


if __name__ == '__main__':
  cli.run(main)
