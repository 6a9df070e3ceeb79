"""Shared fixtures. Compiled programs are cached on disk so the many small
runs of the suite (and their subprocesses) compile each program once, and
compiled cheaply."""

import os

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', '/tmp/sparse_gpt2_jax_cache')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# The suite compiles far more than it computes, and no test asserts a speed.
# So its programs (and those of its subprocesses, which inherit XLA_FLAGS) get
# LLVM's cheapest code generation and XLA:CPU's loop emitters in place of the
# MLIR fusion emitters, which run a pass pipeline per fusion: a train step
# compiles in half the time. The loop emitters round some fusions differently
# from one program to the next, which broke two comparisons of differently
# built programs (remat against none, bitwise; two processes against one, where
# the rounding flipped top-k choices): those two tests ask for the fusion
# emitters back (`xla_cpu_use_fusion_emitters`; of a repeated flag, the last
# wins).
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0'
    ' --xla_cpu_use_fusion_emitters=false').strip()

import contextlib  # pylint: disable=g-import-not-at-top
import resource  # pylint: disable=g-import-not-at-top
import shutil  # pylint: disable=g-import-not-at-top
import signal  # pylint: disable=g-import-not-at-top
import sysconfig  # pylint: disable=g-import-not-at-top

import pytest  # pylint: disable=g-import-not-at-top

from sparse_gpt2 import checkpoint  # pylint: disable=g-import-not-at-top


@pytest.fixture(autouse=True, scope='session')
def failed_read_echoes_dropped():
  """The corrupt-checkpoint tests' failed reads echo as unraisable
  exceptions, which pytest reports as warnings of whichever test is running
  when they surface (or of none, at the session's last collection); every
  checkpoint read drops them too, but only from the hook of the moment it
  reads. The hook wrapped here is pytest's, which puts back the one before
  it when the session ends."""
  checkpoint.drop_failed_read_echoes()


@pytest.fixture
def full_disk():
  """A context manager in which a write past 4 KiB of a file fails as on a
  full disk (an OSError, EFBIG), without root: a file size limit, with the
  signal it sends ignored."""
  @contextlib.contextmanager
  def limited():
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    kill = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))
    try:
      yield
    finally:
      resource.setrlimit(resource.RLIMIT_FSIZE, limit)
      signal.signal(signal.SIGXFSZ, kill)
  return limited


@pytest.fixture
def sync_and_rename(monkeypatch):
  """The list of 'fsync' and 'replace' in the order the code calls them
  (each still done): an atomic write must sync before it renames."""
  calls = []
  fsync, replace = os.fsync, os.replace
  monkeypatch.setattr(os, 'fsync', lambda fd: (calls.append('fsync'),
                                               fsync(fd))[1])
  monkeypatch.setattr(os, 'replace', lambda *a: (calls.append('replace'),
                                                 replace(*a))[1])
  return calls


@pytest.fixture(scope='session')
def code_dir(tmp_path_factory):
  """A small corpus: the json and email packages of the standard library."""
  path = tmp_path_factory.mktemp('code')
  stdlib = sysconfig.get_paths()['stdlib']
  for package in ('json', 'email'):
    for name in sorted(os.listdir(os.path.join(stdlib, package))):
      if name.endswith('.py'):
        shutil.copy(os.path.join(stdlib, package, name),
                    path / f'{package}_{name}')
  return str(path)


@pytest.fixture(scope='session')
def tiny_config(code_dir, tmp_path_factory):
  """configs/tiny.py on the small corpus, with a data dir shared by tests."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))

  def make(mode='topk', **overrides):
    from configs import tiny  # pylint: disable=g-import-not-at-top
    config = tiny.get_config(mode)
    config.data.source = code_dir
    config.data.data_dir = data_dir
    for key, value in overrides.items():
      node = config
      *parents, leaf = key.split('.')
      for p in parents:
        node = node[p]
      node[leaf] = value
    return config

  return make
