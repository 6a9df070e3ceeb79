"""Entry point: python -m sparse_gpt2.main --config=configs/NAME.py [--workdir=DIR]

Everything a run does is in the config; this file only parses it and hands it
to `train.train_and_evaluate`.
"""

import os

from absl import flags
import jax
from ml_collections import config_flags

from sparse_gpt2 import cli
from sparse_gpt2 import train

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, `file.py[:arg]`; override fields with '
    '--config.FIELD=VALUE.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory, local or remote such as gs://... '
    '(default runs/<config file name>).')
flags.mark_flags_as_required(['config'])


def main():
  if _WORKDIR.value == '':
    raise ValueError('--workdir is empty; leave it out for runs/CONFIG_NAME')
  # A run in one malloc heap compiles its steps apart, keeping the
  # compiler's freed blocks out of that heap (train.start_compiling_apart).
  kept_freed_memory = cli.start_jax(_CONFIG.value.num_cpu_devices,
                                    _CONFIG.value.train_steps)
  if os.environ.get('SPARSE_GPT2_DISTRIBUTED') == '1':  # Set by launch/.
    jax.distributed.initialize()  # Finds the TPU slice / Slurm job itself.
  config_file = flags.FLAGS['config'].config_filename
  name = os.path.splitext(os.path.basename(config_file.split(':')[0]))[0]
  train.train_and_evaluate(_CONFIG.value,
                           _WORKDIR.value or os.path.join('runs', name),
                           compile_apart=kept_freed_memory)


if __name__ == '__main__':
  cli.run(main, errors=cli.USER_ERRORS + (train.Preempted,))
