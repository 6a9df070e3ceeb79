"""Hugging Face GPT-2 checkpoints in and out: `load` and `save`.

A Hugging Face GPT-2 directory is `config.json` (a `GPT2Config`) plus
`model.safetensors` in transformers' naming ('h.0.attn.c_attn.weight', ...,
optionally under 'transformer.'), or the shards that
`model.safetensors.index.json` names (`save_pretrained` splits a model
larger than its `max_shard_size`: 5GB in transformers 4, which GPT-2 XL's
float32 weights pass). Its `Conv1D` weights are stored [in, out],
which is already the layout of a Flax `Dense` kernel, so the conversion is a
renaming except for two tensors: `c_attn` is query, key and value side by side
on the output axis, and an untied `lm_head.weight` is an `nn.Linear` weight,
[vocab, d_model], the transpose of our `lm_head/kernel`.

Params are plain float32 numpy arrays in the tree of
`nn.unbox(GPT2(**model_kwargs).init(...)['params'])`: no `LogicallyPartitioned`
boxes, since the axis names are a property of the model, not of the
checkpoint; the trainer unboxes its own params the same way. Only
`safetensors.numpy` is used, so neither direction needs torch.

Both directions check the tensors against the shapes of `GPT2(**model_kwargs)`
itself (`jax.eval_shape` of its init), so a checkpoint that does not fit the
model fails here, with the parameter's name, rather than inside a jit.
"""

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from safetensors import numpy as safetensors_np

from sparse_gpt2 import cli
from sparse_gpt2 import model
from sparse_gpt2 import sparsity
from sparse_gpt2 import workdir
from sparse_gpt2.data import tokenizer as tokenizer_lib

CONFIG = 'config.json'
WEIGHTS = 'model.safetensors'
WEIGHTS_INDEX = 'model.safetensors.index.json'
# What transformers wrote before safetensors: torch pickles, not read here.
TORCH_WEIGHTS = ('pytorch_model.bin', 'pytorch_model.bin.index.json')
TOKENIZER = 'tokenizer.json'
TOKENIZER_CONFIG = 'tokenizer_config.json'
EXPORT_FILES = {CONFIG, WEIGHTS, TOKENIZER, TOKENIZER_CONFIG}

# The GPT2Config defaults: transformers writes only the fields that differ
# from them, so a missing field means this value.
_HF_DEFAULTS = dict(
    vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
    n_inner=None, activation_function='gelu_new', layer_norm_epsilon=1e-5,
    scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
    add_cross_attention=False, tie_word_embeddings=True)

# Both are the tanh approximation of `model.Block`'s `nn.gelu`.
_ACTIVATIONS = ('gelu_new', 'gelu_pytorch_tanh')

# Causal-mask buffers that older transformers versions saved with the weights.
_BUFFERS = ('.attn.bias', '.attn.masked_bias')


def _layout(num_layers, tied):
  """(HF name, our paths, transposed): the HF tensor is our paths joined on
  the last axis, transposed if so marked. Names lack 'transformer.'."""
  layout = [('wte.weight', ('wte/embedding',), False),
            ('wpe.weight', ('wpe',), False),
            ('ln_f.weight', ('norm_f/scale',), False),
            ('ln_f.bias', ('norm_f/bias',), False)]
  ours = {'ln_1': 'norm_1', 'attn.c_proj': 'attn_proj', 'ln_2': 'norm_2',
          'mlp.c_fc': 'mlp_fc', 'mlp.c_proj': 'mlp_proj'}
  for i in range(num_layers):
    for hf, our in ours.items():
      weight = 'scale' if hf.startswith('ln_') else 'kernel'
      layout += [(f'h.{i}.{hf}.weight', (f'block_{i}/{our}/{weight}',), False),
                 (f'h.{i}.{hf}.bias', (f'block_{i}/{our}/bias',), False)]
    for kind, weight in (('weight', 'kernel'), ('bias', 'bias')):
      layout.append((f'h.{i}.attn.c_attn.{kind}',
                     tuple(f'block_{i}/{m}/{weight}'
                           for m in ('query', 'key', 'value')), False))
  if not tied:
    layout.append(('lm_head.weight', ('lm_head/kernel',), True))
  return layout


def _hf_shape(shapes, transposed):
  shape = shapes[0][:-1] + (sum(s[-1] for s in shapes),)
  return shape[::-1] if transposed else shape


def _param_shapes(gpt2):
  """{path: shape} of the 'params' `gpt2.init` would create, without
  creating them. Traced with XLA's attention, which makes the same params:
  cuDNN's does not trace off a GPU, and a GPU run that used it is exported
  anywhere."""
  variables = jax.eval_shape(gpt2.clone(attention='xla').init,
                             jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  flat = sparsity.flat(variables['params'])
  return {path: tuple(x.shape) for path, x in flat.items()}


def _check_names_and_shapes(what, got, expected, ignored=()):
  """One-line ValueError naming the first few missing, unexpected or
  misshapen entries of `got` ({name: shape}) against `expected`."""
  missing = sorted(expected.keys() - got.keys())
  unexpected = sorted(got.keys() - expected.keys() - set(ignored))
  wrong = sorted(f'{k} {got[k]} != {expected[k]}'
                 for k in expected.keys() & got.keys()
                 if tuple(got[k]) != expected[k])
  problems = [f'{label} {items[:5]}{"..." if len(items) > 5 else ""}'
              for label, items in (('missing', missing),
                                   ('unexpected', unexpected),
                                   ('wrong shape', wrong)) if items]
  if problems:
    raise ValueError(f'{what}: ' + '; '.join(problems))


def _read_config(hf_dir):
  def there(name):
    return os.path.isfile(os.path.join(hf_dir, name))
  expected = (f'expected a Hugging Face GPT-2 directory with {CONFIG} and '
              f'{WEIGHTS}')
  if '://' in str(hf_dir):  # Said to have no config.json, which it may have.
    raise ValueError(f'{hf_dir}: a Hugging Face GPT-2 is read from a local '
                     'folder (copy it here first, e.g. gcloud storage cp -r)')
  if not there(CONFIG):
    raise ValueError(f'{hf_dir}: no {CONFIG}; {expected}')
  if not (there(WEIGHTS) or there(WEIGHTS_INDEX)):
    pickled = [n for n in TORCH_WEIGHTS if there(n)]
    raise ValueError(
        f'{hf_dir}: no {WEIGHTS}; {expected}' + (
            f' ({pickled[0]} is not read: load and save the model again with '
            'transformers 4.35 or newer, whose save_pretrained writes '
            'safetensors)' if pickled else ''))
  saved = workdir.read_json(os.path.join(hf_dir, CONFIG))
  if not isinstance(saved, dict):
    raise ValueError(f'{hf_dir}/{CONFIG}: not a JSON object')
  config = {**_HF_DEFAULTS, **saved}
  sizes = ('vocab_size', 'n_layer', 'n_embd', 'n_head', 'n_positions')
  bad_sizes = [f'{k}={config.get(k)!r}' for k in sizes
               if type(config.get(k)) is not int or config[k] < 1]
  if config['n_inner'] is not None and (type(config['n_inner']) is not int
                                        or config['n_inner'] < 1):
    bad_sizes.append(f'n_inner={config["n_inner"]!r}')  # None: 4 x n_embd.
  if bad_sizes:
    raise ValueError(f'{hf_dir}/{CONFIG}: sizes must be integers >= 1: '
                     + ', '.join(bad_sizes))
  # A model field (`tie_embeddings`), typed bool in a run's config.
  if type(config['tie_word_embeddings']) is not bool:
    raise ValueError(f'{hf_dir}/{CONFIG}: tie_word_embeddings must be true '
                     f'or false, got {config["tie_word_embeddings"]!r}')
  # reorder_and_upcast_attn is accepted: it only moves the 1/sqrt(d_head) and
  # upcasts to float32, which is what `model.Block` computes anyway.
  checks = [
      (config.get('model_type', 'gpt2') != 'gpt2',
       f'model_type={config.get("model_type")!r}'),
      (config['activation_function'] not in _ACTIVATIONS,
       f'activation_function={config["activation_function"]!r}'),
      (config['layer_norm_epsilon'] != model.NORM_EPSILON,
       f'layer_norm_epsilon={config["layer_norm_epsilon"]}'),
      (not config['scale_attn_weights'], 'scale_attn_weights=False'),
      (config['scale_attn_by_inverse_layer_idx'],
       'scale_attn_by_inverse_layer_idx=True'),
      (config['add_cross_attention'], 'add_cross_attention=True'),
      (config['n_embd'] % config['n_head'],
       f'n_embd={config["n_embd"]} not divisible by n_head={config["n_head"]}'),
  ]
  unsupported = [what for bad, what in checks if bad]
  if unsupported:
    raise ValueError(f'{hf_dir}/{CONFIG}: unsupported GPT-2 variant: '
                     + ', '.join(unsupported))
  return config


def load(hf_dir):
  """Reads a Hugging Face GPT-2 directory.

  Returns (model_kwargs, params): `model.GPT2(**model_kwargs)` is the same
  network, and `params` its float32 'params' collection, unboxed. Raises a
  one-line ValueError for a missing file, a config that `model.GPT2` cannot
  express, or tensors that do not fit the config.
  """
  config = _read_config(hf_dir)
  model_kwargs = dict(
      vocab_size=config['vocab_size'], num_layers=config['n_layer'],
      d_model=config['n_embd'], num_heads=config['n_head'],
      d_head=config['n_embd'] // config['n_head'],
      d_mlp=config['n_inner'] or 4 * config['n_embd'],
      max_len=config['n_positions'], norm='layernorm',
      tie_embeddings=config['tie_word_embeddings'], pos_embedding=True)
  tensors = {name.removeprefix('transformer.'): array
             for name, array in _read_weights(hf_dir).items()}

  shapes = _param_shapes(model.GPT2(**model_kwargs))
  layout = _layout(config['n_layer'], config['tie_word_embeddings'])
  # A tied lm_head.weight, if saved at all, is a copy of wte: transformers
  # ignores it too.
  ignored = [n for n in tensors if n.endswith(_BUFFERS)] + ['lm_head.weight']
  _check_names_and_shapes(
      f'{hf_dir}/{WEIGHTS}', {n: a.shape for n, a in tensors.items()},
      {hf: _hf_shape([shapes[p] for p in paths], transposed)
       for hf, paths, transposed in layout}, ignored)

  flat = {}
  for hf, paths, transposed in layout:
    array = tensors[hf].T if transposed else tensors[hf]
    for path, part in zip(paths, np.split(array, len(paths), axis=-1)):
      flat[path] = np.ascontiguousarray(part, np.float32)
  return model_kwargs, sparsity.unflat(flat)


def _read_weights(hf_dir):
  """{name: array} of `WEIGHTS`, else of every shard `WEIGHTS_INDEX` names
  (their union: a tensor in no shard is then missing by name)."""
  files = [WEIGHTS]
  if not os.path.isfile(os.path.join(hf_dir, WEIGHTS)):
    index_path = os.path.join(hf_dir, WEIGHTS_INDEX)
    index = workdir.read_json(index_path)
    weight_map = index.get('weight_map') if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and weight_map and all(
        isinstance(f, str) for f in weight_map.values())):
      raise ValueError(f'{index_path}: no "weight_map" of tensor names to '
                       'shard files')
    files = sorted(set(weight_map.values()))
    absent = [f for f in files if not os.path.isfile(os.path.join(hf_dir, f))]
    if absent:
      raise ValueError(f'{index_path} names shards that are not there: '
                       f'{absent[:3]}{"..." if len(absent) > 3 else ""}')
  tensors = {}
  for name in files:
    try:
      tensors.update(safetensors_np.load_file(os.path.join(hf_dir, name)))
    except safetensors.SafetensorError as e:
      raise ValueError(f'{hf_dir}/{name} does not read: {e}') from None
  return tensors


def check_config(model_config, hf_kwargs, hf_dir):
  """Refuses, in one line, a run config (`config.model`) whose model is not
  the Hugging Face GPT-2 it starts from (`init_from_hf`: `hf_kwargs`, as
  `load` read them from `hf_dir`)."""
  d_head, d_mlp = model.derived_sizes(model_config)
  sizes = {**model_config, 'd_head': d_head, 'd_mlp': d_mlp}  # None derived.
  wrong = _unexpressible(model.GPT2(**model_config), {}) + [
      f'{k}={model_config[k]!r} (there {v!r})'
      for k, v in hf_kwargs.items() if sizes[k] != v]
  if wrong:
    raise ValueError(f'model config does not match the Hugging Face GPT-2 '
                     f'in {hf_dir}: ' + ', '.join(wrong))


def _unexpressible(gpt2, flat):
  """What of `gpt2` a transformers GPT2LMHeadModel has no field for."""
  checks = [
      (gpt2.norm != 'layernorm', f'norm={gpt2.norm!r}'),
      (not gpt2.pos_embedding, 'pos_embedding=False'),
      (gpt2.bigram_table, 'bigram_table=True'),
      (gpt2.attention_sink or any(p.endswith('/sink') for p in flat),
       'attention sinks'),
      (gpt2.d_head not in (None, gpt2.d_model // gpt2.num_heads)
       or gpt2.d_model % gpt2.num_heads,
       f'd_head={gpt2.d_head} with d_model={gpt2.d_model}, '
       f'num_heads={gpt2.num_heads}'),
      (gpt2.act_topk_fraction > 0,
       f'act_topk_fraction={gpt2.act_topk_fraction}'),
      # Zero biases would compute the same, but load would then return a
      # model with biases: refused so that load inverts save.
      (not gpt2.use_bias, 'use_bias=False'),
  ]
  return [what for failed, what in checks if failed]


def check_export(model_kwargs, out_dir, overwrite=False, flat=()):
  """What `save` refuses before it writes, in one line: a model that
  transformers' GPT-2 cannot express (`_unexpressible`; `flat`, the params
  by path, where they are at hand), or an `out_dir` it may not fill or
  replace (one with content, a remote path, a mount point, one below a
  file). Returns `out_dir` with links resolved. `convert` calls it before it
  reads a checkpoint, which for the paper's 0.42B model is gigabytes."""
  gpt2 = model.GPT2(**model_kwargs)
  unexpressible = _unexpressible(gpt2, flat)
  if unexpressible:
    raise ValueError('transformers GPT-2 cannot express this model: '
                     + ', '.join(unexpressible))
  if '://' in str(out_dir):  # realpath made gs://B/x the local ./gs:/B/x.
    raise ValueError(f'{out_dir}: an export is written to a local folder '
                     '(copy it there afterwards, e.g. gcloud storage cp -r)')
  out_dir = os.path.realpath(out_dir)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f'{out_dir} exists and is not a directory')
  blocking = cli.file_in_the_way(out_dir)  # Else it failed when written.
  if blocking:
    raise ValueError(f'{out_dir}: {blocking} is a file, not a directory')
  if os.path.ismount(out_dir):  # A container's volume, a mounted disk.
    raise ValueError(f'{out_dir} is a mount point, which an export cannot '
                     'replace (it is written beside it and renamed into '
                     f'place): give a folder inside it, e.g. {out_dir}/gpt2')
  present = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
  if present and not overwrite:
    raise ValueError(f'{out_dir} is not empty; replace it with '
                     'overwrite=True (convert: --overwrite)')
  if present - EXPORT_FILES:  # A run directory also has a config.json.
    raise ValueError(f'{out_dir} holds more than a Hugging Face export '
                     f'({sorted(present - EXPORT_FILES)}); refusing to '
                     'replace it')
  if present:  # Those names, but perhaps another model's (a released GPT-2).
    config = (workdir.read_json(os.path.join(out_dir, CONFIG))
              if CONFIG in present else None)
    if not isinstance(config, dict):
      raise ValueError(f'{out_dir} is not an earlier export (its {CONFIG} '
                       'is missing or not a JSON object); refusing to '
                       'replace it')
    # An export's fields, by which one is told from another model's folder
    # of the same file names (a released GPT-2's config.json and
    # model.safetensors): the Hub's and transformers' configs hold more
    # (n_ctx, initializer_range, transformers_version, ...).
    foreign = sorted(config.keys() - _export_config(gpt2, eot_id=0).keys())
    if foreign:
      raise ValueError(
          f'{out_dir} is not an earlier export: its {CONFIG} has fields an '
          f'export never writes ({", ".join(foreign[:3])}'
          f'{", ..." if len(foreign) > 3 else ""}); refusing to replace it')
  return out_dir


def _export_config(gpt2, eot_id):
  """The config.json `save` writes for `gpt2`; with the run's end-of-text
  id (its tokenizer exported too), named as bos and eos."""
  config = dict(
      model_type='gpt2', architectures=['GPT2LMHeadModel'],
      vocab_size=gpt2.vocab_size, n_positions=gpt2.max_len,
      n_embd=gpt2.d_model, n_layer=gpt2.num_layers, n_head=gpt2.num_heads,
      n_inner=model.derived_sizes(gpt2)[1],
      activation_function='gelu_new',
      layer_norm_epsilon=model.NORM_EPSILON,
      tie_word_embeddings=gpt2.tie_embeddings,
      # As trained: transformers' default is 0.1 of each. The model drops
      # out its embeddings and each block's outputs, never the attention
      # probabilities (`model.attend`).
      resid_pdrop=gpt2.dropout, embd_pdrop=gpt2.dropout, attn_pdrop=0.0,
      dtype='float32')
  if eot_id is not None:
    config.update(bos_token_id=eot_id, eos_token_id=eot_id)
  return config


def save(params, model_kwargs, out_dir, overwrite=False, tokenizer=None):
  """Writes `params` of `model.GPT2(**model_kwargs)` as a Hugging Face GPT-2
  directory that `transformers.GPT2LMHeadModel.from_pretrained` loads.

  `params` is the 'params' collection, boxed or not. Weights are written in
  float32. With the run's `tokenizer` (a `tokenizers.Tokenizer`), the
  directory also holds it, for `transformers.AutoTokenizer.from_pretrained`,
  and the config names its end-of-text id as bos and eos: without them,
  transformers assumes GPT-2's 50256, beyond a small vocabulary (`generate`
  stops at and pads with it). The directory appears
  complete or not at all (written beside it, then renamed), and an existing
  non-empty `out_dir` is replaced only with `overwrite=True`, and only if it
  holds nothing but an earlier export (never a run directory); a link to a
  directory is followed, and what it points to is replaced. Raises a
  one-line ValueError for a model transformers' GPT-2 cannot express (see
  `_unexpressible`) or params that do not fit it.
  """
  gpt2 = model.GPT2(**model_kwargs)
  flat = sparsity.flat(params)
  out_dir = check_export(model_kwargs, out_dir, overwrite, flat)
  _check_names_and_shapes('params', {p: x.shape for p, x in flat.items()},
                          _param_shapes(gpt2))

  tensors = {}
  for hf, paths, transposed in _layout(gpt2.num_layers, gpt2.tie_embeddings):
    array = np.concatenate([np.asarray(flat[p], np.float32) for p in paths],
                           axis=-1)
    name = hf if hf.startswith('lm_head') else f'transformer.{hf}'
    tensors[name] = np.ascontiguousarray(array.T if transposed else array)
  config = _export_config(gpt2, None if tokenizer is None
                          else tokenizer_lib.eot_id(tokenizer))

  parent, base = os.path.split(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{base}.tmp', dir=parent)
  os.chmod(tmp, 0o755)  # Not mkdtemp's private 0o700, which would stay.
  try:
    with open(os.path.join(tmp, CONFIG), 'w') as f:
      json.dump(config, f, indent=2)
    # Serialized here and written by Python, not by safetensors' and
    # tokenizers' own savers, which said a full disk in an exception that
    # is no OSError: a traceback, not `cli.run`'s line naming the file.
    with open(os.path.join(tmp, WEIGHTS), 'wb') as f:
      f.write(safetensors_np.save(tensors, metadata={'format': 'pt'}))
    if tokenizer is not None:
      with open(os.path.join(tmp, TOKENIZER), 'w') as f:
        f.write(tokenizer.to_str(pretty=True))
      with open(os.path.join(tmp, TOKENIZER_CONFIG), 'w') as f:
        eot = tokenizer_lib.EOT
        # A literal <|endoftext|> in a text stays bytes, as the run's own
        # encoding (`encode_special_tokens`, which tokenizer.json omits).
        json.dump(dict(tokenizer_class='PreTrainedTokenizerFast',
                       bos_token=eot, eos_token=eot, unk_token=eot,
                       model_max_length=gpt2.max_len,
                       split_special_tokens=True), f, indent=2)
    replaced = os.path.exists(out_dir)  # Empty, or overwrite=True.
    if replaced:
      try:
        os.rename(out_dir, tmp + '.old')
      except OSError as e:  # A bind mount on its parent's disk (EBUSY).
        raise ValueError(f'{out_dir} cannot be moved aside to be replaced '
                         f'({e.strerror}): give a folder inside it') from None
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, OSError) and e.errno and e.filename is None:
      raise OSError(e.errno, e.strerror, out_dir) from None  # A full disk's
      # write names no file.
    raise
  os.rename(tmp, out_dir)
  if replaced:
    shutil.rmtree(tmp + '.old')
