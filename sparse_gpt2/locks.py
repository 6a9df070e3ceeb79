"""Advisory locks on local files (`flock`), which the system drops when the
process that holds one ends, however it ends: a run's directory
(`workdir`) and a data folder's corpora (`data`) are each used by one
process at a time."""

import fcntl

from absl import logging


def hold(path, wait):
  """The file at `path`, open and holding an exclusive lock on it; None
  where another process holds it and `wait` is False, else once it is
  given back. On a file system without locks (some NFS) the file comes
  back unlocked, with a warning, rather than failing the caller."""
  f = open(path, 'a+', encoding='utf-8')
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    if not wait:
      f.close()
      return None
    logging.info('Waiting for another process, which holds %s.', path)
    fcntl.flock(f, fcntl.LOCK_EX)
  except OSError as e:
    logging.warning('No lock on %s (%s): another process may use what it '
                    'guards at the same time.', path, e)
  return f
