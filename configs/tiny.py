r"""A seconds-long run for tests and smoke checks: `arg` picks the sparsity
mode ('topk' default, 'static' or 'none').

  python -m sparse_gpt2.main --config=configs/tiny.py:static --workdir=/tmp/t

Expected: about 20 s with the corpus built (most of it compilation); 20
steps lower the loss from ~6.2 to ~5.6 on the standard library.
"""

from sparse_gpt2 import defaults


def get_config(arg='topk'):
  if arg not in (None, '', 'topk', 'static', 'none'):  # As it loads: exit 2.
    raise ValueError(f"tiny: unknown arg {arg!r}; known: 'topk', 'static', "
                     "'none'")
  config = defaults.paper_architecture(defaults.base())
  config.train_steps = 20
  config.batch_size = 8
  config.seq_len = 32
  config.log_every = 5
  config.eval_every = 10
  config.eval_batches = 2
  config.checkpoint_every = 10
  config.peak_flops = 1e11
  config.data.vocab_size = 512
  config.model.num_layers = 2
  config.model.d_model = 32
  config.model.num_heads = 2
  config.model.d_mlp = 128
  config.model.max_len = 32
  config.sparsity.mode = arg or 'topk'
  config.sparsity.density = 0.25 if config.sparsity.mode != 'none' else 1.0
  config.optim.lr = 1e-2
  return config
