r"""Finds the circuit of a task in a trained run, saves and draws it.

  python -m sparse_gpt2.circuits --workdir=runs/sparse_medium \
      --task=single_double_quote [--step=N] [--steps=1000 ...]
  python -m sparse_gpt2.circuits --workdir=RUN --task_file=my_task.jsonl
  python -m sparse_gpt2.circuits --list_tasks
  python -m sparse_gpt2.circuits --task=for_while --dump_prompts=f.jsonl
  python -m sparse_gpt2.circuits --workdir=RUN --evaluate [--evaluate_every=N]

Writes OUT/circuit.json and OUT/circuit.png/.svg (OUT defaults to
RUN/circuits/TASK, TASK being a task file's name without extension) and
prints one summary line. `--evaluate` prints the unpruned model's loss on
every task (at --step, or with --evaluate_every at kept checkpoints: task
competence as training goes). Every pruning setting is a flag of the same
name (`settings.Settings`). Bad input is one `error:` line on stderr (`cli.run`).
"""

import json
import os

from absl import flags

from sparse_gpt2 import cli
from sparse_gpt2 import workdir as workdir_lib
from sparse_gpt2.circuits import settings as settings_lib
from sparse_gpt2.circuits import tasks

# Prompts of a built-in task that --evaluate scores unless --num_prompts is
# given (the pruning's default, 1024, is four times as many).
_EVALUATE_PROMPTS = 256

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the '
                             'newest).')
_TASK = flags.DEFINE_string('task', None, 'Built-in task (see --list_tasks).')
_TASK_FILE = flags.DEFINE_string(
    'task_file', None, 'JSONL task (a .jsonl file), one {"prompt", "correct", '
    '"incorrect"[, "pair"]} a line.')
_OUT = flags.DEFINE_string('out', None,
                           'Output directory (default RUN/circuits/TASK).')
_DRAW = flags.DEFINE_bool('draw', True, 'Also draw circuit.png/.svg.')
_LIST_TASKS = flags.DEFINE_bool('list_tasks', False,
                                'Print the built-in tasks and exit.')
_DUMP_PROMPTS = flags.DEFINE_string(
    'dump_prompts', None, 'Write --task\'s generated datapoints '
    '(--num_prompts of them, --seed) to this JSONL file, in the user-task '
    'format, and exit.')
_EVALUATE = flags.DEFINE_bool(
    'evaluate', False, 'Print the unpruned model\'s loss and accuracy on '
    '--task or --task_file (default: every built-in task) and exit: which '
    'tasks it solves. A built-in task gives it --num_prompts prompts if the '
    'flag is given, else %d.' % _EVALUATE_PROMPTS)
_EVALUATE_EVERY = flags.DEFINE_integer(
    'evaluate_every', 0, 'With --evaluate: at every kept checkpoint whose '
    'step is a multiple of this, as a table of calibrated task loss against '
    'step and tokens (0: only --step).', lower_bound=0)
settings_lib.define_flags()
# Listed by --help with the flags above: --target_loss was in --helpfull only.
flags.adopt_module_key_flags(settings_lib)


def _summary(c, out):
  losses = c['losses']
  if not c['solved']:
    return (f'{c["task"]}: not solved: full model select loss '
            f'{c["select_loss"]["full_model"]:.3f} > target '
            f'{c["target_loss"]}, so nothing to prune (a later checkpoint '
            f'or a looser --target_loss may solve it); {c["seconds"]:.0f} s '
            f'-> {out}')
  return (f'{c["task"]}: {c["num_nodes"]}/{c["total_nodes"]} nodes, '
          f'{c["num_edges"]}/{c["total_edges"]} edges after '
          f'{c["steps_run"]} pruning steps'
          f'{"" if c["settled"] else " (the mask still shrinking)"}; test '
          f'loss full {losses["full_model"]:.3f}, circuit '
          f'{losses["circuit_only"]:.3f}, '
          f'ablated {losses["circuit_ablated"]:.3f}; {c["seconds"]:.0f} s '
          f'-> {out}')


def _dump_prompts(path):
  _task()  # Both given: refused, not the file silently left out.
  if not _TASK.value:
    raise ValueError('--dump_prompts needs --task')
  if not path.endswith('.jsonl'):  # What --task_file reads; not config.json.
    raise ValueError(f'--dump_prompts must name a .jsonl file, got {path}')
  datapoints = tasks.generate(_TASK.value, flags.FLAGS.num_prompts,
                              flags.FLAGS.seed)
  text = ''.join(json.dumps(d) + '\n' for d in datapoints)
  if os.path.isfile(path):
    # A dump edited into a task of its own, or a run's metrics.jsonl,
    # would be lost; the same dump again loses nothing.
    with open(path, 'rb') as f:
      if f.read() != text.encode():
        raise ValueError(f'--dump_prompts={path} exists and holds other '
                         'datapoints or records: name a new file, or remove '
                         'it first')
  # Whole or not at all: half a dump, a full disk's, was then refused as
  # other datapoints.
  workdir_lib.write_atomic(workdir_lib.path(path), text)
  print(f'{len(datapoints)} datapoints of {_TASK.value} -> {path}')


def _task():
  """--task or --task_file (at most one) as `runs.task_datapoints` takes it."""
  if _TASK.value and _TASK_FILE.value:
    raise ValueError('give --task or --task_file, not both')
  if _TASK_FILE.value and not _TASK_FILE.value.endswith('.jsonl'):
    raise ValueError(f'--task_file must be a .jsonl file, got '
                     f'{_TASK_FILE.value}')
  return _TASK.value or _TASK_FILE.value


def _runs():
  """The `runs` module, imported when a run is read: it brings training,
  the data pipeline and checkpointing (~0.8 s of CPU), which --list_tasks,
  --dump_prompts and a refused command line need not wait for."""
  from sparse_gpt2.circuits import runs  # pylint: disable=g-import-not-at-top
  return runs


def _evaluate(workdir, names):
  """Markdown: the unpruned model on each task, at one step or all."""
  runs = _runs()
  seed = flags.FLAGS.seed
  num_prompts = (_EVALUATE_PROMPTS
                 if flags.FLAGS['num_prompts'].using_default_value
                 else flags.FLAGS.num_prompts)
  if not _EVALUATE_EVERY.value:
    lines = ['| task | loss | accuracy | calibrated loss |',
             '|---|---:|---:|---:|']
    [rows] = runs.evaluate_tasks(workdir, names, steps=[_STEP.value],
                                 num_prompts=num_prompts, seed=seed)
    for r in rows:
      lines.append(f"| {runs.table_cell(r['task'])} | {r['loss']:.3f} | "
                   f"{r['accuracy']:.2f} | {r['calibrated_loss']:.3f} |")
    return '\n'.join(lines)
  kept = runs.checkpoints(workdir)
  steps = {s: v for s, v in kept.items() if s % _EVALUATE_EVERY.value == 0}
  if not steps:
    raise ValueError(f'no kept checkpoint of {workdir} is at a multiple of '
                     f'--evaluate_every={_EVALUATE_EVERY.value}: {list(kept)}')
  config = workdir_lib.load_config(workdir)  # Tasks refused before a load.
  lines = ['| step | tokens | val loss | '
           + ' | '.join(runs.table_cell(runs.task_name(n)) for n in names)
           + ' |',
           '|---:|---:|---:|' + '---:|' * len(names)]
  every_step = runs.evaluate_tasks(workdir, names, steps=list(steps),
                                  num_prompts=num_prompts, seed=seed)
  for (step, val), rows in zip(steps.items(), every_step):
    lines.append(
        f'| {step} | {step * config.batch_size * config.seq_len:,} | '
        f"{'n/a' if val is None else format(val, '.3f')} | " +
        ' | '.join(f"{r['calibrated_loss']:.3f}" for r in rows) + ' |')
  return '\n'.join(lines)


def main():
  if _LIST_TASKS.value:
    print('\n'.join(tasks.TASKS))
    return
  settings_lib.start_jax()
  settings = settings_lib.from_flags()
  settings.validate()
  if _DUMP_PROMPTS.value:
    _dump_prompts(_DUMP_PROMPTS.value)
    return
  if not _WORKDIR.value:
    raise ValueError('--workdir is required')
  if _EVALUATE_EVERY.value and not _EVALUATE.value:  # Else it would prune.
    raise ValueError('--evaluate_every needs --evaluate')
  if _EVALUATE_EVERY.value and _STEP.value is not None:
    raise ValueError('give --step or --evaluate_every, not both')
  task = _task()
  if _EVALUATE.value:
    print(_evaluate(_WORKDIR.value, [task] if task else list(tasks.TASKS)))
    return
  if not task:
    raise ValueError('give --task or --task_file')
  runs = _runs()
  name = runs.task_name(task)
  out = _OUT.value or os.path.join(_WORKDIR.value, 'circuits', name)
  if task.endswith('.jsonl') and not _OUT.value and name in tasks.TASKS:
    # A file dumped from a built-in task and edited is another task, given
    # as --task_file or, as every command takes a task, as --task.
    flag = '--task_file' if _TASK_FILE.value else '--task'
    raise ValueError(f'{flag}={task} is named like the built-in task {name}, '
                     f'whose circuit is {out}: pass --out or rename the file')
  cli.check_output_dir(out)  # Found now, not after the pruning.
  runs.check_out(out, _WORKDIR.value)
  circuit = runs.find_circuit(_WORKDIR.value, settings, task=task,
                              step=_STEP.value)
  os.makedirs(out, exist_ok=True)
  workdir_lib.write_atomic(workdir_lib.path(os.path.join(out, 'circuit.json')),
                           json.dumps(circuit, indent=1))
  figure = os.path.join(out, 'circuit')
  if _DRAW.value:
    # Imported here: matplotlib costs seconds that --draw=false need not pay.
    from sparse_gpt2.circuits import viz  # pylint: disable=g-import-not-at-top
    viz.draw_circuit(circuit, figure)
  else:  # An earlier circuit's figure would contradict this circuit.json.
    for ext in ('.png', '.svg'):
      if os.path.exists(figure + ext):
        os.remove(figure + ext)
  print(_summary(circuit, out))


if __name__ == '__main__':
  cli.run(main)
