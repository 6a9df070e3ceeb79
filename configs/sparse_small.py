r"""Weight-sparse GPT-2 small enough to train on a laptop CPU.

The paper's architecture (RMSNorm, untied unembedding, no positions, bigram
table, attention sinks, d_head 16) at 4 layers x 128 wide, with per-tensor
top-k weight sparsity annealed from dense to 1 in 10 nonzeros over the first
half of training, on the Python standard library.

  python -m sparse_gpt2.main --config=configs/sparse_small.py

Its dense twin is configs/dense_small.py (same architecture, same tokens).
Expected on a 2-core CPU, split into two devices: 7 min (0.4 s/step),
validation loss 4.06 nats/token (the corpus' unigram entropy is 6.46).
"""

from sparse_gpt2 import defaults


def get_config(arg=None):
  defaults.no_arg(arg, 'sparse_small')
  config = defaults.small_run(defaults.base())
  config.sparsity.mode = 'topk'
  config.sparsity.density = 0.1
  config.optim.lr = 1e-2
  return config
