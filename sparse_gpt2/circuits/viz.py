"""Circuit figures: one model's circuit, and the sparse-beside-dense figure of
Gao et al. 2025 ("Sparse GPT-2" next to "GPT-2 (baseline)").

A circuit is drawn as the model's layers from top (layer 0) to bottom, each a
band of rows, one per node location in forward order. A node sits at
(index + 0.5) / width of its row, so a residual channel stays in one column
through every residual row of every layer (attn_in, attn_out, mlp_in and
mlp_out all index residual channels), and two models of different widths
share one horizontal scale. Edges are straight lines between their nodes, all
in one LineCollection: a dense circuit of ~20,000 edges draws in a second or
two, where one `plot` call per edge would take minutes.

Figures are built on `matplotlib.figure.Figure` rather than pyplot: the Agg
canvas needs no screen, and nothing is registered with pyplot's global figure
list, so drawing hundreds of figures in one process does not leak them.
"""

import os

from matplotlib import collections as mcollections
from matplotlib import figure as mfigure
from matplotlib import lines as mlines
from matplotlib import transforms as mtransforms
import numpy as np

from sparse_gpt2 import model as model_lib

LOCATIONS = model_lib.NODE_LOCATIONS  # Rows of a layer, in forward order.
_ROW = {loc: i for i, loc in enumerate(LOCATIONS)}
_LAYER_PITCH = len(LOCATIONS) + 1  # One empty row between layers.
_SMALL_ROW = 64  # Rows this narrow show every node faintly, kept ones bold.
_COLORS = {  # Residual reads/writes, attention heads' channels, MLP neurons.
    'attn_in': '#4c72b0', 'attn_out': '#4c72b0', 'mlp_in': '#4c72b0',
    'mlp_out': '#4c72b0', 'q': '#dd8452', 'k': '#dd8452', 'v': '#dd8452',
    'mlp_neuron': '#55a868'}
_RESIDUAL = ('attn_in', 'attn_out', 'mlp_in', 'mlp_out')
_LEGEND = (('residual channel', '#4c72b0'), ('q / k / v channel', '#dd8452'),
           ('MLP neuron', '#55a868'))
_ROW_INCHES = 0.17
_PANEL_INCHES = 5.5
_LABEL_INCHES = 1.0  # Left of each panel: layer names, then row names.
_DPI = 150


def readable(name):
  """A task's or run's name as text: Python hands on bytes that are not
  UTF-8 (a file name, or any non-ASCII one under LC_ALL=C) as lone
  surrogates, on which the figure's font stopped with a TypeError after the
  pruning, and the explorer's link to its task (encodeURIComponent) threw,
  leaving the page's links dead. Their UTF-8 is read back; other bytes are
  shown as U+FFFD."""
  return name.encode('utf-8', 'surrogateescape').decode('utf-8', 'replace')


def _shown(name):
  """`readable(name)` as matplotlib draws it: a `$` escaped, since it reads
  text between two as math, which stopped a task file `usd_$5_$10.jsonl`'s
  figure with a ValueError after its pruning."""
  return readable(name).replace('$', r'\$')


def draw_circuit(circuit, path):
  """Writes `path`.png and `path`.svg: one circuit, titled with its task,
  size and losses."""
  fig = _figure(circuit['num_layers'], panels=1)
  ax = fig.add_subplot(1, 1, 1)
  _draw_panel(ax, circuit, circuit['num_layers'],
              _marker_size(len(circuit['nodes'])))
  ax.set_title(f"{_shown(circuit['task'])}: {_size_line(circuit)}\n"
               f'{_loss_line(circuit)}', fontsize=9)
  _save(fig, path)


def draw_comparison(sparse_circuit, dense_circuit, path,
                    sparse_label='Sparse GPT-2',
                    dense_label='GPT-2 (baseline)'):
  """Writes `path`.png and `path`.svg: the two circuits of one task side by
  side on the same layout, each panel titled with its label and edge count,
  so the difference in wiring is visible at a glance."""
  num_layers = max(sparse_circuit['num_layers'], dense_circuit['num_layers'])
  fig = _figure(num_layers, panels=2)
  # One marker size for both panels, so they compare at a glance.
  size = _marker_size(max(len(sparse_circuit['nodes']),
                          len(dense_circuit['nodes'])))
  for i, (circuit, label) in enumerate(((sparse_circuit, sparse_label),
                                        (dense_circuit, dense_label))):
    ax = fig.add_subplot(1, 2, i + 1)
    _draw_panel(ax, circuit, num_layers, size)
    ax.set_title(f'{_shown(label)}{_checkpoint_line(circuit)}\n{_size_line(circuit)}'
                 f'\n{_loss_line(circuit)}', fontsize=9)
  fig.suptitle(f"Task: {_shown(sparse_circuit['task'])}  (circuits pruned to task "
               f"loss \u2264 {sparse_circuit['target_loss']:g})", fontsize=11)
  _save(fig, path)


def _figure(num_layers, panels):
  """An empty figure sized in inches per row and panel, with room above
  for the titles (three lines a panel and a suptitle when comparing) and
  below for the legend."""
  top, bottom, right = (0.6 if panels == 1 else 1.2), 0.5, 0.15
  width = panels * (_LABEL_INCHES + _PANEL_INCHES) + right
  height = top + bottom + _ROW_INCHES * num_layers * _LAYER_PITCH
  fig = mfigure.Figure(figsize=(width, height))
  fig.subplots_adjust(left=_LABEL_INCHES / width, right=1 - right / width,
                      bottom=bottom / height, top=1 - top / height,
                      wspace=_LABEL_INCHES / _PANEL_INCHES)
  fig.legend(handles=[
      mlines.Line2D([], [], ls='', marker='o', markersize=6, color=color,
                    markeredgecolor='k', label=label)
      for label, color in _LEGEND], loc='lower center', ncol=len(_LEGEND),
             fontsize=8, frameon=False)
  return fig


def _y(layer, location):
  return -(layer * _LAYER_PITCH + _ROW[location])


def _x(index, location, sizes):
  return (index + 0.5) / sizes[location]


def _marker_size(num_nodes):
  return float(np.clip(2000 / max(num_nodes, 1), 3, 40))


def residual_links(nodes):
  """[(write, read)]: a kept residual write (attn_out, mlp_out) and a later
  kept read (attn_in, mlp_in) of the same channel, which the residual stream
  joins without a weight; nodes as {'layer', 'location', 'index'}."""
  by_channel = {}
  for v in nodes:
    if v['location'] in _RESIDUAL:
      by_channel.setdefault(v['index'], []).append(v)
  links = []
  for channel in by_channel.values():
    channel.sort(key=lambda v: -_y(v['layer'], v['location']))
    for i, write in enumerate(channel):
      if write['location'] in ('attn_out', 'mlp_out'):
        links += [(write, read) for read in channel[i + 1:]
                  if read['location'] in ('attn_in', 'mlp_in')]
  return links


def _draw_panel(ax, circuit, num_layers, marker_size):
  """Layer bands, row labels, residual links, edges and nodes of one
  circuit on `ax`, whose height is `num_layers` layers: beside a deeper
  model's, the layers this model lacks are left unlabelled and said to be
  missing (labelled, they read as layers where its circuit keeps
  nothing)."""
  sizes = circuit['layer_sizes']
  ticks, labels = [], []
  label_transform = mtransforms.offset_copy(
      ax.get_yaxis_transform(), ax.figure, x=-0.8, units='inches')
  for layer in range(circuit['num_layers']):
    top = _y(layer, LOCATIONS[0])
    if layer % 2 == 0:
      ax.axhspan(top - len(LOCATIONS) + 0.5, top + 0.5, color='0.94', lw=0,
                 zorder=0)
    ax.text(0, top - (len(LOCATIONS) - 1) / 2, f'layer {layer}',
            transform=label_transform, rotation=90, ha='center', va='center',
            fontsize=8)
    for loc in LOCATIONS:
      ticks.append(_y(layer, loc))
      labels.append(loc)
      if sizes[loc] <= _SMALL_ROW:
        ax.scatter(_x(np.arange(sizes[loc]), loc, sizes),
                   np.full(sizes[loc], _y(layer, loc)), s=4, c='0.75', lw=0,
                   zorder=2)
  missing = range(circuit['num_layers'], num_layers)
  if missing:
    ax.text(0.5, (_y(missing[0], LOCATIONS[0])
                  + _y(missing[-1], LOCATIONS[-1])) / 2,
            f"a {circuit['num_layers']}-layer model: no "
            + (f'layer {missing[0]}' if len(missing) == 1
               else f'layers {missing[0]}-{missing[-1]}'),
            ha='center', va='center', fontsize=8, color='0.4')
  ax.set_yticks(ticks, labels, fontsize=6)
  ax.set_xticks([])
  ax.set_xlim(-0.01, 1.01)
  ax.set_ylim(_y(num_layers - 1, LOCATIONS[-1]) - 0.8, 0.8)
  for spine in ax.spines.values():
    spine.set_visible(False)
  ax.tick_params(axis='y', length=0)

  if not circuit['solved']:
    # The select split's loss decides (`prune`), not the test loss in the
    # title, which may be below the target; the CLI and view.html say so.
    # Centred on the model's own layers.
    ax.text(0.5, (_y(0, LOCATIONS[0])
                  + _y(circuit['num_layers'] - 1, LOCATIONS[-1])) / 2,
            f"not solved: the full model's task loss is\n"
            f"{circuit['select_loss']['full_model']:.3f} (select split), "
            "above the target "
            f"{circuit['target_loss']:g}",
            transform=ax.get_yaxis_transform(), ha='center', va='center',
            fontsize=9, bbox={'facecolor': 'white', 'edgecolor': '0.6'})
    return

  edges = circuit['edges']
  if edges:
    segments = [((_x(e['src'][2], e['src'][1], sizes), _y(*e['src'][:2])),
                 (_x(e['dst'][2], e['dst'][1], sizes), _y(*e['dst'][:2])))
                for e in edges]
    # Thinner and fainter the more edges there are, so 20 edges read as
    # lines and 20,000 as a density; width within a circuit follows |value|.
    n = len(edges)
    magnitude = np.abs([e['value'] for e in edges])
    magnitude = magnitude / max(magnitude.max(), 1e-12)
    width = np.clip(6 / np.sqrt(n), 0.4, 1.5) * (0.3 + 0.7 * magnitude)
    alpha = float(np.clip(10 / np.sqrt(n), 0.06, 0.9))
    lines = mcollections.LineCollection(segments, colors='0.1', alpha=alpha,
                                        linewidths=width, zorder=1)
    # Thousands of vector paths make a slow, many-megabyte SVG; an embedded
    # bitmap of them looks the same.
    lines.set_rasterized(n > 2000)
    ax.add_collection(lines)

  links = residual_links(circuit['nodes'])
  if links:
    ax.add_collection(mcollections.LineCollection(
        [((_x(a['index'], a['location'], sizes), _y(a['layer'],
                                                    a['location'])),
          (_x(b['index'], b['location'], sizes), _y(b['layer'],
                                                    b['location'])))
         for a, b in links], colors=_COLORS['attn_in'], alpha=0.35,
        linewidths=0.6, linestyles='--', zorder=1))

  nodes = circuit['nodes']
  if nodes:
    ax.scatter([_x(v['index'], v['location'], sizes) for v in nodes],
               [_y(v['layer'], v['location']) for v in nodes],
               s=marker_size,
               c=[_COLORS[v['location']] for v in nodes],
               edgecolors='k', linewidths=0.4 if len(nodes) < 500 else 0,
               zorder=3, rasterized=len(nodes) > 2000)


def _checkpoint_line(circuit):
  if circuit.get('val_loss') is None:
    return ''
  return (f"\nvalidation loss {circuit['val_loss']:.3f} "
          f"(step {circuit['step']})")


def _size_line(circuit):
  if not circuit['solved']:
    return 'not solved'
  line = f"{circuit['num_edges']:,} edges, {circuit['num_nodes']:,} nodes"
  if circuit.get('edges_truncated'):
    line += f" ({len(circuit['edges']):,} edges drawn)"
  return line


def _loss_line(circuit):
  return (f"test task loss: full {_loss(circuit, 'full_model')}, circuit "
          f"{_loss(circuit, 'circuit_only')}, ablated "
          f"{_loss(circuit, 'circuit_ablated')}")


def _loss(circuit, key):
  """A loss for a title; an unsolved circuit may have no circuit losses."""
  value = circuit.get('losses', {}).get(key)
  return 'n/a' if value is None else f'{value:.3f}'


def _save(fig, path):
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path + '.png', dpi=_DPI)
  fig.savefig(path + '.svg')


def draw_curve(points, checkpoints, path):
  """Writes `path`.png and `path`.svg: geometric-mean circuit edges against
  pretraining validation loss, one line per model (Gao et al.'s Fig. 3
  shape). Points whose mean is over only some of the tasks (the others not
  solved, or solved by no edge) are hollow. The paired checkpoints of the
  comparison are ringed."""
  fig = mfigure.Figure(figsize=(6, 4.2))
  ax = fig.add_subplot(1, 1, 1)
  if all(p['edges'] is None for p in points):  # Else an empty, unsaid plot.
    ax.text(0.5, 0.5, 'no checkpoint has a circuit with edges\n(tasks not '
            'solved, or solved by the direct path alone)',
            transform=ax.transAxes, ha='center', va='center', fontsize=9)
  for model, color in (('sparse', '#c44e52'), ('dense', '#4c72b0')):
    mine = sorted((p for p in points if p['model'] == model
                   and p['edges'] is not None), key=lambda p: p['val_loss'])
    if not mine:
      continue
    ax.plot([p['val_loss'] for p in mine], [p['edges'] for p in mine],
            color=color, lw=1, label=model)
    full = [p['averaged'] == p['tasks'] for p in mine]
    ax.scatter([p['val_loss'] for p in mine], [p['edges'] for p in mine],
               s=30, zorder=3, edgecolors=color,
               facecolors=[color if f else 'white' for f in full])
    paired = [p for p in mine if p['step'] == checkpoints[model]['step']]
    ax.scatter([p['val_loss'] for p in paired], [p['edges'] for p in paired],
               s=120, facecolors='none', edgecolors='k', zorder=4)
  ax.set_yscale('log')
  ax.invert_xaxis()  # Better models to the right, as training goes.
  ax.set_xlabel('pretraining validation loss (nats/token)')
  ax.set_ylabel('circuit edges (geometric mean over tasks)')
  if ax.get_legend_handles_labels()[0]:  # Else matplotlib warns.
    ax.legend(fontsize=8, frameon=False)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  _save(fig, path)
