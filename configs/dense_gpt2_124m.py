r"""GPT-2 small's shape, dense: the baseline at real scale, for GPUs/TPUs.

Plain GPT-2 architecture (so `sparse_gpt2.convert` exports it to Hugging Face)
on the project's 2048-token Python BPE, 1024-token context, global batch 512.

  python -m sparse_gpt2.main --config=configs/dense_gpt2_124m.py \
      --config.data.source=/path/to/python/code

Measured on one H200 (benchmarks/gpu.sh, README): 0.83 s a step (634k
tokens/s, 36.9% MFU, 25.0 GiB), so its 5.2B tokens (0.58 GFLOP each) take
about 2.3 h there. On a laptop CPU it runs, at a few hundred tokens/s: use
sparse_small there.
"""

from sparse_gpt2 import defaults


def get_config(arg=None):
  defaults.no_arg(arg, 'dense_gpt2_124m')
  # GPT-2 small: 12 x 768, 12 heads, 3072 MLP, tied, LayerNorm, positions.
  config = defaults.gpt2_124m_run(defaults.base())
  config.optim.lr = 6e-4
  config.optim.eps = 1e-8
  config.optim.warmup_fraction = 0.02
  return config
