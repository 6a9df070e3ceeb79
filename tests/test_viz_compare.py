"""Tests for the circuit figures and the sparse-vs-dense table, on synthetic
circuits (no model, no pruning)."""

import dataclasses
import errno
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import xml.etree.ElementTree as ET

from absl import flags
import jax.numpy as jnp
from matplotlib import collections as mcollections
import numpy as np
import pytest

from sparse_gpt2 import cli
from sparse_gpt2 import data
from sparse_gpt2 import defaults
from sparse_gpt2 import sparsity
from sparse_gpt2 import workdir as workdir_lib
from sparse_gpt2.circuits import compare
from sparse_gpt2.circuits import prune
from sparse_gpt2.circuits import runs as runs_lib
from sparse_gpt2.circuits import settings as settings_lib
from sparse_gpt2.circuits import viz

SETTINGS = settings_lib.Settings()
CHECKPOINTS = {'sparse': {'run': 'runs/sparse', 'step': 100,
                          'val_loss': 3.1},
               'dense': {'run': 'runs/dense', 'step': 40, 'val_loss': 3.11}}
# Edges only run inside a layer, from a location to a later one.
_EDGE_KINDS = (('attn_in', 'q'), ('attn_in', 'k'), ('attn_in', 'v'),
               ('v', 'attn_out'), ('mlp_in', 'mlp_neuron'),
               ('mlp_neuron', 'mlp_out'))
_SIZES = {'attn_in': 48, 'q': 32, 'k': 32, 'v': 32, 'attn_out': 48,
          'mlp_in': 48, 'mlp_neuron': 192, 'mlp_out': 48}


def make_circuit(task='t', edges_per_kind=2, solved=True, num_layers=3,
                 circuit_loss=0.1, run='runs/sparse', seed=0):
  """A circuit dict shaped like prune.find_circuit's, with random wiring."""
  rng = random.Random(seed)
  edges = set()
  if solved:
    for layer in range(num_layers):
      for src, dst in _EDGE_KINDS:
        kind = set()
        while len(kind) < edges_per_kind:
          kind.add(((layer, src, rng.randrange(_SIZES[src])),
                    (layer, dst, rng.randrange(_SIZES[dst]))))
        edges |= kind
  nodes = sorted({n for e in edges for n in e})
  total_edges = num_layers * sum(_SIZES[s] * _SIZES[d] for s, d in _EDGE_KINDS)
  return {
      'task': task, 'run': run, 'version': prune.VERSION, 'target_loss': 0.15,
      'solved': solved,
      'num_nodes': len(nodes), 'num_edges': len(edges),
      'total_nodes': num_layers * sum(_SIZES.values()),
      'total_edges': total_edges,
      'nodes': [{'layer': l, 'location': loc, 'index': i}
                for l, loc, i in nodes],
      'edges': [{'src': list(s), 'dst': list(d),
                 'weight': f'block_{s[0]}/x/kernel', 'value': rng.gauss(0, 1)}
                for s, d in sorted(edges)],
      'losses': {'full_model': 0.05 if solved else 0.6,
                 'circuit_only': circuit_loss if solved else None,
                 'circuit_ablated': 0.69 if solved else None},
      'select_loss': {'full_model': 0.06 if solved else 0.65,
                      'circuit_only': 0.14 if solved else None},
      'accuracy': {'full_model': 0.99, 'circuit_only': 0.97,
                   'circuit_ablated': 0.5},
      'logit_scale': 1.0, 'logit_shift': 0.0, 'num_layers': num_layers,
      'layer_sizes': dict(_SIZES), 'seconds': 1.0, 'step': 100,
      'val_loss': 3.25, 'settings': dataclasses.asdict(SETTINGS),
      'steps_run': SETTINGS.steps if solved else None,
      'settled': True if solved else None, 'convergence': [],
  }


def test_an_unsolved_circuit_is_drawn_with_the_loss_that_decided_it(
    tmp_path):
  """`prune` decides on the select split; the test loss (the title's) can
  be below the target, and the figure said that loss was above it."""
  circuit = make_circuit(solved=False, num_layers=1)
  circuit['losses']['full_model'], circuit['target_loss'] = 0.45, 0.5
  circuit['select_loss']['full_model'] = 0.55
  viz.draw_circuit(circuit, str(tmp_path / 'circuit'))
  svg = (tmp_path / 'circuit.svg').read_text()
  assert '<!-- 0.550 (select split), above the target 0.5 -->' in svg
  assert '0.450, above' not in svg
  assert 'test task loss: full 0.450' in svg  # The title's, as before.


def test_a_task_named_in_bytes_that_are_not_utf8_is_drawn(tmp_path):
  """Python hands such a name on with surrogates (a task file
  `caf\\xc3\\xa9.jsonl` under LC_ALL=C, or bytes that are not UTF-8): the
  figure stopped with matplotlib's TypeError after the task's pruning."""
  circuit = make_circuit('caf\udcc3\udca9', num_layers=1)
  viz.draw_circuit(circuit, str(tmp_path / 'circuit'))
  viz.draw_comparison(circuit, circuit, str(tmp_path / 'pair'),
                      sparse_label='runs/sp\udcc3\udca4rse')
  assert 'café: ' in (tmp_path / 'circuit.svg').read_text()
  assert 'Task: café' in (tmp_path / 'pair.svg').read_text()
  assert 'runs/spärse' in (tmp_path / 'pair.svg').read_text()


def test_a_task_named_with_dollar_signs_is_drawn_as_written(tmp_path):
  """A task file named `cost_$_$.jsonl`: two `$` made the title mathtext,
  whose ValueError stopped the CLI after the pruning."""
  viz.draw_circuit(make_circuit('cost_$_$', num_layers=1),
                   str(tmp_path / 'circuit'))
  viz.draw_comparison(make_circuit('cost_$_$', num_layers=1),
                      make_circuit(num_layers=1), str(tmp_path / 'pair'),
                      sparse_label='runs/$a$')
  assert '<!-- cost_$_$: ' in (tmp_path / 'circuit.svg').read_text()
  pair = (tmp_path / 'pair.svg').read_text()
  assert '<!-- Task: cost_$_$ ' in pair and '<!-- runs/$a$ -->' in pair


def _edge_count(num_edges, task='t', run='runs/sparse'):
  """A solved circuit whose counts, not wiring, matter to the table."""
  return dict(make_circuit(task, 1, run=run), num_edges=num_edges,
              num_nodes=num_edges // 2)


def _check_files(path):
  assert os.path.getsize(path + '.png') > 1000
  with open(path + '.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  root = ET.parse(path + '.svg').getroot()
  assert root.tag.endswith('svg')


def _line_paths(svg_path):
  """[paths of each LineCollection] in a matplotlib SVG: the edges first,
  then the residual links."""
  ns = '{http://www.w3.org/2000/svg}'
  return [len(list(g.iter(ns + 'path')))
          for g in ET.parse(svg_path).getroot().iter(ns + 'g')
          if g.get('id', '').startswith('LineCollection')]


def test_draw_circuit_sparse_dense_and_unsolved(tmp_path):
  dense = make_circuit(edges_per_kind=500)  # 3 layers x 6 kinds: 9,000 edges.
  assert dense['num_edges'] == 9000
  sparse = make_circuit()
  for name, circuit in (('sparse', sparse), ('dense', dense),
                        ('unsolved', make_circuit(solved=False))):
    path = str(tmp_path / name / 'circuit')  # The folder is created.
    viz.draw_circuit(circuit, path)
    _check_files(path)
  # Every edge a vector line, and the residual links beside them.
  assert _line_paths(str(tmp_path / 'sparse' / 'circuit.svg')) == [
      sparse['num_edges'], len(viz.residual_links(sparse['nodes']))]
  with open(tmp_path / 'sparse' / 'circuit.svg') as f:
    assert f"{sparse['num_edges']:,} edges" in f.read()
  # 9,000 edges as one embedded bitmap, not 9,000 paths.
  with open(tmp_path / 'dense' / 'circuit.svg') as f:
    svg = f.read()
  assert '9,000 edges' in svg and '<image' in svg
  assert _line_paths(str(tmp_path / 'dense' / 'circuit.svg')) == [
      len(viz.residual_links(dense['nodes']))]  # Only the links as paths.
  with open(tmp_path / 'unsolved' / 'circuit.svg') as f:
    svg = f.read()
  assert 'not solved' in svg and 'circuit n/a' in svg
  assert ("the full model's task loss is" in svg
          and f"above the target {SETTINGS.target_loss:g}" in svg)


def test_draw_comparison(tmp_path):
  path = str(tmp_path / 'figure')
  sparse = make_circuit()
  viz.draw_comparison(sparse, make_circuit(edges_per_kind=200), path)
  _check_files(path)
  with open(path + '.svg') as f:
    svg = f.read()
  # Each panel's label above its own circuit's counts, sparse first.
  assert re.findall(r'<!-- (.*(?:GPT-2.*|edges, .* nodes)) -->', svg) == [
      'Sparse GPT-2', f"{sparse['num_edges']} edges, "
      f"{sparse['num_nodes']} nodes", 'GPT-2 (baseline)',
      '3,600 edges, 1,358 nodes']
  assert 'validation loss 3.250 (step 100)' in svg


def test_an_edge_is_drawn_between_its_two_nodes_each_in_its_own_row():
  """Every edge's line ends on its two nodes; a node sits inside the panel
  (its index across its own row's width) on its layer's row of its
  location, with one empty row between layers."""
  circuit = make_circuit(num_layers=2)
  fig = viz._figure(2, panels=1)
  ax = fig.add_subplot(1, 1, 1)
  viz._draw_panel(ax, circuit, 2, 10)
  where = {(v['layer'], v['location'], v['index']): tuple(xy)
           for v, xy in zip(circuit['nodes'], ax.collections[-1].get_offsets())}
  edges = next(c for c in ax.collections  # The first lines drawn.
               if isinstance(c, mcollections.LineCollection))
  assert [tuple(map(tuple, line)) for line in edges.get_segments()] == [
      (where[tuple(e['src'])], where[tuple(e['dst'])])
      for e in circuit['edges']]
  rows = dict(zip(((l, loc) for l in range(2) for loc in viz.LOCATIONS),
                  ax.get_yticks()))
  assert all(0 < x < 1 and y == rows[layer, loc]
             for (layer, loc, _), (x, y) in where.items())
  assert list(np.diff(ax.get_yticks())) == [-1] * 7 + [-2] + [-1] * 7


def test_residual_links_join_writes_to_later_reads_of_a_channel():
  nodes = [{'layer': 0, 'location': 'attn_out', 'index': 3},
           {'layer': 0, 'location': 'mlp_in', 'index': 3},
           {'layer': 1, 'location': 'attn_in', 'index': 3},
           {'layer': 0, 'location': 'attn_in', 'index': 3},  # Before: no.
           {'layer': 1, 'location': 'mlp_in', 'index': 4},   # Other channel.
           {'layer': 0, 'location': 'mlp_neuron', 'index': 3}]  # Not residual.
  links = {((a['layer'], a['location']), (b['layer'], b['location']))
           for a, b in viz.residual_links(nodes)}
  assert links == {((0, 'attn_out'), (0, 'mlp_in')),
                   ((0, 'attn_out'), (1, 'attn_in'))}


def test_draw_curve(tmp_path):
  # Sparse step 50 solved both tasks, one of them with no edges: its mean
  # is over one task, and its point hollow.
  points = [{'model': m, 'step': s, 'val_loss': v, 'solved': k, 'tasks': 2,
             'averaged': a, 'edges': e} for m, s, v, k, a, e in (
                 ('sparse', 100, 3.1, 2, 2, 50),
                 ('sparse', 50, 3.5, 2, 1, 80),
                 ('dense', 40, 3.11, 2, 2, 900),
                 ('dense', 20, 3.6, 0, 0, None))]
  viz.draw_curve(points, CHECKPOINTS, str(tmp_path / 'curve'))
  _check_files(str(tmp_path / 'curve'))
  with open(tmp_path / 'curve.svg') as f:
    svg = f.read()
  # A line per model in the legend, and per model its points and the ring
  # of its paired checkpoint (the dense point without edges is not drawn).
  assert '<!-- sparse -->' in svg and '<!-- dense -->' in svg
  ns = '{http://www.w3.org/2000/svg}'
  sparse, dense, *rings = [
      g for g in ET.parse(tmp_path / 'curve.svg').getroot().iter(ns + 'g')
      if g.get('id', '').startswith('PathCollection')]
  assert [u.get('style') for u in sparse.iter(ns + 'use')] == [
      'fill: #c44e52; stroke: #c44e52', 'fill: #ffffff; stroke: #c44e52']
  assert [u.get('style') for u in dense.iter(ns + 'use')] == [
      'fill: #4c72b0; stroke: #4c72b0']
  # Each ring is around its model's paired step (sparse 100, dense 40).
  assert [[p.get('d').split()[1] for p in ring.iter(ns + 'path')]
          for ring in rings] == [
              [next(sparse.iter(ns + 'use')).get('x')],
              [next(dense.iter(ns + 'use')).get('x')]]


def test_draw_comparison_unsolved_and_unequal_depths(tmp_path):
  path = str(tmp_path / 'figure')
  viz.draw_comparison(make_circuit(num_layers=2),
                      make_circuit(solved=False, num_layers=4), path,
                      sparse_label='A', dense_label='B')
  _check_files(path)
  with open(path + '.svg') as f:
    svg = f.read()
  # Both panels span the deeper circuit's four layers, titled by the labels.
  assert '<!-- layer 3 -->' in svg and '<!-- layer 4 -->' not in svg
  assert re.search(r'<!-- A\b', svg) and re.search(r'<!-- B\b', svg)


def test_summarize_ratios_and_geometric_means():
  results = {
      'a': (_edge_count(10), _edge_count(160, run='runs/dense')),
      'b': (_edge_count(40), _edge_count(160)),
      'e': (_edge_count(20), _edge_count(170)),
      'c': (_edge_count(5), make_circuit(solved=False)),
      'd': (make_circuit(solved=False), make_circuit(solved=False)),
  }
  summary = compare.summarize(results, CHECKPOINTS)
  rows = {r['task']: r for r in summary['tasks']}
  assert list(rows) == ['a', 'b', 'e', 'c', 'd']
  assert rows['a']['ratio'] == 16 and rows['b']['ratio'] == 4
  assert rows['c']['ratio'] is None and rows['d']['ratio'] is None
  assert rows['c']['sparse']['edges'] == 5
  assert rows['c']['dense']['edges'] is None
  assert summary['not_solved'] == {'c': ['dense'], 'd': ['sparse', 'dense']}
  assert summary['num_compared'] == 3
  g = summary['geomean']
  assert math.isclose(g['edges_sparse'], 20)  # (10 * 40 * 20) ** (1/3)
  assert math.isclose(g['edges_dense'], (160 * 160 * 170) ** (1 / 3))
  assert math.isclose(g['nodes_sparse'], 10)  # Half the edges, each.
  assert math.isclose(g['nodes_dense'], (80 * 80 * 85) ** (1 / 3))
  assert math.isclose(g['ratio'], (16 * 4 * 8.5) ** (1 / 3))
  # The typical task (ratio 8.5, nearest the mean 8.16), not the best (16).
  assert summary['figure_task'] == 'e'
  assert summary['checkpoints'] == CHECKPOINTS
  assert summary['target_loss'] == 0.15
  assert summary['settings'] == dataclasses.asdict(SETTINGS)


def test_pairs_table_ranges_the_ratio_over_the_tasks_every_pairing_solves():
  sparse = {'a': _edge_count(10), 'b': _edge_count(20), 'c': _edge_count(5)}
  dense_by_step = {40: {'a': 160, 'b': 40, 'c': 50},
                   60: {'a': 40, 'b': 80, 'c': None}}
  summaries = []
  for step, edges in dense_by_step.items():
    results = {t: (sparse[t], _edge_count(n, run='runs/dense') if n
                   else make_circuit(solved=False)) for t, n in edges.items()}
    summaries.append(compare.summarize(results, dict(
        CHECKPOINTS, dense={'run': 'runs/dense', 'step': step,
                            'val_loss': 3.11 if step == 40 else 3.085})))
  md, data = compare.pairs_table(summaries, 3, 0.02)
  assert data['common_tasks'] == ['a', 'b']
  assert math.isclose(data['common_ratios'][0], (16 * 2) ** 0.5)
  assert math.isclose(data['common_ratios'][1], (4 * 4) ** 0.5)
  assert data['pairs'] == summaries
  assert ('against the 2 dense checkpoints closest in validation loss '
          'within 0.02 nats (3 asked for)') in md
  # Step 40: all three tasks (16x, 2x, 10x); step 60 misses c.
  assert '| 40 | 3.1100 | 3/3 | 10 / 68 | 6.8x | 5.7x | 16.0x | 2.0x | 10.0x |' \
      in md
  assert ('| 60 | 3.0850 | 2/3 | 14 / 57 | 4.0x | 4.0x | 4.0x | 4.0x | '
          'dense not solved |') in md
  assert 'On the 2 tasks solved at every pairing (a, b)' in md
  assert '4.0-5.7x fewer edges' in md


def test_summarize_nothing_solved_by_both():
  summary = compare.summarize(
      {'a': (make_circuit(solved=False), _edge_count(10))}, CHECKPOINTS)
  assert summary['geomean'] is None and summary['figure_task'] is None
  md = compare.to_markdown(summary)
  assert 'No task is solved by both' in md
  assert 'Every mask had settled by step 2,000.' in md


def test_to_markdown():
  results = {'a': (_edge_count(10), dict(_edge_count(1600), steps_run=3000)),
             'c': (_edge_count(5), make_circuit(solved=False))}
  md = compare.to_markdown(compare.summarize(results, CHECKPOINTS))
  assert ('Pruned on past step 2,000, their masks still shrinking there: '
          'a dense (3,000 steps).') in md
  assert 'Still shrinking at the end' not in md
  results['a'] = (_edge_count(10), dict(_edge_count(1600), steps_run=4000,
                                        settled=False))
  md = compare.to_markdown(compare.summarize(results, CHECKPOINTS))
  assert ('a dense (4,000 steps). Still shrinking at the end, so larger '
          'than the task needs: a dense.') in md
  assert ('| a | 10 | 1,600 | 160.0x | 5 | 800 | 0.100 / 0.100 | '
          '0.690 / 0.690 |') in md
  assert ('| c | 5 | not solved | n/a | 2 | not solved | 0.100 / n/a | '
          '0.690 / n/a |') in md
  assert 'sparse: `runs/sparse` step 100, validation loss 3.1000' in md
  assert 'dense: `runs/dense` step 40, validation loss 3.1100' in md
  assert '**160.0x**' in md
  assert 'Geometric mean over the 1 task solved by both' in md
  assert 'c (full-model test loss: dense 0.600)' in md
  assert '`figure.png` shows `a`' in md
  # The masks a circuit is chosen among: with --steps under 100, the last
  # is the only one (the text named none then).
  assert re.search(r'every 100 steps in the second half of [\d,]+ pruning '
                   r'steps and at the last \(', md), md


def test_a_mask_never_extended_and_still_shrinking_is_not_called_settled():
  """With --max_extensions=0 no run goes past --steps, and a mask still
  shrinking there is recorded unsettled: the report said "Every mask had
  settled by step 2,000." and, in the next sentence, that it was still
  shrinking."""
  results = {'a': (_edge_count(10), dict(_edge_count(1600), settled=False))}
  md = compare.to_markdown(compare.summarize(results, CHECKPOINTS))
  assert 'settled' not in md
  assert ('Still shrinking at step 2,000, where every run stopped, so larger '
          'than the task needs: a dense.') in md


def test_val_losses(tmp_path):
  assert runs_lib.val_losses(str(tmp_path)) == {}
  (tmp_path / 'metrics.jsonl').write_text(
      '{"step": 10, "loss": 4.0, "val_loss": 4.2}\n'
      '{"step": 20, "loss": 3.5, "val_loss": 3.7}\n'
      '{"step": 30, "loss": 3.0}\n'
      '{"step": 20, "val_loss": 3.6}\n')  # Resumed: evaluated again.
  assert runs_lib.val_losses(str(tmp_path)) == {10: 4.2, 20: 3.6}


def test_match_picks_closest_dense_checkpoint_and_refuses_a_gap():
  dense = {50: 4.0, 100: 3.515, 150: 3.47, 200: 3.30, 250: None}
  assert compare.match(300, 3.50, dense, 0.02) == [(100, 3.515)]
  assert compare.match(300, 3.46, dense, 0.02) == [(150, 3.47)]
  with pytest.raises(ValueError, match='no dense checkpoint within 0.02'):
    compare.match(300, 3.40, dense, 0.02)
  assert compare.match(300, 3.40, dense, 0.2) == [(150, 3.47)]
  # Closest first, only those within the gap, however many are asked for.
  assert compare.match(300, 3.49, dense, 0.03, count=3) == [
      (150, 3.47), (100, 3.515)]
  assert compare.match(300, 3.40, dense, 0.2, count=2) == [
      (150, 3.47), (200, 3.30)]
  with pytest.raises(ValueError, match='no validation loss'):
    compare.match(300, None, dense, 0.02)
  with pytest.raises(ValueError, match='^the dense run holds no checkpoint$'):
    compare.match(300, 3.50, {}, 0.02)
  with pytest.raises(ValueError, match='^no dense checkpoint has a validation'):
    compare.match(300, 3.50, {250: None}, 0.02)


def test_reusable_refuses_other_weights_prompts_settings_version_or_step(
    tmp_path):
  """Weights are told by the checkpoint's files, not the run's name; prompts
  by their digest, not the task's name."""
  _fake_run(tmp_path / 'sparse', {100: 3.1, 150: 3.0}, 'topk')
  run = str(tmp_path / 'sparse')
  prompts = runs_lib.prompts_digest([{'prompt': 'x = 1', 'correct': '\n',
                                      'incorrect': ';'}])
  circuit = {**make_circuit('t', run=run), 'prompts_sha256': prompts,
             'checkpoint_sha256': runs_lib.checkpoint_digest(run, 100)}
  assert compare.reusable(circuit, run, 100, prompts, SETTINGS)
  assert not compare.reusable(circuit, run, 150, prompts, SETTINGS)
  assert not compare.reusable(circuit, run, 100, runs_lib.prompts_digest(
      [{'prompt': 'x = 2', 'correct': '\n', 'incorrect': ';'}]), SETTINGS)
  assert not compare.reusable(circuit, run, 100, prompts,
                              dataclasses.replace(SETTINGS, lr=0.5))
  # The same prompts at another --num_prompts: a task file's, which never
  # reads it (a built-in task's prompts, and so their digest, change).
  assert compare.reusable(circuit, run, 100, prompts, dataclasses.replace(
      SETTINGS, num_prompts=SETTINGS.num_prompts + 2))
  assert not compare.reusable({**circuit, 'version': prune.VERSION - 1},
                              run, 100, prompts, SETTINGS)
  # A copy under another name holds the same weights; another run under
  # this one's name (the same files, one byte changed) does not.
  copy = tmp_path / 'elsewhere' / 'renamed'
  shutil.copytree(run, copy)
  assert compare.reusable(circuit, str(copy), 100, prompts, SETTINGS)
  _retrain(tmp_path / 'sparse', 100)
  runs_lib.checkpoint_digest.cache_clear()
  assert not compare.reusable(circuit, run, 100, prompts, SETTINGS)
  assert not compare.reusable({**circuit, 'checkpoint_sha256': None}, str(copy),
                              100, prompts, SETTINGS)


@pytest.mark.parametrize('bad, message', [
    ('run', 'missing is not a directory'),
    ('task', 'no_such_task'),
    ('same run', '--sparse and --dense are the same run'),
    ('out', 'is a file, not a directory'),
    ('out below a file', 'is a file, not a directory'),
    ('not a run', 'is not a run directory (no config.json)'),
    ('swapped', "--sparse takes a run with sparse weights and --dense one "
                "without (sparsity.mode 'none'); got 'none' and 'topk' "
                '(swapped?)'),
    ('two sparse', "got 'topk' and 'static'"),
    ('other corpus', '--sparse and --dense were trained on other corpora '
                     '(corpus.json: vocab_sha256 differ), so their '
                     'validation losses do not compare'),
    ('other seq_len', '--sparse and --dense were trained at seq_len 128 and '
                      '64, so their validation losses do not compare'),
    ('inside checkpoints', 'is inside the checkpoints of'),
])
def test_cli_rejects_bad_input_before_pruning(tmp_path, bad, message):
  sparse, dense = tmp_path / 'sparse', tmp_path / 'dense'
  _fake_run(sparse, {100: 3.0}, 'topk')
  _fake_run(dense, {100: 3.0}, 'none')
  other = tmp_path / 'other'
  if bad == 'not a run':
    other.mkdir()
  elif bad == 'two sparse':
    _fake_run(other, {100: 3.0}, 'static')
  elif bad == 'other corpus':
    for run, vocab in ((sparse, 'a'), (dense, 'b')):
      (run / 'corpus.json').write_text(json.dumps(
          {'vocab_sha256': vocab, 'validation_sha256': 'v'}))
  elif bad == 'other seq_len':
    config = json.loads((dense / 'config.json').read_text())
    (dense / 'config.json').write_text(json.dumps(dict(config, seq_len=64)))
  out = tmp_path / 'out'
  if bad == 'inside checkpoints':
    out = dense / 'checkpoints' / '100' / 'compare'
  if bad.startswith('out'):
    out.write_text('a file')
  args = {'run': (tmp_path / 'missing', dense, 'var_swap'),
          'task': (sparse, dense, 'no_such_task'),
          'same run': (sparse, sparse, 'var_swap'),
          'out': (sparse, dense, 'var_swap'),
          'out below a file': (sparse, dense, 'var_swap'),
          'not a run': (sparse, other, 'var_swap'),
          'swapped': (dense, sparse, 'var_swap'),
          'two sparse': (sparse, other, 'var_swap'),
          'other corpus': (sparse, dense, 'var_swap'),
          'other seq_len': (sparse, dense, 'var_swap'),
          'inside checkpoints': (sparse, dense, 'var_swap')}[bad]
  proc = subprocess.run(
      [sys.executable, '-m', 'sparse_gpt2.circuits.compare',
       f'--sparse={args[0]}', f'--dense={args[1]}', f'--tasks={args[2]}',
       f"--out={out / 'sub' if bad == 'out below a file' else out}"],
      capture_output=True, text=True, timeout=60,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error:'), proc.stderr
  assert message in lines[0]
  assert out.is_file() if bad.startswith('out') else not out.exists()


def test_an_out_in_a_folder_that_takes_no_file_is_refused_before_pruning(
    tmp_path, monkeypatch):
  """As both circuits CLIs check --out (`cli.check_output_dir`): a folder
  on a read-only mount was met by the first write, after a pruning. Root
  writes in any folder whatever its mode, so the mount is simulated."""
  def read_only(dir):  # pylint: disable=redefined-builtin
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), dir)

  monkeypatch.setattr(tempfile, 'TemporaryFile', read_only)
  out = tmp_path / 'mounted' / 'compare'
  with pytest.raises(ValueError) as refused:
    cli.check_output_dir(str(out))
  assert str(refused.value) == (f'--out {out}: cannot write in {tmp_path} '
                                '(Read-only file system)')
  assert not out.parent.exists()


def _fake_run(path, val_losses, mode, schedule_steps=200, anneal=0.5):
  """A run directory as `runs.checkpoints` reads it: config.json (200 steps
  of a `schedule_steps` schedule, annealed over its first `anneal` in topk
  mode), one checkpoint folder per step (a file of stand-in weights), and
  metrics.jsonl."""
  (path / 'checkpoints').mkdir(parents=True)
  config = defaults.base()
  config.train_steps, config.schedule_steps = 200, schedule_steps
  config.sparsity.mode, config.sparsity.anneal_fraction = mode, anneal
  config.sparsity.density = 0.25 if mode == 'topk' else 1.0
  (path / 'config.json').write_text(config.to_json())
  lines = []
  for step, loss in val_losses.items():
    (path / 'checkpoints' / str(step) / 'state').mkdir(parents=True)
    (path / 'checkpoints' / str(step) / 'state' / 'weights').write_bytes(
        f'{mode} {step}'.encode())
    lines.append(json.dumps({'step': step, 'val_loss': loss}))
  (path / 'metrics.jsonl').write_text('\n'.join(lines) + '\n')


def test_corpus_records_compare_only_in_the_fields_both_have(tmp_path):
  """A field one record lacks (a run saved before it was recorded) is not a
  difference; one both have and that differs is."""
  runs = {'sparse': tmp_path / 'sparse', 'dense': tmp_path / 'dense'}
  _fake_run(runs['sparse'], {100: 3.0}, 'topk')
  _fake_run(runs['dense'], {100: 3.0}, 'none')
  (runs['sparse'] / 'corpus.json').write_text(json.dumps(
      {'vocab_sha256': 'a', 'validation_sha256': 'v'}))
  (runs['dense'] / 'corpus.json').write_text(json.dumps(
      {'vocab_sha256': 'a'}))
  compare._check_same_tokens({k: str(v) for k, v in runs.items()})
  (runs['dense'] / 'corpus.json').write_text(json.dumps(
      {'vocab_sha256': 'a', 'validation_sha256': 'w'}))
  with pytest.raises(ValueError, match=r'\(corpus.json: validation_sha256 '
                     r'differ\)'):
    compare._check_same_tokens({k: str(v) for k, v in runs.items()})


@pytest.mark.parametrize('dense_fields, windows', [
    ({'seed': 1}, '(0, 256) and (1, 256)'),
    ({'eval_batches': 16}, '(0, 256) and (0, 512)'),
    ({'batch_size': 16}, '(0, 256) and (0, 128)'),
    ({'batch_size': 16, 'eval_batches': 16}, None),  # The same 256 windows.
])
def test_runs_evaluated_on_other_validation_windows_are_warned_of(
    tmp_path, caplog, dense_fields, windows):
  """Paired by validation loss, a seed-1 dense run was matched on other
  windows than a seed-0 sparse run's, unsaid: their means differ by the
  windows drawn (~0.03 nats, more than --max_loss_gap). Said, not refused:
  a second seed of one twin is worth comparing. The windows evaluated are
  the first eval_batches x batch_size of seed + 1's order, whatever the
  batch size."""
  runs = {'sparse': tmp_path / 'sparse', 'dense': tmp_path / 'dense'}
  _fake_run(runs['sparse'], {100: 3.0}, 'topk')
  _fake_run(runs['dense'], {100: 3.0}, 'none')
  config = json.loads((runs['dense'] / 'config.json').read_text())
  (runs['dense'] / 'config.json').write_text(json.dumps(
      dict(config, **dense_fields)))
  with caplog.at_level('WARNING', logger='absl'):
    compare._check_same_tokens({k: str(v) for k, v in runs.items()})
  warned = [r.getMessage() for r in caplog.records
            if 'other validation windows' in r.getMessage()]
  if windows:
    assert warned == [
        '--sparse and --dense were evaluated on other validation windows '
        f'(seed, eval_batches x batch_size: {windows}): their losses differ '
        'by the windows drawn too (~0.03 nats at 256 windows), so a pairing '
        'by loss is that much coarser']
    return
  assert not warned
  tokens = np.arange(300 * 129) % 2048
  def windows_read(batch_size, eval_batches):
    return np.concatenate([data.get_batch(
        tokens, i, seed=1, batch_size=batch_size, seq_len=128)
                           for i in range(eval_batches)])
  np.testing.assert_array_equal(windows_read(32, 8), windows_read(16, 16))


def test_a_corpus_record_that_is_not_utf8_is_named(tmp_path):
  """A damaged corpus.json: the refusal names it (a bare decode error
  named no file)."""
  runs = {'sparse': tmp_path / 'sparse', 'dense': tmp_path / 'dense'}
  _fake_run(runs['sparse'], {100: 3.0}, 'topk')
  _fake_run(runs['dense'], {100: 3.0}, 'none')
  (runs['dense'] / 'corpus.json').write_bytes(b'{"vocab_sha256": "caf\xe9"}')
  with pytest.raises(ValueError, match=(
      f'^{re.escape(str(runs["dense"] / "corpus.json"))} is not UTF-8 text '
      r'\(byte 21 is 0xe9\)$')):
    compare._check_same_tokens({k: str(v) for k, v in runs.items()})


def test_too_few_pairs_tells_a_task_file_nothing_of_num_prompts(
    tmp_path, monkeypatch):
  """compare's check of its tasks, as the circuits CLI's: an edited dump
  of for_while keeps its name but is used whole, so raising --num_prompts
  (which only a built-in task reads) is no advice to it."""
  runs = {'sparse': tmp_path / 'sparse', 'dense': tmp_path / 'dense'}
  _fake_run(runs['sparse'], {100: 3.0}, 'topk')
  _fake_run(runs['dense'], {100: 3.0}, 'none')
  monkeypatch.setattr(runs_lib, 'encode_task', lambda _, task, *a: (
      runs_lib.task_name(task), [], {}))
  def too_few(*args):
    raise ValueError('too few pairs')
  monkeypatch.setattr(prune, 'split', too_few)
  for task, hint in (('for_while', True), ('edited/for_while.jsonl', False)):
    with pytest.raises(ValueError, match='^for_while: too few pairs') as e:
      compare._check_args({k: str(v) for k, v in runs.items()},
                          str(tmp_path / 'out'), [task], SETTINGS)
    assert str(e.value).endswith(' (built in: raise --num_prompts)') == hint


def test_annealing_ends_where_the_schedule_says_not_at_train_steps(tmp_path):
  """A run that stops at step 200 of a 400-step schedule is still annealing
  at step 100: the curve leaves out its checkpoints before step 200. Of
  a 401-step schedule, annealed over 200.5 steps, step 200 is not yet at
  its target density. Annealed over 0.55 of 100 steps (55.00000000000001
  in Python floats, 55 in the train step's float32), step 55 is."""
  for schedule_steps, anneal, annealed in ((400, 0.5, 200), (401, 0.5, 201),
                                           (100, 0.55, 55)):
    run = tmp_path / f'{schedule_steps}_{anneal}'
    _fake_run(run, {200: 3.0}, 'topk', schedule_steps, anneal)
    config = workdir_lib.load_config(str(run))
    step = runs_lib.annealed_step(str(run))
    assert step == annealed
    before, at = (float(sparsity.density_at(jnp.int32(s), config.sparsity,
                                            schedule_steps))
                  for s in (step - 1, step))  # As the train step: traced.
    assert before > at == float(sparsity.density_at(
        jnp.int32(schedule_steps), config.sparsity, schedule_steps))


def test_convergence_table_shows_the_steps_asked_for():
  """A circuit reused from disk that recorded more steps than this run asks
  for: its row has exactly the asked-for columns, each its own step's."""
  conv = [{'steps': s, 'num_edges': e, 'num_nodes': e // 2}
          for s, e in ((100, 500), (300, 200), (1000, 120), (2000, 110),
                       (3000, 100))]
  circuit = {'solved': True, 'convergence': conv}
  table, records = compare.convergence_table(
      {'t': (circuit, circuit)}, ['t'], [1000, 3000])
  assert table.splitlines()[0] == '| task | model | 1000 steps | 3000 steps |'
  assert table.splitlines()[2] == (
      '| t | sparse | 120 edges / 60 nodes (+20%) | '
      '100 edges / 50 nodes (+0%) |')
  assert [c['steps'] for c in records[0]['convergence']] == [1000, 3000]


@pytest.mark.parametrize('field, value', [
    ('temperature', 0.0), ('temperature', -0.1), ('lr', 0.0),
    ('grad_rms', 0.0), ('b1', 1.0), ('b2', -0.1), ('eps', -1e-8),
    ('weight_decay', -1e-3), ('k_coef', -1e-3), ('dual_lr', -0.05),
    ('init_noise', -0.01), ('warmup_steps', -1), ('lr', math.nan),
    ('k_coef', math.nan), ('init_bias', math.inf), ('lr', math.inf),
    ('temperature', math.inf), ('weight_decay', math.inf),
    ('init_noise', math.inf), ('warmup_steps', 2**31), ('steps', 2**31),
    ('seed', -1), ('steps', 0), ('batch_pairs', 0), ('num_prompts', 0),
    ('target_loss', 0.0), ('steps', 2**30)])
def test_pruning_settings_that_cannot_work_are_refused(field, value):
  """E.g. temperature 0 divides by zero in the mask's surrogate gradient:
  NaN scores and a meaningless circuit, minutes later, without a word.
  2**30 steps are 2**31 with the default two extensions of half as many."""
  with pytest.raises(ValueError, match=f'^{field} must be'):
    settings_lib.Settings(**{field: value}).validate()
  settings_lib.Settings().validate()  # The defaults pass.
  # So do the ends of the ranges that can work (0: no momentum, no
  # extension, the paper's fixed objective, ...).
  settings_lib.Settings(
      b1=0.0, b2=0.0, max_extensions=0, warmup_steps=0, eps=0.0,
      weight_decay=0.0, k_coef=0.0, dual_lr=0.0, init_noise=0.0,
      steps=2**31 - 1, seed=2**31 - 1).validate()


@pytest.mark.parametrize('select, test', [(0.5, 0.5), (0.75, 0.25),
                                          (0.0, 0.5), (0.5, 0.0)])
def test_split_fractions_that_leave_no_training_pairs_are_refused(select,
                                                                  test):
  """select + test of exactly 1 leaves nothing to train on, as does more;
  either fraction 0 leaves a split empty."""
  with pytest.raises(ValueError, match='^select_fraction and test_fraction '
                     'must be > 0 and leave pairs to train on$'):
    settings_lib.Settings(select_fraction=select,
                          test_fraction=test).validate()
  settings_lib.Settings(select_fraction=0.5, test_fraction=0.25).validate()


def test_an_out_inside_the_checkpoints_through_a_link_is_refused(tmp_path):
  """A run reached through a link (runs/latest), or an --out through one,
  is the folder it names: its checkpoints are refused as an --out either
  way, and a folder beside them is not."""
  run, link = tmp_path / 'run', tmp_path / 'latest'
  (run / 'checkpoints').mkdir(parents=True)
  link.symlink_to(run)
  for workdir, out in ((link, link), (link, run), (run, link)):
    with pytest.raises(ValueError, match='is inside the checkpoints of'):
      runs_lib.check_out(str(out / 'checkpoints' / '30'), str(workdir))
    runs_lib.check_out(str(out / 'circuits'), str(workdir))


def _retrain(path, step):
  """The run at `path` trained again: other weights at `step`."""
  weights = path / 'checkpoints' / str(step) / 'state' / 'weights'
  weights.write_bytes(weights.read_bytes() + b' again')


@pytest.fixture
def stand_in(monkeypatch):
  """[calls of runs.find_circuit], which is replaced by a stand-in: it needs
  a trained model. Its circuits have 20 edges a kind in the dense run, 1 in
  the sparse one, and the dense run does not solve var_swap."""
  calls = []

  def find_circuit(workdir, settings, *, step, task, record_at=()):
    calls.append((os.path.basename(workdir), step, task, settings.steps,
                  tuple(record_at)))
    dense = workdir.endswith('dense')
    name, datapoints = runs_lib.task_datapoints(task, settings.num_prompts,
                                                settings.seed)
    circuit = make_circuit(name, edges_per_kind=20 if dense else 1,
                           solved=not (dense and task == 'var_swap'),
                           num_layers=1, run=workdir)
    circuit.update(step=step, settings=dataclasses.asdict(settings),
                   prompts_sha256=runs_lib.prompts_digest(datapoints),
                   checkpoint_sha256=runs_lib.checkpoint_digest(workdir, step),
                   steps_run=settings.steps, settled=True,
                   convergence=[{'steps': s, 'num_nodes': 9, 'num_edges': 9,
                                 'kept_by_mask': 9}
                                for s in (*record_at, settings.steps)])
    return circuit

  monkeypatch.setattr(runs_lib, 'find_circuit', find_circuit)
  # The stand-in runs have no tokenizer: tasks are read, and encoded as
  # 32 contrastive pairs of answers (enough to split).
  answers = np.arange(64) % 2
  monkeypatch.setattr(runs_lib, 'encode_task', lambda run, task, n, seed: (
      *runs_lib.task_datapoints(task, n, seed),
      {'pair': np.arange(64) // 2, 'correct': answers,
       'incorrect': 1 - answers}))
  # The CPU is split before jax starts, which in this process it has.
  monkeypatch.setattr(settings_lib, 'start_jax', lambda: None)
  return calls


def _main(runs, out, *args):
  """compare.main on the command line --sparse, --dense, --out and `args`."""
  argv = ['compare', f'--sparse={runs["sparse"]}',
          f'--dense={runs["dense"]}', f'--out={out}', *args]
  try:
    flags.FLAGS(argv)
    compare.main()
  finally:
    flags.FLAGS.unparse_flags()


def test_cli_pairs_writes_everything_and_reuses_circuits(tmp_path, stand_in,
                                                         capsys):
  """main end to end with a stand-in for runs.find_circuit, which needs a
  trained model; a second run finds every circuit on disk, and a changed
  setting prunes again."""
  calls = stand_in
  runs = {'sparse': tmp_path / 'sparse', 'dense': tmp_path / 'dense'}
  _fake_run(runs['sparse'], {50: 4.0, 100: 3.6, 200: 3.2}, 'topk')
  _fake_run(runs['dense'], {50: 3.5, 100: 3.21, 150: 3.0}, 'none')
  out = tmp_path / 'out'
  run = lambda *args: _main(runs, out, *args)

  run('--tasks=if_equals,var_swap', '--steps=7', '--convergence_steps=3',
      '--convergence_tasks=1')
  assert calls == [('sparse', 200, 'if_equals', 7, (3,)),
                   ('dense', 100, 'if_equals', 7, (3,)),
                   ('sparse', 200, 'var_swap', 7, ()),
                   ('dense', 100, 'var_swap', 7, ())]
  for task in ('if_equals', 'var_swap'):
    assert (out / task / 'figure.png').exists()
    for model, step in (('sparse', 200), ('dense', 100)):
      assert (out / 'circuits' / f'{model}-{step}' / f'{task}.json').exists()
  summary = json.loads((out / 'comparison.json').read_text())
  assert summary['checkpoints']['dense'] == {
      'run': str(runs['dense']), 'step': 100, 'val_loss': 3.21}
  assert summary['figure_task'] == 'if_equals'
  assert summary['not_solved'] == {'var_swap': ['dense']}
  assert (out / 'figure.png').exists() and (out / 'figure.svg').exists()
  md = (out / 'comparison.md').read_text()
  assert '| if_equals | 6 | 120 | 20.0x |' in md
  printed = capsys.readouterr().out
  assert 'Pairing sparse step 200 (val loss 3.2000) with dense step 100' in \
      printed and md in printed
  assert '| if_equals | sparse | 9 edges / 9 nodes (+0%) |' in \
      (out / 'convergence.md').read_text()

  run('--tasks=if_equals,var_swap', '--steps=7', '--convergence_steps=3',
      '--convergence_tasks=1')
  assert len(calls) == 4  # All reused.
  # No task solved by both: no figure.png, not the one of the run before.
  run('--tasks=var_swap', '--steps=7')
  assert len(calls) == 4
  assert json.loads((out / 'comparison.json').read_text())[
      'figure_task'] is None
  assert not (out / 'figure.png').exists()
  assert not (out / 'figure.svg').exists()
  # Nor the convergence record of the run before, not asked for this time.
  assert not (out / 'convergence.md').exists()
  assert not (out / 'convergence.json').exists()
  # The sparse run trained again under its name: its circuits are pruned
  # anew, the dense run's reused.
  _retrain(runs['sparse'], 200)
  run('--tasks=if_equals', '--steps=7', '--convergence_steps=3',
      '--convergence_tasks=1')
  assert calls[4:] == [('sparse', 200, 'if_equals', 7, (3,))]
  run('--tasks=if_equals', '--steps=9')
  assert calls[5:] == [('sparse', 200, 'if_equals', 9, ()),
                       ('dense', 100, 'if_equals', 9, ())]
  run('--tasks=if_equals', '--steps=9', '--curve', '--curve_every=50')
  # The curve prunes the other checkpoints at multiples of 50, but not the
  # sparse run's before its annealing ended (step 100).
  assert calls[7:] == [('sparse', 100, 'if_equals', 9, ()),
                       ('dense', 50, 'if_equals', 9, ()),
                       ('dense', 150, 'if_equals', 9, ())]
  points = json.loads((out / 'curve.json').read_text())
  assert [(p['model'], p['step']) for p in points] == [
      ('sparse', 100), ('sparse', 200), ('dense', 50), ('dense', 100),
      ('dense', 150)]
  assert (out / 'curve.png').exists()

  with pytest.raises(ValueError, match='no dense checkpoint within 0.02'):
    run('--tasks=if_equals', '--step=100')  # 3.6: no dense within 0.02.

  # Three pairings asked for, two within the gap (3.21 and 3.0 of 3.2).
  # if_equals at 9 steps was pruned at both dense steps above (the curve).
  run('--tasks=if_equals,var_swap', '--steps=9', '--max_loss_gap=0.25',
      '--pairs=3')
  assert calls[10:] == [('sparse', 200, 'var_swap', 9, ()),
                       ('dense', 100, 'var_swap', 9, ()),
                       ('dense', 150, 'var_swap', 9, ())]
  assert 'with dense step 100 (val loss 3.2100), then 150.' in \
      capsys.readouterr().out
  pairs = json.loads((out / 'pairs.json').read_text())
  assert [p['checkpoints']['dense']['step'] for p in pairs['pairs']] == [
      100, 150]
  assert pairs['common_tasks'] == ['if_equals']
  assert '(3 asked for)' in (out / 'pairs.md').read_text()
  assert not [p.name for p in out.glob('curve.*')]  # The curve's run's.
  with pytest.raises(flags.IllegalFlagValueError,
                     match=r'^flag --pairs=0: 0 is not a positive integer$'):
    run('--tasks=if_equals', '--pairs=0')
  with pytest.raises(flags.IllegalFlagValueError, match='counts >= 1'):
    run('--tasks=if_equals', '--convergence_steps=100,0')
  with pytest.raises(flags.IllegalFlagValueError,
                     match='^flag --convergence_tasks=-1: -1 is not'):
    run('--tasks=if_equals', '--convergence_steps=3',
        '--convergence_tasks=-1')

  # A user's task file beside a built-in task: named by the file, pruned
  # again once edited, refused when missing or named like another task.
  mine = tmp_path / 'mine.jsonl'
  mine.write_text(json.dumps({'prompt': 'x = 1', 'correct': '\n',
                              'incorrect': ';'}) + '\n')
  run(f'--tasks=if_equals,{mine}', '--steps=9')
  assert not (out / 'pairs.md').exists() and not (out / 'pairs.json').exists()
  assert calls[13:] == [('sparse', 200, str(mine), 9, ()),
                        ('dense', 100, str(mine), 9, ())]
  assert [r['task'] for r in json.loads(
      (out / 'comparison.json').read_text())['tasks']] == ['if_equals', 'mine']
  assert (out / 'circuits' / 'sparse-200' / 'mine.json').exists()
  assert (out / 'mine' / 'figure.png').exists()
  run(f'--tasks={mine}', '--steps=9')
  assert len(calls) == 15  # Reused.
  mine.write_text(json.dumps({'prompt': 'y = 1', 'correct': '\n',
                              'incorrect': ';'}) + '\n')
  run(f'--tasks={mine}', '--steps=9')
  assert calls[15:] == [('sparse', 200, str(mine), 9, ()),
                        ('dense', 100, str(mine), 9, ())]
  other = tmp_path / 'other' / 'mine.jsonl'
  for tasks, error in (
      (f'{tmp_path / "missing.jsonl"}',
       f'task file {tmp_path / "missing.jsonl"} does not exist'),
      (f'{tmp_path / "dir.jsonl"}',
       f'task file {tmp_path / "dir.jsonl"} is a directory'),
      (f'{mine},{other}', 'two tasks named mine in --tasks'),
      ('no_such_task', "unknown task 'no_such_task': neither a "
       'built-in task (')):
    other.parent.mkdir(exist_ok=True)
    (tmp_path / 'dir.jsonl').mkdir(exist_ok=True)
    other.write_text(mine.read_text())
    with pytest.raises(ValueError) as refused:
      run(f'--tasks={tasks}')
    assert str(refused.value).startswith(error)
  assert len(calls) == 17
  # A damaged or foreign saved circuit is pruned anew, not a traceback.
  (out / 'circuits' / 'sparse-200' / 'mine.json').write_text('{"step": 2')
  (out / 'circuits' / 'dense-100' / 'mine.json').write_text('{"solved": 1}')
  run(f'--tasks={mine}', '--steps=9')
  assert calls[17:] == [('sparse', 200, str(mine), 9, ()),
                        ('dense', 100, str(mine), 9, ())]
  # Nor one that is not even UTF-8, which stopped the whole run.
  (out / 'circuits' / 'sparse-200' / 'mine.json').write_bytes(b'{"\xff')
  run(f'--tasks={mine}', '--steps=9')
  assert calls[19:] == [('sparse', 200, str(mine), 9, ())]
  # Saved circuits (if_equals at 9 steps) that lack a convergence step now
  # asked for are pruned again, recording it; not reused without it.
  run('--tasks=if_equals', '--steps=9', '--convergence_steps=4',
      '--convergence_tasks=1')
  assert calls[20:] == [('sparse', 200, 'if_equals', 9, (4,)),
                        ('dense', 100, 'if_equals', 9, (4,))]
  assert '| task | model | 4 steps | 9 steps |' in \
      (out / 'convergence.md').read_text()


def test_curve_without_a_checkpoint_to_prune_is_refused_before_pruning(
    tmp_path, stand_in):
  """A run with no kept checkpoint at a multiple of --curve_every, or none
  with a validation loss, or all before its annealing ends, would have no
  line in the curve: refused before the comparison's circuits, which take
  hours, naming the run and its checkpoints."""
  runs = {'sparse': tmp_path / 'sparse', 'dense': tmp_path / 'dense'}
  # Annealed at step 100 (half of a 200-step schedule).
  _fake_run(runs['sparse'], {50: 3.7, 100: 3.6, 150: 3.2}, 'topk')
  _fake_run(runs['dense'], {50: 3.5, 100: math.nan, 150: 3.21}, 'none')
  out = tmp_path / 'out'
  for every, run in ((300, 'sparse'), (100, 'dense'), (60, 'sparse')):
    with pytest.raises(ValueError) as refused:
      _main(runs, out, '--tasks=if_equals', '--steps=9', '--curve',
            f'--curve_every={every}')
    assert str(refused.value) == (
        f'--curve: no kept checkpoint of {runs[run]} is at a multiple of '
        f'--curve_every={every} with a validation loss'
        + (' from step 100, where its annealing ends' if run == 'sparse'
           else '') + ': [50, 100, 150]')
  assert stand_in == [] and not out.exists()
  # Step 50 is before the sparse run's annealing ends, 100 of the dense
  # run has a NaN loss: neither is a point. The dense run does not solve
  # var_swap: its points count and average if_equals alone.
  _main(runs, out, '--tasks=if_equals,var_swap', '--steps=9', '--curve',
        '--curve_every=50')
  points = json.loads((out / 'curve.json').read_text())
  assert [(p['model'], p['step'], p['solved'], p['averaged'],
           round(p['edges'], 6)) for p in points] == [
      ('sparse', 100, 2, 2, 6), ('sparse', 150, 2, 2, 6),
      ('dense', 50, 1, 1, 120), ('dense', 150, 1, 1, 120)]


def test_a_sparse_step_before_annealing_ends_is_warned_of(tmp_path, stand_in,
                                                          caplog):
  """--step at a checkpoint of a denser model than the run trains (its
  annealing not over, step 100 of 200 here) is compared, with a warning."""
  runs = {'sparse': tmp_path / 'sparse', 'dense': tmp_path / 'dense'}
  _fake_run(runs['sparse'], {50: 3.5, 100: 3.2}, 'topk')
  _fake_run(runs['dense'], {50: 3.5, 100: 3.2}, 'none')
  for step in (50, 100):
    caplog.clear()
    # An --out in a run, not in its checkpoints, is a folder of its own.
    _main(runs, runs['sparse'] / 'compare', '--tasks=if_equals', '--steps=7',
          f'--step={step}')
    warned = [m for m in caplog.messages if 'annealing ends' in m]
    assert warned == ([
        'Sparse step 50 is before step 100, where its annealing ends: a '
        'denser model than the run trains.'] if step == 50 else []), warned
  assert [call[:2] for call in stand_in] == [('sparse', 50), ('dense', 50),
                                             ('sparse', 100), ('dense', 100)]


def test_a_step_not_kept_is_refused_naming_the_kept_ones(tmp_path,
                                                          stand_in):
  """--step at no kept checkpoint names the kept ones, as the circuits CLI
  does, before any pruning."""
  runs = {'sparse': tmp_path / 'sparse', 'dense': tmp_path / 'dense'}
  _fake_run(runs['sparse'], {50: 3.5, 100: 3.2}, 'topk')
  _fake_run(runs['dense'], {50: 3.5, 100: 3.2}, 'none')
  with pytest.raises(ValueError) as refused:
    _main(runs, tmp_path / 'out', '--tasks=if_equals', '--step=70')
  assert str(refused.value) == (f'{runs["sparse"]} has no checkpoint at '
                                'step 70; it has [50, 100]')
  assert stand_in == [] and not (tmp_path / 'out').exists()


def test_tables_are_written_in_utf8_in_a_c_locale(tmp_path):
  """A run name beyond ASCII in a C locale (without UTF-8 mode), where
  Python hands it over as undecodable bytes: comparison.md failed, after
  all the pruning, in one misleading line (an 'ascii' codec error) and was
  left empty. It holds the name's own bytes; the JSON reads as UTF-8."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('LANG', 'PYTHONIOENCODING')}
  env.update(LC_ALL='C', PYTHONUTF8='0')
  proc = subprocess.run(
      [sys.executable, '-c',
       'import sys; from sparse_gpt2.circuits import compare; '
       "compare._write(sys.argv[1], 'comparison', f'`{sys.argv[2]}`\\n', "
       "{'run': sys.argv[2]}); print(sys.argv[2])",
       str(tmp_path), 'runs/spärse'],
      capture_output=True, env=env, timeout=60,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr.decode()
  assert proc.stdout == 'runs/spärse\n'.encode()
  assert (tmp_path / 'comparison.md').read_bytes() == \
      '`runs/spärse`\n'.encode()
  assert isinstance(workdir_lib.read_json(tmp_path / 'comparison.json'),
                    dict)


def test_a_table_a_full_disk_stops_leaves_the_earlier_one_whole(
    tmp_path, full_disk):
  """A disk that filled as comparison.json and .md were written left them
  cut short, an earlier comparison's too, beside the rest of its output."""
  compare._write(str(tmp_path), 'comparison', '# earlier\n', {'tasks': []})
  with full_disk(), pytest.raises(OSError):
    compare._write(str(tmp_path), 'comparison', 'x' * 10_000,
                   {'tasks': ['y' * 10_000]})
  assert (tmp_path / 'comparison.md').read_text() == '# earlier\n'
  assert workdir_lib.read_json(tmp_path / 'comparison.json') == {'tasks': []}
  assert sorted(os.listdir(tmp_path)) == ['comparison.json', 'comparison.md']


def test_match_pairs_no_checkpoint_by_a_non_finite_loss():
  """A NaN validation loss in metrics.jsonl sorts anywhere: it paired a
  farther checkpoint than the closest, or none, with a traceback."""
  nan = math.nan
  dense = {10: 3.51, 20: nan, 30: 3.499, 40: math.inf}
  assert compare.match(1, 3.5, dense, 0.02, count=3) == [(30, 3.499),
                                                         (10, 3.51)]
  with pytest.raises(ValueError, match=r'^the sparse checkpoint at step 1 '
                     r'has no validation loss in metrics.jsonl \(nan\)$'):
    compare.match(1, nan, dense, 0.02)
  with pytest.raises(ValueError, match=r'^the sparse checkpoint at step 1 '
                     r'has no validation loss in metrics.jsonl \(inf\)$'):
    compare.match(1, math.inf, dense, 0.02)
  with pytest.raises(ValueError, match='^no dense checkpoint has a validation'):
    compare.match(1, 3.5, {20: nan}, 0.02)


def test_a_circuit_of_no_edges_is_said_in_every_table():
  """A task both models solve, one by the direct path alone: in the table
  with no ratio, and said to be out of the means, not counted silently
  among the tasks 'solved by both'; no change from no edges as a ratio."""
  results = {'a': (_edge_count(10), _edge_count(160)),
             'z': (_edge_count(0), _edge_count(40))}
  summary = compare.summarize(results, CHECKPOINTS)
  md = compare.to_markdown(summary)
  assert summary['num_compared'] == 1 and summary['not_solved'] == {}
  assert '| z | 0 | 40 | n/a | 0 | 20 |' in md
  assert 'Geometric mean over the 1 task solved by both' in md
  assert ('Solved by both but not in the means, a circuit of no edges (the '
          'direct path alone does the task) having no ratio: z (sparse).'
          ) in md
  # A task the dense model does not solve is said so, not 'solved by both'.
  md = compare.to_markdown(compare.summarize(
      {'y': (_edge_count(0), make_circuit('y', solved=False))}, CHECKPOINTS))
  assert 'Not solved, so not in the means' in md, md
  assert 'Solved by both' not in md, md
  table, _ = compare.pairs_table([summary], 1, 0.02)
  assert table.splitlines()[4].endswith('| 16.0x | sparse no edges |')
  conv = [{'steps': s, 'num_edges': e, 'num_nodes': 1}
          for s, e in ((1000, 5), (2000, 0))]
  table, _ = compare.convergence_table(
      {'z': ({'solved': True, 'convergence': conv},) * 2}, ['z'],
      [1000, 2000])
  assert table.splitlines()[2] == (
      '| z | sparse | 5 edges / 1 nodes | 0 edges / 1 nodes |')


def test_a_bar_in_a_task_name_stays_inside_its_cell():
  """A task file may be named `a|b.jsonl`: each of compare's tables keeps
  as many columns in that task's row as in its header."""
  def cells(line):
    return len(re.split(r'(?<!\\)\|', line))
  summary = compare.summarize({'a|b': (_edge_count(10), _edge_count(160))},
                              CHECKPOINTS)
  tables = [compare.to_markdown(summary),
            compare.pairs_table([summary], 1, 0.02)[0],
            compare.convergence_table(
                {'a|b': ({'solved': True, 'convergence': [
                    {'steps': 1000, 'num_edges': 5, 'num_nodes': 1}]},) * 2},
                ['a|b'], [1000])[0]]
  for md in tables:
    rows = [l for l in md.splitlines() if l.startswith('|')]
    assert any(r'a\|b' in l for l in rows), md
    assert len({cells(l) for l in rows}) == 1, md


def test_draw_curve_of_no_edges_says_so(tmp_path):
  """Every task unsolved at every point: a figure that says why it is
  empty, without matplotlib's warning of a legend with nothing in it."""
  points = [{'model': 'sparse', 'step': 100, 'val_loss': 3.1, 'solved': 0,
             'tasks': 2, 'averaged': 0, 'edges': None}]
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    viz.draw_curve(points, CHECKPOINTS, str(tmp_path / 'curve'))
  _check_files(str(tmp_path / 'curve'))
  with open(tmp_path / 'curve.svg') as f:
    assert 'no checkpoint has a circuit with edges' in f.read()


def test_a_shallower_model_beside_a_deeper_one_labels_only_its_layers(
    tmp_path):
  """Of a 2-layer circuit beside a 4-layer one, its panel labelled layers 2
  and 3 with their rows, where nothing was kept: read as layers its circuit
  does not use, not as layers it does not have. They are unlabelled and
  said to be missing, and an unsolved circuit's note sits on its own
  layers, not in the middle of the missing ones."""
  path = str(tmp_path / 'figure')
  for sparse_layers, note in ((2, 'no layers 2-3'), (3, 'no layer 3')):
    viz.draw_comparison(make_circuit(num_layers=sparse_layers),
                        make_circuit(num_layers=4), path)
    with open(path + '.svg') as f:
      svg = f.read()
    assert re.findall(r'<!-- (layer \d) -->', svg) == [
        f'layer {i}' for i in (*range(sparse_layers), *range(4))]
    assert svg.count(f'<!-- a {sparse_layers}-layer model: {note} -->') == 1
    assert svg.count('<!-- mlp_out -->') == sparse_layers + 4
  viz.draw_comparison(make_circuit(num_layers=4), make_circuit(num_layers=4),
                      path)
  with open(path + '.svg') as f:
    assert '-layer model' not in f.read()
  fig = viz._figure(3, panels=2)
  ax = fig.add_subplot(1, 2, 1)
  viz._draw_panel(ax, make_circuit(solved=False, num_layers=1), 3, 10)
  [note] = [t for t in ax.texts if t.get_text().startswith('not solved')]
  assert viz._y(0, 'mlp_out') < note.get_position()[1] < viz._y(0, 'attn_in')
