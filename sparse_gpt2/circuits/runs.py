"""A trained run as circuits see it: its kept checkpoints, their validation
losses, and one checkpoint loaded with its corpus and node means, each read
once per process (`compare` asks the same checkpoints about every task)."""

import functools
import hashlib
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from sparse_gpt2 import data
from sparse_gpt2 import sparsity
from sparse_gpt2 import train
from sparse_gpt2 import workdir as workdir_lib
from sparse_gpt2.circuits import prune
from sparse_gpt2.circuits import tasks

MEAN_BATCHES = 16  # Batches of the run's training data for the node means.


def val_losses(workdir):
  """{step: validation loss} of every evaluation in workdir/metrics.jsonl
  (a resumed run's later record of a step wins)."""
  return {record['step']: record['val_loss']
          for record in workdir_lib.read_metrics(workdir)
          if 'val_loss' in record}


def checkpoints(workdir):
  """{step: validation loss or None} of the checkpoints kept in `workdir`."""
  if not os.path.exists(os.path.join(workdir, workdir_lib.CONFIG)):
    raise ValueError(f'{workdir} is not a run directory (no config.json)')
  losses = val_losses(workdir)
  return {step: losses.get(step)
          for step in workdir_lib.checkpoint_steps(workdir)}


@functools.lru_cache(maxsize=64)
def checkpoint_digest(workdir, step):
  """SHA-256 of a kept checkpoint's files, names and bytes: what says which
  weights a circuit was found in. A copy of the checkpoint digests the same
  wherever it lies and whatever its run is called; a run trained again into
  the same directory digests otherwise, so its old circuits are not taken
  for its new weights'. Read once per process (`cache_clear` to read again)."""
  root = pathlib.Path(workdir, workdir_lib.CHECKPOINTS, str(step))
  digest = hashlib.sha256()
  for path in sorted(p for p in root.rglob('*') if p.is_file()):
    with open(path, 'rb') as f:
      digest.update(f'{path.relative_to(root)}\0'.encode()
                    + hashlib.file_digest(f, 'sha256').digest())
  return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _config(workdir):
  return workdir_lib.load_config(workdir)


@functools.lru_cache(maxsize=4)
def _corpus(workdir):
  """The run's corpus, read once per run, not once per checkpoint. Refused
  where its vocabulary is not the one the run trained with (corpus.json),
  as happens to a corpus built again from another Python's stdlib or an
  edited source folder: its token ids would mean other text to the model, and every
  task would be scored on tokens it never read as such."""
  config = _config(workdir)
  corpus = data.load(config.data, config.seq_len)
  workdir_lib.check_corpus(
      workdir, {'vocab_sha256': data.vocab_digest(corpus.tokenizer)},
      'its prompts would be read in another tokenizer')
  return corpus


def sparsity_mode(workdir):
  """The run's `sparsity.mode`: 'none' for a dense model."""
  return _config(workdir).sparsity.mode


def annealed_step(workdir):
  """The step at which a top-k run reaches its target density (0 for a run
  that does not anneal): earlier checkpoints are denser models. Annealing
  runs over the run's schedule (`schedule_steps`, as `sparsity.density_at`
  is called), which a run that stops early (`train_steps`) keeps.

  The first step whose `density_at`, computed as the train step computes
  it (an int32 step, in float32), is the target's, found by bisection (the
  density never rises): ceil(0.55 * 100) in Python floats is 56, while
  such a run is at its target from step 55."""
  config = _config(workdir)
  if config.sparsity.mode != 'topk':
    return 0
  total = config.schedule_steps
  density = lambda step: sparsity.density_at(jnp.int32(step), config.sparsity,
                                             total)
  target, low, high = density(total), 0, total
  while low < high:
    mid = (low + high) // 2
    low, high = (mid + 1, high) if density(mid) > target else (low, mid)
  return low


def newest(workdir):
  """The newest kept checkpoint's step; an error if there is none."""
  steps = checkpoints(workdir)
  if not steps:
    raise ValueError(f'{workdir} holds no checkpoint')
  return max(steps)


def load(workdir, step=None):
  """A checkpoint of a run: {config, model, params, corpus, step, val_loss};
  `step` None is the newest."""
  return _load(workdir, newest(workdir) if step is None else step)


@functools.lru_cache(maxsize=8)
def _load(workdir, step):
  config, model, state = train.load_run(workdir, step)
  step = int(state.step)
  return {'config': config, 'model': model, 'params': state.params,
          'corpus': _corpus(workdir), 'step': step,
          'val_loss': val_losses(workdir).get(step)}


@functools.lru_cache(maxsize=8)
def node_means(workdir, step):
  """Node means of a checkpoint over MEAN_BATCHES batches of the run's
  training data: what pruned nodes are frozen to."""
  run = load(workdir, step)
  config = run['config']
  pretraining = np.stack([
      data.get_batch(run['corpus'].train_tokens, i, seed=config.seed,
                     batch_size=config.batch_size,
                     seq_len=config.seq_len)[:, :-1]
      for i in range(MEAN_BATCHES)])
  return prune.node_means(run['model'], run['params'], pretraining)


@functools.lru_cache(maxsize=8)
def _last_position_logits(workdir):
  """One jitted forward per run, shared by its checkpoints (same model), so
  evaluating many checkpoints compiles once per prompt shape."""
  model = train.make_model(_config(workdir))
  return jax.jit(lambda params, tokens, positions: model.apply(
      {'params': params}, tokens, positions=positions))


def evaluate_tasks(workdir, names, *, num_prompts, steps, seed=0):
  """How well the unpruned checkpoints at `steps` (None: the newest) do each
  task: per step, [{task, loss, accuracy, calibrated_loss}]. Only tasks
  whose calibrated loss is under a target can be pruned to it, so this says
  which tasks a run can be asked about, and over steps, when it learns them.
  Its calibration fits a scale and shift on the prompts it scores, so, as
  for the pruning's select split, a task needs MIN_SPLIT_PAIRS pairs and
  MIN_SPLIT_PROMPTS prompts. Tasks
  are encoded and checked once, before any checkpoint is read, and scored
  in forward passes of bounded size (`prune.length_buckets`)."""
  encoded_tasks = [encode_task(workdir, task, num_prompts, seed)
                   for task in names]
  for task, (name, _, encoded) in zip(names, encoded_tasks):
    pairs = len(np.unique(encoded['pair']))
    if (pairs < prune.MIN_SPLIT_PAIRS
        or len(encoded['pair']) < prune.MIN_SPLIT_PROMPTS):
      raise ValueError(
          f"{name}: {len(encoded['pair'])} prompts in "
          f'{prune.count_pairs(pairs)}; a calibrated task loss needs at '
          f'least {prune.MIN_SPLIT_PAIRS} pairs and {prune.MIN_SPLIT_PROMPTS} '
          f'prompts{_more_prompts(task)}')
  buckets = [(name, prune.length_buckets(encoded, 1, by_pair=False))
             for name, _, encoded in encoded_tasks]
  apply = _last_position_logits(workdir)
  results = []
  for step in steps:
    params = load(workdir, step)['params']
    rows = []
    for name, bucket in buckets:
      logits_and_answers = prune.scored(
          bucket, lambda b: apply(params, b['tokens'], b['lengths'] - 1))
      loss, accuracy = tasks.task_loss(*logits_and_answers)
      calibrated = prune.calibrated_loss(*logits_and_answers)[0]
      rows.append({'task': name, 'loss': float(loss),
                   'accuracy': float(accuracy),
                   'calibrated_loss': float(calibrated)})
    results.append(rows)
  return results


def task_name(task):
  """A task's name: a built-in task's own, a task file's its file name
  without the extension (tables, circuit files and figures are named so)."""
  if task.endswith('.jsonl'):
    return os.path.splitext(os.path.basename(task))[0]
  return task


def table_cell(text):
  """`text` as one cell of a markdown table: a | in it (a task file's name
  may hold one) would end the cell there and shift every column after it."""
  return str(text).replace('|', r'\|')


def task_datapoints(task, num_prompts, seed):
  """(name, datapoints) of `task`: a built-in task's name, whose
  `num_prompts` datapoints are generated from `seed`, or the path of a JSONL
  task file (ending in .jsonl), used whole and named by its file name
  without the extension. Every command that takes a task takes either."""
  if not task.endswith('.jsonl'):
    if task not in tasks.TASKS:
      raise ValueError(f'unknown task {task!r}: neither a built-in task '
                       f'({", ".join(tasks.TASKS)}) nor a .jsonl task file')
    return task, tasks.generate(task, num_prompts, seed)
  if not os.path.isfile(task):
    raise ValueError(f'task file {task} '
                     + ('is a directory' if os.path.isdir(task)
                        else 'does not exist'))
  return task_name(task), tasks.load_jsonl(task)


def prompts_digest(datapoints):
  """SHA-256 of a task's datapoints: what says which prompts a circuit was
  found on, so that an edited task file, or a built-in task whose generator
  changed, is pruned anew rather than answered from an old circuit."""
  return hashlib.sha256(json.dumps(datapoints, sort_keys=True).encode()
                        ).hexdigest()


def encode_task(workdir, task, num_prompts, seed):
  """(name, datapoints, encoded): `task` (`task_datapoints`) in the tokens
  of the run's tokenizer, within its sequence length (`tasks.encode`), its
  answers checked against a fixed preference (`tasks.check_balanced`; a
  refusal says how many datapoints `encode` skipped, which can unbalance
  a balanced file; a task file's datapoints are named by their lines).
  Reads no checkpoint, so a task that cannot be scored fails before any is
  loaded."""
  name, datapoints = task_datapoints(task, num_prompts, seed)
  lines = tasks.datapoint_lines(task) if task.endswith('.jsonl') else None
  encoded = tasks.encode(datapoints, _corpus(workdir).tokenizer,
                         _config(workdir).seq_len, name, lines)
  skipped = len(datapoints) - len(encoded['index'])
  try:
    tasks.check_balanced(encoded, name)
  except ValueError as e:
    if not skipped:
      raise
    # A pair whose one prompt is skipped leaves the other leaning alone:
    # the file may be balanced, the prompts scored are not.
    raise ValueError(
        f'{e} That is of the datapoints kept: {skipped} of '
        f'{len(datapoints)} were skipped, a candidate merging with the end '
        'of their prompt.') from None
  return name, datapoints, encoded


def check_split(task, encoded, settings):
  """Raises ValueError, named by the task (`task_datapoints`' `task`), where
  its prompts do not split into the pruning's train, select and test splits
  (`prune.split`): what the circuits CLI and `compare` check before any
  checkpoint is read."""
  try:
    prune.split(encoded, settings)
  except ValueError as e:
    raise ValueError(f'{task_name(task)}: {e}{_more_prompts(task)}') from None


def check_out(out, workdir):
  """Raises ValueError where the output folder `out` lies inside the
  checkpoints of the run `workdir`: the circuits and figures written there
  would change the digest of the checkpoint they land in (so none is ever
  reused), and a folder named by a step would read as a checkpoint, a
  damaged one, to every later command and to the run's own resumption."""
  kept = os.path.realpath(os.path.join(workdir, workdir_lib.CHECKPOINTS))
  if os.path.commonpath([kept, os.path.realpath(out)]) == kept:
    raise ValueError(f'--out {out} is inside the checkpoints of {workdir}: '
                     'give a folder of its own')


def _more_prompts(task):
  """How a task with too few pairs gets more, where the command decides: a
  task file named like a built-in task (an edited dump) is used whole, so
  it is told by its path, not by its name."""
  return ' (built in: raise --num_prompts)' if task in tasks.TASKS else ''


def find_circuit(workdir, settings, *, task, step=None, record_at=()):
  """The circuit of `task` (`task_datapoints`) in a checkpoint of a run
  (`prune.prune`), with what a reader needs beside it: the task and its
  prompts' digest, the run, the checkpoint's step and validation loss, and
  its first four prompts with their candidates as the tokenizer decodes
  them. Raises ValueError for bad input: an unknown task, a bad file, a
  task too small or too unbalanced to split (`check_split`), a directory
  that is not a run, a step that was not kept. The run is recorded by its
  absolute path, so that the explorer finds it from any folder."""
  name, datapoints, encoded = encode_task(workdir, task, settings.num_prompts,
                                         settings.seed)
  check_split(task, encoded, settings)
  run = load(workdir, step)
  tokenizer = run['corpus'].tokenizer
  circuit = prune.prune(run['model'], run['params'],
                        node_means(workdir, run['step']), encoded, settings,
                        record_at)
  examples = [{'prompt': datapoints[i]['prompt'],
               'correct': tokenizer.decode([int(c)]),
               'incorrect': tokenizer.decode([int(w)])}
              for i, c, w in zip(encoded['index'][:4],
                                 encoded['correct'], encoded['incorrect'])]
  return {'task': name, 'prompts_sha256': prompts_digest(datapoints),
          'run': os.path.abspath(workdir), 'step': run['step'],
          'checkpoint_sha256': checkpoint_digest(workdir, run['step']),
          'val_loss': run['val_loss'], 'examples': examples, **circuit}
