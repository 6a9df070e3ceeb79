"""Learned node pruning: the smallest set of nodes that still does a task.

Gao et al. (2025) find a task's circuit by learning a binary mask over the
model's nodes (`model.NODE_LOCATIONS` in every block: a residual channel read
after a norm, a q/k/v channel, a residual channel written by attention or the
MLP, an MLP neuron). A pruned node is mean-ablated: it carries its mean
activation over pretraining data at every token, which removes what it says
about this input without moving the network off the activations it was
trained on. Each node has a score tau in [-1, 1]; the forward pass keeps it
iff tau > 0, the backward pass uses the derivative of sigmoid(tau / T) in
place of the step's, which is zero. Training minimises task cross-entropy +
k_coef * (nodes kept), so a node survives only if the task needs it.

Where training ends depends on how the penalty balances the loss; the circuit
is set by a target loss instead: nodes are ranked by tau, and bisection finds
the smallest K whose top-K nodes alone reach `target_loss` on held-out
prompts. Each of those losses is taken after fitting a scale and a shift of
the two candidates' logit difference (16 L-BFGS steps): ablation shrinks and
offsets the logits, which says nothing about whether the circuit still tells
the answers apart.

A circuit's size is its number of edges: nonzero weights between two of its
nodes in the matrices that join nodes directly (`EDGE_WEIGHTS`).
"""

import functools
import math
import os
import time

from absl import logging
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax

from sparse_gpt2 import data
from sparse_gpt2 import model as model_lib
from sparse_gpt2 import train
from sparse_gpt2.circuits import tasks

TEMPERATURE = 0.1        # Of the sigmoid whose derivative stands in for H'.
INIT_BIAS = 0.1          # tau0 = INIT_BIAS + INIT_NOISE * N(0, 1): all kept.
INIT_NOISE = 0.01
WEIGHT_DECAY = 1e-3
CALIBRATION_STEPS = 16
HELD_OUT_FRACTION = 0.25  # Of the task's prompts, for bisection and checks.
MEAN_BATCHES = 16         # Batches of the run's training data for the means.
MAX_LISTED_EDGES = 20_000
# Weights that join two nodes of one block: (parameter, source, destination).
EDGE_WEIGHTS = (('query', 'attn_in', 'q'), ('key', 'attn_in', 'k'),
                ('value', 'attn_in', 'v'), ('attn_proj', 'v', 'attn_out'),
                ('mlp_fc', 'mlp_in', 'mlp_neuron'),
                ('mlp_proj', 'mlp_neuron', 'mlp_out'))


def hard_mask(tau, temperature=TEMPERATURE):
  """Straight-through mask: (tau > 0) forward, sigmoid(tau / T)' backward.

  Written H + (s - sg(s)) rather than sg(H - s) + s: s - sg(s) is exactly 0,
  so the forward value is exactly 0 or 1, whatever the rounding of s.
  """
  s = jax.nn.sigmoid(tau / temperature)
  return (tau > 0).astype(tau.dtype) + s - jax.lax.stop_gradient(s)


def node_means(model, params, tokens_batches):
  """Mean activation of every node over tokens [NB, B, T] (all positions).

  The values pruned nodes are frozen to; a tree like the 'node_mask' that
  `model.Block._node` reads: {'block_i': {location: [width]}}. Batches are
  equal in size, so the mean of their means is the mean over all tokens.
  """
  def batch_means(params, tokens):
    _, state = model.apply({'params': params}, tokens, mutable='node_stats')
    return jax.tree.map(lambda sown: sown[0], state['node_stats'],
                        is_leaf=lambda x: isinstance(x, tuple))

  # Jitted per call, not with the model static: a model made from a loaded
  # config may hold lists, which do not hash.
  @jax.jit
  def means(params, tokens_batches):
    return jax.tree.map(
        lambda x: x.mean(0),
        jax.lax.map(functools.partial(batch_means, params), tokens_batches))

  return means(params, tokens_batches)


def _last_logits(model, params, means, mask, batch):
  """Logits [B, V] at each prompt's last position, nodes mixed with means."""
  logits = model.apply(
      {'params': params, 'node_mask': mask, 'node_mean': means},
      batch['tokens'])
  return tasks.last_logits(logits, batch['lengths'])


def calibrated_loss(logits, correct, incorrect):
  """Task loss and accuracy after fitting a scale a > 0 and shift b.

  logits [N, V] at the last position. The difference is taken in a fixed
  token order (lower id first) and the shift added to it is a bias towards
  one token; on correct - incorrect, a shift b -> inf would reach loss 0 on
  any data. The scale is kept positive (a = exp(.)) so that ablating a
  circuit cannot score well by reversing the answers.

  Returns (loss, accuracy, a, b).
  """
  first = jnp.minimum(correct, incorrect)
  rows = jnp.arange(logits.shape[0])
  diff = logits[rows, first] - logits[rows, correct + incorrect - first]
  sign = jnp.where(correct == first, 1.0, -1.0)

  def margin(p):
    return sign * (jnp.exp(p[0]) * diff + p[1])

  def loss(p):
    return jnp.mean(jax.nn.softplus(-margin(p)))

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry, _):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad,
                                value_fn=loss)
    return (optax.apply_updates(p, updates), state), None

  p = jnp.zeros(2)
  (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), length=CALIBRATION_STEPS)
  return loss(p), jnp.mean(margin(p) > 0), jnp.exp(p[0]), p[1]


def _trim(encoded):
  """Task arrays with tokens cut to the longest prompt, rounded up to 8.

  Prompts are right-padded and attention is causal, so the padding after
  the last prompt position never changes its logits; it only costs time.
  """
  length = min(encoded['tokens'].shape[1],
               8 * math.ceil(int(encoded['lengths'].max()) / 8))
  return {'tokens': np.asarray(encoded['tokens'])[:, :length],
          **{k: np.asarray(encoded[k])
             for k in ('lengths', 'correct', 'incorrect')}}


def _split(encoded, seed):
  """(train, held_out) rows in a seeded random order; each gets >= 1."""
  n = encoded['tokens'].shape[0]
  if n < 2:
    raise ValueError(f'need at least 2 task prompts to prune, got {n}')
  order = np.random.default_rng(seed).permutation(n)
  held = min(n - 1, max(1, round(n * HELD_OUT_FRACTION)))
  return ({k: v[order[held:]] for k, v in encoded.items()},
          {k: v[order[:held]] for k, v in encoded.items()})


def _batched(rows, batch_size):
  """Rows [N, ...] -> [ceil(N / B), B, ...], the last batch wrapped around."""
  n = rows['tokens'].shape[0]
  index = np.arange(batch_size * math.ceil(n / batch_size)) % n
  return {k: v[index].reshape(-1, batch_size, *v.shape[1:])
          for k, v in rows.items()}


def _log_step(step, steps, task_loss, kept):
  logging.info('prune step %d/%d: task loss %.4f, %d nodes kept.', step,
               steps, task_loss, kept)


def _train_scores(model, params, means, train_rows, *, steps, k_coef, lr,
                  batch_size, key):
  """tau [num_nodes] after `steps` of AdamW on task loss + k_coef * kept.

  One jit: a scan over steps, each drawing its batch of task rows on device.
  """
  flat_means, unravel = ravel_pytree(means)
  tx = optax.adamw(lr, weight_decay=WEIGHT_DECAY)
  log_every = max(1, steps // 10)

  def loss_fn(tau, params, means, batch):
    mask = hard_mask(tau)
    logits = _last_logits(model, params, means, unravel(mask), batch)
    task, _ = tasks.task_loss(logits, batch['correct'], batch['incorrect'])
    return task + k_coef * mask.sum(), (task, mask.sum())

  @jax.jit
  def run(params, means, rows, key):
    init_key, key = jax.random.split(key)
    tau = INIT_BIAS + INIT_NOISE * jax.random.normal(init_key,
                                                     flat_means.shape)
    n = rows['tokens'].shape[0]

    def step(carry, xs):
      tau, opt_state = carry
      i, key = xs
      picked = jax.random.randint(key, (batch_size,), 0, n)
      batch = jax.tree.map(lambda x: x[picked], rows)
      grad, (task, kept) = jax.grad(loss_fn, has_aux=True)(
          tau, params, means, batch)
      updates, opt_state = tx.update(grad, opt_state, tau)
      tau = jnp.clip(optax.apply_updates(tau, updates), -1, 1)
      jax.lax.cond((i + 1) % log_every == 0,
                   lambda: jax.debug.callback(_log_step, i + 1, steps, task,
                                              kept),
                   lambda: None)
      return (tau, opt_state), None

    (tau, _), _ = jax.lax.scan(
        step, (tau, tx.init(tau)),
        (jnp.arange(steps), jax.random.split(key, steps)))
    return tau

  return run(params, means, train_rows, key)


def _total_edges(params, num_layers):
  """Nonzero weights of EDGE_WEIGHTS in the whole model."""
  return sum(int(np.count_nonzero(params[f'block_{layer}'][name]['kernel']))
             for layer in range(num_layers) for name, _, _ in EDGE_WEIGHTS)


def _edges(params, kept, num_layers):
  """Nonzero weights of EDGE_WEIGHTS between kept nodes.

  kept: {'block_i': {location: bool [width]}}. Returns (edges, count,
  truncated): `edges` lists at most MAX_LISTED_EDGES of the `count` edges,
  those of largest |w| when cut.
  """
  found = []  # (layer, name, src, dst, rows, cols, values) per matrix.
  for layer in range(num_layers):
    block = f'block_{layer}'
    for name, src, dst in EDGE_WEIGHTS:
      w = np.asarray(params[block][name]['kernel'])
      rows, cols = (np.flatnonzero(kept[block][src]),
                    np.flatnonzero(kept[block][dst]))
      i, j = np.nonzero(w[np.ix_(rows, cols)])
      found.append((layer, name, src, dst, rows[i], cols[j],
                    w[rows[i], cols[j]]))
  count = sum(f[4].size for f in found)
  truncated = count > MAX_LISTED_EDGES
  if truncated:
    cut = np.sort(np.abs(np.concatenate([f[6] for f in found])))[
        -MAX_LISTED_EDGES]
    found = [(*f[:4], *(x[np.abs(f[6]) >= cut] for x in f[4:]))
             for f in found]
  edges = [{'src': [layer, src, int(r)], 'dst': [layer, dst, int(c)],
            'weight': f'block_{layer}/{name}/kernel', 'value': float(v)}
           for layer, name, src, dst, rs, cs, vs in found
           for r, c, v in zip(rs, cs, vs)]
  return edges[:MAX_LISTED_EDGES], count, truncated


def prune(model, params, means, encoded, *, steps=100, k_coef=1e-4, lr=1e-2,
          batch_size=64, seed=0, target_loss=0.15):
  """The circuit of a task: the fewest nodes that keep its loss at target.

  Args:
    model: a `model.GPT2`.
    params: its parameters (unboxed).
    means: `node_means` of the model on pretraining tokens.
    encoded: task arrays as `tasks.encode` returns them: tokens [N, L]
      right-padded, lengths, correct, incorrect [N]. A quarter of the rows
      (at random) are held out for the bisection and the checks.
    steps: optimizer steps on the node scores tau.
    k_coef: penalty per kept node, added to the task cross-entropy. Larger
      values (3e-4 on a 4 x 128 model) prune nodes the task needs, and the
      bisection cannot bring them back in order: their tau all sit at -1.
    lr: AdamW learning rate of tau. The paper's 3e-3 over 100 steps (a CPU's
      budget) leaves circuits 1.5-3x larger than 1e-2 does.
    batch_size: task prompts per step.
    seed: of the split, tau's initial noise and the batches.
    target_loss: calibrated held-out task loss that the circuit must reach.

  Returns:
    The circuit, as saved to circuit.json (`find_circuit` adds 'task' and
    'run'):
      solved: whether the full model reaches target_loss. If not, nothing is
        pruned: nodes and edges are empty and the circuit's losses None.
      num_nodes, num_edges: the circuit's; total_nodes, total_edges: the
        model's (edges: nonzero weights of EDGE_WEIGHTS).
      nodes: [{'layer', 'location', 'index'}].
      edges: [{'src': [layer, location, index], 'dst': [...], 'weight':
        'block_i/NAME/kernel', 'value'}]; if there are more than
        MAX_LISTED_EDGES, those of largest |value| and `edges_truncated`.
      losses, accuracy: {'full_model', 'circuit_only', 'circuit_ablated'},
        calibrated, on the held-out prompts.
      logit_scale, logit_shift: the calibration of 'circuit_only' (see
        `calibrated_loss`).
      num_layers, layer_sizes ({location: width}), target_loss, pruning (the
        settings and data sizes), seconds (this call's wall time).
  """
  start = time.perf_counter()
  if steps < 1 or batch_size < 1:
    raise ValueError(f'steps and batch_size must be >= 1, got {steps} and '
                     f'{batch_size}')
  if not 0 < target_loss < math.log(2):
    raise ValueError(f'target_loss must be in (0, log 2), got {target_loss}')
  num_layers = len(means)
  sizes = {loc: int(means['block_0'][loc].shape[0])
           for loc in model_lib.NODE_LOCATIONS}
  flat_means, unravel = ravel_pytree(means)
  num_nodes = flat_means.size
  train_rows, held_out = _split(_trim(encoded), seed)
  held_batches = _batched(held_out, batch_size)
  correct, incorrect = held_out['correct'], held_out['incorrect']

  @jax.jit
  def evaluate(params, means, mask, batches, correct, incorrect):
    logits = jax.lax.map(
        lambda b: _last_logits(model, params, means, unravel(mask), b),
        batches)
    logits = logits.reshape(-1, logits.shape[-1])[:correct.shape[0]]
    return calibrated_loss(logits, correct, incorrect)

  def check(mask):
    loss, acc, a, b = jax.device_get(evaluate(
        params, means, jnp.asarray(mask, jnp.float32), held_batches, correct,
        incorrect))
    return float(loss), float(acc), float(a), float(b)

  full_loss, full_acc, _, _ = check(np.ones(num_nodes))
  circuit = {
      'target_loss': target_loss, 'solved': full_loss <= target_loss,
      'num_nodes': 0, 'num_edges': 0, 'total_nodes': int(num_nodes),
      'total_edges': _total_edges(params, num_layers),
      'nodes': [], 'edges': [], 'edges_truncated': False,
      'losses': {'full_model': full_loss, 'circuit_only': None,
                 'circuit_ablated': None},
      'accuracy': {'full_model': full_acc, 'circuit_only': None,
                   'circuit_ablated': None},
      'logit_scale': None, 'logit_shift': None,
      'num_layers': num_layers, 'layer_sizes': sizes,
      'pruning': {'steps': steps, 'k_coef': k_coef, 'lr': lr,
                  'batch_size': batch_size, 'seed': seed,
                  'train_prompts': int(train_rows['tokens'].shape[0]),
                  'held_out_prompts': int(held_out['tokens'].shape[0]),
                  'seq_len': int(train_rows['tokens'].shape[1])},
  }
  if not circuit['solved']:
    logging.warning('Full model loss %.4f > target %.4f: not pruning.',
                    full_loss, target_loss)
    circuit['seconds'] = time.perf_counter() - start
    return circuit

  tau = np.asarray(_train_scores(
      model, params, means, train_rows, steps=steps, k_coef=k_coef, lr=lr,
      batch_size=batch_size, key=jax.random.key(seed)))
  order = np.argsort(-tau, kind='stable')

  def top(k):
    mask = np.zeros(num_nodes, bool)
    mask[order[:k]] = True
    return mask

  lo, hi = 0, num_nodes  # loss(top(hi)) <= target; top(lo) not known to be.
  while hi - lo > 1:
    mid = (lo + hi) // 2
    loss = check(top(mid))[0]
    logging.info('bisection: %d nodes -> loss %.4f', mid, loss)
    lo, hi = (lo, mid) if loss <= target_loss else (mid, hi)
  if hi == 1 and check(top(0))[0] <= target_loss:
    hi = 0

  mask = top(hi)
  only_loss, only_acc, scale, shift = check(mask)
  ablated_loss, ablated_acc, _, _ = check(~mask)
  kept = jax.tree.map(np.asarray, unravel(mask))
  edges, count, truncated = _edges(params, kept, num_layers)
  circuit.update({
      'num_nodes': int(hi), 'num_edges': count,
      'nodes': [{'layer': layer, 'location': loc, 'index': int(i)}
                for layer in range(num_layers)
                for loc in model_lib.NODE_LOCATIONS
                for i in np.flatnonzero(kept[f'block_{layer}'][loc])],
      'edges': edges, 'edges_truncated': truncated,
      'logit_scale': scale, 'logit_shift': shift,
  })
  circuit['losses'].update(circuit_only=only_loss,
                           circuit_ablated=ablated_loss)
  circuit['accuracy'].update(circuit_only=only_acc,
                             circuit_ablated=ablated_acc)
  circuit['pruning']['kept_by_mask'] = int((tau > 0).sum())
  circuit['seconds'] = time.perf_counter() - start
  return circuit


@functools.lru_cache(maxsize=4)
def _load(workdir):
  """(config, model, params, corpus) of a run, read once per process:
  `compare` asks the same two runs about every task."""
  config, model, state = train.load_run(workdir)
  return config, model, state.params, data.load(config.data, config.seq_len)


@functools.lru_cache(maxsize=4)
def _run_means(workdir):
  """Node means of a run over MEAN_BATCHES batches of its training data."""
  config, model, params, corpus = _load(workdir)
  pretraining = np.stack([
      data.get_batch(corpus.train_tokens, i, seed=config.seed,
                     batch_size=config.batch_size,
                     seq_len=config.seq_len)[:, :-1]
      for i in range(MEAN_BATCHES)])
  return node_means(model, params, pretraining)


def find_circuit(workdir, *, task=None, task_file=None, target_loss=0.15,
                 num_examples=512, steps=100, k_coef=1e-4, lr=1e-2,
                 batch_size=64, seed=0):
  """The circuit of a built-in `task` or a JSONL `task_file` in a run.

  Node means come from MEAN_BATCHES batches of the run's training data;
  `num_examples` prompts are generated for a built-in task (a file is used
  whole). Raises ValueError for bad input: not exactly one of task and
  task_file, an unknown task, a bad file, a directory that is not a run.
  """
  if (task is None) == (task_file is None):
    raise ValueError('give exactly one of task and task_file')
  if task is not None:
    name, datapoints = task, tasks.generate(task, num_examples, seed)
  else:
    if not os.path.isfile(task_file):
      raise ValueError(f'task file {task_file} does not exist')
    name = os.path.splitext(os.path.basename(task_file))[0]
    datapoints = tasks.load_jsonl(task_file)
  config, model, params, corpus = _load(workdir)
  encoded = tasks.encode(datapoints, corpus.tokenizer, config.seq_len, name)
  circuit = prune(model, params, _run_means(workdir), encoded, steps=steps,
                  k_coef=k_coef, lr=lr, batch_size=batch_size, seed=seed,
                  target_loss=target_loss)
  return {'task': name, 'run': workdir, **circuit}


def evaluate_tasks(workdir, names, *, num_examples=256, seed=0):
  """How well the unpruned model does each task: [{task, loss, accuracy,
  calibrated_loss}]. Only tasks whose calibrated loss is under a target can
  be pruned to it, so this says which tasks a run can be asked about."""
  config, model, params, corpus = _load(workdir)
  apply = jax.jit(lambda params, tokens: model.apply({'params': params},
                                                     tokens))
  rows = []
  for name in names:
    encoded = _trim(tasks.encode(tasks.generate(name, num_examples, seed),
                                 corpus.tokenizer, config.seq_len, name))
    logits = tasks.last_logits(apply(params, encoded['tokens']),
                               encoded['lengths'])
    loss, accuracy = tasks.task_loss(logits, encoded['correct'],
                                     encoded['incorrect'])
    calibrated = calibrated_loss(logits, encoded['correct'],
                                 encoded['incorrect'])[0]
    rows.append({'task': name, 'loss': float(loss),
                 'accuracy': float(accuracy),
                 'calibrated_loss': float(calibrated)})
  return rows
