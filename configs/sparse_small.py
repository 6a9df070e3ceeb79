r"""Weight-sparse GPT-2 small enough to train on a laptop CPU.

The paper's architecture (RMSNorm, untied unembedding, no positions, bigram
table, attention sinks, d_head 16) at 4 layers x 128 wide, with per-tensor
top-k weight sparsity annealed from dense to 1 in 10 nonzeros over the first
half of training, on the Python standard library.

  python -m sparse_gpt2.main --config=configs/sparse_small.py

Its dense twin is configs/dense_small.py (same architecture, same tokens).
Expected on a 2-core CPU, split into two devices: 4.5 min on an AVX-512
Xeon (0.25 s a step; 6-7 min on an AVX2 one), validation loss 4.05-4.09
nats/token over seeds (the corpus' unigram entropy is 6.46; README,
Pretraining).
"""

from sparse_gpt2 import defaults


def get_config(arg=None):
  defaults.no_arg(arg, 'sparse_small')
  config = defaults.small_run(defaults.base())
  config.sparsity.mode = 'topk'
  config.sparsity.density = 0.1
  config.optim.lr = 1e-2
  return config
