"""Tests for the circuit figures and the sparse-vs-dense table, on synthetic
circuits (no model, no pruning)."""

import json
import math
import os
import random
import subprocess
import sys
import xml.etree.ElementTree as ET

from absl import flags
import pytest

from sparse_gpt2 import circuits
from sparse_gpt2.circuits import compare
from sparse_gpt2.circuits import viz

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
      'task': task, 'run': run, 'target_loss': 0.15, 'solved': solved,
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
                 'circuit_ablated': 2.0 if solved else None},
      'accuracy': {'full_model': 0.99, 'circuit_only': 0.97,
                   'circuit_ablated': 0.5},
      'logit_scale': 1.0, 'logit_shift': 0.0, 'num_layers': num_layers,
      'layer_sizes': dict(_SIZES), 'seconds': 1.0,
      'pruning': {'steps': 200},
  }


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


def test_draw_circuit_sparse_dense_and_unsolved(tmp_path):
  dense = make_circuit(edges_per_kind=500)  # 3 layers x 6 kinds: 9,000 edges.
  assert dense['num_edges'] == 9000
  for name, circuit in (('sparse', make_circuit()), ('dense', dense),
                        ('unsolved', make_circuit(solved=False))):
    path = str(tmp_path / name / 'circuit')  # The folder is created.
    viz.draw_circuit(circuit, path)
    _check_files(path)


def test_draw_comparison(tmp_path):
  path = str(tmp_path / 'figure')
  viz.draw_comparison(make_circuit(), make_circuit(edges_per_kind=200), path)
  _check_files(path)
  svg = open(path + '.svg').read()
  assert 'Sparse GPT-2' in svg and 'GPT-2 (baseline)' in svg
  assert '3,600 edges' in svg  # The dense panel's count, in its title.


def test_draw_comparison_unsolved_and_unequal_depths(tmp_path):
  path = str(tmp_path / 'figure')
  viz.draw_comparison(make_circuit(num_layers=2),
                      make_circuit(solved=False, num_layers=4), path,
                      sparse_label='A', dense_label='B')
  _check_files(path)


def test_summarize_ratios_and_geometric_means():
  results = {
      'a': (_edge_count(10), _edge_count(160, run='runs/dense')),
      'b': (_edge_count(40), _edge_count(160)),
      'c': (_edge_count(5), make_circuit(solved=False)),
      'd': (make_circuit(solved=False), make_circuit(solved=False)),
  }
  summary = compare.summarize(results, {'sparse': 3.1, 'dense': 3.0})
  rows = {r['task']: r for r in summary['tasks']}
  assert list(rows) == ['a', 'b', 'c', 'd']
  assert rows['a']['ratio'] == 16 and rows['b']['ratio'] == 4
  assert rows['c']['ratio'] is None and rows['d']['ratio'] is None
  assert rows['c']['sparse']['edges'] == 5
  assert rows['c']['dense']['edges'] is None
  assert summary['not_solved'] == {'c': ['dense'], 'd': ['sparse', 'dense']}
  assert summary['num_compared'] == 2
  g = summary['geomean']
  assert math.isclose(g['edges_sparse'], 20)  # sqrt(10 * 40)
  assert math.isclose(g['edges_dense'], 160)
  assert math.isclose(g['ratio'], 8)  # sqrt(16 * 4)
  assert summary['figure_task'] == 'a'  # 'c' is smaller but unsolved dense.
  assert summary['val_loss'] == {'sparse': 3.1, 'dense': 3.0}
  assert summary['runs'] == {'sparse': 'runs/sparse', 'dense': 'runs/dense'}
  assert summary['target_loss'] == 0.15


def test_summarize_nothing_solved_by_both():
  summary = compare.summarize(
      {'a': (make_circuit(solved=False), _edge_count(10))},
      {'sparse': None, 'dense': None})
  assert summary['geomean'] is None and summary['figure_task'] is None
  assert 'No task is solved by both' in compare.to_markdown(summary)


def test_to_markdown():
  results = {'a': (_edge_count(10), _edge_count(1600)),
             'c': (_edge_count(5), make_circuit(solved=False))}
  md = compare.to_markdown(
      compare.summarize(results, {'sparse': 3.1234, 'dense': None}))
  assert '| a | 10 | 1,600 | 160.0x | 5 | 800 | 0.100 | 0.100 |' in md
  assert '| c | 5 | not solved | n/a | 2 | not solved | 0.100 | n/a |' in md
  assert 'sparse: 3.1234' in md and 'dense: n/a' in md
  assert '**160.0x**' in md
  assert 'c (full-model task loss: dense 0.600)' in md
  assert '`figure.png` shows `a`' in md


def test_last_val_loss(tmp_path):
  assert compare.last_val_loss(str(tmp_path)) is None
  (tmp_path / 'metrics.jsonl').write_text(
      '{"step": 10, "loss": 4.0, "val_loss": 4.2}\n'
      '{"step": 20, "loss": 3.5, "val_loss": 3.7}\n'
      '{"step": 30, "loss": 3.0}\n')
  assert compare.last_val_loss(str(tmp_path)) == 3.7


@pytest.mark.parametrize('bad', ['run', 'task'])
def test_cli_rejects_bad_input_before_pruning(tmp_path, bad):
  run = str(tmp_path if bad == 'task' else tmp_path / 'missing')
  task = 'no_such_task' if bad == 'task' else 'var_swap'
  proc = subprocess.run(
      [sys.executable, '-m', 'sparse_gpt2.circuits.compare', f'--sparse={run}',
       f'--dense={tmp_path}', f'--tasks={task}', f'--out={tmp_path / "out"}'],
      capture_output=True, text=True, timeout=60,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error:'), proc.stderr
  assert ('no_such_task' if bad == 'task' else 'missing') in lines[0]
  assert not os.path.exists(tmp_path / 'out')


def test_cli_writes_everything_and_reuses_circuits(tmp_path, monkeypatch,
                                                   capsys):
  """main end to end with a stand-in for prune.find_circuit, which needs a
  trained model; a second run finds every circuit on disk."""
  calls = []

  def find_circuit(workdir, *, task, target_loss=0.15, steps=200):
    calls.append((workdir, task, target_loss, steps))
    dense = workdir.endswith('dense')
    circuit = make_circuit(task, edges_per_kind=20 if dense else 1,
                           solved=not (dense and task == 'var_swap'),
                           num_layers=1, run=workdir)
    circuit['pruning']['steps'] = steps
    return circuit

  fake = type(sys)('sparse_gpt2.circuits.prune')
  fake.find_circuit = find_circuit
  monkeypatch.setitem(sys.modules, fake.__name__, fake)
  monkeypatch.setattr(circuits, 'prune', fake, raising=False)
  runs = {name: tmp_path / name for name in compare.MODELS}
  for run in runs.values():
    run.mkdir()
  (runs['sparse'] / 'metrics.jsonl').write_text('{"val_loss": 2.5}\n')
  out = tmp_path / 'out'
  def run(*args):
    argv = ['compare', f'--sparse={runs["sparse"]}',
            f'--dense={runs["dense"]}', f'--out={out}', *args]
    try:
      flags.FLAGS(argv)
      compare.main(argv[:1])
    finally:
      flags.FLAGS.unparse_flags()

  run('--tasks=if_equals,var_swap', '--steps=7')
  assert calls == [(str(runs[name]), task, 0.15, 7)
                   for task in ('if_equals', 'var_swap')
                   for name in compare.MODELS]
  for task in ('if_equals', 'var_swap'):
    for name in ('sparse.json', 'dense.json', 'figure.png', 'figure.svg'):
      assert (out / task / name).exists()
  summary = json.loads((out / 'comparison.json').read_text())
  assert summary['val_loss'] == {'sparse': 2.5, 'dense': None}
  assert summary['figure_task'] == 'if_equals'
  assert summary['not_solved'] == {'var_swap': ['dense']}
  assert (out / 'figure.png').exists() and (out / 'figure.svg').exists()
  md = (out / 'comparison.md').read_text()
  assert '| if_equals | 6 | 120 | 20.0x |' in md
  assert md in capsys.readouterr().out

  run('--tasks=if_equals,var_swap', '--steps=7')
  assert len(calls) == 4  # All reused.
  run('--tasks=if_equals', '--steps=9')
  assert calls[4:] == [(str(runs[name]), 'if_equals', 0.15, 9)
                       for name in compare.MODELS]
