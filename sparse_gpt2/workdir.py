"""The run directory: its layout, how its files are written, and the saved
config that decides what a rerun may change.

  WORKDIR/config.json                     the resolved config
  WORKDIR/corpus.json                     what names the corpus it trains on
  WORKDIR/metrics.jsonl                   one JSON object per logged step
  WORKDIR/events.out.tfevents.*           TensorBoard
  WORKDIR/checkpoints/STEP/               orbax
  WORKDIR/corrupt_checkpoints/STEP-TIME/  unreadable checkpoints, moved aside
  WORKDIR/.lock                           held by the start that runs in it

Paths are `etils.epath.Path`, so a workdir on gs:// (or any filesystem epath
knows) works like a local one. `check` only reads and `create` only writes,
so a start that is refused leaves nothing behind; only process 0 writes.
"""

import contextlib
import json
import os
import re
import socket

from etils import epath
import jax
import ml_collections

from sparse_gpt2 import defaults
from sparse_gpt2 import locks
from sparse_gpt2 import multihost

CONFIG = 'config.json'
CORPUS = 'corpus.json'  # `data.fingerprint` of the corpus it trains on.
METRICS = 'metrics.jsonl'
CHECKPOINTS = 'checkpoints'
CORRUPT = 'corrupt_checkpoints'
LOCK = '.lock'  # Held by the start that runs in the directory (`_lock`).

# Fields (or dotted subfields) that may differ between a workdir's saved
# config and a resumed run: where it stops, bookkeeping, and how a step is
# laid out on devices (so a preempted run can resume on another slice, or
# another kind of chip: cuDNN's attention is a GPU's alone, and what a
# step rematerializes fits it to a chip's memory), nothing that changes
# what a step computes beyond float rounding (and, with model.dropout above
# 0, which dropout masks `microbatches` slices draw). `schedule_steps` is
# not among them: it fixes the lr and annealing of every step, so
# `train_steps` can move without changing steps already planned.
RESUMABLE_FIELDS = ('train_steps', 'log_every', 'eval_every', 'eval_batches',
                    'checkpoint_every', 'keep_checkpoints', 'keep_every',
                    'peak_flops', 'mesh', 'microbatches', 'num_cpu_devices',
                    'model.attention', 'model.remat')


def path(workdir):
  """`workdir` as an absolute epath (orbax needs one); URLs stay as given."""
  p = epath.Path(workdir)
  return p if '://' in str(workdir) else p.resolve()


_TEMPORARY = re.compile(r'.+\.tmp\d+')  # What `write_atomic` renames.


def write_atomic(file, text, errors='strict'):
  """Writes `text` (UTF-8; `errors` as `open` takes them) to `file` as
  `write_atomic_with` does."""
  write_atomic_with(file, lambda f: f.write(text.encode('utf-8', errors)))


def write_atomic_with(file, write):
  """Calls write(f) on a temporary binary file renamed onto `file` (a path
  or epath) when done, so a killed run leaves the old file or the new one,
  never half of one (a run's config.json, a corpus cache that later runs
  trust), and a failed write leaves no temporary file. A local file is
  synced before the rename, so not after a power loss either (a filesystem
  may otherwise commit the rename before the data: an empty config.json, a
  run that no longer resumes)."""
  file = epath.Path(file)
  tmp = file.parent / f'{file.name}.tmp{os.getpid()}'
  try:
    with tmp.open('wb') as f:
      write(f)
      if '://' not in str(tmp):  # A bucket's object is whole once closed.
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(file)
  except BaseException as e:
    with contextlib.suppress(OSError):
      tmp.unlink()
    if isinstance(e, OSError) and e.errno and e.filename is None:
      # A full disk's write names no file: `cli.run`'s one line said "No
      # space left on device" of a run writing to three disks.
      raise OSError(e.errno, e.strerror, str(file)) from None
    raise


def parse_json(text, where):
  """json.loads, failing in one line that names `where` (a file, a line)."""
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'{where} is not valid JSON ({e})') from None


def read_text(file):
  """The text of `file` (a path or epath), UTF-8 as this project writes it;
  other bytes (a damaged file) are refused naming the file, which a bare
  decode error does not."""
  raw = epath.Path(file).read_bytes()
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'{file} is not UTF-8 text (byte {e.start} is '
                     f'{raw[e.start]:#04x})') from None


def read_json(file):
  """The JSON in `file`, refused in one line naming it if it is none."""
  return parse_json(read_text(file), file)


def load_config(workdir):
  """The saved config of the run in `workdir`."""
  file = path(workdir) / CONFIG
  if not file.exists():
    raise ValueError(f'{workdir} is not a run directory (no {CONFIG})')
  saved = read_json(file)
  if not isinstance(saved, dict):
    raise ValueError(f'{file} is not a run config (not a JSON object)')
  missing = set(defaults.base()) - set(saved) - {'schedule_steps'}
  if missing:
    raise ValueError(f'{file} is not a run config (no {sorted(missing)})')
  # Runs from before the field planned their schedules over train_steps.
  saved.setdefault('schedule_steps', saved['train_steps'])
  return ml_collections.ConfigDict(saved)


def has_checkpoints(workdir):
  """Whether a run saved any checkpoint (one set aside as corrupt counts):
  a run directory without one holds no training, and a start may take it
  as new, whatever config the start before it (that failed, or was
  stopped during its first compile) wrote there."""
  return bool(checkpoint_steps(workdir)) or (path(workdir) / CORRUPT).exists()


def checkpoint_steps(workdir):
  """The steps of the checkpoints in `workdir`, sorted: orbax names each
  directory by its step (a save in progress has a suffix)."""
  root = path(workdir) / CHECKPOINTS
  if not root.is_dir():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


def read_metrics(workdir):
  """The records of workdir/metrics.jsonl, oldest first ([] before the
  first log)."""
  file = path(workdir) / METRICS
  if not file.exists():
    return []
  records = []
  for i, line in enumerate(read_text(file).splitlines(), 1):
    record = parse_json(line, f'{file} line {i}')
    if not (isinstance(record, dict) and isinstance(record.get('step'), int)):
      raise ValueError(f'{file} line {i} is not a record of a step (a JSON '
                       'object with an integer "step")')
    records.append(record)
  return records


def schedule_steps(config, saved=None):
  """Steps the lr and annealing schedules run over: `schedule_steps`, or if
  0 the `saved` run's, or for a new run `train_steps`. Whatever starts from
  a config (a run, `plan`, `convert`) reads it here: whether the annealing
  starts dense decides what the initialization computes, and a config whose
  `train_steps` run past the schedules is refused by all of them alike."""
  steps = config.schedule_steps or (saved.schedule_steps if saved
                                    else config.train_steps)
  if config.train_steps > steps:
    raise ValueError(
        f'train_steps {config.train_steps} is past the end of the lr and '
        f'annealing schedules (schedule_steps {steps}); a run cannot be '
        'extended past them, start a new one')
  return steps


def check(config, workdir):
  """The config this start runs with, after checking that `workdir` can
  hold it; reads only.

  `schedule_steps` 0 becomes the saved run's (or, for a new run,
  `train_steps`). Refuses a path under a link to nothing (which `create`
  could not make), a path that is a file, a non-empty directory that
  is not a run, `train_steps` past the end of the schedules or before the
  run's newest checkpoint, a run whose saved config differs in anything
  but RESUMABLE_FIELDS, and a damaged metrics.jsonl (which the run reads
  before it logs, after this start wrote its config).
  """
  root = path(workdir)
  try:  # A remote path's first access imports its file system.
    root.exists()
  except ImportError as e:
    raise ValueError(f'workdir {workdir}: {e} (pip install gcsfs '
                     'google-cloud-storage, as launch/tpu_vm.sh does)'
                     ) from None
  local = () if '://' in str(root) else (root, *root.parents)
  for link in local:  # `create`'s mkdir would fail with "File exists".
    if os.path.islink(link) and not os.path.exists(link):
      raise ValueError(f'{link} is a link to {os.readlink(link)}, which does '
                       'not exist (a disk not mounted?): create its target, '
                       'or give another workdir')
  for directory in (root, root / CHECKPOINTS, root / CORRUPT):
    if directory.exists() and not directory.is_dir():
      raise ValueError(f'{directory} exists and is not a directory')
  saved = None
  if root.is_dir() and any(not _TEMPORARY.fullmatch(p.name)
                           and p.name != LOCK for p in root.iterdir()):
    if not (root / CONFIG).exists():
      raise ValueError(f'workdir {workdir} is not empty and holds no '
                       f'{CONFIG}: not a run directory, refusing to use it')
    saved = load_config(workdir)
    if not has_checkpoints(workdir):
      saved = None  # No training to resume: this start's config goes.
    read_metrics(workdir)
  config = config.copy_and_resolve_references()
  config.schedule_steps = schedule_steps(config, saved)
  if saved is not None:
    new, old = _dotted(json.loads(config.to_json())), _dotted(saved.to_dict())
    diff = sorted(k for k in set(old) | set(new)
                  if not any(k == f or k.startswith(f + '.')
                             for f in RESUMABLE_FIELDS)
                  and old.get(k, _ABSENT) != new.get(k, _ABSENT))
    if diff:
      shown = '; '.join(f'{k} {old.get(k, _ABSENT)!r} there, '
                        f'{new.get(k, _ABSENT)!r} here' for k in diff[:4])
      more = f'; and {len(diff) - 4} more' if len(diff) > 4 else ''
      raise ValueError(f'workdir {workdir} holds a run with a different '
                       f'config ({shown}{more}): use another --workdir, or '
                       'the same values')
    steps = checkpoint_steps(workdir)
    newest = max(steps, default=0)
    if config.train_steps < newest:
      raise ValueError(f'train_steps {config.train_steps} is before the '
                       f'newest checkpoint of {workdir} (step {newest}); a '
                       'run cannot stop in its past')
    _check_kept_forever(saved, config, steps)
  return config


class _Absent:
  """A field one of two configs lacks (a run saved before it existed)."""

  def __repr__(self):
    return 'absent'


_ABSENT = _Absent()


def _dotted(tree, prefix=''):
  """A config's JSON as {'model.d_head': 64, ...}: each differing field is
  named, not only its section."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_dotted(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def _check_kept_forever(saved, config, steps):
  """Refuses a `keep_every` that would drop checkpoints the run's own kept
  forever: orbax applies a manager's rule to every checkpoint on disk at
  its next save, so `sparse_medium`'s steps 50, 150, ... (the circuits'
  matched-loss checkpoints) would go with keep_every 100. The newest
  `keep_checkpoints` are safe only where no save comes (the run is at its
  end): each later save pushes the oldest of them out."""
  old, new = saved.keep_every, config.keep_every
  saves_ahead = config.train_steps > max(steps, default=0)
  newest = set() if saves_ahead else set(steps[-config.keep_checkpoints:])
  lost = [s for s in steps if old and s % old == 0 and s not in newest
          and not (new and s % new == 0)]
  if lost:
    raise ValueError(
        f'keep_every {new} would delete checkpoint(s) {lost}, which '
        f'keep_every {old} keeps forever: give a divisor of {old}, or move '
        'those out of checkpoints/ first')


# Corpus record fields that the records of runs saved before them lack, not
# counted as differing there (else none of those runs could resume):
# train_sha256 since 2026-12-07 (a train file edited to as many tokens, and
# so the same counts, resumed on the edited stream unsaid).
_RECORDED_SINCE = ('train_sha256',)


def check_corpus(workdir, corpus_fingerprint,
                 doing='resuming would train on other data'):
  """Refuses to resume a run on a corpus other than the one it trained on
  (`data.fingerprint`, or those of its fields given): the stdlib of
  another Python, a source folder edited and built again on another
  machine. Reads only; a run saved before the record was kept (2026-12-07)
  gets one at this start."""
  file = path(workdir) / CORPUS
  if not file.exists() or not has_checkpoints(workdir):
    return
  saved = read_json(file)
  if not isinstance(saved, dict):
    raise ValueError(f'{file} is not a corpus record (not a JSON object)')
  differ = sorted(k for k in corpus_fingerprint
                  if saved.get(k) != corpus_fingerprint[k]
                  and (k in saved or k not in _RECORDED_SINCE))
  if differ:
    raise ValueError(
        f'the corpus here differs from the one {workdir} trained on '
        f'({", ".join(differ)}): {doing}; build '
        'the same corpus (the same source files, or Python for stdlib) or '
        'start a new run')


def create(config, workdir, corpus_fingerprint):
  """Takes the run directory for this start (`_lock`), writes `config` as
  the run's config.json and, where there is none (or no checkpoint yet),
  its corpus record (process 0), then waits for every process, so none
  opens a run directory that is not there yet. Returns the function that
  gives the directory back.

  Refuses the run unless every process reads the config.json process 0
  wrote: hosts that each have a folder of their own there (a local path on
  a slice of several hosts) would each save only their own shards of every
  checkpoint, and no host could restore one."""
  root = path(workdir)
  unlock, refused = (lambda: None), None
  if jax.process_index() == 0:
    root.mkdir(parents=True, exist_ok=True)
    unlock, refused = _lock(root)
  if multihost.any_process(refused is not None):
    raise ValueError(refused or f'another run is writing into {workdir}')
  try:
    error = None
    if jax.process_index() == 0:
      try:
        check(config, workdir)  # Again, now that no other start can write.
      except ValueError as e:
        error = e
      else:
        write_atomic(root / CONFIG, config.to_json(indent=2))
        if not (root / CORPUS).exists() or not has_checkpoints(workdir):
          write_atomic(root / CORPUS,
                       json.dumps(corpus_fingerprint, indent=1))
    if multihost.any_process(error is not None):
      raise error or ValueError(f'process 0 refused {workdir}; its log says '
                                'why')
    multihost.barrier('workdir.create')
    written = root / CONFIG
    if not multihost.same_on_all(written.read_text() if written.exists()
                                 else ''):
      raise ValueError(
          f'the processes do not share the run directory {workdir} (each '
          "host has a folder of its own there?): every host writes its "
          'shards of each checkpoint into it, so on several hosts give a '
          'path they all share, e.g. --workdir=gs://BUCKET/RUN')
  except BaseException:
    unlock()
    raise
  return unlock


def _lock(root):
  """(unlock, None), or (None, why not) where another start holds the run
  directory: two runs writing into one would mix their checkpoints, logs
  and config. `locks.hold` on `LOCK`; none on a remote path (gs://)."""
  if '://' in str(root):
    return (lambda: None), None
  f = locks.hold(root / LOCK, wait=False)
  if f is None:
    holder = (root / LOCK).read_text().strip() or 'another process'
    return None, (f'another run is writing into {root} ({holder}): wait '
                  'for it to end, or stop it')
  f.seek(0)
  f.truncate()
  f.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
  f.flush()
  return f.close, None
