"""Tests for sparse_gpt2.hf against transformers' own GPT-2 (CPU, seconds)."""

import errno
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_np
import torch
import transformers

from sparse_gpt2 import hf
from sparse_gpt2 import model
from sparse_gpt2.data import tokenizer as tokenizer_lib

VOCAB = 100
TOLERANCE = 1e-4


def _hf_model(tie, n_inner=None):
  """A seeded random GPT2LMHeadModel whose biases and LayerNorms are not 0/1,
  so that a swapped or dropped bias or scale shows in the logits."""
  torch.manual_seed(0)
  config = transformers.GPT2Config(
      vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4,
      n_inner=n_inner, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0,
      attn_implementation='eager')
  hf_model = transformers.GPT2LMHeadModel(config)
  assert hf_model.config._attn_implementation == 'eager'
  with torch.no_grad():
    for p in hf_model.parameters():
      p.add_(torch.randn_like(p) * 0.02)
  return hf_model.eval()


def _tokens():
  return np.random.default_rng(0).integers(0, VOCAB, (2, 16))


def _torch_logits(hf_model):
  with torch.no_grad():
    return hf_model(torch.from_numpy(_tokens())).logits.numpy()


def _jax_logits(model_kwargs, params):
  return np.asarray(model.GPT2(**model_kwargs).apply(
      {'params': params}, jnp.asarray(_tokens())))


def _checkpoint(tie, tmp_path_factory):
  """(HF directory, its torch logits); the untied one also has n_inner."""
  hf_model = _hf_model(tie=tie, n_inner=None if tie else 96)
  path = tmp_path_factory.mktemp('hf')
  hf_model.save_pretrained(path, safe_serialization=True)
  return path, _torch_logits(hf_model)


@pytest.fixture(scope='module')
def tied(tmp_path_factory):
  return _checkpoint(True, tmp_path_factory)


@pytest.fixture(scope='module')
def untied(tmp_path_factory):
  return _checkpoint(False, tmp_path_factory)


@pytest.fixture(params=['tied', 'untied'])
def checkpoint(request):
  return request.getfixturevalue(request.param)


def test_load_matches_transformers(checkpoint, request):
  path, expected = checkpoint
  model_kwargs, params = hf.load(path)
  tied = request.node.callspec.params['checkpoint'] == 'tied'
  assert model_kwargs['tie_embeddings'] == tied
  assert ('lm_head' in params) == (not tied)
  assert model_kwargs['d_mlp'] == (256 if tied else 96)
  logits = _jax_logits(model_kwargs, params)
  diff = np.abs(logits - expected).max()
  print(f'max |jax - torch| logits, tied={tied}: {diff:.3e}')
  assert diff < TOLERANCE


def test_save_round_trip(checkpoint, tmp_path):
  path, expected = checkpoint
  model_kwargs, params = hf.load(path)
  out = tmp_path / 'out'
  hf.save(params, model_kwargs, out)
  assert sorted(os.listdir(tmp_path)) == ['out']  # No temporary left over.

  reloaded = transformers.GPT2LMHeadModel.from_pretrained(
      out, attn_implementation='eager').eval()
  diff = np.abs(_torch_logits(reloaded) - expected).max()
  print(f'max |saved torch - torch| logits: {diff:.2e}')
  assert diff < TOLERANCE

  kwargs_again, params_again = hf.load(out)
  assert kwargs_again == model_kwargs
  assert jax.tree.structure(params_again) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params_again), jax.tree.leaves(params)):
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(a, b)


def test_load_hub_layout(tied, tmp_path):
  """The Hub's original checkpoints: no 'transformer.' prefix, no lm_head,
  and causal-mask buffers saved as weights."""
  path, expected = tied
  tensors = safetensors_np.load_file(path / hf.WEIGHTS)
  assert 'lm_head.weight' not in tensors
  tensors = {k.removeprefix('transformer.'): v for k, v in tensors.items()}
  tensors['h.0.attn.bias'] = np.tril(np.ones((1, 1, 32, 32), np.float32))
  tensors['h.0.attn.masked_bias'] = np.array(-1e4, np.float32)
  safetensors_np.save_file(tensors, tmp_path / hf.WEIGHTS)
  (tmp_path / hf.CONFIG).write_bytes((path / hf.CONFIG).read_bytes())
  logits = _jax_logits(*hf.load(tmp_path))
  assert np.abs(logits - expected).max() < TOLERANCE


def _edited_copy(checkpoint, tmp_path, **config):
  path, _ = checkpoint
  tmp_path.mkdir()
  (tmp_path / hf.WEIGHTS).write_bytes((path / hf.WEIGHTS).read_bytes())
  original = json.loads((path / hf.CONFIG).read_text())
  (tmp_path / hf.CONFIG).write_text(json.dumps({**original, **config}))
  return tmp_path


def test_load_errors(tied, tmp_path):
  with pytest.raises(ValueError, match='no config.json'):
    hf.load(tmp_path / 'absent')
  # Not 'no config.json' (it may well have one): a TPU run's init_from_hf.
  with pytest.raises(ValueError, match=r'^gs://bucket/gpt2: a Hugging Face '
                     'GPT-2 is read from a local folder'):
    hf.load('gs://bucket/gpt2')
  (tmp_path / 'only_config').mkdir()
  (tmp_path / 'only_config' / hf.CONFIG).write_text('{}')
  with pytest.raises(ValueError, match='no model.safetensors'):
    hf.load(tmp_path / 'only_config')
  cases = [(dict(activation_function='relu'), "activation_function='relu'"),
           (dict(scale_attn_by_inverse_layer_idx=True),
            'scale_attn_by_inverse_layer_idx'),
           # Variants whose tensors fit the model: only the config tells.
           (dict(layer_norm_epsilon=1e-6), r'unsupported GPT-2 variant: '
                                           r'layer_norm_epsilon=1e-06$'),
           (dict(scale_attn_weights=False),
            r'unsupported GPT-2 variant: scale_attn_weights=False$'),
           (dict(add_cross_attention=True),
            r'unsupported GPT-2 variant: add_cross_attention=True$'),
           (dict(model_type='gpt_neo'),
            r"unsupported GPT-2 variant: model_type='gpt_neo'$"),
           (dict(n_head=3), r'unsupported GPT-2 variant: n_embd=64 not '
                            r'divisible by n_head=3$'),
           (dict(n_positions=64), r'wrong shape \[.wpe.weight \(32, 64\) '
                                  r'!= \(64, 64\)'),
           (dict(n_layer=3), r"missing \['h.2."),
           (dict(n_head=0), r'sizes must be integers >= 1: n_head=0$'),
           (dict(n_embd='64', n_layer=1.5),
            r"sizes must be integers >= 1: n_layer=1.5, n_embd='64'$"),
           (dict(n_inner='x'), r"sizes must be integers >= 1: n_inner='x'$"),
           (dict(n_inner=128.0), r'sizes must be integers >= 1: '
                                 r'n_inner=128.0$')]
  for i, (config, message) in enumerate(cases):
    with pytest.raises(ValueError, match=message):
      hf.load(_edited_copy(tied, tmp_path / str(i), **config))
  damaged = _edited_copy(tied, tmp_path / 'damaged')
  weights = (damaged / hf.WEIGHTS).read_bytes()
  (damaged / hf.WEIGHTS).write_bytes(weights[:4])
  with pytest.raises(ValueError, match=r'damaged/model.safetensors does not '
                                       'read: Error while deserializing'):
    hf.load(damaged)
  (damaged / hf.CONFIG).write_text('{"n_layer": 2,\n')
  with pytest.raises(ValueError, match=r'damaged/config.json is not valid '
                                       r'JSON \(Expecting'):
    hf.load(damaged)


def test_load_sharded(tied, tmp_path):
  """A checkpoint that save_pretrained split into shards (GPT-2 XL in
  float32 passes transformers 4's 5GB max_shard_size): the shards that
  model.safetensors.index.json names; a broken index or shard, in one line."""
  path, expected = tied
  sharded = tmp_path / 'sharded'
  transformers.GPT2LMHeadModel.from_pretrained(path).save_pretrained(
      sharded, max_shard_size='100KB')
  index_file = sharded / 'model.safetensors.index.json'
  index = json.loads(index_file.read_text())
  shards = sorted(set(index['weight_map'].values()))
  assert len(shards) > 1 and not (sharded / hf.WEIGHTS).exists()
  assert np.abs(_jax_logits(*hf.load(sharded)) - expected).max() < TOLERANCE

  (sharded / shards[1]).write_bytes(b'\0' * 4)
  with pytest.raises(ValueError, match=f'sharded/{shards[1]} does not read: '):
    hf.load(sharded)
  (sharded / shards[1]).unlink()
  with pytest.raises(ValueError, match=r'index.json names shards that are not '
                                       rf"there: \['{shards[1]}'\]$"):
    hf.load(sharded)
  index_file.write_text('{"metadata": {}}')
  with pytest.raises(ValueError, match=r'index.json: no "weight_map" of '
                                       'tensor names to shard files$'):
    hf.load(sharded)
  index_file.write_bytes(b'{"metadata": "caf\xe9"}')
  with pytest.raises(ValueError, match=r'index.json is not UTF-8 text '
                                       r'\(byte 17 is 0xe9\)$'):
    hf.load(sharded)


def test_load_names_what_it_cannot_read(tied, tmp_path):
  """A torch-only checkpoint (transformers before safetensors), a config that
  is not UTF-8, and a tie_word_embeddings that is no boolean (which would
  enter the run's config, typed bool, as a string): each one line."""
  path, _ = tied
  torch_only = tmp_path / 'torch_only'
  torch_only.mkdir()
  (torch_only / hf.CONFIG).write_bytes((path / hf.CONFIG).read_bytes())
  torch.save({}, torch_only / 'pytorch_model.bin')
  with pytest.raises(ValueError, match=r'torch_only: no model.safetensors; .*'
                     r'\(pytorch_model.bin is not read: load and save the '
                     r'model again with transformers 4.35 or newer'):
    hf.load(torch_only)
  (torch_only / hf.CONFIG).unlink()  # The torch file is no config's hint.
  with pytest.raises(ValueError, match=r'torch_only: no config.json; expected '
                     r'a Hugging Face GPT-2 directory with config.json and '
                     r'model.safetensors$'):
    hf.load(torch_only)
  latin = _edited_copy(tied, tmp_path / 'latin')
  (latin / hf.CONFIG).write_bytes(b'{"n_embd": "\xe9"}')
  with pytest.raises(ValueError, match=r'latin/config.json is not UTF-8 '
                                       r'text \(byte 12 is 0xe9\)$'):
    hf.load(latin)
  with pytest.raises(ValueError, match=r'tie_word_embeddings must be true or '
                                       r"false, got 'false'$"):
    hf.load(_edited_copy(tied, tmp_path / 'tie',
                         tie_word_embeddings='false'))


def _tiny(**overrides):
  """Random params, boxed like `init`'s, of a small GPT2 with `overrides`;
  drawn in numpy from `init`'s shapes, since compiling `init` takes seconds."""
  model_kwargs = dict(vocab_size=VOCAB, num_layers=1, d_model=32, num_heads=2,
                      max_len=8, **overrides)
  shapes = jax.eval_shape(model.GPT2(**model_kwargs).init, jax.random.key(0),
                          jnp.zeros((1, 8), jnp.int32))['params']
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype),
                      shapes), model_kwargs


def test_save_accepts_boxed_params(tmp_path):
  """Params as `init` returns them, in LogicallyPartitioned boxes."""
  boxed, model_kwargs = _tiny()
  assert any(isinstance(x, nn.LogicallyPartitioned) for x in jax.tree.leaves(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)))
  hf.save(boxed, model_kwargs, tmp_path / 'out')
  kwargs_again, params = hf.load(tmp_path / 'out')
  assert model.GPT2(**kwargs_again) == model.GPT2(**model_kwargs, d_head=16,
                                                  d_mlp=128)
  jax.tree.map(np.testing.assert_array_equal, params, nn.unbox(boxed))


def test_a_save_that_a_full_disk_stops_is_an_os_error_and_leaves_nothing(
    tmp_path, full_disk):
  """safetensors' own writer said a full disk in a SafetensorError (and
  tokenizers' in a bare Exception): a traceback, where `cli.run` says an
  OSError in one line."""
  params, model_kwargs = _tiny()
  with full_disk(), pytest.raises(OSError) as stopped:
    hf.save(params, model_kwargs, str(tmp_path / 'out'))
  assert stopped.value.filename == str(tmp_path / 'out')
  assert os.listdir(tmp_path) == []


def test_save_exports_a_bfloat16_cudnn_run(tmp_path):
  """A GPU run's model: bfloat16 weights and cuDNN's attention (no sinks).
  The export holds the weights as float32, exactly (bfloat16 widens
  without rounding). `save` traced cuDNN's kernel for the params' shapes,
  which stopped every export off a GPU ('cuDNN is not detected')."""
  params, model_kwargs = _tiny(dtype='bfloat16', param_dtype='bfloat16')
  hf.save(params, {**model_kwargs, 'attention': 'cudnn'}, tmp_path / 'out')
  _, loaded = hf.load(tmp_path / 'out')
  assert {x.dtype for x in jax.tree.leaves(loaded)} == {np.dtype(np.float32)}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      a, np.asarray(b, np.float32)), loaded, nn.unbox(params))


def test_save_exports_dropout_where_the_model_has_it(tmp_path):
  """The model drops out its embeddings and each block's two outputs
  (transformers' embd_pdrop and resid_pdrop) but never the attention
  probabilities (`model.attend`): the export said attn_pdrop = dropout, so
  transformers trained the exported model with a dropout it never had."""
  params, model_kwargs = _tiny(dropout=0.1)
  hf.save(params, model_kwargs, tmp_path / 'out')
  config = transformers.GPT2Config.from_pretrained(tmp_path / 'out')
  assert (config.embd_pdrop, config.resid_pdrop, config.attn_pdrop) == (
      0.1, 0.1, 0.0)


@pytest.mark.parametrize('overrides, message', [
    (dict(norm='rmsnorm'), "norm='rmsnorm'"),
    (dict(attention_sink=True), 'attention sinks'),
    (dict(pos_embedding=False), 'pos_embedding=False'),
    (dict(bigram_table=True), 'bigram_table=True'),
    (dict(d_head=8), 'd_head=8'),
    (dict(act_topk_fraction=0.5, act_topk_locations=('mlp_neuron',)),
     'act_topk_fraction=0.5'),
    (dict(use_bias=False), r'cannot express this model: use_bias=False$'),
])
def test_save_refuses_unexpressible(overrides, message, tmp_path):
  params, model_kwargs = _tiny(**overrides)
  with pytest.raises(ValueError, match=message):
    hf.save(params, model_kwargs, tmp_path / 'out')
  assert not os.listdir(tmp_path)


def test_save_refuses_sink_param_and_mismatched_params(tmp_path):
  params, _ = _tiny(attention_sink=True)
  _, plain_kwargs = _tiny()
  with pytest.raises(ValueError, match='attention sinks'):
    hf.save(params, plain_kwargs, tmp_path / 'out')
  params, _ = _tiny()
  with pytest.raises(ValueError, match=r'wrong shape .*wpe \(8, 32\) != '
                                       r'\(16, 32\)'):
    hf.save(params, {**plain_kwargs, 'max_len': 16}, tmp_path / 'out')
  assert not os.listdir(tmp_path)


def test_save_overwrite(tmp_path):
  params, model_kwargs = _tiny()
  out = tmp_path / 'out'
  out.mkdir()  # An empty directory is simply filled.
  hf.save(params, model_kwargs, out)
  with pytest.raises(ValueError, match='not empty; replace it with '
                     r'overwrite=True \(convert: --overwrite\)'):
    hf.save(params, model_kwargs, out)
  params = jax.tree.map(lambda x: x + 1, params)
  hf.save(params, model_kwargs, out, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ['out']
  assert sorted(os.listdir(out)) == [hf.CONFIG, hf.WEIGHTS]
  assert os.stat(out / hf.WEIGHTS).st_mode & 0o777 == 0o644
  _, loaded = hf.load(out)
  jax.tree.map(np.testing.assert_array_equal, loaded, nn.unbox(params))
  # A run directory (its own config.json beside checkpoints) is never
  # replaced, even with overwrite: `convert --to_hf=RUN --overwrite`.
  run = tmp_path / 'run'
  (run / 'checkpoints' / '10').mkdir(parents=True)
  (run / hf.CONFIG).write_text('{}')
  with pytest.raises(ValueError, match=r"more than a Hugging Face export "
                                       r"\(\['checkpoints'\]\)"):
    hf.save(params, model_kwargs, run, overwrite=True)
  assert sorted(os.listdir(run)) == ['checkpoints', hf.CONFIG]
  # A link to an earlier export: what it points to is replaced, the link kept.
  link = tmp_path / 'latest'
  link.symlink_to(out)
  params = jax.tree.map(lambda x: x + 1, params)
  hf.save(params, model_kwargs, link, overwrite=True)
  assert link.is_symlink() and sorted(os.listdir(tmp_path)) == [
      'latest', 'out', 'run']
  _, loaded = hf.load(out)
  jax.tree.map(np.testing.assert_array_equal, loaded, nn.unbox(params))


def test_save_overwrite_replaces_only_an_export(tied, tmp_path):
  """An export's file names alone are not an export: a released GPT-2
  fetched as just config.json and model.safetensors (the two a Hugging
  Face folder needs) was deleted by `convert --overwrite --to_hf=gpt2/`.
  Its config.json holds fields an export never writes; an export with its
  tokenizer (bos and eos in its config) is still replaced."""
  params, model_kwargs = _tiny()
  tokenizer = tokenizer_lib.train(['def f(x):\n    return x\n'], 300)
  out = tmp_path / 'out'
  hf.save(params, model_kwargs, out, tokenizer=tokenizer)
  hf.save(params, model_kwargs, out, overwrite=True, tokenizer=tokenizer)
  assert sorted(os.listdir(out)) == sorted(hf.EXPORT_FILES)
  released, _ = tied
  gpt2 = tmp_path / 'gpt2'
  gpt2.mkdir()
  for name in (hf.CONFIG, hf.WEIGHTS):
    (gpt2 / name).write_bytes((released / name).read_bytes())
  with pytest.raises(ValueError, match=r'gpt2 is not an earlier export: its '
                     r'config.json has fields an export never writes \(.*\); '
                     'refusing to replace it$'):
    hf.save(params, model_kwargs, gpt2, overwrite=True)
  assert sorted(os.listdir(gpt2)) == [hf.CONFIG, hf.WEIGHTS]
  assert (gpt2 / hf.WEIGHTS).read_bytes() == (released / hf.WEIGHTS
                                              ).read_bytes()
  (gpt2 / hf.CONFIG).unlink()  # Weights alone: no export's.
  with pytest.raises(ValueError, match=r'gpt2 is not an earlier export \(its '
                     r'config.json is missing or not a JSON object\)'):
    hf.save(params, model_kwargs, gpt2, overwrite=True)
  assert os.listdir(gpt2) == [hf.WEIGHTS]


def test_convert_refuses_before_reading_the_checkpoint(tmp_path,
                                                      monkeypatch):
  """The paper's model, or an --to_hf that may not be replaced, is refused
  from the run's config alone: its checkpoint (gigabytes for the paper's
  0.42B model) is never read."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from sparse_gpt2 import convert  # pylint: disable=g-import-not-at-top
  from sparse_gpt2 import train  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(train, 'load_run', lambda *args: pytest.fail(
      'read the checkpoint'))
  run = tmp_path / 'run'
  run.mkdir()
  (run / hf.CONFIG).write_text(tiny.get_config('none').to_json())
  with pytest.raises(ValueError, match=r"cannot express this model: "
                                       r"norm='rmsnorm'"):
    convert.run_to_hf(str(run), str(tmp_path / 'out'))
  config = tiny.get_config('none')
  config.model.update(norm='layernorm', tie_embeddings=True,
                      pos_embedding=True, bigram_table=False,
                      attention_sink=False)
  (run / hf.CONFIG).write_text(config.to_json())
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / 'notes.txt').write_text('mine')
  with pytest.raises(ValueError, match='out is not empty; replace it with'):
    convert.run_to_hf(str(run), str(tmp_path / 'out'))
  with pytest.raises(ValueError, match=r"more than a Hugging Face export "
                                       r"\(\['notes.txt'\]\)"):
    convert.run_to_hf(str(run), str(tmp_path / 'out'), overwrite=True)
  assert os.listdir(tmp_path / 'out') == ['notes.txt']
  # A folder below a file was refused only when written, after the read.
  with pytest.raises(ValueError, match=r'out/notes.txt/hf: .*out/notes.txt '
                                       r'is a file, not a directory$'):
    convert.run_to_hf(str(run), str(tmp_path / 'out' / 'notes.txt' / 'hf'))


def test_save_into_a_folder_it_cannot_move_aside(tmp_path, monkeypatch):
  """A mount point (a container's volume, `--to_hf=/out`) cannot be renamed
  (EBUSY): the export ended in a traceback, its whole temporary left beside
  it. One on another disk is refused before anything is read or written;
  a bind mount from the same disk, which `ismount` does not see, when the
  rename fails, in one line and with the temporary removed."""
  params, model_kwargs = _tiny()
  out = tmp_path / 'out'
  out.mkdir()
  ismount = os.path.ismount
  monkeypatch.setattr(os.path, 'ismount',
                      lambda p: os.fspath(p) == str(out) or ismount(p))
  with pytest.raises(ValueError, match=r'out is a mount point, which an '
                     r'export cannot replace .*: give a folder inside it, '
                     r'e\.g\. .*out/gpt2$'):
    hf.save(params, model_kwargs, out)
  assert sorted(os.listdir(tmp_path)) == ['out'] and not os.listdir(out)
  monkeypatch.setattr(os.path, 'ismount', ismount)
  rename = os.rename

  def busy(src, dst):
    if os.fspath(src) == str(out):
      raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(out))
    rename(src, dst)

  monkeypatch.setattr(os, 'rename', busy)
  with pytest.raises(ValueError, match=r'out cannot be moved aside to be '
                     r'replaced \(Device or resource busy\): give a folder '
                     r'inside it$'):
    hf.save(params, model_kwargs, out)
  assert sorted(os.listdir(tmp_path)) == ['out'] and not os.listdir(out)


def test_save_refuses_a_remote_folder(tmp_path, monkeypatch):
  """A run may live on gs://, its export not: `--to_hf=gs://B/hf` was
  written, whole, to the local folder ./gs:/B/hf."""
  params, model_kwargs = _tiny()
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=r'^gs://bucket/hf: an export is '
                     r'written to a local folder \(copy it there afterwards'):
    hf.save(params, model_kwargs, 'gs://bucket/hf')
  assert not os.listdir(tmp_path)
