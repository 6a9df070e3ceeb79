r"""Dense twin of sparse_small: same architecture, data, tokens and steps.

  python -m sparse_gpt2.main --config=configs/dense_small.py
"""

from sparse_gpt2 import defaults


def get_config(arg=None):
  del arg
  config = defaults.paper_architecture(defaults.base())
  config.train_steps = 1000
  config.batch_size = 32
  config.seq_len = 128
  config.model.num_layers = 4
  config.model.d_model = 128
  config.model.num_heads = 8
  config.model.d_mlp = 512
  config.model.max_len = 128
  config.optim.lr = 3e-3
  return config
