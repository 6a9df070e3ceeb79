r"""Finds the circuit of a task in a trained run, saves and draws it.

  python -m sparse_gpt2.circuits --workdir=runs/sparse_small \
      --task=single_double_quote
  python -m sparse_gpt2.circuits --workdir=RUN --task_file=my_task.jsonl
  python -m sparse_gpt2.circuits --list_tasks
  python -m sparse_gpt2.circuits --workdir=RUN --evaluate  # which it solves

Writes OUT/circuit.json and OUT/circuit.png/.svg (OUT defaults to
RUN/circuits/TASK, TASK being a task file's name without extension) and
prints one summary line. Bad input is one `error:` line on stderr, exit 1.
"""

import json
import os
import sys

from absl import app
from absl import flags

from sparse_gpt2 import metrics
from sparse_gpt2.circuits import prune
from sparse_gpt2.circuits import tasks

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory.')
_TASK = flags.DEFINE_string('task', None, 'Built-in task (see --list_tasks).')
_TASK_FILE = flags.DEFINE_string(
    'task_file', None, 'JSONL task, one {"prompt", "correct", "incorrect"} '
    'a line.')
_TARGET_LOSS = flags.DEFINE_float(
    'target_loss', 0.15, 'Calibrated task loss the circuit must reach.')
_OUT = flags.DEFINE_string('out', None,
                           'Output directory (default RUN/circuits/TASK).')
_STEPS = flags.DEFINE_integer('steps', 100, 'Mask training steps.')
_K_COEF = flags.DEFINE_float('k_coef', 1e-4, 'Penalty per kept node.')
_LR = flags.DEFINE_float('lr', 1e-2, 'Learning rate of the node scores.')
_NUM_EXAMPLES = flags.DEFINE_integer(
    'num_examples', 512, 'Prompts generated for a built-in task.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of prompts, split and masks.')
_DRAW = flags.DEFINE_bool('draw', True, 'Also draw circuit.png/.svg.')
_LIST_TASKS = flags.DEFINE_bool('list_tasks', False,
                                'Print the built-in tasks and exit.')
_EVALUATE = flags.DEFINE_bool(
    'evaluate', False, 'Print the unpruned model\'s loss and accuracy on '
    '--task (default: every built-in task) and exit: which tasks it solves.')


def _summary(c, out):
  losses = c['losses']
  if not c['solved']:
    return (f'{c["task"]}: not solved: full model loss '
            f'{losses["full_model"]:.3f} > target {c["target_loss"]}; '
            f'{c["seconds"]:.0f} s -> {out}')
  return (f'{c["task"]}: {c["num_nodes"]}/{c["total_nodes"]} nodes, '
          f'{c["num_edges"]}/{c["total_edges"]} edges; loss full '
          f'{losses["full_model"]:.3f}, circuit {losses["circuit_only"]:.3f}, '
          f'ablated {losses["circuit_ablated"]:.3f}; {c["seconds"]:.0f} s '
          f'-> {out}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _LIST_TASKS.value:
    print('\n'.join(tasks.TASKS))
    return
  metrics.quiet_library_logs()
  try:
    if not _WORKDIR.value:
      raise ValueError('--workdir is required')
    if _EVALUATE.value:
      names = [_TASK.value] if _TASK.value else list(tasks.TASKS)
      print('| task | loss | accuracy | calibrated loss |\n|---|---:|---:|---:|')
      for r in prune.evaluate_tasks(_WORKDIR.value, names, seed=_SEED.value):
        print(f"| {r['task']} | {r['loss']:.3f} | {r['accuracy']:.2f} | "
              f"{r['calibrated_loss']:.3f} |")
      return
    circuit = prune.find_circuit(
        _WORKDIR.value, task=_TASK.value, task_file=_TASK_FILE.value,
        target_loss=_TARGET_LOSS.value, num_examples=_NUM_EXAMPLES.value,
        steps=_STEPS.value, k_coef=_K_COEF.value, lr=_LR.value,
        seed=_SEED.value)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  out = _OUT.value or os.path.join(_WORKDIR.value, 'circuits',
                                   circuit['task'])
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'circuit.json'), 'w') as f:
    json.dump(circuit, f, indent=1)
  if _DRAW.value:
    # Imported here: matplotlib costs seconds that --draw=false need not pay.
    from sparse_gpt2.circuits import viz  # pylint: disable=g-import-not-at-top
    viz.draw_circuit(circuit, os.path.join(out, 'circuit'))
  print(_summary(circuit, out))


if __name__ == '__main__':
  app.run(main)
