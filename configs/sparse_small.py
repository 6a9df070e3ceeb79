r"""Weight-sparse GPT-2 small enough to train on a laptop CPU.

The paper's architecture (RMSNorm, untied unembedding, no positions, bigram
table, attention sinks, d_head 16) with per-tensor top-k weight sparsity
annealed from dense to `sparsity.density` over the first half of training.

  python -m sparse_gpt2.main --config=configs/sparse_small.py

Its dense twin is configs/dense_small.py (same architecture, same tokens).
"""

import ml_collections


def get_config(arg=None):
  """`arg` is unused; kept for the `file.py:arg` convention."""
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.train_steps = 1000
  config.batch_size = 32
  config.seq_len = 128
  config.log_every = 10
  config.eval_every = 250
  config.eval_batches = 8
  config.checkpoint_every = 250
  config.keep_checkpoints = 2
  config.peak_flops = 0.0  # FLOP/s for MFU; 0 = measure a matmul at start.

  config.data = ml_collections.ConfigDict()
  config.data.source = 'stdlib'   # 'stdlib', a directory of code, or 'tfds:NAME'.
  config.data.text_feature = 'text'  # Text feature of a 'tfds:NAME' source.
  config.data.data_dir = ''       # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets.
  config.data.vocab_size = 2048
  config.data.val_fraction = 0.05

  config.model = ml_collections.ConfigDict()
  config.model.vocab_size = config.data.get_ref('vocab_size')
  config.model.num_layers = 4
  config.model.d_model = 128
  config.model.num_heads = 8
  config.model.d_head = 16
  config.model.d_mlp = 512
  config.model.max_len = config.get_ref('seq_len')
  config.model.norm = 'rmsnorm'
  config.model.tie_embeddings = False
  config.model.pos_embedding = False
  config.model.bigram_table = True
  config.model.attention_sink = True
  config.model.act_topk_fraction = 0.0
  config.model.act_topk_locations = ()
  config.model.dropout = 0.0
  config.model.dtype = 'float32'
  config.model.param_dtype = 'float32'

  config.sparsity = ml_collections.ConfigDict()
  config.sparsity.mode = 'topk'
  config.sparsity.density = 0.1
  config.sparsity.pattern = r'.*'
  config.sparsity.dense_pattern = r'(norm|bigram)'
  config.sparsity.min_per_neuron = 4
  config.sparsity.anneal_fraction = 0.5
  config.sparsity.static_init = 'uniform'

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 1e-2
  config.optim.warmup_fraction = 0.01
  config.optim.b1 = 0.9
  config.optim.b2 = 0.95
  config.optim.eps = 0.1
  config.optim.weight_decay = 0.1
  config.optim.grad_clip_rms = 1.0

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.model = 1
  return config
