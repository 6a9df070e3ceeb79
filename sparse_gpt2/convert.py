r"""Converts between a Hugging Face GPT-2 directory and a run of this project.

  # A trained run -> a directory transformers opens with from_pretrained
  # (GPT2LMHeadModel and AutoTokenizer: the weights and the run's BPE):
  python -m sparse_gpt2.convert --from_run=runs/dense_gpt2_124m --to_hf=out/
  # A released GPT-2 -> a run directory at step 0 (config + checkpoint):
  python -m sparse_gpt2.convert --from_hf=gpt2/ --to_run=runs/from_gpt2 \
      --config=configs/dense_gpt2_124m.py

Only runs whose model transformers' GPT-2 can express convert to Hugging
Face (LayerNorm, learned positions, no bigram table or sinks, d_head =
d_model / heads); the paper-architecture configs do not, and say so. A sparse
run converts like a dense one: its zeros are ordinary weights there.
The run made from Hugging Face saves, in RUN/config.json, the model fields
it took from the Hugging Face config and `init_from_hf`; it trains on with
`python -m sparse_gpt2.main --workdir=RUN`, the same --config flags,
`--config.init_from_hf=HF_DIR`, and each model field that differs from the
config file's (`main` names the fields that differ; for
configs/dense_gpt2_124m.py and a released GPT-2 small,
`--config.model.vocab_size=50257`).
"""

import os

from absl import flags
from ml_collections import config_flags

from sparse_gpt2 import cli
from sparse_gpt2 import data
from sparse_gpt2 import hf
from sparse_gpt2 import train
from sparse_gpt2 import workdir

_FROM_RUN = flags.DEFINE_string('from_run', None, 'Run directory to export.')
_TO_HF = flags.DEFINE_string('to_hf', None, 'Hugging Face directory to write.')
_FROM_HF = flags.DEFINE_string('from_hf', None, 'Hugging Face GPT-2 dir.')
_TO_RUN = flags.DEFINE_string('to_run', None, 'Run directory to create.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace --to_hf.')
# The checkout's, wherever the command runs from.
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'configs', 'dense_gpt2_124m.py')
_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG, 'Config of the run made by '
    '--to_run; its sizes, norm, embeddings and positions are set from the '
    'Hugging Face config (other model fields, e.g. bigram_table, must '
    'already match GPT-2).',
    lock_config=True)


def run_to_hf(run, out_dir, overwrite=False):
  """Exports the run's newest readable checkpoint with the tokenizer it
  trained on: the corpus's BPE, read from its cache or (on another
  machine) trained again, and refused unless its vocabulary is the one the
  run recorded (`corpus.json`). A model transformers cannot express, or an
  `out_dir` that may not be replaced, is refused before any of it is read."""
  hf.check_export(dict(workdir.load_config(run).model), out_dir, overwrite)
  config, _, state = train.load_run(run)
  tokenizer = data.load_tokenizer(config.data)
  workdir.check_corpus(run, {'vocab_sha256': data.vocab_digest(tokenizer)},
                       'the export would hold another tokenizer')
  hf.save(state.params, dict(config.model), out_dir, overwrite=overwrite,
          tokenizer=tokenizer)
  print(f'{run} step {int(state.step)} -> {out_dir}')


def hf_to_run(hf_dir, run, config):
  kwargs, _ = hf.load(hf_dir)
  with config.unlocked():
    config.model.update(kwargs)
    config.init_from_hf = hf_dir
    # Step 0 of the config's schedules, so training on resumes along them.
    config.schedule_steps = workdir.schedule_steps(config)
    config.train_steps = 0
  train.train_and_evaluate(config, run)


def _refuse_given(names, why):
  """Refuses the flags of `names` (and `--config`'s `--config.FIELD`
  overrides) where the command line gives them: the other direction's,
  which this one would silently ignore."""
  given = [f'--{name}' for name in flags.FLAGS if flags.FLAGS[name].present
           and (name in names or 'config' in names
                and name.startswith('config.'))]
  if given:
    raise ValueError(f'{given[0]} {why}')


def main():
  if _FROM_RUN.value and _TO_HF.value and not (_FROM_HF.value or _TO_RUN.value):
    _refuse_given(('config',), 'is for --from_hf/--to_run: an export takes '
                  'its model and config from the run')
    run_to_hf(_FROM_RUN.value, _TO_HF.value, _OVERWRITE.value)
  elif _FROM_HF.value and _TO_RUN.value and not (_FROM_RUN.value
                                                 or _TO_HF.value):
    _refuse_given(('overwrite',), 'is for --from_run/--to_hf: it replaces an '
                  'earlier export, never a run')
    try:  # The default, unread until here, may be missing (an install).
      config = _CONFIG.value
      config.keys()  # ml_collections raises only once it is used.
    except OSError as e:
      raise ValueError(f'--config: {str(e).splitlines()[-1].strip()}'
                       ) from None
    hf_to_run(_FROM_HF.value, _TO_RUN.value, config)
  else:
    raise ValueError('give either --from_run and --to_hf, or --from_hf and '
                     '--to_run')


if __name__ == '__main__':
  cli.run(main)
