"""How every command-line entry point runs: absl flags, quiet library logs,
and each expected failure as one `error:` line on stderr with a non-zero
exit code (2 for a bad command line, 1 for a refused or failed run, 130 for
a Ctrl-C), never a traceback."""

import _thread
import ctypes
import errno
import functools
import glob
import importlib.metadata
import importlib.util
import os
import pathlib
import pkgutil
import platform
import signal
import sys
import tempfile
import threading

from absl import app
from absl import flags
import jax

from sparse_gpt2 import defaults
from sparse_gpt2 import metrics


# Fewer optimizer steps than this do not earn back the slower compile that
# `keep_freed_memory` brings (sparse_small: ~130 ms gained a step, ~12 s more
# compile; a smaller model gains less a step).
STEPS_TO_EARN_BACK_FREED_MEMORY = 200

# CPU devices made in ~10 s; 100,000 (as `plan`'s cpu:N) ran for minutes,
# and 20,000 (as a run's num_cpu_devices) past 90 s, before any check could
# refuse them.
MAX_CPU_DEVICES = 1024


def check_cpu_devices(num_cpu_devices):
  """Refuses more than MAX_CPU_DEVICES: where jax starts (`start_jax`),
  before it makes them, and in `train.validate`, for `plan`, which starts
  no run."""
  if num_cpu_devices > MAX_CPU_DEVICES:
    raise ValueError(f'num_cpu_devices must be at most {MAX_CPU_DEVICES}, '
                     f'got {num_cpu_devices}')


def keep_freed_memory():
  """Makes glibc keep freed memory for reuse instead of returning it to the
  OS; call it before jax starts its backend, in runs of at least
  STEPS_TO_EARN_BACK_FREED_MEMORY steps.

  XLA:CPU allocates a step's temporaries anew each step (a few hundred MB for
  the small twins). glibc serves blocks that large with mmap and gives them
  back with munmap, so every step page-faults and zeroes them again: ~130,000
  page faults per `sparse_small` step, which cost more than a fifth of it.
  With one arena and no mmap, the freed blocks stay in the heap and the next
  step mostly reuses them without a fault (now and then a block does not fit
  the freed pieces, and the heap grows by it). The arena matters: a thread's
  own arena cannot hold blocks that large and falls back to mmap. The one
  arena can cost compile time (XLA's compiler threads share its lock:
  `sparse_small`'s step compiled in 43-52 s instead of 31-40 s on one
  machine, 14-20 s against 15-17 on another), which a run earns back within
  its first ~150 steps; short runs (the test suite's,
  `convert`) do not call this, nor the circuits CLIs (`settings.start_jax`).
  A compile in the one heap leaves its freed blocks among live ones, which
  slows every malloc after it, so `main` then compiles the steps in a child
  process (`train.start_compiling_apart`). A no-op off glibc.
  """
  if platform.libc_ver()[0] != 'glibc':
    return
  libc = ctypes.CDLL(None)
  libc.mallopt(-8, 1)          # M_ARENA_MAX: every thread in the main arena.
  libc.mallopt(-4, 0)          # M_MMAP_MAX: no block is mmapped...
  libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: ...or trimmed back to the OS.


def die_with_parent(parent):
  """Has the kernel kill this process when its parent, pid `parent`, ends
  (Linux's PR_SET_PDEATHSIG), and ends it now where that has happened
  already: a parent stopped by SIGTERM or SIGKILL cleans up no child. A
  no-op off Linux."""
  if platform.system() != 'Linux':
    return
  ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG.
  if os.getppid() != parent:
    os._exit(1)


# Where jax looks for accelerators before it tries their backends: TPUs are
# PCI devices of Google's vendor id, GPUs NVIDIA's or AMD's device files.
PCI_VENDOR_FILES = '/sys/bus/pci/devices/*/vendor'
GPU_DEVICE_FILES = ('/dev/nvidiactl', '/dev/nvidia0', '/dev/kfd')


def runs_on_cpu():
  """Whether jax will run this process's steps on the host CPU, told before
  its backend starts (as `keep_freed_memory` must be called): by the first of
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
  `train_steps` long enough to earn it back, freed memory kept for reuse
  (with an accelerator the step's temporaries are not in host memory, and
  the one arena only slowed the host: the 124M twins' steps compiled for a
  v5e-8 in ~1.4x the time); the CPU split into `num_cpu_devices` (0: jax's
  default, one); compiled programs kept on disk. `main` and the circuits
  CLIs start alike. Returns whether it kept freed memory."""
  keep = train_steps >= STEPS_TO_EARN_BACK_FREED_MEMORY and runs_on_cpu()
  if keep:
    keep_freed_memory()
  check_cpu_devices(num_cpu_devices)
  if num_cpu_devices:
    jax.config.update('jax_num_cpu_devices', num_cpu_devices)
  keep_compiled_programs()
  return keep


def fail(message, code):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


def _home(value):
  """A path flag's `~/...` (or a list flag's), which the shell leaves as
  it is after `--flag=`, as the shell would expand it: else `--workdir=~/x`
  made a folder named `~` in the current one."""
  if isinstance(value, list):
    return [_home(v) for v in value]
  if isinstance(value, str) and (value == '~' or value.startswith('~/')):
    return os.path.expanduser(value)
  return value


def _home_config_file(arg):
  """A config file flag's `--config=~/mine.py` with `~` expanded: the file
  is loaded while flags are parsed, before `_home` could expand it, and was
  refused as missing. A path that holds a `:` is refused here, before it
  is loaded (`_check_no_colon_in_path`)."""
  name, eq, value = arg[2:].partition('=')
  if (arg.startswith('--') and eq and name in flags.FLAGS
      and hasattr(type(flags.FLAGS[name]), 'config_filename')):
    _check_no_colon_in_path(name, _home(value))
    return f'--{name}={_home(value)}'
  return arg


def _check_no_colon_in_path(name, value):
  """Refuses a config file whose path holds a `:`, naming it: config_flags
  takes all after the first `:` as the config's argument (`file.py:arg`),
  and said only that the path's head (`runs/a` of `runs/a:b/mine.py`) was
  no such file."""
  parts = value.split(':')
  whole = next((':'.join(parts[:i]) for i in range(len(parts), 1, -1)
                if os.path.isfile(':'.join(parts[:i]))), None)
  if whole and not os.path.isfile(parts[0]):
    fail(f"--{name}={value}: a ':' ends a config file's path (what follows "
         f"is the config's argument, file.py:arg), so {whole} cannot be "
         "given: move or link it to a path without one", 2)


def _parse_flags(argv):
  # config_flags loads the file and applies its overrides while flags are
  # parsed: an unknown field raises AttributeError or KeyError there, and a
  # file that does not load raises OSError when its value is first read.
  try:
    argv = flags.FLAGS([_home_config_file(arg) for arg in argv])
    for name in flags.FLAGS:
      flag = flags.FLAGS[name]
      if hasattr(flag, 'config_filename') and flag.present:
        flag.value.keys()  # Loads the file: its own errors are caught below.
        try:
          defaults.check_fields(flag.value)
        except ValueError as e:  # Not the file's: its fields (main, plan,
          fail(str(e), 2)  # convert alike).
      elif flag.present:
        flag.value = _home(flag.value)
    return argv
  except flags.Error as e:  # A missing, unknown or malformed flag.
    # A config file that raises comes with its traceback: keep the first
    # line (which flag) and the last (the exception). Each required flag
    # left out is a line of its own: keep them all (compare's error named
    # --sparse and --out, and a rerun with them then asked for --dense).
    lines = str(e).strip().splitlines()
    named = [line for line in lines if line.startswith('flag --')] or lines[:1]
    fail(' '.join(named + [lines[-1]] * (lines[-1] not in named)), 2)
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


# What bad input raises, said in one line by `run`: the OSErrors are a path
# the user gave that is missing, or a file where a directory belongs, or the
# reverse, or one the user may not write (or read).
USER_ERRORS = (ValueError, FloatingPointError, FileNotFoundError,
               FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError)
# Where the machine, not the program, stops a command (a full disk, a quota,
# a read-only mount): said in one line too, not as a traceback.
FULL_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _nearest_existing(path):
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  return existing


def file_in_the_way(path):
  """The file at `path` or above it that stops a folder being made there,
  else None: the nearest existing path, if it is no directory."""
  existing = _nearest_existing(path)
  return None if os.path.isdir(existing) else existing


def check_output_dir(path):
  """Refuses, before any work, an --out folder that cannot be made or
  written: one that is a file, or below one, or in a folder that takes no
  file (a read-only mount, another user's), which the circuits CLIs met
  only when they wrote, after the pruning. Makes nothing."""
  blocking = file_in_the_way(path)
  if blocking:
    raise ValueError(f'--out {path}: {blocking} is a file, not a directory')
  folder = _nearest_existing(path)
  try:
    with tempfile.TemporaryFile(dir=folder):
      pass
  except OSError as e:
    raise ValueError(f'--out {path}: cannot write in {folder} '
                     f'({e.strerror})') from None


def _interrupt_again(unraisable, hook):
  """A Ctrl-C that lands in a gc callback (jax runs one at each collection)
  or a finalizer, where Python only prints it ('Exception ignored in') and
  the command went on, sent again to the main thread: from another thread,
  since here it would land in this hook, where it is only printed too.
  Other such exceptions go on to `hook`, the one installed before."""
  if issubclass(unraisable.exc_type, KeyboardInterrupt):
    # Not threading.Thread, whose start() waits for the thread: the signal
    # would land in that wait, in this hook.
    _thread.start_new_thread(signal.pthread_kill, (
        threading.main_thread().ident, signal.SIGINT))
  else:
    hook(unraisable)


def run(main, errors=USER_ERRORS):
  """Parses flags and calls main(); an exception in `errors` ends the
  process with its one-line message, and a Ctrl-C with one too."""
  sys.unraisablehook = functools.partial(_interrupt_again,
                                         hook=sys.unraisablehook)

  def wrapped(argv):
    if len(argv) > 1:
      fail(f'unexpected arguments: {argv[1:]}', 2)
    metrics.quiet_library_logs()
    try:
      main()
    except errors as e:
      fail(str(e), 1)
    except KeyboardInterrupt:  # Ctrl-C: the user stopped it, no fault to trace.
      fail('interrupted', 130)  # 128 + SIGINT, as a shell reports it.
    except OSError as e:
      if e.errno not in FULL_OR_READ_ONLY:
        raise
      fail(str(e), 1)

  app.run(wrapped, flags_parser=_parse_flags)
