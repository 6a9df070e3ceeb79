"""The two trainers this project's step is measured against, written without
its code: Hugging Face `transformers` GPT-2 on CPU PyTorch (the peer a user
would otherwise reach for) and a plain Flax + optax GPT-2 (what a user would
write in JAX). Both train the plain GPT-2 shape of `Shape` in fp32 with AdamW
and return a function that runs one step and waits for it.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Shape:
  vocab_size: int = 2048
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  seq_len: int = 256
  batch_size: int = 16


def torch_step(shape, lr=1e-3):
  """One AdamW step of `transformers.GPT2LMHeadModel` (dropout off, SDPA
  attention, torch's default intra-op threads). Raises ImportError without
  torch/transformers, saying how to install them."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'{e} (the PyTorch peer: pip install -r '
                      'requirements-dev.txt)') from None
  torch.manual_seed(0)
  config = transformers.GPT2Config(
      vocab_size=shape.vocab_size, n_positions=shape.seq_len,
      n_embd=shape.d_model, n_layer=shape.num_layers, n_head=shape.num_heads,
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      bos_token_id=0, eos_token_id=0)
  model = transformers.GPT2LMHeadModel(config)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
  tokens = torch.randint(0, shape.vocab_size,
                         (shape.batch_size, shape.seq_len))

  def step():
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()

  return step


class _Block(nn.Module):
  num_heads: int

  @nn.compact
  def __call__(self, x):
    t = x.shape[1]
    mask = nn.make_causal_mask(jnp.ones((x.shape[0], t)))
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(
        nn.LayerNorm()(x), mask=mask)
    h = nn.Dense(4 * x.shape[-1])(nn.LayerNorm()(x))
    return x + nn.Dense(x.shape[-1])(nn.gelu(h))


class _PlainGPT2(nn.Module):
  shape: Shape

  @nn.compact
  def __call__(self, tokens):  # [B, T] -> logits [B, T, V]
    s = self.shape
    embed = nn.Embed(s.vocab_size, s.d_model)
    x = embed(tokens) + self.param('pos', nn.initializers.normal(0.02),
                                   (s.seq_len, s.d_model))
    for _ in range(s.num_layers):
      x = _Block(s.num_heads)(x)
    return embed.attend(nn.LayerNorm()(x))


def flax_step(shape, lr=1e-3):
  """One AdamW step of a textbook Flax GPT-2 (`nn.MultiHeadDotProductAttention`,
  tied embeddings), jitted. Its state is not donated: donated, the step
  took 1.03x and 1.05x as long (2026-12-07, AMD EPYC with AVX-512, timed in
  turns with this one, 12 and 16 rounds), no faster within the noise."""
  model = _PlainGPT2(shape)
  tokens = jax.random.randint(jax.random.key(1),
                              (shape.batch_size, shape.seq_len + 1), 0,
                              shape.vocab_size)
  params = model.init(jax.random.key(0), tokens[:, :-1])
  tx = optax.adamw(lr, weight_decay=0.1)

  @jax.jit
  def update(params, opt_state, tokens):
    def loss_fn(p):
      logits = model.apply(p, tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, tokens[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = [params, tx.init(params)]

  def step():
    state[0], state[1], loss = update(state[0], state[1], tokens)
    jax.block_until_ready(state)  # The whole update, not only the loss.
    return float(loss)

  return step
