"""GPT2 architecture switches: each builds, runs, and changes what it should.
(Parity with transformers' GPT-2 is in test_hf.py.)"""

import functools
import importlib
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from sparse_gpt2 import defaults
from sparse_gpt2 import model as model_lib
from sparse_gpt2 import sparsity
from sparse_gpt2 import train

SMALL = dict(vocab_size=50, num_layers=2, d_model=16, num_heads=2,
             max_len=12)
TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, 50)


def _init(**kw):
  m = model_lib.GPT2(**{**SMALL, **kw})
  v = m.init(jax.random.key(0), TOKENS)
  return m, nn.unbox(v['params']), v


def _logits(m, params, tokens=TOKENS, **kw):
  return np.asarray(m.apply({'params': params}, tokens, **kw))


def test_defaults_are_gpt2_small():
  m = model_lib.GPT2()
  shapes = jax.eval_shape(m.init, jax.random.key(0),
                          jnp.zeros((1, 8), jnp.int32))['params']
  n = sum(x.size for x in jax.tree.leaves(nn.unbox(shapes)))
  assert n == 124_439_808  # GPT-2 small, tied embeddings.


def test_rmsnorm_has_no_bias_and_changes_output():
  m1, p1, _ = _init(norm='layernorm')
  m2, p2, _ = _init(norm='rmsnorm')
  assert set(p1['block_0']['norm_1']) == {'scale', 'bias'}
  assert set(p2['block_0']['norm_1']) == {'scale'}
  assert not np.allclose(_logits(m1, p1), _logits(m2, p2))
  with pytest.raises(ValueError, match='model.norm'):
    _init(norm='batchnorm')


def test_untied_unembedding_has_its_own_matrix():
  _, tied, _ = _init(tie_embeddings=True)
  m, untied, _ = _init(tie_embeddings=False)
  assert 'lm_head' not in tied
  assert untied['lm_head']['kernel'].shape == (16, 50)
  zeroed = {**untied, 'lm_head': {'kernel': jnp.zeros((16, 50))}}
  np.testing.assert_array_equal(_logits(m, zeroed), 0)


def test_no_positional_embedding():
  _, with_pos, _ = _init(pos_embedding=True)
  m, without, _ = _init(pos_embedding=False)
  assert with_pos['wpe'].shape == (12, 16)
  assert 'wpe' not in without
  longer = jnp.zeros((1, 20), jnp.int32)  # No max_len limit without wpe.
  assert _logits(m, without, longer).shape == (1, 20, 50)


def test_bigram_table_adds_the_row_of_the_current_token():
  m, params, _ = _init(bigram_table=True)
  assert params['bigram'].shape == (50, 50)
  before = _logits(m, params)
  table = params['bigram'].at[int(TOKENS[0, 3]), 7].set(5.0)
  after = _logits(m, {**params, 'bigram': table})
  diff = after - before
  hit = np.asarray(TOKENS == TOKENS[0, 3])
  np.testing.assert_allclose(diff[..., 7][hit], 5.0, atol=1e-5)
  np.testing.assert_allclose(diff[..., 7][~hit], 0.0, atol=1e-5)
  np.testing.assert_allclose(np.delete(diff, 7, axis=-1), 0.0, atol=1e-5)


def test_the_training_loss_scores_each_token_against_the_next():
  """`train._loss` of windows [B, T+1]: the logits of [:, :-1] against the
  tokens one on. A bigram table that knows "the next token is this one + 1"
  makes a counting window nearly free, and scored against the tokens
  themselves (no shift) it would cost ~10 nats a token."""
  m, params, _ = _init(bigram_table=True)
  following = (jnp.arange(50) + 1) % 50
  params['bigram'] = 10.0 * jax.nn.one_hot(following, 50)
  windows = (TOKENS[:, :1] + jnp.arange(13)) % 50  # [2, 12 + 1], counting.
  log_probs = jax.nn.log_softmax(_logits(m, params, windows[:, :-1]))
  expected = -np.take_along_axis(log_probs, windows[:, 1:, None], -1).mean()
  assert expected < 0.1
  np.testing.assert_allclose(train._loss(m, params, windows), expected,
                             atol=1e-6)


@pytest.mark.parametrize('kw', [
    {}, dict(bigram_table=True, tie_embeddings=False),
    dict(attention_sink=True, remat='full', xla_cpu_grads=True)])
def test_positions_give_the_logits_of_one_position_per_row(kw):
  # The last block computes only those rows (its own attention), so a
  # position before the row's end must see no key after it.
  m, params, _ = _init(**kw)
  if 'bigram' in params:  # Nonzero: the row of each scored position's token.
    params['bigram'] = jax.random.normal(jax.random.key(4), (50, 50))
  positions = jnp.array([3, 11])
  assert TOKENS[0, 3] != TOKENS[0, -1]  # Not the row of the last token.
  np.testing.assert_allclose(
      _logits(m, params, positions=positions),
      _logits(m, params)[np.arange(2), positions], rtol=1e-5, atol=1e-6)


def test_negative_positions_count_from_the_end():
  """`positions` index as numpy does (-1: the last token), which the
  gathers of the query, the residual and the bigram row did, while the last
  block's attention took -1 for a query before every key: no key visible,
  a 0 / 0 softmax and NaN logits."""
  m, params, _ = _init(attention_sink=True, bigram_table=True)
  params['bigram'] = jax.random.normal(jax.random.key(4), (50, 50))
  np.testing.assert_allclose(
      _logits(m, params, positions=jnp.array([-1, -9])),
      _logits(m, params)[np.arange(2), [11, 3]], rtol=1e-5, atol=1e-6)


def test_attention_sink_can_switch_attention_off():
  m, params, _ = _init(attention_sink=True)
  assert params['block_0']['sink'].shape == (2,)
  # A very large sink logit: heads attend only to the empty slot, so the
  # attention output is the projection bias alone, whatever the values are.
  for b in ('block_0', 'block_1'):
    params[b]['sink'] = jnp.full((2,), 1e4)
  zero_v = jax.tree.map(lambda x: x, params)
  for b in ('block_0', 'block_1'):
    zero_v[b]['value']['kernel'] = jnp.zeros_like(params[b]['value']['kernel'])
  np.testing.assert_allclose(_logits(m, params), _logits(m, zero_v),
                             atol=1e-5)


def test_head_size_is_independent_of_width():
  _, params, _ = _init(d_head=16, num_heads=4)
  assert params['block_0']['query']['kernel'].shape == (16, 64)
  assert params['block_0']['attn_proj']['kernel'].shape == (64, 16)


def test_abs_topk_keeps_the_largest_fraction():
  x = jnp.array([[3.0, -4.0, 1.0, 0.5, -0.1, 2.0, 0.0, -2.5]])
  np.testing.assert_array_equal(model_lib.abs_topk(x, 0.25),
                                [[3.0, -4.0, 0, 0, 0, 0, 0, 0]])
  # k is the fraction's ceiling even where the product rounds above an
  # integer (0.07 * 100 is 7.000000000000001 in floats).
  x = jnp.arange(1.0, 101.0)
  assert int((model_lib.abs_topk(x, 0.07) != 0).sum()) == 7
  assert int((model_lib.abs_topk(x, 0.071) != 0).sum()) == 8
  # Magnitudes one ulp apart (the int32 bits' lowest bit): the larger only.
  x = jnp.array([[1.0, np.nextafter(np.float32(1), np.float32(2))]])
  np.testing.assert_array_equal(model_lib.abs_topk(x, 0.5), [[0, x[0, 1]]])


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_abs_topk_equals_a_sort_based_reference(dtype):
  x = jax.random.normal(jax.random.key(0), (6, 5, 96)).astype(dtype)
  x = x.at[0, 0, :8].set(-3.0).at[1, 1].set(0.0)  # Ties at and above the k-th.
  kth = jax.lax.top_k(jnp.abs(x), 24)[0][..., -1:]
  np.testing.assert_array_equal(model_lib.abs_topk(x, 0.25),
                                jnp.where(jnp.abs(x) >= kth, x, 0))
  grad = jax.grad(lambda x: model_lib.abs_topk(x, 0.25).astype(
      jnp.float32).sum())(x)
  np.testing.assert_array_equal(grad, jnp.abs(x) >= kth)


def test_act_topk_sparsifies_the_chosen_nodes():
  m, params, _ = _init(act_topk_fraction=0.25,
                       act_topk_locations=('mlp_neuron',))
  dense = model_lib.GPT2(**SMALL)
  assert not np.allclose(_logits(m, params), _logits(dense, params))
  _, state = m.apply({'params': params}, TOKENS,
                     mutable=['intermediates', 'node_stats'],
                     capture_intermediates=lambda _, name: name == '_node')
  nodes = state['intermediates']['block_0']['_node']  # In NODE_LOCATIONS order.
  neurons = nodes[model_lib.NODE_LOCATIONS.index('mlp_neuron')]  # [B, T, 64]
  assert int(jnp.max(jnp.sum(neurons != 0, axis=-1))) == 16
  assert int(jnp.min(jnp.sum(nodes[0] != 0, axis=-1))) == 16  # attn_in dense.
  # Each node's sown mean, the value mean ablation holds it at, is the mean
  # of what the node passes on (after AbsTopK) over every row and position.
  stats = state['node_stats']['block_0']
  for name, node in zip(model_lib.NODE_LOCATIONS, nodes):
    np.testing.assert_allclose(stats[name][0], node.mean((0, 1)), rtol=1e-5,
                               atol=1e-7)
  with pytest.raises(ValueError, match='act_topk_locations'):
    _init(act_topk_fraction=0.25, act_topk_locations=('nowhere',))


@pytest.mark.parametrize('kw, message', [
    (dict(act_topk_fraction=0.25),
     r'model.act_topk_fraction 0.25 applies at no location: give '
     r'model.act_topk_locations'),
    (dict(act_topk_locations=('mlp_neuron',)),
     r"model.act_topk_locations \('mlp_neuron',\) do nothing at "
     r'model.act_topk_fraction 0'),
])
def test_half_configured_abstopk_is_refused(kw, message):
  # Either half alone trained the plain model (`Block._node` needs both)
  # under a config that said AbsTopK.
  with pytest.raises(ValueError, match=message):
    model_lib.validate(model_lib.GPT2(**SMALL, **kw))
  config = tiny.get_config()
  config.model.update(kw)
  with pytest.raises(ValueError, match=message):
    model_lib.validate(config.model)


def test_every_config_file_validates():
  """Each config's model and sparsity pass their checks (dense ones with
  their inherited sparsity fields; `sparse_medium:abstopk` both AbsTopK
  fields)."""
  names = sorted(p.stem for p in pathlib.Path(tiny.__file__).parent.glob(
      '*.py') if p.stem != '__init__')
  assert 'sparse_medium' in names and 'dense_small' in names
  runs = [(n, None) for n in names] + [('sparse_medium', 'abstopk'),
                                       ('tiny', 'static'), ('tiny', 'none')]
  for name, arg in runs:
    config = importlib.import_module(f'configs.{name}').get_config(arg)
    model_lib.validate(config.model)
    sparsity.validate(config.sparsity)
    defaults.check_fields(config)


def test_dropout_only_in_training():
  m, params, _ = _init(dropout=0.5)
  a = _logits(m, params)
  np.testing.assert_array_equal(a, _logits(m, params))
  b = _logits(m, params, deterministic=False,
              rngs={'dropout': jax.random.key(3)})
  assert not np.allclose(a, b)


def test_dropout_applies_to_the_attention_output():
  """Embeddings of zeros (dropped or not, zeros) and an MLP writing zeros:
  the residual stream is the attention outputs alone (attn_proj's bias),
  so the training logits vary with the dropout rng only if those are
  dropped."""
  m, params, _ = _init(dropout=0.5, tie_embeddings=False)
  params = jax.tree.map(lambda x: x, params)
  params['wte']['embedding'] = jnp.zeros_like(params['wte']['embedding'])
  params['wpe'] = jnp.zeros_like(params['wpe'])
  for i, b in enumerate(('block_0', 'block_1')):
    params[b]['attn_proj']['bias'] = jax.random.normal(jax.random.key(i),
                                                       (16,))
    params[b]['mlp_proj'] = jax.tree.map(jnp.zeros_like,
                                         params[b]['mlp_proj'])
  a, b = (_logits(m, params, deterministic=False,
                  rngs={'dropout': jax.random.key(seed)}) for seed in (3, 4))
  assert not np.allclose(a, b)
  assert not np.allclose(a, _logits(m, params))


def test_output_projections_start_smaller_by_the_depth():
  """GPT-2's init: normal(0.02), and normal(0.02 / sqrt(2 * layers)) for
  the projections that write to the residual stream."""
  m = model_lib.GPT2(vocab_size=256, num_layers=8, d_model=64, num_heads=2,
                     max_len=8)
  params = nn.unbox(jax.jit(m.init)(jax.random.key(0),
                                    jnp.zeros((1, 8), jnp.int32))['params'])
  for b in ('block_0', 'block_7'):
    for name, std in (('query', 0.02), ('value', 0.02), ('mlp_fc', 0.02),
                      ('attn_proj', 0.005), ('mlp_proj', 0.005)):
      np.testing.assert_allclose(np.std(params[b][name]['kernel']), std,
                                 rtol=0.1, err_msg=f'{b} {name}')
  np.testing.assert_allclose(np.std(params['wte']['embedding']), 0.02,
                             rtol=0.1)


def test_bfloat16_compute_keeps_float32_logits_and_params():
  m, params, _ = _init(dtype='bfloat16')
  assert params['block_0']['query']['kernel'].dtype == jnp.float32
  out, state = m.apply({'params': params}, TOKENS,
                       capture_intermediates=True)
  assert out.dtype == jnp.float32
  # The blocks compute in bf16: their outputs are bf16, and the logits are
  # the float32 model's to bf16's precision, not to float32's.
  assert state['intermediates']['block_0']['__call__'][0].dtype == (
      jnp.bfloat16)
  m32 = model_lib.GPT2(**{**SMALL, 'dtype': 'float32'})
  out32 = _logits(m32, params)
  assert not np.allclose(out, out32, atol=1e-5)
  np.testing.assert_allclose(out, out32, atol=0.05)
  _, p16, _ = _init(param_dtype='bfloat16')
  assert p16['block_0']['query']['kernel'].dtype == jnp.bfloat16


def test_every_weight_has_logical_axes_and_masks_share_them():
  _, _, variables = _init(bigram_table=True, attention_sink=True,
                          tie_embeddings=False,
                          sparse_params=r'^(?!.*(norm|bigram|sink))')
  specs = nn.get_partition_spec(variables)
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      nn.unbox(variables['params']))[0]:
    spec = specs['params']
    for p in path:
      spec = spec[p.key]
    assert spec is not None and len(spec) == leaf.ndim, path
  masks = variables['sparsity']
  assert 'bigram' not in masks and 'norm_f' not in masks
  assert 'sink' not in masks['block_0']
  assert specs['sparsity']['block_0']['mlp_fc']['kernel'] == (
      specs['params']['block_0']['mlp_fc']['kernel'])
  wte = nn.unbox(variables['params'])['wte']['embedding']
  packed = nn.unbox(masks)['wte']['embedding']  # 8 weights a byte.
  assert packed.dtype == jnp.uint8 and packed.shape == (
      wte.shape[0], -(-wte.shape[1] // 8))


def test_node_masks_of_ones_change_nothing_and_zeros_mean_ablate():
  m, params, _ = _init()
  _, state = m.apply({'params': params}, TOKENS, mutable=['node_stats'])
  means = jax.tree.map(lambda t: t[0], state['node_stats'],
                       is_leaf=lambda t: isinstance(t, tuple))
  ones = jax.tree.map(jnp.ones_like, means)
  kept = m.apply({'params': params, 'node_mask': ones, 'node_mean': means},
                 TOKENS, mutable=['node_stats'])[0]
  np.testing.assert_array_equal(kept, _logits(m, params))
  zeros = jax.tree.map(jnp.zeros_like, means)
  ablated = np.asarray(m.apply(
      {'params': params, 'node_mask': zeros, 'node_mean': means},
      TOKENS, mutable=['node_stats'])[0])
  # Every residual write is its mean: logits no longer depend on attention
  # or MLP inputs, only on the token and position embeddings.
  other = TOKENS.at[:, :6].set((TOKENS[:, :6] + 1) % 50)
  ablated_other = np.asarray(m.apply(
      {'params': params, 'node_mask': zeros, 'node_mean': means},
      other, mutable=['node_stats'])[0])
  np.testing.assert_allclose(ablated[:, 6:], ablated_other[:, 6:], atol=1e-5)


def _reference_attention(q, k, v, sink=None):
  """The attention this model used before dot_product_attention: explicit
  [B, H, T, T] logits, causal mask, sink logit concatenated as a last key."""
  b, t, h, dh = q.shape
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
  logits = logits / np.sqrt(dh)
  logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits,
                     jnp.finfo(jnp.float32).min)
  if sink is not None:
    sink = jnp.broadcast_to(sink[None, :, None, None], (b, h, t, 1))
    probs = jax.nn.softmax(jnp.concatenate([logits, sink], -1))[..., :t]
  else:
    probs = jax.nn.softmax(logits)
  return jnp.einsum('bhqk,bkhd->bqhd', probs.astype(q.dtype), v)


@pytest.mark.parametrize('with_sink', [False, True])
@pytest.mark.parametrize('t', [9, 100])  # One query block; four of 25.
def test_dot_product_attention_equals_the_explicit_attention(with_sink, t):
  q, k, v = jax.random.normal(jax.random.key(5), (3, 2, t, 4, 8))
  sink = jnp.array([-1.0, 0.0, 0.5, 3.0])

  def attend(q, k, v, sink):
    return model_lib.attend(q, k, v, sink if with_sink else None, 'xla')

  got = attend(q, k, v, sink)
  want = _reference_attention(q, k, v, sink if with_sink else None)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # And so do the gradients, the sink's included.
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  grads = jax.grad(loss(attend), argnums=(0, 1, 2, 3))(q, k, v, sink)
  ref = jax.grad(loss(lambda q, k, v, s: _reference_attention(
      q, k, v, s if with_sink else None)), argnums=(0, 1, 2, 3))(q, k, v, sink)
  for g, r in zip(grads[:4 if with_sink else 3], ref):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('remat,xla_cpu_grads',
                         [('full', False), ('dots', False), ('full', True)])
def test_remat_gives_identical_loss_and_gradients(remat, xla_cpu_grads):
  kw = dict(attention_sink=True, bigram_table=True, tie_embeddings=False,
            xla_cpu_grads=xla_cpu_grads)
  m, params, _ = _init(**kw)
  m_remat = model_lib.GPT2(**{**SMALL, **kw, 'remat': remat})

  def loss(model):
    return lambda p: jnp.mean(model.apply({'params': p}, TOKENS) ** 2)

  # Bitwise equal under XLA:CPU's fusion emitters (conftest turns them off).
  jit = functools.partial(
      jax.jit, compiler_options={'xla_cpu_use_fusion_emitters': True})
  l1, g1 = jit(jax.value_and_grad(loss(m)))(params)
  l2, g2 = jit(jax.value_and_grad(loss(m_remat)))(params)
  np.testing.assert_array_equal(l1, l2)
  jax.tree.map(np.testing.assert_array_equal, g1, g2)
  # The node collections of circuit pruning pass through remat unchanged.
  _, stats = m_remat.apply({'params': params}, TOKENS, mutable=['node_stats'])
  _, stats_ref = m.apply({'params': params}, TOKENS, mutable=['node_stats'])
  jax.tree.map(np.testing.assert_array_equal, stats, stats_ref)


def test_bad_attention_remat_or_depth_fails_clearly():
  with pytest.raises(ValueError, match='model.remat'):
    _init(remat='sometimes')
  with pytest.raises(ValueError, match='model.attention'):
    _init(attention='flash')
  with pytest.raises(ValueError, match='model.num_layers'):
    _init(num_layers=0)


def test_auto_attention_leaves_cudnn_heads_it_cannot_run(monkeypatch):
  """On a GPU, 'auto' took cuDNN for any 16-bit heads without a sink, and
  jax's cuDNN kernel refuses a head size that is no multiple of 8 (or
  over 256) with a NotImplementedError at the step's trace. Here the
  backend only claims to be a GPU: a cuDNN call would fail on the CPU."""
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  q, k, v = jax.random.normal(jax.random.key(5), (3, 2, 8, 2, 12),
                              jnp.bfloat16)
  np.testing.assert_array_equal(model_lib.attend(q, k, v, None, 'auto'),
                                model_lib.attend(q, k, v, None, 'xla'))


@pytest.mark.parametrize('d_head', [12, 264])
def test_cudnn_attention_with_heads_it_cannot_run_is_refused(d_head):
  config = tiny.get_config().model
  config.attention, config.attention_sink = 'cudnn', False
  config.dtype, config.d_head = 'bfloat16', d_head
  with pytest.raises(ValueError, match=f'multiple of 8 up to 256, got '
                                       f'd_head {d_head}'):
    model_lib.validate(config)
  config.d_head = 16
  model_lib.validate(config)


def test_xla_cpu_grads_are_the_gradients_of_jax_own_rules():
  # `matmul`'s and `rms_norm`'s own backward passes (written for XLA:CPU)
  # must give the gradients of JAX's rules, alone and in the whole model.
  keys = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(keys[0], (3, 5, 7))
  kernel = jax.random.normal(keys[1], (7, 4))
  dy = jax.random.normal(keys[2], (3, 5, 4))
  ours, reference = (
      jax.grad(lambda x, k, f=f: jnp.sum(f(x, k) * dy), (0, 1))(x, kernel)
      for f in (model_lib.matmul, jnp.matmul))
  for got, want in zip(ours, reference):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  scale = 1 + jax.random.normal(keys[1], (7,))
  flax_norm = lambda x, scale: nn.RMSNorm(epsilon=1e-5).apply(
      {'params': {'scale': scale}}, x)
  np.testing.assert_array_equal(model_lib.rms_norm(x, scale),
                                flax_norm(x, scale))  # The same forward.
  ours, reference = (
      jax.grad(lambda x, s, f=f: jnp.sum(f(x, s) * x[..., ::-1]), (0, 1))(
          x, scale) for f in (model_lib.rms_norm, flax_norm))
  for got, want in zip(ours, reference):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for tied, norm in ((False, 'layernorm'), (True, 'layernorm'),
                     (False, 'rmsnorm')):
    kw = dict(bigram_table=True, tie_embeddings=tied, norm=norm)
    m, params, _ = _init(**kw)
    m_cpu = model_lib.GPT2(**SMALL, **kw, xla_cpu_grads=True)
    g, g_cpu = (jax.grad(lambda p, m=m: jnp.mean(
        m.apply({'params': p}, TOKENS) ** 2))(params) for m in (m, m_cpu))
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4,
                                   atol=1e-7), g_cpu, g)
  with pytest.raises(ValueError, match='matmul'):
    model_lib._dense_dot_general(x, kernel, (((0,), (0,)), ((), ())))
  # A run's model takes them where its step runs on CPU, and only there.
  config = tiny.get_config()
  assert train.make_model(config).xla_cpu_grads  # The tests run on CPU.
  assert not train.make_model(config, 'tpu').xla_cpu_grads
