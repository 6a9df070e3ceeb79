"""GPT-2 in Flax linen: the dense baseline and, by config, the paper's variant.

The defaults are GPT-2 small exactly (pre-LayerNorm, learned positions, tanh
GELU, tied embeddings, biases), so Hugging Face checkpoints load unchanged
(`sparse_gpt2.hf`). Each change the paper makes is one field: RMSNorm, untied
unembedding, no positions, a bigram logit table, attention sinks, a head size
independent of the width, and AbsTopK activation sparsity.

Weight sparsity lives here only as state: when `sparse_params` is a regex,
`init` also creates a mask in the 'sparsity' collection for every parameter
whose path ('block_0/query/kernel', ...) matches it, bit-packed along the
last axis (`sparsity.pack`), with the same logical axes as that parameter
so both shard alike. The forward pass never reads the masks: the optimizer
keeps the weights exactly on them (`sparsity.reproject`).

Every node of the circuit analysis ('attn_in', 'q', 'k', 'v', 'attn_out',
'mlp_in', 'mlp_neuron', 'mlp_out' in each block) goes through `Block._node`:
AbsTopK is applied there, its batch mean is sown into 'node_stats', and when
the caller passes 'node_mask' and 'node_mean' collections the node is mixed
with its mean (mean ablation) there, so circuit pruning needs no other model.

Attention goes through `attend`: cuDNN's flash attention
(`jax.nn.dot_product_attention`) on GPU where it can, elsewhere
`softmax_attention`, block by block over the queries with a backward pass
of its own. Memory at scale: `remat` recomputes each block's activations
in the backward pass instead of keeping them (`REMAT_POLICIES`). On CPU
(`xla_cpu_grads`, which `train.make_model` sets there) the dense layers'
kernel gradients take the order XLA:CPU runs without copies (`matmul`),
and RMSNorm's gradient is written out (`rms_norm`).
"""

import math
import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparse_gpt2 import sparsity

NODE_LOCATIONS = ('attn_in', 'q', 'k', 'v', 'attn_out',
                  'mlp_in', 'mlp_neuron', 'mlp_out')
ATTENTION = ('auto', 'xla', 'cudnn')
_CUDNN_MAX_D_HEAD = 256  # cuDNN's flash attention, on Hopper and later.
_CUDNN_NO_SINKS = ("model.attention='cudnn' does not support attention sinks; "
                   "use 'xla' or 'auto'")
# What a block keeps for the backward pass; everything else is recomputed.
REMAT_POLICIES = {
    'none': None,                   # No remat: keep every activation.
    'full': jax.checkpoint_policies.nothing_saveable,  # Keep block inputs.
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


NORMS = ('layernorm', 'rmsnorm')
DTYPES = ('float32', 'bfloat16', 'float16')


def validate(m):
  """One-line errors for a GPT2 (or its config, `config.model`) that cannot
  be built: `train.validate` runs it before a run writes anything."""
  for field in ('vocab_size', 'num_layers', 'd_model', 'num_heads',
                'max_len'):
    if getattr(m, field) < 1:
      raise ValueError(f'model.{field} must be >= 1, got {getattr(m, field)}')
  for field in ('d_head', 'd_mlp'):
    if getattr(m, field) is not None and getattr(m, field) < 1:
      raise ValueError(f'model.{field} must be >= 1 (or None: derived), '
                       f'got {getattr(m, field)}')
  for field, known in (('norm', NORMS), ('attention', ATTENTION),
                       ('remat', tuple(REMAT_POLICIES)), ('dtype', DTYPES),
                       ('param_dtype', DTYPES)):
    if getattr(m, field) not in known:
      raise ValueError(f'model.{field} must be one of {known}, got '
                       f'{getattr(m, field)!r}')
  unknown = set(m.act_topk_locations) - set(NODE_LOCATIONS)
  if unknown:
    # The command line's `act_topk_locations=q,k` is the one name 'q,k'.
    listed = [name.strip() for name in ','.join(sorted(unknown)).split(',')]
    tuple_hint = (f'; several are a tuple: --config.model.act_topk_locations='
                  f'"{tuple(listed)}"' if any(',' in n for n in unknown)
                  else '')
    raise ValueError(f'model.act_topk_locations: unknown {sorted(unknown)}; '
                     f'known: {NODE_LOCATIONS}{tuple_hint}')
  if not 0 <= m.act_topk_fraction <= 1:
    raise ValueError('model.act_topk_fraction must be in [0, 1], got '
                     f'{m.act_topk_fraction}')
  # AbsTopK is on only with both fields set (`Block._node`): half of it
  # would train the plain model under an AbsTopK run's name.
  if m.act_topk_fraction > 0 and not m.act_topk_locations:
    raise ValueError(f'model.act_topk_fraction {m.act_topk_fraction} applies '
                     'at no location: give model.act_topk_locations (e.g. '
                     'mlp_neuron)')
  if m.act_topk_locations and not m.act_topk_fraction > 0:
    raise ValueError(f'model.act_topk_locations {tuple(m.act_topk_locations)} '
                     'do nothing at model.act_topk_fraction 0: give it (the '
                     'paper keeps 0.25) or no locations')
  if not 0 <= m.dropout < 1:
    raise ValueError(f'model.dropout must be in [0, 1), got {m.dropout}')
  if m.attention == 'cudnn' and m.attention_sink:
    raise ValueError(_CUDNN_NO_SINKS)
  if m.attention == 'cudnn' and m.dtype not in ('bfloat16', 'float16'):
    raise ValueError(f"model.attention='cudnn' computes in bfloat16 or "
                     f"float16 only, got model.dtype={m.dtype!r}: set one, "
                     "or use 'xla' or 'auto'")
  d_head = derived_sizes(m)[0]
  if d_head < 1:
    raise ValueError(f'model.d_model {m.d_model} over model.num_heads '
                     f'{m.num_heads} heads leaves d_head 0: give '
                     'model.d_head, or fewer heads')
  if m.attention == 'cudnn' and not _cudnn_takes_heads_of(d_head,
                                                          _CUDNN_MAX_D_HEAD):
    raise ValueError(f"model.attention='cudnn' takes heads of a multiple of 8 "
                     f'up to {_CUDNN_MAX_D_HEAD}, got d_head {d_head}: use '
                     "'xla' or 'auto'")


def derived_sizes(model_config):
  """(d_head, d_mlp) of a GPT2 or its config: None means GPT-2's
  d_model // num_heads and 4 * d_model. The one place they are derived."""
  m = model_config
  return (m.d_head or m.d_model // m.num_heads, m.d_mlp or 4 * m.d_model)


def abs_topk(x, fraction):
  """Keeps the `fraction` largest-magnitude entries of the last axis (and
  any tied with the k-th).

  The k-th magnitude is found bit by bit, as in `sparsity`: non-negative
  floats order like their int32 bits, so 31 rounds of "do at least k
  entries reach this prefix?" give it exactly. On CPU that is ~9x faster
  than `lax.top_k`, which sorts every row ([32, 128, 512] fp32, forward and
  backward: 37 against 325 ms).
  """
  # Rounded first: in floats 0.07 * 100 is 7.000000000000001.
  k = max(1, math.ceil(round(fraction * x.shape[-1], 6)))
  if k >= x.shape[-1]:
    return x
  bits = sparsity.abs_bits(x)

  def next_bit(i, kth):
    candidate = kth | (1 << (30 - i))
    enough = jnp.sum(bits >= candidate, -1, keepdims=True) >= k
    return jnp.where(enough, candidate, kth)

  kth = jax.lax.fori_loop(0, 31, next_bit,
                          jnp.zeros(bits.shape[:-1] + (1,), jnp.int32),
                          unroll=True)
  return jnp.where(bits >= kth, x, 0)


def attend(q, k, v, sink=None, implementation='auto'):
  """Causal softmax attention: [B, T, H, Dh] each -> [B, T, H, Dh].

  `sink` [H] (float32) lets a head attend "nowhere": an extra key whose logit
  is sink[h] for every query and whose value is zero. 'cudnn' is
  `jax.nn.dot_product_attention`'s fused flash kernel (GPU, 16-bit, no sink:
  cuDNN wants a full [T, S] bias of even lengths for one); 'xla' is
  `softmax_attention`. 'auto' picks cuDNN where it can. There is no dropout
  on attention probabilities (the fused kernels have none).
  """
  if implementation == 'auto':
    fused = (jax.default_backend() == 'gpu' and sink is None
             and q.dtype in (jnp.bfloat16, jnp.float16)
             and _cudnn_takes_heads_of(q.shape[-1]))
    implementation = 'cudnn' if fused else 'xla'
  if implementation == 'xla':
    if sink is None:
      sink = jnp.full((q.shape[2],), -jnp.inf, jnp.float32)
    return softmax_attention(q, k, v, sink)
  if sink is not None:  # A GPT2 built without `validate`.
    raise ValueError(_CUDNN_NO_SINKS)
  return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                      implementation='cudnn')


def _cudnn_takes_heads_of(d_head, most=None):
  """Whether cuDNN's flash attention runs heads of `d_head`: a multiple of
  8, at most `most`, by default this GPU's, 256 from compute capability 9.0
  (Hopper) on and 128 before it, as jax checks when it traces the kernel
  (there a NotImplementedError: 'auto' with d_head 12 stopped every run at
  its compile)."""
  if most is None:
    capability = getattr(jax.devices()[0], 'compute_capability', '0')
    most = _CUDNN_MAX_D_HEAD if float(capability) >= 9 else 128
  return d_head % 8 == 0 and d_head <= most


_QUERY_BLOCKS = 4  # Causal attention scores only the keys up to each block.
_MIN_BLOCK_QUERIES = 24  # Shorter blocks cost more in ops than they save.


def _query_blocks(t):
  """[(start, end)] of the query blocks: block i's queries are [start, end)
  and its keys [0, end), so the blocks score 5/8 of the [T, T] square (with
  4 blocks) and skip most of the masked-out half. More blocks, or blocks of
  fewer than _MIN_BLOCK_QUERIES, save less than their smaller, more numerous ops
  cost on a CPU (benchmarks/attention_blocks.py): a sequence of under 48
  tokens runs as one block, training's 128 tokens as four."""
  n = min(_QUERY_BLOCKS, max(1, t // _MIN_BLOCK_QUERIES))
  return [(i * t // n, (i + 1) * t // n) for i in range(n)]


def _attention_block(q, k, v, sink, visible):
  """One query block: q [B, t, H, Dh], k and v [B, s, H, Dh], `visible`
  (bool, broadcast to [B, H, t, s]) the keys each query sees -> (out
  [B, t, H, Dh], probabilities [B, H, t, s], sink probability [B, H, t]).
  The sink enters the softmax's normaliser as one more term, so no key or
  query is padded for it."""
  s = jnp.einsum('bthd,bshd->bhts', q, k * q.shape[-1] ** -0.5)
  s = jnp.where(visible, s, -jnp.inf)
  sink = sink.astype(s.dtype)[:, None]                       # [H, 1]
  m = jax.lax.stop_gradient(jnp.maximum(s.max(-1), sink))    # [B, H, t]
  e = jnp.exp(s - m[..., None])
  e_sink = jnp.exp(sink - m)
  z = e.sum(-1) + e_sink
  p = e / z[..., None]
  return jnp.einsum('bhts,bshd->bthd', p, v), p, e_sink / z


def _attention_forward(q, k, v, sink):
  """(out [B, T, H, Dh], [probabilities of each query block], sink
  probability [B, H, T])."""
  out, p, p_sink = zip(*[
      _attention_block(q[:, a:b], k[:, :b], v[:, :b], sink,
                       jnp.arange(b)[None, :] <= jnp.arange(a, b)[:, None])
      for a, b in _query_blocks(q.shape[1])])
  return jnp.concatenate(out, 1), p, jnp.concatenate(p_sink, 2)


def attend_at(q, k, v, sink, positions):
  """Attention of one query per row: q [B, 1, H, Dh] at `positions` [B]
  (int), k and v [B, T, H, Dh] -> [B, 1, H, Dh]; `sink` as in `attend`
  (None: no sink). What `attend` computes for that query, without the
  [T, T] scores of every other one (a model's last block when only one
  position is scored). A negative position counts from the end, as the
  gathers of the query and residual at it do (numpy's indexing)."""
  if sink is None:
    sink = jnp.full((q.shape[2],), -jnp.inf, jnp.float32)
  positions = jnp.where(positions < 0, positions + k.shape[1], positions)
  visible = jnp.arange(k.shape[1]) <= positions[:, None, None, None]
  return _attention_block(q, k, v, sink, visible)[0]


@jax.custom_vjp
def softmax_attention(q, k, v, sink):
  """Causal attention with a sink logit per head (-inf: none).

  Written out with its own backward pass because autodiff of a softmax
  makes several passes over the [B, H, T, T] scores for each one this needs
  (dS = P * (dP - rowsum(dO * O)), as flash attention computes it): on a CPU,
  where those passes are most of a small model's step, this halves the
  attention's time. Both passes go block by block over the queries
  (`_query_blocks`), which took a `sparse_small` layer's attention (16
  sequences) from 16 to 11 ms.
  """
  return _attention_forward(q, k, v, sink)[0]


def _attention_fwd(q, k, v, sink):
  out, p, p_sink = _attention_forward(q, k, v, sink)
  return out, (q, k, v, out, p, p_sink, sink)


def _attention_bwd(residuals, d_out):
  q, k, v, out, p, p_sink, sink = residuals
  scale = q.shape[-1] ** -0.5
  delta = jnp.einsum('bthd,bthd->bht', d_out, out)           # [B, H, T]
  d_q, d_k, d_v = [], jnp.zeros_like(k), jnp.zeros_like(v)
  for (a, b), p_block in zip(_query_blocks(q.shape[1]), p):
    d_block = d_out[:, a:b]
    d_v = d_v.at[:, :b].add(jnp.einsum('bhts,bthd->bshd', p_block, d_block))
    d_p = jnp.einsum('bthd,bshd->bhts', d_block, v[:, :b])
    d_s = p_block * (d_p - delta[:, :, a:b, None])
    d_q.append(jnp.einsum('bhts,bshd->bthd', d_s, k[:, :b]) * scale)
    d_k = d_k.at[:, :b].add(
        jnp.einsum('bhts,bthd->bshd', d_s, q[:, a:b]) * scale)
  d_sink = -(p_sink * delta).sum((0, 2)).astype(sink.dtype)
  return jnp.concatenate(d_q, 1), d_k, d_v, d_sink


softmax_attention.defvjp(_attention_fwd, _attention_bwd)


def _dense_inits(std, names):
  """(kernel init, bias init) of a dense layer whose kernel has the logical
  axes `names`: normal(std) and zeros."""
  return (nn.with_logical_partitioning(nn.initializers.normal(std), names),
          nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                       names[-1:]))


@jax.custom_vjp
def matmul(x, kernel):
  """x [..., I] @ kernel [I, O], with the kernel's gradient taken as X^T dY.

  JAX's own rule takes it as (dY^T X)^T, and XLA:CPU gave that dot's left
  operand its contracting axis minor: every step copied dY [tokens, O] into
  [O, tokens], the larger operand wherever O > I (the MLP's first layer,
  query-key-value) and, for the unembedding, every logit's gradient. X^T dY
  it runs with no copy, as one dot that reads X's rows (`sparse_small`'s
  step: 147 -> 92 MiB of layout copies a device). CPU only
  (`GPT2.xla_cpu_grads`): compiled for TPU this rule kept more per chip
  (the dense 124M twin on v5e-8: 4.00 -> 4.14 GiB of temporaries), and
  `remat='dots'` does not see the dots inside it: on CPU that policy keeps
  no dense layer's output.
  """
  return jnp.einsum('...i,io->...o', x, kernel)


def _matmul_fwd(x, kernel):
  return matmul(x, kernel), (x, kernel)


def _matmul_bwd(residuals, dy):
  x, kernel = residuals
  d_kernel = jnp.einsum('ti,to->io', x.reshape(-1, x.shape[-1]),
                        dy.reshape(-1, dy.shape[-1]))
  return jnp.einsum('...o,io->...i', dy, kernel), d_kernel


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _dense_dot_general(x, kernel, dimension_numbers, precision=None):
  """`matmul` as nn.Dense's `dot_general` (x's last axis with the
  kernel's first; `_dense` sets no precision)."""
  if dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())) or precision:
    raise ValueError(f'matmul: unexpected {dimension_numbers}, {precision}')
  return matmul(x, kernel)


def _dense(features, names, dtype, param_dtype, std, use_bias, name,
           xla_cpu_grads):
  kernel_init, bias_init = _dense_inits(std, names)
  return nn.Dense(features, use_bias=use_bias, dtype=dtype,
                  dot_general=_dense_dot_general if xla_cpu_grads else None,
                  param_dtype=param_dtype, kernel_init=kernel_init,
                  bias_init=bias_init, name=name)


class _DenseWeights(nn.Module):
  """An nn.Dense's kernel and bias (the same names, init and logical axes),
  returned instead of applied: the block multiplies by query, key and value
  at once, one [D, 3 * H * Dh] matmul instead of three [D, H * Dh] ones
  (1.02-1.04x the plain GPT-2 shape's step on a 2-core CPU, in turns)."""
  features: int
  names: tuple[str, str]
  std: float
  use_bias: bool
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, in_features):
    kernel_init, bias_init = _dense_inits(self.std, self.names)
    kernel = self.param('kernel', kernel_init, (in_features, self.features),
                        self.param_dtype)
    bias = (self.param('bias', bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    return kernel, bias


NORM_EPSILON = 1e-5  # Every norm's: flax's LayerNorm, RMSNorm, `rms_norm`.


@jax.custom_vjp
def rms_norm(x, scale):
  """x [..., D] / RMS(x) * scale [D] in float32, as nn.RMSNorm computes it
  (epsilon NORM_EPSILON), with its gradient written out: JAX's own rule gave
  XLA:CPU ~10 ops a norm (~90 in a `sparse_small` step, 4.3% of its
  threads' time), several of them materialised broadcasts; this one takes
  ~2/3 of the time (nine norms fwd+bwd of `sparse_small`'s [16, 128, 128],
  4.2 -> 2.8 ms, a scratch script)."""
  return _rms_norm_fwd(x, scale)[0]


def _rms_norm_fwd(x, scale):
  x32 = x.astype(jnp.float32)
  rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True)
                      + NORM_EPSILON)
  return x32 * (rms * scale), (x, rms, scale)


def _rms_norm_bwd(residuals, dy):
  x, rms, scale = residuals
  x_hat = x.astype(jnp.float32) * rms
  dy = dy.astype(jnp.float32)
  d_x_hat = dy * scale
  dx = rms * (d_x_hat - x_hat * jnp.mean(d_x_hat * x_hat, -1, keepdims=True))
  d_scale = jnp.sum(dy * x_hat, axis=tuple(range(dy.ndim - 1)))
  return dx.astype(x.dtype), d_scale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


class _RMSNorm(nn.Module):
  """nn.RMSNorm (the same 'scale' parameter and outputs) through
  `rms_norm`, for steps on CPU (`GPT2.xla_cpu_grads`): compiled for TPU the
  plans and their memory stay those of flax's own."""
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  scale_init: nn.initializers.Initializer

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', self.scale_init, (x.shape[-1],),
                       self.param_dtype)
    return rms_norm(x, scale).astype(self.dtype)


def _norm(kind, dtype, param_dtype, xla_cpu_grads, name):
  scale_init = nn.with_logical_partitioning(nn.initializers.ones_init(),
                                            ('embed',))
  if kind == 'rmsnorm' and xla_cpu_grads:
    return _RMSNorm(dtype=dtype, param_dtype=param_dtype,
                    scale_init=scale_init, name=name)
  if kind == 'rmsnorm':
    return nn.RMSNorm(epsilon=NORM_EPSILON, dtype=dtype,
                      param_dtype=param_dtype, scale_init=scale_init,
                      name=name)
  if kind == 'layernorm':
    return nn.LayerNorm(
        epsilon=NORM_EPSILON, dtype=dtype, param_dtype=param_dtype,
        scale_init=scale_init,
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                               ('embed',)),
        name=name)
  raise ValueError(f"model.norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


class Block(nn.Module):
  """One pre-norm transformer block; attention and MLP inline so that all its
  nodes and weights sit in one flat scope ('block_i/query/kernel', ...)."""
  num_heads: int
  d_head: int
  d_mlp: int
  norm: str
  attention_sink: bool
  attention: str
  act_topk_fraction: float
  act_topk_locations: Sequence[str]
  dropout: float
  use_bias: bool
  init_std: float
  proj_std: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  xla_cpu_grads: bool

  def _node(self, name, x):
    if self.act_topk_fraction and name in self.act_topk_locations:
      x = abs_topk(x, self.act_topk_fraction)
    self.sow('node_stats', name, jnp.mean(x, axis=(0, 1), dtype=jnp.float32))
    if self.has_variable('node_mask', name):
      mask = self.get_variable('node_mask', name).astype(x.dtype)
      mean = self.get_variable('node_mean', name).astype(x.dtype)
      x = mask * x + (1 - mask) * mean  # Exact at mask 0 and 1.
    return x

  def _norm(self, name):
    return _norm(self.norm, self.dtype, self.param_dtype, self.xla_cpu_grads,
                 name)

  def _dense(self, features, names, name, std=None):
    return _dense(features, names, self.dtype, self.param_dtype,
                  std or self.init_std, self.use_bias, name,
                  self.xla_cpu_grads)

  @nn.compact
  def __call__(self, x, deterministic=True, positions=None):  # x: [B, T, D]
    """[B, T, D]; with `positions` [B] (int), only those rows [B, 1, D]:
    keys and values are needed at every position, but the attention of a
    query, its output and the MLP only where the output is read."""
    b, t, d = x.shape
    h, dh = self.num_heads, self.d_head
    drop = nn.Dropout(self.dropout, deterministic=deterministic)

    a = self._node('attn_in', self._norm('norm_1')(x))
    # Query, key and value keep their own weights (each sparse on its own),
    # stacked for one matmul.
    weights = [_DenseWeights(h * dh, ('embed', 'heads'), self.init_std,
                             self.use_bias, self.param_dtype, name=m)(d)
               for m in ('query', 'key', 'value')]
    # Name scopes (qkv, attention, mlp, ...) say which part of the model an
    # op is in, in profiles (`benchmarks/step_profile.py` sums by them).
    with jax.named_scope('qkv'):
      kernel = jnp.stack([w for w, _ in weights], 1)      # [D, 3, H * Dh]
      a, kernel = nn.dtypes.promote_dtype(a, kernel, dtype=self.dtype)
      if self.xla_cpu_grads:                              # [B, T, 3, H * Dh]
        qkv = matmul(a, kernel.reshape(d, -1)).reshape(b, t, 3, -1)
      else:
        qkv = jnp.einsum('btd,dsk->btsk', a, kernel)
      if self.use_bias:
        qkv = qkv + jnp.stack([bias for _, bias in weights]).astype(qkv.dtype)
      q, k, v = (self._node(n, qkv[:, :, i]).reshape(b, t, h, dh)
                 for i, n in enumerate(('q', 'k', 'v')))
    sink = None
    if self.attention_sink:
      sink = self.param('sink', nn.with_logical_partitioning(
          nn.initializers.zeros_init(), ('heads_only',)), (h,), jnp.float32)
    with jax.named_scope('attention'):
      if positions is None:
        y = attend(q, k, v, sink, self.attention)
      else:
        rows = jnp.arange(b)
        q, x = q[rows, positions][:, None], x[rows, positions][:, None]
        y = attend_at(q, k, v, sink, positions)
      y = y.reshape(*x.shape[:2], h * dh)
    y = self._dense(d, ('heads', 'embed'), 'attn_proj', self.proj_std)(y)
    x = x + drop(self._node('attn_out', y))

    m = self._node('mlp_in', self._norm('norm_2')(x))
    with jax.named_scope('mlp'):
      m = self._dense(self.d_mlp, ('embed', 'mlp'), 'mlp_fc')(m)
      m = self._node('mlp_neuron', nn.gelu(m, approximate=True))
      m = self._dense(d, ('mlp', 'embed'), 'mlp_proj', self.proj_std)(m)
    return x + drop(self._node('mlp_out', m))


class GPT2(nn.Module):
  """Decoder-only LM: tokens [B, T] int -> logits [B, T, vocab] float32."""
  vocab_size: int = 50257
  num_layers: int = 12
  d_model: int = 768
  num_heads: int = 12
  d_head: int | None = None   # None: d_model // num_heads, as in GPT-2.
  d_mlp: int | None = None    # None: 4 * d_model.
  max_len: int = 1024
  norm: str = 'layernorm'     # 'layernorm' | 'rmsnorm'
  tie_embeddings: bool = True
  pos_embedding: bool = True
  bigram_table: bool = False  # Dense [vocab, vocab] logits of the last token.
  attention_sink: bool = False
  attention: str = 'auto'     # 'auto' (cuDNN on GPU if it can) | 'xla' | 'cudnn'
  remat: str = 'none'         # A key of REMAT_POLICIES.
  use_bias: bool = True
  act_topk_fraction: float = 0.0   # AbsTopK: keep this fraction; 0 = off.
  act_topk_locations: Sequence[str] = ()  # Subset of NODE_LOCATIONS.
  dropout: float = 0.0
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  sparse_params: str = ''     # Regex over parameter paths; '' = no masks.
  xla_cpu_grads: bool = False  # Gradients laid out for XLA:CPU (`matmul`).

  @nn.compact
  def __call__(self, tokens, deterministic=True, positions=None):
    """Logits [B, T, vocab]; with `positions` [B] (int; negative from the
    end), only those [B, vocab] at one position per row: circuit tasks
    score one position, and the unembedding of all the others would be
    most of their cost (and the last block's attention, its output and
    MLP: `Block`)."""
    validate(self)
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    std = 0.02
    embed = nn.Embed(self.vocab_size, self.d_model, dtype=dtype,
                     param_dtype=param_dtype, name='wte',
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(std), ('vocab', 'embed')))
    x = embed(tokens)
    if self.pos_embedding:
      if tokens.shape[1] > self.max_len:
        raise ValueError(f'sequence of {tokens.shape[1]} tokens is longer '
                         f'than model.max_len={self.max_len}')
      wpe = self.param('wpe', nn.with_logical_partitioning(
          nn.initializers.normal(0.01), ('positions', 'embed')),
                       (self.max_len, self.d_model), param_dtype)
      with jax.named_scope('wpe'):
        x = x + wpe[None, :tokens.shape[1]].astype(dtype)
    x = nn.Dropout(self.dropout, deterministic=deterministic)(x)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))

    d_head, d_mlp = derived_sizes(self)
    block = Block
    if self.remat != 'none':
      # `deterministic` (argument 2, counting self) decides control flow.
      block = nn.remat(Block, policy=REMAT_POLICIES[self.remat],
                       static_argnums=(2,))
    # Given `positions`, the last block computes only those rows.
    for i in range(self.num_layers):
      last = positions if i == self.num_layers - 1 else None
      x = block(
          num_heads=self.num_heads, d_head=d_head, d_mlp=d_mlp,
          norm=self.norm, attention_sink=self.attention_sink,
          attention=self.attention,
          act_topk_fraction=self.act_topk_fraction,
          act_topk_locations=tuple(self.act_topk_locations),
          dropout=self.dropout, use_bias=self.use_bias, init_std=std,
          proj_std=std / math.sqrt(2 * self.num_layers), dtype=dtype,
          param_dtype=param_dtype, xla_cpu_grads=self.xla_cpu_grads,
          name=f'block_{i}')(x, deterministic, last)
      x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))

    if positions is not None:
      rows = jnp.arange(tokens.shape[0])
      x, tokens = x[:, 0], tokens[rows, positions]  # [B, D], [B]
    x = _norm(self.norm, dtype, param_dtype, self.xla_cpu_grads, 'norm_f')(x)
    with jax.named_scope('unembed'):
      if self.tie_embeddings and self.xla_cpu_grads:
        x, wte = nn.dtypes.promote_dtype(x, embed.embedding, dtype=dtype)
        logits = matmul(x, wte.T)  # embed.attend(x), with `matmul`'s gradient.
      elif self.tie_embeddings:
        logits = embed.attend(x)
      else:
        logits = _dense(self.vocab_size, ('embed', 'vocab'), dtype,
                        param_dtype, std, False, 'lm_head',
                        self.xla_cpu_grads)(x)
      logits = logits.astype(jnp.float32)
    if self.bigram_table:
      table = self.param('bigram', nn.with_logical_partitioning(
          nn.initializers.zeros_init(), ('vocab_in', 'vocab')),
                         (self.vocab_size, self.vocab_size), param_dtype)
      with jax.named_scope('bigram'):
        logits = logits + table[tokens].astype(jnp.float32)

    if self.sparse_params and self.is_initializing():
      self._init_masks()
    return logits

  def _init_masks(self):
    """One all-True mask per matching parameter, packed by `sparsity.pack`
    (uint8 [..., ceil(n / 8)]), boxed with its axes.

    Created as top-level variables mirroring the parameter tree, so
    `variables['sparsity']` has exactly the structure of the matched subset
    of `variables['params']`. `sparsity.init_masks` then fills them in.
    """
    pattern = re.compile(self.sparse_params)

    def masks(tree, prefix):
      out = {}
      for key, value in tree.items():
        path = f'{prefix}{key}'
        if isinstance(value, nn.LogicallyPartitioned):
          if pattern.search(path):
            out[key] = value.replace_boxed(sparsity.pack(
                jnp.ones(value.value.shape, bool)))
        elif hasattr(value, 'items'):
          sub = masks(value, path + '/')
          if sub:
            out[key] = sub
      return out

    for key, value in masks(self.variables['params'], '').items():
      # Written straight into the scope: the names are those of submodules,
      # which `self.variable` would refuse.
      self.scope.put_variable('sparsity', key, value)
