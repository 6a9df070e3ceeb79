"""Weight sparsity: masks, exact top-k, L0 annealing, the optax reprojection.

Masks are created by `model.GPT2.init` in the 'sparsity' collection, one per
sparse parameter, keyed like the parameter ('block_0/query/kernel') and
bit-packed along its last axis, 8 weights a byte (`pack`, `unpack`): bool
masks would cost a quarter of the fp32 weights they cover. This module
decides their contents and keeps the weights on them:

  none    dense baseline, no masks at all.
  static  masks drawn once at init (uniform random per tensor, or ERK) and
          never changed; `mask_gradients` zeroes gradients off the mask before
          the RMS rescaling and Adam, so the moments never see pruned
          entries.
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
three-pass radix select over the int32 bit patterns of |w| (non-negative
floats order like their bits), all tensors at once, and ties at the
threshold are broken by index order so exactly k stay (`topk_masks`).
"""

import functools
import math
import re
from typing import NamedTuple

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from sparse_gpt2 import sharding

MODES = ('none', 'static', 'topk')
_GUARANTEED = np.int32(0x7FFFFFFF)  # Above the bits of any finite |w| or inf.
_DIGITS = ((20, 11), (9, 11), (0, 9))  # (shift, width): bits 30-20, 19-9, 8-0.
# The largest sparsity.min_per_neuron: `_column_tops` unrolls a tournament of
# width J (the power of two >= j), whose compile time and memory grow faster
# than J. `python -m sparse_gpt2.plan --config=configs/tiny.py
# --topology=cpu:1` took 12, 14 and 20 s (0.8, 0.9 and 1.1 GB) at j = 4, 16
# and 32, but 42 s and 3.2 GB at 64 and over 60 s and 8.6 GB at 128, where
# one tensor (its embedding) reached j; the default is 4.
MAX_MIN_PER_NEURON = 32


def validate(config):
  """Fails early, in one line, on a sparsity config that cannot work.

  Every field whatever the mode: a dense run records them in its config,
  and that config with another `sparsity.mode` would use them. Mode 'none'
  keeps every weight, so any density in range passes (a sparse config run
  with `--config.sparsity.mode=none` keeps its own).
  """
  if config.mode not in MODES:
    raise ValueError(f'sparsity.mode must be one of {MODES}, got '
                     f'{config.mode!r}')
  if not 0 < config.density <= 1:
    raise ValueError(f'sparsity.density must be in (0, 1], got '
                     f'{config.density}')
  # The annealing ends at 1 - (1 - density) in float32 (`density_at`): 0
  # at a density of 2**-25 or less, where the lr, times sqrt(target /
  # density), was infinite and the run NaN once it got there.
  if not np.float32(1 - config.density) < 1:
    raise ValueError(f'sparsity.density {config.density} is 0 in float32 '
                     'as the annealing computes it (1 - (1 - density)), '
                     'which would make the lr infinite: give more than '
                     '2**-25 (3e-08); a tensor keeps one weight at any '
                     'density below 1 / its size')
  if not 0 <= config.anneal_fraction <= 1:
    raise ValueError('sparsity.anneal_fraction must be in [0, 1], got '
                     f'{config.anneal_fraction}')
  if config.static_init not in ('uniform', 'erk'):
    raise ValueError("sparsity.static_init must be 'uniform' or 'erk', got "
                     f'{config.static_init!r}')
  if not 0 <= config.min_per_neuron <= MAX_MIN_PER_NEURON:
    raise ValueError(f'sparsity.min_per_neuron must be >= 0 and <= '
                     f'{MAX_MIN_PER_NEURON} (its tournament compiles in '
                     f'minutes above it), got {config.min_per_neuron}')
  try:
    re.compile(config.pattern)
  except re.error as e:
    raise ValueError(f'sparsity.pattern {config.pattern!r} is not a regex: '
                     f'{e}') from None


def model_pattern(config):
  """The regex the model gets as `sparse_params` ('' = make no masks)."""
  return '' if config.mode == 'none' else config.pattern


def density_at(step, config, total_steps):
  """Fraction of entries kept at `step`: linear from 1 to the target (in
  float32 once traced: 1 - (1 - 0.1) is then 0.100000024)."""
  if config.mode != 'topk':
    return jnp.float32(1.0 if config.mode == 'none' else config.density)
  anneal = config.anneal_fraction * total_steps
  # Steps are whole, so an anneal under one step divides as 1 does (0 at
  # step 0, >= 1 after): divided by itself, one under float32's smallest
  # normal (anneal_fraction 1e-44 of 1000 steps) was 0 in the traced
  # schedule, whose step 0 was then 0 / 0, a NaN density and lr.
  progress = (1.0 if anneal <= 0
              else jnp.clip(step / max(anneal, 1.0), 0.0, 1.0))
  return 1.0 - (1.0 - config.density) * progress


def num_kept(size, density):
  """k = round(density * size), at least 1, in float32 (halves to even),
  at most size (float32 rounds an odd size above 2^24 up to the next even
  number); works on traced densities."""
  k = jnp.maximum(1, jnp.round(density * size)).astype(jnp.int32)
  return jnp.minimum(k, size)  # In int32: size in float32 rounds too.


def guaranteed_per_neuron(shape, k, min_per_neuron):
  """Static j: top-j inputs of every neuron (last axis) are always kept.

  Capped so that j * neurons <= k, so exactly k can still hold.
  """
  if len(shape) < 2:
    return 0
  neurons, fan_in = shape[-1], int(np.prod(shape[:-1]))
  return int(min(min_per_neuron, k // neurons, fan_in))


def _guarantee_top_per_neuron(bits, js, row_axes):
  """Raises the js[g] largest entries of each neuron's fan-in above everything.

  bits: [int32 [n, ..., neurons]], groups of n tensors' blocks on this
  device, group g's fan-in rows split over the mesh axes `row_axes[g]`.
  Each column's j largest values come from a tournament of sorted lists
  (`_column_tops`) that reads the bits about once, in elementwise max/min
  that vectorize; the devices that share the columns then gather their
  lists and merge them the same way. j passes of a masked column max (no
  sort and no lax.top_k: 30x slower on CPU) read the bits j times, and
  XLA:CPU wrote each pass's select out before its max: 2.6x the time of
  the tournament. A column's entries above its j-th largest are raised,
  and of those equal to it the first in row order (`_first_column_ties`):
  j a column, so the top-k, with k >= j * neurons, keeps every one. Raising
  all the ties raised a column's 8 equal weights where j was 2, and the
  exact top-k kept 4 of them and left two other columns 1. Zeros never are.
  """
  cols = [b.reshape(b.shape[0], -1, b.shape[-1]) for b in bits]  # [n, in, out]
  # [J, n, 1, out] each; gathered over its row axes, [R, J, n, 1, out].
  tops = _all_gather_each([_column_tops(c, j) for c, j in zip(cols, js)],
                          row_axes)
  tops = [_merge_rows(t[:, :, :, 0].transpose(1, 2, 0, 3))[:j] if a
          else t[:j] for t, j, a in zip(tops, js, row_axes)]  # [j, n, 1, out]
  nth = [t[-1] for t in tops]                                 # [n, 1, out]
  need = [jnp.sum(t == n, axis=0, dtype=jnp.int32)  # Its ties in the top j.
          for t, n in zip(tops, nth)]
  # Each block's count of each column's ties, and the blocks' before it.
  counts = [jnp.sum((c == t) & (c > 0), axis=1, keepdims=True,
                    dtype=jnp.int32) for c, t in zip(cols, nth)]
  before = [jnp.sum(g, axis=0, where=jnp.arange(len(g)).reshape(
      (-1, 1, 1, 1)) < _axis_index(a)) if a else jnp.zeros_like(g)
            for g, a in zip(_all_gather_each(counts, row_axes), row_axes)]
  raised = jax.lax.cond(
      functools.reduce(jnp.logical_and, [jnp.all(b + n <= m) for b, n, m in
                                         zip(before, counts, need)]),
      lambda: [jnp.where((c >= t) & (c > 0), _GUARANTEED, c)
               for c, t in zip(cols, nth)],
      lambda: [jnp.where((c > t) & (c > 0) | _first_column_ties(c, t, m - b),
                         _GUARANTEED, c)
               for c, t, m, b in zip(cols, nth, need, before)])
  return [r.reshape(b.shape) for b, r in zip(bits, raised)]


def _first_column_ties(cols, nth, count):
  """The first count[..., o] entries of each column o of cols [n, rows, out]
  equal to nth[..., o] (zeros never), in row order. Rarely run: only exact
  duplicates at a column's j-th largest need it, and a prefix sum down the
  rows is slow on CPU."""
  ties = (cols == nth) & (cols > 0)
  return ties & (jnp.cumsum(ties, axis=1, dtype=jnp.int32) <= count)


def _column_tops(cols, j):
  """[n, rows, out] -> [J, n, 1, out], J the power of two >= j: each
  column's J largest values, descending (-1 where it has fewer)."""
  width = 1 << (j - 1).bit_length()
  pad = -cols.shape[1] % width
  if pad:
    cols = jnp.pad(cols, ((0, 0), (0, pad), (0, 0)), constant_values=-1)
  rows = cols.shape[1] // width
  lists = [[cols[:, i * rows:(i + 1) * rows]] for i in range(width)]
  while len(lists) > 1:  # Sorted lists of 1, 2, ..., J values each.
    lists = [_bitonic_sort(a + b[::-1])
             for a, b in zip(lists[::2], lists[1::2])]
  return _merge_rows(jnp.stack(lists[0]))


def _merge_rows(tops):
  """[J, n, m, out], each [:, i, r, o] a descending list -> the J largest
  of the m lists, descending, [J, n, 1, out]. Two lists' top J are
  max(a[i], b[J - 1 - i]), in bitonic order; m halves each round.

  One array a level, where the tournament has one per list entry: merging
  a list of J arrays, XLA:CPU's fusion emitters fused the whole tournament
  into each of the J outputs, and at J = 32 one 128 x 512 tensor's tops
  took 612 ms and compiled in 30 s (this way 1.5 ms and 4 s)."""
  while tops.shape[2] > 1:
    if tops.shape[2] % 2:
      tops = jnp.pad(tops, ((0, 0), (0, 0), (0, 1), (0, 0)),
                     constant_values=-1)
    half = tops.shape[2] // 2
    tops = _bitonic_merge(jnp.maximum(tops[:, :, :half],
                                      tops[::-1, :, half:]))
  return tops


def _bitonic_sort(seq):
  """A bitonic sequence of arrays (a power of two of them), sorted
  descending elementwise by a bitonic merger's compare-exchanges."""
  seq, half = list(seq), len(seq) // 2
  while half:
    for start in range(0, len(seq), 2 * half):
      for i in range(start, start + half):
        seq[i], seq[i + half] = (jnp.maximum(seq[i], seq[i + half]),
                                 jnp.minimum(seq[i], seq[i + half]))
    half //= 2
  return seq


def _bitonic_merge(x):
  """`_bitonic_sort` of x [J, ...], bitonic along its first axis, as one
  array: each level's compare-exchanges in one max and one min."""
  size, half = x.shape[0], x.shape[0] // 2
  while half:
    pairs = x.reshape((size // (2 * half), 2, half) + x.shape[1:])
    x = jnp.stack([jnp.maximum(pairs[:, 0], pairs[:, 1]),
                   jnp.minimum(pairs[:, 0], pairs[:, 1])], 1).reshape(x.shape)
    half //= 2
  return x


def abs_bits(x):
  """|x| as int32 bit patterns, which order like the non-negative floats
  (the top-k here and `model.abs_topk` select on them)."""
  return jax.lax.bitcast_convert_type(jnp.abs(x).astype(jnp.float32),
                                      jnp.int32)


def topk_masks(scores, ks, min_per_neuron, shardings=None):
  """Bool masks of exactly ks[p] largest-|scores[p]| entries, every p at once.

  Args:
    scores: {path: float array}, e.g. the weights.
    ks: {path: int in [1, size]}; may be traced (annealing moves k).
    min_per_neuron: {path: static int j}; for ndim >= 2 the j largest entries
      of each neuron's fan-in (a slice along the last axis) are taken first,
      then the tensor's top-k, so no neuron or channel is cut off. Callers
      keep j * neurons <= k (`guaranteed_per_neuron`).
    shardings: None, or {path: NamedSharding} of the scores, all on one mesh
      (only their first and last axes may be split). Each device then works
      on a block of every tensor (`shard_map`): its shard, cut further into
      row blocks over the mesh axes that replicate it where they divide its
      rows, so that replicas (data parallelism's copies) share the top-k
      instead of each doing all of it. Only histograms, each column's
      top-j lists, per-row counts and, at the end, the replicas' blocks of
      the masks cross devices: histograms add, so a `psum` of the local
      ones is the histogram of the whole tensor, and the masks are exactly
      those of one device. No weight is gathered.

  Non-negative floats order like their int32 bit patterns, so the k-th
  largest is found on integers by a radix select, one digit per pass (bits
  30-20, 19-9, 8-0): a histogram of the digit, over the entries whose
  higher bits match those found so far, gives the next digit. Each tensor
  counts into its own small histogram, so no index array of all the
  model's weights is built and the psum across devices is of [num, 2^11]
  bins: the top-k adds 0.01x the fp32 parameters to the temporaries of
  `benchmarks/run.py`'s train steps, where two passes of 2^15 and 2^16
  bins over one concatenated index array took 1.1-2.3x, and the step is no
  slower for the extra pass. No sort and no lax.top_k (both 20-30x slower
  on CPU). Ties at the threshold are kept in index order so exactly k stay.
  """
  paths = sorted(scores)
  arrays = [scores[p] for p in paths]
  k = jnp.stack([jnp.asarray(ks[p], jnp.int32) for p in paths])  # [num]
  select = functools.partial(_topk_blocks,
                             js=[min_per_neuron[p] for p in paths])
  if shardings is None:
    keep = select(arrays, k, specs=[_spec(P(), x.ndim) for x in arrays],
                  shared=[()] * len(arrays), mesh_axes=())
  else:
    mesh = shardings[paths[0]].mesh
    specs = [_spec(shardings[p].spec, x.ndim, mesh)
             for p, x in zip(paths, arrays)]
    shared = [_shared_axes(s, x.shape, mesh) for s, x in zip(specs, arrays)]
    work = [(s[0] + a,) + s[1:] if s else s for s, a in zip(specs, shared)]
    keep = jax.shard_map(
        functools.partial(select, specs=work, shared=shared,
                          mesh_axes=tuple(a for a in mesh.axis_names
                                          if mesh.shape[a] > 1)),
        mesh=mesh, in_specs=([_partition(s) for s in specs], P()),
        out_specs=[_partition(s) for s in specs], check_vma=False)(arrays, k)
  return dict(zip(paths, keep))


def _spec(spec, ndim, mesh=None):
  """A PartitionSpec as one tuple of mesh axes per dimension, without the
  mesh's axes of size 1 (XLA would still run a collective over them)."""
  spec = tuple(spec) + (None,) * (ndim - len(spec))
  out = tuple(tuple(a for a in sharding.mesh_axes(d)
                    if mesh is None or mesh.shape[a] > 1) for d in spec)
  if any(out[1:-1]):
    raise ValueError(f'top-k of a tensor split on a middle axis: {spec}')
  return out


def _partition(spec):
  """`_spec`'s tuples back as a PartitionSpec."""
  return P(*(d or None for d in spec))


def _shared_axes(spec, shape, mesh):
  """The mesh axes (of size > 1) a tensor is replicated over that, with its
  own split, divide its first axis: its replicas share its top-k, each
  taking a block of rows."""
  if not spec:
    return ()
  used = {a for d in spec for a in d}
  ways, shared = math.prod(mesh.shape[a] for a in spec[0]), ()
  for a in mesh.axis_names:
    if a not in used and mesh.shape[a] > 1 and not shape[0] % (
        ways * mesh.shape[a]):
      ways, shared = ways * mesh.shape[a], shared + (a,)
  return shared


def _row_col_axes(spec):
  """Mesh axes of a tensor's rows (all but its last axis) and columns."""
  if not spec:
    return (), ()
  return tuple(a for d in spec[:-1] for a in d), spec[-1]


def _topk_blocks(arrays, k, *, js, specs, shared, mesh_axes):
  """`topk_masks` on this device's blocks of `arrays` (whole arrays, specs of
  all (), off a mesh), each mask gathered over its `shared` axes at the end.

  Tensors of one shape, split and j (a model's layers repeat them) are
  stacked and go through every pass together: the top-k's op count, which
  sets much of its time and most of its compile time on CPU, grows with the
  kinds of tensor, not with the layers. A tensor split over fewer than all
  mesh axes is counted by one replica only: the devices at index 0 of every
  mesh axis it is not split over.
  """
  groups = {}  # (shape, j, spec, shared axes) -> its tensors' indices.
  for i, (x, j, spec) in enumerate(zip(arrays, js, specs)):
    key = (x.shape, j if x.ndim >= 2 else 0, spec, shared[i])
    groups.setdefault(key, []).append(i)
  keys = list(groups)
  # Each replica cuts its block of rows here: blocks cut by the in_specs
  # made XLA compute the update before the top-k (AdamW, the scores) in
  # blocks too and all-gather every weight and both moments after it, ~200
  # collectives that made a topk step 1.10x slower at sparse_small's shape.
  arrays = [_row_block(x, a) for x, a in zip(arrays, shared)]
  bits = [jnp.stack([abs_bits(arrays[i]) for i in m])           # [n, ...]
          for m in groups.values()]
  # The scores once, in memory, before any pass reads them: XLA otherwise
  # computes |params + updates| again inside each fusion that reads it, and
  # a fusion that contracts the add into an FMA and one that does not see
  # values one rounding apart, so the histograms and the final comparisons
  # disagree and a tensor keeps other than k (XLA:CPU's loop emitters did:
  # all 12 of a tied bias pruned where k was 10). A conditional's operands
  # are buffers, and its predicate (k >= 1 always) is not known at compile
  # time; `optimization_barrier` is gone before fusion on CPU.
  bits = jax.lax.cond(k[0] > 0, lambda b: b,
                      lambda b: [jnp.zeros_like(x) for x in b], bits)
  guaranteed = [g for g, (_, j, _, _) in enumerate(keys) if j]
  if guaranteed:
    raised = _guarantee_top_per_neuron(
        [bits[g] for g in guaranteed], [keys[g][1] for g in guaranteed],
        [_row_col_axes(keys[g][2])[0] for g in guaranteed])
    for g, b in zip(guaranteed, raised):
      bits[g] = b
  split = [{a for d in spec for a in d} for _, _, spec, _ in keys]
  counted = [functools.reduce(
      jnp.logical_and, [jax.lax.axis_index(a) == 0 for a in mesh_axes
                        if a not in s], jnp.bool_(True)) for s in split]
  # Per-tensor values below are [num] vectors in group order.
  starts = np.cumsum([0] + [len(m) for m in groups.values()])

  def of_group(values, g):  # Group g's values, broadcastable to its bits.
    return values[starts[g]:starts[g + 1]].reshape(
        (-1,) + (1,) * (bits[g].ndim - 1))

  # One digit of the k-th largest's bits per pass, high to low: count, by
  # this digit, the entries whose higher bits match those found so far.
  prefix = jnp.zeros(starts[-1], jnp.int32)  # The k-th largest's bits so far.
  rank = k[np.concatenate(list(groups.values()))]  # Its rank among those.
  # The histograms' +1 per entry, made from the bits (whose first entry is
  # >= 0, as every |w|'s is): ones made from a constant were computed at the
  # step's start and held through the backward pass's peak, 0.37x the fp32
  # parameters of the plain GPT-2 shape; these exist only from here on.
  ones = [jnp.broadcast_to((b.reshape(-1)[0] >= 0).astype(jnp.int32), b.shape)
          for b in bits]
  for shift, width in _DIGITS:
    bins = 1 << width
    hist = []
    for g, (b, c) in enumerate(zip(bits, counted)):
      n = b.shape[0]
      bin_of = (jax.lax.broadcasted_iota(jnp.int32, b.shape, 0) * bins
                + ((b >> shift) & (bins - 1)))  # Tensor t's digit, in row t.
      hist.append(jnp.zeros(n * bins, jnp.int32).at[
          jnp.where(c & (b >> (shift + width) == of_group(prefix, g)), bin_of,
                    n * bins)].add(ones[g], mode='drop').reshape(n, bins))
    value, above, ties_total = _select(
        _psum(jnp.concatenate(hist), mesh_axes), rank)          # [num] each
    prefix = (prefix << width) | value
    rank = rank - above
  threshold, ties_kept = prefix, rank                           # [num] each
  above = [b > of_group(threshold, g) for g, b in enumerate(bits)]
  ties = [b == of_group(threshold, g) for g, b in enumerate(bits)]
  stacked = jax.lax.cond(
      jnp.all(ties_total == ties_kept),
      lambda: [a | t for a, t in zip(above, ties)],
      lambda: [a | jax.vmap(_first_ties, in_axes=(0, 0, None))(
          t, ties_kept[starts[g]:starts[g + 1]], spec)
               for g, (a, t, (_, _, spec, _)) in enumerate(
                   zip(above, ties, keys))])
  gathers = [gather for _, _, _, gather in keys]
  stacked = _all_gather_each(stacked, gathers)
  masks = [None] * len(arrays)
  for members, m, gather in zip(groups.values(), stacked, gathers):
    for t, i in enumerate(members):
      # m: [R, n, rows / R, ...], the R replicas' blocks one after another,
      # each tensor's rows sliced out of them. Gathering into [n, rows, ...]
      # made a transposed copy of every stack (and a copy XLA:CPU did not
      # elide even of a stack of one): 8-15% of the top-k's time.
      masks[i] = m[:, t].reshape((-1,) + m.shape[3:]) if gather else m[t]
  return masks


def _all_gather_each(values, axes):
  """Each value gathered over its mesh axes as [R, ...] (none: as it is),
  one all_gather for all the values that share axes, flattened and
  concatenated: on CPU the devices' rendezvous costs a collective more
  than the bytes it moves."""
  out = list(values)
  for a in set(axes) - {()}:
    at = [i for i, b in enumerate(axes) if b == a]
    joined = jax.lax.all_gather(
        jnp.concatenate([values[i].reshape(-1) for i in at]), a)
    parts = jnp.split(joined, np.cumsum([values[i].size for i in at])[:-1],
                      axis=1)
    for i, part in zip(at, parts):
      out[i] = part.reshape((-1,) + values[i].shape)
  return out


def _select(hist, k):
  """Per row of hist [num, bins]: the largest bin b with #(>= b) >= k[row],
  the count above b, and the count at b.

  The reverse prefix sum is taken over block totals and then inside the one
  block that holds b: a full-width prefix sum is slow on CPU.
  """
  num, bins = hist.shape
  blocks = 1 << (bins.bit_length() // 2)                        # ~sqrt(bins)
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


def _first_ties(ties, count, spec):
  """The first `count` True entries of `ties` in index order, on this
  device's block. Rarely run: only exact duplicates at a threshold (e.g.
  zero-initialised biases) need it.

  A prefix sum over the whole tensor is slow on CPU and would need all of
  it on one device, so it is taken over per-row counts and then inside the
  one row where the cut falls: only vectors of one row's or one column's
  length cross devices.
  """
  row_axes, col_axes = _row_col_axes(spec)
  block = ties.reshape(-1, ties.shape[-1] if ties.ndim else 1)  # [rows, cols]
  per_row = _psum(jnp.sum(block, axis=1, dtype=jnp.int32), col_axes)
  per_row = _all_gather(per_row, row_axes)                      # [R]
  before = jnp.cumsum(per_row) - per_row                        # exclusive
  cut = jnp.sum(before < count) - 1                             # row of the cut
  rows = _axis_index(row_axes) * block.shape[0] + jnp.arange(block.shape[0])
  row = _psum(jnp.sum(block & (rows == cut)[:, None], axis=0,
                      dtype=jnp.int32), row_axes)
  inside = jnp.cumsum(_all_gather(row, col_axes)) <= count - before[cut]
  inside = jax.lax.dynamic_slice_in_dim(
      inside, _axis_index(col_axes) * block.shape[1], block.shape[1])
  keep = (rows < cut)[:, None] | ((rows == cut)[:, None] & inside[None, :])
  return (block & keep).reshape(ties.shape)


def _psum(x, axes):
  return jax.lax.psum(x, tuple(axes)) if axes else x


def _all_gather(x, axes):
  return jax.lax.all_gather(x, tuple(axes), tiled=True) if axes else x


def _row_block(x, axes):
  """This device's block of x's rows, of equal blocks over `axes`."""
  if not axes:
    return x
  rows = x.shape[0] // jax.lax.axis_size(tuple(axes))
  return jax.lax.dynamic_slice_in_dim(x, _axis_index(axes) * rows, rows)


def _axis_index(axes):
  return jax.lax.axis_index(tuple(axes)) if axes else 0


def pack(mask):
  """Bool mask [..., n] -> uint8 [..., ceil(n / 8)]: 8 weights a byte along
  the last axis, so each device's block of a weight's columns packs into
  its block of the mask's (`sharding.state_shardings`)."""
  return jnp.packbits(mask, axis=-1)


def unpack(packed, shape):
  """`pack`'s inverse: the bool mask of a weight of `shape`."""
  return jnp.unpackbits(packed, axis=-1, count=shape[-1]).astype(bool)


def flat(tree):
  return traverse_util.flatten_dict(nn.unbox(tree), sep='/')


def unflat(tree):
  return traverse_util.unflatten_dict(tree, sep='/')


def _kept_per_tensor(weights, config, total_steps, densities=None):
  """{path: (k_target, j)} per {path: weight}: the k the steps keep at the
  final density (`num_kept` of `density_at` at the schedule's end,
  evaluated now, since j must be static, by the same float32 ops), or at
  the tensor's own density in `densities` (ERK's), and the j that k
  allows: the uniform k's j can ask more of a neuron than a tensor that
  ERK thins keeps."""
  out = {}
  with jax.ensure_compile_time_eval():
    final = density_at(total_steps, config, total_steps)
    for path, w in weights.items():
      k = int(num_kept(w.size, final if densities is None
                       else densities[path]))
      out[path] = (k, guaranteed_per_neuron(w.shape, k,
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
    if not free:  # At density 1, rounding can push every tensor over 1.
      return dict.fromkeys(shapes, 1.0)
    eps = budget / sum(raw[p] * sizes[p] for p in free)
    over = [p for p in free if eps * raw[p] > 1]
    if not over:
      return {p: 1.0 if p in dense else eps * raw[p] for p in shapes}
    dense.update(over)


def init_masks(params, masks, config, rng, total_steps):
  """Fills the all-True (packed) masks from `model.init` and projects the
  params.

  Returns (params, masks), both keeping any LogicallyPartitioned boxes.
  """
  validate(config)
  flat_masks = flat(masks)
  if not flat_masks:
    raise ValueError(f'sparsity.pattern {config.pattern!r} matches no '
                     'parameter')
  if config.mode == 'topk' and config.anneal_fraction * total_steps > 0:
    # Annealing starts at density 1: model.init's all-True masks are the
    # top-k of every tensor, and compiling one would take two thirds of
    # the init's compile time (sparse_small's: 10.1 s with it, 3.5 without).
    return params, masks
  flat_params = flat(params)
  weights = {p: flat_params[p] for p in flat_masks}
  # The target density from the first step (annealing returned above).
  densities = (erk_densities({p: w.shape for p, w in weights.items()},
                             config.density)
               if config.mode == 'static' and config.static_init == 'erk'
               else None)
  kept = _kept_per_tensor(weights, config, total_steps, densities)
  if config.mode == 'static':
    scores = {p: jax.random.uniform(jax.random.fold_in(rng, i), w.shape)
              for i, (p, w) in enumerate(sorted(weights.items()))}
  else:
    scores = weights
  new = topk_masks(scores, {p: k for p, (k, _) in kept.items()},
                   {p: j for p, (_, j) in kept.items()})
  params = _replace_leaves(params, {
      p: jnp.where(new[p], v, 0) if p in new else v
      for p, v in flat_params.items()})
  return params, _replace_leaves(masks, {p: pack(m) for p, m in new.items()})


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
    return unflat({
        p: jnp.where(unpack(flat_masks[p], g.shape), g, 0) if p in flat_masks
        else g for p, g in flat(updates).items()}), state

  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update_fn)


class ReprojectState(NamedTuple):
  count: jax.Array  # Updates applied: drives the annealed density.


def reproject(config, total_steps):
  """Last in the chain: params + updates land exactly on the mask.

  static: the mask is the `masks` passed in. topk: it is the top-k of
  params + updates at the annealed density, so the new support is simply the
  nonzeros of the new params (`support`); no second copy of the masks is kept
  in the optimizer state. `shardings` (the params' NamedShardings), when the
  caller passes them, make the top-k work shard by shard (`topk_masks`).
  """
  validate(config)

  @jax.named_scope('reproject')  # Its ops' name in profiles.
  def update_fn(updates, state, params, *, masks, shardings=None, **extra):
    del extra
    flat_params, flat_updates = flat(params), flat(updates)
    flat_masks = flat(masks)
    weights = {p: flat_params[p] for p in flat_masks}
    if config.mode == 'topk':
      density = density_at(state.count + 1, config, total_steps)
      kept = _kept_per_tensor(weights, config, total_steps)
      keep = topk_masks(
          {p: w + flat_updates[p] for p, w in weights.items()},
          {p: num_kept(w.size, density) for p, w in weights.items()},
          {p: kept[p][1] for p in weights},
          None if shardings is None else {
              p: s for p, s in flat(shardings).items() if p in weights})
    else:
      keep = {p: unpack(m, weights[p].shape) for p, m in flat_masks.items()}
    new_updates = {
        p: jnp.where(keep[p], u, -flat_params[p]) if p in keep else u
        for p, u in flat_updates.items()}
    return unflat(new_updates), ReprojectState(state.count + 1)

  return optax.GradientTransformationExtraArgs(
      lambda params: ReprojectState(jnp.zeros([], jnp.int32)), update_fn)


@jax.named_scope('reproject')  # Its ops' name in profiles, as the update's.
def support(params, masks, config):
  """The masks after a step: fixed in static mode, the nonzeros in topk."""
  if config.mode != 'topk':
    return masks
  flat_params = flat(params)
  return unflat({p: pack(flat_params[p] != 0) for p in flat(masks)})


@jax.jit
def stats(params, masks):
  """L0 (nonzeros) of each sparse tensor and of the whole model. Jitted
  here, so that a run's child process compiles the very program its loop
  calls at the first log (`train.compile_steps`)."""
  flat_params, flat_masks = flat(params), flat(masks)
  per_tensor = {p: jnp.count_nonzero(flat_params[p]) for p in flat_masks}
  total = sum(jnp.count_nonzero(v) for v in flat_params.values())
  size = sum(v.size for v in flat_params.values())
  return {'l0': total, 'density': total / size, 'l0_per_tensor': per_tensor}
