"""Sharded state on 8 fake CPU devices (data 2 x fsdp 2 x model 2): the
top-k works shard by shard and gives the masks of one device, sharded
training matches one device in the topk and static modes, the compiled
step gathers no sparse tensor, checkpoint digests read the same on any
mesh, and a checkpoint saved on one mesh restores onto another. The checks
run in one subprocess, which is given 8 devices before jax starts:
`PYTHONPATH=. python tests/test_sharding.py '[["CHECK", ARGS...], ...]'`."""

import functools
import json
import os
import re
import subprocess
import sys
import traceback

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from configs import tiny
from sparse_gpt2 import checkpoint
from sparse_gpt2 import optim
from sparse_gpt2 import sharding
from sparse_gpt2 import sparsity
from sparse_gpt2 import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _in_subprocess(*checks):
  """Runs `checks` (names, or (name, *args) tuples) in one subprocess of 8
  devices, each to its end whatever the others do; fails naming every check
  that failed, with its traceback."""
  calls = [[c] if isinstance(c, str) else list(c) for c in checks]
  result = subprocess.run(
      [sys.executable, os.path.abspath(__file__), json.dumps(calls)],
      cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True,
      text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-20000:]


def test_a_mesh_across_the_physical_axes_is_made_with_a_warning(
    monkeypatch, caplog):
  """As jax refuses data 2 x fsdp 8 on a 4 x 4 TPU slice unless it may
  split the physical axes: a traceback before, a warning line now."""
  made = []

  def create_device_mesh(sizes, devices, allow_split_physical_axes=False):
    made.append(allow_split_physical_axes)
    if not allow_split_physical_axes:
      raise NotImplementedError('Failed to find assignment for mesh_shape')
    return np.array(devices).reshape(sizes)
  monkeypatch.setattr(sharding.mesh_utils, 'create_device_mesh',
                      create_device_mesh)
  config = tiny.get_config('topk').mesh
  config.data, config.fsdp, config.model = 1, 1, 1
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  assert made == [False, True] and mesh.devices.shape == (1, 1, 1)
  assert ('does not follow the devices\' physical axes (Failed to find '
          'assignment for mesh_shape); splitting them') in caplog.text


def test_a_mesh_smaller_than_the_devices_is_refused_saying_it_takes_all():
  """sparse_small splits the CPU into 2 devices: its user asking for a mesh
  of one was told only that it "does not fit the 2 available device(s)",
  as if it were too large, not that a mesh takes every device."""
  config = tiny.get_config()
  config.mesh.data = 1
  with pytest.raises(ValueError, match=(
      r'^mesh data=1 x fsdp=1 x model=1 does not fit the 2 available '
      r'device\(s\): a mesh takes them all, one axis may be -1 for the '
      'devices the others leave$')):
    sharding.make_mesh(config.mesh, jax.devices() * 2)  # Only the count.


def test_sharded_checks_on_8_devices(tmp_path):
  """The checks below that need 8 fake devices, in one subprocess (one jax
  start instead of eight, 2-3 s of CPU each): each is run, and reported by
  name if it fails, as when each was a test of its own.
  check_topk: sharded top-k gives the masks of one device.
  check_sharded_ties: sharded top-k breaks column ties as one device.
  check_training: sharded training matches one device in topk and static
    modes, and the step gathers no sparse tensor.
  check_packed_masks: packed masks shard like their weights where the mesh
    divides.
  check_digests: checkpoint digests read the same on any mesh and see any
    word.
  check_restore_on_another_mesh: a checkpoint saved on one mesh resumes on
    another.
  check_batch_split: batches split over data and fsdp.
  check_length_rule: a length rule shards activations and keeps token rows
    whole."""
  _in_subprocess('check_topk', 'check_sharded_ties', 'check_training',
                 'check_packed_masks', 'check_digests',
                 ('check_restore_on_another_mesh', str(tmp_path)),
                 'check_batch_split', 'check_length_rule')


@pytest.mark.parametrize('rules, message', [
    # A flat pair where a tuple of pairs belongs: "too many values to
    # unpack (expected 2)" before.
    (('batch', 'data'), r"each rule is a \(logical axis, mesh axes\) pair, "
                        r"got 'batch'$"),
    ((('batch', 'data', 'fsdp'),),
     r"each rule is .* pair, got \('batch', 'data', 'fsdp'\)$"),
    # Accepted before, and ignored by flax: every weight whole (no FSDP).
    ((('batch', ('data', 'fsdp')), ('embd', 'fsdp')),
     "unknown logical axis 'embd'; the model names .*'embed'"),
])
def test_mesh_rules_not_pairs_of_the_models_logical_axes_are_refused(
    rules, message):
  config = tiny.get_config()
  config.mesh.rules = rules
  with pytest.raises(ValueError, match=r'^mesh\.rules: ' + message):
    train.make_mesh(config)  # What a run calls before it writes anything.


def _mesh(data, fsdp, model):
  config = tiny.get_config().mesh
  config.data, config.fsdp, config.model = data, fsdp, model
  return sharding.make_mesh(config, jax.devices()[:data * fsdp * model])


def check_topk():
  """Tensors split on rows, columns, both, over two axes at once, or not at
  all, with ties (zeros, equal rows): the masks of one device, exactly.
  The replicas of a tensor share its work over the axes that divide its
  rows ('c' and 'd' over 'data' only); 'f' and 'zero_bias' are counted on
  one replica. 'a' and 'a2' are stacked, and only 'a' has ties;
  'tied_bias', all ties, is split over its only axis and shared by the
  replicas over both others."""
  mesh = _mesh(2, 2, 2)
  specs = {'a': P('fsdp', 'model'), 'b': P('model'), 'c': P(None, 'model'),
           'd': P('fsdp'), 'e': P(('data', 'fsdp'), None), 'f': P(),
           'zeros': P('fsdp', 'model'), 'zero_bias': P('model'),
           'a2': P('fsdp', 'model'), 'tied_bias': P('model')}
  shapes = {'a': (16, 8), 'b': (8,), 'c': (6, 4), 'd': (12,), 'e': (8, 5),
            'f': (3, 5), 'zeros': (8, 4), 'zero_bias': (6,), 'a2': (16, 8),
            'tied_bias': (16,)}
  rng = np.random.default_rng(0)
  scores = {p: rng.normal(size=s).astype(np.float32)
            for p, s in shapes.items()}
  scores['a'][5] = 0.5                        # A row of ties.
  scores['a'][:, 3] *= 1e-3                   # Neurons that only the
  scores['e'][:, 1] *= 1e-3                   # guarantee keeps.
  scores['a2'][:, 6] *= 1e-3
  scores['zeros'] = np.zeros((8, 4), np.float32)
  scores['zeros'][3, 1] = 1.0
  scores['zero_bias'] = np.zeros(6, np.float32)
  scores['tied_bias'] = np.full(16, 0.25, np.float32)
  shardings = {p: NamedSharding(mesh, specs[p]) for p in specs}
  placed = {p: jax.device_put(v, shardings[p]) for p, v in scores.items()}
  for density in (1.0, 0.5, 0.3, 0.1):
    ks = {p: int(sparsity.num_kept(v.size, density))
          for p, v in scores.items()}
    js = {p: sparsity.guaranteed_per_neuron(v.shape, ks[p], 2)
          for p, v in scores.items()}
    one = functools.partial(sparsity.topk_masks, ks=ks, min_per_neuron=js)
    want = jax.jit(one)(scores)
    got = jax.jit(functools.partial(one, shardings=shardings),
                  out_shardings=shardings)(placed)
    for p in scores:
      assert int(got[p].sum()) == ks[p], (p, density)
      np.testing.assert_array_equal(got[p], want[p], err_msg=f'{p} {density}')


def check_batch_split():
  """data 2 x fsdp 2 x model 2: a batch's rows split 4 ways (its sharding
  says over which axes), and a batch, or a microbatch slice of one (8 rows
  in 4 slices of 2), that 4 does not divide is refused."""
  config = tiny.get_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.model = 2, 2, 2
  mesh = _mesh(2, 2, 2)
  with nn.logical_axis_rules(sharding.rules(config.mesh)):
    assert sharding.batch_sharding(mesh).spec == P(('data', 'fsdp'), None)
  assert sharding.data_parallel(mesh, config.mesh) == 4
  assert train.make_mesh(config).shape == mesh.shape  # batch_size 8.
  for batch_size, microbatches in ((6, 1), (8, 4)):
    config.batch_size, config.microbatches = batch_size, microbatches
    try:
      train.make_mesh(config)
    except ValueError as e:
      assert str(e) == (f'batch_size {batch_size} / microbatches '
                        f'{microbatches} is not divisible by the 4 ways the '
                        'mesh splits a batch'), e
    else:
      raise AssertionError(f'batch_size {batch_size} / microbatches '
                           f'{microbatches} over 4 ways was not refused')


def check_length_rule():
  """'length' over 'model' (data 4 x model 2): the model's activations are
  split along the sequence, while a batch of seq_len + 1 = 33 tokens a row,
  which 2 does not divide, keeps its rows whole (before: refused by jit
  after the run's directory was written); the step gives one device's
  loss. Dense: sparsity has no part in it, and a dense step compiles in a
  fraction of a top-k one's time."""
  config = tiny.get_config('none')
  config.model.num_layers = 1
  config.train_steps = config.schedule_steps = 1
  config.mesh.data, config.mesh.model = 4, 2
  config.mesh.rules = tuple((logical, 'model' if logical == 'length' else axes)
                            for logical, axes in config.mesh.rules)
  mesh = train.make_mesh(config)
  model = train.make_model(config)
  tx = optim.make(config, 1)
  tokens = jax.random.randint(jax.random.key(1), (8, config.seq_len + 1), 0,
                              config.model.vocab_size)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(config.mesh)):
    _, state_sharding, batch_sharding = train.layout(config, model, tx, mesh)
    assert batch_sharding.spec == P(('data', 'fsdp'), None)
    state = train.jit_init(config, model, tx, state_sharding)(
        jax.random.key(0), None)
    step = train.jit_train_step(config, model, tx, state_sharding,
                                batch_sharding)
    params = jax.device_get(state.params)
    _, metrics = step(state, jax.device_put(tokens, batch_sharding))
  want = jax.jit(functools.partial(train._loss, model))(params, tokens)
  np.testing.assert_allclose(float(metrics['loss']), float(want), rtol=1e-5)


def check_digests():
  """A checkpoint saved on one mesh is checked on another (`load_run` reads
  on one device): every layout of the state's dtypes gives the digests of
  the arrays on one device, and one bit flipped in any word changes them."""
  mesh = _mesh(2, 2, 2)
  rng = np.random.default_rng(0)
  arrays = {
      'f32': rng.normal(size=(16, 8)).astype(np.float32),
      'u8': rng.integers(0, 256, size=(8, 6), dtype=np.uint8),
      'i32': np.array(7, np.int32),
      'bias': rng.normal(size=(16,)).astype(np.float32)}
  specs = {'f32': P('fsdp', 'model'), 'u8': P(('data', 'fsdp')),
           'i32': P(), 'bias': P('model')}
  want = checkpoint.host_digests(arrays)
  for name in ('f32', 'u8', 'bias'):  # Split over other axes too.
    for spec in (P('model', None), P(None, 'data'), P(('data', 'fsdp',
                                                        'model'))):
      if len(spec) <= arrays[name].ndim:
        specs_again = {**specs, name: spec}
        placed = {k: jax.device_put(v, NamedSharding(mesh, specs_again[k]))
                  for k, v in arrays.items()}
        assert checkpoint.host_digests(placed) == want, (name, spec)
  for name, array in arrays.items():
    words = array.view(np.dtype(f'uint{8 * array.itemsize}')).reshape(-1)
    for index in rng.choice(words.size, size=min(words.size, 5),
                            replace=False):
      for bit in (0, 8 * array.itemsize - 1):
        flipped = words.copy()
        flipped[index] ^= flipped.dtype.type(1 << bit)
        changed = {**arrays, name: flipped.view(array.dtype).reshape(
            array.shape)}
        got = checkpoint.host_digests(changed)
        assert got[f"['{name}']"] != want[f"['{name}']"], (name, index, bit)
        assert {k: v for k, v in got.items() if k != f"['{name}']"} == {
            k: v for k, v in want.items() if k != f"['{name}']"}


def check_restore_on_another_mesh(workdir):
  """A run may resume on another mesh (`mesh` is a resumable field, so that
  a preempted run can go on on another slice): a state saved on data 2 x fsdp 2
  x model 2 restores, as a run restores it, value for value into the
  shardings of data 8 and of fsdp 4 x model 2 (where a packed mask of 5
  columns, which 'fsdp' divides on neither, is whole)."""
  config = tiny.get_config('topk')
  config.model.d_model, config.model.num_layers = 40, 1
  config.schedule_steps = 20  # Annealed: no top-k to trace in the init.
  model = train.make_model(config)
  tx = optim.make(config, config.schedule_steps)

  def abstract(shape):
    config.mesh.data, config.mesh.fsdp, config.mesh.model = shape
    mesh = _mesh(*shape)
    with nn.logical_axis_rules(sharding.rules(config.mesh)):
      return train.layout(config, model, tx, mesh)[0]

  rng = np.random.default_rng(0)
  saved = jax.tree.map(
      lambda a: jax.device_put(
          rng.integers(0, 256, a.shape).astype(a.dtype)
          if a.dtype == np.uint8 else rng.normal(size=a.shape).astype(a.dtype),
          a.sharding), abstract((2, 2, 2)))
  want = jax.tree.map(np.asarray, saved)
  mngr = checkpoint.manager(workdir, 1)
  checkpoint.save(mngr, 7, saved)
  mngr.wait_until_finished()
  targets = {shape: abstract(shape) for shape in ((8, 1, 1), (1, 4, 2))}
  assert sparsity.flat(targets[1, 4, 2].masks)[
      'block_0/mlp_proj/kernel'].sharding.spec == P('model', None)
  for shape, target in targets.items():
    got = checkpoint.restore_latest(mngr, target, workdir)
    for (path, a), b, t in zip(jax.tree_util.tree_leaves_with_path(got),
                               jax.tree.leaves(want), jax.tree.leaves(target)):
      where = f'{shape} {jax.tree_util.keystr(path)}'
      assert a.sharding.is_equivalent_to(t.sharding, a.ndim), where
      np.testing.assert_array_equal(np.asarray(a), b, err_msg=where)
  mngr.close()


def check_packed_masks():
  """Width 40: a weight of 40 columns packs into a mask of 5, which the
  2-way 'fsdp' axis splitting the weight does not divide, so the mask keeps
  those columns whole; 128 columns pack into 16, split like the weight's.
  The step compiles for these shardings and keeps exactly k weights."""
  config = tiny.get_config('topk')
  config.model.d_model, config.model.num_layers = 40, 1
  config.train_steps = config.schedule_steps = 2
  config.sparsity.anneal_fraction = 0.0
  config.mesh.data, config.mesh.fsdp, config.mesh.model = 2, 2, 2
  mesh = _mesh(2, 2, 2)
  model = train.make_model(config)
  tx = optim.make(config, 2)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(config.mesh)):
    _, state_sharding, batch_sharding = train.layout(config, model, tx, mesh)
    params = sparsity.flat(state_sharding.params)
    masks = sparsity.flat(state_sharding.masks)
    assert params['block_0/mlp_proj/kernel'].spec == P('model', 'fsdp')
    assert masks['block_0/mlp_proj/kernel'].spec == P('model', None)
    assert params['block_0/mlp_fc/kernel'].spec == P('fsdp', 'model')
    assert masks['block_0/mlp_fc/kernel'].spec == P('fsdp', 'model')
    state = jax.jit(functools.partial(train.init_state, config, model, tx),
                    out_shardings=state_sharding)(jax.random.key(0), None)
    step = train.jit_train_step(config, model, tx, state_sharding,
                                batch_sharding)
    tokens = jax.random.randint(jax.random.key(1), (8, 17), 0,
                                config.model.vocab_size)
    state, _ = step(state, jax.device_put(tokens, batch_sharding))
  weights = sparsity.flat(state.params)
  for path, bits in sparsity.flat(state.masks).items():
    mask = np.asarray(sparsity.unpack(bits, weights[path].shape))
    assert mask.sum() == sparsity.num_kept(mask.size, 0.25), path
    assert not np.any(np.asarray(weights[path])[~mask]), path


def _steps(mode, mesh_shape, steps=2):
  """(losses, final state as numpy, compiled HLO) of `steps` train steps of
  the tiny model on random tokens, on a mesh of `mesh_shape`."""
  config = tiny.get_config(mode)
  config.train_steps = config.schedule_steps = steps
  config.batch_size = 8
  config.model.num_layers = 1  # Compile time is most of this check.
  config.mesh.data, config.mesh.fsdp, config.mesh.model = mesh_shape
  mesh = _mesh(*mesh_shape)
  model = train.make_model(config)
  tx = optim.make(config, steps)
  tokens = jax.random.randint(jax.random.key(1), (steps, 8, 17), 0,
                              config.model.vocab_size)
  init = functools.partial(train.init_state, config, model, tx)
  rng = jax.random.key(0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(config.mesh)):
    abstract = jax.eval_shape(init, rng, None)
    boxed = jax.eval_shape(model.init, rng, jnp.zeros((1, 16), jnp.int32))
    state_sharding = sharding.state_shardings(boxed, abstract, tx, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    state = jax.jit(init, out_shardings=state_sharding)(rng, None)
    step = jax.jit(
        functools.partial(train.train_step, model=model, tx=tx,
                          config=config,
                          param_shardings=state_sharding.params),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, None))
    hlo = step.lower(state, jax.device_put(tokens[0], batch_sharding)
                     ).compile().as_text()
    losses = []
    for i in range(steps):
      state, metrics = step(state, jax.device_put(tokens[i], batch_sharding))
      losses.append(float(metrics['loss']))
  return losses, jax.tree.map(np.asarray, state), hlo


def check_sharded_ties():
  """On data 2 x fsdp 2 x model 2: tensors whose columns tie at their j-th
  largest (test_sparsity.tied_case), split on rows (over one axis or two),
  on columns, on both, or not at all, and shared by their replicas, get
  the masks of one device, where the devices that split a column's rows
  raise its ties in row order across them."""
  import test_sparsity  # pylint: disable=g-import-not-at-top
  config = tiny.get_config().mesh
  config.data, config.fsdp, config.model = 2, 2, 2
  mesh = sharding.make_mesh(config, jax.devices())
  specs = {'a': P('fsdp', 'model'), 'a2': P('fsdp', 'model'),
           'rows': P(('data', 'fsdp'), None), 'cols': P(None, 'model'),
           'one': P(), 'bias': P('model')}
  shapes = {'a': (24, 6), 'a2': (24, 6), 'rows': (32, 5), 'cols': (12, 8),
            'one': (10, 3), 'bias': (16,)}
  js = {'a': 4, 'a2': 4, 'rows': 3, 'cols': 2, 'one': 3, 'bias': 0}
  shardings = {p: NamedSharding(mesh, s) for p, s in specs.items()}
  one = jax.jit(lambda s, k: sparsity.topk_masks(s, k, js))
  split = jax.jit(lambda s, k: sparsity.topk_masks(s, k, js, shardings),
                  out_shardings=shardings)
  for seed in range(6):
    scores, ks = test_sparsity.tied_case(seed, shapes, js)
    scores['a'][:, 1] = 0.5  # Ties in every row block.
    got = split({p: jax.device_put(v, shardings[p])
                 for p, v in scores.items()}, ks)
    test_sparsity.check_guarantee(got, scores, ks, js)
    for p, want in one(scores, ks).items():
      np.testing.assert_array_equal(got[p], want, err_msg=f'{p} {seed}')


def check_training():
  for mode in ('static', 'topk'):
    _check_training(mode)


def _check_training(mode):
  """Same losses, masks and params on the mesh as on one device."""
  losses, state, hlo = _steps(mode, (2, 2, 2))
  losses_one, state_one, _ = _steps(mode, (1, 1, 1))
  np.testing.assert_allclose(losses, losses_one, rtol=2e-5)
  masks, masks_one = sparsity.flat(state.masks), sparsity.flat(state_one.masks)
  for path in masks:
    np.testing.assert_array_equal(masks[path], masks_one[path], err_msg=path)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-4,
                                 atol=2e-6), state.params, state_one.params)
  # No all-gather in the step yields a whole sparse matrix (FSDP gathers
  # give one model-axis shard of it), nor anything as large as all sparse
  # tensors together; and no constant of one entry per sparse weight.
  params = sparsity.flat(state.params)
  sparse = [params[p] for p in masks]
  shapes = {tuple(w.shape) for w in sparse if w.ndim == 2}
  shapes |= {(w.size,) for w in sparse if w.ndim == 2}
  gathered = {tuple(int(d) for d in dims.split(',') if d) for dims in
              re.findall(r'= \w+\[([\d,]*)\][^=]*all-gather\(', hlo)}
  assert not gathered & shapes, sorted(gathered & shapes)
  total = sum(w.size for w in sparse)
  assert max(np.prod(g) for g in gathered) < total
  for dims in re.findall(r's32\[(\d+)\][^\n]*constant\(', hlo):
    assert int(dims) < total, dims


def test_microbatches_give_the_update_of_one_batch():
  """Gradients accumulated over 2 slices of the batch: the same update."""
  results = {}
  for microbatches in (1, 2):
    config = tiny.get_config('topk')
    config.train_steps = config.schedule_steps = 3
    config.microbatches = microbatches
    config.model.num_layers = 1  # Compile time is most of this test.
    model = train.make_model(config)
    tx = optim.make(config, 3)
    state = jax.jit(functools.partial(train.init_state, config, model, tx))(
        jax.random.key(0), None)  # Jitted: op by op, it compiled 3x longer.
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx,
                                     config=config))
    tokens = jax.random.randint(jax.random.key(1), (3, 8, 17), 0,
                                config.model.vocab_size)
    losses = []
    for i in range(3):
      state, metrics = step(state, tokens[i])
      losses.append(float(metrics['loss']))
    results[microbatches] = losses, state
  np.testing.assert_allclose(results[2][0], results[1][0], rtol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4,
                                 atol=1e-6), results[2][1].params,
               results[1][1].params)
  for path, mask in sparsity.flat(results[1][1].masks).items():
    np.testing.assert_array_equal(sparsity.flat(results[2][1].masks)[path],
                                  mask, err_msg=path)


def test_evaluation_takes_the_batch_in_the_training_slices():
  """The whole batch's loss, holding one slice's activations at a time."""
  config = tiny.get_config()
  model = train.make_model(config)
  params = nn.unbox(jax.jit(model.init)(
      jax.random.key(0), jnp.zeros((1, config.seq_len), jnp.int32))['params'])
  tokens = jax.random.randint(jax.random.key(1), (16, config.seq_len + 1), 0,
                              config.model.vocab_size)
  evaluate = {m: jax.jit(functools.partial(train.eval_loss, model,
                                           microbatches=m))
              for m in (1, 4)}
  np.testing.assert_allclose(evaluate[4](params, tokens),
                             evaluate[1](params, tokens), rtol=1e-6)
  temporaries = {m: f.lower(params, tokens).compile().memory_analysis()
                 .temp_size_in_bytes for m, f in evaluate.items()}
  assert temporaries[4] < temporaries[1] / 2, temporaries


if __name__ == '__main__':
  jax.config.update('jax_num_cpu_devices', 8)
  failed = []
  for name, *args in json.loads(sys.argv[1]):
    try:
      globals()[name](*args)
    except Exception:  # pylint: disable=broad-except  Reported below.
      failed.append(name)
      print(f'{name} failed:\n{traceback.format_exc()}', file=sys.stderr)
  if failed:
    sys.exit(f'failed: {", ".join(failed)}')
