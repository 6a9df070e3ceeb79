r"""Sparse vs dense at matched pretraining loss: the circuit each model needs
for each task.

  python -m sparse_gpt2.circuits.compare --sparse=runs/sparse_medium \
      --dense=runs/dense_medium --out=runs/compare [--tasks=a,b,my.jsonl] \
      [--step=N] [--max_loss_gap=0.02] [--target_loss=0.15 --steps=...] \
      [--pairs=3] [--convergence_steps=100,300,1000,3000] [--curve]

The sparse run's checkpoint (`--step`, default newest) is paired with the
dense run's kept checkpoint of closest validation loss; a gap above
`--max_loss_gap` nats is refused (the paper's ratio is at matched loss). For
every task both are pruned (`runs.find_circuit`, every setting a flag) and

  OUT/circuits/<model>-<step>/<task>.json   the circuits; reused only when
                                            found in the same weights (the
                                            checkpoint's files), step,
                                            prompts and settings (all but
                                            --num_prompts, which the
                                            prompts' digest tells)
  OUT/<task>/figure.{png,svg}               the two circuits side by side
  OUT/comparison.{md,json}                  edges, nodes and test losses per
                                            task, the ratio, geometric means
  OUT/figure.{png,svg}                      the task whose ratio is closest
                                            to the geometric mean
  OUT/pairs.{md,json}                       with --pairs: the same against
                                            each of the dense checkpoints
                                            closest in loss, as a range
  OUT/convergence.{md,json}                 with --convergence_steps: circuit
                                            size after each number of steps
  OUT/curve.{md,json,png,svg}               with --curve: geometric-mean
                                            edges against validation loss
                                            over the checkpoints of both runs
"""

import dataclasses
import json
import math
import os

from absl import flags
from absl import logging

from sparse_gpt2 import cli
from sparse_gpt2 import workdir as workdir_lib
from sparse_gpt2.circuits import prune
from sparse_gpt2.circuits import runs
from sparse_gpt2.circuits import settings as settings_lib
from sparse_gpt2.circuits import tasks as tasks_lib

_SPARSE = flags.DEFINE_string('sparse', None, 'Run directory of the sparse '
                              'model.')
_DENSE = flags.DEFINE_string('dense', None, 'Run directory of the dense model.')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')
_TASKS = flags.DEFINE_list(
    'tasks', None, 'Tasks to compare: built-in tasks\' names or JSONL task '
    'files (.jsonl, the user-task format), named by the file name without '
    'the extension (default: every built-in task).')
_STEP = flags.DEFINE_integer('step', None, 'Sparse checkpoint (default: the '
                             'newest).')
_MAX_LOSS_GAP = flags.DEFINE_float(
    'max_loss_gap', 0.02, 'Largest validation-loss gap (nats) allowed between '
    'the paired checkpoints.')
_PAIRS = flags.DEFINE_integer(
    'pairs', 1, 'Compare against this many dense checkpoints, the closest '
    'in validation loss within --max_loss_gap, to show how far the ratio '
    'moves with the choice among equally matched ones (pairs.md); the '
    'closest makes comparison.md.', lower_bound=1)
_RECOMPUTE = flags.DEFINE_bool('recompute', False, 'Prune again even where '
                               'a matching circuit is saved.')
_CONVERGENCE_STEPS = flags.DEFINE_list(
    'convergence_steps', [], 'Also record each circuit after these numbers '
    'of pruning steps (one run of the scores per task and model).')
_CONVERGENCE_TASKS = flags.DEFINE_integer(
    'convergence_tasks', 3, 'How many of the tasks (the first ones) get the '
    'convergence record.', lower_bound=0)
_CURVE = flags.DEFINE_bool(
    'curve', False, 'Also prune every task at the kept checkpoints of both '
    'runs whose step is a multiple of --curve_every.')
_CURVE_EVERY = flags.DEFINE_integer('curve_every', 500, 'See --curve.',
                                    lower_bound=1)
settings_lib.define_flags()
# Listed by --help with the flags above: --target_loss was in --helpfull only.
flags.adopt_module_key_flags(settings_lib)
flags.mark_flags_as_required(['sparse', 'dense', 'out'])
flags.register_validator(  # NaN passes a lower_bound, and matched nothing.
    'max_loss_gap', lambda gap: 0 <= gap < math.inf,
    '--max_loss_gap must be >= 0 and finite')
flags.register_validator(
    'convergence_steps',
    lambda steps: all(s.isdigit() and int(s) >= 1 for s in steps),
    '--convergence_steps must be step counts >= 1, e.g. 100,200')

MODELS = ('sparse', 'dense')


def match(sparse_step, sparse_loss, dense_checkpoints, max_gap, count=1):
  """[(dense step, its loss)] of the `count` dense checkpoints closest in
  validation loss to the sparse one within `max_gap`, closest first (fewer
  where fewer are that close); ValueError when none is."""
  if not finite(sparse_loss):
    raise ValueError(f'the sparse checkpoint at step {sparse_step} has no '
                     'validation loss in metrics.jsonl'
                     + ('' if sparse_loss is None else f' ({sparse_loss})'))
  if not dense_checkpoints:
    raise ValueError('the dense run holds no checkpoint')
  scored = {s: v for s, v in dense_checkpoints.items() if finite(v)}
  if not scored:
    raise ValueError('no dense checkpoint has a validation loss')
  gap = {s: abs(v - sparse_loss) for s, v in scored.items()}
  ranked = sorted(gap, key=lambda s: (gap[s], s))
  step = ranked[0]
  if gap[step] > max_gap:
    raise ValueError(
        f'no dense checkpoint within {max_gap} nats of the sparse one '
        f'(step {sparse_step}, val loss {sparse_loss:.4f}); the closest is '
        f'step {step} at {scored[step]:.4f}; keep more dense checkpoints '
        '(keep_every) or pass --max_loss_gap')
  return [(s, scored[s]) for s in ranked[:count] if gap[s] <= max_gap]


def finite(loss):
  """Whether a validation loss from metrics.jsonl can be paired and
  plotted: a number, not NaN or inf (a NaN sorts anywhere, and paired
  nothing or the wrong checkpoint)."""
  return isinstance(loss, (int, float)) and math.isfinite(loss)


def summarize(results, checkpoints):
  """The comparison table as data, from circuits already found.

  Args:
    results: {task: (sparse_circuit, dense_circuit)}, in table order, at
      least one task.
    checkpoints: {'sparse': {'run', 'step', 'val_loss'}, 'dense': {...}}.

  Returns:
    A JSON-able dict: one row per task; the geometric means of both edge
    counts and of the dense/sparse ratio over the tasks both models solve
    (a task one model cannot do has no circuit to compare); which tasks are
    not solved and by which model; and `figure_task`, the task solved by both
    whose ratio is closest (in log) to the geometric mean: the typical case,
    not the best one.
  """
  rows, not_solved = [], {}
  for task, pair in results.items():
    row = {'task': task}
    for name, c in zip(MODELS, pair):
      solved = bool(c['solved'])
      row[name] = {
          'solved': solved,
          'edges': c['num_edges'] if solved else None,
          'nodes': c['num_nodes'] if solved else None,
          'circuit_loss': c['losses']['circuit_only'] if solved else None,
          'ablated_loss': c['losses']['circuit_ablated'] if solved else None,
          'full_model_loss': c['losses']['full_model'],
          'steps_run': c['steps_run'],  # None where not solved.
          'settled': c['settled'],
          'seconds': c['seconds'],
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
        'edges_sparse': geometric_mean([r['sparse']['edges']
                                        for r in compared]),
        'edges_dense': geometric_mean([r['dense']['edges'] for r in compared]),
        'nodes_sparse': geometric_mean([r['sparse']['nodes']
                                        for r in compared]),
        'nodes_dense': geometric_mean([r['dense']['nodes'] for r in compared]),
        'ratio': geometric_mean([r['ratio'] for r in compared]),
    }
  figure_task = min(
      compared, key=lambda r: abs(math.log(r['ratio'] / geomean['ratio'])),
      default=None)
  first = next(iter(results.values()))
  return {
      'checkpoints': checkpoints,
      'target_loss': first[0]['target_loss'],
      'settings': first[0]['settings'],
      'tasks': rows,
      'not_solved': not_solved,
      'num_compared': len(compared),
      'geomean': geomean,
      'figure_task': figure_task['task'] if figure_task else None,
  }


def geometric_mean(values):
  return math.exp(sum(math.log(v) for v in values) / len(values))


def to_markdown(summary):
  """The summary as a Markdown report: checkpoints, the table, the means."""
  out = ['# Circuit size: sparse vs dense', '',
         'Checkpoints (paired by validation loss; the edge ratio is only '
         'meaningful at matched loss):', '']
  for name in MODELS:
    c = summary['checkpoints'][name]
    out.append(f"- {name}: `{c['run']}` step {c['step']}, validation loss "
               f"{_num(c['val_loss'], '.4f')}")
  s = summary['settings']
  out += [
      '',
      f"Each circuit is the smallest learned mask, of those every "
      f"{prune.SNAPSHOT_EVERY} steps in the second half of {s['steps']} "
      "pruning steps and at the last (a multiplier holds their train loss at "
      f"{_num(summary['target_loss'], 'g')}), that reaches that loss on "
      "the selection split (calibrated; where none does, the smaller of the "
      "first half's smallest that does and the last one extended by the "
      "next nodes by score); losses are on the untouched "
      "test split: circuit = everything outside the circuit ablated, "
      "ablated = the circuit ablated. " + _extended(summary), '',
      '| task | edges sparse | edges dense | dense/sparse | nodes sparse | '
      'nodes dense | circuit loss sparse / dense | ablated loss sparse / '
      'dense |',
      '|---|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for r in summary['tasks']:
    sp, de = r['sparse'], r['dense']
    out.append(
        f"| {runs.table_cell(r['task'])} | {_count(sp, 'edges')} | "
        f"{_count(de, 'edges')} | "
        f"{_num(r['ratio'], '.1f')}{'x' if r['ratio'] else ''} | "
        f"{_count(sp, 'nodes')} | {_count(de, 'nodes')} | "
        f"{_num(sp['circuit_loss'], '.3f')} / "
        f"{_num(de['circuit_loss'], '.3f')} | "
        f"{_num(sp['ablated_loss'], '.3f')} / "
        f"{_num(de['ablated_loss'], '.3f')} |")
  out.append('')
  g = summary['geomean']
  if g:
    n = summary['num_compared']
    out.append(
        f"Geometric mean over the {n} task{'s' * (n != 1)} solved by "
        f"both: {g['edges_sparse']:,.0f} edges sparse, {g['edges_dense']:,.0f} "
        f"edges dense, **{g['ratio']:.1f}x** fewer edges in the sparse model "
        f"({g['nodes_sparse']:,.0f} against {g['nodes_dense']:,.0f} nodes; "
        'Gao et al. 2025 report ~16x fewer edges).')
  else:
    out.append('No task is solved by both models, so there is no ratio.')
  edgeless = [f"{r['task']} ({' and '.join(_edgeless(r))})"
              for r in summary['tasks']
              if r['task'] not in summary['not_solved'] and _edgeless(r)]
  if edgeless:
    out += ['', 'Solved by both but not in the means, a circuit of no edges '
            '(the direct path alone does the task) having no ratio: '
            + '; '.join(edgeless) + '.']
  if summary['not_solved']:
    by_task = {r['task']: r for r in summary['tasks']}
    parts = []
    for task, models in summary['not_solved'].items():
      losses = ', '.join(
          f"{m} {_num(by_task[task][m]['full_model_loss'], '.3f')}"
          for m in models)
      parts.append(f'{task} (full-model test loss: {losses})')
    out += ['', 'Not solved, so not in the means (the full model misses the '
            'target loss on the selection split): ' + '; '.join(parts) + '.']
  if summary['figure_task']:
    out += ['', f"`figure.png` shows `{summary['figure_task']}`, the task "
            'whose ratio is closest to the geometric mean; every task has '
            'its own in `<task>/figure.png`.']
  return '\n'.join(out) + '\n'


def pairs_table(summaries, asked, max_gap):
  """Markdown and data: `summarize`'s result against each paired dense
  checkpoint (closest in validation loss first), and how far the ratio
  moves among them: each checkpoint's geometric mean over the tasks it and
  the sparse model solve, and over the tasks solved at every pairing (the
  same tasks for all, so the one to read as a range)."""
  sparse = summaries[0]['checkpoints']['sparse']
  tasks = [r['task'] for r in summaries[0]['tasks']]
  common = [t for i, t in enumerate(tasks)
            if all(s['tasks'][i]['ratio'] is not None for s in summaries)]
  common_ratios = [
      geometric_mean([r['ratio'] for r in s['tasks'] if r['task'] in common])
      if common else None for s in summaries]
  fewer = f' ({asked} asked for)' if len(summaries) < asked else ''
  lines = [
      f"Sparse step {sparse['step']} (validation loss "
      f"{_num(sparse['val_loss'], '.4f')}) against the {len(summaries)} "
      f'dense checkpoints closest in validation loss within {max_gap:g} '
      f'nats{fewer}:', '',
      '| dense step | val loss | solved by both | edges sparse / dense | '
      'dense/sparse | on the tasks all solve | '
      + ' | '.join(map(runs.table_cell, tasks)) + ' |',
      '|---:|---:|---:|---:|---:|---:|' + '---:|' * len(tasks)]
  for s, common_ratio in zip(summaries, common_ratios):
    d, g = s['checkpoints']['dense'], s['geomean']
    lines.append(
        f"| {d['step']} | {_num(d['val_loss'], '.4f')} | "
        f"{s['num_compared']}/{len(tasks)} | "
        + (f"{g['edges_sparse']:,.0f} / {g['edges_dense']:,.0f} | "
           f"{g['ratio']:.1f}x" if g else 'n/a | n/a')
        + f" | {_num(common_ratio, '.1f')}{'x' if common_ratio else ''} | "
        + ' | '.join(_ratio_cell(r) for r in s['tasks']) + ' |')
  lines.append('')
  if common:
    lines.append(
        f'On the {len(common)} task{"s" * (len(common) != 1)} solved at '
        f"every pairing ({', '.join(common)}) the sparse model has "
        f'{min(common_ratios):.1f}-{max(common_ratios):.1f}x fewer edges.')
  else:
    lines.append('No task is solved by both models at every pairing.')
  data = {'pairs': summaries, 'common_tasks': common,
          'common_ratios': common_ratios}
  return '\n'.join(lines) + '\n', data


def _ratio_cell(row):
  if row['ratio'] is not None:
    return f"{row['ratio']:.1f}x"
  failed = [name for name in MODELS if not row[name]['solved']]
  if failed:
    return f"{' and '.join(failed)} not solved"
  return f"{' and '.join(_edgeless(row))} no edges"


def _edgeless(row):
  """The models whose circuit of a task is solved with no edges."""
  return [name for name in MODELS
          if row[name]['solved'] and not row[name]['edges']]


def _extended(summary):
  """Which circuits came from runs that went on because their masks were
  still shrinking (`prune.run_length`), and which still were at the end."""
  steps = summary['settings']['steps']
  solved = [(r['task'], name, r[name]) for r in summary['tasks']
            for name in MODELS if r[name]['solved']]
  longer = [f"{task} {name} ({row['steps_run']:,} steps)"
            for task, name, row in solved if row['steps_run'] > steps]
  unsettled = [f'{task} {name}' for task, name, row in solved
               if not row['settled']]
  if not longer:  # --max_extensions=0 leaves a shrinking mask at steps.
    return (f"Still shrinking at step {steps:,}, where every run stopped, so "
            f"larger than the task needs: {', '.join(unsettled)}."
            if unsettled else f'Every mask had settled by step {steps:,}.')
  out = (f'Pruned on past step {steps:,}, their masks still shrinking '
         f"there: {', '.join(longer)}.")
  if unsettled:
    out += (f" Still shrinking at the end, so larger than the task needs: "
            f"{', '.join(unsettled)}.")
  return out


def _count(model_row, key):
  if not model_row['solved']:
    return 'not solved'
  return f'{model_row[key]:,}'


def _num(value, spec):
  return 'n/a' if value is None else format(value, spec)


def reusable(circuit, run, step, prompts_sha256, settings):
  """Whether a saved circuit was found in the weights of this run's
  checkpoint (its files' digest: a copied run reuses, a run trained again
  under the same name prunes anew), on these prompts (their digest: an
  edited task file prunes anew), with exactly these settings and this
  version of the algorithm (a changed default or method re-prunes). Of the
  settings, --num_prompts only picks the prompts, which their digest
  tells: a task file, which never reads it, is not pruned again when it
  changes."""
  def pruning(recorded):
    return {k: v for k, v in recorded.items() if k != 'num_prompts'}
  return (circuit.get('version') == prune.VERSION
          and circuit['step'] == step
          and circuit.get('prompts_sha256') == prompts_sha256
          and pruning(circuit['settings']) == pruning(
              dataclasses.asdict(settings))
          and circuit.get('checkpoint_sha256') ==
          runs.checkpoint_digest(run, step))


def _circuit(run, step, task, settings, out, model, record_at=()):
  """The circuit of `run` at `step` for `task` (a --tasks entry): from
  disk when a reusable one is there (and has the convergence record asked
  for), else pruned now and saved."""
  name, datapoints = runs.task_datapoints(task, settings.num_prompts,
                                          settings.seed)
  path = os.path.join(out, 'circuits', f'{model}-{step}', name + '.json')
  if os.path.exists(path) and not _RECOMPUTE.value:
    try:  # A damaged file is pruned anew, like an outdated one.
      circuit = workdir_lib.read_json(path)
    except ValueError:  # Not JSON, or not even UTF-8.
      circuit = {}
    if (isinstance(circuit, dict)
        and reusable(circuit, run, step, runs.prompts_digest(datapoints),
                     settings)
        and (not circuit['solved'] or set(record_at) <= {
            c['steps'] for c in circuit['convergence']})):
      logging.info('Reusing %s', path)
      return circuit
  logging.info('Pruning %s step %d for %s', run, step, task)
  circuit = runs.find_circuit(run, settings, step=step, task=task,
                              record_at=record_at)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  workdir_lib.write_atomic(workdir_lib.path(path), json.dumps(circuit))
  return circuit


def convergence_table(results, names, steps):
  """Markdown and data: each circuit's edges and nodes after each of
  `steps` pruning steps, and how far its edges are from the last's. A
  circuit reused from disk may have recorded more steps than asked for:
  only `steps` are shown."""
  records = []
  lines = ['| task | model | ' + ' | '.join(f'{s} steps' for s in steps)
           + ' |', '|---|---|' + '---:|' * len(steps)]
  for task in names:
    for model, circuit in zip(MODELS, results[task]):
      if not circuit['solved']:
        continue
      recorded = {c['steps']: c for c in circuit['convergence']}
      conv = [recorded[s] for s in steps]
      records.append({'task': task, 'model': model, 'convergence': conv})
      final = conv[-1]['num_edges']  # A change from 0 has no ratio.
      lines.append(f'| {runs.table_cell(task)} | {model} | ' + ' | '.join(
          f"{c['num_edges']:,} edges / {c['num_nodes']:,} nodes"
          + (f" ({c['num_edges'] / final - 1:+.0%})" if final else '')
          for c in conv) + ' |')
  return '\n'.join(lines) + '\n', records


def curve_checkpoints(runs_):
  """{model: {step: validation loss}} of the checkpoints the curve prunes:
  those kept at multiples of --curve_every with a validation loss, a top-k
  run's from the end of its annealing (before it they are denser than the
  model the curve is about). Raises ValueError, before any pruning, where a
  run has none: the curve would have no line of it, after hours."""
  chosen = {}
  for model, run in runs_.items():
    annealed = runs.annealed_step(run)
    kept = runs.checkpoints(run)
    chosen[model] = {step: val for step, val in kept.items()
                     if not step % _CURVE_EVERY.value and finite(val)
                     and step >= annealed}
    if not chosen[model]:
      raise ValueError(
          f'--curve: no kept checkpoint of {run} is at a multiple of '
          f'--curve_every={_CURVE_EVERY.value} with a validation loss'
          + (f' from step {annealed}, where its annealing ends'
             if annealed else '') + f': {list(kept)}')
  return chosen


def curve(runs_, chosen, task_names, settings, out):
  """Geometric-mean circuit edges against validation loss, one line per
  model, over the checkpoints `curve_checkpoints` chose: the paper's Fig. 3
  shape. A point's mean is over the tasks that checkpoint solves and whose
  circuit has edges (`averaged`; a circuit of no edges, the direct path
  alone, has no logarithm); only points that average every task share one
  set of tasks."""
  points = []
  for model in MODELS:
    for step, val in chosen[model].items():
      circuits = [_circuit(runs_[model], step, t, settings, out, model)
                  for t in task_names]
      solved = [c for c in circuits if c['solved']]
      edges = [c['num_edges'] for c in solved if c['num_edges']]
      points.append({
          'model': model, 'step': step, 'val_loss': val,
          'solved': len(solved), 'tasks': len(task_names),
          'averaged': len(edges),
          'edges': geometric_mean(edges) if edges else None})
  lines = ['| model | step | val loss | tasks solved | geomean edges |',
           '|---|---:|---:|---:|---:|']
  lines += [f"| {p['model']} | {p['step']} | {p['val_loss']:.3f} | "
            f"{p['solved']}/{p['tasks']} | {_num(p['edges'], ',.0f')} |"
            for p in points]
  return '\n'.join(lines) + '\n', points


def _check_args(runs_, out, task_names, settings):
  """Raises ValueError, one line, where the arguments cannot work; checked
  before any pruning, which takes minutes: two runs, a sparse one as
  --sparse and a dense one as --dense, whose validation losses compare
  (`_check_same_tokens`), --out a directory or nothing yet and not inside
  either run's checkpoints, no two tasks share a name, and every task is
  read (a task file's format too), encoded for both runs (its candidates
  single tokens of each tokenizer) and split (enough pairs)."""
  for model, run in runs_.items():
    if not os.path.isdir(run):
      raise ValueError(f'--{model}={run} is not a directory')
  if os.path.samefile(runs_['sparse'], runs_['dense']):
    raise ValueError(f'--sparse and --dense are the same run: '
                     f'{runs_["sparse"]}')
  cli.check_output_dir(out)
  for run in runs_.values():
    runs.check_out(out, run)
  modes = {model: runs.sparsity_mode(run) for model, run in runs_.items()}
  if modes['sparse'] == 'none' or modes['dense'] != 'none':
    swapped = modes['sparse'] == 'none' and modes['dense'] != 'none'
    raise ValueError(
        "--sparse takes a run with sparse weights and --dense one without "
        f"(sparsity.mode 'none'); got {modes['sparse']!r} and "
        f"{modes['dense']!r}" + (' (swapped?)' if swapped else ''))
  _check_same_tokens(runs_)
  if not task_names:
    raise ValueError('--tasks is empty')
  names = [runs.task_name(t) for t in task_names]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise ValueError(f'two tasks named {", ".join(twice)} in --tasks')
  for task in task_names:
    for run in runs_.values():
      _, _, encoded = runs.encode_task(run, task, settings.num_prompts,
                                       settings.seed)
      runs.check_split(task, encoded, settings)


def _check_same_tokens(runs_):
  """Raises ValueError where the runs' validation losses do not measure the
  same thing, so that matching them pairs nothing: another vocabulary
  (per token of other tokens), another validation text (their corpus.json,
  where both have one: a run saved before the record has none), or another
  seq_len (per token of longer contexts).

  Warns where they are means over other validation windows: an evaluation
  reads the first eval_batches x batch_size windows of an order drawn with
  seed + 1 (`train.evaluate`), 256 of the stdlib's ~4,600, and the means of
  two seeds' windows differ by more than --max_loss_gap (a bigram model's
  spread 0.025 nats, standard deviation, over 20 seeds). A second seed of
  one twin against the other's circuits is a comparison worth making
  (docs/circuits.md), its pairing by loss only coarser."""
  records = {}
  for model, run in runs_.items():
    file = os.path.join(run, workdir_lib.CORPUS)
    if os.path.exists(file):
      records[model] = workdir_lib.read_json(file)
  if len(records) == 2 and all(isinstance(r, dict) for r in records.values()):
    sparse, dense = records['sparse'], records['dense']
    differ = [key for key in ('vocab_sha256', 'validation_sha256')
              if key in sparse and key in dense and sparse[key] != dense[key]]
    if differ:
      raise ValueError(
          f'--sparse and --dense were trained on other corpora (corpus.json: '
          f'{", ".join(differ)} differ), so their validation losses do not '
          'compare')
  configs = {model: workdir_lib.load_config(run)
             for model, run in runs_.items()}
  sparse_config, dense_config = configs['sparse'], configs['dense']
  if sparse_config.seq_len != dense_config.seq_len:
    raise ValueError(
        f'--sparse and --dense were trained at seq_len '
        f'{sparse_config.seq_len} and {dense_config.seq_len}, so their '
        'validation losses do not compare')
  windows = {model: (c.seed, c.eval_batches * c.batch_size)
             for model, c in configs.items()}
  if windows['sparse'] != windows['dense']:
    logging.warning(
        '--sparse and --dense were evaluated on other validation windows '
        '(seed, eval_batches x batch_size: %s and %s): their losses differ '
        'by the windows drawn too (~0.03 nats at 256 windows), so a pairing '
        'by loss is that much coarser', windows['sparse'], windows['dense'])


def _remove_earlier(out, name, extensions):
  """Removes OUT/name.<ext> of an earlier comparison that this one does not
  make (no task solved by both for the figure; --pairs, --convergence_steps
  or --curve not asked for): beside this one's comparison.md they would
  read as its own."""
  for ext in extensions:
    if os.path.exists(os.path.join(out, name + ext)):
      os.remove(os.path.join(out, name + ext))


def _write(out, name, markdown, data):
  """OUT/name.json and .md in UTF-8, as the project reads them, whatever
  the locale: in a C locale a run or task name beyond ASCII failed, after
  all the pruning, and left name.md empty. A name the file system gave as
  bytes it could not decode is written back as those bytes. Each file is
  whole or as it was (`write_atomic`): a disk that filled, a Ctrl-C or a
  second compare into the same --out as they were written left them cut
  short (an earlier comparison's too), which `view` then refused."""
  workdir_lib.write_atomic(workdir_lib.path(os.path.join(out, name + '.json')),
                           json.dumps(data, indent=2))
  workdir_lib.write_atomic(workdir_lib.path(os.path.join(out, name + '.md')),
                           markdown, errors='surrogateescape')


def main():
  settings_lib.start_jax()
  runs.checkpoint_digest.cache_clear()  # Read anew by each call of main.
  runs_ = {'sparse': _SPARSE.value, 'dense': _DENSE.value}
  task_names = list(tasks_lib.TASKS) if _TASKS.value is None else _TASKS.value
  out = _OUT.value
  settings = settings_lib.from_flags()
  settings.validate()
  _check_args(runs_, out, task_names, settings)
  record_at = tuple(int(s) for s in _CONVERGENCE_STEPS.value)
  sparse_ckpts = runs.checkpoints(runs_['sparse'])
  step = runs.newest(runs_['sparse']) if _STEP.value is None else _STEP.value
  if step not in sparse_ckpts:
    # Named as train.load_run names them for the circuits CLI's --step.
    raise ValueError(f'{runs_["sparse"]} has no checkpoint at step {step}; '
                     f'it has {sorted(sparse_ckpts)}')
  annealed = runs.annealed_step(runs_['sparse'])
  if step < annealed:  # As the curve leaves such checkpoints out.
    logging.warning('Sparse step %d is before step %d, where its annealing '
                    'ends: a denser model than the run trains.', step,
                    annealed)
  pairs = match(step, sparse_ckpts[step], runs.checkpoints(runs_['dense']),
                _MAX_LOSS_GAP.value, _PAIRS.value)
  dense_step, dense_loss = pairs[0]
  curve_at = curve_checkpoints(runs_) if _CURVE.value else None
  checkpoints = {
      'sparse': {'run': runs_['sparse'], 'step': step,
                 'val_loss': sparse_ckpts[step]},
      'dense': {'run': runs_['dense'], 'step': dense_step,
                'val_loss': dense_loss}}
  print(f"Pairing sparse step {step} (val loss {sparse_ckpts[step]:.4f}) "
        f"with dense step {dense_step} (val loss {dense_loss:.4f})"
        + (f", then {', '.join(str(s) for s, _ in pairs[1:])}"
           if pairs[1:] else '') + '.')
  named = {runs.task_name(t): t for t in task_names}
  # Imported here, past every refusal: matplotlib costs ~0.3 s of CPU that a
  # refused command line need not pay.
  from sparse_gpt2.circuits import viz  # pylint: disable=g-import-not-at-top
  results = {}
  for i, (name, task) in enumerate(named.items()):
    record = record_at if i < _CONVERGENCE_TASKS.value else ()
    results[name] = tuple(
        _circuit(runs_[m], checkpoints[m]['step'], task, settings, out, m,
                 record) for m in MODELS)
    viz.draw_comparison(*results[name], os.path.join(out, name, 'figure'))
  summary = summarize(results, checkpoints)
  markdown = to_markdown(summary)
  _write(out, 'comparison', markdown, summary)
  if summary['figure_task']:
    viz.draw_comparison(*results[summary['figure_task']],
                        os.path.join(out, 'figure'))
  else:
    _remove_earlier(out, 'figure', ('.png', '.svg'))
  print(markdown)
  if _PAIRS.value > 1:
    summaries = [summary]
    for other_step, other_loss in pairs[1:]:
      other = dict(checkpoints, dense={**checkpoints['dense'],
                                       'step': other_step,
                                       'val_loss': other_loss})
      summaries.append(summarize(
          {name: (results[name][0], _circuit(runs_['dense'], other_step,
                                             task, settings, out, 'dense'))
           for name, task in named.items()}, other))
    table, data = pairs_table(summaries, _PAIRS.value, _MAX_LOSS_GAP.value)
    _write(out, 'pairs', table, data)
    print(table)
  else:
    _remove_earlier(out, 'pairs', ('.md', '.json'))
  if record_at:
    table, records = convergence_table(
        results, list(named)[:_CONVERGENCE_TASKS.value],
        sorted(set(record_at) | {settings.steps}))
    _write(out, 'convergence', table, records)
    print(table)
  else:
    _remove_earlier(out, 'convergence', ('.md', '.json'))
  if _CURVE.value:
    table, points = curve(runs_, curve_at, task_names, settings, out)
    _write(out, 'curve', table, points)
    viz.draw_curve(points, checkpoints, os.path.join(out, 'curve'))
    print(table)
  else:
    _remove_earlier(out, 'curve', ('.md', '.json', '.png', '.svg'))


if __name__ == '__main__':
  cli.run(main)
