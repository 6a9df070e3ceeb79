"""Learned node pruning: the smallest set of nodes that still does a task.

Gao et al. (2025) find a task's circuit by learning a binary mask over the
model's nodes (`model.NODE_LOCATIONS` in every block: a residual channel read
after a norm, a q/k/v channel, a residual channel written by attention or the
MLP, an MLP neuron). A pruned node is mean-ablated: it carries its mean
activation over pretraining data at every token, which removes what it says
about this input without moving the network off the activations it was
trained on. Each node has a score tau in [-1, 1]; the forward pass keeps it
iff tau > 0, the backward pass uses the derivative of sigmoid(tau / T) in
place of the step's, which is zero. Training minimises lam * task
cross-entropy + k_coef * (nodes kept) over contrastive pairs (a prompt and a
minimally different one with the other answer, always in the same batch),
with AdamW (b2 0.95), gradients clipped by RMS and a linear warmup, as the
paper does; lam is a multiplier that holds the train loss at the target
(the paper's weight is fixed), so the mask converges to the fewest nodes
that reach it; a run whose mask is still shrinking at its end goes on
(`run_length`), so a task slower to prune than those the defaults were
measured on still gets a settled circuit.

A task's pairs are split three ways, disjointly: `train` fits the scores,
`select` chooses the circuit among the masks of the run's second half
(and, where none reaches the target, among its first half's or how far to
extend the last one), `test` is untouched until the losses that are
reported. Each select and test loss is
taken after fitting a scale and a shift of the two candidates' logit
difference (16 L-BFGS steps): ablation shrinks and offsets the logits, which
says nothing about whether the circuit still tells the answers apart.
"""

import collections
import dataclasses
import itertools
import math
import time

from absl import logging
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax

from sparse_gpt2 import model as model_lib
from sparse_gpt2.circuits import edges as edges_lib
from sparse_gpt2.circuits import tasks

CALIBRATION_STEPS = 16
NUM_BUCKETS = 4            # Prompt-length buckets of each split.
ESTIMATE_PROMPTS = 256     # Train prompts of the tie-breaking gradient
                           # (fewer where they exceed MAX_PASS_TOKENS).
MAX_PASS_TOKENS = 2 ** 16  # Padded tokens in a pass that scores a split or
                           # takes that gradient.
DUAL_GAIN = 200.0          # Proportional gain / dual_lr on the smoothed
DUAL_DECAY = 0.9           # excess loss, its EMA's decay, and the clip of
DUAL_CLIP = 0.2            # each step's excess in it.
SNAPSHOT_EVERY = 100       # Steps between the masks a circuit is chosen from.
MAX_ABLATED_NODES = 64     # Circuit nodes whose own ablation is measured.
SETTLED_FRACTION = 0.1     # See `still_shrinking`.
MIN_SPLIT_PAIRS = 8        # Pairs in each of the select and test splits,
MIN_SPLIT_PROMPTS = 16     # and prompts: a model at chance read calibrated
                           # loss <= 0.5 on 8 unpaired prompts in 7.2% of
                           # 400 draws, on 8 pairs in none.
# Of the algorithm, saved in circuit.json: bumped by a change that gives
# other circuits for the same settings, or other fields in circuit.json, so
# `compare` re-prunes saved ones rather than read what they lack.
VERSION = 11               # 2: the smallest late mask (`circuit_of_run`);
                           # 3: the multiplier's proportional term;
                           # 4: its integral falls as fast as it rises;
                           # 5: a run still shrinking goes on (`run_length`);
                           # 6: `settled` (the same circuits as 5);
                           # 7: a group's prompts weigh one each, groups
                           #    sharing a prompt are one (built-in tasks:
                           #    the same circuits as 6, but for
                           #    while_return_true's 509 groups, not 512);
                           # 8: where no late mask reaches, an earlier one
                           #    that does, if smaller than the extension;
                           # 9: groups bucketed by size, leaning splits
                           #    dealt in turns, preferences per pair of
                           #    candidates (built-in tasks: the same splits
                           #    and buckets as 8, but for
                           #    while_return_true's groups of four);
                           # 10: the tie-breaking gradient's prompts taken
                           #    in turns of their answers where the first
                           #    ones lean (built-in tasks: the same
                           #    prompts as 9).
                           # 11: where a split is dealt in turns, a lean's
                           #    surplus after the groups that lean neither
                           #    way (built-in tasks: the same splits and
                           #    prompts as 10).


def hard_mask(tau, temperature):
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
        jax.lax.map(lambda t: batch_means(params, t), tokens_batches))

  return means(params, tokens_batches)


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


def multiplier(dual, dual_lr):
  """lam of the multiplier state `dual` (see `update_multiplier`). The
  proportional gain is DUAL_GAIN * dual_lr, so dual_lr 0 keeps lam at 1 (the
  paper's fixed objective) and a faster integral gets as much more damping.
  """
  return jnp.exp(dual['log_integral']
                 + DUAL_GAIN * dual_lr * dual['excess_ema'])


def update_multiplier(dual, excess, dual_lr):
  """One step of log lam's PI controller on excess = train loss - target:
  the integral moves by dual_lr * excess; the proportional term follows an
  EMA of the excess clipped to DUAL_CLIP.
  """
  return {
      'log_integral': dual['log_integral'] + dual_lr * excess,
      'excess_ema': DUAL_DECAY * dual['excess_ema'] + (1 - DUAL_DECAY)
                    * jnp.clip(excess, -DUAL_CLIP, DUAL_CLIP)}


def _padded_length(lengths, seq_len):
  """Tokens of a pass of prompts of `lengths`: the longest, rounded up to
  8, at most seq_len."""
  return min(seq_len, 8 * math.ceil(int(np.max(lengths)) / 8))


def trim(encoded):
  """Task arrays with tokens cut to the longest prompt, rounded up to 8.

  Prompts are right-padded and attention is causal, so the padding after
  the last prompt position never changes its logits; it only costs time.
  """
  length = _padded_length(encoded['lengths'], encoded['tokens'].shape[1])
  return {'tokens': np.asarray(encoded['tokens'])[:, :length],
          **{k: np.asarray(v) for k, v in encoded.items() if k != 'tokens'}}


def _split_sizes(num_groups, settings):
  """(train, select, test) pair counts of `split`, and whether they are
  enough: 1 to train on, MIN_SPLIT_PAIRS to select and to test."""
  n_select = round(num_groups * settings.select_fraction)
  n_test = round(num_groups * settings.test_fraction)
  sizes = num_groups - n_select - n_test, n_select, n_test
  return sizes, sizes[0] >= 1 and min(n_select, n_test) >= MIN_SPLIT_PAIRS


def count_pairs(num_groups):
  """A task's prompts as its errors count them: by the groups `split` keeps
  whole, which most tasks make pairs."""
  return (f'{num_groups} prompt pair{"" if num_groups == 1 else "s"} (a '
          'group of any size, or an unpaired prompt, counts one)')


def split(encoded, settings):
  """(train, select, test): disjoint rows, whole pairs in one split each,
  in a seeded random order of the pairs.

  The select split fits the calibration's scale and shift and decides the
  circuit's size, and the test split reports its losses, both calibrated:
  on a pair or two a model at chance passes a calibrated target by luck
  (the scale grows until any ordering of two prompts reads as separated),
  and a split whose answers lean one way is scored by the shift alone. So
  each needs MIN_SPLIT_PAIRS pairs, MIN_SPLIT_PROMPTS prompts and the
  task's answer balance (`tasks.check_balanced`). A task file whose groups
  each lean one way (unpaired prompts) is balanced as a whole but not
  necessarily in the seeded order's splits; where those lean past the
  bound, the groups are dealt in turns instead (`_dealt_in_turns`), so
  every split that the seeded order balances stays as it was.
  """
  groups = np.unique(encoded['pair'])
  sizes, enough = _split_sizes(len(groups), settings)
  if not enough:  # From the count below which a split rounds short.
    fewest = (MIN_SPLIT_PAIRS - 0.5) / min(settings.select_fraction,
                                           settings.test_fraction)
    needed = next(n for n in itertools.count(max(len(groups) + 1,
                                                 math.floor(fewest) - 1))
                  if _split_sizes(n, settings)[1])
    raise ValueError(
        f'{count_pairs(len(groups))} split {sizes[0]}/{sizes[1]}/{sizes[2]} '
        f'into train/select/test, which needs at least 1/{MIN_SPLIT_PAIRS}/'
        f'{MIN_SPLIT_PAIRS}: give the task at least {needed} pairs')
  groups = np.random.default_rng(settings.seed).permutation(groups)
  splits = _rows_of(encoded, np.split(groups, np.cumsum(sizes[:2])))
  if not all(map(_balanced, splits[1:])):
    splits = _rows_of(encoded, _dealt_in_turns(encoded, groups, sizes))
  for name, rows in zip(('select', 'test'), splits[1:]):
    if len(rows['pair']) < MIN_SPLIT_PROMPTS:
      raise ValueError(
          f'its {name} split holds {len(rows["pair"])} prompts '
          f'({count_pairs(sizes[1 + (name == "test")])}), and a calibrated '
          f'loss needs at least {MIN_SPLIT_PROMPTS}: give the task more '
          'prompts (contrastive pairs count two each)')
    tasks.check_balanced(rows, f'its {name} split')
  return splits


def _rows_of(encoded, parts):
  return tuple({k: v[np.isin(encoded['pair'], part)]
                for k, v in encoded.items()} for part in parts)


def _balanced(rows):
  return tasks.fixed_preference(rows) <= tasks.MAX_FIXED_PREFERENCE


def _dealt_in_turns(encoded, groups, sizes):
  """`groups` (in their seeded order) cut into train/select/test of `sizes`
  so that select and test lean as little as the groups allow: the split
  where the seeded order alone leaves select or test leaning, as a task
  file's unpaired prompts, or groups of one answer, can. Select and test
  are the first groups of `_in_turns`: each holds as many groups of either
  lean of a pair as the other, to one, and train takes the rest, and with
  it a lean's surplus."""
  select, test, train = np.split(_in_turns(encoded, groups),
                                 np.cumsum([sizes[1], sizes[2]]))
  return train, select, test


def _in_turns(encoded, groups):
  """`groups` reordered so that any first ones lean as little as the
  groups allow. Each group is classed by its pair of candidates (or as
  mixed) and its lean (whether more of its prompts answer with the
  lower-id candidate, fewer, or as many). The pairs of candidates take
  turns, each keeping the order of `groups` within a class: in a turn, a
  pair of candidates gives a group of each of its leans, one after
  another, while it has groups of both leans; once one lean is spent, a
  group that leans neither way; and only when every pair of candidates
  has given all of those, the surplus of the other lean, a group a turn.
  (Taking the surplus in turns with the groups that lean neither way put
  it in select and test while train kept pairs that would have balanced
  them: 40 pairs and 16 unpaired prompts of one answer, within the bound
  as a whole, were refused for a select split that leaned 67%.)"""
  ids, low_right = tasks.candidate_pairs(encoded)
  lean = np.sign(np.bincount(encoded['pair'],
                             weights=np.where(low_right, 1, -1)))
  classes = {}  # (pair of candidates or -1, lean) -> groups, in order.
  first = {}  # Pair of candidates -> its turn, in the order of `groups`.
  for group in groups:
    candidates = np.unique(ids[encoded['pair'] == group])
    key = int(candidates[0]) if len(candidates) == 1 else -1
    first.setdefault(key, len(first))
    classes.setdefault((key, int(lean[group])), []).append(group)
  balanced, surplus = [], []  # Per pair of candidates: its turns.
  for key in sorted(first, key=first.get):
    low, even, high = (collections.deque(classes.get((key, side), []))
                       for side in (-1, 0, 1))
    turns = []
    while low and high:
      turns.append([low.popleft(), *([even.popleft()] if even else []),
                    high.popleft()])
    turns += [[group] for group in even]
    balanced.append(turns)
    surplus.append([[group] for group in (*low, *high)])
  order = []
  for phase in (balanced, surplus):
    for turn in itertools.zip_longest(*phase, fillvalue=[]):
      order.extend(itertools.chain.from_iterable(turn))
  return np.array(order, groups.dtype)


def length_buckets(rows, num_buckets, by_pair):
  """Rows cut into groups of similar prompt length, each trimmed to its own
  longest prompt: most prompts are far shorter than the longest, and a
  forward pass costs what its padded length costs.

  by_pair: whole groups of one size each, as `pairs` [G, M], the row
  indices (within the bucket) of its G groups of M prompts, so a batch of
  groups is a gather; each size gets its share of `num_buckets` by its
  prompts (at least one), so a task of pairs gets `num_buckets`. (A bucket
  of groups of any size, the smaller repeating rows to fill the largest,
  let one group of 40 among 200 pairs cut its bucket's steps, a quarter of
  them, to one pair.)

  Otherwise rows cut by length into `num_buckets`, or, where one of those
  would exceed MAX_PASS_TOKENS padded tokens, into as many as fill it:
  each is scored in one forward pass, and a task file may be of any
  size.
  """
  if by_pair:
    groups = [np.flatnonzero(rows['pair'] == g)
              for g in np.unique(rows['pair'])]
    sizes = np.array([len(g) for g in groups])
    parts = []
    for size in np.unique(sizes):
      members = np.flatnonzero(sizes == size)
      share = max(1, round(num_buckets * size * len(members) / sizes.sum()))
      order = members[np.argsort(
          [rows['lengths'][groups[i]].max() for i in members], kind='stable')]
      parts += [[groups[i] for i in part]
                for part in np.array_split(order, min(share, len(members)))]
  else:
    order = np.argsort(rows['lengths'], kind='stable')
    parts = np.array_split(order, min(num_buckets, len(order)))
    seq_len = rows['tokens'].shape[1]
    if any(len(p) * _padded_length(rows['lengths'][p], seq_len)
           > MAX_PASS_TOKENS for p in parts):
      parts = _filled_passes(order, rows['lengths'], seq_len)
  buckets = []
  for part in parts:
    if by_pair:
      part = np.stack(part)  # [G, M]
    index, inverse = np.unique(part, return_inverse=True)
    bucket = trim({k: v[index] for k, v in rows.items() if k != 'pair'})
    if by_pair:
      bucket['pairs'] = inverse.reshape(part.shape)
    buckets.append(bucket)
  return buckets


def _filled_passes(order, lengths, seq_len):
  """`order` (rows by increasing length) cut into runs, each as long as fits
  in MAX_PASS_TOKENS padded tokens (a prompt longer than that alone)."""
  parts, start = [], 0
  for end in range(1, len(order)):
    if (end + 1 - start) * _padded_length(lengths[order[end]],
                                          seq_len) > MAX_PASS_TOKENS:
      parts.append(order[start:end])
      start = end
  return parts + [order[start:]]


def scored(buckets, last_logits):
  """(logits [N, V], correct [N], incorrect [N]) of the rows of `buckets`
  (`length_buckets`, not by pair), one forward pass `last_logits(bucket)`
  each."""
  return (jnp.concatenate([last_logits(b) for b in buckets]),
          *(np.concatenate([b[k] for b in buckets])
            for k in ('correct', 'incorrect')))


def _last_logits(model, params, means, mask, batch):
  """Logits [B, V] at each prompt's last position, nodes mixed with means."""
  return model.apply(
      {'params': params, 'node_mask': mask, 'node_mean': means},
      batch['tokens'], positions=batch['lengths'] - 1)


class _Pruner:
  """The jitted pieces of one pruning, sharing the model, its weights, the
  node means and the task's splits."""

  def __init__(self, model, params, means, splits, settings):
    # Every batch's rows are split over the devices (the circuits CLIs cut
    # the CPU into --num_cpu_devices), the rest is replicated: on one CPU
    # device a 2-core machine sat idle for much of a step. Uneven splits
    # are padded by XLA, so any batch fits.
    mesh = jax.sharding.Mesh(jax.devices(), ('data',))
    self.rows = jax.sharding.NamedSharding(mesh,
                                           jax.sharding.PartitionSpec('data'))
    self.replicated = jax.sharding.NamedSharding(mesh,
                                                 jax.sharding.PartitionSpec())
    self.model = model
    # Arguments of every jitted piece, not constants in it: the program is
    # then the same for every checkpoint of one architecture, so a task's
    # pruning compiles once for both twins and for a curve's every point
    # (the circuits CLIs keep compiled programs on disk,
    # `settings.start_jax`).
    self.weights = jax.device_put((params, means), self.replicated)
    self.settings = settings
    flat, self.unravel = ravel_pytree(means)
    self.num_nodes = flat.size
    self.train, self.select, self.test = splits
    self.train_buckets = length_buckets(self.train, NUM_BUCKETS,
                                        by_pair=True)
    self.eval_buckets = {
        name: length_buckets(rows, NUM_BUCKETS, by_pair=False)
        for name, rows in (('select', self.select), ('test', self.test))}
    s = settings
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, s.lr, s.warmup_steps),
         optax.constant_schedule(s.lr)], [s.warmup_steps])
    self.tx = optax.chain(
        optax.clip_by_global_norm(s.grad_rms * math.sqrt(self.num_nodes)),
        optax.adamw(schedule, b1=s.b1, b2=s.b2, eps=s.eps,
                    weight_decay=s.weight_decay))
    self._segment = jax.jit(self._train_segment, static_argnames='length')
    # Its arguments placed whole on each device, the rows split inside:
    # left to XLA, a bucket of fewer rows than devices was given an
    # input split jax cannot name (4 rows on 8: IndivisibleError).
    self._logits = jax.jit(self._bucket_logits,
                           in_shardings=self.replicated)
    self._evaluate = jax.jit(self._losses)
    self._importance = jax.jit(jax.grad(self._task_loss, argnums=1))
    self._select_loss = {}  # Mask bytes -> calibrated loss on select.

  def _task_loss(self, weights, mask, batch):
    logits = _last_logits(self.model, *weights, self.unravel(mask), batch)
    return tasks.task_loss(logits, batch['correct'], batch['incorrect'])[0]

  def init_scores(self, key):
    """(tau [num_nodes], optimizer state, multiplier state)."""
    s = self.settings
    tau = s.init_bias + s.init_noise * jax.random.normal(key,
                                                         (self.num_nodes,))
    # Placed as the segments return them, or the second segment compiles
    # again (a jit is specialised on where its arguments live).
    return jax.device_put((tau, self.tx.init(tau),
                           {'log_integral': jnp.zeros(()),
                            'excess_ema': jnp.zeros(())}), self.replicated)

  def _train_segment(self, weights, tau, opt_state, dual, first_step, key,
                     buckets, *, length):
    """`length` steps of the scores from step `first_step`. Each step draws
    a length bucket (in proportion to its prompts) and batch_pairs pairs
    from it (of groups of another size, as many as make as many rows);
    `lax.switch` runs only that bucket's shapes.

    The loss is lam * task + k_coef * nodes kept: a Lagrange multiplier lam
    (from 1, the paper's objective) that holds the train loss at the
    target, so the mask itself converges to the smallest set that reaches
    it. log lam is a PI controller on excess = task - target_loss:
    - the integral moves by dual_lr * excess a step, as fast down as up,
      so it balances with the mean train loss at the target.
    - the proportional term, DUAL_GAIN * dual_lr (10) * an EMA of the
      clipped excess, damps the loop. The mask follows lam with a delay of
      ~100 steps (a score moves at most lr a step across [-1, 1]), so the
      integral alone overshot both ways: sparse for_while swung 76 -> 45
      (chance) -> 156 -> 71 nodes with a period of ~2000 steps, and its
      2000- and 3000-step circuits differed by 64%.
    Without the term, an integral falling as fast as it rose had wound up
    below its balance (sparse for_while pruned to 54 nodes at chance), so
    it fell at a fifth of the rate. With the term that asymmetry only held
    the train loss under the target (0.36-0.46 for 0.5: it balances where
    the batches above the target weigh five times those below) and left
    the mask shrinking past 2000 steps (dense if_equals: 257, 249, 236
    nodes at 1000, 2000, 3000). Symmetric, the train loss reaches the
    target by step ~500 and the same mask holds 196-207 nodes from step
    1100 to 3000.
    With a fixed weight instead, the mask settles wherever k_coef puts it
    (train loss 0.05 with 335 nodes where ~100 suffice), and a task each
    node carries only thinly (a dense model) is traded away above the
    target. The task loss is uncalibrated: a scale learned with the scores
    would let it go to zero on any separable batch.
    """
    s = self.settings
    sizes = jnp.array([b['pairs'].size for b in buckets])  # Prompts.

    def loss_fn(tau, lam, batch):
      mask = hard_mask(tau, s.temperature)
      task = self._task_loss(weights, mask, batch)
      return lam * task + s.k_coef * mask.sum(), task

    def bucket_grad(bucket, tau, lam, key):
      # As many groups as make 2 * batch_pairs rows: batch_pairs pairs, a
      # third as many groups of six, a group of 100 alone.
      groups, width = bucket['pairs'].shape
      picked = jax.random.randint(
          key, (max(1, round(2 * s.batch_pairs / width)),), 0, groups)
      rows = bucket['pairs'][picked].reshape(-1)
      batch = {k: v[rows] for k, v in bucket.items() if k != 'pairs'}
      batch = jax.lax.with_sharding_constraint(batch, self.rows)
      return jax.grad(loss_fn, has_aux=True)(tau, lam, batch)

    def step(carry, i):
      tau, opt_state, dual = carry
      bucket_key, pick_key = jax.random.split(jax.random.fold_in(key, i))
      which = jax.random.choice(bucket_key, len(buckets), p=sizes / sizes.sum())
      grad, task = jax.lax.switch(
          which, [lambda *a, b=b: bucket_grad(b, *a) for b in buckets],
          tau, multiplier(dual, s.dual_lr), pick_key)
      updates, opt_state = self.tx.update(grad, opt_state, tau)
      tau = jnp.clip(optax.apply_updates(tau, updates), -1, 1)
      dual = update_multiplier(dual, task - s.target_loss, s.dual_lr)
      return (tau, opt_state, dual), task

    (tau, opt_state, dual), task = jax.lax.scan(
        step, (tau, opt_state, dual), first_step + jnp.arange(length))
    return tau, opt_state, dual, task.mean()

  def train_scores(self, key, stride, until):
    """{steps: tau [num_nodes]} after every `stride` steps of one run, which
    goes on until `until(recorded)`: how long a run needs can depend on its
    scores (`run_length`)."""
    init_key, key = jax.random.split(key)
    tau, opt_state, dual = self.init_scores(init_key)
    recorded, done = {}, 0
    while not until(recorded):
      tau, opt_state, dual, task = self._segment(
          self.weights, tau, opt_state, dual, done, key,
          self.train_buckets, length=stride)
      done += stride
      recorded[done] = np.asarray(tau)
      logging.info('prune step %d: train task loss %.4f, multiplier %.3g, '
                   '%d nodes kept.', done, float(task),
                   float(multiplier(dual, self.settings.dual_lr)),
                   int((recorded[done] > 0).sum()))
    return recorded

  def _bucket_logits(self, weights, mask, bucket):
    return _last_logits(self.model, *weights, self.unravel(mask),
                        jax.lax.with_sharding_constraint(bucket, self.rows))

  def _losses(self, logits, correct, incorrect):
    raw, raw_acc = tasks.task_loss(logits, correct, incorrect)
    return (raw, raw_acc, *calibrated_loss(logits, correct, incorrect))

  def evaluate(self, mask, split_name):
    """{loss, accuracy, raw_loss, raw_accuracy, scale, shift} of the model
    with the nodes outside `mask` [num_nodes] bool ablated, on a split."""
    mask = jnp.asarray(mask, jnp.float32)
    values = jax.device_get(self._evaluate(*scored(
        self.eval_buckets[split_name],
        lambda bucket: self._logits(self.weights, mask, bucket))))
    return dict(zip(('raw_loss', 'raw_accuracy', 'loss', 'accuracy', 'scale',
                     'shift'), map(float, values)))

  def importance(self, kept):
    """Estimated loss decrease from keeping each node, [num_nodes]: minus
    the gradient of the train loss in the mask at `kept` (a first-order
    estimate of restoring a pruned node, or of ablating a kept one), on
    the train prompts of `_estimate_rows`."""
    batch = trim({k: v[self._estimate_rows()]
                  for k, v in self.train.items() if k != 'pair'})
    return -np.asarray(self._importance(
        self.weights, jnp.asarray(kept, jnp.float32), batch))

  def _estimate_rows(self):
    """The first ESTIMATE_PROMPTS train rows (fewer where they exceed
    MAX_PASS_TOKENS), in the task's order where they are balanced, as a
    built-in task's pairs are; else its groups' rows `_in_turns`. A task
    file written one answer after the other gave a gradient of prompts of
    one answer: of what favours it, not of what tells the two apart."""
    def first(rows):
      longest = _padded_length(self.train['lengths'][rows[:ESTIMATE_PROMPTS]],
                               self.train['tokens'].shape[1])
      return rows[:min(ESTIMATE_PROMPTS, max(1, MAX_PASS_TOKENS // longest))]

    pair = self.train['pair']
    rows = first(np.arange(len(pair)))
    if _balanced({k: v[rows] for k, v in self.train.items()}):
      return rows
    groups = pair[np.sort(np.unique(pair, return_index=True)[1])]
    turn = np.zeros(pair.max() + 1, int)
    turn[_in_turns(self.train, groups)] = np.arange(len(groups))
    return first(np.argsort(turn[pair], kind='stable'))

  def select_loss(self, mask):
    """Calibrated loss on select of `mask` [num_nodes] bool, each mask
    evaluated once (the convergence record revisits the same masks)."""
    key = mask.tobytes()
    if key not in self._select_loss:
      self._select_loss[key] = self.evaluate(mask, 'select')['loss']
      logging.info('circuit search: %d nodes -> select loss %.4f',
                   mask.sum(), self._select_loss[key])
    return self._select_loss[key]

  def reaches(self, mask, target_loss):
    return self.select_loss(mask) <= target_loss

  def circuit_of_run(self, taus, steps, target_loss):
    """(step, mask): the circuit after `steps` steps of a run whose scores
    after each step that `train_scores` recorded are `taus` {step: tau}.

    The smallest of the masks (tau > 0) recorded in the run's second half,
    every SNAPSHOT_EVERY steps and at `steps`, that reaches target_loss on
    select; the latest of equal ones. Held at the target on train, the
    mask still moves by a few nodes between snapshots, and masks of nearly
    one size land on either side of the target on select (sparse
    for_while: 76-80 nodes read 0.07-0.34), so select, the split held out
    to choose the circuit, picks among them. Which masks are candidates
    depends on `steps` alone, so the circuit after N steps of a longer run
    is that of an N-step run.

    If none reaches, the smaller of two: the smallest of the first half's
    masks that reaches, and the mask at `steps` with the fewest next-ranked
    nodes that reach it (found in doubling strides, then bisected): ranked
    by tau, ties (many scores sit at a clip) broken by `importance`, never
    by storage order. Held at the target on train, a mask can go on
    shrinking by fitting the train split's pairs: sparse if_equals's masks
    of 78-88 nodes at steps 300-500 read 0.46-0.48 on select, its late ones
    of 58-61 nodes 0.53-0.55, and the ranking past them, where the loss is
    not monotone, reached only at 1,334 nodes.

    Not a bisection inside the mask: trimming it by score removes nodes
    without the rest re-fitting, and how much it removed depended on the
    ranking of scores that sit at the clip in an order that is optimizer
    noise (on if_equals, sparse: 216 and 264 nodes at 1000 and 3000 steps
    of one run, from masks of 335 and 324). Not a bisection over all nodes:
    the loss is not monotone past a mask (it learns to rely on some nodes
    sitting at their means, and restoring them can undo it), and one sent a
    dense circuit from a 196-node mask to 4,598 nodes.
    """
    snapshots = _snapshots(taus, steps)
    late = self._smallest_reaching(
        taus, [t for t in snapshots if t > steps / 2], target_loss)
    if late is not None:
      return late, taus[late] > 0
    extended = self.extend_mask(taus[steps], target_loss)
    early = self._smallest_reaching(
        taus, [t for t in snapshots if t <= steps / 2], target_loss)
    if early is not None and (taus[early] > 0).sum() <= extended.sum():
      return early, taus[early] > 0
    return steps, extended

  def _smallest_reaching(self, taus, candidates, target_loss):
    """The step of the smallest mask among `candidates` (steps) that
    reaches target_loss on select, the latest of equal ones; None if none
    does."""
    reaching = [t for t in candidates
                if self.reaches(taus[t] > 0, target_loss)]
    return min(reaching, key=lambda t: ((taus[t] > 0).sum(), -t),
               default=None)

  def extend_mask(self, tau, target_loss):
    """The mask (tau > 0) and the fewest next-ranked nodes that reach
    target_loss on select; see `circuit_of_run`."""
    importance = self.importance(tau > 0)
    order = np.lexsort((-importance, -tau))  # Last key first: tau, then est.

    def top(k):
      mask = np.zeros(self.num_nodes, bool)
      mask[order[:k]] = True
      return mask

    lo = int((tau > 0).sum())  # top(lo) is the mask, which misses.
    stride = 1
    while (lo + stride < self.num_nodes
           and not self.reaches(top(lo + stride), target_loss)):
      lo, stride = lo + stride, 2 * stride
    hi = min(lo + stride, self.num_nodes)  # top(hi) reaches, top(lo) not.
    while hi - lo > 1:
      mid = (lo + hi) // 2
      lo, hi = (lo, mid) if self.reaches(top(mid), target_loss) else (mid, hi)
    return top(hi)


def _snapshots(taus, steps):
  """The steps, in order, of the masks a run of `steps` steps chooses its
  circuit from: every SNAPSHOT_EVERY-th recorded one up to `steps`, and
  the one at `steps`."""
  return sorted(t for t in taus if t <= steps
                and (t == steps or t % SNAPSHOT_EVERY == 0))


def still_shrinking(taus, steps):
  """Whether the nodes kept after `steps` steps of a run, whose scores
  after each recorded step are `taus` {step: tau}, are still falling: the
  least-squares line through the kept counts of its second half's masks
  (those `circuit_of_run` chooses from) would lose more than
  SETTLED_FRACTION of its value at `steps` in another steps / 2.

  A trend, not the last two masks: held at the target the count wanders by
  a few nodes between snapshots (sparse for_while 64-67 over steps
  1000-2000), while a run that has not settled falls steadily (dense
  bracket_counting 349 -> 283 over the same steps, a line that loses 27%
  in another 1000 steps; it held 283-291 from 1900 to 3000). Fewer than
  three masks in the half: no trend, settled.
  """
  late = [t for t in _snapshots(taus, steps) if t > steps / 2]
  if len(late) < 3:
    return False
  kept = [int((taus[t] > 0).sum()) for t in late]
  slope, intercept = np.polyfit(late, kept, 1)
  return -slope * steps / 2 > SETTLED_FRACTION * (slope * steps + intercept)


def _extension(settings):
  """Steps a run goes on by each time it is still shrinking."""
  return max(settings.steps // 2, 1)


def run_length(taus, settings):
  """The steps after which a run's circuit is taken: settings.steps, and
  while the run is `still_shrinking` there, half as many again, at most
  settings.max_extensions times; a circuit whose mask had not settled
  would overstate what the task needs. Reads only the scores up to the
  length it returns, so a run can stop as soon as it gets there."""
  extension = _extension(settings)
  steps = settings.steps
  while (steps < settings.steps + settings.max_extensions * extension
         and steps in taus and still_shrinking(taus, steps)):
    steps += extension
  return steps


def prune(model, params, means, encoded, settings, record_at=()):
  """The circuit of a task: the fewest nodes that keep its loss at target.

  Args:
    model: a `model.GPT2`.
    params: its parameters (unboxed).
    means: `node_means` of the model on pretraining tokens.
    encoded: task arrays as `tasks.encode` returns them (tokens [N, L]
      right-padded, lengths, correct, incorrect, pair [N]).
    settings: a `settings.Settings`.
    record_at: step counts, besides settings.steps, at which the circuit is
      also found, from the same run of the scores (the warmup is in steps,
      so these are the circuits of shorter runs): a convergence check. They
      are recorded as asked even where the run itself goes on
      (`run_length`).

  Returns:
    The circuit, as saved to circuit.json (`find_circuit` adds the task, the
    run and its checkpoint):
      solved: whether the full model reaches target_loss on `select`. If
        not, nothing is pruned and the circuit's fields are empty or None.
      num_nodes, num_edges: the circuit's; total_nodes, total_edges: the
        model's (edges: nonzero weights of `edges.EDGE_WEIGHTS`).
      steps_run: the steps the circuit was taken after: settings.steps,
        or more where the mask was still shrinking (`run_length`);
        settled: false if it still was after the last extension (the
        circuit may then overstate what the task needs).
      mask_step: the step whose mask the circuit is (`circuit_of_run`);
      kept_by_mask: that mask's nodes (tau > 0); past_mask: no mask reached
        the target on select and the search added nodes (so the ranking
        beyond it decided).
      nodes: [{'layer', 'location', 'index', 'score' (tau at mask_step),
        'importance' (first-order estimate of its effect on the train
        loss, at the circuit),
        'ablation_effect' (test loss with this node alone ablated from the
        circuit, minus the circuit's; None past the MAX_ABLATED_NODES
        best-ranked)}].
      edges, edges_truncated: see `edges.between`.
      losses, accuracy: {'full_model', 'circuit_only', 'circuit_ablated'
        (the circuit's nodes ablated, the rest kept), 'all_ablated'},
        calibrated, on `test`; raw_losses: the same uncalibrated;
        select_loss: the circuit's on `select`, which chose its size.
      logit_scale, logit_shift: the calibration of 'circuit_only'.
      convergence: [{'steps', 'mask_step', 'num_nodes', 'num_edges',
        'kept_by_mask'}].
      version, model_shape, settings, splits (prompts and pairs of each),
      seconds.
  """
  start = time.perf_counter()
  settings.validate()
  num_layers = len(means)
  block = means['block_0']
  splits = split(trim(encoded), settings)
  pruner = _Pruner(model, params, means, splits, settings)
  ones = np.ones(pruner.num_nodes, bool)
  full = {name: pruner.evaluate(ones, name) for name in ('select', 'test')}
  circuit = {
      'version': VERSION, 'target_loss': settings.target_loss,
      'solved': full['select']['loss'] <= settings.target_loss,
      'model_shape': {
          'num_layers': num_layers, 'd_model': int(block['attn_in'].size),
          'num_heads': model.num_heads,
          'd_head': model.d_head or model.d_model // model.num_heads,
          'd_mlp': int(block['mlp_neuron'].size)},
      'num_layers': num_layers,
      'layer_sizes': {loc: int(block[loc].size)
                      for loc in model_lib.NODE_LOCATIONS},
      'settings': dataclasses.asdict(settings),
      'splits': {name: {'prompts': int(rows['tokens'].shape[0]),
                        'pairs': int(np.unique(rows['pair']).size)}
                 for name, rows in zip(('train', 'select', 'test'), splits)},
      'num_nodes': 0, 'num_edges': 0, 'total_nodes': pruner.num_nodes,
      'total_edges': edges_lib.total(params, num_layers),
      'steps_run': None, 'settled': None, 'mask_step': None,
      'kept_by_mask': None, 'past_mask': None,
      'nodes': [], 'edges': [], 'edges_truncated': False,
      'losses': {'full_model': full['test']['loss'], 'circuit_only': None,
                 'circuit_ablated': None, 'all_ablated': None},
      'accuracy': {'full_model': full['test']['accuracy'],
                   'circuit_only': None, 'circuit_ablated': None,
                   'all_ablated': None},
      'raw_losses': {'full_model': full['test']['raw_loss'],
                     'circuit_only': None, 'circuit_ablated': None,
                     'all_ablated': None},
      'select_loss': {'full_model': full['select']['loss'],
                      'circuit_only': None},
      'logit_scale': None, 'logit_shift': None, 'convergence': [],
  }
  if not circuit['solved']:
    logging.warning('Full model select loss %.4f > target %.4g: not pruning.',
                    full['select']['loss'], settings.target_loss)
    circuit['seconds'] = time.perf_counter() - start
    return circuit
  if full['select']['raw_loss'] > settings.target_loss:
    logging.warning(
        'Full model uncalibrated select loss %.4f > target %.4g, at which '
        'the pruning holds the uncalibrated train loss: the multiplier may '
        'grow all run and the mask keep nodes the calibrated target does '
        'not need (a looser --target_loss, or a better-trained checkpoint).',
        full['select']['raw_loss'], settings.target_loss)

  steps = sorted(set(record_at) | {settings.steps})
  # Every snapshot, every recorded step and every extension's end is a
  # multiple of the stride.
  stride = math.gcd(SNAPSHOT_EVERY, _extension(settings), *steps)
  taus = pruner.train_scores(
      jax.random.key(settings.seed), stride,
      until=lambda taus: max(taus, default=0) >= max(steps[-1],
                                                     run_length(taus, settings)))
  steps_run = run_length(taus, settings)
  circuit['seconds_scores'] = time.perf_counter() - start

  for s in sorted(set(steps) | {steps_run}):
    found_step, found = pruner.circuit_of_run(taus, s, settings.target_loss)
    found_kept = jax.tree.map(np.asarray, pruner.unravel(found))
    found_edges = edges_lib.between(params, found_kept, num_layers)
    if s == steps_run:
      mask_step, mask, kept = found_step, found, found_kept
      edges, count, truncated = found_edges
    if s in steps:
      circuit['convergence'].append({
          'steps': s, 'mask_step': found_step, 'num_nodes': int(found.sum()),
          'num_edges': found_edges[1],
          'kept_by_mask': int((taus[found_step] > 0).sum())})
  tau = taus[mask_step]
  importance = pruner.importance(mask)

  results = {'circuit_only': pruner.evaluate(mask, 'test'),
             'circuit_ablated': pruner.evaluate(~mask, 'test'),
             'all_ablated': pruner.evaluate(~ones, 'test')}
  for key, r in results.items():
    circuit['losses'][key] = r['loss']
    circuit['accuracy'][key] = r['accuracy']
    circuit['raw_losses'][key] = r['raw_loss']
  circuit['select_loss']['circuit_only'] = pruner.select_loss(mask)
  base = results['circuit_only']['loss']
  ranked = sorted(np.flatnonzero(mask), key=lambda i: -tau[i])
  effect = {}
  for i in ranked[:MAX_ABLATED_NODES]:
    without = mask.copy()
    without[i] = False
    effect[i] = pruner.evaluate(without, 'test')['loss'] - base
  index = np.arange(pruner.num_nodes).reshape(-1)
  where = jax.tree.map(np.asarray, pruner.unravel(index))  # Node -> flat id.
  nodes = []
  for layer in range(num_layers):
    for loc in model_lib.NODE_LOCATIONS:
      ids = where[f'block_{layer}'][loc].astype(int)
      for i in np.flatnonzero(kept[f'block_{layer}'][loc]):
        flat_id = ids[i]
        nodes.append({'layer': layer, 'location': loc, 'index': int(i),
                      'score': float(tau[flat_id]),
                      'importance': float(importance[flat_id]),
                      'ablation_effect': effect.get(flat_id)})
  circuit.update({
      'num_nodes': int(mask.sum()), 'num_edges': count, 'nodes': nodes,
      'edges': edges, 'edges_truncated': truncated,
      'steps_run': steps_run,
      'settled': not still_shrinking(taus, steps_run), 'mask_step': mask_step,
      'kept_by_mask': int((tau > 0).sum()),
      'past_mask': bool(mask.sum() > (tau > 0).sum()),
      'logit_scale': results['circuit_only']['scale'],
      'logit_shift': results['circuit_only']['shift'],
  })
  circuit['seconds'] = time.perf_counter() - start
  return circuit
