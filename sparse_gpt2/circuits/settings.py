"""The pruning settings: one dataclass, the flags of both CLIs, and the
record in every circuit.json.

`compare` reuses a saved circuit only if its settings equal these (all but
num_prompts, which only picks the prompts that the circuit's prompts digest
tells), so changing any default (or flag) re-prunes instead of silently
reusing a circuit found another way.
"""

import dataclasses
import math

from absl import flags

from sparse_gpt2 import cli


@dataclasses.dataclass(frozen=True)
class Settings:
  """How a circuit is found. Where the paper's value is not the default,
  the README's circuits section says why."""
  target_loss: float = dataclasses.field(default=0.15, metadata={
      'help': 'Calibrated task loss the circuit must reach (the paper: '
              '0.15).'})
  steps: int = dataclasses.field(default=2000, metadata={
      'help': 'Optimizer steps on the node scores.'})
  max_extensions: int = dataclasses.field(default=2, metadata={
      'help': 'Times a run goes on by steps / 2 while its mask is still '
              'shrinking (prune.run_length; 0: never).'})
  lr: float = dataclasses.field(default=1e-2, metadata={
      'help': 'Peak learning rate of the node scores.'})
  warmup_steps: int = dataclasses.field(default=50, metadata={
      'help': 'Linear warmup; constant after it, so the scores after N '
              'steps of a longer run are those of an N-step run.'})
  b1: float = dataclasses.field(default=0.9, metadata={'help': 'AdamW b1.'})
  b2: float = dataclasses.field(default=0.95, metadata={'help': 'AdamW b2.'})
  eps: float = dataclasses.field(default=1e-8, metadata={'help': 'AdamW eps.'})
  weight_decay: float = dataclasses.field(default=1e-3, metadata={
      'help': 'AdamW weight decay of the scores.'})
  grad_rms: float = dataclasses.field(default=1.0, metadata={
      'help': 'Gradients are clipped to this RMS.'})
  k_coef: float = dataclasses.field(default=1e-3, metadata={
      'help': 'Penalty per kept node, added to the task loss (the paper: '
              '1e-4).'})
  dual_lr: float = dataclasses.field(default=0.05, metadata={
      'help': 'Rate of the integral of the multiplier on the task loss, '
              'which rises while the train loss is above target_loss and '
              'falls while it is below; its proportional gain is 200x this '
              '(0: the paper\'s fixed objective).'})
  batch_pairs: int = dataclasses.field(default=16, metadata={
      'help': 'Contrastive pairs per step (two prompts each; of a task '
              'file\'s groups of another size, as many as make as many '
              'prompts).'})
  init_bias: float = dataclasses.field(default=0.1, metadata={
      'help': 'Initial score of every node (kept: > 0).'})
  init_noise: float = dataclasses.field(default=0.01, metadata={
      'help': 'Std of the noise added to the initial scores.'})
  temperature: float = dataclasses.field(default=0.1, metadata={
      'help': 'Of the sigmoid whose derivative stands in for the step.'})
  num_prompts: int = dataclasses.field(default=1024, metadata={
      'help': 'Prompts generated for a built-in task (half as many pairs).'})
  select_fraction: float = dataclasses.field(default=0.25, metadata={
      'help': 'Of the pairs, to choose the circuit among the late masks '
              '(and how far to extend one; fits the logit calibration).'})
  test_fraction: float = dataclasses.field(default=0.25, metadata={
      'help': 'Of the pairs, untouched until the reported losses.'})
  seed: int = dataclasses.field(default=0, metadata={
      'help': 'Of the prompts, the splits, the initial scores and batches.'})

  def validate(self):
    """One-line errors for settings that cannot work."""
    if not 0 < self.target_loss < 0.6931:
      raise ValueError('target_loss must be in (0, log 2), got '
                       f'{self.target_loss}')
    for name in ('steps', 'batch_pairs', 'num_prompts'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
    # Each a `not` of its valid range, so that NaN is refused too, and inf
    # (a NaN mask after the first step), as training's optimizer refuses it.
    for name in ('lr', 'grad_rms', 'temperature'):  # temperature divides.
      if not 0 < getattr(self, name) < math.inf:
        raise ValueError(f'{name} must be > 0 and finite, got '
                         f'{getattr(self, name)}')
    for name in ('warmup_steps', 'eps', 'weight_decay', 'k_coef', 'dual_lr',
                 'init_noise'):
      if not 0 <= getattr(self, name) < math.inf:
        raise ValueError(f'{name} must be >= 0 and finite, got '
                         f'{getattr(self, name)}')
    if not math.isfinite(self.init_bias):
      raise ValueError(f'init_bias must be finite, got {self.init_bias}')
    for name in ('b1', 'b2'):
      if not 0 <= getattr(self, name) < 1:
        raise ValueError(f'{name} must be in [0, 1), got '
                         f'{getattr(self, name)}')
    if self.max_extensions < 0:
      raise ValueError(
          f'max_extensions must be >= 0, got {self.max_extensions}')
    # Steps are int32 in the compiled loop; the seed seeds jax and numpy.
    longest = self.steps + self.max_extensions * max(self.steps // 2, 1)
    for name, value, what in (
        ('warmup_steps', self.warmup_steps, ''),
        ('steps', longest, ' with every extension (steps + max_extensions x '
                           'steps / 2)'),
        ('seed', self.seed, '')):
      if not 0 <= value < 2**31:
        raise ValueError(f'{name} must be in [0, 2**31){what}, got {value}')
    if self.num_prompts % 2:
      raise ValueError('num_prompts must be even (prompts come in contrastive '
                       f'pairs), got {self.num_prompts}')
    if not (0 < self.select_fraction and 0 < self.test_fraction
            and self.select_fraction + self.test_fraction < 1):
      raise ValueError('select_fraction and test_fraction must be > 0 and '
                       'leave pairs to train on')


def define_flags():
  """One absl flag per field, named and defaulted as the field; and
  --num_cpu_devices, which says where a circuit is found, not by what
  method, so it is no setting (its sums in another order can still move a
  circuit by a few nodes)."""
  define = {int: flags.DEFINE_integer, float: flags.DEFINE_float}
  for field in dataclasses.fields(Settings):
    define[field.type](field.name, field.default, field.metadata['help'])
  flags.DEFINE_integer(
      'num_cpu_devices', 2, 'CPU devices the host is split into, each '
      'running a share of every pruning batch (jax_num_cpu_devices; no '
      'effect on an accelerator).', lower_bound=1,
      upper_bound=cli.MAX_CPU_DEVICES)


def start_jax():
  """`cli.start_jax` on --num_cpu_devices, without the freed memory that
  training keeps: a pruning step's temporaries are small, and in the one
  malloc arena it needs, a program compiled in the same process ran its
  steps ~1.36x slower (a 400-step pruning of for_while on the medium
  sparse model from an empty compile cache: 94 against 69 ms a step; loaded
  from the cache, 78 against 73)."""
  cli.start_jax(flags.FLAGS.num_cpu_devices)


def from_flags():
  """The Settings that the command line asks for."""
  return Settings(**{f.name: flags.FLAGS[f.name].value
                     for f in dataclasses.fields(Settings)})
