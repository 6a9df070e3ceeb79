r"""GPT-2 small (124M) shape with the paper's top-k weight sparsity, for
GPUs/TPUs: the sparse twin of dense_gpt2_124m (same architecture, tokens).

1 in 64 weights nonzero at the end (about 1.37M of its 87.4M parameters
with the project's 2048-token vocabulary, the 38k norm gains dense besides;
1.9M of 124M with GPT-2's 50257), annealed over the first 50% of training;
the paper's optimizer (eps 0.1, lr grows as sqrt(L0_target / L0_now)).

  python -m sparse_gpt2.main --config=configs/sparse_gpt2_124m.py \
      --config.data.source=/path/to/python/code

The same FLOPs as the dense twin (unstructured sparsity does not shrink
dense matmuls), and on one H200 the same step time (0.82 s; the top-k is lost
in the noise: benchmarks/gpu.sh, README); the paper needs 100-1000x the
compute of a dense model of equal loss, so expect a higher loss at equal
steps.
"""

from sparse_gpt2 import defaults


def get_config(arg=None):
  defaults.no_arg(arg, 'sparse_gpt2_124m')
  config = defaults.gpt2_124m_run(defaults.base())
  config.sparsity.mode = 'topk'
  config.sparsity.density = 1 / 64
  config.optim.lr = 1.28e-2
  config.optim.eps = 0.1
  config.optim.warmup_fraction = 0.01
  return config
