"""Sparse vs dense: the circuit each model needs for each task.

  python -m sparse_gpt2.circuits.compare --sparse=runs/sparse --dense=runs/dense \
      --out=runs/compare [--tasks=a,b] [--target_loss=0.15] [--steps=N]

For every task, prunes both runs to their smallest circuit that reaches the
target task loss (`circuits.prune.find_circuit`) and writes

  OUT/<task>/{sparse,dense}.json   the circuits; reused on a rerun with the
                                   same runs, target loss and --steps
                                   (pruning takes minutes) unless --recompute
  OUT/<task>/figure.{png,svg}      the two circuits side by side
  OUT/comparison.{md,json}         edges and nodes per task, the dense/sparse
                                   edge ratio and its geometric mean
  OUT/figure.{png,svg}             the paper's figure, for the task solved by
                                   both with the smallest sparse circuit

Gao et al. 2025 report ~16x fewer edges in the sparse model. The ratio only
means something between models of matched pretraining loss, so both runs'
validation losses are printed and recorded beside it.
"""

import json
import math
import os
import sys

from absl import app
from absl import flags
from absl import logging

from sparse_gpt2 import metrics
from sparse_gpt2.circuits import viz
from sparse_gpt2.circuits import tasks as tasks_lib

_SPARSE = flags.DEFINE_string('sparse', None, 'Run directory of the sparse '
                              'model.')
_DENSE = flags.DEFINE_string('dense', None, 'Run directory of the dense model.')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')
_TASKS = flags.DEFINE_list('tasks', None, 'Tasks to compare (default: all of '
                           'circuits.tasks.TASKS).')
_TARGET_LOSS = flags.DEFINE_float('target_loss', 0.15, 'Task loss a circuit '
                                  'must reach.')
_STEPS = flags.DEFINE_integer('steps', None, 'Pruning steps (default: '
                              "find_circuit's).")
_RECOMPUTE = flags.DEFINE_bool('recompute', False, 'Prune again even where '
                               'OUT/<task>/*.json exist.')
flags.mark_flags_as_required(['sparse', 'dense', 'out'])

MODELS = ('sparse', 'dense')


def last_val_loss(run):
  """The validation loss of the last evaluation in `run`/metrics.jsonl, or
  None if the run has none."""
  path = os.path.join(run, 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    lines = [line for line in f if '"val_loss"' in line]
  return json.loads(lines[-1])['val_loss'] if lines else None


def summarize(results, val_losses):
  """The comparison table as data, from circuits already found.

  Args:
    results: {task: (sparse_circuit, dense_circuit)}, in table order, at
      least one task.
    val_losses: {'sparse': float or None, 'dense': float or None}, the runs'
      pretraining validation losses.

  Returns:
    A JSON-able dict: one row per task; the geometric means of both edge
    counts and of the dense/sparse ratio over the tasks both models solve
    (a task one model cannot do has no circuit to compare); which tasks are
    not solved and by which model; and `figure_task`, the task solved by both
    with the smallest sparse circuit, the most readable one to draw.
  """
  rows, not_solved = [], {}
  for task, pair in results.items():
    row = {'task': task}
    for name, c in zip(MODELS, pair):
      row[name] = {
          'solved': bool(c['solved']),
          'edges': c['num_edges'] if c['solved'] else None,
          'nodes': c['num_nodes'] if c['solved'] else None,
          'circuit_loss': c['losses'].get('circuit_only') if c['solved']
                          else None,
          'full_model_loss': c['losses'].get('full_model'),
      }
    failed = [name for name in MODELS if not row[name]['solved']]
    if failed:
      not_solved[task] = failed
    # A solved circuit with no edges (the direct path alone does the task)
    # has no finite ratio; it is kept in the table but not in the means.
    sparse_edges, dense_edges = row['sparse']['edges'], row['dense']['edges']
    row['ratio'] = (dense_edges / sparse_edges
                    if not failed and sparse_edges and dense_edges else None)
    rows.append(row)

  compared = [r for r in rows if r['ratio'] is not None]
  geomean = None
  if compared:
    geomean = {
        'edges_sparse': _geomean([r['sparse']['edges'] for r in compared]),
        'edges_dense': _geomean([r['dense']['edges'] for r in compared]),
        'ratio': _geomean([r['ratio'] for r in compared]),
    }
  both = [r for r in rows if r['task'] not in not_solved]
  figure_task = min(both, key=lambda r: (r['sparse']['edges'],
                                         r['sparse']['nodes']),
                    default=None)
  first = next(iter(results.values()))
  return {
      'runs': {name: c.get('run') for name, c in zip(MODELS, first)},
      'val_loss': dict(val_losses),
      'target_loss': first[0]['target_loss'],
      'tasks': rows,
      'not_solved': not_solved,
      'num_compared': len(compared),
      'geomean': geomean,
      'figure_task': figure_task['task'] if figure_task else None,
  }


def _geomean(values):
  return math.exp(sum(math.log(v) for v in values) / len(values))


def to_markdown(summary):
  """The summary as a Markdown report: losses, the table, the means."""
  val = summary['val_loss']
  runs = summary['runs']
  out = [
      '# Circuit size: sparse vs dense',
      '',
      'Pretraining validation loss (the edge ratio is only meaningful at '
      'matched loss):',
      '',
      f"- sparse: {_num(val['sparse'], '.4f')}  ({runs['sparse']})",
      f"- dense: {_num(val['dense'], '.4f')}  ({runs['dense']})",
      '',
      f"Circuits are the smallest found with task loss \u2264 "
      f"{_num(summary['target_loss'], 'g')}; circuit loss is the task loss "
      'with everything outside the circuit ablated.',
      '',
      '| task | edges sparse | edges dense | dense/sparse | nodes sparse | '
      'nodes dense | circuit loss sparse | circuit loss dense |',
      '|---|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for r in summary['tasks']:
    s, d = r['sparse'], r['dense']
    out.append(
        f"| {r['task']} | {_count(s, 'edges')} | {_count(d, 'edges')} | "
        f"{_num(r['ratio'], '.1f')}{'x' if r['ratio'] else ''} | "
        f"{_count(s, 'nodes')} | {_count(d, 'nodes')} | "
        f"{_num(s['circuit_loss'], '.3f')} | "
        f"{_num(d['circuit_loss'], '.3f')} |")
  out.append('')
  g = summary['geomean']
  if g:
    out.append(
        f"Geometric mean over the {summary['num_compared']} tasks solved by "
        f"both: {g['edges_sparse']:,.0f} edges sparse, {g['edges_dense']:,.0f} "
        f"edges dense, **{g['ratio']:.1f}x** fewer edges in the sparse model "
        '(Gao et al. 2025 report ~16x).')
  else:
    out.append('No task is solved by both models, so there is no ratio.')
  if summary['not_solved']:
    by_task = {r['task']: r for r in summary['tasks']}
    parts = []
    for task, models in summary['not_solved'].items():
      losses = ', '.join(
          f"{m} {_num(by_task[task][m]['full_model_loss'], '.3f')}"
          for m in models)
      parts.append(f'{task} (full-model task loss: {losses})')
    out += ['', 'Not solved, so not in the means (the full model misses the '
            'target loss): ' + '; '.join(parts) + '.']
  if summary['figure_task']:
    out += ['', f"`figure.png` shows `{summary['figure_task']}`, the task "
            'solved by both with the smallest sparse circuit; every task has '
            'its own in `<task>/figure.png`.']
  return '\n'.join(out) + '\n'


def _count(model_row, key):
  if not model_row['solved']:
    return 'not solved'
  return f'{model_row[key]:,}'


def _num(value, spec):
  return 'n/a' if value is None else format(value, spec)


def _circuit(run, task, path):
  """The circuit of `run` for `task`, from `path` when it was already found
  for this run, target loss and (if given) number of steps, else pruned now
  and saved there."""
  if os.path.exists(path) and not _RECOMPUTE.value:
    with open(path) as f:
      circuit = json.load(f)
    if (circuit['target_loss'] == _TARGET_LOSS.value
        # By basename, so another path to the same run still matches.
        and _name(circuit['run']) == _name(run)
        and _STEPS.value in (None, circuit['pruning']['steps'])):
      logging.info('Reusing %s', path)
      return circuit
  from sparse_gpt2.circuits import prune  # pylint: disable=g-import-not-at-top
  logging.info('Pruning %s for %s', run, task)
  kwargs = {'target_loss': _TARGET_LOSS.value}
  if _STEPS.value is not None:
    kwargs['steps'] = _STEPS.value
  circuit = prune.find_circuit(run, task=task, **kwargs)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'w') as f:  # A killed run leaves no half file.
    json.dump(circuit, f)
  os.replace(path + '.tmp', path)
  return circuit


def _name(run):
  return os.path.basename(os.path.normpath(run))


def _check_args(runs, task_names):
  """The one-line reason the arguments cannot work, or None; checked before
  any pruning, which takes minutes."""
  for name, run in runs.items():
    if not os.path.isdir(run):
      return f'--{name}={run} is not a directory'
  if not task_names:
    return '--tasks is empty'
  unknown = [t for t in task_names if t not in tasks_lib.TASKS]
  if unknown:
    return (f'unknown task(s) {", ".join(unknown)}; known: '
            f'{", ".join(tasks_lib.TASKS)}')
  return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  metrics.quiet_library_logs()
  runs = {'sparse': _SPARSE.value, 'dense': _DENSE.value}
  task_names = list(tasks_lib.TASKS) if _TASKS.value is None else _TASKS.value
  error = _check_args(runs, task_names)
  if error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(1)

  out = _OUT.value
  val_losses = {name: last_val_loss(run) for name, run in runs.items()}
  results = {}
  try:
    for task in task_names:
      results[task] = tuple(
          _circuit(runs[name], task, os.path.join(out, task, name + '.json'))
          for name in MODELS)
      viz.draw_comparison(*results[task], os.path.join(out, task, 'figure'))
  except (ValueError, FileNotFoundError) as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)

  summary = summarize(results, val_losses)
  markdown = to_markdown(summary)
  with open(os.path.join(out, 'comparison.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(out, 'comparison.md'), 'w') as f:
    f.write(markdown)
  if summary['figure_task']:
    viz.draw_comparison(*results[summary['figure_task']],
                        os.path.join(out, 'figure'))
  print(markdown)


if __name__ == '__main__':
  app.run(main)
