r"""Dense twin of sparse_medium: same architecture, data, tokens and steps.

  python -m sparse_gpt2.main --config=configs/dense_medium.py
"""

from sparse_gpt2 import defaults


def get_config(arg=None):
  defaults.no_arg(arg, 'dense_medium')
  config = defaults.medium_run(defaults.base())
  config.optim.lr = 3e-3
  return config
