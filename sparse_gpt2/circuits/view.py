r"""Circuit explorer: one self-contained HTML page to read circuits in.

  python -m sparse_gpt2.circuits.view --compare=runs/compare \
      --out=runs/compare/index.html
  python -m sparse_gpt2.circuits.view --circuits=runs/sparse_medium/circuits \
      --out=circuits.html [--load_runs=false]

`--compare` reads what `compare` wrote (comparison.json and
circuits/<model>-<step>/<task>.json) and shows "Sparse GPT-2" beside
"GPT-2 (baseline)"; `--circuits` reads the circuit files in a directory
(DIR/circuit.json, DIR/*/circuit.json or DIR/*.json), one panel per run and
checkpoint. The page is one file: its data is JSON inside it and its script
and style are inline (`view.html` is the template), so it opens from disk,
with no server, no network and nothing to install, and can be mailed.

What the circuit files do not hold is computed here, from each circuit's run
and checkpoint (skipped with a note on the page when the run directory is
not there, when its checkpoint is not the weights the circuit records by
digest, or with --load_runs=false): the top-activating tokens of every
circuit node in a few thousand validation tokens, and each model's
probability of the two candidates on the task's example prompts, full model
and circuit only. Bad input is one `error:` line on stderr (`cli.run`).
"""

import glob
import json
import os
import tempfile

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparse_gpt2 import cli
from sparse_gpt2 import model as model_lib
from sparse_gpt2 import workdir as workdir_lib
from sparse_gpt2.circuits import runs
from sparse_gpt2.circuits import tasks
from sparse_gpt2.circuits import viz

LOCATIONS = model_lib.NODE_LOCATIONS
PANEL_LABELS = {'sparse': 'Sparse GPT-2', 'dense': 'GPT-2 (baseline)'}
# What the page reads of every circuit file (`compact`, the panels): every
# prune VERSION writes them all; a file without the last three would draw a
# blank page, every node in layer 0, or a solved circuit as 'not solved'.
CIRCUIT_FIELDS = ('task', 'run', 'step', 'nodes', 'edges', 'losses',
                  'solved', 'num_layers', 'layer_sizes')
TEMPLATE = os.path.join(os.path.dirname(__file__), 'view.html')
_DATA_MARK = '/*DATA*/null'  # Where the template takes the page's JSON.


def _rounded(x, digits=4):
  """`x` to `digits` significant digits: the page shows no more, and a
  dense circuit's 20,000 edge weights are much of its size."""
  return None if x is None else float(f'{x:.{digits}g}')


def node_key(layer, location, index):
  """A node's name in the page: in URLs, snippet tables and links."""
  return f'{layer}/{location}/{index}'


def _location(name):
  if name not in LOCATIONS:
    raise ValueError(f'node location {name!r} is none of {list(LOCATIONS)}')
  return LOCATIONS.index(name)


def compact(circuit):
  """What the page needs of a circuit, as columns and index pairs.

  Nodes become columns (layer, location, index, score, importance, the
  task loss with the node alone ablated where prune measured it); edges
  become [source node, destination node, weight] sorted strongest first, so
  the page draws the strongest K by slicing; residual links (`viz`) become
  node pairs.
  """
  nodes = circuit['nodes']
  where = {(v['layer'], v['location'], v['index']): i
           for i, v in enumerate(nodes)}
  edges = sorted(
      ([where[tuple(e['src'])], where[tuple(e['dst'])], _rounded(e['value'])]
       for e in circuit['edges']), key=lambda e: -abs(e[2]))
  base = circuit['losses'].get('circuit_only')
  links = viz.residual_links(nodes)  # Pairs of the dicts in `nodes`.
  ids = {id(v): i for i, v in enumerate(nodes)}
  keep = ('step', 'val_loss', 'solved', 'target_loss', 'num_nodes',
          'num_edges', 'total_nodes', 'total_edges', 'edges_truncated',
          'past_mask', 'steps_run', 'settled', 'losses', 'select_loss',
          'num_layers', 'layer_sizes')
  return {
      **{k: circuit.get(k) for k in keep},
      'd_head': circuit.get('model_shape', {}).get('d_head'),
      'nodes': {
          'layer': [v['layer'] for v in nodes],
          'location': [_location(v['location']) for v in nodes],
          'index': [v['index'] for v in nodes],
          'score': [_rounded(v.get('score')) for v in nodes],
          'importance': [_rounded(v.get('importance')) for v in nodes],
          'ablated_loss': [
              None if v.get('ablation_effect') is None or base is None
              else _rounded(base + v['ablation_effect']) for v in nodes],
      },
      'edges': edges,
      'residual': [[ids[id(a)], ids[id(b)]] for a, b in links],
  }


def _node_activations(model):
  """A jitted forward: (params, tokens [B, T]) -> {'block_i': {location:
  [B, T, width]}}, every node's activation at every token.

  The model sows only batch means ('node_stats'); the per-token values are
  the return values of `Block._node`, caught with `nn.intercept_methods`,
  so the model needs no extra output for this. Without remat, which
  computes the same values: a value caught inside a remat'd block is a
  tracer of its checkpoint, and leaked out of it (UnexpectedTracerError).
  """
  model = model.clone(remat='none')
  def forward(params, tokens):
    acts = {}

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == '_node':
        acts.setdefault(context.module.name, {})[args[0]] = out
      return out

    with nn.intercept_methods(record):
      model.apply({'params': params}, tokens)
    return acts

  return jax.jit(forward)


def top_snippets(run, means, keys, num_tokens, per_node):
  """The validation tokens at which each node of `keys` is furthest from
  its mean (the value ablation puts there), `per_node` of them.

  Reads `num_tokens` of the run's validation stream as windows of its
  seq_len spread evenly over the stream (one file would say little about
  most nodes). Returns {'tokens': ids [num windows * seq_len], 'seq_len',
  'vocab': {id: text}, 'top': {key: [[position, activation], ...]},
  'mean': {key: mean}}, strongest first; a position indexes `tokens`.
  """
  config, corpus = run['config'], run['corpus']
  seq_len = config.seq_len
  val = np.asarray(corpus.val_tokens)
  count = max(1, min(num_tokens // seq_len, len(val) // seq_len))
  starts = np.linspace(0, len(val) - seq_len, count).astype(int)
  windows = np.stack([val[s:s + seq_len] for s in starts]).astype(np.int32)
  acts = jax.device_get(_node_activations(run['model'])(run['params'],
                                                        windows))
  wanted = {}
  for key in keys:
    layer, location, index = key.split('/')
    wanted.setdefault((f'block_{layer}', location), []).append(
        (key, int(index)))
  top, mean_of = {}, {}
  for (block, location), members in wanted.items():
    values = acts[block][location].reshape(-1, acts[block][location].shape[-1])
    mean = np.asarray(means[block][location])
    columns = np.array([i for _, i in members])
    distance = np.abs(values[:, columns] - mean[columns])
    k = min(per_node, len(values))
    best = np.argpartition(-distance, k - 1, axis=0)[:k]
    for j, (key, index) in enumerate(members):
      rows = best[np.argsort(-distance[best[:, j], j]), j]
      top[key] = [[int(r), _rounded(float(values[r, index]), 3)]
                  for r in rows]
      mean_of[key] = _rounded(float(mean[index]), 3)
  tokenizer = corpus.tokenizer
  return {'tokens': windows.reshape(-1).tolist(), 'seq_len': seq_len,
          'vocab': {int(t): tokenizer.decode([int(t)])
                    for t in np.unique(windows)},
          'top': top, 'mean': mean_of}


def _circuit_mask(circuit, means):
  """The 'node_mask' tree that keeps exactly the circuit's nodes."""
  mask = jax.tree.map(lambda m: np.zeros(m.shape, np.float32), means)
  for v in circuit['nodes']:
    mask[f"block_{v['layer']}"][v['location']][v['index']] = 1.0
  return mask


def example_probabilities(run, means, circuit, examples):
  """Per example prompt ({prompt, correct, incorrect}): the model's softmax
  probability of the correct and the incorrect candidate, full model and
  circuit only (the rest mean-ablated), and the circuit's calibrated
  two-way probability of the correct one (the logit scale and shift its
  reported losses use). None for a prompt the run's tokenizer cannot score
  (`tasks.encode` skips it; all None where it refuses them all, as another
  run's tokenizer may: the examples are the first circuit's)."""
  if not examples:
    return []
  try:
    encoded = tasks.encode(examples, run['corpus'].tokenizer,
                           run['config'].seq_len, circuit['task'])
  except ValueError:
    return [None] * len(examples)
  tokens = jnp.asarray(encoded['tokens'])
  positions = jnp.asarray(encoded['lengths'] - 1)
  variables = {'params': run['params']}
  logits = {'full': run['model'].apply(variables, tokens,
                                       positions=positions)}
  if circuit['solved']:  # No node kept is every node mean-ablated.
    logits['circuit'] = run['model'].apply(
        {**variables, 'node_mask': _circuit_mask(circuit, means),
         'node_mean': means}, tokens, positions=positions)
  correct, incorrect = encoded['correct'], encoded['incorrect']
  probs = {k: np.asarray(jax.nn.softmax(v)) for k, v in logits.items()}
  rows = [None] * len(examples)
  for n, i in enumerate(encoded['index']):
    rows[i] = {k: [_rounded(float(p[n, correct[n]])),
                   _rounded(float(p[n, incorrect[n]]))]
               for k, p in probs.items()}
  if 'circuit' in logits and circuit.get('logit_scale'):
    calibrated = calibrated_probability(
        np.asarray(logits['circuit']), correct, incorrect,
        circuit['logit_scale'], circuit['logit_shift'])
    for n, i in enumerate(encoded['index']):
      rows[i]['calibrated'] = _rounded(float(calibrated[n]))
  return rows


def calibrated_probability(logits, correct, incorrect, scale, shift):
  """P(correct of the two candidates) under a circuit's calibration, as
  `prune.calibrated_loss` defines it: the scale and shift apply to the
  logit difference taken lower token id first, whose loss is
  softplus(-margin), so the probability is sigmoid(margin)."""
  first = np.minimum(correct, incorrect)
  rows = np.arange(len(logits))
  diff = logits[rows, first] - logits[rows, correct + incorrect - first]
  margin = np.where(correct == first, 1.0, -1.0) * (scale * diff + shift)
  return 1 / (1 + np.exp(-margin))


def _unverified(panel, circuits, digest):
  """The tasks of `circuits` not found in the weights whose digest is
  `digest` (the panel's checkpoint as it is now), each kind said in a note
  on the panel: a circuit that records other weights (its run trained again
  since, its node indices perhaps past the new model's), and one that
  records none (a file from before circuits did), whose weights cannot be
  told: neither is shown beside data that may be other weights'."""
  where = f"run {panel['run']} step {panel['step']}"

  def who(names):
    of = '' if len(names) == len(circuits) else ' of ' + ', '.join(names)
    return ('the circuit' if len(names) == 1 else 'the circuits') + of

  other = [t for t, c in circuits.items()
           if c.get('checkpoint_sha256') not in (None, digest)]
  unknown = [t for t, c in circuits.items()
             if c.get('checkpoint_sha256') is None]
  notes = []
  if other:
    notes.append(f'{where} holds other weights than {who(other)} '
                 f"{'was' if len(other) == 1 else 'were'} found in")
  if unknown:
    notes.append(f"{who(unknown)} record{'s' if len(unknown) == 1 else ''} "
                 f'no checkpoint digest, so whether {where} holds '
                 f"{'its' if len(unknown) == 1 else 'their'} weights is "
                 'unknown')
  panel['notes'].extend(notes)
  return sorted(other + unknown)


def run_data(panel, circuits, examples, snippet_tokens, per_node):
  """(snippets, {task: example probabilities}) of one panel's run at its
  step, for its `circuits` ({task: circuit}) and the tasks' `examples`;
  (None, {}) with a note on the panel when that run is not on this
  machine, or no longer keeps (or cannot read) that step's checkpoint, or
  holds other weights there than its circuits were found in (`_unverified`:
  their probabilities are left out, and the snippets, which the page shows
  for every circuit of the panel)."""
  run_dir, step = panel['run'], panel['step']
  if not os.path.isfile(os.path.join(run_dir, workdir_lib.CONFIG)):
    panel['notes'].append(f'run {run_dir} is not on this machine: no '
                          'snippets or prompt probabilities')
    return None, {}
  try:
    run = runs.load(run_dir, step)
  except ValueError as e:  # A step rotated out, or a damaged checkpoint.
    panel['notes'].append(f'{e}: no snippets or prompt probabilities')
    return None, {}
  unverified = _unverified(panel, circuits,
                           runs.checkpoint_digest(run_dir, run['step']))
  if unverified and len(unverified) == len(circuits):
    panel['notes'][-1] += ': no snippets or prompt probabilities'
    return None, {}
  means = jax.device_get(runs.node_means(run_dir, run['step']))
  snippets = None
  if unverified:
    panel['notes'][-1] += (': no snippets, and no prompt probabilities for '
                           + ', '.join(unverified))
  else:
    keys = sorted({node_key(v['layer'], v['location'], v['index'])
                   for c in circuits.values() for v in c['nodes']})
    snippets = top_snippets(run, means, keys, snippet_tokens, per_node)
  return snippets, {task: example_probabilities(run, means, c,
                                                examples[task])
                    for task, c in circuits.items() if task not in unverified}


_KINDS = {'task': (str, 'a string'), 'run': (str, 'a string'),
          'step': (int, 'an integer')}


def _mistyped(record, keys):
  """'KEY VALUE is not KIND' for the first of `keys` (all in `record`) that
  is not what the page takes it for, else None: a null run would be a
  TypeError once panels are made, a null step the run's newest checkpoint."""
  for key in keys:
    kind, name = _KINDS[key]
    if not isinstance(record[key], kind) or isinstance(record[key], bool):
      return f'{key} {record[key]!r} is not {name}'
  return None


def _counts(value, bound=float('inf')):
  """Whether `value` is an integer (not a bool) in [0, bound)."""
  return (isinstance(value, int) and not isinstance(value, bool)
          and 0 <= value < bound)


def _misshapen(circuit):
  """What of a `compact`-able circuit the page cannot draw or its run not
  read, else None: a model shape (num_layers, a size for every location in
  layer_sizes) that is not one, a node outside it (drawn off its panel, or
  a traceback once the run's weights are indexed by it), a loss the page
  formats that is no number, or example prompts not as `runs.find_circuit`
  writes them (a traceback scoring them; a page whose script stops at
  either): a hand-edited or foreign file."""
  num_layers, sizes = circuit['num_layers'], circuit['layer_sizes']
  if not _counts(num_layers) or num_layers == 0:
    return f'num_layers {num_layers!r} is not a positive integer'
  if not isinstance(sizes, dict) or not all(
      _counts(sizes.get(loc)) and sizes[loc] > 0 for loc in LOCATIONS):
    return (f'layer_sizes {sizes!r} gives no positive integer size to each '
            f'of {list(LOCATIONS)}')
  for v in circuit['nodes']:
    if not (_counts(v['layer'], num_layers)
            and _counts(v['index'], sizes[v['location']])):
      return (f"node {node_key(v['layer'], v['location'], v['index'])} is "
              f"outside its {num_layers} layers of {sizes[v['location']]} "
              f"{v['location']}")
  losses = {'val_loss': circuit.get('val_loss'),
            **{f'losses.{k}': v for k, v in circuit['losses'].items()}}
  for name, value in losses.items():
    if value is not None and (isinstance(value, bool)
                              or not isinstance(value, (int, float))):
      return f'{name} {value!r} is not a number'
  examples = circuit.get('examples') or []
  if not isinstance(examples, list) or not all(
      isinstance(e, dict) and all(isinstance(e.get(k), str)
                                  for k in ('prompt', 'correct', 'incorrect'))
      for e in examples):
    return 'examples is not a list of {prompt, correct, incorrect} strings'
  return None


def _whole(circuit, path):
  """`circuit` (read from `path`) if it has every CIRCUIT_FIELDS and the
  page can read it, else a one-line error that names the file."""
  if not isinstance(circuit, dict):
    raise ValueError(f'{path} is not a circuit file (not a JSON object)')
  missing = [k for k in CIRCUIT_FIELDS if k not in circuit]
  if missing:
    raise ValueError(f'{path} is not a whole circuit file (no {missing})')
  wrong = _mistyped(circuit, ('task', 'run', 'step'))
  if wrong:
    raise ValueError(f'{path} is not a circuit file the page can read '
                     f'({wrong})')
  try:
    page = compact(circuit)
  except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
    raise ValueError(f'{path} is not a circuit file the page can read '
                     f'({type(e).__name__}: {e})') from None
  wrong = _misshapen(circuit)
  if wrong:
    raise ValueError(f'{path} is not a circuit file the page can read '
                     f'({wrong})')
  try:
    json.dumps(page, allow_nan=False)
  except ValueError as e:  # NaN or infinity, which JSON cannot hold.
    raise ValueError(f'{path}: {e} (a diverged checkpoint\'s?); leave it '
                     'out') from None
  return circuit


def _summary(summary, path):
  """`summary` (read from `path`) if it has what `from_compare` reads of a
  compare summary, else a one-line error that names the file and what is
  missing: other JSON there is not a traceback."""
  def lacks():
    if not isinstance(summary, dict):
      return 'not a JSON object'
    checkpoints = summary.get('checkpoints')
    for model in PANEL_LABELS:
      c = checkpoints.get(model) if isinstance(checkpoints, dict) else None
      if not isinstance(c, dict):
        return f'no checkpoints.{model}'
      for key in ('run', 'step', 'val_loss'):
        if key not in c:
          return f'no checkpoints.{model}.{key}'
      wrong = _mistyped(c, ('run', 'step'))
      if wrong:
        return f'checkpoints.{model}.{wrong}'
    if not isinstance(summary.get('tasks'), list):
      return 'no list of tasks'
    for row in summary['tasks']:
      if not isinstance(row, dict) or not isinstance(row.get('task'), str):
        return f'a task row with no task name: {row!r}'
    return None
  missing = lacks()
  if missing:
    raise ValueError(f'{path} is not a compare summary ({missing})')
  return summary


def from_compare(directory):
  """(panels, {task: [circuit per panel]}, summary) of a `compare` output
  directory, in its table's task order."""
  path = os.path.join(directory, 'comparison.json')
  if not os.path.isfile(path):
    raise ValueError(f'{directory} is not a compare output directory (no '
                     'comparison.json)')
  summary = _summary(workdir_lib.read_json(path), path)
  panels, by_task = [], {}
  for model in ('sparse', 'dense'):
    checkpoint = summary['checkpoints'][model]
    panels.append({'label': PANEL_LABELS[model], 'run': checkpoint['run'],
                   'step': checkpoint['step'],
                   'val_loss': checkpoint['val_loss'], 'notes': []})
    for row in summary['tasks']:
      circuit_path = os.path.join(directory, 'circuits',
                                  f"{model}-{checkpoint['step']}",
                                  row['task'] + '.json')
      if not os.path.isfile(circuit_path):
        raise ValueError(f'{circuit_path} is missing')
      by_task.setdefault(row['task'], []).append(
          _whole(workdir_lib.read_json(circuit_path), circuit_path))
  if not by_task:
    raise ValueError(f'{path} lists no task')
  return panels, by_task, summary


def from_circuits(directory):
  """(panels, {task: [circuit or None per panel]}, None) of the circuit
  files in `directory`: one panel per run (however its path was written)
  and step, in the order found; two circuits of one task there are
  refused, naming both."""
  folder = glob.escape(directory)  # Its name may hold [ ] * ?.
  paths = sorted({*glob.glob(os.path.join(folder, 'circuit.json')),
                  *glob.glob(os.path.join(folder, '*.json')),
                  *glob.glob(os.path.join(folder, '*', 'circuit.json'))})
  found = {path: _whole(c, path)
           for path, c in zip(paths, map(workdir_lib.read_json, paths))
           if isinstance(c, dict) and 'nodes' in c and 'task' in c}
  if not found:  # A run's directory, or compare's: where its circuits are.
    hint = ''
    if os.path.isfile(os.path.join(directory, 'comparison.json')):
      hint = f': give --compare={directory} for a compare output'
    elif os.path.isdir(os.path.join(directory, 'circuits')):
      hint = (f": a run's circuits are in "
              f"{os.path.join(directory, 'circuits')}")
    raise ValueError(f'no circuit files in {directory} (looked for '
                     f'circuit.json, *.json and */circuit.json){hint}')

  def panel_of(c):
    return os.path.realpath(c['run']), c['step']

  groups = {}  # (real run path, step) -> its panel.
  for c in found.values():
    groups.setdefault(panel_of(c), {
        'label': f'{os.path.basename(os.path.normpath(c["run"]))} step '
                 f'{c["step"]}', 'run': c['run'], 'step': c['step'],
        'val_loss': c.get('val_loss'), 'notes': []})
  # Two runs of one folder name (runs/a/sparse, runs/b/sparse) at one step
  # would read alike in every panel title, column and row: named by path.
  labels = [p['label'] for p in groups.values()]
  for panel in groups.values():
    if labels.count(panel['label']) > 1:
      panel['label'] = f"{panel['run']} step {panel['step']}"
  order = list(groups)
  by_task, path_of = {}, {}
  for path, c in found.items():
    key = (c['task'], panel_of(c))
    if key in path_of:
      raise ValueError(f'{path_of[key]} and {path} are both circuits of '
                       f'{c["task"]} at {c["run"]} step {c["step"]}: give '
                       '--circuits a directory that holds one of them')
    path_of[key] = path
    by_task.setdefault(c['task'], [None] * len(order))[
        order.index(panel_of(c))] = c
  return list(groups.values()), by_task, None


def page_data(panels, by_task, summary=None, *, load_runs=True,
              snippet_tokens=4096, snippets_per_node=5):
  """The page's JSON: panels (label, run, step, validation loss, snippets,
  notes), tasks in order, each with one compact circuit (or None) per panel
  and its example prompts (those of its first circuit) with each panel's
  probabilities, and the comparison's geometric means."""
  examples = {name: next(c for c in circuits if c).get('examples') or []
              for name, circuits in by_task.items()}
  probs = [{} for _ in panels]
  for p, panel in enumerate(panels):
    panel['snippets'] = None
    if load_runs:
      panel['snippets'], probs[p] = run_data(
          panel, {name: c[p] for name, c in by_task.items() if c[p]},
          examples, snippet_tokens, snippets_per_node)
    else:
      panel['notes'].append('runs not loaded (--load_runs=false): no '
                            'snippets or prompt probabilities')
  task_rows = []
  for name, circuits in by_task.items():
    unknown = [None] * len(examples[name])  # A panel without probabilities.
    task_rows.append({
        'name': viz.readable(name),  # Linkable.
        'examples': [dict(e, probs=[by_panel.get(name, unknown)[i]
                                    for by_panel in probs])
                     for i, e in enumerate(examples[name])],
        'circuits': [compact(c) if c else None for c in circuits]})
  return {'panels': panels, 'tasks': task_rows,
          'locations': list(LOCATIONS),
          'geomean': summary.get('geomean') if summary else None,
          'target_loss': summary.get('target_loss') if summary else None}


def render(data):
  """The page: the template with `data` as JSON in place of its marker.

  Every `<` is written as its JSON escape, so that no string in the data
  (a prompt, a token: task prompts are code, and may write HTML) can close
  the script element it sits in, nor open a comment (`<!--` and a later
  `<script` keep the parser in the element past its end tag, and the page's
  own script with it). JSON has `<` only inside strings.
  """
  with open(TEMPLATE, encoding='utf-8') as f:
    template = f.read()
  payload = json.dumps(data, separators=(',', ':'), allow_nan=False)
  return template.replace(_DATA_MARK, payload.replace('<', '\\u003c'), 1)


def write_page(out, *, compare_dir=None, circuits_dir=None, **options):
  """Writes the page for a compare directory or a directory of circuits
  (exactly one) to `out`; `options` go to `page_data`. Returns the data."""
  if (compare_dir is None) == (circuits_dir is None):
    raise ValueError('give exactly one of --compare and --circuits')
  directory = compare_dir or circuits_dir
  if not os.path.isdir(directory):
    raise ValueError(f'{directory} is not a directory')
  if os.path.isdir(out):
    raise ValueError(f'--out {out} is a directory, not an HTML file')
  if os.path.basename(out) in ('', '.', '..'):  # pages/ or empty: no name.
    raise ValueError(f'--out {out!r} names no file: give an HTML file\'s '
                     'path')
  if out.lower().endswith('.json'):  # The page's own input, or next time's.
    raise ValueError(f'--out {out} is a .json name: give an HTML file\'s '
                     'path (the circuit files and comparison.json the page '
                     'is made from are .json)')
  folder = os.path.dirname(out) or '.'
  try:  # Before any work, so a bad --out fails fast.
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise ValueError(f'--out {out}: cannot make its folder '
                     f'({e.strerror})') from None
  try:  # A folder that takes no file (read-only, not ours) is found now too.
    with tempfile.TemporaryFile(dir=folder):
      pass
  except OSError as e:
    raise ValueError(f'--out {out}: cannot write in {folder} '
                     f'({e.strerror})') from None
  load = from_compare if compare_dir else from_circuits
  data = page_data(*load(directory), **options)
  page = render(data)
  try:
    workdir_lib.write_atomic(workdir_lib.path(out), page)
  except OSError as e:  # A full disk, a name too long: not a traceback.
    raise ValueError(f'--out {out}: cannot write it ({e.strerror or e})'
                     ) from None
  return data


def _define_flags():
  """The CLI's flags, defined only when this module is the program:
  `compare` defines --out too, and tests import both modules."""
  flags.DEFINE_string('compare', None, 'A `compare` output directory.')
  flags.DEFINE_string('circuits', None, 'A directory of circuit files.')
  flags.DEFINE_string('out', None, 'The HTML file to write.')
  flags.DEFINE_bool('load_runs', True, 'Load each circuit\'s run for '
                    'snippets and prompt probabilities.')
  flags.DEFINE_integer('snippet_tokens', 4096, 'Validation tokens searched '
                       'for each node\'s top activations.', lower_bound=1)
  flags.DEFINE_integer('snippets_per_node', 5, 'Top-activating tokens kept '
                       'per node.', lower_bound=0)
  flags.mark_flag_as_required('out')


def main():
  f = flags.FLAGS
  data = write_page(f.out, compare_dir=f.compare, circuits_dir=f.circuits,
                    load_runs=f.load_runs, snippet_tokens=f.snippet_tokens,
                    snippets_per_node=f.snippets_per_node)
  print(f"{len(data['tasks'])} task(s), {len(data['panels'])} panel(s) -> "
        f'{f.out}')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
