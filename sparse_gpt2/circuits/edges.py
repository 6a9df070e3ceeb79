"""From a circuit's nodes to its edges: the nonzero weights between two kept
nodes, in the matrices that join nodes directly (`EDGE_WEIGHTS`). A
circuit's size is its number of edges, as in Gao et al. (2025)."""

import numpy as np

MAX_LISTED = 20_000  # Edges listed in circuit.json; all are counted.
# Weights that join two nodes of one block: (parameter, source, destination).
EDGE_WEIGHTS = (('query', 'attn_in', 'q'), ('key', 'attn_in', 'k'),
                ('value', 'attn_in', 'v'), ('attn_proj', 'v', 'attn_out'),
                ('mlp_fc', 'mlp_in', 'mlp_neuron'),
                ('mlp_proj', 'mlp_neuron', 'mlp_out'))


def total(params, num_layers):
  """Nonzero weights of EDGE_WEIGHTS in the whole model."""
  return sum(int(np.count_nonzero(params[f'block_{layer}'][name]['kernel']))
             for layer in range(num_layers) for name, _, _ in EDGE_WEIGHTS)


def between(params, kept, num_layers):
  """Nonzero weights of EDGE_WEIGHTS between kept nodes.

  kept: {'block_i': {location: bool [width]}}. Returns (edges, count,
  truncated): `edges` lists at most MAX_LISTED of the `count` edges, those
  of largest |w| when cut, as {'src': [layer, location, index], 'dst':
  [...], 'weight': 'block_i/NAME/kernel', 'value'}.
  """
  found = []  # (layer, name, src, dst, rows, cols, values) per matrix.
  for layer in range(num_layers):
    block = f'block_{layer}'
    for name, src, dst in EDGE_WEIGHTS:
      w = np.asarray(params[block][name]['kernel'])
      rows, cols = (np.flatnonzero(kept[block][src]),
                    np.flatnonzero(kept[block][dst]))
      i, j = np.nonzero(w[np.ix_(rows, cols)])
      found.append((layer, name, src, dst, rows[i], cols[j],
                    w[rows[i], cols[j]]))
  count = sum(f[4].size for f in found)
  truncated = count > MAX_LISTED
  if truncated:  # Every edge above the cut, then the first ones at it.
    size = np.abs(np.concatenate([f[6] for f in found]))
    cut = np.sort(size)[-MAX_LISTED]
    at_cut = size == cut
    listed = (size > cut) | (at_cut & (np.cumsum(at_cut) <= MAX_LISTED
                                       - np.count_nonzero(size > cut)))
    ends = np.cumsum([f[4].size for f in found])[:-1]
    found = [(*f[:4], *(x[keep] for x in f[4:]))
             for f, keep in zip(found, np.split(listed, ends))]
  edges = [{'src': [layer, src, int(r)], 'dst': [layer, dst, int(c)],
            'weight': f'block_{layer}/{name}/kernel', 'value': float(v)}
           for layer, name, src, dst, rs, cs, vs in found
           for r, c, v in zip(rs, cs, vs)]
  return edges, count, truncated
