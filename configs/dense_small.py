r"""Dense twin of sparse_small: same architecture, data, tokens and steps.

  python -m sparse_gpt2.main --config=configs/dense_small.py
"""

from sparse_gpt2 import defaults


def get_config(arg=None):
  del arg
  config = defaults.small_run(defaults.base())
  config.optim.lr = 3e-3
  return config
