"""Tests for sparse_gpt2.data on a tiny generated corpus (CPU, seconds)."""

import errno
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from sparse_gpt2 import data
from sparse_gpt2 import locks
from sparse_gpt2 import workdir as workdir_lib
from sparse_gpt2.data import python_code
from sparse_gpt2.data import tokenizer as tokenizer_lib

SEQ_LEN = 16
VAL_FRACTION = 0.25


def _source_text(i):
  """Python-ish text with the awkward parts: unicode, tabs, CRLF, specials."""
  rng = random.Random(i)
  lines = [f'"""Module {i}: ünïcödé ✓ 漢字."""', 'import os', '']
  for j in range(rng.randint(3, 12)):
    lines += [f'def f_{i}_{j}(x, y={rng.randint(0, 99)}):',
              f'\tz = x * {rng.random():.3f}  ',
              "    return z + len('<|endoftext|>') + y", '']
  newline = '\r\n' if i % 5 == 0 else '\n'
  text = newline.join(lines)
  return text if i % 7 else text.rstrip()  # Some files lack a final newline.


@pytest.fixture(scope='module')
def corpus_dir(tmp_path_factory):
  """20 UTF-8 .py files (one empty) plus files the builder must ignore."""
  root = tmp_path_factory.mktemp('src')
  files = {}
  for i in range(20):
    rel = f'pkg{i % 3}/sub{i % 2}/mod_{i}.py'
    files[rel] = '' if i == 3 else _source_text(i)
  for rel, text in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode('utf-8'))
  (root / 'latin1.py').write_bytes('x = "caf\xe9"\n'.encode('latin-1'))
  (root / 'site-packages' / 'dep').mkdir(parents=True)
  (root / 'site-packages' / 'dep' / 'thirdparty.py').write_text('x = 1\n')
  (root / 'notes.txt').write_text('not python\n')
  return root, files


def _config(source, data_dir, **overrides):
  config = ml_collections.ConfigDict(dict(
      source=str(source), text_feature='text', data_dir=str(data_dir),
      vocab_size=300, val_fraction=VAL_FRACTION))
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


@pytest.fixture(scope='module')
def corpus(corpus_dir, data_dir):
  return data.load(_config(corpus_dir[0], data_dir), SEQ_LEN)


def test_builder_reads_back_every_file_in_its_split(corpus_dir, data_dir):
  root, files = corpus_dir
  builder = python_code.PythonCode(
      source_dir=str(root), val_fraction=VAL_FRACTION, data_dir=str(data_dir))
  builder.download_and_prepare()
  read = {}
  for split in ('train', 'validation'):
    for row in builder.as_data_source(split=split):
      path = row['path'].decode()
      assert path not in read, 'splits must be disjoint'
      assert python_code.split_of(path, VAL_FRACTION) == split
      read[path] = row['text'].decode()
  assert read == files  # Exact text; no latin-1, site-packages or .txt file.
  assert builder.info.splits['validation'].num_examples > 0


def test_manifest_lists_every_file_with_sha256(corpus, corpus_dir):
  root, files = corpus_dir
  with open(corpus.manifest_path) as f:
    manifest = json.load(f)
  assert manifest['source_dir'] == os.path.realpath(root)
  assert manifest['skipped_not_utf8'] == ['latin1.py']
  assert [f['path'] for f in manifest['files']] == sorted(files)
  for entry in manifest['files']:
    content = files[entry['path']].encode('utf-8')
    assert entry['size'] == len(content)
    assert entry['sha256'] == hashlib.sha256(content).hexdigest()
    assert entry['split'] == python_code.split_of(entry['path'], VAL_FRACTION)


def test_split_of_is_stable_and_proportional():
  paths = [f'dir/file_{i}.py' for i in range(4000)]
  splits = [python_code.split_of(p, 0.1) for p in paths]
  assert splits == [python_code.split_of(p, 0.1) for p in paths]
  assert 0.08 < splits.count('validation') / len(paths) < 0.12
  # Pinned to the documented rule, so a change of hash (which would reshuffle
  # every existing corpus) fails loudly.
  for path in paths[:100]:
    u = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], 'big')
    expected = 'validation' if u / 2**64 < 0.1 else 'train'
    assert python_code.split_of(path, 0.1) == expected


def test_config_name_changes_with_source(tmp_path):
  (tmp_path / 'a').mkdir()
  (tmp_path / 'b').mkdir()
  a = python_code.make_config(str(tmp_path / 'a'), 0.05)
  assert a.name == python_code.make_config(str(tmp_path / 'a'), 0.05).name
  assert a.name != python_code.make_config(str(tmp_path / 'b'), 0.05).name
  assert a.name != python_code.make_config(str(tmp_path / 'a'), 0.1).name
  # Any path to the folder names it alike: its corpus is built once.
  os.symlink(tmp_path / 'a', tmp_path / 'link')
  assert a.name == python_code.make_config(str(tmp_path / 'link'), 0.05).name


def test_tokenizer_round_trips_every_file(corpus, corpus_dir):
  _, files = corpus_dir
  tokenizer = corpus.tokenizer
  assert tokenizer.get_vocab_size() == 300
  for text in files.values():
    ids = tokenizer.encode(text).ids
    assert corpus.eot_id not in ids  # The literal string is plain text.
    assert tokenizer.decode(ids) == text


def test_the_bpe_encodes_bytes_its_train_split_lacks():
  """All 256 bytes are in the vocabulary, so a validation text with a
  character the train split never had is encoded, not dropped."""
  tokenizer = tokenizer_lib.train(['x = 1\n'] * 3, tokenizer_lib.MIN_VOCAB)
  text = 'café ✓ 漢字\x00\x7f'
  assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_token_streams_are_documents_joined_by_eot(corpus, corpus_dir):
  _, files = corpus_dir
  for split, tokens in (('train', corpus.train_tokens),
                        ('validation', corpus.val_tokens)):
    assert tokens.dtype == np.uint16 and tokens.ndim == 1
    docs = [files[p] for p in sorted(files)
            if files[p] and python_code.split_of(p, VAL_FRACTION) == split]
    pieces = np.split(tokens, np.flatnonzero(tokens == corpus.eot_id))
    pieces = [pieces[0]] + [p[1:] for p in pieces[1:]]  # Drop the EOTs.
    assert [corpus.tokenizer.decode(p.tolist()) for p in pieces] == docs


class _Docs:
  """A data source of in-memory documents, read as `_text_chunks` reads."""

  def __init__(self, texts):
    self.texts = texts

  def __len__(self):
    return len(self.texts)

  def __getitems__(self, keys):
    return [{'text': self.texts[k].encode()} for k in keys]


def test_documents_are_joined_by_eot_across_chunks(corpus):
  """More documents than one chunk of 256: the first document of each later
  chunk follows an EOT too; empty documents (one first, one opening a chunk)
  add none, and nothing comes before the first document."""
  texts = [f'x = {i}\n' for i in range(600)]
  texts[0] = texts[256] = texts[300] = ''
  f = io.BytesIO()
  data._write_tokens(f, corpus.tokenizer, _Docs(texts), 'text', corpus.eot_id,
                     'test')
  f.seek(0)
  tokens = np.load(f)
  assert tokens.dtype == np.uint16 and tokens.ndim == 1
  docs = [t for t in texts if t]
  assert np.count_nonzero(tokens == corpus.eot_id) == len(docs) - 1
  pieces = np.split(tokens, np.flatnonzero(tokens == corpus.eot_id))
  pieces = [pieces[0]] + [p[1:] for p in pieces[1:]]  # Drop the EOTs.
  assert [corpus.tokenizer.decode(p.tolist()) for p in pieces] == docs


def test_second_load_uses_the_cache(corpus, corpus_dir, data_dir):
  cached = [os.path.join(corpus.data_dir, name)
            for name in ('tokenizer.json', 'train.npy', 'validation.npy')]
  mtimes = [os.stat(path).st_mtime_ns for path in cached]
  again = data.load(_config(corpus_dir[0], data_dir), SEQ_LEN)
  assert [os.stat(path).st_mtime_ns for path in cached] == mtimes
  np.testing.assert_array_equal(again.train_tokens, corpus.train_tokens)
  np.testing.assert_array_equal(again.val_tokens, corpus.val_tokens)
  # Mapped from the caches, not read into memory, and never written.
  assert again.train_tokens.filename == cached[1]
  assert again.val_tokens.filename == cached[2]
  with pytest.raises(ValueError, match='read-only'):
    again.train_tokens[0] = 0


def test_the_tokenizer_alone_reads_and_writes_no_tokens(corpus, corpus_dir,
                                                        tmp_path):
  config = _config(corpus_dir[0], tmp_path)
  tokenizer = data.load_tokenizer(config)  # Trained here: a fresh cache.
  (data_dir,) = {p.parent for p in tmp_path.rglob('tokenizer.json')}
  assert sorted(os.listdir(data_dir)) == ['tokenizer.json']
  assert tokenizer.get_vocab() == corpus.tokenizer.get_vocab()
  again = data.load(config, SEQ_LEN)  # Tokenizes with the cached BPE.
  np.testing.assert_array_equal(again.train_tokens, corpus.train_tokens)
  assert data.load_tokenizer(config).get_vocab() == corpus.tokenizer.get_vocab()

  # Tokens whose BPE was removed are made again with the new one.
  os.remove(data_dir / 'tokenizer.json')
  np.save(data_dir / 'train.npy', np.zeros(100, np.uint16))
  data.load_tokenizer(config)
  assert sorted(os.listdir(data_dir)) == ['tokenizer.json']
  np.testing.assert_array_equal(
      data.load(config, SEQ_LEN).train_tokens, corpus.train_tokens)


def test_a_damaged_token_cache_is_made_again(corpus, corpus_dir, tmp_path):
  config = _config(corpus_dir[0], tmp_path)
  path = os.path.join(data.load(config, SEQ_LEN).data_dir, 'train.npy')
  whole = open(path, 'rb').read()
  for damaged in (whole[:len(whole) // 2], b'', np.zeros(3, np.int64)):
    if isinstance(damaged, bytes):
      open(path, 'wb').write(damaged)
    else:
      np.save(path, damaged)
    again = data.load(config, SEQ_LEN)
    np.testing.assert_array_equal(again.train_tokens, corpus.train_tokens)
    assert open(path, 'rb').read() == whole
  # So is a damaged BPE, and the tokens made from it.
  bpe = os.path.join(os.path.dirname(path), 'tokenizer.json')
  for damaged in (b'', b'{"version": '):
    open(bpe, 'wb').write(damaged)
    again = data.load(config, SEQ_LEN)
    assert again.tokenizer.get_vocab() == corpus.tokenizer.get_vocab()
    np.testing.assert_array_equal(again.train_tokens, corpus.train_tokens)


def test_a_damaged_manifest_is_built_again(corpus, corpus_dir, tmp_path):
  """The manifest names the data a result cites: one cut short is not
  kept (nor the caches it dates), the corpus is built again."""
  config = _config(corpus_dir[0], tmp_path)
  manifest = data.load(config, SEQ_LEN).manifest_path
  whole = open(manifest).read()
  open(manifest, 'w').write(whole[:len(whole) // 2])
  again = data.load(config, SEQ_LEN)
  assert open(again.manifest_path).read() == whole
  np.testing.assert_array_equal(again.train_tokens, corpus.train_tokens)


def test_an_edited_source_is_built_again(corpus_dir, tmp_path):
  """A file added, edited or removed since the corpus was built: the
  corpus, its BPE and its tokens are made again from the files as they are
  (the prepared dataset is found by the source's path alone)."""
  source = tmp_path / 'src'
  shutil.copytree(corpus_dir[0], source)
  config = _config(source, tmp_path / 'tfds')
  before = data.load(config, SEQ_LEN)
  text = 'def added():\n    return "a file added since"\n'
  (source / 'pkg0' / 'added.py').write_text(text)
  added = data.load(config, SEQ_LEN)
  assert added.data_dir == before.data_dir
  assert added.train_tokens.size + added.val_tokens.size > (
      before.train_tokens.size + before.val_tokens.size)
  with open(added.manifest_path) as f:
    assert 'pkg0/added.py' in [file['path'] for file in json.load(f)['files']]
  again = data.load(config, SEQ_LEN)  # Unchanged: read from the caches.
  assert again.train_tokens.filename == added.train_tokens.filename
  np.testing.assert_array_equal(again.train_tokens, added.train_tokens)
  os.remove(source / 'pkg0' / 'added.py')
  removed = data.load(config, SEQ_LEN)
  np.testing.assert_array_equal(removed.train_tokens, before.train_tokens)
  np.testing.assert_array_equal(removed.val_tokens, before.val_tokens)
  # Edited in place to the same size: its modification time tells.
  edited = source / 'pkg1' / 'sub1' / 'mod_1.py'
  text = edited.read_bytes().replace(b'import os', b'import re', 1)
  assert len(text) == edited.stat().st_size
  mtime = edited.stat().st_mtime_ns
  edited.write_bytes(text)
  os.utime(edited, ns=(mtime + 10**9, mtime + 10**9))  # Coarse clocks.
  rebuilt = data.load(config, SEQ_LEN)
  with open(rebuilt.manifest_path) as f:
    (entry,) = [e for e in json.load(f)['files']
                if e['path'] == 'pkg1/sub1/mod_1.py']
  assert entry['sha256'] == hashlib.sha256(text).hexdigest()
  assert 'import re' in rebuilt.tokenizer.decode(np.concatenate(
      [rebuilt.train_tokens, rebuilt.val_tokens]).tolist())


def test_a_ctrl_c_while_an_edited_source_is_removed_builds_it_again(
    corpus_dir, tmp_path, monkeypatch):
  """A Ctrl-C inside the removal of an edited folder's old corpus left its
  BPE and token caches without the manifest that dates them: every later
  load read them as the edited folder's. Moved aside first, the old corpus
  is gone at once, and what is left of it goes at the next load."""
  source = tmp_path / 'src'
  shutil.copytree(corpus_dir[0], source)
  config = _config(source, tmp_path / 'tfds')
  before = data.load(config, SEQ_LEN)
  (source / 'pkg0' / 'added.py').write_text('def added():\n    return 1\n')

  def interrupted(path):  # The manifest removed, then a Ctrl-C.
    os.remove(os.path.join(path, python_code.MANIFEST))
    raise KeyboardInterrupt

  monkeypatch.setattr(data.shutil, 'rmtree', interrupted)
  with pytest.raises(KeyboardInterrupt):
    data.load(config, SEQ_LEN)
  monkeypatch.undo()
  added = data.load(config, SEQ_LEN)
  assert added.train_tokens.size + added.val_tokens.size > (
      before.train_tokens.size + before.val_tokens.size)
  version_dir = os.path.dirname(added.manifest_path)
  assert os.listdir(os.path.dirname(version_dir)) == ['1.0.0']  # No stale.


def test_the_train_streams_digest_tells_an_edit_of_as_many_tokens(
    corpus_dir, tmp_path):
  """A train file edited to as many tokens (`i = 0` made `i = 1`; the BPE
  trained again to the same merges) left the vocabulary, the counts and the
  validation stream as they were: a run resumed on the edited stream,
  unsaid, which its corpus.json is there to refuse. The stream's digest is
  taken once and recorded beside it (a corpus of gigabytes is not read
  whole at every start), and taken again once the stream changes."""
  config = _config(corpus_dir[0], tmp_path)
  first = data.load(config, SEQ_LEN)
  before = data.fingerprint(first)  # Before the edit, which `first` maps.
  path = os.path.join(first.data_dir, 'train.npy')
  tokens = np.array(first.train_tokens)
  assert first.train_sha256 == hashlib.sha256(tokens).hexdigest()
  # Read from its record: one that says otherwise is believed.
  record = json.loads(open(f'{path}.sha256.json').read())
  with open(f'{path}.sha256.json', 'w') as f:
    json.dump(dict(record, sha256='recorded'), f)
  assert data.load(config, SEQ_LEN).train_sha256 == 'recorded'
  tokens[tokens.size // 2] ^= 1
  stamp = os.stat(path).st_mtime_ns
  np.save(path, tokens)
  os.utime(path, ns=(stamp + 10**9, stamp + 10**9))  # Whatever the clock.
  edited = data.load(config, SEQ_LEN)
  assert edited.train_sha256 == hashlib.sha256(tokens).hexdigest()
  after = data.fingerprint(edited)
  assert [k for k in before if before[k] != after[k]] == ['train_sha256']


def test_listing_digest_sees_an_edit_of_the_same_size(tmp_path):
  """An edit in place that keeps the file's size: its modification time
  changes the digest, so the corpus is built again."""
  (tmp_path / 'a.py').write_text('x = 1\n')
  before = python_code.listing_digest(str(tmp_path))
  assert python_code.listing_digest(str(tmp_path)) == before
  (tmp_path / 'a.py').write_text('x = 2\n')
  mtime = os.stat(tmp_path / 'a.py').st_mtime_ns + 10**9  # Coarse clocks.
  os.utime(tmp_path / 'a.py', ns=(mtime, mtime))
  assert python_code.listing_digest(str(tmp_path)) != before


def test_a_file_edited_while_the_corpus_is_read_is_built_again(
    corpus_dir, tmp_path, monkeypatch):
  """The listing's digest was taken after the files were read: one edited
  in between was in the manifest as it was before, the digest as after, so
  the corpus was never built again from the edit. Taken before, it is."""
  source = tmp_path / 'src'
  shutil.copytree(corpus_dir[0], source)
  config = _config(source, tmp_path / 'tfds')
  edited = source / 'pkg0' / 'sub0' / 'mod_0.py'
  text = b'def edited():\n    return "edited while it was read"\n'
  split_of = python_code.split_of

  def edit_once(relpath, val_fraction):  # Called once a file was read.
    if relpath == 'pkg0/sub0/mod_0.py' and edited.read_bytes() != text:
      mtime = edited.stat().st_mtime_ns + 10**9  # Coarse clocks.
      edited.write_bytes(text)
      os.utime(edited, ns=(mtime, mtime))
    return split_of(relpath, val_fraction)

  monkeypatch.setattr(python_code, 'split_of', edit_once)
  data.load(config, SEQ_LEN)
  monkeypatch.undo()
  again = data.load(config, SEQ_LEN)
  with open(again.manifest_path) as f:
    (entry,) = [e for e in json.load(f)['files']
                if e['path'] == 'pkg0/sub0/mod_0.py']
  assert entry['sha256'] == hashlib.sha256(text).hexdigest()


def test_a_cache_write_is_synced_before_it_is_renamed(tmp_path,
                                                     sync_and_rename):
  workdir_lib.write_atomic_with(str(tmp_path / 'train.npy'),
                                lambda f: f.write(b'data'))
  assert sync_and_rename == ['fsync', 'replace']
  assert os.listdir(tmp_path) == ['train.npy']
  assert (tmp_path / 'train.npy').read_bytes() == b'data'


def test_a_failed_cache_write_leaves_nothing(tmp_path):
  def write_then_fail(f):
    f.write(b'half a cache')
    raise KeyboardInterrupt  # As a Ctrl-C mid-way would.
  with pytest.raises(KeyboardInterrupt):
    workdir_lib.write_atomic_with(str(tmp_path / 'train.npy'),
                                  write_then_fail)
  assert os.listdir(tmp_path) == []

  def write_on_a_full_disk(f):
    f.write(b'half a cache')
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # As write() does.
  # Named, which the disk's error is not: a run's one line said only "No
  # space left on device", of a run that writes to three disks.
  with pytest.raises(OSError) as stopped:
    workdir_lib.write_atomic_with(str(tmp_path / 'train.npy'),
                                  write_on_a_full_disk)
  assert (stopped.value.errno, stopped.value.filename) == (
      errno.ENOSPC, str(tmp_path / 'train.npy'))
  assert os.listdir(tmp_path) == []
  # A file written before is left whole: never half of one at its path.
  (tmp_path / 'train.npy').write_bytes(b'a whole cache')
  with pytest.raises(KeyboardInterrupt):
    workdir_lib.write_atomic_with(str(tmp_path / 'train.npy'),
                                  write_then_fail)
  assert os.listdir(tmp_path) == ['train.npy']
  assert (tmp_path / 'train.npy').read_bytes() == b'a whole cache'


def test_get_batch_is_a_function_of_seed_and_step():
  seq_len, n = 7, 10
  tokens = np.arange(n * (seq_len + 1) + 5, dtype=np.uint16)  # 5 left over.
  kwargs = dict(seed=3, batch_size=4, seq_len=seq_len)
  batch = data.get_batch(tokens, 2, **kwargs)
  assert batch.dtype == np.int32 and batch.shape == (4, seq_len + 1)
  np.testing.assert_array_equal(batch, data.get_batch(tokens, 2, **kwargs))
  assert not np.array_equal(batch, data.get_batch(tokens, 2, **dict(
      kwargs, seed=4)))
  # Rows are whole windows: tokens[w*(L+1) : (w+1)*(L+1)].
  windows = batch[:, 0] // (seq_len + 1)
  np.testing.assert_array_equal(
      batch, windows[:, None] * (seq_len + 1) + np.arange(seq_len + 1))


def test_get_batch_sees_every_window_once_per_epoch():
  seq_len, n = 3, 10
  tokens = np.arange(n * (seq_len + 1), dtype=np.uint16)
  # Batches of 4 over 10 windows straddle the epoch boundaries.
  rows = np.concatenate([
      data.get_batch(tokens, step, seed=0, batch_size=4, seq_len=seq_len)
      for step in range(5)])
  windows = rows[:, 0] // (seq_len + 1)
  assert sorted(windows[:n]) == list(range(n))
  assert sorted(windows[n:]) == list(range(n))
  assert list(windows[:n]) != list(windows[n:])  # A new order per epoch.


def test_any_rows_of_the_global_batch_are_those_rows():
  seq_len = 5
  tokens = np.arange(50 * (seq_len + 1), dtype=np.uint16)
  kwargs = dict(seed=1, batch_size=8, seq_len=seq_len)
  for step in (0, 7):
    full = data.get_batch(tokens, step, **kwargs)
    for rows in ([0, 1, 2, 3], [4, 5, 6, 7], [1, 6], [7]):
      np.testing.assert_array_equal(
          data.get_batch(tokens, step, rows=rows, **kwargs), full[rows])


def test_missing_and_empty_directories_raise(tmp_path):
  with pytest.raises(ValueError, match='does not exist'):
    data.load(_config(tmp_path / 'missing', tmp_path / 'tfds'), SEQ_LEN)
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'readme.txt').write_text('no code here\n')
  with pytest.raises(ValueError, match='readme.txt. is not a directory'):
    data.load(_config(tmp_path / 'empty' / 'readme.txt', tmp_path / 'tfds'),
              SEQ_LEN)
  # Refused before a tokenizer is trained for it; above 65536, ids would
  # wrap in the uint16 token streams.
  for vocab_size in (5, 2**16 + 1):
    with pytest.raises(ValueError, match=r'data.vocab_size must be in \[257, '
                       r"65536\] \(the 256 bytes and <\|endoftext\|> first"):
      data.load(_config(tmp_path / 'empty', tmp_path / 'tfds',
                        vocab_size=vocab_size), SEQ_LEN)
  with pytest.raises(ValueError, match='empty corpus'):
    data.load(_config(tmp_path / 'empty', tmp_path / 'tfds'), SEQ_LEN)
  # val_fraction outside (0, 1) (NaN too) is refused first, in data's words.
  for val_fraction in (0.0, 1.0, float('nan')):
    with pytest.raises(ValueError, match=r'^data\.val_fraction must be in '
                       r'\(0, 1\), got '):
      data.load(_config(tmp_path / 'empty', tmp_path / 'tfds',
                        val_fraction=val_fraction), SEQ_LEN)


def test_an_empty_source_is_refused_not_read_as_the_stdlib(tmp_path,
                                                           monkeypatch):
  """`--config.data.source=$CODE` with CODE unset trained on the standard
  library (the builder's own default; here a folder that is not there, so
  that reading it fails at once) and recorded source '' in the run."""
  monkeypatch.setattr(python_code, 'stdlib_dir',
                      lambda: str(tmp_path / 'stdlib'))
  for load in (data.load, lambda config, _: data.load_tokenizer(config)):
    with pytest.raises(ValueError) as refused:
      load(_config('', tmp_path / 'tfds'), SEQ_LEN)
    assert str(refused.value) == ("data.source is empty: give 'stdlib', a "
                                  "directory of code or 'tfds:NAME'")
  assert not (tmp_path / 'tfds').exists()  # Refused before anything is made.


def test_py_names_that_are_not_files_to_read_are_skipped(corpus, corpus_dir,
                                                        tmp_path):
  """A link to nothing or to itself failed the build (the loop with a
  traceback), a FIFO hung it, a name not UTF-8 failed it without naming
  it: each is skipped, and named in the manifest."""
  source = tmp_path / 'src'
  shutil.copytree(corpus_dir[0], source)
  os.symlink(tmp_path / 'missing.py', source / 'dangling.py')
  os.symlink('loop_b.py', source / 'loop_a.py')
  os.symlink('loop_a.py', source / 'loop_b.py')
  with open(os.path.join(os.fsencode(source), b'caf\xe9.py'), 'wb') as f:
    f.write(b'x = 1\n')
  (source / 'zz').mkdir()  # Read last, so the old failures came first.
  os.mkfifo(source / 'zz' / 'fifo.py')
  # Links to a file listed already (one through the other), walked after
  # it: read again, the same text was in a split by each path.
  os.symlink('../pkg0/sub0/mod_0.py', source / 'zz' / 'again.py')
  os.symlink('again.py', source / 'zz' / 'again_too.py')
  again = data.load(_config(source, tmp_path / 'tfds'), SEQ_LEN)
  np.testing.assert_array_equal(again.train_tokens, corpus.train_tokens)
  np.testing.assert_array_equal(again.val_tokens, corpus.val_tokens)
  with open(again.manifest_path) as f:
    manifest = json.load(f)
  assert manifest['skipped_not_files'] == [
      'dangling.py', 'loop_a.py', 'loop_b.py', 'zz/fifo.py']
  assert manifest['skipped_same_files'] == ['zz/again.py',
                                            'zz/again_too.py']
  assert manifest['skipped_not_utf8'] == ['caf\\xe9.py', 'latin1.py']


def test_hard_links_to_a_file_listed_are_skipped(corpus, corpus_dir,
                                                 tmp_path):
  """Only symbolic links were known for the same file (by real path): a
  hard link was read again, its text in the corpus twice, perhaps once in
  each split. Skipped and named as a symbolic link is."""
  source = tmp_path / 'src'
  shutil.copytree(corpus_dir[0], source)
  (source / 'zz').mkdir()
  os.link(source / 'pkg0' / 'sub0' / 'mod_0.py', source / 'zz' / 'hard.py')
  again = data.load(_config(source, tmp_path / 'tfds'), SEQ_LEN)
  np.testing.assert_array_equal(again.train_tokens, corpus.train_tokens)
  np.testing.assert_array_equal(again.val_tokens, corpus.val_tokens)
  with open(again.manifest_path) as f:
    assert json.load(f)['skipped_same_files'] == ['zz/hard.py']


def test_links_to_directories_are_named(corpus, corpus_dir, tmp_path):
  """os.walk follows no link to a directory, so the .py files behind one
  were left out without a word (a source of only such links was an
  'empty corpus'): each is named in the manifest and the refusal."""
  source = tmp_path / 'src'
  shutil.copytree(corpus_dir[0], source)
  shutil.copytree(corpus_dir[0] / 'pkg2', tmp_path / 'elsewhere')
  os.symlink(tmp_path / 'elsewhere', source / 'outside')
  os.symlink(source / 'pkg1', source / 'pkg0' / 'linked')  # Listed anyway.
  again = data.load(_config(source, tmp_path / 'tfds'), SEQ_LEN)
  np.testing.assert_array_equal(again.train_tokens, corpus.train_tokens)
  np.testing.assert_array_equal(again.val_tokens, corpus.val_tokens)
  with open(again.manifest_path) as f:
    assert json.load(f)['skipped_dir_links'] == ['outside', 'pkg0/linked']
  (tmp_path / 'only').mkdir()
  os.symlink(source, tmp_path / 'only' / 'code')
  with pytest.raises(ValueError, match=r"^No UTF-8 \.py files under '.*only': "
                     r'empty corpus \(links to directories, not followed: '
                     r'code\)\.$'):
    data.load(_config(tmp_path / 'only', tmp_path / 'tfds'), SEQ_LEN)


def test_a_data_dir_this_process_may_not_write(corpus, corpus_dir, data_dir,
                                               tmp_path, monkeypatch):
  """A shared cache or a read-only mount: no lock can be made there, and
  its built corpus is read unlocked; one it must build is refused in one
  line (a read-only file system's OSError was a traceback)."""
  def read_only(path, wait):
    raise OSError(errno.EROFS, 'Read-only file system', path)
  monkeypatch.setattr(locks, 'hold', read_only)
  again = data.load(_config(corpus_dir[0], data_dir), SEQ_LEN)
  np.testing.assert_array_equal(again.train_tokens, corpus.train_tokens)
  monkeypatch.setattr(python_code.PythonCode, 'download_and_prepare',
                      lambda self: read_only(self.data_dir, True))
  with pytest.raises(ValueError) as refused:
    data.load(_config(corpus_dir[0], tmp_path), SEQ_LEN)
  assert str(refused.value).startswith(
      f'data.data_dir {tmp_path}: cannot write {tmp_path}/python_code/')
  assert str(refused.value).endswith(' (Read-only file system)')


def test_a_disk_that_fills_while_the_corpus_is_built_is_one_line(
    corpus_dir, tmp_path, monkeypatch):
  """array_record's writer says a full disk in a RuntimeError, which was a
  traceback; as an OSError it is one line (`cli.run`), naming the folder,
  and no empty folders are left for it."""
  def full(self):
    raise RuntimeError(
        'Failed to finalize writing of split "validation": write() failed: '
        f'No space left on device; writing {self.data_dir}/x.array_record; '
        'at byte 20480; Failed to close chunk_writer')
  monkeypatch.setattr(python_code.PythonCode, 'download_and_prepare', full)
  with pytest.raises(OSError) as raised:
    data.load(_config(corpus_dir[0], tmp_path), SEQ_LEN)
  assert raised.value.errno == errno.ENOSPC
  assert raised.value.filename.startswith(f'{tmp_path}/python_code/')
  assert not os.path.exists(tmp_path / 'python_code')


def test_a_disk_that_fills_while_the_bpe_is_saved_is_one_line(
    corpus_dir, tmp_path, full_disk):
  """`tokenizers` says a full disk in a bare Exception, which `cli.run`
  printed as a traceback, and left its temporary file: it is the OSError
  it is, naming tokenizer.json, and nothing is left in the cache."""
  config = _config(corpus_dir[0], tmp_path)
  cache = data.load(config, SEQ_LEN).data_dir
  os.remove(os.path.join(cache, 'tokenizer.json'))  # Trained again below.
  with full_disk(), pytest.raises(OSError) as stopped:
    data.load_tokenizer(config)
  assert (stopped.value.errno, stopped.value.filename) == (
      errno.EFBIG, os.path.join(cache, 'tokenizer.json'))
  assert not os.listdir(cache)


def test_a_remote_data_dir_is_refused(corpus_dir, tmp_path, monkeypatch):
  """The caches are local files: a gs:// data_dir's were written below the
  current folder, in one named 'gs:', its edited source never seen (without
  gcsfs, a traceback); refused in one line before anything is made."""
  monkeypatch.chdir(tmp_path)
  for load in (data.load_tokenizer, lambda c: data.load(c, SEQ_LEN)):
    with pytest.raises(ValueError) as refused:
      load(_config(corpus_dir[0], 'gs://bucket/tfds'))
    assert str(refused.value) == (
        'data.data_dir gs://bucket/tfds is not a local folder (the corpus '
        'and its caches are local files)')
  monkeypatch.setattr(data.tfds_constants, 'DATA_DIR', 'gs://bucket/tfds')
  with pytest.raises(ValueError, match=r'^TFDS_DATA_DIR gs://bucket/tfds is '
                     r'not a local folder .*: set data.data_dir to one$'):
    data.load(_config(corpus_dir[0], ''), SEQ_LEN)
  assert os.listdir(tmp_path) == []


def test_directories_that_cannot_be_read_are_named(corpus, corpus_dir,
                                                   tmp_path, monkeypatch):
  """os.walk skipped a directory it could not read without a word, so its
  files were left out of the corpus unsaid: now named in the manifest (and
  a warning); the source itself unreadable read as an empty corpus."""
  source = tmp_path / 'src'
  shutil.copytree(corpus_dir[0], source)
  (source / 'private').mkdir()
  (source / 'private' / 'secret.py').write_text('password = "hunter2"\n')
  unreadable = {str(source / 'private')}
  scandir = os.scandir

  def denied(path='.'):  # As chmod 000 does to all but root.
    if path in unreadable:
      raise PermissionError(errno.EACCES, 'Permission denied', path)
    return scandir(path)

  monkeypatch.setattr(os, 'scandir', denied)
  again = data.load(_config(source, tmp_path / 'tfds'), SEQ_LEN)
  np.testing.assert_array_equal(again.train_tokens, corpus.train_tokens)
  np.testing.assert_array_equal(again.val_tokens, corpus.val_tokens)
  with open(again.manifest_path) as f:
    assert json.load(f)['skipped_unreadable_dirs'] == ['private']
  only = tmp_path / 'only'  # Its code all in a directory not read.
  shutil.copytree(source / 'private', only / 'private')
  unreadable.add(str(only / 'private'))
  with pytest.raises(ValueError, match=r"^No UTF-8 \.py files under '.*only': "
                     r'empty corpus \(not read: private\)\.$'):
    data.load(_config(only, tmp_path / 'tfds'), SEQ_LEN)
  unreadable.add(str(source))
  with pytest.raises(ValueError) as refused:
    data.load(_config(source, tmp_path / 'tfds2'), SEQ_LEN)
  assert str(refused.value) == (
      f"Source directory '{source}' cannot be read (Permission denied)")
  assert sorted(os.listdir(tmp_path / 'tfds2')) == [
      '.sparse_gpt2.lock', 'downloads']  # Nothing left of the build.


def test_home_relative_paths_are_the_home(corpus, corpus_dir, tmp_path,
                                         monkeypatch):
  """`--config.data.data_dir=~/data` reaches Python unexpanded: the corpus
  was built in a folder named `~` below the current one (its lock in the
  home), and `--config.data.source=~/code` was missing."""
  monkeypatch.setenv('HOME', str(tmp_path))
  monkeypatch.chdir(tmp_path / os.path.basename(
      shutil.copytree(corpus_dir[0], tmp_path / 'code')))
  again = data.load(_config(tmp_path / 'code', '~/tfds'), SEQ_LEN)
  assert again.data_dir.startswith(str(tmp_path / 'tfds') + os.sep)
  assert not os.path.exists('~')
  np.testing.assert_array_equal(again.train_tokens, corpus.train_tokens)
  home = data.load(_config('~/code', '~/tfds'), SEQ_LEN)
  assert home.data_dir == again.data_dir  # The same corpus, cached.


def test_a_killed_build_leaves_nothing_behind(corpus, corpus_dir, tmp_path):
  """SIGKILL runs no cleanup: what a killed run was writing is removed
  when the cache is made again (a large corpus's tokens are gigabytes)."""
  config = _config(corpus_dir[0], tmp_path)
  cache = data.load(config, SEQ_LEN).data_dir
  for name in ('tokenizer.json', 'train.npy', 'validation.npy'):
    os.remove(os.path.join(cache, name))
    with open(os.path.join(cache, f'{name}.tmp99999'), 'wb') as f:
      f.write(b'half written')
  again = data.load(config, SEQ_LEN)
  assert sorted(os.listdir(cache)) == [
      'tokenizer.json', 'train.npy', 'train.npy.sha256.json', 'validation.npy']
  np.testing.assert_array_equal(again.train_tokens, corpus.train_tokens)


class _Recorded:
  """A tokenizer that records the texts of each batch it encodes."""

  def __init__(self, tokenizer):
    self.tokenizer, self.batches = tokenizer, []

  def encode_batch_fast(self, texts):
    self.batches.append(texts)
    return self.tokenizer.encode_batch_fast(texts)


def test_a_huge_document_is_encoded_in_pieces(corpus, monkeypatch):
  """Encoding holds ~300 bytes a token: a 24 MB file took 5.6 GB, and a
  chunk of a twentieth of a large corpus as much again. Documents are cut
  at line breaks where the tokens do not change, and batches bounded; the
  BPE trained on the pieces is the one trained on the whole texts."""
  monkeypatch.setattr(data, '_PIECE_CHARS', 200)
  monkeypatch.setattr(data, '_BATCH_CHARS', 600)
  texts = [''.join(_source_text(i) + '\n' for i in range(j, j + 8))
           for j in range(0, 40, 8)]
  texts[1:1] = ['', 'x = 1\n', 'y' * 700]  # Empty, small, uncuttable.
  tokenizer = _Recorded(corpus.tokenizer)
  f = io.BytesIO()
  data._write_tokens(f, tokenizer, _Docs(texts), 'text', corpus.eot_id, 't')
  f.seek(0)
  expected = []
  for text in texts:
    if text:
      expected += ([corpus.eot_id] if expected else []) + (
          corpus.tokenizer.encode(text).ids)
  np.testing.assert_array_equal(np.load(f), expected)
  pieces = [piece for batch in tokenizer.batches for piece in batch]
  assert ''.join(pieces) == ''.join(texts)
  assert len(pieces) > 4 * len(texts)  # Cut, where a cut can be.
  longest = max(len(p) for p in pieces if p != 'y' * 700)
  assert longest < 2000 < min(len(t) for t in texts if len(t) > 700)
  for batch in tokenizer.batches:
    assert len(batch) == 1 or sum(map(len, batch)) <= 600
  for text in texts:  # Not cut at every line break: pieces of 200 or more.
    assert all(len(p) >= 200 for p in list(data._pieces(text))[:-1])
  whole = tokenizer_lib.train(texts, 400)
  cut = tokenizer_lib.train(
      (piece for text in texts for piece in data._pieces(text)), 400)
  assert cut.to_str() == whole.to_str()


def test_indented_lines_and_long_lines_are_cut_in_pieces(corpus,
                                                         monkeypatch):
  """A generated table whose lines are all indented, or one long line, had
  no cut (a line break between non-space characters): a 5 MB table took
  1.3 GB to encode. Each is cut before its white space, where the tokens
  and the BPE trained do not change either."""
  monkeypatch.setattr(data, '_PIECE_CHARS', 200)
  rows = [f'({i}, "v{i}\t"),' for i in range(300)]
  for text in ('\n'.join(['TABLE = [', *(f'    {r}' for r in rows), ']', '']),
               '\r\n'.join(['TABLE = [', *(f'\t{r}' for r in rows), ']']),
               f'TABLE = [{" ".join(rows)}]\n'):
    pieces = list(data._pieces(text))
    assert ''.join(pieces) == text
    assert len(pieces) > 20 and max(map(len, pieces)) < 250
    ids = [i for piece in pieces for i in corpus.tokenizer.encode(piece).ids]
    assert ids == corpus.tokenizer.encode(text).ids
    assert tokenizer_lib.train(pieces, 400).to_str() == tokenizer_lib.train(
        [text], 400).to_str()
  # '\x1c' is white space to Python's \s, punctuation to the BPE's regex.
  assert list(data._pieces('x!\x1c' * 300)) == ['x!\x1c' * 300]


def test_the_tokenizer_trains_on_the_documents_pieces(corpus_dir, tmp_path,
                                                     monkeypatch):
  """Training holds ~300 bytes a token, as encoding does: the BPE trains on
  the documents cut in pieces (`_pieces`), as the tokens are written."""
  monkeypatch.setattr(data, '_PIECE_CHARS', 200)
  trained = []
  train = tokenizer_lib.train

  def recorded(texts, vocab_size):
    trained.append(list(texts))
    return train(trained[-1], vocab_size)

  monkeypatch.setattr(tokenizer_lib, 'train', recorded)
  source = tmp_path / 'src'
  shutil.copytree(corpus_dir[0], source)
  big = next(name for name in (f'big{i}.py' for i in range(100))
             if python_code.split_of(name, VAL_FRACTION) == 'train')
  (source / big).write_text(''.join(f'x_{i} = {i}\n' for i in range(300)))
  data.load(_config(source, tmp_path / 'tfds'), SEQ_LEN)
  [texts] = trained
  first = next(i for i, text in enumerate(texts) if text.startswith('x_0 '))
  end = first + 1  # Its pieces follow one another.
  while len(''.join(texts[first:end])) < (source / big).stat().st_size:
    end += 1
  pieces = texts[first:end]
  assert ''.join(pieces) == (source / big).read_text()
  assert len(pieces) > 5 and max(map(len, pieces)) < 400


def test_corpus_too_small_raises(corpus_dir, data_dir, tmp_path):
  with pytest.raises(ValueError, match='too small'):
    data.load(_config(corpus_dir[0], data_dir), seq_len=10**6)
  (tmp_path / 'one').mkdir()
  (tmp_path / 'one' / 'a.py').write_text('x = 1\n')
  (tmp_path / 'mine' / 'tfds').mkdir(parents=True)  # The user's, empty.
  with pytest.raises(ValueError, match='too small'):
    data.load(_config(tmp_path / 'one', tmp_path / 'mine' / 'tfds'), SEQ_LEN)
  # No leftovers below the data folder, and the data folder kept (with
  # TFDS's downloads/ and the lock that one load at a time takes there).
  assert sorted(os.listdir(tmp_path / 'mine' / 'tfds')) == [
      '.sparse_gpt2.lock', 'downloads']


def test_a_build_that_fails_reading_a_file_leaves_no_folders(
    corpus, corpus_dir, tmp_path, monkeypatch):
  """A file removed (or denied) while the corpus was read: its OSError
  left empty folders below the data folder, where only a ValueError's were
  removed. Now removed too, and a corpus built there is kept."""
  source = tmp_path / 'src'
  shutil.copytree(corpus_dir[0], source)
  removed = source / 'pkg2' / 'sub1' / 'mod_5.py'  # Read after mod_0.py.
  split_of = python_code.split_of

  def remove_once(relpath, val_fraction):
    if relpath == 'pkg0/sub0/mod_0.py' and removed.exists():
      os.remove(removed)
    return split_of(relpath, val_fraction)

  monkeypatch.setattr(python_code, 'split_of', remove_once)
  mine = tmp_path / 'mine'  # The user's.
  with pytest.raises(FileNotFoundError, match='mod_5.py'):
    data.load(_config(source, mine), SEQ_LEN)
  assert sorted(os.listdir(mine)) == ['.sparse_gpt2.lock', 'downloads']
  built = data.load(_config(corpus_dir[0], mine), SEQ_LEN)
  shutil.copy(corpus_dir[0] / 'pkg2' / 'sub1' / 'mod_5.py', removed)
  with pytest.raises(FileNotFoundError, match='mod_5.py'):
    data.load(_config(source, mine), SEQ_LEN)
  assert os.listdir(mine / 'python_code') == [
      os.path.relpath(built.data_dir, mine / 'python_code').split(os.sep)[0]]
  again = data.load(_config(corpus_dir[0], mine), SEQ_LEN)
  assert again.train_tokens.filename == built.train_tokens.filename
  np.testing.assert_array_equal(again.train_tokens, corpus.train_tokens)


class SparseGpt2TestDocs(tfds.core.GeneratorBasedBuilder):
  """A train-only TFDS dataset, to exercise the 'tfds:NAME' source."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({'body': tfds.features.Text(),
                                             'n': tfds.features.Scalar(
                                                 np.int64)}),
        disable_shuffling=True)  # So the held-out tail is known.

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(12):
      yield i, {'body': _source_text(i), 'n': i}


def test_tfds_source_holds_out_part_of_train(tmp_path, monkeypatch):
  trained = []  # The texts each BPE is trained on.
  train = tokenizer_lib.train

  def recorded(texts, vocab_size):
    trained.append(list(texts))
    return train(trained[-1], vocab_size)

  monkeypatch.setattr(tokenizer_lib, 'train', recorded)
  config = _config('tfds:sparse_gpt2_test_docs', tmp_path, text_feature='body')
  corpus = data.load(config, SEQ_LEN)
  assert corpus.data_dir == str(
      tmp_path / 'sparse_gpt2' / 'sparse_gpt2_test_docs' / '1.0.0' / 'body' /
      'heldout3' / 'bpe300')
  with open(corpus.manifest_path) as f:
    assert json.load(f)['splits'] == {
        'train': 'train[:-3]', 'validation': 'train[-3:]'}
  held_out = '<|endoftext|>'.join(_source_text(i) for i in range(9, 12))
  assert corpus.tokenizer.decode(
      corpus.val_tokens.tolist(), skip_special_tokens=False) == held_out
  # The rest, and only the rest, is trained on: its tokens and its BPE.
  rest = [_source_text(i) for i in range(9)]
  assert corpus.tokenizer.decode(corpus.train_tokens.tolist(),
                                 skip_special_tokens=False) == (
                                     '<|endoftext|>'.join(rest))
  assert trained == [rest]
  # However small val_fraction, one document is held out.
  few = data.load(_config('tfds:sparse_gpt2_test_docs', tmp_path,
                          text_feature='body', val_fraction=0.01), SEQ_LEN)
  assert few.tokenizer.decode(few.val_tokens.tolist()) == _source_text(11)


class SparseGpt2TestSplitDocs(tfds.core.GeneratorBasedBuilder):
  """A TFDS dataset with a validation split and a test split."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(docs) for split, docs in (
        ('train', range(8)), ('validation', (8, 9)), ('test', (10, 11)))}

  def _generate_examples(self, docs):
    for i in docs:
      yield i, {'text': _source_text(i)}


def test_a_tfds_validation_split_is_held_out_not_its_test_split(tmp_path):
  corpus = data.load(_config('tfds:sparse_gpt2_test_split_docs', tmp_path),
                     SEQ_LEN)
  with open(corpus.manifest_path) as f:
    assert json.load(f)['splits'] == {'train': 'train',
                                      'validation': 'validation'}
  assert corpus.tokenizer.decode(
      corpus.val_tokens.tolist(), skip_special_tokens=False) == (
          '<|endoftext|>'.join(_source_text(i) for i in (8, 9)))


def test_a_tfds_feature_the_dataset_lacks_is_one_line(tmp_path):
  config = _config('tfds:sparse_gpt2_test_docs', tmp_path, text_feature='text')
  with pytest.raises(ValueError) as refused:
    data.load(config, SEQ_LEN)
  assert str(refused.value) == (
      "tfds:sparse_gpt2_test_docs has no feature data.text_feature='text': "
      "['body', 'n']")
  # A feature that is not text would train on str() of its values.
  config = _config('tfds:sparse_gpt2_test_docs', tmp_path, text_feature='n')
  with pytest.raises(ValueError, match=r"^tfds:sparse_gpt2_test_docs feature "
                     r"data.text_feature='n' is not text: Scalar\("):
    data.load(config, SEQ_LEN)
  # Both before anything is downloaded or prepared, or cached.
  assert os.listdir(tmp_path) == ['.sparse_gpt2.lock']


def test_two_first_loads_at_once_prepare_one_corpus(corpus_dir, tmp_path):
  """The twins started together on a fresh machine: one prepares the
  corpus while the other waits for it, then reads the same caches."""
  load = ('import sys\n'
          'from sparse_gpt2 import data\n'
          'import ml_collections\n'
          f'config = ml_collections.ConfigDict(dict(source={str(corpus_dir[0])!r}, '
          f"text_feature='text', data_dir={str(tmp_path)!r}, vocab_size=300, "
          f'val_fraction={VAL_FRACTION}))\n'
          f'corpus = data.load(config, {SEQ_LEN})\n'
          'print(corpus.train_tokens.size, corpus.val_tokens.size)\n')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = [subprocess.Popen([sys.executable, '-c', load], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for _ in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
  # The same sizes (TFDS's own lines aside, which the preparing one prints).
  assert len({out.strip().splitlines()[-1] for out, _ in outs}) == 1


@pytest.mark.parametrize('name', ['', 'x/y:z'])
def test_a_tfds_name_that_does_not_parse_is_one_line(tmp_path, name):
  with pytest.raises(ValueError) as refused:
    data.load(_config(f'tfds:{name}', tmp_path), SEQ_LEN)
  assert str(refused.value) == (
      f'tfds:{name}: Parsing builder name string {name} failed.')


def test_a_failed_download_is_one_line(tmp_path, monkeypatch):
  def offline(self, **kwargs):
    raise ConnectionError('Max retries exceeded with url: /mnist\nmore')
  monkeypatch.setattr(SparseGpt2TestDocs, 'download_and_prepare', offline)
  with pytest.raises(ValueError) as refused:
    data.load(_config('tfds:sparse_gpt2_test_docs', tmp_path,
                      text_feature='body'), SEQ_LEN)
  assert str(refused.value) == (
      'tfds:sparse_gpt2_test_docs could not be downloaded and prepared '
      '(ConnectionError: Max retries exceeded with url: /mnist)')


def test_an_unknown_tfds_dataset_is_one_line(tmp_path):
  with pytest.raises(ValueError) as refused:
    data.load(_config('tfds:no_such_dataset_xyz', tmp_path), SEQ_LEN)
  assert str(refused.value) == (
      'Dataset no_such_dataset_xyz not found. (tfds.list_builders() names the '
      'known ones)')


def test_unigram_entropy():
  rng = np.random.default_rng(0)
  uniform = rng.integers(0, 16, size=100_000).astype(np.uint16)
  assert data.unigram_entropy(uniform, uniform[:1000]) == pytest.approx(
      np.log(16), abs=0.01)
  assert data.unigram_entropy(np.zeros(1000, np.uint16),
                              np.zeros(10, np.uint16)) < 0.01
