"""train_and_evaluate(config, workdir): the whole run.

One step as data: tokens [B, T+1] sharded over ('data', 'fsdp') ->
model.apply -> cross-entropy -> dense grads -> optimizer chain ([mask grads]
-> rescaled to an RMS -> AdamW -> reproject onto the masks) -> new params;
in topk mode the masks become the new support. The step is one jit with
in/out shardings and the state donated.
"""

import functools
import json
import math
import multiprocessing
import os
import signal
import time
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from sparse_gpt2 import checkpoint
from sparse_gpt2 import cli
from sparse_gpt2 import data
from sparse_gpt2 import hf
from sparse_gpt2 import metrics
from sparse_gpt2 import model as model_lib
from sparse_gpt2 import multihost
from sparse_gpt2 import optim
from sparse_gpt2 import sharding
from sparse_gpt2 import sparsity
from sparse_gpt2 import workdir as workdir_lib


class Preempted(Exception):
  """The run saved a checkpoint and stopped on a preemption notice."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  masks: Any      # The 'sparsity' collection: {} for a dense model.
  opt_state: Any


def make_model(config, platform=None):
  """The config's GPT2 for `platform` ('cpu', 'gpu', 'tpu'; default: JAX's
  backend), whose gradients on CPU are laid out for XLA:CPU
  (`model.matmul`). A run trained with cuDNN's attention, which only a GPU
  has, computes the same attention with XLA's in a process without one:
  `validate` refuses to train so, but its checkpoints are read anywhere
  (`load_run`: circuits on a laptop stopped with "cuDNN is not detected")."""
  platform = platform or jax.default_backend()
  attention = config.model.attention
  if attention == 'cudnn' and platform != 'gpu':
    attention = 'xla'
  return model_lib.GPT2(**{**config.model, 'attention': attention},
                        sparse_params=sparsity.model_pattern(config.sparsity),
                        xla_cpu_grads=platform == 'cpu')


def validate(config):
  """One-line errors for configs that cannot run, before any work."""
  model_lib.validate(config.model)
  sparsity.validate(config.sparsity)
  optim.validate(config.optim)
  # Adam's moments are kept in param_dtype (optax's default): a decay
  # within half an ulp of 1 there rounds every step's decay away, and in
  # bfloat16 b2 0.999 left the second moment where it was.
  ulp = float(jnp.finfo(config.model.param_dtype).eps)
  for field in ('b1', 'b2'):
    if not 1 - config.optim[field] >= ulp / 2:
      raise ValueError(
          f'optim.{field} {config.optim[field]} is within half an ulp of 1 '
          f'in model.param_dtype {config.model.param_dtype}, which holds '
          "Adam's moments: they would never decay; use param_dtype float32 "
          f'or {field} <= {math.floor((1 - ulp / 2) * 1e4) / 1e4}')
  if not 0 <= config.seed < 2**31:  # jax and numpy take it, and seed + 1.
    raise ValueError(f'seed must be in [0, 2**31), got {config.seed}')
  for field in ('train_steps', 'schedule_steps'):  # The step is an int32.
    if not 0 <= config[field] < 2**31:
      raise ValueError(f'{field} must be in [0, 2**31), got {config[field]}')
  for field in ('batch_size', 'seq_len', 'log_every', 'eval_every',
                'eval_batches', 'checkpoint_every', 'keep_checkpoints'):
    if config[field] < 1:
      raise ValueError(f'{field} must be >= 1, got {config[field]}')
  if config.model.attention == 'cudnn' and jax.default_backend() != 'gpu':
    raise ValueError("model.attention='cudnn' needs a GPU; this backend is "
                     f"{jax.default_backend()} (use 'auto' or 'xla')")
  for field in ('keep_every', 'peak_flops', 'num_cpu_devices'):
    if not config[field] >= 0:  # Refuses a NaN peak_flops too.
      raise ValueError(f'{field} must be >= 0, got {config[field]}')
  cli.check_cpu_devices(config.num_cpu_devices)  # `plan` starts no run.
  if config.keep_every % config.checkpoint_every:  # Only saved steps stay.
    raise ValueError(f'keep_every {config.keep_every} must be a multiple of '
                     f'checkpoint_every {config.checkpoint_every} (or 0)')
  if config.microbatches < 1 or config.batch_size % config.microbatches:
    raise ValueError(f'microbatches must be >= 1 and divide batch_size '
                     f'{config.batch_size}, got {config.microbatches}')
  if config.model.pos_embedding and config.seq_len > config.model.max_len:
    raise ValueError(f'seq_len {config.seq_len} > model.max_len '
                     f'{config.model.max_len}')


def _loss(model, params, tokens, rng=None):
  """Mean next-token cross-entropy of tokens [B, T+1]."""
  logits = model.apply({'params': params}, tokens[:, :-1],
                       deterministic=rng is None,
                       rngs=None if rng is None else {'dropout': rng})
  with jax.named_scope('loss'):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]).mean()


def init_state(config, model, tx, rng, init_params):
  """Unboxed TrainState at step 0; `init_params` (e.g. from Hugging Face)
  replaces the random weights before the masks are chosen."""
  dummy = jnp.zeros((1, config.seq_len), jnp.int32)
  variables = model.init(rng, dummy)
  params = nn.unbox(variables['params'])
  masks = nn.unbox(variables.get('sparsity', {}))
  if init_params is not None:  # In the model's param_dtype, as it trains.
    params = jax.tree.map(lambda p, x: jnp.asarray(x, p.dtype), params,
                          init_params)
  if config.sparsity.mode != 'none':
    params, masks = sparsity.init_masks(
        params, masks, config.sparsity, jax.random.fold_in(rng, 1),
        config.schedule_steps)
  return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                    masks=masks, opt_state=tx.init(params))


def _loss_and_grads(model, params, tokens, rng, microbatches):
  """Mean loss and gradients of tokens [B, T+1], accumulated over
  `microbatches` slices of B / microbatches rows, so the activations held are
  those of one slice; equal slices make the mean of their means the batch
  mean. Summed in float32 and returned in the params' dtype: summed in
  bfloat16, the mean of 8 equal slices' gradients differed from their
  gradient in 8% of the entries (configs/tiny.py in bfloat16)."""
  grad_fn = jax.value_and_grad(lambda p, t, r: _loss(model, p, t, r))
  if microbatches == 1:
    return grad_fn(params, tokens, rng)
  zeros = (jnp.zeros([], jnp.float32),
           jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
  loss, grads = _mean_over_slices(
      lambda i, t: grad_fn(params, t, jax.random.fold_in(rng, i)), zeros,
      tokens, microbatches)
  return loss, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)


def eval_loss(model, params, tokens, microbatches):
  """Mean loss of tokens [B, T+1] over the training step's slices, so that
  an evaluation holds one slice's activations, as a step does: the paper's
  0.42B config evaluated its whole 512-row batch at once in 101.9 GiB of an
  H200, against 35.6 GiB for its training steps (benchmarks/gpu.sh)."""
  if microbatches == 1:
    return _loss(model, params, tokens)
  return _mean_over_slices(lambda i, t: _loss(model, params, t),
                           jnp.zeros([], jnp.float32), tokens, microbatches)


def _mean_over_slices(fn, zeros, tokens, microbatches):
  """Mean of fn(i, slice i), a pytree shaped as `zeros`, over M =
  `microbatches` slices [B / M, T+1] of tokens [B, T+1], summed in a scan.
  Slice i holds rows i, i + M, i + 2M, ...: every device keeps its own rows,
  so slicing moves no data."""
  slices = tokens.reshape(-1, microbatches, tokens.shape[1]).swapaxes(0, 1)
  slices = nn.with_logical_constraint(slices, (None, 'batch', 'length'))

  def add(total, xs):
    return jax.tree.map(jnp.add, total, fn(*xs)), None

  total, _ = jax.lax.scan(add, zeros, (jnp.arange(microbatches), slices))
  return jax.tree.map(lambda x: x / microbatches, total)


def train_step(state, tokens, *, model, tx, config, param_shardings=None):
  """One update. `param_shardings` (the params' NamedShardings) lets the
  top-k work on each device's shard of the weights (`sparsity.topk_masks`)."""
  rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
  loss, grads = _loss_and_grads(model, state.params, tokens, rng,
                                config.microbatches)
  with jax.named_scope('optimizer'):
    updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                   masks=state.masks,
                                   shardings=param_shardings)
    params = optax.apply_updates(state.params, updates)
    grad_rms = optim.global_rms(grads)
  new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state,
      masks=sparsity.support(params, state.masks, config.sparsity))
  return new_state, {'loss': loss, 'grad_rms': grad_rms}


def evaluate(eval_step, state, val_tokens, config, batch_sharding):
  losses = [eval_step(state.params, global_batch(
      val_tokens, i, config.seed + 1, config, batch_sharding))
            for i in range(config.eval_batches)]
  return float(np.mean(jax.device_get(losses)))


def load_run(workdir, step=None):
  """(config, model, state) of a checkpoint in `workdir`, on one device: for
  analysis (circuits, export), not for training, so it changes nothing in
  the run. `step` None is the newest readable checkpoint (a damaged newer
  one is named in a warning and left where it is, for training to set
  aside); a step that was not kept, or whose files are damaged, is an
  error naming those that were kept."""
  config = workdir_lib.load_config(workdir)
  model = make_model(config)
  tx = optim.make(config, config.schedule_steps)
  abstract = jax.eval_shape(
      functools.partial(init_state, config, model, tx), jax.random.key(0),
      None)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      abstract)
  if not (workdir_lib.path(workdir) / workdir_lib.CHECKPOINTS).is_dir():
    raise ValueError(f'{workdir} holds no checkpoint')
  mngr = checkpoint.manager(workdir, config.keep_checkpoints,
                            config.keep_every, read_only=True)
  try:  # Closed either way, as orbax asks of every manager.
    if step is None:
      state = checkpoint.restore_latest(mngr, abstract, workdir,
                                        set_aside=False)
    elif step in mngr.all_steps():
      try:
        state = checkpoint.restore(mngr, step, abstract)
      except Exception as e:  # pylint: disable=broad-except  Re-raised.
        if not checkpoint.is_corrupt(e):
          raise
        raise ValueError(
            f'the checkpoint at step {step} in {workdir} is damaged '
            f'({checkpoint.first_line(e)}); pick another of '
            f'{sorted(mngr.all_steps())} (circuits: --step)') from None
    else:
      raise ValueError(f'{workdir} has no checkpoint at step {step}; it '
                       f'has {sorted(mngr.all_steps())}')
  finally:
    mngr.close()
  if state is None:
    raise ValueError(f'{workdir} holds no readable checkpoint')
  return config, model, state


def global_batch(tokens, step, seed, config, batch_sharding):
  """The batch at `step` as one global array, of which this process computes
  only the rows its own devices hold: read off the sharding, so any mesh
  works, also one whose batch-sharded axes do not follow process
  boundaries (a `model` axis across hosts needs every row on every host)."""
  shape = (config.batch_size, config.seq_len + 1)
  index = batch_sharding.addressable_devices_indices_map(shape).values()
  rows = np.unique(np.concatenate([np.arange(shape[0])[i[0]] for i in index]))
  local = data.get_batch(tokens, step, seed=seed, batch_size=shape[0],
                         seq_len=config.seq_len, rows=rows)
  position = np.zeros(shape[0], np.int64)
  position[rows] = np.arange(len(rows))
  return jax.make_array_from_callback(
      shape, batch_sharding,
      lambda i: local[position[np.arange(shape[0])[i[0]]]][:, i[1]])


def make_mesh(config, devices=None):
  """config.mesh over `devices` (default: all), refused when a microbatch
  does not split evenly over the ways the mesh splits a batch."""
  mesh = sharding.make_mesh(config.mesh, devices)
  parallel = sharding.data_parallel(mesh, config.mesh)
  if config.batch_size // config.microbatches % parallel:
    raise ValueError(f'batch_size {config.batch_size} / microbatches '
                     f'{config.microbatches} is not divisible by the '
                     f'{parallel} ways the mesh splits a batch')
  return mesh


def layout(config, model, tx, mesh, init_params=None):
  """(abstract state carrying its sharding, that sharding, the batch's
  sharding) on `mesh`; call under config.mesh's logical axis rules (and the
  mesh, unless its devices are abstract: `plan`)."""
  rng = jax.random.key(config.seed)
  abstract_state = jax.eval_shape(
      functools.partial(init_state, config, model, tx), rng, init_params)
  boxed = jax.eval_shape(model.init, rng,
                         jnp.zeros((1, config.seq_len), jnp.int32))
  state_sharding = sharding.state_shardings(boxed, abstract_state, tx, mesh)
  jax.tree_util.tree_map_with_path(_check_divides, abstract_state,
                                   state_sharding)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, state_sharding)
  return abstract_state, state_sharding, sharding.batch_sharding(mesh)


def _check_divides(path, array, array_sharding):
  """Refuses, in one line, a mesh axis that does not divide the dimension
  of a weight it splits (an odd vocabulary over `mesh.model`): the abstract
  state takes such a sharding, and only the init would fail, after the
  corpus was built and the workdir written."""
  try:
    array_sharding.shard_shape(array.shape)
  except ValueError:
    raise ValueError(
        f'the mesh {dict(array_sharding.mesh.shape)} does not divide '
        f'{jax.tree_util.keystr(path)} {array.shape} as it splits it '
        f'({array_sharding.spec}): change mesh.* or that size') from None


def jit_init(config, model, tx, state_sharding):
  """`init_state` jitted to build the state in its shards: (rng,
  init_params) -> state, never whole on one device."""
  return jax.jit(functools.partial(init_state, config, model, tx),
                 out_shardings=state_sharding)


def jit_train_step(config, model, tx, state_sharding, batch_sharding):
  """`train_step` jitted for these shardings, the state donated."""
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx, config=config,
                        param_shardings=state_sharding.params),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, None), donate_argnums=0)


def jit_eval_step(config, model):
  """`eval_loss` jitted for config's microbatches: (params, tokens) -> loss,
  sharded as its arguments are."""
  return jax.jit(functools.partial(eval_loss, model,
                                   microbatches=config.microbatches))


def programs(config, model, tx, mesh, abstract_state, state_sharding,
             batch_sharding):
  """{name: a function that lowers it} for the three programs a run
  compiles on its state, jitted as the run calls them, from shapes alone:
  the initialization, the train step and the evaluation. A run lowers the
  two steps of its own state's layout; `abstract_programs` makes them from
  a config alone. Lower under the mesh and its logical axis rules."""
  tokens = jax.ShapeDtypeStruct((config.batch_size, config.seq_len + 1),
                                jnp.int32, sharding=batch_sharding)
  rng = jax.ShapeDtypeStruct((), jax.eval_shape(jax.random.key, 0).dtype,
                             sharding=NamedSharding(mesh, P()))
  return {
      'initialization': functools.partial(
          jit_init(config, model, tx, state_sharding).lower, rng, None),
      'train step': functools.partial(
          jit_train_step(config, model, tx, state_sharding,
                         batch_sharding).lower, abstract_state, tokens),
      'evaluation': functools.partial(jit_eval_step(config, model).lower,
                                      abstract_state.params, tokens)}


def abstract_programs(config, devices=None):
  """(mesh, abstract state, `programs`) of config on `devices` (default:
  all), each model, optimizer and layout made from the config alone: what
  `plan` compiles for a target, and a run's child process
  (`start_compiling_apart`) ahead of the run. Lower under the mesh and
  config.mesh's logical axis rules."""
  mesh = make_mesh(config, devices)
  model = make_model(config, mesh.devices.flat[0].platform)
  tx = optim.make(config, config.schedule_steps)
  with nn.logical_axis_rules(sharding.rules(config.mesh)):
    # Outside the mesh: eager ops (optax's placeholders) cannot run on
    # abstract devices.
    state, state_sharding, batch_sharding = layout(config, model, tx, mesh)
  return mesh, state, programs(config, model, tx, mesh, state,
                               state_sharding, batch_sharding)


# The programs a run's loop calls on its state.
STEPS = ('train step', 'evaluation')


def compile_steps(config, cache_dir):
  """Compiles config's train and eval steps, and the checkpoint digests and
  sparsity stats of its state, from their shapes alone into the persistent
  compilation cache in `cache_dir`: what the child process of
  `start_compiling_apart` runs, in jax started afresh with glibc's default
  malloc arenas."""
  cli.start_jax(config.num_cpu_devices)
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  # Kept however fast they compile (a tiny config's do in under a second).
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  mesh, state, lowerings = abstract_programs(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(config.mesh)):
    for name in STEPS:
      lowerings[name]().compile()
    # The first save's and the first log's, which would compile in the
    # loop (~1 and 0.6 s for `sparse_small`), jitted where they are defined.
    checkpoint.digests.lower(state).compile()
    sparsity.stats.lower(state.params, state.masks).compile()


def _compile_as_child(parent, config, cache_dir):
  """`compile_steps` in `start_compiling_apart`'s child, which dies with the
  run: a run stopped by SIGTERM (a `kill`, a scheduler's time limit) left it
  compiling for minutes beside the command that resumed the run."""
  cli.die_with_parent(parent)
  compile_steps(config, cache_dir)


def start_compiling_apart(config):
  """Starts a child process that compiles config's train and eval steps into
  the persistent compilation cache, from which this process's first calls
  then load them; returns it for `finish_compiling_apart`.

  For runs that keep freed memory (`cli.keep_freed_memory`), whose threads
  share one malloc heap: compiling the train step in it strews the
  compiler's freed blocks among live ones, and every later malloc walks past
  them. `sparse_small` compiled in-process trained at ~13,000 tokens/s
  instead of ~15,000, glibc's _int_malloc 7.0% of its samples instead of
  1.1% (perf, docs/speed.md).
  """
  child = multiprocessing.get_context('spawn').Process(
      target=_compile_as_child, daemon=True,
      args=(os.getpid(), config, jax.config.jax_compilation_cache_dir))
  # Started with Ctrl-C ignored, as it stays through its exec: a terminal's
  # Ctrl-C reaches the whole process group, and the child printed its own
  # traceback beside the run's one line. It dies with the run instead.
  run_handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    child.start()
  finally:
    signal.signal(signal.SIGINT, run_handler)
  return child


def finish_compiling_apart(child):
  """Waits for `start_compiling_apart`'s child; should it fail, this process
  compiles the steps itself, as any run does without it."""
  start = time.perf_counter()
  child.join()
  if child.exitcode:
    logging.warning('Compiling the steps in a child process failed (exit '
                    'code %d); this process compiles them.', child.exitcode)
  else:
    logging.info('Steps compiled in a child process (waited %.1f s).',
                 time.perf_counter() - start)


def _hf_params(config):
  """The weights of `config.init_from_hf`, checked against the model."""
  hf_kwargs, params = hf.load(config.init_from_hf)
  hf.check_config(config.model, hf_kwargs, config.init_from_hf)
  return params


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       compile_apart: bool = False):
  """Trains (or resumes) the run in `workdir`; returns the final state.

  Everything that can refuse the run (config, workdir, mesh, data source,
  tokenizer, init_from_hf) is checked before the workdir is written, so a
  refused start leaves nothing behind for the corrected command to trip on.
  `compile_apart`: compile the train and eval steps in a child process
  (`start_compiling_apart`) while this one builds or restores the state
  and traces the steps; the child hands them over through jax's persistent
  compilation cache, which `main` keeps (`cli.keep_compiled_programs`).
  """
  validate(config)
  config = workdir_lib.check(config, workdir)
  mesh = make_mesh(config)
  # Read only for a run's first start: a resumed one needs its checkpoints,
  # not the Hugging Face folder it began from (moved, or on another machine).
  init_params = None
  if config.init_from_hf and not workdir_lib.checkpoint_steps(workdir):
    init_params = _hf_params(config)
  model = make_model(config)
  tx = optim.make(config, config.schedule_steps)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(config.mesh)):
    # Traced before the corpus is built (a first start's ~40 s, a TFDS
    # download) and the workdir written: a sparsity pattern that matches no
    # weight, or a mesh axis that does not divide a weight, refuses here.
    abstract_state, state_sharding, batch_sharding = layout(
        config, model, tx, mesh, init_params)
  corpus = multihost.process_0_first(
      lambda: data.load(config.data, config.seq_len))
  if corpus.tokenizer.get_vocab_size() > config.model.vocab_size:
    raise ValueError(f'tokenizer has {corpus.tokenizer.get_vocab_size()} '
                     f'tokens but model.vocab_size={config.model.vocab_size}')
  corpus_fingerprint = data.fingerprint(corpus)
  if not multihost.same_on_all(json.dumps(corpus_fingerprint,
                                          sort_keys=True)):
    raise ValueError('the processes read different corpora (each host '
                     'builds its own in data.data_dir where they share '
                     'none): give every host the same source, or a shared '
                     'data_dir')
  workdir_lib.check_corpus(workdir, corpus_fingerprint)
  unlock = workdir_lib.create(config, workdir, corpus_fingerprint)
  mngr = None
  try:
    mngr = checkpoint.manager(workdir, config.keep_checkpoints,
                              config.keep_every)
    # After every refusal (a refused run's exit would kill the child, perhaps
    # in the middle of writing a cache entry, which jax would then never
    # rewrite), and not for a run already at its end.
    compiling = (start_compiling_apart(config)
                 if compile_apart and jax.process_count() == 1
                 and (mngr.latest_step() or 0) < config.train_steps else None)
    rng = jax.random.key(config.seed)
    with jax.set_mesh(mesh), nn.logical_axis_rules(
        sharding.rules(config.mesh)):
      state = checkpoint.restore_latest(mngr, abstract_state, workdir)
      restored = state is not None
      if not restored:
        if config.init_from_hf and init_params is None:  # All were corrupt.
          init_params = _hf_params(config)
        state = jit_init(config, model, tx, state_sharding)(rng, init_params)
      # Steps to train, or a last step saved but never evaluated.
      steps_left = int(state.step) < config.train_steps
      work_left = steps_left or not _evaluated(workdir, int(state.step))
      if restored and not work_left:  # A finished run, rerun: no event
        # file, no timed peak, nothing compiled or saved.
        logging.info('Already at step %d of %d: nothing to train.',
                     int(state.step), config.train_steps)
        return state
      if restored:
        logging.info('Resumed from step %d.', int(state.step))
      step_fn = eval_step = None  # None compiled where no step is left.
      if work_left:
        # Traced and lowered here, while a child compiles them; then
        # compiled, or loaded from the cache the child filled.
        # A last step saved but never evaluated needs the evaluation only
        # (a preempted run's rerun): its train step is not traced at all.
        needed = STEPS if steps_left else ('evaluation',)
        lowerings = programs(config, model, tx, mesh, abstract_state,
                             state_sharding, batch_sharding)
        lowered = {name: lowerings[name]() for name in needed}
        if compiling:
          finish_compiling_apart(compiling)
        compiled = {name: steps.compile() for name, steps in lowered.items()}
        step_fn, eval_step = (compiled.get(name) for name in STEPS)
      return _train_loop(config, workdir, state, step_fn, eval_step,
                         batch_sharding, corpus, mngr)
  finally:
    if mngr is not None:
      mngr.close()  # Waits for the last async save; also after a refusal.
    unlock()  # After the last save: another start may take the run now.


def _evaluated(workdir, step):
  """Whether the run's step `step` has a validation loss, as its last step
  needs (`compare` pairs checkpoints by it): one preempted, or stopped after
  a save, at a step that evaluates nothing has none, and a rerun whose
  train_steps ends there evaluates it. Step 0, a run of no training, needs
  none."""
  return step == 0 or any(r['step'] == step and 'val_loss' in r
                          for r in workdir_lib.read_metrics(workdir))


def _train_loop(config, workdir, state, step_fn, eval_step, batch_sharding,
                corpus, mngr):
  """Steps, logs, evaluates and saves until config.train_steps, or until
  a preemption notice, after saving (raises Preempted).

  A log that neither evaluates nor saves is written once the next step is
  queued, so that the devices do not wait while the host checks, formats
  and writes it (~17 ms at each of `sparse_small`'s 100 logs, where it was
  written before the next step was queued); one that evaluates or saves
  waits for its step, as the evaluation and the save must."""
  run_start = time.perf_counter()

  lr_fn = jax.jit(optim.learning_rate(config, config.schedule_steps))

  tokens_per_step = config.batch_size * config.seq_len
  flops = metrics.flops_per_token(config.model, config.seq_len)
  start_step = int(state.step)
  peak = config.peak_flops
  if not peak and start_step < config.train_steps:  # Else no step to time:
    # an evaluate-only rerun, or a run of 0 steps (`convert --from_hf`),
    # timed 5 matmuls of 2048^3 for nothing.
    jax.block_until_ready(state)  # The peak is timed on idle devices.
    peak = metrics.peak_flops(config.model.dtype)
  pending = []  # (step, device metrics) since the last log.
  # A checkpoint is good once a later step read its weights to a finite
  # loss: step s's loss is of the weights saved at s - 1.
  last_good = None
  unchecked = start_step if mngr.latest_step() is not None else None
  t0, t0_step = time.perf_counter(), start_step
  unwritten = None  # A log's `record` arguments, once the next step is queued.

  def record(done, since_log, stats, lr):
    """(the log's record, when its step had run), its steps checked."""
    nonlocal last_good, unchecked
    since_log, stats, lr = jax.device_get((since_log, stats, lr))
    ran = time.perf_counter()
    for s, m in since_log:
      for key in ('loss', 'grad_rms'):  # A NaN gradient has a NaN RMS.
        if not math.isfinite(m[key]):
          mngr.wait_until_finished()
          raise FloatingPointError(
              f'non-finite {key} {m[key]} at step {s}; stopped, ' + (
                  f'the last good checkpoint is step {last_good} in '
                  f'{workdir}' if last_good is not None else
                  f'before any good checkpoint of {workdir}') + (
                      f' (step {unchecked}\'s holds the weights that gave '
                      'it)' if unchecked is not None else ''))
      if unchecked is not None and s > unchecked:
        last_good, unchecked = unchecked, None
    rate = (done - t0_step) * tokens_per_step / (ran - t0)
    return {
        'loss': since_log[-1][1]['loss'],
        'grad_rms': since_log[-1][1]['grad_rms'],
        'lr': float(lr), 'tokens_per_s': rate, 'l0': int(stats['l0']),
        'density': float(stats['density']),
        'l0_per_tensor': {k: int(v) for k, v in
                          stats['l0_per_tensor'].items()}}, ran

  def write(done, values):
    values['mfu'] = values['tokens_per_s'] * flops / peak
    peak_memory = metrics.peak_memory_bytes()
    if peak_memory is not None:
      values['peak_memory_gib'] = peak_memory / 2**30
    writer.write(done, values)
    metrics.console_line(done, config.train_steps, values,
                         (config.train_steps - done) * tokens_per_step
                         / max(values['tokens_per_s'], 1e-9))

  writer = metrics.Writer(workdir, start_step)
  try:  # Closed however the run stops (Preempted, FloatingPointError):
    # a Python caller kept its thread and its open event file.
    if start_step == config.train_steps and eval_step is not None:
      val_loss = evaluate(eval_step, state, corpus.val_tokens, config,
                          batch_sharding)
      writer.write(start_step, {'val_loss': val_loss})
      logging.info('step %d/%d | val %.4f', start_step, config.train_steps,
                   val_loss)
    elif start_step < config.train_steps:
      # First calls compiled, or loaded, before the clock starts: the first
      # log's tokens/s read 922 where the next ones read 29,000 (tiny).
      jax.block_until_ready((sparsity.stats(state.params, state.masks),
                             lr_fn(start_step)))
      t0 = time.perf_counter()
    for step in range(start_step, config.train_steps):
      state, step_metrics = step_fn(state, global_batch(
          corpus.train_tokens, step, config.seed, config, batch_sharding))
      if unwritten:  # While the step just queued runs.
        values, ran = record(*unwritten)
        write(unwritten[0], values)
        t0, t0_step, unwritten = ran, unwritten[0], None
      pending.append((step + 1, step_metrics))
      done = step + 1
      is_last = done == config.train_steps
      preempted = mngr.reached_preemption(done)  # The same on every process.
      do_eval = done % config.eval_every == 0 or is_last
      do_save = done % config.checkpoint_every == 0 or is_last or preempted
      if done % config.log_every and not (do_eval or do_save):
        if step == start_step:  # The first log times the steps after this.
          # Its first run, however compiled or loaded, is slower: 180 ms
          # where the next took 6 (tiny), its first log read 6,877 tokens/s
          # where the next read 40,000. Waited for once, before the next is
          # queued; a first log at the first step times that step.
          jax.block_until_ready(step_metrics)
          t0, t0_step = time.perf_counter(), done
        continue
      # What the log reads of the devices, queued behind its step and before
      # the next, which the state is donated to.
      log = (done, pending, sparsity.stats(state.params, state.masks),
             lr_fn(done - 1))
      pending = []
      if not (do_eval or do_save):
        unwritten = log
        continue

      values, _ = record(*log)
      if do_eval:
        values['val_loss'] = evaluate(eval_step, state, corpus.val_tokens,
                                      config, batch_sharding)
        if not config.peak_flops:  # One more matmul, on idle devices.
          peak = metrics.peak_flops(config.model.dtype, peak, repeats=1)
      write(done, values)
      if do_save:
        checkpoint.save(mngr, done, state)
        unchecked = done
      # The next interval starts here, so that tokens/s and MFU time training
      # alone, not this log's evaluation, save or first-call compiles (an
      # H200 run's interval after its first log read 28% below the others).
      t0, t0_step = time.perf_counter(), done
      if preempted and not is_last:  # The caller closes the manager, which
        # ends the save; at its last step the run has ended anyway.
        raise Preempted(f'preempted at step {done}; saved a checkpoint there, '
                        'rerun the same command to resume')

    mngr.wait_until_finished()
    if config.train_steps == start_step and mngr.latest_step() is None:
      checkpoint.save(mngr, start_step, state)  # A run of 0 steps: the init.
      mngr.wait_until_finished()
    logging.info('Done: %d steps in %.1f s.', config.train_steps - start_step,
                 time.perf_counter() - run_start)
    return state
  finally:
    writer.close()
