r"""The paper's architecture at 8 layers x 2048 (d_head 16, so 128 heads;
d_mlp 8192; about 0.42B parameters), top-k sparse to 1 in 64, batch 512 x
1024: a model whose state does not fit one chip beside its activations, so
parameters, masks and Adam moments are split over an 'fsdp' mesh axis.

  python -m sparse_gpt2.plan --config=configs/sparse_gpt2_paper.py --topology=v5p-8
  python -m sparse_gpt2.main --config=configs/sparse_gpt2_paper.py \
      --config.data.source=/path/to/python/code

`mesh.fsdp` is -1 here: all devices (data 1), the ZeRO-3 layout; set it and
`mesh.data` for a larger slice. On one H200 (benchmarks/gpu.sh, README): 6.7 s
a step (78k tokens/s, 20.1% MFU: XLA's attention, which its sinks need, and
full remat), 35.6 GiB; the plan's TPU numbers are in the README too.
"""

from sparse_gpt2 import defaults


def get_config(arg=None):
  defaults.no_arg(arg, 'sparse_gpt2_paper')
  config = defaults.paper_architecture(defaults.gpt2_124m_run(defaults.base()))
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.d_mlp = 8, 2048, 128, 8192
  m.remat = 'full'
  config.microbatches = 8
  config.mesh.data, config.mesh.fsdp = 1, -1
  config.sparsity.mode = 'topk'
  config.sparsity.density = 1 / 64
  config.optim.lr = 1.28e-2
  config.optim.eps = 0.1
  return config
