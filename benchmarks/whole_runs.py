r"""The small twins trained whole, this checkout against an older commit, on
the same machine one after the other: issue 8's measure itself ("the same
validation loss in at most half the wall time"), which `run.py`'s twins
section only estimates from a few steps of each, timed in turns in worker
processes (there the old `sparse_small` step read 611-832 ms in two runs
minutes apart, against 540 ms alone and 553 ms a step of its whole run).

  python benchmarks/whole_runs.py     # ~30 min on 2 cores: benchmarks/out/whole_runs.{json,md}
  python benchmarks/whole_runs.py --configs=tiny --set=config.train_steps=10

Each run is `python -m sparse_gpt2.main --config=configs/NAME.py` as a user
runs it, in a fresh workdir, with an empty compile cache (both versions
compile, as on a first run; the baseline keeps no programs anyway, and
the new one compiles its steps in a child process and loads them); the
baseline's tree is unpacked from git as in `run.py`. Per config a run of no
steps first builds the corpus both read, untimed, then the old run goes,
then the new. Read: each run's process's wall time, which the
ratio compares (the issue's measure: everything a user waits for), its log's
"Done" time (the training loop, evaluations and checkpoints; the old run's
compile too, where the new one compiles before the loop) and the validation
losses of its metrics.jsonl. Every config is checked to exist in both
trees before the first run, and the results are written after each config,
so that a run that fails (one line: its last) keeps the configs before it.
"""

import os
import re
import subprocess
import sys
import tempfile
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import provenance  # pylint: disable=g-import-not-at-top

ROOT = provenance.ROOT
sys.path.insert(0, ROOT)
from sparse_gpt2 import cli  # pylint: disable=g-import-not-at-top
from sparse_gpt2.circuits import runs  # pylint: disable=g-import-not-at-top

_CONFIGS = flags.DEFINE_list('configs', ['sparse_small', 'dense_small'],
                             'Configs (configs/NAME.py) trained by both.')
_BASELINE = flags.DEFINE_string('baseline', 'c25ae90',
                                'The older commit: its code and configs.')
_SET = flags.DEFINE_multi_string(
    'set', [], 'A config override for both runs, as `main` takes it: '
    '--set=config.train_steps=200 passes --config.train_steps=200.')
_OUT = flags.DEFINE_string('out', os.path.join(ROOT, 'benchmarks', 'out'),
                           'Where whole_runs.json and whole_runs.md go.')


def _where(code_dir):
  """A code tree as an error names it."""
  return 'the checkout' if code_dir == ROOT else f'commit {_BASELINE.value}'


def _main(code_dir, config, workdir, *flags_):
  """(wall seconds, stderr) of `python -m sparse_gpt2.main` on `config` by
  the code in `code_dir`, with an empty compile cache and --set's
  overrides, then `flags_`."""
  with tempfile.TemporaryDirectory() as cache:
    # `code_dir` first on the path by name: `-m` puts the cwd there only
    # where PYTHONSAFEPATH is unset, and a PYTHONPATH naming the checkout
    # then ran the checkout's code as the baseline's.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache,
               PYTHONPATH=os.pathsep.join(filter(None, (
                   code_dir, os.environ.get('PYTHONPATH')))))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, '-m', 'sparse_gpt2.main',
         f'--config=configs/{config}.py', f'--workdir={workdir}',
         *(f'--{s}' for s in _SET.value), *flags_],
        cwd=code_dir, env=env, capture_output=True, text=True)
    wall_s = time.perf_counter() - start
  if proc.returncode:  # A user error: a --set this version rejects, say.
    raise ValueError(f'{config} at {_where(code_dir)} failed (exit '
                     f'{proc.returncode}): {provenance.last_line(proc.stderr)}')
  return wall_s, proc.stderr


def prepare_corpus(config, workdir):
  """Builds the corpus and tokenizer of `config` untimed, by a run of no
  steps: both versions read them from one cache, which the first timed
  run, the old one, would otherwise fill on a fresh machine (~40 s)."""
  _main(ROOT, config, workdir, '--config.train_steps=0')


def train(code_dir, config, workdir):
  """{'done_s', 'wall_s', 'val_loss': {step: loss}} of one whole run of
  `config` by the code in `code_dir`."""
  wall_s, stderr = _main(code_dir, config, workdir)
  done = re.search(r'Done: \d+ steps in ([0-9.]+) s', stderr)
  if not done:
    raise ValueError(f'{config} at {_where(code_dir)} logged no "Done": '
                     f'{provenance.last_line(stderr)}')
  return {'done_s': float(done.group(1)), 'wall_s': wall_s,
          'val_loss': runs.val_losses(workdir)}


def to_markdown(result):
  lines = [f"Measured {result['date']} on {result['machine']}: whole runs "
           f"of this checkout (`{result['commit']}`) against commit "
           f"`{result['baseline']}`, one after the other "
           f"(`{result['command']}`).", '',
           '| config | old run (s) | new run (s) | old / new '
           '| "Done", old / new (s) | old final val loss '
           '| new final val loss |',
           '|---|---:|---:|---:|---:|---:|---:|']
  for config, r in result['results'].items():
    old_loss, new_loss = (_final_loss(r[v]['val_loss']) for v in ('old', 'new'))
    lines.append(f"| {config} | {r['old']['wall_s']:.1f} | "
                 f"{r['new']['wall_s']:.1f} | **{r['speedup']:.2f}x** | "
                 f"{r['old']['done_s']:.1f} / {r['new']['done_s']:.1f} | "
                 f'{old_loss} | {new_loss} |')
  return '\n'.join(lines) + '\n'


def _final_loss(val_loss):
  """The last evaluation's loss; '-' where a run evaluated nothing (no
  steps: `max` of no evaluation ended the benchmark after its runs, their
  times unwritten)."""
  return f'{val_loss[max(val_loss, key=int)]:.4f}' if val_loss else '-'


def check_configs(configs, code_dirs):
  """Refuses, before the first run, a config missing from one of the trees:
  found by `main` only after the configs before it had trained."""
  if not configs:
    raise ValueError('--configs is empty')
  # Else '--configs=,' read "configs/.py ... not at the checkout", and a
  # config given twice trained twice for one result.
  if '' in configs:
    raise ValueError('--configs has an empty name')
  twice = sorted({c for c in configs if configs.count(c) > 1})
  if twice:
    raise ValueError(f"--configs names {', '.join(twice)} more than once")
  for code_dir in code_dirs:
    missing = [c for c in configs if not os.path.isfile(
        os.path.join(code_dir, 'configs', f'{c}.py'))]
    if missing:
      raise ValueError('--configs: ' + ', '.join(
          f'configs/{c}.py' for c in missing) + f' not at {_where(code_dir)}')


def main():
  provenance.prepare_out(_OUT.value, 'whole_runs')
  result = {'date': time.strftime('%Y-%m-%d'),
            'machine': provenance.machine(), 'commit': provenance.commit(),
            'command': provenance.command(),
            'baseline': _BASELINE.value,
            'overrides': _SET.value, 'results': {}}
  with tempfile.TemporaryDirectory() as scratch:
    old_dir = os.path.join(scratch, 'old')
    provenance.unpack(_BASELINE.value, old_dir)  # ValueError: no commit.
    check_configs(_CONFIGS.value, (ROOT, old_dir))
    for config in _CONFIGS.value:
      prepare_corpus(config, os.path.join(scratch, f'corpus_{config}'))
      r = {version: train(code_dir, config,
                          os.path.join(scratch, f'{version}_{config}'))
           for version, code_dir in (('old', old_dir), ('new', ROOT))}
      r['speedup'] = r['old']['wall_s'] / r['new']['wall_s']
      result['results'][config] = r
      print(f"{config}: old {r['old']['wall_s']:.1f} s, new "
            f"{r['new']['wall_s']:.1f} s, {r['speedup']:.2f}x", flush=True)
      # Each config written as it ends: a later one that fails keeps it.
      provenance.write(_OUT.value, 'whole_runs', result, to_markdown(result))


if __name__ == '__main__':
  cli.run(main)
