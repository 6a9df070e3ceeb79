"""Token streams for language-model training, and batches cut from them.

`load` prepares a corpus once (TFDS dataset, BPE tokenizer trained on its
train split, tokenized splits as .npy) and afterwards just reads the caches.
`get_batch` cuts a token stream into non-overlapping windows and draws batches
that are a pure function of (seed, step): every window is seen once per epoch,
and a resumed run sees exactly the batches an uninterrupted one would have.

Sources (`data_config.source`):
  'stdlib'     the .py files of the running interpreter's standard library;
  a directory  its .py files (both via the `python_code` builder);
  'tfds:NAME'  any prepared-or-preparable TFDS dataset with a text feature
               `data_config.text_feature`, read via `as_data_source` (so
               without TensorFlow); its caches live under
               DATA_DIR/sparse_gpt2/FULL_NAME/TEXT_FEATURE.
"""

import contextlib
import dataclasses
import errno
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import time

from absl import logging
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants as tfds_constants
import tokenizers

from sparse_gpt2 import locks
from sparse_gpt2 import workdir as workdir_lib
from sparse_gpt2.data import python_code
from sparse_gpt2.data import tokenizer as tokenizer_lib

SPLITS = ('train', 'validation')


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A tokenized corpus: documents joined by `eot_id`, one stream per split.

  Attributes:
    tokenizer: the byte-level BPE the tokens were made with.
    eot_id: id of '<|endoftext|>', the separator between documents.
    train_tokens: 1-D uint16 token stream of the train split (read-only,
      memory-mapped).
    val_tokens: 1-D uint16 token stream of the validation split (likewise).
    train_sha256: SHA-256 of train_tokens (`_stream_digest`).
    manifest_path: JSON describing exactly which data went into the splits.
    data_dir: directory holding tokenizer.json and the token caches.
  """
  tokenizer: tokenizers.Tokenizer
  eot_id: int
  train_tokens: np.ndarray
  val_tokens: np.ndarray
  train_sha256: str
  manifest_path: str
  data_dir: str


@dataclasses.dataclass(frozen=True)
class _Source:
  builder: tfds.core.DatasetBuilder
  split_specs: dict  # Split name in SPLITS -> TFDS split spec.
  text_feature: str
  cache_dir: str
  manifest_path: str


def _data_dir(data_config):
  """data.data_dir with `~` as the user's home (no shell expands it in
  `--config.data.data_dir=~/data`; TFDS would build in a folder named `~`
  below the current one), or None for TFDS's own."""
  return os.path.expanduser(data_config.data_dir) or None


def _open_python_code(source_dir, data_config):
  make = functools.partial(python_code.PythonCode, source_dir=source_dir,
                           val_fraction=data_config.val_fraction,
                           data_dir=_data_dir(data_config))
  builder = make()
  manifest = os.path.join(builder.data_dir, python_code.MANIFEST)
  for stale in glob.glob(f'{glob.escape(builder.data_dir)}.stale*'):
    # Its removal below stopped mid-way (a Ctrl-C); another process's may
    # be under way.
    shutil.rmtree(stale, ignore_errors=True)
  if os.path.exists(manifest):
    try:
      with open(manifest) as f:
        built_from = json.load(f).get('listing_digest')
    except (ValueError, AttributeError):  # Damaged: built again.
      built_from = ''
    # None: built before the digest was recorded, left as it is.
    if built_from not in (None, python_code.listing_digest(
        builder.builder_config.source_dir)):
      logging.warning('%s changed since its corpus was built; building it '
                      'again (and its BPE and token caches).', source_dir)
      # Moved aside at once, then removed: a Ctrl-C inside the removal left
      # the old BPE and token caches without the manifest that dates them,
      # and every later run read them as the edited folder's.
      stale = f'{builder.data_dir}.stale{os.getpid()}'
      os.replace(builder.data_dir, stale)
      shutil.rmtree(stale)
      builder = make()  # Afresh: the old one read the removed dataset's info.
  try:
    _prepare(builder)
  except (ValueError, OSError):  # An empty or too small corpus, a file
    # removed or denied while it was read: no empty folders left for it
    # below the data folder, which may be the user's (a folder not empty,
    # a built dataset, is kept; one not removed leaves this error said).
    folder, root = builder.data_dir, os.fspath(builder.data_dir_root)
    while os.path.normpath(folder) != os.path.normpath(root) and not (
        os.path.isdir(folder) and os.listdir(folder)):
      if os.path.isdir(folder):
        with contextlib.suppress(OSError):
          os.rmdir(folder)
      folder = os.path.dirname(folder)
    raise
  return _Source(
      builder=builder,
      split_specs={split: split for split in SPLITS},
      text_feature='text',
      cache_dir=builder.data_dir,
      manifest_path=os.path.join(builder.data_dir, python_code.MANIFEST))


def _prepare(builder):
  """builder.download_and_prepare(), a full disk (or quota) raised as the
  OSError it is: array_record's writer says it in a RuntimeError, which
  was a traceback of 70 lines."""
  try:
    builder.download_and_prepare()
  except RuntimeError as e:
    full = [n for n in (errno.ENOSPC, errno.EDQUOT)
            if os.strerror(n) in str(e)]
    if not full:
      raise
    raise OSError(full[0], os.strerror(full[0]),
                  os.fspath(builder.data_dir)) from None


def _open_tfds(name, data_config):
  """A TFDS dataset; validation is its 'validation' or 'test' split if any.

  Otherwise the last val_fraction of 'train' is held out. The caches depend
  on the text feature and the held-out count, so both name their directory.
  """
  try:
    builder = tfds.builder(name, data_dir=_data_dir(data_config))
  except tfds.core.registered.DatasetNotFoundError as e:  # Lists ~500 names.
    raise ValueError(f'{str(e).splitlines()[0]} (tfds.list_builders() names '
                     'the known ones)') from None
  except ValueError as e:  # A name TFDS cannot parse; then its format help.
    raise ValueError(f'tfds:{name}: {str(e).splitlines()[0]}') from None
  # Known before any download: a dataset without the text is refused first.
  features = builder.info.features
  if data_config.text_feature not in features:
    raise ValueError(f'tfds:{name} has no feature data.text_feature='
                     f'{data_config.text_feature!r}: {list(features)}')
  if not isinstance(features[data_config.text_feature], tfds.features.Text):
    raise ValueError(
        f'tfds:{name} feature data.text_feature={data_config.text_feature!r} '
        f'is not text: {features[data_config.text_feature]!r}')
  try:
    builder.download_and_prepare(file_format='array_record')
  except Exception as e:  # pylint: disable=broad-except  A network, a server.
    raise ValueError(f'tfds:{name} could not be downloaded and prepared '
                     f'({type(e).__name__}: {str(e).splitlines()[0]})'
                     ) from e
  splits = builder.info.splits
  if 'train' not in splits:
    raise ValueError(f'tfds:{name} has no train split: {list(splits)}')
  cache_dir = os.path.join(builder.data_dir_root, 'sparse_gpt2',
                           builder.info.full_name, data_config.text_feature)
  held_out = next((s for s in ('validation', 'test') if s in splits), None)
  if held_out:
    specs = {'train': 'train', 'validation': held_out}
  else:
    k = max(1, round(splits['train'].num_examples * data_config.val_fraction))
    specs = {'train': f'train[:-{k}]', 'validation': f'train[-{k}:]'}
    cache_dir = os.path.join(cache_dir, f'heldout{k}')
  os.makedirs(cache_dir, exist_ok=True)
  manifest_path = os.path.join(cache_dir, 'manifest.json')
  if not os.path.exists(manifest_path):
    manifest = {
        'source': f'tfds:{name}',
        'full_name': builder.info.full_name,
        'data_dir': builder.data_dir,
        'splits': specs,
        'text_feature': data_config.text_feature,
    }
    workdir_lib.write_atomic(manifest_path, json.dumps(manifest, indent=1))
  return _Source(
      builder=builder,
      split_specs=specs,
      text_feature=data_config.text_feature,
      cache_dir=cache_dir,
      manifest_path=manifest_path)


def _open_source(data_config):
  source = data_config.source
  if source.startswith('tfds:'):
    return _open_tfds(source[len('tfds:'):], data_config)
  if source == 'stdlib':
    return _open_python_code(python_code.stdlib_dir(), data_config)
  return _open_python_code(source, data_config)


def _remove_killed_writes(path):
  """Removes the temporary files of writes to `path`
  (`workdir.write_atomic_with`) that a killed run left, SIGKILL running no
  cleanup: a large corpus's tokens are gigabytes. The data folder's lock is held, so none is still being
  written."""
  for tmp in glob.glob(f'{glob.escape(path)}.tmp*'):
    os.remove(tmp)


def _text_chunks(data_source, feature):
  """Yields lists of document strings, reading records 256 at a time."""
  n = len(data_source)
  for start in range(0, n, 256):
    keys = list(range(start, min(start + 256, n)))
    texts = [row[feature] for row in data_source.__getitems__(keys)]
    # Text features decode to bytes in numpy; other sources may give str.
    yield [t.decode('utf-8') if isinstance(t, bytes) else str(t) for t in texts]


def _npy_header(f, length):
  """The .npy header of a 1-D uint16 array of `length`: 128 bytes whatever
  the length (padded to 64), so it can be written first and again last."""
  np.lib.format.write_array_header_1_0(f, {
      'descr': np.lib.format.dtype_to_descr(np.dtype(np.uint16)),
      'fortran_order': False, 'shape': (length,)})


# Text encoded at once. `tokenizers` holds ~300 bytes a token while it
# encodes (or trains on) a text, so a document of many megabytes is cut
# into pieces, and a batch of pieces is bounded: ~1 GB at the peak, not a
# multiple of the largest document's or of the corpus's size.
_PIECE_CHARS = 1 << 20
_BATCH_CHARS = 1 << 22
# Before white space that follows a non-space character: the byte-level
# pre-tokenizer ends a pre-token there whatever comes before or after it (no
# pre-token runs from a non-space character into white space). ASCII white
# space only, which its regex takes for white space too (Python's \s also
# has \x1c-\x1f, punctuation to it). Cut only after a line break followed by
# a non-space character, a file whose lines are all indented (a generated
# table) or one long line stayed whole: 5 MB of it peaked at 1.3 GB (cut,
# 0.8 GB), in proportion to its size.
_CUT = re.compile(r'(?<=\S)(?=[\t\n\v\f\r ])')


def _pieces(text):
  """`text` cut before white space (`_CUT`) into pieces of _PIECE_CHARS or
  a little more, whose tokens, joined, are exactly the whole text's: BPE
  merges within a pre-token, never across one. A text without such a
  place (a long literal without spaces) stays whole."""
  start = 0
  while len(text) - start > _PIECE_CHARS:
    cut = _CUT.search(text, start + _PIECE_CHARS)
    if not cut:
      break
    yield text[start:cut.start()]
    start = cut.start()
  yield text[start:]


def _batches(texts):
  """Each document's pieces as (starts_a_document, piece), in batches of at
  most _BATCH_CHARS (or one piece)."""
  batch, size = [], 0
  for text in texts:
    for i, piece in enumerate(_pieces(text)):
      if batch and size + len(piece) > _BATCH_CHARS:
        yield batch
        batch, size = [], 0
      batch.append((i == 0, piece))
      size += len(piece)
  if batch:
    yield batch


def _write_tokens(f, tokenizer, data_source, feature, eot_id, name):
  """Writes every document's tokens, joined by eot_id, to the file `f` as
  one uint16 .npy stream, a batch of pieces of documents at a time, never
  holding the stream whole: the header, which holds its length, is written
  again at the end."""
  n = len(data_source)
  sep = np.array([eot_id], np.uint16)
  docs, chars, tokens, logged = 0, 0, 0, 0
  start = time.time()
  _npy_header(f, 0)
  for texts in _text_chunks(data_source, feature):
    for batch in _batches(texts):
      arrays = []
      encodings = tokenizer.encode_batch_fast([piece for _, piece in batch])
      for (first, _), encoding in zip(batch, encodings):
        if encoding.ids:  # Empty files (many __init__.py) would add EOTs.
          if first and (tokens or arrays):  # EOT between documents, not
            arrays.append(sep)  # before the first nor inside one.
          arrays.append(np.asarray(encoding.ids, np.uint16))
      if arrays:
        chunk = np.concatenate(arrays)
        f.write(chunk.tobytes())
        tokens += chunk.size
    docs += len(texts)
    chars += sum(len(t) for t in texts)
    if docs == n or docs * 20 // n > logged:  # About 20 progress lines.
      logged = docs * 20 // n
      logging.info('%s: tokenized %d/%d documents (%.0f%%), %d tokens, '
                   '%.0fs.', name, docs, n, 100 * docs / n, tokens,
                   time.time() - start)
  data_bytes = f.tell()
  f.seek(0)
  _npy_header(f, tokens)
  assert f.tell() + 2 * tokens == data_bytes, 'the header changed length'
  logging.info('%s: %d tokens from %d chars (%.2f chars/token).',
               name, tokens, chars, chars / max(tokens, 1))


def _validate(data_config):
  """One-line errors for a data config that cannot make a corpus, before
  a source is opened (a TFDS dataset may download and prepare first)."""
  if not data_config.source:  # The `python_code` builder reads no source
    # as the standard library: `--config.data.source=$CODE` with CODE unset
    # trained on it without a word.
    raise ValueError("data.source is empty: give 'stdlib', a directory of "
                     "code or 'tfds:NAME'")
  if not 0 < data_config.val_fraction < 1:  # Held out of 'train' where the
    # dataset has no held-out split; NaN is refused too.
    raise ValueError('data.val_fraction must be in (0, 1), got '
                     f'{data_config.val_fraction}')
  if not tokenizer_lib.MIN_VOCAB <= data_config.vocab_size <= 2**16:
    raise ValueError(f'data.vocab_size must be in [{tokenizer_lib.MIN_VOCAB}, '
                     f'65536] (the 256 bytes and {tokenizer_lib.EOT} first; '
                     f'uint16 tokens), got {data_config.vocab_size}')
  # The caches are written with os and numpy: a URL's went below the
  # current folder, in one named like it, and its changed source was never
  # seen (or, without the library for it, a traceback).
  root = _data_dir(data_config) or tfds_constants.DATA_DIR
  if '://' in root:
    raise ValueError(
        f'data.data_dir {root} is not a local folder (the corpus and its '
        'caches are local files)' if data_config.data_dir else
        f'TFDS_DATA_DIR {root} is not a local folder (the corpus and its '
        'caches are local files): set data.data_dir to one')


def _tokenizer(source, vocab_size):
  """(data_dir, tokenizer): the cached BPE, or one trained on the train
  split and cached. The token caches of an earlier BPE (its file removed)
  go first, so they are made again from the new one."""
  data_dir = os.path.join(source.cache_dir, f'bpe{vocab_size}')
  os.makedirs(data_dir, exist_ok=True)
  path = os.path.join(data_dir, 'tokenizer.json')
  if os.path.exists(path):
    try:
      return data_dir, tokenizer_lib.load(path)
    except Exception as e:  # pylint: disable=broad-except  `tokenizers`' own.
      logging.warning('%s is damaged (%s); training it again.', path,
                      str(e).splitlines()[0] if str(e) else type(e).__name__)
  for split in SPLITS:  # The old BPE's tokens, and their digest's record.
    for name in (f'{split}.npy', _digest_record(f'{split}.npy')):
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(data_dir, name))
  train_source = source.builder.as_data_source(
      split=source.split_specs['train'])
  texts = (piece for chunk in _text_chunks(train_source, source.text_feature)
           for text in chunk for piece in _pieces(text))  # Same merges.
  tokenizer = tokenizer_lib.train(texts, vocab_size)
  _remove_killed_writes(path)
  # What `tokenizers`' own save writes, written as the caches are: that
  # save said a full disk in a bare Exception (a traceback) and left its
  # temporary file.
  workdir_lib.write_atomic(path, tokenizer.to_str(pretty=True))
  return data_dir, tokenizer


def load_tokenizer(data_config):
  """The corpus's BPE alone, for a run's Hugging Face export: where its
  token caches are missing (another machine), `load` would tokenize the
  whole corpus first. Trained and cached first where `load` has not yet
  been called."""
  _validate(data_config)
  with _one_builder(data_config):
    return _tokenizer(_open_source(data_config), data_config.vocab_size)[1]


@contextlib.contextmanager
def _one_builder(data_config):
  """One process at a time prepares, or reads, the corpora of a data
  folder: two first starts at once (the twins launched together) both
  prepared the corpus, and the second's rename of it failed. The others
  wait for the caches, then read them. A folder this process may not write
  (a shared cache, a read-only mount) is not locked: its built corpora are
  read, and one to build fails at its first write."""
  root = _data_dir(data_config) or tfds_constants.DATA_DIR
  try:
    os.makedirs(root, exist_ok=True)
    try:
      lock = locks.hold(os.path.join(root, '.sparse_gpt2.lock'), wait=True)
    except OSError as e:
      if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
        raise
      logging.warning('No lock in %s (%s): reading its corpora unlocked.',
                      root, e.strerror)
      lock = contextlib.nullcontext()
    with lock:  # Closing the file drops the lock.
      yield
  except OSError as e:  # Not a PermissionError, which says its path.
    if e.errno != errno.EROFS:
      raise
    raise ValueError(f'data.data_dir {root}: cannot write {e.filename} '
                     f'({e.strerror})') from None


def _read_tokens(path):
  """The token cache at `path`, memory-mapped; None where it is missing or
  damaged (cut short, emptied, not a 1-D uint16 array: its header holds
  the length), so that it is made again rather than failing every start."""
  if not os.path.exists(path):
    return None
  try:
    tokens = np.load(path, mmap_mode='r')
  except (ValueError, EOFError) as e:
    logging.warning('%s is damaged (%s); making it again.', path, e)
    return None
  if tokens.dtype != np.uint16 or tokens.ndim != 1:
    logging.warning('%s holds %s %s, not a uint16 token stream; making it '
                    'again.', path, tokens.dtype, tokens.shape)
    return None
  return tokens


def load(data_config, seq_len):
  """Returns the tokenized corpus, preparing and caching it on first use.

  The token streams are memory-mapped from their caches, read-only: a
  batch reads its windows, so a corpus larger than memory trains too.

  Args:
    data_config: `config.data` (source, text_feature, data_dir, vocab_size,
      val_fraction).
    seq_len: model context; each split must hold one window of seq_len + 1.

  Raises:
    ValueError: for a missing or empty source directory, or a split too small
      for one window.
  """
  _validate(data_config)
  with _one_builder(data_config):
    return _load(data_config, seq_len)


def _load(data_config, seq_len):
  source = _open_source(data_config)
  data_dir, tokenizer = _tokenizer(source, data_config.vocab_size)
  eot_id = tokenizer_lib.eot_id(tokenizer)

  tokens = {}
  for split in SPLITS:
    path = os.path.join(data_dir, f'{split}.npy')
    tokens[split] = _read_tokens(path)
    if tokens[split] is None:
      data_source = source.builder.as_data_source(
          split=source.split_specs[split])
      _remove_killed_writes(path)
      workdir_lib.write_atomic_with(path, functools.partial(
          _write_tokens, tokenizer=tokenizer, data_source=data_source,
          feature=source.text_feature, eot_id=eot_id, name=split))
      tokens[split] = np.load(path, mmap_mode='r')
    if num_windows(tokens[split], seq_len) < 1:
      raise ValueError(
          f'Corpus too small: the {split} split of {data_config.source!r} has '
          f'{tokens[split].size} tokens, fewer than one window of seq_len+1='
          f'{seq_len + 1}.')
  logging.info('Corpus %s: %d train / %d validation tokens in %s.',
               data_config.source, tokens['train'].size,
               tokens['validation'].size, data_dir)
  return Corpus(
      tokenizer=tokenizer,
      eot_id=eot_id,
      train_tokens=tokens['train'],
      val_tokens=tokens['validation'],
      train_sha256=_stream_digest(os.path.join(data_dir, 'train.npy'),
                                  tokens['train']),
      manifest_path=source.manifest_path,
      data_dir=data_dir)


def _digest_record(path):
  return f'{path}.sha256.json'


def _stream_digest(path, tokens):
  """The SHA-256 of the token stream `tokens` cached at `path`: read from
  its record beside it (PATH.sha256.json, which names the file's size and
  modification time it was taken at), else taken now and recorded where
  the folder takes it. So a train stream of gigabytes, memory-mapped, is
  read whole once, not at every start of every host."""
  stat = os.stat(path)
  stamp = {'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns}
  record_path = _digest_record(path)
  with contextlib.suppress(OSError, ValueError):
    with open(record_path) as f:
      record = json.load(f)
    if (isinstance(record, dict) and isinstance(record.get('sha256'), str)
        and {k: record.get(k) for k in stamp} == stamp):
      return record['sha256']
  digest = hashlib.sha256(np.ascontiguousarray(tokens)).hexdigest()
  with contextlib.suppress(OSError):  # A folder this process may not write.
    workdir_lib.write_atomic(record_path,
                             json.dumps({**stamp, 'sha256': digest}))
  return digest


def fingerprint(corpus):
  """What names a corpus's content wherever it was built: its vocabulary,
  the token count of each split and each stream's digest (a different
  source, or the same one tokenized otherwise, changes them; a train file
  edited to as many tokens, `i = 0` made `i = 1`, changes only the train
  stream's). Not its files' paths, nor tokenizer.json's formatting, which
  another machine or `tokenizers` version may write otherwise."""
  return {'vocab_sha256': vocab_digest(corpus.tokenizer),
          'train_tokens': int(corpus.train_tokens.size),
          'validation_tokens': int(corpus.val_tokens.size),
          'train_sha256': corpus.train_sha256,
          'validation_sha256': hashlib.sha256(
              np.ascontiguousarray(corpus.val_tokens)).hexdigest()}


def vocab_digest(tokenizer):
  """SHA-256 of a BPE's vocabulary, token by token (`fingerprint`'s)."""
  vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
  return hashlib.sha256(vocab.encode()).hexdigest()


def num_windows(tokens, seq_len):
  """Number of non-overlapping windows of seq_len + 1 tokens in `tokens`."""
  return len(tokens) // (seq_len + 1)


@functools.lru_cache(maxsize=4)
def _permutation(seed, epoch, n):
  """The window order of one epoch; cached, as consecutive steps share it."""
  order = np.random.default_rng((seed, epoch)).permutation(n)
  order.flags.writeable = False  # Shared through the cache.
  return order


def get_batch(tokens, step, *, seed, batch_size, seq_len, rows=None):
  """Rows `rows` (default all) of the global batch at `step`, int32
  [len(rows), L+1].

  Window i is tokens[i*(L+1) : (i+1)*(L+1)]; inputs are [:, :-1], targets
  [:, 1:]. Global example g = step*B + b is window
  permutation(seed, g // n)[g % n], so each epoch visits every window once,
  and the batch depends only on (seed, step), never on what ran before. A
  process asks only for the rows its devices hold.
  """
  n = num_windows(tokens, seq_len)
  if n < 1:
    raise ValueError(f'{len(tokens)} tokens hold no window of {seq_len + 1}')
  rows = np.arange(batch_size) if rows is None else np.asarray(rows)
  g = step * batch_size + rows.astype(np.int64)
  epochs, slots = np.divmod(g, n)
  windows = np.empty(len(rows), np.int64)
  for epoch in np.unique(epochs):  # A batch can straddle an epoch boundary.
    mask = epochs == epoch
    windows[mask] = _permutation(seed, int(epoch), n)[slots[mask]]
  index = windows[:, None] * (seq_len + 1) + np.arange(seq_len + 1)
  return tokens[index].astype(np.int32)


def unigram_entropy(train_tokens, val_tokens):
  """Cross-entropy (nats/token) of val under the train unigram distribution.

  The loss of the best context-free predictor: the baseline any language
  model must beat. Add-one smoothing keeps tokens unseen in train finite.
  """
  size = int(max(train_tokens.max(), val_tokens.max())) + 1
  counts = np.bincount(train_tokens, minlength=size) + 1.0
  log_probs = np.log(counts / counts.sum())
  return float(-log_probs[val_tokens].mean())
