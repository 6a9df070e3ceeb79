"""Where a benchmark's numbers come from: the machine, the commit measured,
the older commit measured against (`run.py`, `whole_runs.py`), and the
files they are written to."""

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile

from absl import flags
import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from sparse_gpt2 import cli  # pylint: disable=g-import-not-at-top
from sparse_gpt2 import workdir  # pylint: disable=g-import-not-at-top


def machine():
  """The host as a reader of the tables needs it: the same 2-core run read
  its matmul peak at 51-81 GFLOP/s on an AVX2 AMD EPYC and ~270 on an
  AVX-512 Xeon, so every number belongs to its CPU model and vector width."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      info = f.read()
  except OSError:
    info = ''
  for line in info.splitlines():
    if line.startswith('model name'):
      cpu = line.split(':', 1)[1].strip()
      break
  flag_words = set(info.split())
  isa = next((name for flag, name in (('avx512f', 'AVX-512'), ('avx2', 'AVX2'))
              if flag in flag_words), '')
  # The cores this process may run on (`taskset`, a container's cpuset),
  # which its threads use: not only the host's count, which said 2 cores of
  # a run pinned to one. (No affinity off Linux: the host's.)
  total = os.cpu_count()
  usable = (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
            else total)
  cores = f'{usable} cores' if usable == total else f'{usable} of {total} cores'
  return (f"{cpu}{f' ({isa})' if isa else ''}, {platform.machine()}, "
          f'{cores}, {jax.devices()[0].device_kind}')


def command():
  """The command line that ran this benchmark (a script of benchmarks/),
  as a user reruns it from the checkout."""
  return shlex.join(['python', f'benchmarks/{os.path.basename(sys.argv[0])}',
                     *sys.argv[1:]])


def _tracked():
  """Whether git tracks ROOT's files: not in a copy without .git, nor in one
  inside another repository's folder (a home directory kept in git), nor
  without git."""
  try:
    return subprocess.run(
        ['git', '-C', ROOT, 'ls-files', '--error-unmatch', '--', '.'],
        capture_output=True).returncode == 0
  except FileNotFoundError:  # No git on this machine.
    return False


def commit():
  """The checkout measured, marked when it differs from its commit;
  'unknown' where git does not track ROOT's files: a copy without .git read
  'unknown (modified)', one inside another repository's folder that
  repository's commit, and no git a traceback."""
  if not _tracked():
    return 'unknown'
  head = subprocess.run(['git', '-C', ROOT, 'rev-parse', '--short', 'HEAD'],
                        capture_output=True, text=True).stdout.strip()
  changed = subprocess.run(['git', '-C', ROOT, 'diff', '--quiet', 'HEAD'],
                           capture_output=True).returncode
  return f"{head or 'unknown'}{' (modified)' if changed else ''}"


def unpack(baseline, dest):
  """The code and configs (`sparse_gpt2/`, `configs/`) of commit `baseline`
  into the directory `dest`; ValueError where git does not have it."""
  # Git reads a name that starts with '-' as its option: '--list' was tar's
  # traceback, '-v' "not a valid object name: sparse_gpt2".
  if not baseline or baseline.startswith('-'):
    raise ValueError(f"--baseline='{baseline}' is not a commit")
  if not _tracked():  # Git's "fatal: not a git repository" said not how.
    raise ValueError(f'commit {baseline} not found: git does not track '
                     f'{ROOT} (a copy without .git, or no git); run from a '
                     'git clone of the project')
  archive = subprocess.run(
      ['git', '-C', ROOT, 'archive', baseline, 'sparse_gpt2', 'configs'],
      capture_output=True, check=False)
  if archive.returncode:  # One line: git's last, e.g. "fatal: not a ...".
    why = archive.stderr.decode().strip().splitlines() or ['']
    raise ValueError(f'commit {baseline} not found ({why[-1]})')
  os.makedirs(dest, exist_ok=True)
  subprocess.run(['tar', '-x', '-C', dest], input=archive.stdout, check=True)


def last_line(stderr):
  """A failed process's error in one line, as `cli.run` prints one: the last
  line of its stderr (a CLI's `error: ` left off, the caller's comes first)."""
  lines = [line.strip() for line in stderr.splitlines() if line.strip()]
  return lines[-1].removeprefix('error: ') if lines else 'no error message'


def refuse_flags_of_run(script, names):
  """For a benchmark that imports run.py, and so parses its flags: one of
  them (`names`) that `script` does not read is refused in one line, not
  ignored (`step_profile.py --quick` profiled the full step, `matmuls.py
  --out` wrote no file)."""
  given = [name for name in names if flags.FLAGS[name].present]
  if given:
    raise ValueError(f"--{given[0]} is run.py's flag; {script} does not "
                     'read it')


def refuse_batch_split(num_cpu_devices, batches):
  """Refuses, before anything is built, a --num_cpu_devices that does not
  divide one of `batches`, as `main` refuses it: not jax's sharding error,
  which names neither the flag nor the batch."""
  for batch in batches:
    if batch % num_cpu_devices:
      raise ValueError(f'--num_cpu_devices={num_cpu_devices} must divide '
                       f'the batch of {batch}')


def prepare_out(out_dir, name):
  """Makes `out_dir`, writes a file there and opens the result files that
  `write(out_dir, name, ...)` will write, before anything is measured, so
  that an --out that cannot hold the results is refused in one line now, not
  after the run."""
  if not out_dir:  # os.makedirs('') is a bare "[Errno 2] ... ''".
    raise ValueError('--out is empty: give a folder for the results')
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f'--out {out_dir} exists and is not a directory')
  # Below a file: os.makedirs's "[Errno 20] Not a directory" named no flag.
  cli.check_output_dir(out_dir)
  try:  # A folder may exist yet refuse files (permissions, read-only).
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out_dir):
      pass
  except OSError as e:
    raise ValueError(f'--out {out_dir} is not writable: {e}') from None
  for ext in ('json', 'md'):
    # A folder of that name, or a file not ours to write, lost the results
    # at the final write.
    path = os.path.join(out_dir, f'{name}.{ext}')
    if os.path.isdir(path):
      raise ValueError(f'--out {out_dir}: {path} is a directory, not a file')
    if os.path.exists(path):
      try:  # Appending nothing leaves the file as it is.
        with open(path, 'a'):
          pass
      except OSError as e:
        raise ValueError(f'--out {out_dir}: {path} is not writable: '
                         f'{e}') from None


def write(out_dir, name, result, markdown):
  """`result` to out_dir/NAME.json and its table `markdown` to NAME.md,
  printed too: what each benchmark leaves for the README. Each file whole
  or as it was (`write_atomic`): a full disk cut an earlier run's short."""
  os.makedirs(out_dir, exist_ok=True)
  for suffix, text in (('json', json.dumps(result, indent=1)),
                       ('md', markdown)):
    workdir.write_atomic(workdir.path(os.path.join(out_dir,
                                                   f'{name}.{suffix}')), text)
  print(markdown)
