"""Every config field, with its default and meaning. Files in configs/ start
from `base()` and change what their run needs, so a field exists once and an
override of an unknown field fails (configs are locked by main.py)."""

import ml_collections


def base():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.train_steps = 1000        # Where the run stops.
  config.schedule_steps = 0        # Length of the lr and annealing schedules;
                                   # 0 = train_steps at the run's first start.
                                   # Saved with the run, so a resumed run that
                                   # changes train_steps stops elsewhere on the
                                   # same schedules.
  config.batch_size = 32           # Global, over all processes.
  config.microbatches = 1          # Gradients accumulated over this many
                                   # slices of the batch: memory of one slice.
  config.seq_len = 128
  config.log_every = 10
  config.eval_every = 250
  config.eval_batches = 8
  config.checkpoint_every = 250
  config.keep_checkpoints = 2      # Newest checkpoints kept...
  config.keep_every = 0            # ...and forever those at multiples of this
                                   # (0: none): the checkpoints that circuits
                                   # compare at matched loss (`--step`).
  config.peak_flops = 0.0          # FLOP/s of all devices for MFU; 0 = the
                                   # datasheet peak (CPU: the run's fastest
                                   # timed matmul, read again at each eval).
  config.init_from_hf = ''         # A Hugging Face GPT-2 dir to start from.
  config.num_cpu_devices = 0       # Devices the host CPU is split into
                                   # (`jax_num_cpu_devices`; 0: jax's, one).
                                   # Only runs on the CPU backend use them.

  config.data = ml_collections.ConfigDict()
  config.data.source = 'stdlib'    # 'stdlib', a directory of code, 'tfds:NAME'.
  config.data.text_feature = 'text'  # Text feature of a 'tfds:NAME' source.
  config.data.data_dir = ''        # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets.
  config.data.vocab_size = 2048    # BPE size, as in the paper.
  config.data.val_fraction = 0.05

  # GPT2 constructor fields (sparse_gpt2/model.py); defaults are GPT-2's.
  config.model = ml_collections.ConfigDict()
  config.model.vocab_size = config.data.get_ref('vocab_size')
  config.model.num_layers = 12
  config.model.d_model = 768
  config.model.num_heads = 12
  config.model.d_head = 64
  config.model.d_mlp = 3072
  config.model.max_len = 1024
  config.model.norm = 'layernorm'  # 'layernorm' | 'rmsnorm'
  config.model.tie_embeddings = True
  config.model.pos_embedding = True
  config.model.bigram_table = False
  config.model.attention_sink = False
  config.model.attention = 'auto'  # 'auto' (cuDNN on GPU where it can),
                                   # 'xla' or 'cudnn'.
  config.model.remat = 'none'      # Per block: 'none' | 'full' | 'dots'.
  config.model.use_bias = True
  config.model.act_topk_fraction = 0.0  # AbsTopK; the paper keeps 0.25.
  config.model.act_topk_locations = ()  # Subset of model.NODE_LOCATIONS.
  config.model.dropout = 0.0
  config.model.dtype = 'float32'        # Compute dtype: 'float32'|'bfloat16'.
  config.model.param_dtype = 'float32'

  config.sparsity = ml_collections.ConfigDict()
  config.sparsity.mode = 'none'    # 'none' | 'static' | 'topk'
  config.sparsity.density = 1.0    # Target fraction of nonzeros per tensor.
  # Parameters whose path matches are sparse: by default all weights, biases
  # and embeddings; norm gains, attention sinks and the bigram table stay dense.
  config.sparsity.pattern = r'^(?!.*(norm|bigram|sink))'
  config.sparsity.min_per_neuron = 4   # j: nonzeros kept per neuron/channel.
  config.sparsity.anneal_fraction = 0.5  # topk: dense -> target over this.
  config.sparsity.static_init = 'uniform'  # static: 'uniform' | 'erk'.

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 1e-2
  config.optim.warmup_fraction = 0.01
  config.optim.b1 = 0.9
  config.optim.b2 = 0.95
  config.optim.eps = 0.1           # Large on purpose, as in the paper.
  config.optim.weight_decay = 0.1
  config.optim.grad_rms = 1.0      # Gradients rescaled to this RMS each step.

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1            # -1 (one axis at most): all devices the
  config.mesh.fsdp = 1             # others leave. fsdp splits params, masks
  config.mesh.model = 1            # and Adam state; model heads, MLP, vocab.
  # Logical axis -> mesh axes (sharding.py). Weights name 'embed', 'heads',
  # 'mlp', 'vocab', 'vocab_in', 'positions', 'heads_only'; activations
  # 'batch', 'length', 'act_embed'.
  config.mesh.rules = (
      ('batch', ('data', 'fsdp')),
      ('length', None),
      ('act_embed', None),
      ('embed', 'fsdp'),
      ('positions', None),
      ('heads', 'model'),
      ('heads_only', None),
      ('mlp', 'model'),
      ('vocab', 'model'),
      ('vocab_in', None),
  )
  return config


def no_arg(arg, name):
  """For configs that take no `file.py:ARG`: one given is a typo to refuse,
  not something to run the default config in its place."""
  if arg:
    raise ValueError(f'{name} takes no argument, got {arg!r}')


def check_fields(config):
  """Refuses a config whose fields are not `base()`'s, naming them: a
  config file's misspelt field (`config.sparsity.densty = 0.05`) is a new
  field that nothing reads, so the run trained at the default density
  without a word, and a file not built on `base()` stopped at the first
  field it lacks with a traceback. (An override of an unknown field is
  refused as it is parsed: configs are locked.)"""
  unknown, missing = [], []

  def compare(got, want, prefix):
    for key in sorted(set(got.keys()) | set(want.keys())):
      if key not in want or key not in got:
        (unknown if key in got else missing).append(prefix + key)
      elif isinstance(want[key], ml_collections.ConfigDict):
        if isinstance(got[key], ml_collections.ConfigDict):
          compare(got[key], want[key], f'{prefix}{key}.')
        else:
          missing.append(f'{prefix}{key}.*')

  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f'the config is a {type(config).__name__}, not a '
                     'ConfigDict: build it on sparse_gpt2.defaults.base()')
  compare(config, base(), '')

  def some(names):
    return ', '.join(names[:4]) + (f' and {len(names) - 4} more'
                                   if len(names) > 4 else '')

  if unknown:
    raise ValueError(f'no such config field: {some(unknown)} (every field '
                     'is in sparse_gpt2/defaults.py)')
  if missing:
    raise ValueError(f'the config lacks {some(missing)}: build it on '
                     'sparse_gpt2.defaults.base()')


def paper_architecture(config):
  """The paper's model changes (sparse and dense twins share them)."""
  m = config.model
  m.norm = 'rmsnorm'
  m.tie_embeddings = False
  m.pos_embedding = False
  m.bigram_table = True
  m.attention_sink = True
  m.d_head = 16
  return config


def small_run(config):
  """The CPU-sized twins (sparse_small, dense_small): the paper's
  architecture at 4 layers x 128, 1000 steps of 32 x 128 tokens. One
  function, so the twins cannot drift apart."""
  config = paper_architecture(config)
  config.train_steps = 1000
  config.batch_size = 32
  config.seq_len = 128
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.d_mlp = 4, 128, 8, 512
  m.max_len = config.seq_len
  # Two CPU devices, each running half the batch: one device left the two
  # cores idle for over half of a step (benchmarks/step_profile.py: 596 of
  # 1,374 thread-ms busy), and two make a step 1.25x (sparse_small) and
  # 1.26x (dense_small) faster (benchmarks/run.py, twins).
  config.num_cpu_devices = 2
  return config


def medium_run(config):
  """The twins the circuit results are measured on (sparse_medium,
  dense_medium): small_run's model for 2000 steps (8.2M tokens, about 0.8 of
  an epoch of the standard library), evaluated and kept every 50 steps so a
  sparse checkpoint can be paired with a dense one of matched validation
  loss (`sparse_gpt2.circuits.compare`)."""
  config = small_run(config)
  config.train_steps = 2000
  config.eval_every = 50
  config.checkpoint_every = 50
  config.keep_every = 50
  return config


def gpt2_124m_run(config):
  """Run length and batch of the 124M configs (sparse and dense twins), and
  what makes a step of 512 x 1024 tokens fit a chip: the batch goes through
  in 8 slices, gradients accumulated (`python -m sparse_gpt2.plan` measured
  it, README; 'dots' remat with 2 slices also fits, but recomputes)."""
  config.train_steps = 10_000
  config.batch_size = 512
  config.seq_len = 1024
  config.log_every = 50
  config.eval_every = 1000
  config.eval_batches = 16
  config.checkpoint_every = 1000
  config.microbatches = 8
  config.model.dtype = 'bfloat16'
  return config
