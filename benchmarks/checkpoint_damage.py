r"""What a run makes of a damaged checkpoint: every file of a tiny run's
newest checkpoint damaged alone, in each of seven ways, and the run resumed
on it. Each case must fall back to the previous checkpoint, or restore
every value as saved (damage to a file the restore does not read); a
restore with other values, or a refusal ("not corrupt", which no rerun
fixes), is a defect.

  python benchmarks/checkpoint_damage.py    # ~8 min on 2 cores: benchmarks/out/checkpoint_damage.{json,md}
  python benchmarks/checkpoint_damage.py --ways=flip_byte --path_contains=/d/

The run is configs/tiny.py (`--config.*` overrides it, as in `main`; by
default on the standard library corpus), 20 steps with a checkpoint every
10; each case copies it, damages one file of checkpoint 20, calls
`train.train_and_evaluate` on the copy, as a rerun of `main` would, and
compares the state it returns with checkpoint 20 read before the damage.
An unknown or empty --ways is refused before the run trains, a
--path_contains that matches none of the checkpoint's files right after,
without a report.
"""

import collections
import os
import shutil
import sys
import tempfile
import time

from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import provenance  # pylint: disable=g-import-not-at-top

ROOT = provenance.ROOT
sys.path.insert(0, ROOT)
# pylint: disable=g-import-not-at-top
import jax
import numpy as np

from sparse_gpt2 import cli
from sparse_gpt2 import train
from sparse_gpt2 import workdir as workdir_lib
# pylint: enable=g-import-not-at-top


def _write(path, offset, data):
  with open(path, 'r+b') as f:
    f.seek(offset)
    f.write(data)


def _flip_middle_byte(path):
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    f.seek(size // 2)
    byte = f.read(1)
  if byte:
    _write(path, size // 2, bytes([byte[0] ^ 0xFF]))


# How storage damages a file: lost, never written, cut short by a crash,
# blocks left allocated but unwritten, a rotted byte, overwritten.
DAMAGES = {
    'delete': os.remove,
    'empty': lambda p: os.truncate(p, 0),
    'half': lambda p: os.truncate(p, os.path.getsize(p) // 2),
    'zeros_start': lambda p: _write(p, 0, bytes(min(64, os.path.getsize(p)))),
    'zeros_middle': lambda p: _write(
        p, os.path.getsize(p) // 2,
        bytes(min(64, os.path.getsize(p) - os.path.getsize(p) // 2))),
    'flip_byte': _flip_middle_byte,
    'garbage': lambda p: _write(p, 0, np.random.default_rng(0).integers(
        0, 256, os.path.getsize(p), dtype=np.uint8).tobytes()),
}

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(ROOT, 'configs', 'tiny.py'), 'The run damaged.')
_WAYS = flags.DEFINE_list('ways', list(DAMAGES), 'Damages to apply.')
_PATH_CONTAINS = flags.DEFINE_string(
    'path_contains', '', 'Only the checkpoint files whose path inside it '
    'contains this.')
_OUT = flags.DEFINE_string('out', os.path.join(ROOT, 'benchmarks', 'out'),
                           'Where checkpoint_damage.json and .md go.')


def outcome(workdir, state, saved):
  """How a resume on a damaged checkpoint ended."""
  if os.path.isdir(os.path.join(workdir, workdir_lib.CORRUPT)):
    return 'fell back'
  same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(state), jax.tree.leaves(saved)))
  return 'restored as saved' if same else 'restored OTHER VALUES'


def to_markdown(result):
  counts = collections.Counter((c['way'], c['outcome'])
                               for c in result['cases'])
  outcomes = sorted({o for _, o in counts})
  cases = len(result['cases'])  # Not '1 cases': one --ways, one file.
  lines = [f"Measured {result['date']} on {result['machine']}, commit "
           f"`{result['commit']}` (`{result['command']}`):"
           f" {cases} case{'' if cases == 1 else 's'}, each file of a "
           'checkpoint damaged alone.', '',
           '| damage | ' + ' | '.join(outcomes) + ' |',
           '|---|' + '---:|' * len(outcomes)]
  for way in result['ways']:
    lines.append(f'| {way} | ' + ' | '.join(
        str(counts[way, o]) for o in outcomes) + ' |')
  return '\n'.join(lines) + '\n'


def main():
  provenance.prepare_out(_OUT.value, 'checkpoint_damage')
  unknown = set(_WAYS.value) - set(DAMAGES)
  if unknown:
    raise ValueError(f'unknown --ways {sorted(unknown)}; known: '
                     f'{sorted(DAMAGES)}')
  if not _WAYS.value:  # Else a run trained for a report of no cases.
    raise ValueError(f'--ways is empty; known: {sorted(DAMAGES)}')
  config = _CONFIG.value
  config.train_steps = config.schedule_steps = 20
  config.checkpoint_every = 10
  result = {'date': time.strftime('%Y-%m-%d'),
            'machine': provenance.machine(), 'commit': provenance.commit(),
            'command': provenance.command(),
            'ways': _WAYS.value, 'path_contains': _PATH_CONTAINS.value,
            'cases': []}
  with tempfile.TemporaryDirectory() as scratch:
    run = os.path.join(scratch, 'run')
    train.train_and_evaluate(config, run)
    _, _, saved = train.load_run(run, 20)
    newest = os.path.join(run, workdir_lib.CHECKPOINTS, '20')
    files = sorted(os.path.relpath(os.path.join(root, name), newest)
                   for root, _, names in os.walk(newest) for name in names)
    chosen = [f for f in files if _PATH_CONTAINS.value in f]
    if not chosen:  # The files are known once the run has saved them.
      folders = sorted({os.path.dirname(f) or '.' for f in files})
      raise ValueError(f'--path_contains={_PATH_CONTAINS.value} matches none '
                       f'of the {len(files)} files of checkpoint 20 (in '
                       f"{', '.join(folders)})")
    files = chosen
    for way in _WAYS.value:
      for name in files:
        copy = os.path.join(scratch, 'copy')
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run, copy)
        DAMAGES[way](os.path.join(copy, workdir_lib.CHECKPOINTS, '20', name))
        try:
          state = train.train_and_evaluate(config, copy)
          ended = outcome(copy, state, saved)
        except Exception as e:  # pylint: disable=broad-except  Recorded.
          ended = f'refused: {type(e).__name__}'
        result['cases'].append({'way': way, 'file': name, 'outcome': ended})
        print(f'{way:12s} {name:60s} {ended}', flush=True)
  provenance.write(_OUT.value, 'checkpoint_damage', result, to_markdown(result))


if __name__ == '__main__':
  cli.run(main)
