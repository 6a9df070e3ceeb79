"""How every command-line entry point runs: absl flags, quiet library logs,
and each expected failure as one `error:` line on stderr with a non-zero
exit code (2 for a bad command line, 1 for a refused or failed run), never a
traceback."""

import ctypes
import glob
import importlib.metadata
import importlib.util
import os
import pathlib
import pkgutil
import platform
import sys

from absl import app
from absl import flags
import jax

from sparse_gpt2 import metrics


# Fewer optimizer steps than this do not earn back what `cheap_step_memory`
# costs: a restart that imports everything again (~4 s) or, where it falls
# back to one malloc arena, a slower compile (sparse_small: ~130 ms gained a
# step; a smaller model gains less a step).
STEPS_TO_EARN_BACK_CHEAP_MEMORY = 200

# glibc's malloc tunable for transparent huge pages (glibc 2.35 and later),
# read only when a process starts, and where the kernel says whether it
# offers them (`[madvise]` or `[always]` is on).
HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb'
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'


def cheap_step_memory():
  """Makes the temporaries that XLA:CPU allocates anew every step cheap to
  get from the OS; call it before jax starts its backend, in runs of at
  least STEPS_TO_EARN_BACK_CHEAP_MEMORY steps. A no-op off glibc, and where
  GLIBC_TUNABLES already sets `glibc.malloc.hugetlb`.

  glibc serves blocks that large (a few hundred MB a step for the small
  twins) with mmap and gives them back with munmap, so every step
  page-faults and zeroes them again, a 4 KiB page at a time: ~114,000
  faults per `sparse_small` step, more than a tenth of it. Where the kernel
  offers transparent huge pages, the process starts itself again (`execv`,
  the same command line, so call this before any output or side effect)
  with `glibc.malloc.hugetlb=1`, and the blocks are faulted in 2 MiB at a
  time (~860 faults a step). Elsewhere glibc keeps freed memory instead: one
  arena, no mmap, no trim, so that the freed blocks stay in the heap for
  the next step (a thread's own arena cannot hold blocks that large and
  falls back to mmap). That one arena's lock is shared by XLA's compiler
  threads: `sparse_small`'s train step compiled 1.2-1.3x slower, which the
  huge pages do not cost (docs/speed.md). The short runs of the test suite
  and `convert` do not call this, nor the circuits CLIs
  (`settings.start_jax`).
  """
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if platform.libc_ver()[0] != 'glibc' or HUGE_PAGES_TUNABLE in tunables:
    return
  if huge_pages_offered():
    os.environ['GLIBC_TUNABLES'] = ':'.join(
        filter(None, (tunables, HUGE_PAGES_TUNABLE + '=1')))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
  libc = ctypes.CDLL(None)
  libc.mallopt(-8, 1)          # M_ARENA_MAX: every thread in the main arena.
  libc.mallopt(-4, 0)          # M_MMAP_MAX: no block is mmapped...
  libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: ...or trimmed back to the OS.


def huge_pages_offered():
  """Whether glibc (2.35 or later) can ask this kernel for transparent huge
  pages."""
  libc_name, version = platform.libc_ver()
  if libc_name != 'glibc' or [int(v) for v in version.split('.')[:2]] < [
      2, 35]:
    return False
  try:
    mode = pathlib.Path(THP_MODE_FILE).read_text()
  except OSError:
    return False
  return '[always]' in mode or '[madvise]' in mode


# Where jax looks for accelerators before it tries their backends: TPUs are
# PCI devices of Google's vendor id, GPUs NVIDIA's or AMD's device files.
PCI_VENDOR_FILES = '/sys/bus/pci/devices/*/vendor'
GPU_DEVICE_FILES = ('/dev/nvidiactl', '/dev/nvidia0', '/dev/kfd')


def runs_on_cpu():
  """Whether jax will run this process's steps on the host CPU, told before
  its backend starts (as `cheap_step_memory` must be called): by the first of
  JAX_PLATFORMS where it is set, else by whether no accelerator that this
  jax can use is attached: a TPU with libtpu installed, or a GPU with a jax
  GPU plugin (a laptop's GPU beside CPU-only jax does not count)."""
  if jax.config.jax_platforms:
    return jax.config.jax_platforms.split(',')[0].strip() == 'cpu'
  tpu = importlib.util.find_spec('libtpu') and any(
      pathlib.Path(f).read_text().strip() == '0x1ae0'
      for f in glob.glob(PCI_VENDOR_FILES))
  gpu = any(map(os.path.exists, GPU_DEVICE_FILES)) and any(
      'cuda' in name or 'rocm' in name for name in _jax_plugins())
  return not tpu and not gpu


def _jax_plugins():
  """The PJRT plugin modules jax would load, found as jax finds them."""
  names = [entry.value for entry in
           importlib.metadata.entry_points(group='jax_plugins')]
  if importlib.util.find_spec('jax_plugins'):
    import jax_plugins  # pylint: disable=g-import-not-at-top
    names += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
  return names


def keep_compiled_programs():
  """Keeps compiled programs on disk (JAX_COMPILATION_CACHE_DIR, else
  ~/.cache/sparse_gpt2/jax), so that a rerun or a resumed run loads its
  train step instead of compiling it again, and a task's pruning program,
  which takes the weights as arguments, compiles once for both twins, every
  point of a curve and the next run."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir',
                      os.path.expanduser('~/.cache/sparse_gpt2/jax'))


def start_jax(num_cpu_devices, train_steps=0):
  """Before jax starts its backend: for a training run on the CPU of
  `train_steps` long enough to earn it back, cheap memory for the step's
  temporaries (with an accelerator they are not in host memory, and the one
  arena of the fallback only slowed the host: the 124M twins' steps
  compiled for a v5e-8 in ~1.4x the time); the CPU split into
  `num_cpu_devices` (0: jax's default, one); compiled programs kept on disk.
  `main` and the circuits CLIs start alike."""
  if train_steps >= STEPS_TO_EARN_BACK_CHEAP_MEMORY and runs_on_cpu():
    cheap_step_memory()
  if num_cpu_devices:
    jax.config.update('jax_num_cpu_devices', num_cpu_devices)
  keep_compiled_programs()


def fail(message, code):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


def _parse_flags(argv):
  # config_flags loads the file and applies its overrides while flags are
  # parsed: an unknown field raises AttributeError or KeyError there, and a
  # file that does not load raises OSError when its value is first read.
  try:
    argv = flags.FLAGS(argv)
    for name in flags.FLAGS:
      flag = flags.FLAGS[name]
      if hasattr(flag, 'config_filename') and flag.present:
        flag.value.keys()
    return argv
  except flags.Error as e:  # A missing, unknown or malformed flag.
    # A config file that raises comes with its traceback: keep the first
    # line (which flag) and the last (the exception).
    lines = str(e).strip().splitlines()
    fail(lines[0] if len(lines) == 1 else f'{lines[0]} {lines[-1]}', 2)
  except (AttributeError, KeyError) as e:
    field = e
    while field.args and isinstance(field.args[0], Exception):
      field = field.args[0]  # A KeyError that AttributeError wraps.
    if not isinstance(field, KeyError):  # Not an override: the file itself.
      _config_does_not_load(e)
    # "'densty'\nDid you mean "density" instead of "densty"?" for a nested one.
    name, *hint = str(field.args[0] if field.args else field).splitlines()
    fail(f"no such config field: '{name.strip(chr(34) + chr(39))}'"
         + (f' ({hint[0]})' if hint else ''), 2)
  except OSError as e:
    fail(str(e).splitlines()[-1].strip(), 2)
  except Exception as e:  # pylint: disable=broad-except  Its get_config raised.
    _config_does_not_load(e)


def _config_does_not_load(error):
  lines = str(error).strip().splitlines() or ['']
  fail(f'the config does not load: {type(error).__name__}: {lines[-1]}', 2)


def run(main, errors=(ValueError, FloatingPointError, FileNotFoundError)):
  """Parses flags and calls main(); an exception in `errors` ends the
  process with its one-line message."""

  def wrapped(argv):
    if len(argv) > 1:
      fail(f'unexpected arguments: {argv[1:]}', 2)
    metrics.quiet_library_logs()
    try:
      main()
    except errors as e:
      fail(str(e), 1)

  app.run(wrapped, flags_parser=_parse_flags)
