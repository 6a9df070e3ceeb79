"""The optimizer: [mask grads] -> RMS-normalise -> AdamW (sharkfin lr) -> reproject.

One `optax.chain`; the sparse pieces take the model's masks as the extra
argument `masks=` (optax passes extra keyword arguments through a chain).
"""

import math

import jax
import jax.numpy as jnp
import optax

from sparse_gpt2 import sparsity


def learning_rate(config, total_steps):
  """The paper's "sharkfin": linear warmup, linear decay to zero, times
  sqrt(L0_target / L0_now) so the lr grows as annealing makes the model
  sparser (1 in the dense and static modes)."""
  warmup = max(1, round(config.optim.warmup_fraction * total_steps))
  decay = max(1, total_steps - warmup)

  def schedule(step):
    ramp = jnp.minimum((step + 1) / warmup,
                       jnp.maximum(0.0, (total_steps - step) / decay))
    lr = config.optim.lr * jnp.minimum(1.0, ramp)
    if config.sparsity.mode == 'topk':
      density = sparsity.density_at(step, config.sparsity, total_steps)
      lr = lr * jnp.sqrt(config.sparsity.density / density)
    return lr

  return schedule


def global_rms(tree):
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in leaves) / sum(x.size for x in leaves))


def normalize_by_global_rms(target_rms):
  """Rescales the gradient to root-mean-square `target_rms` every step.

  The paper calls it clipping the gradient RMS to 1; its released code
  divides by the RMS every step, and Adam's large eps (0.1) is sized for
  gradients of unit RMS, so that is what is done here.
  """

  def update_fn(updates, state, params=None):
    del params
    scale = target_rms / jnp.maximum(global_rms(updates), 1e-30)
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      update_fn)


def decay_mask(params):
  """Weight decay on matrices only: not on biases, norm gains, sinks, or the
  bigram table (which the paper leaves out of sparsity and decay)."""
  return sparsity.unflat({p: x.ndim >= 2 and 'bigram' not in p
                          for p, x in sparsity.flat(params).items()})


def validate(o):
  """One-line errors for an optim config (`config.optim`) that cannot train;
  each check a `not` of its valid range, so that NaN is refused too (NaN
  fails every comparison: `lr < 0` let it through to a NaN loss at the
  first step, after the run directory was written)."""
  if not 0 <= o.lr < math.inf:
    raise ValueError(f'optim.lr must be >= 0 and finite, got {o.lr}')
  if not 0 <= o.warmup_fraction <= 1:
    raise ValueError(f'optim.warmup_fraction must be in [0, 1], got '
                     f'{o.warmup_fraction}')
  for field in ('b1', 'b2'):
    if not 0 <= o[field] < 1:
      raise ValueError(f'optim.{field} must be in [0, 1), got {o[field]}')
  if not 0 <= o.weight_decay < math.inf:
    raise ValueError(f'optim.weight_decay must be >= 0 and finite, got '
                     f'{o.weight_decay}')
  # At 0, a weight whose gradient is exactly zero (the bigram row of a token
  # that no batch holds) takes Adam's 0 / 0 and the run is NaN at step 1.
  if not 0 < o.eps < math.inf:
    raise ValueError(f'optim.eps must be > 0 and finite, got {o.eps}')
  if not 0 < o.grad_rms < math.inf:
    raise ValueError(f'optim.grad_rms must be > 0 and finite, got '
                     f'{o.grad_rms}')


def make(config, total_steps):
  """The optimizer for `config`; call `update(grads, state, params,
  masks=masks)`."""
  sparsity.validate(config.sparsity)
  validate(config.optim)
  o = config.optim
  chain = []
  if config.sparsity.mode == 'static':
    chain.append(sparsity.mask_gradients())
  chain += [
      normalize_by_global_rms(o.grad_rms),
      optax.adamw(learning_rate(config, total_steps), b1=o.b1, b2=o.b2,
                  eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask),
  ]
  if config.sparsity.mode != 'none':
    chain.append(sparsity.reproject(config.sparsity, total_steps))
  return optax.chain(*chain)
