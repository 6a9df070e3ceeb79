"""TFDS builder for a directory of Python source files (default: the stdlib).

The standard library of the running interpreter is real, varied, permissively
licensed code that every machine already has, so the default corpus needs no
download. Any other directory can be used instead (`source_dir`).

Each source directory (and `val_fraction`) gets its own builder config, named
after a hash of the resolved path, so two sources never share a prepared
dataset or anything cached beside it. The manifest records the files as
they were (`listing_digest`): a source whose files were added, removed or
edited since is built again (`data.load`), with its caches.

Files are assigned to train/validation by a stable hash of their relative
path, so the split of a file does not depend on which other files exist, and
stored in `list_files`' order (`disable_shuffling`) so readers see a
stable, human-checkable order. `manifest.json` beside the records lists
every file with its size, sha256 and split, which is what a result should
cite as "the data".
"""

import dataclasses
import hashlib
import json
import os
import re
import sysconfig

from absl import logging
import tensorflow_datasets as tfds

MANIFEST = 'manifest.json'
# Third-party packages installed into the interpreter are not the stdlib, and
# would make the default corpus depend on what happens to be installed.
_EXCLUDED_DIRS = frozenset({'site-packages', 'dist-packages'})


def stdlib_dir():
  return sysconfig.get_paths()['stdlib']


def split_of(relpath, val_fraction):
  """'train' or 'validation' for a file, from a hash stable across runs.

  Python's hash() is salted per process, so it would reshuffle the split every
  run; the first 8 bytes of sha256 give a uniform number in [0, 1).
  """
  digest = hashlib.sha256(relpath.encode('utf-8')).digest()
  u = int.from_bytes(digest[:8], 'big') / 2**64
  return 'validation' if u < val_fraction else 'train'


def _scan(source_dir):
  """(paths, not_files, not_utf8, same_files, not_read, dir_links): relative
  POSIX paths of the .py files under `source_dir`, in a fixed order (a
  directory's own files by name, then its subdirectories' by name: os.walk's,
  each level sorted; not one sort of the whole paths, which would put `A/x.py`
  before `a.py` and change the corpus every run trains on); then the .py names
  that are not a file to read (a link to nothing or to itself, which would
  fail the build, a FIFO, which would hang it), those not UTF-8 (no split or
  manifest can name them; shown with backslash escapes), and links to a
  file listed already, symbolic or hard (split by its own path, the same
  text could be in both the train and the validation split); then the
  directories below it that could not be read, whose files are left out
  (os.walk skipped them unsaid); last the links to directories, not followed
  (os.walk's default: a link to a parent would loop) and so left out, which
  os.walk skipped unsaid too. `source_dir` itself unreadable is refused (it
  read as empty)."""
  paths, not_files, not_utf8, same_files, not_read, dir_links = (
      [], [], [], [], [], [])
  listed = set()  # (st_dev, st_ino): one file by any path, linked or not.

  def unreadable(error):
    if error.filename == source_dir:
      raise ValueError(f'Source directory {source_dir!r} cannot be read '
                       f'({error.strerror})') from None
    not_read.append(_shown(os.path.relpath(error.filename, source_dir)))

  for dirpath, dirnames, filenames in os.walk(source_dir, onerror=unreadable):
    # Pruning and sorting in place makes os.walk skip excluded trees and visit
    # the rest in a deterministic order.
    dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
    dir_links.extend(
        _shown(os.path.relpath(os.path.join(dirpath, d), source_dir))
        for d in dirnames if os.path.islink(os.path.join(dirpath, d)))
    for name in sorted(filenames):
      if name.endswith('.py'):
        rel = os.path.relpath(os.path.join(dirpath, name), source_dir)
        rel = rel.replace(os.sep, '/')
        try:
          rel.encode('utf-8')
        except UnicodeEncodeError:  # Undecodable bytes, as surrogates.
          not_utf8.append(_shown(rel))
        else:  # A link to a file is that file, once.
          path = os.path.join(dirpath, name)
          if not os.path.isfile(path):
            not_files.append(rel)
            continue
          stat = os.stat(path)
          if (stat.st_dev, stat.st_ino) in listed:
            same_files.append(rel)
          else:
            listed.add((stat.st_dev, stat.st_ino))
            paths.append(rel)
  return paths, not_files, not_utf8, same_files, not_read, dir_links


def _shown(rel):
  """A relative path in POSIX form, with backslash escapes where it is not
  UTF-8 (a manifest is JSON text)."""
  rel = rel.replace(os.sep, '/')
  return os.fsencode(rel).decode('utf-8', 'backslashreplace')


def list_files(source_dir):
  """Relative POSIX paths of the .py files under `source_dir` (`_scan`'s
  order), those the corpus is made of."""
  return _scan(source_dir)[0]


def listing_digest(source_dir):
  """SHA-256 of the source's .py files' paths, sizes and modification
  times: what changes when a file is added, removed or edited, read with
  one stat a file (the stdlib's ~2,000 in milliseconds), not its bytes."""
  digest = hashlib.sha256()
  for rel in list_files(source_dir):
    stat = os.stat(os.path.join(source_dir, rel))
    digest.update(f'{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n'.encode())
  return digest.hexdigest()


@dataclasses.dataclass(eq=False)
class PythonCodeConfig(tfds.core.BuilderConfig):
  source_dir: str = ''
  val_fraction: float = 0.05


def make_config(source_dir, val_fraction):
  """A config whose name identifies (resolved source_dir, val_fraction).
  `~` is the user's home, as in data.data_dir (no shell expands it in
  `--config.data.source=~/code`)."""
  source_dir = os.path.expanduser(source_dir)
  if not os.path.isdir(source_dir):
    raise ValueError(f'Source directory does not exist: {source_dir!r}'
                     if not os.path.exists(source_dir) else
                     f'Source {source_dir!r} is not a directory')
  if not 0 < val_fraction < 1:
    raise ValueError(f'val_fraction must be in (0, 1), got {val_fraction}')
  source_dir = os.path.realpath(source_dir)
  key = f'{source_dir}\0{val_fraction!r}'.encode('utf-8')
  digest = hashlib.sha256(key).hexdigest()[:12]
  slug = re.sub(r'[^A-Za-z0-9]+', '_', os.path.basename(source_dir)) or 'root'
  return PythonCodeConfig(
      name=f'{slug}-{digest}',
      description=f'.py files under {source_dir}, val_fraction={val_fraction}',
      source_dir=source_dir,
      val_fraction=val_fraction)


class PythonCode(tfds.core.GeneratorBasedBuilder):
  """Python source files as {'path', 'text'} examples, stored as array_record.

  array_record gives random access through `as_data_source()`, which is how
  this project reads TFDS data without TensorFlow.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def __init__(self, *, source_dir=None, val_fraction=0.05, **kwargs):
    if 'config' not in kwargs:  # Unpickling passes the config back in.
      kwargs['config'] = make_config(source_dir or stdlib_dir(), val_fraction)
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'path': tfds.features.Text(),
            'text': tfds.features.Text(),
        }),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    config = self.builder_config
    root = config.source_dir
    # Taken before the files are read: one edited while they are differs
    # from it, so the next load builds again (taken after, it matched the
    # edit for good, while the manifest held the text from before it).
    digest = listing_digest(root)
    paths, not_files, skipped, same_files, not_read, dir_links = _scan(root)
    if not_read:
      logging.warning('%s: %d directories could not be read, their .py files '
                      'left out: %s', root, len(not_read), ', '.join(not_read))
    if dir_links:
      logging.warning('%s: %d links to directories not followed, their .py '
                      'files left out: %s', root, len(dir_links),
                      ', '.join(dir_links))
    files = []
    for rel in paths:
      with open(os.path.join(root, rel), 'rb') as f:
        content = f.read()
      try:
        content.decode('utf-8')
      except UnicodeDecodeError:  # Tokenizer round trips are defined on text.
        skipped.append(rel)
        continue
      files.append({
          'path': rel,
          'size': len(content),
          'sha256': hashlib.sha256(content).hexdigest(),
          'split': split_of(rel, config.val_fraction),
      })
    logging.info('%s: %d .py files, %d skipped as not UTF-8, %d as not '
                 'files, %d as links to a file listed.', root, len(files),
                 len(skipped), len(not_files), len(same_files))
    if not files:
      raise ValueError(f'No UTF-8 .py files under {root!r}: empty corpus' + (
          f' (not read: {", ".join(not_read)})' if not_read else '') + (
              f' (links to directories, not followed: {", ".join(dir_links)})'
              if dir_links else '') + '.')
    splits = {
        split: [f['path'] for f in files if f['split'] == split]
        for split in ('train', 'validation')
    }
    for split, paths in splits.items():
      if not paths:
        raise ValueError(
            f'Corpus too small: the {split} split of {root!r} is empty '
            f'({len(files)} files, val_fraction={config.val_fraction}).')
    # self.data_path is the temporary directory being prepared here, so the
    # manifest appears atomically together with the records.
    manifest = {
        'source_dir': root,
        'val_fraction': config.val_fraction,
        'listing_digest': digest,
        'files': files,
        'skipped_not_utf8': skipped,
        'skipped_not_files': not_files,
        'skipped_same_files': same_files,
        'skipped_unreadable_dirs': not_read,
        'skipped_dir_links': dir_links,
    }
    (self.data_path / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return {
        split: self._generate_examples(paths)
        for split, paths in splits.items()
    }

  def _generate_examples(self, paths):
    root = self.builder_config.source_dir
    for rel in paths:
      with open(os.path.join(root, rel), encoding='utf-8', newline='') as f:
        yield rel, {'path': rel, 'text': f.read()}
