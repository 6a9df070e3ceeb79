"""Weight sparsity: exact top-k, masks, the optax reprojection, annealing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import sparse_gpt2_124m
from configs import tiny
from sparse_gpt2 import optim
from sparse_gpt2 import sparsity
from sparse_gpt2 import train


def _topk_mask(scores, k, min_per_neuron=0):
  """`sparsity.topk_masks` for one tensor."""
  return sparsity.topk_masks({'': scores}, {'': k}, {'': min_per_neuron})['']


def _reference_topk(w, k):
  """Sort-based reference: largest |w|, earlier index first among ties."""
  order = np.lexsort((np.arange(w.size), -np.abs(w).ravel()))
  mask = np.zeros(w.size, bool)
  mask[order[:k]] = True
  return mask.reshape(w.shape)


@pytest.mark.parametrize('shape,k', [((64, 48), 300), ((1000,), 1),
                                     ((7, 5, 3), 105), ((300, 20), 4321)])
def test_topk_mask_equals_sort_reference(shape, k):
  w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  got = jax.jit(_topk_mask)(w, k)
  np.testing.assert_array_equal(np.asarray(got), _reference_topk(w, k))


@pytest.mark.parametrize('k', [1, 137, 511, 999])
def test_topk_mask_finds_the_last_bits_of_the_threshold(k):
  # 1000 neighbouring floats: they share their high 21 bits, so only the
  # radix select's later passes tell them apart.
  rng = np.random.default_rng(2)
  bits = np.float32(-1.5).view(np.int32) + rng.permutation(1000)
  w = bits.astype(np.int32).view(np.float32)
  got = jax.jit(_topk_mask)(w, k)
  np.testing.assert_array_equal(np.asarray(got), _reference_topk(w, k))


def test_topk_mask_breaks_ties_by_index_to_keep_exactly_k():
  w = np.array([0, 1, 2, 2, 2, 3, 2, 0, 0, 0], np.float32)
  for k in range(1, w.size + 1):
    got = np.asarray(_topk_mask(w, k))
    assert got.sum() == k
    np.testing.assert_array_equal(got, _reference_topk(w, k))


def test_topk_masks_handles_many_tensors_and_traced_k():
  rng = np.random.default_rng(1)
  # Tensors of one shape go through the top-k stacked: groups of one, of
  # two, and a group in which only one tensor has ties to break.
  scores = {f't{i}': rng.normal(size=s).astype(np.float32)
            for i, s in enumerate([(16, 8), (8,), (33, 7), (5, 5), (16, 8),
                                   (40,)])}
  scores['zeros'] = np.zeros((40,), np.float32)  # All tied.

  @jax.jit
  def masks(density):
    return sparsity.topk_masks(
        scores, {p: sparsity.num_kept(v.size, density)
                 for p, v in scores.items()}, {p: 0 for p in scores})

  for density in (1.0, 0.5, 0.1):
    got = masks(density)
    for p, v in scores.items():
      k = max(1, round(density * v.size))
      np.testing.assert_array_equal(np.asarray(got[p]), _reference_topk(v, k))


def test_min_per_neuron_keeps_j_inputs_of_every_neuron():
  w = np.random.default_rng(2).normal(size=(64, 32)).astype(np.float32)
  w[:, 5] *= 1e-3  # A neuron that a plain top-k would cut off.
  k = 200
  j = sparsity.guaranteed_per_neuron(w.shape, k, 4)
  assert j == 4
  mask = np.asarray(_topk_mask(w, k, j))
  assert mask.sum() == k
  assert mask.sum(axis=0).min() >= 4
  assert mask[:, 5].sum() == 4
  assert set(np.flatnonzero(mask[:, 5])) == set(
      np.argsort(-np.abs(w[:, 5]))[:4])
  assert _reference_topk(w, k)[:, 5].sum() == 0
  # Capped so that exactly k can hold: 32 neurons x 4 > 100.
  assert sparsity.guaranteed_per_neuron(w.shape, 100, 4) == 3


def _reference_guaranteed(w, k, j):
  """Sort-based reference of the guarantee: the j largest |w| of each
  column (earlier row first among ties; zeros never) come first, then the
  largest |w|, earlier index first among ties."""
  a = np.abs(w).reshape(-1, w.shape[-1])
  raised = np.zeros(a.shape, bool)
  for col in range(a.shape[1]):
    top = np.lexsort((np.arange(a.shape[0]), -a[:, col]))[:j]
    raised[top, col] = a[top, col] > 0
  order = np.lexsort((np.arange(a.size), -a.ravel(), ~raised.ravel()))
  mask = np.zeros(a.size, bool)
  mask[order[:k]] = True
  return mask.reshape(w.shape)


def test_min_per_neuron_equals_reference_with_and_without_short_columns():
  # Tensors with a column a plain top-k would leave short of j, and tensors
  # without, in one call, at densities where the guarantee binds and where
  # it does not.
  rng = np.random.default_rng(3)
  scores = {p: rng.normal(size=s).astype(np.float32)
            for p, s in [('short', (64, 32)), ('fine', (48, 16)),
                         ('short_3d', (6, 5, 12)), ('bias', (40,)),
                         ('short_twin', (64, 32))]}
  scores['short'][:, 5] *= 1e-3
  scores['short_twin'][:, 9] *= 1e-3  # Stacked with 'short', short elsewhere.
  scores['short_3d'][..., 2] *= 1e-3
  scores['fine'] += np.sign(scores['fine'])  # No column near the cut.
  # A short column whose largest |w| repeat: its 4 largest are 3 entries of
  # 5e-3 and one of 4e-3, so the guarantee raises those 4 and no more (the
  # 4th largest distinct |w| would raise a 5th).
  scores['short'][:6, 11] = 1e-3 * np.array([5, -5, 5, 4, 3, 2])
  scores['short'][6:, 11] = 1e-6
  for density in (0.5, 0.2, 0.1):
    ks = {p: int(sparsity.num_kept(v.size, density))
          for p, v in scores.items()}
    js = {p: sparsity.guaranteed_per_neuron(v.shape, ks[p], 4)
          for p, v in scores.items()}
    got = jax.jit(functools.partial(sparsity.topk_masks, ks=ks,
                                    min_per_neuron=js))(scores)
    for p, v in scores.items():
      want = (_reference_guaranteed(v, ks[p], js[p]) if js[p]
              else _reference_topk(v, ks[p]))
      np.testing.assert_array_equal(np.asarray(got[p]), want,
                                    err_msg=f'{p} {density}')
    assert not _reference_topk(scores['short'], ks['short'])[:, 5].any()
    np.testing.assert_array_equal(np.asarray(got['short'])[:, 11],
                                  np.arange(64) < 4)


@pytest.mark.parametrize('j', [1, 3, 8, 17, 32])
def test_min_per_neuron_equals_reference_for_every_list_size(j):
  # J = 1, 4, 8, 32 lists, over fan-ins that do not divide into them
  # (padded) and a stacked pair; a plain top-k would leave the faint
  # columns of 'short' short of j.
  rng = np.random.default_rng(j)
  scores = {p: rng.normal(size=s).astype(np.float32)
            for p, s in [('short', (100, 24)), ('a', (72, 40)),
                         ('b', (72, 40))]}
  scores['short'] *= np.logspace(0, -3, 24, dtype=np.float32)
  ks = {p: v.size // 2 for p, v in scores.items()}
  js = {p: sparsity.guaranteed_per_neuron(v.shape, ks[p], j)
        for p, v in scores.items()}
  assert set(js.values()) == {j}
  assert _reference_topk(scores['short'], ks['short']).sum(axis=0).min() < j
  got = jax.jit(functools.partial(sparsity.topk_masks, ks=ks,
                                  min_per_neuron=js))(scores)
  for p, v in scores.items():
    np.testing.assert_array_equal(np.asarray(got[p]),
                                  _reference_guaranteed(v, ks[p], j),
                                  err_msg=p)
  assert np.asarray(got['short']).sum(axis=0).min() >= j


def test_min_per_neuron_raises_j_of_a_columns_ties_in_row_order():
  """k = j * neurons, and columns whose j-th largest |w| repeats: each
  raises its j largest, the earliest rows among ties. All ties were
  raised: 8 in column 0, where j is 2, of which the exact top-k kept 4 and
  left columns 1 and 3 with 1."""
  w = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
  w[:, 0] = 0.5
  w[:, 2] = [1, -3, 1, -1, 0, 0, 1, -0.0]  # 3, then four 1s.
  k = 8
  j = sparsity.guaranteed_per_neuron(w.shape, k, 4)
  assert j == 2 == k // w.shape[1]
  got = np.asarray(jax.jit(_topk_mask, static_argnums=(1, 2))(w, k, j))
  np.testing.assert_array_equal(got, _reference_guaranteed(w, k, j))
  np.testing.assert_array_equal(got.sum(axis=0), [2, 2, 2, 2])
  np.testing.assert_array_equal(np.flatnonzero(got[:, 0]), [0, 1])
  np.testing.assert_array_equal(np.flatnonzero(got[:, 2]), [0, 1])


def tied_case(seed, shapes, js):
  """(scores, ks) of `shapes`: few distinct magnitudes (most entries tie),
  signed, so -0.0 among the zeros, with float32's largest and inf among
  them, and an all-zero column in every matrix; k at j * neurons, where the
  guarantee takes all of it, for odd seeds, else up to the size."""
  rng = np.random.default_rng(seed)
  big = np.finfo(np.float32).max
  scores = {}
  for p, s in shapes.items():
    v = (rng.choice(np.float32([0, 0.5, 1, 1, 2, big, np.inf]), size=s,
                    p=[0.2, 0.2, 0.2, 0.2, 0.1, 0.05, 0.05])
         * rng.choice(np.float32([-1, 1]), size=s))
    if len(s) >= 2:
      v[..., rng.integers(s[-1])] = 0
    scores[p] = v
  floor = {p: js[p] * s[-1] if js[p] else 1 for p, s in shapes.items()}
  ks = {p: floor[p] if seed % 2 else int(rng.integers(floor[p],
                                                      np.prod(s) + 1))
        for p, s in shapes.items()}
  return scores, ks


def check_guarantee(masks, scores, ks, js):
  """Exactly k of each tensor, and every column keeps its min(j, nonzeros)
  largest, the reference's."""
  for p, v in scores.items():
    mask = np.asarray(masks[p])
    assert mask.sum() == ks[p], p
    if js[p]:
      columns = mask.reshape(-1, mask.shape[-1])
      nonzero = (v != 0).reshape(columns.shape).sum(axis=0)
      assert (columns.sum(axis=0) >= np.minimum(js[p], nonzero)).all(), p
    np.testing.assert_array_equal(
        mask, _reference_guaranteed(v, ks[p], js[p]) if js[p]
        else _reference_topk(v, ks[p]), err_msg=p)


def test_min_per_neuron_holds_on_ties_zeros_and_huge_values():
  # Stacked tensors and lone ones, j a power of two and not, j = fan-in;
  # k from j * neurons, where the guarantee takes all of k, to the size.
  shapes = {'a': (24, 6), 'a2': (24, 6), 'c': (5, 4, 8), 'd': (40, 16),
            'e': (3, 7), 'f': (8, 2), 'bias': (10,)}
  js = {'a': 4, 'a2': 4, 'c': 3, 'd': 4, 'e': 3, 'f': 1, 'bias': 0}
  select = jax.jit(lambda s, k: sparsity.topk_masks(s, k, js))
  for seed in range(12):
    scores, ks = tied_case(seed, shapes, js)
    check_guarantee(select(scores, ks), scores, ks, js)


def test_num_kept_is_at_least_one_and_at_most_the_size():
  """Dense is every entry: in float32 an odd size above 2^24 rounded to
  the next even number, one more than the tensor holds."""
  size = 2**24 + 3
  assert int(sparsity.num_kept(size, 1.0)) == size
  assert int(sparsity.num_kept(size, 0.5)) == 8388610  # float32's round.
  assert int(sparsity.num_kept(100, 1e-9)) == 1


def test_density_schedule_anneals_linearly_then_holds():
  config = tiny.get_config('topk').sparsity
  config.density, config.anneal_fraction = 0.1, 0.5
  values = [float(sparsity.density_at(s, config, 100)) for s in
            (0, 25, 50, 75, 100)]
  np.testing.assert_allclose(values, [1.0, 0.55, 0.1, 0.1, 0.1], rtol=1e-6)
  config.mode = 'static'
  assert float(sparsity.density_at(0, config, 100)) == pytest.approx(0.1)



def test_an_anneal_shorter_than_float32_holds_starts_dense_not_nan():
  """anneal_fraction * total_steps can be positive in Python and 0 in
  float32 (1e-44 * 1000: a denormal, which XLA:CPU flushes): step / anneal
  was then 0 / 0 at step 0, a NaN density and a NaN lr (a NaN run from its
  first update), where any anneal under one step starts dense at step 0 and
  is at the target from step 1, as init's all-True masks assume."""
  config = tiny.get_config('topk')
  config.sparsity.density, config.sparsity.anneal_fraction = 0.25, 1e-44
  config.optim.lr, config.optim.warmup_fraction = 1.0, 0.0
  density = jax.jit(lambda s: sparsity.density_at(s, config.sparsity, 1000))
  lr = jax.jit(optim.learning_rate(config, 1000))
  assert [float(density(s)) for s in (0, 1, 2)] == [1.0, 0.25, 0.25]
  assert float(lr(0)) == pytest.approx(0.5, rel=1e-6)  # sqrt(0.25 / 1)


@pytest.mark.parametrize('mode', ['topk', 'static'])
@pytest.mark.parametrize('density', [0.1, 0.05, 0.3, 0.7])
def test_the_steps_keep_the_k_the_guarantee_is_sized_for(mode, density):
  """The k of the final density, where the steps take it (`density_at`,
  `num_kept`, traced), is the k the per-neuron guarantee is sized for: the
  guarantee's k, once taken from the density in float64, differed for 249
  sizes under 5,000 at density 0.1 (a 25-entry tensor: 2 against the
  steps' 3, the schedule's float32 density being 0.100000024)."""
  config = tiny.get_config(mode).sparsity
  config.density, config.anneal_fraction = density, 0.5
  sizes = np.arange(1, 1000)
  steps_k = jax.jit(lambda step: sparsity.num_kept(
      jnp.asarray(sizes), sparsity.density_at(step, config, 100)))(100)
  target = sparsity._kept_per_tensor(  # pylint: disable=protected-access
      {s: np.empty(s, np.float32) for s in sizes.tolist()}, config, 100)
  assert np.asarray(steps_k).tolist() == [target[s][0] for s in sizes.tolist()]
  if density == 0.1:  # The float32 density rounds 2.5 entries of 25 up.
    assert target[25][0] == (3 if mode == 'topk' else 2)


def test_sharkfin_lr_grows_with_sparsity():
  config = tiny.get_config('topk')
  config.sparsity.density, config.sparsity.anneal_fraction = 0.25, 0.5
  config.optim.lr, config.optim.warmup_fraction = 1.0, 0.1
  lr = optim.learning_rate(config, 100)
  assert float(lr(0)) == pytest.approx(0.1 * np.sqrt(0.25), rel=1e-5)
  assert float(lr(9)) == pytest.approx(1.0 * np.sqrt(0.25 / (1 - 0.75 * 0.18)),
                                       rel=1e-5)
  assert float(lr(50)) == pytest.approx(50 / 90, rel=1e-5)  # sqrt(1) at target
  assert float(lr(100)) == pytest.approx(0.0, abs=1e-7)


def test_erk_densities_match_the_budget():
  shapes = {'a': (256, 256), 'b': (256, 1024), 'c': (1024,), 'd': (8, 8)}
  dens = sparsity.erk_densities(shapes, 0.1)
  total = sum(np.prod(s) for s in shapes.values())
  kept = sum(dens[p] * np.prod(s) for p, s in shapes.items())
  assert kept == pytest.approx(0.1 * total)
  assert dens['d'] == 1.0 and dens['c'] == 1.0  # Small ones capped dense.
  assert dens['a'] > dens['b']
  # At density 1 every tensor is dense, though rounding takes the scale
  # past 1 for some of them (it divided by zero once all were).
  for shape in ((48, 768), (192, 3072), (3072, 192)):
    assert sparsity.erk_densities({'w': shape}, 1.0) == {'w': 1.0}
  assert sparsity.erk_densities({'w': (48, 25), 'b': (25,)}, 1.0) == {
      'w': 1.0, 'b': 1.0}


def test_erk_masks_keep_each_tensors_k_and_a_j_it_can_hold():
  """Static ERK masks: each tensor keeps its own k, and every neuron the j
  that k allows, where the uniform density's j would ask for more."""
  config = tiny.get_config('static')
  config.sparsity.static_init = 'erk'
  # 8, not more: ERK thins three tensors below it (j 7 and 6, where the
  # uniform density gives 8), and the guarantee's compile grows with j
  # (sparsity.MAX_MIN_PER_NEURON): at 32 this init compiled 4x longer.
  config.sparsity.min_per_neuron = 8
  state = next(_run_steps(config, steps=1))
  params = sparsity.flat(state.params)
  erk = sparsity.erk_densities({p: params[p].shape for p in
                                sparsity.flat(state.masks)},
                               config.sparsity.density)
  thinned = 0
  for path, bits in sparsity.flat(state.masks).items():
    mask = np.asarray(sparsity.unpack(bits, params[path].shape))
    k = max(1, round(erk[path] * mask.size))
    assert int(mask.sum()) == k, path
    if mask.ndim >= 2:
      columns = mask.reshape(-1, mask.shape[-1])
      fan_in, neurons = columns.shape
      j = min(config.sparsity.min_per_neuron, k // neurons, fan_in)
      uniform_j = min(config.sparsity.min_per_neuron,
                      round(config.sparsity.density * mask.size) // neurons,
                      fan_in)
      thinned += uniform_j > j
      assert columns.sum(0).min() >= j, path
  assert thinned, 'no tensor that ERK thins below the uniform j'


@pytest.mark.parametrize('bad', [0.0, -0.5, 1.5])
def test_impossible_density_fails_clearly(bad):
  config = tiny.get_config('topk').sparsity
  config.density = bad
  with pytest.raises(ValueError, match='sparsity.density must be in'):
    sparsity.validate(config)


def test_a_density_the_annealing_reads_as_zero_is_refused():
  """`density_at` ends at 1 - (1 - density) in float32, 0 for a density of
  2**-25 or less: the tiny config at density 1e-8 logged lr inf where its
  annealing ended, then a NaN loss. The density the refusal names keeps a
  finite lr there."""
  config = tiny.get_config('topk')
  for bad in (1e-8, 2**-25):
    config.sparsity.density = bad
    with pytest.raises(ValueError, match=rf'^sparsity.density {bad} is 0 in '
                       r'float32 as the annealing computes it .* give more '
                       r'than 2\*\*-25 \(3e-08\)'):
      sparsity.validate(config.sparsity)
  config.sparsity.density = 3e-8
  sparsity.validate(config.sparsity)
  assert np.isfinite(float(optim.learning_rate(config, 100)(99)))


@pytest.mark.parametrize('j', [33, 64, 128])
def test_min_per_neuron_above_its_limit_is_refused(j):
  # Its unrolled tournament (`_column_tops`) took 42 s and 3.2 GB to compile
  # at j = 64 on the tiny config, and over a minute and 8.6 GB at 128.
  config = tiny.get_config('topk').sparsity
  config.min_per_neuron = 32
  sparsity.validate(config)
  config.min_per_neuron = j
  with pytest.raises(ValueError, match=r'sparsity.min_per_neuron must be >= '
                     rf'0 and <= 32 \(.*\), got {j}$'):
    sparsity.validate(config)


@pytest.mark.parametrize('field, bad, message', [
    ('static_init', 'bogus',
     "sparsity.static_init must be 'uniform' or 'erk', got 'bogus'"),
    ('anneal_fraction', 5.0,
     r'sparsity.anneal_fraction must be in \[0, 1\], got 5.0'),
    ('anneal_fraction', float('nan'),
     r'sparsity.anneal_fraction must be in \[0, 1\], got nan'),
    ('pattern', '(unclosed', r"sparsity.pattern '\(unclosed' is not a regex"),
    ('density', 0.0, r'sparsity.density must be in \(0, 1\], got 0.0'),
    ('min_per_neuron', 64, 'sparsity.min_per_neuron must be >= 0 and <= 32'),
])
def test_a_dense_config_validates_every_sparsity_field(field, bad, message):
  # Mode 'none' once returned before any check, so a dense run accepted and
  # recorded fields that the same config in another mode would use.
  config = tiny.get_config('none').sparsity
  config.density = 0.1  # Any density in range: mode none keeps every weight.
  sparsity.validate(config)
  setattr(config, field, bad)
  with pytest.raises(ValueError, match=message):
    sparsity.validate(config)


def test_sparse_gpt2_124m_states_the_weights_it_keeps():
  """Its docstring's nonzero count is that of the project's 2048-token
  vocabulary (it said 1.9M of 124M, true only of GPT-2's 50257)."""
  config = sparse_gpt2_124m.get_config()
  shapes = jax.eval_shape(train.make_model(config).init, jax.random.key(0),
                          jnp.zeros((1, 8), jnp.int32))
  params = sparsity.flat(shapes['params'])
  weights = {p: params[p] for p in sparsity.flat(shapes['sparsity'])}
  kept = sparsity._kept_per_tensor(  # pylint: disable=protected-access
      weights, config.sparsity, config.train_steps)
  total = sum(x.size for x in params.values())
  kept = sum(k for k, _ in kept.values())
  assert (total, kept) == (87_415_296, 1_365_264)  # About 1 in 64.
  doc = ' '.join(sparse_gpt2_124m.__doc__.split())
  assert 'about 1.37M of its 87.4M parameters' in doc, doc


def test_pattern_matching_nothing_fails_clearly():
  config = tiny.get_config('topk')
  config.sparsity.pattern = 'no_such_parameter'
  model = train.make_model(config)
  tx = optim.make(config, 10)
  with pytest.raises(ValueError, match='matches no parameter'):
    train.init_state(config, model, tx, jax.random.key(0), None)


def _run_steps(config, steps=20):
  """Steps a tiny model on random tokens; yields the state after each."""
  config.train_steps = config.schedule_steps = steps
  model = train.make_model(config)
  tx = optim.make(config, steps)
  state = jax.jit(functools.partial(train.init_state, config, model, tx))(
      jax.random.key(0), None)  # Jitted: op by op, it compiled 3x longer.
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx,
                                   config=config))
  tokens = jax.random.randint(jax.random.key(1), (steps, 4, 17), 0,
                              config.model.vocab_size)
  yield state
  for i in range(steps):
    state, _ = step(state, tokens[i])
    yield state


@pytest.mark.parametrize('mode', ['topk', 'static'])
def test_every_sparse_tensor_holds_exactly_k_after_every_step(mode):
  config = tiny.get_config(mode)
  config.optim.weight_decay = 0.5  # Decay must not revive pruned weights.
  config.seq_len = 16
  # Widths that are no multiple of 8, so packed masks end in padding bits:
  # the unembedding and bigram table [., 509], the MLP's hidden layer 124.
  config.model.vocab_size = 509
  config.model.d_mlp = 124
  first_masks = None
  for state in _run_steps(config):
    step = int(state.step)
    density = float(sparsity.density_at(step, config.sparsity, 20))
    params = sparsity.flat(state.params)
    packed = sparsity.flat(state.masks)
    assert packed, 'no sparse tensors'
    assert any(params[p].shape[-1] % 8 for p in packed), 'no padded mask'
    for path, bits in packed.items():  # 8 weights a byte, the last padded.
      assert bits.dtype == jnp.uint8, path
      assert bits.shape == params[path].shape[:-1] + (
          -(-params[path].shape[-1] // 8),), path
    masks = {p: np.asarray(sparsity.unpack(bits, params[p].shape))
             for p, bits in packed.items()}
    for path, mask in masks.items():
      k = max(1, round(density * mask.size))
      assert int(mask.sum()) == k, (step, path)
      if mask.ndim >= 2:  # Every neuron keeps its j, sized for the final k.
        columns = mask.reshape(-1, mask.shape[-1])
        final_k = max(1, round(config.sparsity.density * mask.size))
        j = min(config.sparsity.min_per_neuron,
                final_k // columns.shape[1], columns.shape[0])
        assert j > 0 and columns.sum(0).min() >= j, (step, path)
      assert not np.any(np.asarray(params[path])[~np.asarray(mask)]), path
      if step > 0 and path.endswith('kernel'):
        assert int(jnp.count_nonzero(params[path])) == k, (step, path)
    if mode == 'static':
      first_masks = first_masks or masks
      for path in masks:
        np.testing.assert_array_equal(masks[path], first_masks[path])
  if mode == 'static':  # Adam moments never saw a pruned entry.
    adam = state.opt_state[2][0]
    for moment in (adam.mu, adam.nu):
      flat_moment = sparsity.flat(moment)
      for path, mask in masks.items():
        assert not np.any(np.asarray(flat_moment[path])[~np.asarray(mask)])


def test_topk_revives_a_pruned_weight_with_a_large_gradient():
  config = tiny.get_config('topk')
  config.sparsity.anneal_fraction = 0.0  # At the target from the start.
  config.sparsity.density = 0.5
  config.sparsity.min_per_neuron = 0
  config.optim.weight_decay = 0.0
  config.optim.warmup_fraction = 0.0
  config.optim.lr = 0.2
  # Entries (1, *) pruned. Pruned weights stay at zero, so one update has
  # to outgrow the threshold (0.05) to come back; with unit-RMS gradients
  # and lr 0.2 the first one does.
  w = jnp.array([[0.1, 0.05], [0.0, 0.0]])
  params, masks = {'w': w}, {'w': sparsity.pack(w != 0)}
  tx = optim.make(config, 100)
  state = tx.init(params)
  grads = {'w': jnp.array([[0.0, 0.0], [-100.0, 0.0]])}
  for _ in range(3):
    updates, state = tx.update(grads, state, params, masks=masks)
    params = optax.apply_updates(params, updates)
    masks = sparsity.support(params, masks, config.sparsity)
  np.testing.assert_array_equal(sparsity.unpack(masks['w'], (2, 2)),
                                [[True, False], [True, False]])


def test_topk_steps_keep_exactly_k_and_j_a_neuron_on_adversarial_weights():
  """The real optimizer chain, every step of annealing to k = j * neurons,
  on weights made to break it: columns of equal weights with equal
  gradients (their ties outlive every step), a column of zeros and -0.0
  with no gradient, weights near float32's largest, and a tied bias. Each
  step keeps exactly k nonzeros of every tensor, and every neuron its j
  where it has them; Adam's moments stay dense, so pruned weights whose
  gradient is not 0 still move."""
  config = tiny.get_config('topk')
  config.sparsity.density, config.sparsity.anneal_fraction = 0.25, 0.5
  config.optim.warmup_fraction = 0.0
  steps = 10
  rng = np.random.default_rng(0)
  w = rng.normal(size=(16, 8)).astype(np.float32)
  grads = {'w': rng.normal(size=(16, 8)).astype(np.float32),
           'b': np.ones(12, np.float32)}
  w[:, 0], grads['w'][:, 0] = 0.5, 1.0
  w[:, 3], grads['w'][:, 3] = np.where(np.arange(16) % 2, -2.0, 2.0), np.where(
      np.arange(16) % 2, -1.0, 1.0)   # Signs alternate, magnitudes tie.
  w[:, 5], grads['w'][:, 5] = -0.0, 0.0
  w[:4, 6] = np.finfo(np.float32).max * np.float32([1, -1, 0.5, -0.5])
  params = {'w': jnp.asarray(w), 'b': jnp.full(12, 0.25)}
  masks = {p: sparsity.pack(jnp.ones(v.shape, bool)) for p, v in
           params.items()}
  kept = sparsity._kept_per_tensor(  # pylint: disable=protected-access
      params, config.sparsity, steps)
  assert kept['w'] == (32, 4) and 32 // 8 == 4  # k // neurons is j.
  tx = optim.make(config, steps)
  state = tx.init(params)
  # Under the suite's flags (conftest.py: the loop emitters at LLVM -O0)
  # this chain pruned all 12 of 'b' at the first step, where k is 10, while
  # the top-k read |params + updates| recomputed in each fusion, some with
  # an FMA and some without.
  update = jax.jit(functools.partial(tx.update, masks=masks))
  for step in range(1, steps + 1):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    density = sparsity.density_at(step, config.sparsity, steps)
    for p, v in params.items():
      v = np.asarray(v)
      assert np.isfinite(v).all(), (step, p)
      assert np.count_nonzero(v) == sparsity.num_kept(v.size, density), (
          step, p)
    columns = np.asarray(params['w']) != 0
    assert (np.delete(columns.sum(axis=0), 5) >= 4).all(), step
    assert not columns[:, 5].any(), step
  adam = state[1][0]
  pruned = np.asarray(params['w']) == 0
  pruned[:, 5] = False  # No gradient: no moment.
  assert pruned.any() and (np.asarray(adam.mu['w'])[pruned] != 0).all()


def test_adamw_takes_its_settings_from_the_config():
  """One step of the chain, written out: the moments are (1 - b1) g and
  (1 - b2) g^2 of the RMS-normalised gradient g, and the update is lr(0)
  times g / (|g| + eps) plus the decay. A swap of b1 and b2, or the
  paper's large eps (0.1) lost to optax's default, trains on silently."""
  config = tiny.get_config('none')
  o = config.optim
  assert o.b1 != o.b2 and o.eps > 1e-3 and o.weight_decay > 0
  w = jnp.linspace(-1.0, 1.0, 16).reshape(4, 4)
  grads = {'w': jnp.arange(16.0).reshape(4, 4) - 5}
  tx = optim.make(config, 10)
  updates, state = tx.update(grads, tx.init({'w': w}), {'w': w})
  adam = state[1][0]
  g = grads['w'] / optim.global_rms(grads)
  np.testing.assert_allclose(adam.mu['w'], (1 - o.b1) * g, rtol=1e-5)
  np.testing.assert_allclose(adam.nu['w'], (1 - o.b2) * g**2, rtol=1e-5)
  lr = float(optim.learning_rate(config, 10)(0))
  np.testing.assert_allclose(
      updates['w'], -lr * (g / (jnp.abs(g) + o.eps) + o.weight_decay * w),
      rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('scale', [1.0, 1e-3])
def test_gradients_are_rescaled_to_unit_rms(scale):
  """Divided by their RMS every step, as the paper's released code does,
  not clipped: small gradients (RMS 1.5e-3 here) are scaled up to 1 too,
  which Adam's eps of 0.1 is sized for."""
  tx = optim.normalize_by_global_rms(1.0)
  grads = {'a': jnp.full((10,), 3.0 * scale),
           'b': jnp.full((30,), -0.01 * scale)}
  out, _ = tx.update(grads, tx.init(grads))
  assert float(optim.global_rms(out)) == pytest.approx(1.0, rel=1e-5)


def test_min_per_neuron_never_raises_the_zeros_of_a_column_short_of_j():
  # Column 0 has 2 nonzeros, fewer than j = 4: its j-th largest |w| is 0,
  # and raising the entries at or above it would keep its zeros ahead of
  # larger weights elsewhere.
  w = np.random.default_rng(4).normal(size=(64, 8)).astype(np.float32)
  w[:, 0] = 0
  w[[3, 40], 0] = [1e-3, -2e-3]
  k = 64
  j = sparsity.guaranteed_per_neuron(w.shape, k, 4)
  assert j == 4
  got = np.asarray(jax.jit(_topk_mask, static_argnums=(1, 2))(w, k, j))
  np.testing.assert_array_equal(got, _reference_guaranteed(w, k, j))
  assert got.sum() == k and not got[w == 0].any()
  np.testing.assert_array_equal(np.flatnonzero(got[:, 0]), [3, 40])


def test_num_kept_keeps_at_least_one_entry():
  assert int(sparsity.num_kept(4, 0.1)) == 1  # round(0.4) is 0.
  assert int(sparsity.num_kept(1, 0.05)) == 1
  w = np.array([0.1, -0.3, 0.2, 0.05], np.float32)
  got = np.asarray(_topk_mask(w, sparsity.num_kept(w.size, 0.1)))
  np.testing.assert_array_equal(got, [False, True, False, False])
  config = tiny.get_config('topk').sparsity
  config.density = 0.1
  kept = sparsity._kept_per_tensor(  # pylint: disable=protected-access
      {'w': w}, config, 100)
  assert kept['w'][0] == 1


def test_static_init_draws_a_different_mask_for_each_tensor_of_one_shape():
  config = tiny.get_config('static').sparsity
  config.min_per_neuron = 0
  shape = (32, 16)
  params = {f'block_{i}': {'kernel': jnp.ones(shape)} for i in range(3)}
  masks = {f'block_{i}': {'kernel': sparsity.pack(jnp.ones(shape, bool))}
           for i in range(3)}
  params, masks = sparsity.init_masks(params, masks, config,
                                      jax.random.key(0), 100)
  got = [np.asarray(sparsity.unpack(masks[f'block_{i}']['kernel'], shape))
         for i in range(3)]
  k = round(config.density * np.prod(shape))
  for i, mask in enumerate(got):
    assert mask.sum() == k
    np.testing.assert_array_equal(np.asarray(params[f'block_{i}']['kernel']),
                                  mask.astype(np.float32))
    for other in got[:i]:
      assert (mask != other).any(), 'two tensors drew the same mask'


def test_topk_init_is_at_the_target_unless_annealing():
  """Without annealing the run is at its target density from step 0: init
  keeps each tensor's k largest |w| and zeroes the rest (else the first
  step starts from a dense model and keeps the top-k of it plus its
  update); annealing from dense, it keeps every weight."""
  config = tiny.get_config('topk').sparsity
  config.anneal_fraction, config.min_per_neuron = 0.0, 0
  w = np.random.default_rng(5).normal(size=(16, 8)).astype(np.float32)
  params = {'w': jnp.asarray(w)}
  masks = {'w': sparsity.pack(jnp.ones(w.shape, bool))}
  params_0, masks_0 = sparsity.init_masks(params, masks, config,
                                          jax.random.key(0), 100)
  mask = np.asarray(sparsity.unpack(masks_0['w'], w.shape))
  np.testing.assert_array_equal(
      mask, _reference_topk(w, round(config.density * w.size)))
  np.testing.assert_array_equal(params_0['w'], np.where(mask, w, 0))
  config.anneal_fraction = 0.5
  params_0, masks_0 = sparsity.init_masks(params, masks, config,
                                          jax.random.key(0), 100)
  assert np.asarray(sparsity.unpack(masks_0['w'], w.shape)).all()
  np.testing.assert_array_equal(params_0['w'], w)


def test_erk_densities_cap_tensors_just_over_one():
  # eps = 0.025 * 10010 / (0.02 * 10000 + 10) = 1.19: 'b' (raw 1) would get
  # density 1.19 unless made dense, and 'a' takes the rest of the budget.
  shapes = {'a': (100, 100), 'b': (10,)}
  dens = sparsity.erk_densities(shapes, 0.025)
  assert all(0 < d <= 1 for d in dens.values()), dens
  assert dens['b'] == 1.0
  assert dens['a'] == pytest.approx((0.025 * 10010 - 10) / 10000)


def test_weight_decay_skips_the_bigram_table():
  config = tiny.get_config('topk')
  assert config.model.bigram_table
  shapes = jax.eval_shape(train.make_model(config).init, jax.random.key(0),
                          jnp.zeros((1, 8), jnp.int32))
  params = sparsity.flat(shapes['params'])
  decay = sparsity.flat(optim.decay_mask(shapes['params']))
  bigram = [p for p in params if 'bigram' in p]
  assert bigram and all(params[p].ndim >= 2 for p in bigram), bigram
  assert not any(decay[p] for p in bigram), bigram
  assert all(decay[p] == (x.ndim >= 2 and 'bigram' not in p)
             for p, x in params.items())
  assert any(decay[p] for p in params if p.endswith('kernel'))
