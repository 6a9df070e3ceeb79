"""Weight sparsity: masks, exact top-k, L0 annealing, the optax reprojection.

Masks are created by `model.GPT2.init` in the 'sparsity' collection, one bool
array per sparse parameter, keyed like the parameter ('block_0/query/kernel').
This module decides their contents and keeps the weights on them:

  none    dense baseline, no masks at all.
  static  masks drawn once at init (uniform random per tensor, or ERK) and
          never changed; `mask_gradients` zeroes gradients off the mask before
          clipping and Adam, so the moments never see pruned entries.
  topk    the paper's method: after every update each tensor keeps its
          k = round(density(step) * size) largest-magnitude entries, with
          gradients and moments dense so a pruned weight returns once its
          update outgrows the threshold; density(step) anneals linearly from 1
          to the target over `anneal_fraction` of training.

`reproject`, last in the optimizer chain, rewrites the updates so that
`optax.apply_updates` lands every sparse tensor exactly on its mask (the
pattern of `optax.keep_params_nonnegative`); in topk mode it picks the new
support itself, and the train step writes it back to the 'sparsity'
collection (`support`).

Top-k never sorts: the k-th largest |w| of every tensor is found by one
two-pass radix select over the int32 bit patterns of |w| (non-negative floats
order like their bits), shared by all tensors, and ties at the threshold are
broken by index order so exactly k stay (`topk_masks`).
"""

import re
from typing import NamedTuple

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

MODES = ('none', 'static', 'topk')
_GUARANTEED = np.int32(0x7FFFFFFF)  # Above the bits of any finite |w| or inf.


def validate(config):
  """Fails early, in one line, on a sparsity config that cannot work."""
  if config.mode not in MODES:
    raise ValueError(f'sparsity.mode must be one of {MODES}, got '
                     f'{config.mode!r}')
  if config.mode == 'none':
    return
  if not 0 < config.density <= 1:
    raise ValueError(f'sparsity.density must be in (0, 1], got '
                     f'{config.density}')
  if not 0 <= config.anneal_fraction <= 1:
    raise ValueError('sparsity.anneal_fraction must be in [0, 1], got '
                     f'{config.anneal_fraction}')
  if config.static_init not in ('uniform', 'erk'):
    raise ValueError("sparsity.static_init must be 'uniform' or 'erk', got "
                     f'{config.static_init!r}')
  if config.min_per_neuron < 0:
    raise ValueError('sparsity.min_per_neuron must be >= 0')
  try:
    re.compile(config.pattern)
  except re.error as e:
    raise ValueError(f'sparsity.pattern {config.pattern!r} is not a regex: '
                     f'{e}') from None


def model_pattern(config):
  """The regex the model gets as `sparse_params` ('' = make no masks)."""
  return '' if config.mode == 'none' else config.pattern


def density_at(step, config, total_steps):
  """Fraction of entries kept at `step`: linear from 1 to the target."""
  if config.mode != 'topk':
    return jnp.float32(1.0 if config.mode == 'none' else config.density)
  anneal = config.anneal_fraction * total_steps
  progress = 1.0 if anneal <= 0 else jnp.clip(step / anneal, 0.0, 1.0)
  return 1.0 - (1.0 - config.density) * progress


def num_kept(size, density):
  """k = round(density * size), at least 1; works on traced densities."""
  return jnp.maximum(1, jnp.round(density * size)).astype(jnp.int32)


def guaranteed_per_neuron(shape, k, min_per_neuron):
  """Static j: top-j inputs of every neuron (last axis) are always kept.

  Capped so that j * neurons <= k, so exactly k can still hold.
  """
  if len(shape) < 2:
    return 0
  neurons, fan_in = shape[-1], int(np.prod(shape[:-1]))
  return int(min(min_per_neuron, k // neurons, fan_in))


def _guarantee_top_per_neuron(bits, j):
  """Raises the j largest entries of each neuron's fan-in above everything.

  bits: int32 [..., neurons]. j passes of a column max below the previous
  one find each column's j-th largest value (no sort, no top_k, both slow on
  CPU); zeros are never guaranteed.
  """
  cols = bits.reshape(-1, bits.shape[-1])  # [fan_in, neurons]
  nth = jnp.full(cols.shape[1], _GUARANTEED, jnp.int32)
  for _ in range(j):
    nth = jnp.max(jnp.where(cols < nth[None, :], cols, -1), axis=0)
  cols = jnp.where((cols >= nth[None, :]) & (cols > 0), _GUARANTEED, cols)
  return cols.reshape(bits.shape)


def topk_masks(scores, ks, min_per_neuron):
  """Bool masks of exactly ks[p] largest-|scores[p]| entries, every p at once.

  Args:
    scores: {path: float array}, e.g. the weights.
    ks: {path: int in [1, size]}; may be traced (annealing moves k).
    min_per_neuron: {path: static int j}; for ndim >= 2 the j largest entries
      of each neuron's fan-in (a slice along the last axis) are taken first,
      then the tensor's top-k, so no neuron or channel is cut off. Callers
      keep j * neurons <= k (`guaranteed_per_neuron`).

  Non-negative floats order like their int32 bit patterns, so the k-th
  largest is found on integers by a two-pass radix select: a histogram of
  the high 15 bits finds the bucket holding it, a histogram of the low 16
  bits inside that bucket finds it exactly. All tensors share the two
  scatter passes (one histogram row per tensor), which is what makes this
  cheap for a model's worth of small tensors; no sort and no lax.top_k (both
  20-30x slower on CPU). Ties at the threshold are kept in index order so
  exactly k stay.
  """
  paths = sorted(scores)
  num = len(paths)
  bits = []
  for p in paths:
    b = jax.lax.bitcast_convert_type(
        jnp.abs(scores[p]).astype(jnp.float32), jnp.int32)
    if min_per_neuron[p] and b.ndim >= 2:
      b = _guarantee_top_per_neuron(b, min_per_neuron[p])
    bits.append(b.reshape(-1))
  sizes = [b.size for b in bits]
  bits = jnp.concatenate(bits)                                  # [N]
  segment = jnp.asarray(np.repeat(np.arange(num, dtype=np.int32), sizes))
  k = jnp.stack([jnp.asarray(ks[p], jnp.int32) for p in paths])  # [num]

  high = bits >> 16                                             # < 2**15
  hist = jnp.zeros(num << 15, jnp.int32).at[(segment << 15) | high].add(1)
  bucket, above, _ = _select(hist.reshape(num, 1 << 15), k)
  rank = k - above                              # rank of the k-th in bucket
  low = jnp.where(high == bucket[segment], (segment << 16) | (bits & 0xFFFF),
                  num << 16)
  hist = jnp.zeros(num << 16, jnp.int32).at[low].add(1, mode='drop')
  value, above, ties_total = _select(hist.reshape(num, 1 << 16), rank)
  ties_kept = rank - above

  threshold = ((bucket << 16) | value)[segment]
  above, ties = bits > threshold, bits == threshold
  keep = jax.lax.cond(
      jnp.all(ties_total == ties_kept), lambda: above | ties,
      lambda: above | _first_ties(ties, ties_kept, sizes))
  offsets = np.cumsum([0] + sizes)
  return {p: keep[offsets[i]:offsets[i + 1]].reshape(scores[p].shape)
          for i, p in enumerate(paths)}


def _select(hist, k, blocks=256):
  """Per row of hist [num, bins]: the largest bin b with #(>= b) >= k[row],
  the count above b, and the count at b.

  The reverse prefix sum is taken over block totals and then inside the one
  block that holds b: a full-width prefix sum is slow on CPU.
  """
  num, bins = hist.shape
  rows = jnp.arange(num)
  hist = hist.reshape(num, blocks, bins // blocks)
  totals = jnp.sum(hist, axis=2)                                # [num, blocks]
  at_least = jnp.cumsum(totals[:, ::-1], axis=1)[:, ::-1]
  block = jnp.sum(at_least >= k[:, None], axis=1) - 1
  inner = hist[rows, block]                                     # [num, width]
  at_least = (jnp.cumsum(inner[:, ::-1], axis=1)[:, ::-1]
              + (at_least[rows, block] - totals[rows, block])[:, None])
  offset = jnp.sum(at_least >= k[:, None], axis=1) - 1
  count = inner[rows, offset]
  return (block * (bins // blocks) + offset, at_least[rows, offset] - count,
          count)


def _first_ties(ties, counts, sizes):
  """Per tensor, its first counts[i] ties in index order. Rarely run: only
  exact duplicates at a threshold (e.g. zero-initialised biases) need it."""
  offsets = np.cumsum([0] + sizes)
  return jnp.concatenate([
      _first_true(ties[offsets[i]:offsets[i + 1]], counts[i])
      for i in range(len(sizes))])


def topk_mask(scores, k, min_per_neuron=0):
  """`topk_masks` for one tensor."""
  return topk_masks({'': scores}, {'': k}, {'': min_per_neuron})['']


def _first_true(flags, count, block=1024):
  """The first `count` True entries of flat bool `flags`, in index order.

  A prefix sum over the whole tensor is slow on CPU, so it is taken over
  per-block counts and then inside the one block where the cut falls.
  """
  n = flags.size
  blocks = jnp.pad(flags, (0, -n % block)).reshape(-1, block)
  per_block = jnp.sum(blocks, axis=1, dtype=jnp.int32)
  before = jnp.cumsum(per_block) - per_block            # exclusive
  cut = jnp.sum(before < count) - 1                     # block of the cut
  inside = jnp.cumsum(jax.lax.dynamic_index_in_dim(blocks, cut, 0, False))
  inside = inside <= count - before[cut]
  index = jnp.arange(blocks.shape[0])[:, None]
  keep = (index < cut) | ((index == cut) & inside[None, :])
  return (blocks & keep).reshape(-1)[:n]


def flat(tree):
  return traverse_util.flatten_dict(nn.unbox(tree), sep='/')


def unflat(tree):
  return traverse_util.unflatten_dict(tree, sep='/')


def _kept_per_tensor(masks, config):
  """{path: (k_target, j)} for the final density."""
  out = {}
  for path, mask in flat(masks).items():
    k = int(max(1, round(config.density * mask.size)))
    out[path] = (k, guaranteed_per_neuron(mask.shape, k,
                                          config.min_per_neuron))
  return out


def erk_densities(shapes, density):
  """Erdos-Renyi-Kernel: density of a tensor proportional to sum(shape) /
  prod(shape), scaled so the total matches `density`; tensors that would
  exceed 1 are made dense and the rest rescaled."""
  sizes = {p: int(np.prod(s)) for p, s in shapes.items()}
  raw = {p: sum(s) / sizes[p] for p, s in shapes.items()}
  dense = set()
  while True:
    budget = density * sum(sizes.values()) - sum(sizes[p] for p in dense)
    free = [p for p in shapes if p not in dense]
    eps = budget / sum(raw[p] * sizes[p] for p in free)
    over = [p for p in free if eps * raw[p] > 1]
    if not over:
      return {p: 1.0 if p in dense else eps * raw[p] for p in shapes}
    dense.update(over)


def init_masks(params, masks, config, rng, total_steps):
  """Fills the all-True masks from `model.init` and projects the params.

  Returns (params, masks), both keeping any LogicallyPartitioned boxes.
  """
  validate(config)
  flat_masks = flat(masks)
  if not flat_masks:
    raise ValueError(f'sparsity.pattern {config.pattern!r} matches no '
                     'parameter')
  flat_params = flat(params)
  kept = _kept_per_tensor(masks, config)
  if config.mode == 'static' and config.static_init == 'erk':
    densities = erk_densities({p: m.shape for p, m in flat_masks.items()},
                              config.density)
  else:
    densities = {p: density_at(0, config, total_steps) for p in flat_masks}
  if config.mode == 'static':
    scores = {p: jax.random.uniform(jax.random.fold_in(rng, i), m.shape)
              for i, (p, m) in enumerate(sorted(flat_masks.items()))}
  else:
    scores = {p: flat_params[p] for p in flat_masks}
  new = topk_masks(
      scores, {p: num_kept(m.size, densities[p])
               for p, m in flat_masks.items()},
      {p: kept[p][1] for p in flat_masks})
  params = _replace_leaves(params, {
      p: jnp.where(new[p], v, 0) if p in new else v
      for p, v in flat_params.items()})
  return params, _replace_leaves(masks, new)


def _replace_leaves(tree, values):
  """Tree with the leaves at `values`' paths replaced, boxes kept."""
  flat_tree = traverse_util.flatten_dict(tree, sep='/')
  out = {}
  for path, leaf in flat_tree.items():
    if isinstance(leaf, nn.meta.AxisMetadata):
      out[path] = leaf.replace_boxed(values[path])
    else:
      out[path] = values[path]
  return unflat(out)


def mask_gradients():
  """Static mode, first in the chain: gradients off the mask become 0."""

  def update_fn(updates, state, params=None, *, masks, **extra):
    del params, extra
    flat_masks = flat(masks)
    return unflat({p: jnp.where(flat_masks[p], g, 0) if p in flat_masks else g
                   for p, g in flat(updates).items()}), state

  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update_fn)


class ReprojectState(NamedTuple):
  count: jax.Array  # Updates applied: drives the annealed density.


def reproject(config, total_steps):
  """Last in the chain: params + updates land exactly on the mask.

  static: the mask is the `masks` passed in. topk: it is the top-k of
  params + updates at the annealed density, so the new support is simply the
  nonzeros of the new params (`support`); no second copy of the masks is kept
  in the optimizer state.
  """
  validate(config)

  def update_fn(updates, state, params, *, masks, **extra):
    del extra
    flat_masks, flat_params = flat(masks), flat(params)
    flat_updates = flat(updates)
    if config.mode == 'topk':
      density = density_at(state.count + 1, config, total_steps)
      kept = _kept_per_tensor(masks, config)
      flat_masks = topk_masks(
          {p: flat_params[p] + flat_updates[p] for p in flat_masks},
          {p: num_kept(m.size, density) for p, m in flat_masks.items()},
          {p: kept[p][1] for p in flat_masks})
    new_updates = {
        p: jnp.where(flat_masks[p], u, -flat_params[p]) if p in flat_masks
        else u for p, u in flat_updates.items()}
    return unflat(new_updates), ReprojectState(state.count + 1)

  return optax.GradientTransformationExtraArgs(
      lambda params: ReprojectState(jnp.zeros([], jnp.int32)), update_fn)


def support(params, masks, config):
  """The masks after a step: fixed in static mode, the nonzeros in topk."""
  if config.mode != 'topk':
    return masks
  flat_params = flat(params)
  return unflat({p: flat_params[p] != 0 for p in flat(masks)})


def stats(params, masks):
  """L0 (nonzeros) of each sparse tensor and of the whole model."""
  flat_params, flat_masks = flat(params), flat(masks)
  per_tensor = {p: jnp.count_nonzero(flat_params[p]) for p in flat_masks}
  total = sum(jnp.count_nonzero(v) for v in flat_params.values())
  size = sum(v.size for v in flat_params.values())
  return {'l0': total, 'density': total / size, 'l0_per_tensor': per_tensor}
