"""Tests for the circuit explorer page, on a tiny sparse and dense pair of
trained runs, in headless Chromium (Debian's `chromium`, driven over the
DevTools protocol): the page is checked as a user gets it, not as text.

The circuits are drawn at random from the runs' nodes, with their real edges
(`edges.between` on the runs' weights): the page reads circuit files as they
are, so how they were found does not matter here, and pruning would cost
more than every other test in the file.
"""

import base64
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import flax.linen as nn
import jax
import numpy as np
import pytest
import websocket

from sparse_gpt2 import model as model_lib
from sparse_gpt2.circuits import compare
from sparse_gpt2.circuits import edges as edges_lib
from sparse_gpt2.circuits import runs
from sparse_gpt2.circuits import view

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Prompts the tiny runs' tokenizer scores (a quote opened, which to close).
EXAMPLES = [{'prompt': f'x = {q}{name}', 'correct': q, 'incorrect': other}
            for name in ('name', 'value') for q, other in (("'", '"'),
                                                           ('"', "'"))]
NODES = {'sparse': 40, 'dense': 90}  # Nodes of each tiny circuit.


@pytest.fixture(scope='module')
def twins(tiny_config, tmp_path_factory):
  """A sparse and a dense tiny run, each with one checkpoint (step 10)."""
  from sparse_gpt2 import train  # pylint: disable=g-import-not-at-top
  made = {}
  for name, mode in (('sparse', 'topk'), ('dense', 'none')):
    workdir = str(tmp_path_factory.mktemp(name))
    train.train_and_evaluate(tiny_config(mode, train_steps=10), workdir)
    made[name] = workdir
  return made


def random_circuit(run, task, num_nodes, seed, solved=True):
  """A circuit file as `runs.find_circuit` writes it, of `num_nodes` nodes
  drawn at random from a run's newest checkpoint, with their real edges."""
  loaded = runs.load(run)
  params = loaded['params']
  means = jax.device_get(runs.node_means(run, loaded['step']))
  num_layers = len(means)
  rng = np.random.default_rng(seed)
  kept = jax.tree.map(lambda m: np.zeros(m.shape, bool), means)
  slots = [(layer, loc, i) for layer in range(num_layers)
           for loc, m in means[f'block_{layer}'].items()
           for i in range(m.size)]
  nodes = []
  for j in sorted(rng.choice(len(slots), num_nodes if solved else 0,
                             replace=False)):
    layer, loc, i = slots[j]
    kept[f'block_{layer}'][loc][i] = True
    nodes.append({'layer': layer, 'location': loc, 'index': i,
                  'score': float(rng.uniform(0, 1)),
                  'importance': float(rng.normal()),
                  'ablation_effect': float(rng.uniform(0, 0.3))
                                     if len(nodes) % 2 else None})
  edges, count, truncated = edges_lib.between(params, kept, num_layers)
  block = means['block_0']
  select_loss = {'full_model': 0.12 if solved else 0.65,
                 'circuit_only': 0.31 if solved else None}
  losses = {'full_model': 0.1 if solved else 0.6,
            'circuit_only': 0.3 if solved else None,
            'circuit_ablated': 0.69 if solved else None, 'all_ablated': None}
  return {
      'task': task, 'run': run, 'step': loaded['step'],
      'checkpoint_sha256': runs.checkpoint_digest(run, loaded['step']),
      'val_loss': loaded['val_loss'], 'examples': EXAMPLES,
      'target_loss': 0.5, 'solved': solved,
      'model_shape': {'num_layers': num_layers,
                      'd_model': int(block['attn_in'].size), 'num_heads': 2,
                      'd_head': 16, 'd_mlp': int(block['mlp_neuron'].size)},
      'num_layers': num_layers,
      'layer_sizes': {loc: int(m.size) for loc, m in block.items()},
      'settings': {'steps': 5}, 'steps_run': 5 if solved else None,
      'settled': True if solved else None,
      'num_nodes': len(nodes), 'num_edges': count,
      'total_nodes': len(slots),
      'total_edges': edges_lib.total(params, num_layers),
      'kept_by_mask': len(nodes), 'past_mask': False, 'nodes': nodes,
      'edges': edges, 'edges_truncated': truncated, 'losses': losses,
      'select_loss': select_loss,
      'accuracy': dict(losses), 'logit_scale': 1.5 if solved else None,
      'logit_shift': -0.2 if solved else None, 'convergence': [],
      'seconds': 1.0}


@pytest.fixture(scope='module')
def compare_dir(twins, tmp_path_factory):
  """A `compare` output directory for the twins: task 'quotes' solved by
  both, task 'closing' solved by the sparse run only."""
  out = tmp_path_factory.mktemp('compare')
  results = {
      'quotes': (random_circuit(twins['sparse'], 'quotes',
                                NODES['sparse'], 0),
                 random_circuit(twins['dense'], 'quotes', NODES['dense'], 1)),
      'closing': (random_circuit(twins['sparse'], 'closing', 7, 2),
                  random_circuit(twins['dense'], 'closing', 0, 3,
                                 solved=False))}
  # A dense pruning that went on and had still not settled.
  results['quotes'][1].update(steps_run=8, settled=False)
  checkpoints = {m: {'run': twins[m], 'step': 10,
                     'val_loss': runs.val_losses(twins[m])[10]}
                 for m in ('sparse', 'dense')}
  for task, pair in results.items():
    for model, circuit in zip(('sparse', 'dense'), pair):
      path = out / 'circuits' / f'{model}-10' / f'{task}.json'
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(circuit))
  (out / 'comparison.json').write_text(json.dumps(
      compare.summarize(results, checkpoints)))
  return out, results


@pytest.fixture(scope='module')
def page(compare_dir):
  out, _ = compare_dir
  path = str(out / 'index.html')
  data = view.write_page(path, compare_dir=str(out), snippets_per_node=3)
  return path, data


def test_page_data_reads_every_circuit_and_computes_run_data(page,
                                                             compare_dir):
  _, data = page
  _, results = compare_dir
  assert [p['label'] for p in data['panels']] == ['Sparse GPT-2',
                                                  'GPT-2 (baseline)']
  assert [t['name'] for t in data['tasks']] == ['quotes', 'closing']
  for task in data['tasks']:
    for circuit, source in zip(task['circuits'], results[task['name']]):
      assert len(circuit['nodes']['layer']) == source['num_nodes']
      assert len(circuit['edges']) == len(source['edges'])
      strengths = [abs(e[2]) for e in circuit['edges']]
      assert strengths == sorted(strengths, reverse=True)
      # A node's ablated loss: the circuit's own loss plus its effect.
      base = source['losses']['circuit_only']
      assert circuit['nodes']['ablated_loss'] == [
          None if v['ablation_effect'] is None
          else pytest.approx(base + v['ablation_effect'], rel=1e-3)
          for v in source['nodes']]
  assert any(x is not None for x in
             data['tasks'][0]['circuits'][0]['nodes']['ablated_loss'])
  for panel, model in zip(data['panels'], ('sparse', 'dense')):
    snippets = panel['snippets']
    keys = {view.node_key(v['layer'], v['location'], v['index'])
            for pair in results.values() for v in pair[0 if model ==
                                                       'sparse' else 1]
            ['nodes']}
    assert set(snippets['top']) == keys
    assert all(len(top) == 3 for top in snippets['top'].values())
    assert len(snippets['tokens']) == 4096  # 128 windows of 32 tokens.
    for key, top in snippets['top'].items():  # Furthest from the mean first.
      # Ordered by the unrounded distances; read back from values and a
      # mean rounded to 3 decimals, two near-equal ones may come out up to
      # 1e-3 the other way (0.149 after 0.14900000000000002 on other
      # weights).
      distance = [abs(a - snippets['mean'][key]) for _, a in top]
      assert all(farther > nearer - 1.001e-3
                 for farther, nearer in zip(distance, distance[1:])), distance
  # Two of the sparse panel's probabilities: full model and circuit only.
  probs = data['tasks'][0]['examples'][0]['probs']
  assert len(probs) == 2 and set(probs[0]) == {'full', 'circuit',
                                               'calibrated'}
  assert all(0 < p < 1 for p in probs[1]['full'] + probs[1]['circuit'])
  # The dense model did not solve 'closing': full model only.
  assert set(data['tasks'][1]['examples'][0]['probs'][1]) == {'full'}


def test_snippet_activations_are_the_models(twins):
  """A node's top activations, against the same node read another way
  (Flax's capture_intermediates, every `_node` output in forward order)."""
  run = runs.load(twins['sparse'])
  means = jax.device_get(runs.node_means(twins['sparse'], run['step']))
  key = view.node_key(1, 'mlp_neuron', 5)
  snippets = view.top_snippets(run, means, [key], 256, per_node=4)
  tokens = np.asarray(snippets['tokens']).reshape(-1, snippets['seq_len'])
  _, state = run['model'].apply(
      {'params': run['params']}, tokens,
      capture_intermediates=lambda _, name: name == '_node',
      mutable='intermediates')
  neuron = np.asarray(state['intermediates']['block_1']['_node'][
      view.LOCATIONS.index('mlp_neuron')])[..., 5].reshape(-1)
  top = snippets['top'][key]
  np.testing.assert_allclose([a for _, a in top],
                             [neuron[p] for p, _ in top], rtol=1e-2,
                             atol=1e-3)
  mean = means['block_1']['mlp_neuron'][5]
  assert abs(top[-1][1] - mean) >= np.sort(np.abs(neuron - mean))[-4] - 1e-3


def test_circuit_of_every_node_has_the_full_models_probabilities(twins):
  run = runs.load(twins['dense'])
  means = jax.device_get(runs.node_means(twins['dense'], run['step']))
  everything = random_circuit(twins['dense'], 'quotes', 1, 0)
  everything['nodes'] = [
      {'layer': layer, 'location': loc, 'index': i}
      for layer in range(len(means))
      for loc, m in means[f'block_{layer}'].items() for i in range(m.size)]
  rows = view.example_probabilities(run, means, everything, EXAMPLES)
  for row in rows:
    np.testing.assert_allclose(row['circuit'], row['full'], rtol=1e-3)
  # 'full' is [P(correct), P(incorrect)]: the softmax of the whole model's
  # logits after each prompt, run here on the prompt alone.
  tokenizer = run['corpus'].tokenizer
  for example, row in zip(EXAMPLES, rows):
    ids = tokenizer.encode(example['prompt']).ids
    logits = run['model'].apply({'params': run['params']},
                                np.array([ids], np.int32))[0, -1]
    p = np.asarray(jax.nn.softmax(logits))
    (c,), (i,) = (tokenizer.encode(example[k]).ids
                  for k in ('correct', 'incorrect'))
    np.testing.assert_allclose(row['full'], [p[c], p[i]], rtol=1e-3)
  one = dict(everything, nodes=everything['nodes'][:1])
  assert view.example_probabilities(run, means, one, EXAMPLES) != rows
  # A circuit of no nodes (the task done with everything mean-ablated) has
  # its probabilities too: the panel reports its loss.
  nothing = dict(everything, nodes=[])
  assert all(row['circuit'] is not None and 'calibrated' in row for row in
             view.example_probabilities(run, means, nothing, EXAMPLES))
  # Another run's examples, whose candidate this tokenizer splits: no
  # probabilities, and no failure of the page.
  foreign = [dict(e, correct='supercalifragilistic') for e in EXAMPLES]
  assert view.example_probabilities(run, means, nothing, foreign) == [
      None] * len(EXAMPLES)


class Browser:
  """Headless Chromium driven over the DevTools protocol (a websocket):
  every console message, exception and network request is recorded."""

  def __init__(self, binary):
    self.profile = tempfile.mkdtemp(prefix='chromium-')
    self.proc = subprocess.Popen(
        [binary, '--headless', '--no-sandbox', '--disable-gpu',
         '--hide-scrollbars', '--remote-debugging-port=0',
         f'--user-data-dir={self.profile}', '--window-size=1400,1000',
         'about:blank'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = os.path.join(self.profile, 'DevToolsActivePort')
    deadline = time.time() + 60
    while not (os.path.exists(port_file) and open(port_file).read().strip()):
      if time.time() > deadline or self.proc.poll() is not None:
        raise RuntimeError('chromium did not start')
      time.sleep(0.1)
    port = open(port_file).read().split()[0]
    with urllib.request.urlopen(f'http://127.0.0.1:{port}/json/list') as r:
      target = next(t for t in json.load(r) if t['type'] == 'page')
    self.ws = websocket.create_connection(target['webSocketDebuggerUrl'],
                                          timeout=60, suppress_origin=True)
    self.next_id = 0
    self.events = []
    for domain in ('Page', 'Runtime', 'Network', 'Log'):
      self.send(f'{domain}.enable')

  def send(self, method, **params):
    self.next_id += 1
    self.ws.send(json.dumps({'id': self.next_id, 'method': method,
                             'params': params}))
    while True:
      message = json.loads(self.ws.recv())
      if message.get('id') == self.next_id:
        if 'error' in message:
          raise RuntimeError(f"{method}: {message['error']}")
        return message['result']
      self.events.append(message)

  def wait_for(self, method):
    while not any(e.get('method') == method for e in self.events):
      self.events.append(json.loads(self.ws.recv()))

  def open(self, url):
    self.events = []
    self.send('Page.navigate', url=url)
    self.wait_for('Page.loadEventFired')

  def js(self, expression):
    result = self.send('Runtime.evaluate', expression=expression,
                       returnByValue=True)
    if 'exceptionDetails' in result:
      raise RuntimeError(result['exceptionDetails'])
    return result['result'].get('value')

  def hover(self, selector):
    """The mouse moved to the centre of the element, as a user does.
    Returns where it is."""
    x, y = self.js(f'''(() => {{
        const e = document.querySelector({json.dumps(selector)});
        e.scrollIntoView({{block: 'center'}});
        const r = e.getBoundingClientRect();
        return [r.x + r.width / 2, r.y + r.height / 2]; }})()''')
    self.send('Input.dispatchMouseEvent', type='mouseMoved', x=x, y=y)
    return x, y

  def click(self, selector):
    """A real mouse click at the centre of the element, as a user does."""
    x, y = self.hover(selector)
    for kind in ('mousePressed', 'mouseReleased'):
      self.send('Input.dispatchMouseEvent', type=kind, x=x, y=y,
                button='left', clickCount=1)

  def errors(self):
    """Console errors and warnings, uncaught exceptions, error log entries."""
    found = []
    for e in self.events:
      params = e.get('params', {})
      if e.get('method') == 'Runtime.exceptionThrown':
        found.append(params['exceptionDetails'])
      elif (e.get('method') == 'Runtime.consoleAPICalled'
            and params['type'] in ('error', 'warning', 'assert')):
        found.append(params['args'])
      elif (e.get('method') == 'Log.entryAdded'
            and params['entry']['level'] in ('error', 'warning')):
        found.append(params['entry'])
    return found

  def requests(self):
    return [e['params']['request']['url'] for e in self.events
            if e.get('method') == 'Network.requestWillBeSent']

  def screenshot(self, path):
    data = self.send('Page.captureScreenshot', format='png')['data']
    with open(path, 'wb') as f:
      f.write(base64.b64decode(data))

  def close(self):
    self.ws.close()
    self.proc.terminate()
    self.proc.wait(timeout=30)
    shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope='module')
def browser():
  binary = shutil.which('chromium') or shutil.which('chromium-browser')
  if binary is None:
    pytest.skip('chromium is not installed, so the page cannot be opened in '
                "a browser: install Debian's chromium package (apt-get "
                'install -y chromium; .ci/run does this)')
  b = Browser(binary)
  yield b
  b.close()


def _node_counts(browser):
  return browser.js("[...document.querySelectorAll('.panel')].map("
                    "p => p.querySelectorAll('circle.node').length)")


def test_page_in_a_browser(page, compare_dir, browser, tmp_path):
  path, data = page
  _, results = compare_dir
  url = 'file://' + path
  browser.open(url)
  assert browser.errors() == []
  # Nothing but the page itself is fetched: no CDN, no server.
  assert {u.split('#')[0] for u in browser.requests()} == {url}
  assert browser.js("[...document.querySelectorAll('.panel h2')]"
                    '.map(h => h.textContent)') == ['Sparse GPT-2',
                                                    'GPT-2 (baseline)']
  assert _node_counts(browser) == [c['num_nodes'] for c in results['quotes']]
  titles = browser.js("document.querySelector('#panels').innerText")
  dense = results['quotes'][1]
  assert (f"{dense['num_edges']:,} of {dense['total_edges']:,} edges, "
          f"{NODES['dense']} of {dense['total_nodes']} nodes") in titles
  assert 'validation loss' in titles
  assert 'test task loss: full 0.100, circuit 0.300, ablated 0.690' in titles
  panels = browser.js("[...document.querySelectorAll('.panel .note')]"
                      '.map(n => n.textContent)')
  assert 'pruned for 5 steps' in panels[0]
  assert 'still shrinking' not in panels[0]
  assert 'pruned for 8 steps, its mask still shrinking' in panels[1]
  edges = browser.js("[...document.querySelectorAll('.panel')].map("
                     "p => p.querySelectorAll('line.edge').length)")
  assert edges == [len(c['edges']) for c in results['quotes']]
  assert browser.js("document.querySelectorAll('#task-table tr.task-row')"
                    '.length') == 2
  # Per model, edges, nodes, circuit loss and ablated loss, and the ratio
  # of edges, dense / sparse, as JavaScript formats them.
  sparse, dense = results['quotes']
  fixed = lambda x, digits: browser.js(f'({x!r}).toFixed({digits})')
  assert browser.js("document.querySelector('#task-table tr.task-row')"
                    ".innerText").split('\t') == [
      'quotes', f"{sparse['num_edges']:,}", f"{dense['num_edges']:,}",
      str(NODES['sparse']), str(NODES['dense']), '0.300', '0.300', '0.690',
      '0.690', fixed(dense['num_edges'] / sparse['num_edges'], 1) + 'x']
  prompts = browser.js("document.querySelector('#prompts').innerText")
  assert "x = 'name" in prompts and 'n/a' not in prompts
  # The sparse model's probabilities of the first prompt, in the columns
  # that name them.
  probs = data['tasks'][0]['examples'][0]['probs'][0]
  assert browser.js("document.querySelector('#prompts table.grid')"
                    '.rows[1].innerText').split('\t') == [
      'Sparse GPT-2', *(fixed(x, 3) for x in probs['full'] + probs['circuit']
                        + [probs['calibrated']])]

  # A click on a node shows what it is, its edges and its snippets.
  node = results['quotes'][0]['nodes'][5]
  browser.click(".panel[data-panel='0'] circle.node[data-i='5']")
  details = browser.js("document.querySelector('#details').innerText")
  assert f"layer {node['layer']} {node['location']} {node['index']}" in \
      details
  assert f"{node['score']:.3f}" in details
  assert 'Incoming edges' in details and 'Outgoing edges' in details
  assert 'strongest listed' not in details  # The file lists every edge.
  # Each of its snippets_per_node snippets marks the token it is of.
  snippets = data['panels'][0]['snippets']
  assert browser.js("[...document.querySelectorAll('#details .snippet mark')]"
                    '.map(m => m.textContent)') == [
      snippets['vocab'][snippets['tokens'][position]].replace(
          '\n', '\u21b5').replace('\t', '\u2192')
      for position, _ in snippets['top'][view.node_key(
          node['layer'], node['location'], node['index'])]]
  assert 'task=quotes&node=0:' in browser.js('location.hash')
  tooltip = browser.js("document.querySelector('#tooltip').textContent")
  assert f"layer {node['layer']} {node['location']} {node['index']}" in \
      tooltip  # The mouse is over the node: a summary follows it.

  # An edge: its weight and its two nodes.
  browser.click(".panel[data-panel='1'] line.edge[data-e='0']")
  details = browser.js("document.querySelector('#details').innerText")
  strongest = max(results['quotes'][1]['edges'], key=lambda e: abs(e['value']))
  assert f"{strongest['weight']}" in details
  assert f"layer {strongest['src'][0]} {strongest['src'][1]} " \
         f"{strongest['src'][2]}" in details

  # The task picker: the dense model did not solve 'closing' (its select
  # split's loss decided). The details of 'quotes' go: their links would
  # name nodes of 'closing'.
  browser.js("const s = document.querySelector('#task'); s.value = 1;"
             "s.dispatchEvent(new Event('change'))")
  assert _node_counts(browser) == [7, 0]
  assert browser.js("[...document.querySelectorAll('#task-table tr.current')]"
                    '.map(r => r.dataset.task)') == ['1']
  assert "task loss 0.650 (select split) is above the target 0.5" in \
      browser.js("document.querySelector('.panel[data-panel=\"1\"]')"
                 '.textContent')
  assert 'Hover over a node' in browser.js(
      "document.querySelector('#details').innerText")
  # A link pasted into this tab: only the hash changes, and the page goes
  # to its task, node and edge cap.
  browser.js(f"location.hash = 'task=quotes&cap=500&node=0:"
             f"{node['layer']}/{node['location']}/{node['index']}'")
  deadline = time.time() + 60  # Only a hang guard, as the browser's own.
  while browser.js("document.querySelector('#task').value") != '0':
    assert time.time() < deadline, 'the page did not follow the link'
    time.sleep(0.05)
  assert f"layer {node['layer']} {node['location']} {node['index']}" in \
      browser.js("document.querySelector('#details').innerText")
  assert browser.js("document.querySelector('#cap').value") == '500'
  assert 'cap=500' in browser.js('location.hash')
  browser.screenshot(str(tmp_path / 'page.png'))
  with open(tmp_path / 'page.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert os.path.getsize(tmp_path / 'page.png') > 20_000
  assert browser.errors() == []


def _big_circuit(num_listed, num_edges):
  """A dense-sized circuit (no run behind it): every node of a 4 x 128
  model and `num_listed` random edges, as if cut from `num_edges`."""
  sizes = {'attn_in': 128, 'q': 128, 'k': 128, 'v': 128, 'attn_out': 128,
           'mlp_in': 128, 'mlp_neuron': 512, 'mlp_out': 128}
  pairs = [(s, d) for _, s, d in edges_lib.EDGE_WEIGHTS]
  rng = np.random.default_rng(0)
  edges = set()
  while len(edges) < num_listed:
    layer = int(rng.integers(4))
    src, dst = pairs[rng.integers(len(pairs))]
    edges.add(((layer, src, int(rng.integers(sizes[src]))),
               (layer, dst, int(rng.integers(sizes[dst])))))
  nodes = sorted({n for e in edges for n in e})
  return {'task': 'big', 'run': '/nowhere/dense', 'step': 7,
          'val_loss': 3.5, 'solved': True, 'target_loss': 0.5,
          'num_layers': 4, 'layer_sizes': sizes, 'num_nodes': len(nodes),
          'num_edges': num_edges, 'edges_truncated': True,
          'nodes': [{'layer': l, 'location': loc, 'index': i}
                    for l, loc, i in nodes],
          'edges': [{'src': list(s), 'dst': list(d), 'value':
                     float(rng.normal())} for s, d in edges],
          'losses': {'full_model': 0.1, 'circuit_only': 0.4,
                     'circuit_ablated': 0.69}}


def test_cli_big_circuit_draws_the_strongest_edges(tmp_path, browser):
  """20,000 listed edges of 250,000: the page draws 2,000 and says how
  many are hidden; the CLI writes it without the run."""
  circuits = tmp_path / 'circuits'
  circuits.mkdir()
  circuit = _big_circuit(20_000, 250_000)
  (circuits / 'big.json').write_text(json.dumps(circuit))
  out = tmp_path / 'big.html'
  proc = subprocess.run(
      [sys.executable, '-m', 'sparse_gpt2.circuits.view',
       f'--circuits={circuits}', f'--out={out}'],
      capture_output=True, text=True, timeout=120, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '1 task(s), 1 panel(s)' in proc.stdout
  browser.open(f'file://{out}')  # A frozen tab fails the browser's 60 s.
  assert browser.errors() == []
  assert _node_counts(browser) == [circuit['num_nodes']]
  assert browser.js("document.querySelectorAll('line.edge').length") == 2000
  note = browser.js("document.querySelector('.panel .note').textContent")
  assert 'drawing the 2,000 strongest of 250,000 edges; 248,000 hidden' in \
      note and 'lists the 20,000 strongest' in note
  assert 'is not on this machine' in note
  drawn = browser.js("[...document.querySelectorAll('line.edge')].map("
                     'l => +l.getAttribute("stroke-width"))')
  assert drawn[0] == max(drawn) <= 1.5  # Strongest first, none a blot.
  # Every listed edge, when asked for (a frozen tab fails the browser's
  # 60 s, the time no assertion: no test asserts a speed).
  browser.js("const s = document.querySelector('#cap'); s.value = 'Infinity';"
             "s.dispatchEvent(new Event('change'))")
  assert browser.js("document.querySelectorAll('line.edge').length") == \
      20_000
  # A node's edges counted are of those listed, and say so: a count of 0
  # read as a node with no edges, of a circuit of 250,000.
  browser.click("circle.node[data-i='0']")
  details = browser.js("document.querySelector('#details').innerText")
  assert 'Incoming edges' in details
  for heading in ('Incoming edges (', 'Outgoing edges ('):
    assert details.split(heading)[1].split(')')[0].endswith(
        ' among the 20,000 strongest listed'), details
  assert browser.js("document.querySelector('#tooltip').textContent"
                    ).endswith(' out among the 20,000 strongest listed')
  assert browser.errors() == []


def test_page_of_circuits_from_two_runs_says_where_one_has_none(
    tmp_path, browser):
  """Circuit files of two runs, each for another task: the task table says
  `no circuit` where a run has none (not `not solved`), and a prompt that
  writes HTML (`<!--` then `<script>`) stays data: the page still runs."""
  circuits = tmp_path / 'circuits'
  circuits.mkdir()
  for task, run in (('one', '/nowhere/a'), ('two', '/nowhere/b')):
    circuit = {**_big_circuit(20, 20), 'task': task, 'run': run,
               'examples': [{'prompt': 'print("<!--" + "<script>" + "</scr'
                                       'ipt>")', 'correct': 'x',
                             'incorrect': 'y'},
                            {'prompt': 'key = "' + 'A' * 5000 + '"\nx = (',
                             'correct': 'x', 'incorrect': 'y'}]}
    (circuits / f'{task}.json').write_text(json.dumps(circuit))
  out = tmp_path / 'page.html'
  view.write_page(str(out), circuits_dir=str(circuits), load_runs=False)
  block = out.read_text().split('<script id="data" type="application/json">'
                                )[1].split('</script>')[0]
  assert '<' not in block  # JSON's escape of every `<` in a string.
  browser.open(f'file://{out}')
  assert browser.errors() == []
  rows = browser.js("[...document.querySelectorAll('#task-table tr.task-row')]"
                    ".map(r => r.innerText)")
  assert len(rows) == 2 and all('no circuit' in r for r in rows), rows
  assert not any('not solved' in r for r in rows), rows
  assert '<script>' in browser.js(
      "document.querySelector('#prompts').innerText")
  # A prompt's line of 5,000 characters wraps: the page does not scroll
  # sideways (it was 25 times the window's width).
  assert browser.js('document.documentElement.scrollWidth') <= browser.js(
      'document.documentElement.clientWidth')


def test_no_ratio_where_a_circuit_has_no_edges_and_no_edge_at_a_fraction(
    tmp_path, browser):
  """Two runs' circuits of one task, the second's solved with no edges:
  the ratio column says n/a as `compare`'s table does (not 0.0x); an
  address naming edge 1.5 selects nothing and throws nothing."""
  circuits = tmp_path / 'circuits'
  circuits.mkdir()
  for run, listed in (('/nowhere/a', 20), ('/nowhere/b', 0)):
    circuit = {**_big_circuit(listed, listed), 'task': 'one', 'run': run}
    (circuits / f'{run[-1]}.json').write_text(json.dumps(circuit))
  out = tmp_path / 'page.html'
  view.write_page(str(out), circuits_dir=str(circuits), load_runs=False)
  browser.open(f'file://{out}#task=one&edge=0:1.5')
  assert browser.errors() == []
  assert 'Hover over a node' in browser.js(
      "document.querySelector('#details').innerText")
  row = browser.js("document.querySelector('#task-table tr.task-row')"
                   '.innerText')
  assert row.split('\t')[-1] == 'n/a', row


def _layered_circuit(run, num_layers, nodes, solved=True):
  """A circuit of `num_layers` layers (no run behind it) keeping `nodes`,
  (layer, location, index) triples, and no edges."""
  return {**_big_circuit(0, 0), 'run': run, 'task': 'one',
          'num_layers': num_layers, 'solved': solved,
          'nodes': [{'layer': l, 'location': loc, 'index': i}
                    for l, loc, i in nodes],
          'num_nodes': len(nodes), 'num_edges': 0, 'edges_truncated': False,
          'losses': {'full_model': 0.1 if solved else 0.6,
                     'circuit_only': 0.4 if solved else None,
                     'circuit_ablated': 0.69 if solved else None}}


def test_a_shallower_models_panel_labels_only_its_own_layers(tmp_path,
                                                             browser):
  """Circuits of a 4-, a 2- and a 3-layer model: every panel is as tall as
  the deepest, and a shallower one labels only its own layers and says
  which it lacks, as the static figure does (its empty rows labelled
  'layer 2', 'layer 3' read as layers its circuit keeps nothing in); an
  unsolved one's note sits in its own layers, not across the gap."""
  circuits = tmp_path / 'circuits'
  circuits.mkdir()
  for run, layers, solved in (('/nowhere/a', 4, True),
                              ('/nowhere/b', 2, False),
                              ('/nowhere/c', 3, True)):
    nodes = [(l, 'q', 3) for l in range(layers)] if solved else []
    (circuits / f'{run[-1]}.json').write_text(json.dumps(
        _layered_circuit(run, layers, nodes, solved)))
  out = tmp_path / 'page.html'
  view.write_page(str(out), circuits_dir=str(circuits), load_runs=False)
  browser.open(f'file://{out}')
  assert browser.errors() == []
  panels = ".panel[data-panel='{}'] svg"
  labels = [browser.js(f"[...document.querySelectorAll(\"{panels.format(p)} "
                       ".layerlabel\")].map(t => t.textContent)")
            for p in range(3)]
  assert labels == [[f'layer {l}' for l in range(n)] for n in (4, 2, 3)]
  rows = [browser.js(f"document.querySelectorAll(\"{panels.format(p)} "
                     ".rowlabel\").length") for p in range(3)]
  assert rows == [8 * n for n in (4, 2, 3)]
  text = [browser.js(f"document.querySelector(\"{panels.format(p)}\")"
                     '.textContent') for p in range(3)]
  assert 'model: no layer' not in text[0]
  assert 'a 2-layer model: no layers 2-3' in text[1]
  assert 'a 3-layer model: no layer 3' in text[2]
  assert len({browser.js(f"document.querySelector(\"{panels.format(p)}\")"
                         ".getAttribute('viewBox')") for p in range(3)}) == 1
  # The unsolved note is above the last row of layer 1 (it was centred on
  # the panel, on the gap between the model's layers and those it lacks).
  unsolved, last_row = browser.js(
      f"[+document.querySelector(\"{panels.format(1)} .unsolved\").getAttribute"
      f"('y'), +[...document.querySelectorAll(\"{panels.format(1)} "
      ".rowlabel\")][15].getAttribute('y')]")
  assert unsolved < last_row
  assert browser.errors() == []


def test_a_nodes_residual_links_past_those_listed_are_counted(tmp_path,
                                                              browser):
  """An 8-layer circuit keeping residual channel 0 at every residual row:
  layer 0's attn_out joins 15 later reads; the 12 listed are followed by
  how many are not, as the edge tables say 'and N weaker' (nothing said
  how many were left out)."""
  nodes = [(l, loc, 0) for l in range(8)
           for loc in ('attn_in', 'attn_out', 'mlp_in', 'mlp_out')]
  (tmp_path / 'one.json').write_text(json.dumps(
      _layered_circuit('/nowhere/a', 8, nodes)))
  out = tmp_path / 'page.html'
  view.write_page(str(out), circuits_dir=str(tmp_path), load_runs=False)
  browser.open(f'file://{out}')
  browser.click("circle.node[data-i='1']")  # Layer 0's attn_out.
  details = browser.js("document.querySelector('#details').innerText")
  assert 'layer 0 attn_out 0' in details
  assert 'Residual stream (15 links)' in details
  assert browser.js("document.querySelectorAll('#details a.node-link')"
                    '.length') == 12
  # A write's links run to its later reads, not from them.
  assert details.count('\nto layer ') == 12 and 'from layer' not in details
  assert details.rstrip().split('\n')[-3:] == [
      'and 3 more', 'Top-activating validation tokens',
      'not computed: the page was made without this run'], details
  assert browser.errors() == []


def test_a_task_change_hides_the_tooltip_of_the_node_under_the_mouse(
    tmp_path, browser):
  """The mouse over a node of one task, and a link to another pasted into
  the tab (only the hash changes, the mouse does not move): the summary of
  a node no longer drawn goes (it stayed until the next hover)."""
  for task, solved in (('one', True), ('two', False)):
    (tmp_path / f'{task}.json').write_text(json.dumps(
        {**_layered_circuit('/nowhere/a', 4, [(1, 'q', 3)] if solved
                            else [], solved), 'task': task}))
  out = tmp_path / 'page.html'
  view.write_page(str(out), circuits_dir=str(tmp_path), load_runs=False)
  browser.open(f'file://{out}#task=one')
  tooltip = "document.querySelector('#tooltip')"
  browser.hover("circle.node[data-i='0']")
  assert browser.js(f'{tooltip}.style.display') == 'block'
  assert browser.js(f'{tooltip}.textContent').startswith('layer 1 q 3;')
  browser.js("location.hash = 'task=two'")
  deadline = time.time() + 60  # Only a hang guard, as the browser's own.
  while browser.js("document.querySelector('#task').value") != '1':
    assert time.time() < deadline, 'the page did not follow the link'
    time.sleep(0.05)
  time.sleep(0.2)  # Any mouse event the new panels' layout brings.
  assert browser.js("document.querySelectorAll('circle.node').length") == 0
  assert browser.js(f'{tooltip}.style.display') == 'none'
  assert browser.errors() == []


def test_an_edge_is_drawn_and_listed_between_its_own_two_nodes(tmp_path,
                                                              browser):
  """A residual read of layer 1 feeding a q and a k channel: each line ends
  on its two nodes' circles, each node sits in its own layer's row of its
  location; a node lists incoming edges by their sources and outgoing ones
  by their destinations, an edge (its details, summary and link) says which
  way it runs, a q channel is named by its head, and no edge is said hidden
  where all are drawn."""
  nodes = [(1, 'attn_in', 3), (1, 'q', 21), (1, 'k', 7)]
  circuit = {**_layered_circuit('/nowhere/a', 4, nodes), 'num_edges': 2,
             'model_shape': {'d_head': 16},
             'edges': [{'src': [1, 'attn_in', 3], 'dst': [1, loc, i],
                        'value': w}
                       for loc, i, w in (('k', 7, -0.4), ('q', 21, 0.9))]}
  (tmp_path / 'one.json').write_text(json.dumps(circuit))
  out = tmp_path / 'page.html'
  view.write_page(str(out), circuits_dir=str(tmp_path), load_runs=False)
  # Edges are listed strongest first: edge 1 is the one to the k channel.
  browser.open(f'file://{out}#task=one&edge=0:1')
  assert browser.errors() == []
  details = "document.querySelector('#details').innerText"
  assert browser.js(details).endswith(
      'matrix\tblock_1/key/kernel\nfrom\tlayer 1 attn_in 3\n'
      'to\tlayer 1 k 7 (head 0, channel 7)'), browser.js(details)
  circles = browser.js("[...document.querySelectorAll('circle.node')].map("
                       "c => ['cx', 'cy'].map(a => +c.getAttribute(a)))")
  assert browser.js("[...document.querySelectorAll('line.edge')].map(l => "
                    "['x1', 'y1', 'x2', 'y2'].map(a => +l.getAttribute(a)))"
                    ) == [circles[0] + circles[1], circles[0] + circles[2]]
  rows = browser.js("[...document.querySelectorAll('.rowlabel')].map("
                    "t => [t.textContent, +t.getAttribute('y') - 3])")
  assert [[loc, y] for (_, loc, _), (_, y) in zip(nodes, circles)] == [
      rows[8 + view.LOCATIONS.index(loc)] for _, loc, _ in nodes]
  assert 'hidden' not in browser.js(
      "document.querySelector('.panel .note').textContent")
  browser.hover("line.edge[data-e='1']")
  assert browser.js("document.querySelector('#tooltip').textContent") == (
      'weight -0.400: layer 1 attn_in 3 \u2192 layer 1 k 7 (head 0, '
      'channel 7)')
  browser.click("circle.node[data-i='1']")
  assert browser.js(details).split('\nIncoming edges')[1].split(
      '\nTop-activating')[0] == (
          ' (1)\n+0.900\tlayer 1 attn_in 3\nOutgoing edges (0)')
  assert 'layer 1 q 21 (head 1, channel 5)' in browser.js(details)
  browser.click("circle.node[data-i='0']")
  assert browser.js(details).split('\nOutgoing edges')[1].split(
      '\nResidual stream')[0] == (
          ' (2)\n+0.900\tlayer 1 q 21 (head 1, channel 5)\n'
          '-0.400\tlayer 1 k 7 (head 0, channel 7)')
  assert browser.errors() == []


def test_a_task_named_in_bytes_that_are_not_utf8_is_linked(tmp_path,
                                                           browser):
  """A task file named in bytes that are not UTF-8 (Python's surrogates):
  the page's link to the task (encodeURIComponent) threw as the page
  opened, and at every click after, and a pasted link went nowhere. Its
  name is shown as the figure shows it."""
  (tmp_path / 'one.json').write_text(json.dumps(
      {**_big_circuit(2, 2), 'task': 'caf\udcc3\udca9'}))
  out = tmp_path / 'page.html'
  view.write_page(str(out), circuits_dir=str(tmp_path), load_runs=False)
  browser.open(f'file://{out}')
  assert browser.errors() == []
  assert browser.js("document.querySelector('#task option').textContent"
                    ) == 'caf\u00e9'
  assert browser.js('location.hash') == '#task=caf%C3%A9'


def test_one_run_written_two_ways_is_one_panel_and_twin_circuits_refused(
    tmp_path):
  circuits = tmp_path / 'circuits[1]'  # A name that globs otherwise.
  (circuits / 'two').mkdir(parents=True)
  for path, task, run in (('one.json', 'one', '/nowhere/a'),
                          ('two/circuit.json', 'two', '/nowhere/a/')):
    (circuits / path).write_text(json.dumps(
        {**_big_circuit(20, 20), 'task': task, 'run': run}))
  data = view.write_page(str(tmp_path / 'page.html'),
                         circuits_dir=str(circuits), load_runs=False)
  assert [p['run'] for p in data['panels']] == ['/nowhere/a']
  assert data['panels'][0]['notes'] == [
      'runs not loaded (--load_runs=false): no snippets or prompt '
      'probabilities']
  assert [[c is not None for c in t['circuits']] for t in data['tasks']] == [
      [True], [True]]
  # A second circuit of one task at one checkpoint: which one is meant?
  (circuits / 'again.json').write_text(json.dumps(
      {**_big_circuit(20, 20), 'task': 'one', 'run': '/nowhere/b/../a'}))
  with pytest.raises(ValueError) as refused:
    view.write_page(str(tmp_path / 'page.html'), circuits_dir=str(circuits),
                    load_runs=False)
  assert str(refused.value) == (
      f'{circuits / "again.json"} and {circuits / "one.json"} are both '
      'circuits of one at /nowhere/a step 7: give --circuits a directory '
      'that holds one of them')


def test_runs_of_one_folder_name_are_told_apart(tmp_path):
  """Circuits of two runs whose folders share a name (runs/a/sparse and
  runs/b/sparse, one step): their panels, table columns and prompt rows
  are labelled by path, not both 'sparse step 7'; a run of a name of its
  own keeps the short label."""
  for name, run in (('one', '/nowhere/a/sparse'),
                    ('two', '/nowhere/b/sparse'),
                    ('three', '/nowhere/c/dense')):
    (tmp_path / f'{name}.json').write_text(json.dumps(
        {**_big_circuit(2, 2), 'task': name, 'run': run}))
  data = view.write_page(str(tmp_path / 'page.html'),
                         circuits_dir=str(tmp_path), load_runs=False)
  assert sorted(p['label'] for p in data['panels']) == [
      '/nowhere/a/sparse step 7', '/nowhere/b/sparse step 7', 'dense step 7']


def test_a_step_no_longer_kept_is_a_note_not_a_failure(twins, tmp_path):
  kept = random_circuit(twins['sparse'], 'quotes', 5, 0)
  (tmp_path / 'kept.json').write_text(json.dumps(kept))
  (tmp_path / 'gone.json').write_text(json.dumps(dict(kept, step=5)))
  data = view.write_page(str(tmp_path / 'page.html'),
                         circuits_dir=str(tmp_path), snippets_per_node=1)
  gone, kept = sorted(data['panels'], key=lambda p: p['step'])
  assert gone['snippets'] is None and gone['notes'] == [
      f'{twins["sparse"]} has no checkpoint at step 5; it has [10]: no '
      'snippets or prompt probabilities']
  assert kept['snippets'] and kept['notes'] == []


def test_a_circuit_of_other_weights_is_a_note_not_their_data(twins,
                                                             tmp_path):
  """Runs trained again since their circuits were found (same step, other
  weights, here one more MLP neuron than the model has) and a circuit that
  records no digest: notes, and no data of the weights there now; the
  sparse panel's one verified circuit keeps its probabilities."""
  sparse, dense = twins['sparse'], twins['dense']
  stale = random_circuit(sparse, 'quotes', 5, 0)
  stale['checkpoint_sha256'] = '0' * 64
  stale['nodes'].append({'layer': 0, 'location': 'mlp_neuron',
                         'index': stale['layer_sizes']['mlp_neuron']})
  stale['layer_sizes']['mlp_neuron'] += 1  # The model it was found in.
  (tmp_path / 'quotes.json').write_text(json.dumps(stale))
  (tmp_path / 'closing.json').write_text(json.dumps(
      random_circuit(sparse, 'closing', 5, 1)))
  old = random_circuit(sparse, 'indent', 5, 2)
  del old['checkpoint_sha256']
  (tmp_path / 'indent.json').write_text(json.dumps(old))
  (tmp_path / 'dense.json').write_text(json.dumps(dict(
      random_circuit(dense, 'quotes', 5, 3), checkpoint_sha256='0' * 64)))
  data = view.write_page(str(tmp_path / 'page.html'),
                         circuits_dir=str(tmp_path), snippets_per_node=1)
  panels = {p['run']: p for p in data['panels']}
  assert panels[sparse]['snippets'] is None and panels[sparse]['notes'] == [
      f'run {sparse} step 10 holds other weights than the circuit of quotes '
      'was found in',
      'the circuit of indent records no checkpoint digest, so whether run '
      f'{sparse} step 10 holds its weights is unknown: no snippets, and no '
      'prompt probabilities for indent, quotes']
  assert panels[dense]['snippets'] is None and panels[dense]['notes'] == [
      f'run {dense} step 10 holds other weights than the circuit was found '
      'in: no snippets or prompt probabilities']
  probs = {t['name']: [e['probs'] for e in t['examples']]
           for t in data['tasks']}
  sparse_panel = data['panels'].index(panels[sparse])
  assert all(p[sparse_panel]['full'] for p in probs['closing'])
  assert all(p == [None, None] for p in probs['quotes'])
  assert all(p[sparse_panel] is None for p in probs['indent'])


def test_a_bad_out_is_refused_before_any_work(tmp_path):
  (tmp_path / 'file').write_text('')
  # The empty directory would be refused too, but only once read.
  with pytest.raises(ValueError, match=r'^--out .*file/page.html: cannot '
                     r'make its folder \(File exists\)$'):
    view.write_page(str(tmp_path / 'file' / 'page.html'),
                    circuits_dir=str(tmp_path))


def test_an_out_that_names_no_file_is_refused_before_any_work(
    tmp_path, monkeypatch):
  """`--out=pages/` or `--out=`: refused before the circuits are read (the
  directory has none, which would be the error otherwise), nothing made."""
  monkeypatch.chdir(tmp_path)
  for out in ('pages/', ''):
    with pytest.raises(ValueError, match=f'^--out {out!r} names no file: '
                       "give an HTML file's path$"):
      view.write_page(out, circuits_dir=str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_an_out_of_a_bare_file_name_is_written_where_it_is_called(
    tmp_path, monkeypatch):
  """`--out=page.html` names no folder: the page is written in the current
  one, whose check for a file it takes is not of the folder ''."""
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'one.json').write_text(json.dumps(_big_circuit(2, 2)))
  view.write_page('page.html', circuits_dir=str(tmp_path), load_runs=False)
  assert sorted(os.listdir(tmp_path)) == ['one.json', 'page.html']


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
  circuits = tmp_path / 'circuits'
  circuits.mkdir()
  (circuits / 'one.json').write_text(json.dumps(_big_circuit(20, 20)))

  def refuse(src, dst):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, 'replace', refuse)
  # A full disk is one line that names --out, not a traceback (an OSError
  # of no kind `cli.run` says in one line).
  with pytest.raises(ValueError, match=r'^--out .*page.html: cannot write it '
                     r'\(No space left on device\)$'):
    view.write_page(str(tmp_path / 'page.html'), circuits_dir=str(circuits),
                    load_runs=False)
  assert sorted(os.listdir(tmp_path)) == ['circuits']


def test_a_json_out_is_refused_before_it_overwrites_an_input(tmp_path,
                                                             monkeypatch):
  """`--out` onto comparison.json or a circuit file would replace the
  page's own input with HTML, and a page.json beside the circuit files
  would be read as one next time: refused before any work."""
  monkeypatch.setattr(view, 'page_data', None)  # Any work fails otherwise.
  circuits = tmp_path / 'circuits'
  circuits.mkdir()
  written = json.dumps(_big_circuit(2, 2))
  (circuits / 'one.json').write_text(written)
  for out in (circuits / 'one.json', circuits / 'page.JSON'):
    with pytest.raises(ValueError, match=r"^--out .* is a .json name: give "
                       r"an HTML file's path"):
      view.write_page(str(out), circuits_dir=str(circuits))
  assert os.listdir(circuits) == ['one.json']
  assert (circuits / 'one.json').read_text() == written


def test_an_out_folder_that_takes_no_file_is_refused_before_any_work(
    monkeypatch, tmp_path):
  """A folder no file can be made in (read-only, another user's; /proc
  refuses even root) is found before the runs are loaded, not after, and
  named as --out's."""
  if not os.path.isdir('/proc'):
    pytest.skip('no /proc, a folder that takes no file even from root')
  monkeypatch.setattr(view, 'page_data', None)  # Any work fails otherwise.
  (tmp_path / 'one.json').write_text(json.dumps(_big_circuit(2, 2)))
  with pytest.raises(ValueError, match=r'^--out /proc/page.html: cannot '
                     r'write in /proc \('):
    view.write_page('/proc/page.html', circuits_dir=str(tmp_path))


def test_a_circuit_without_its_model_shape_is_refused(tmp_path):
  """A circuit file written by hand (or by another tool) without what the
  page draws it by: refused naming the field, not a blank page (no
  layer_sizes), every layer but the first cut off (no num_layers), or its
  nodes hidden behind 'not solved' (no solved)."""
  for field in ('solved', 'num_layers', 'layer_sizes'):
    circuit = _big_circuit(2, 2)
    del circuit[field]
    (tmp_path / 'one.json').write_text(json.dumps(circuit))
    with pytest.raises(ValueError) as refused:
      view.write_page(str(tmp_path / 'page.html'),
                      circuits_dir=str(tmp_path), load_runs=False)
    assert str(refused.value) == (f'{tmp_path / "one.json"} is not a whole '
                                  f"circuit file (no ['{field}'])")


def test_a_file_that_is_not_utf8_is_named(tmp_path):
  """A damaged or foreign-encoded .json among the circuit files, or a
  compare summary: the error names it (a bare decode error named no
  file)."""
  (tmp_path / 'one.json').write_text(json.dumps(_big_circuit(2, 2)))
  (tmp_path / 'two.json').write_bytes(b'{"task": "caf\xe9"}')
  with pytest.raises(ValueError) as refused:
    view.write_page(str(tmp_path / 'page.html'), circuits_dir=str(tmp_path),
                    load_runs=False)
  assert str(refused.value) == (f'{tmp_path / "two.json"} is not UTF-8 text '
                                '(byte 13 is 0xe9)')
  (tmp_path / 'comparison.json').write_bytes(b'{"tasks": "caf\xe9"}')
  with pytest.raises(ValueError) as refused:
    view.write_page(str(tmp_path / 'page.html'), compare_dir=str(tmp_path),
                    load_runs=False)
  assert str(refused.value) == (f'{tmp_path / "comparison.json"} is not UTF-8 '
                                'text (byte 14 is 0xe9)')


def test_other_json_is_refused_in_one_line_before_any_work(tmp_path,
                                                           monkeypatch):
  """Valid JSON that is not a compare summary, or a circuit file whose run
  or step is not one: an error naming the file and what is amiss, before
  any page data is made."""
  monkeypatch.setattr(view, 'page_data', None)  # Any work fails otherwise.
  out = str(tmp_path / 'page.html')
  summary = tmp_path / 'comparison.json'
  checkpoint = {'run': '/nowhere', 'step': 10, 'val_loss': 3.0}
  for written, missing in (
      ({}, 'no checkpoints.sparse'), ([], 'not a JSON object'),
      ({'checkpoints': {'sparse': checkpoint, 'dense': checkpoint}},
       'no list of tasks'),
      ({'checkpoints': {'sparse': checkpoint}, 'tasks': []},
       'no checkpoints.dense'),
      ({'checkpoints': {'sparse': checkpoint, 'dense': dict(checkpoint,
                                                            run=None)},
        'tasks': []}, 'checkpoints.dense.run None is not a string'),
      ({'checkpoints': {'sparse': dict(checkpoint, step='10'),
                        'dense': checkpoint}, 'tasks': []},
       "checkpoints.sparse.step '10' is not an integer"),
      ({'checkpoints': {'sparse': checkpoint, 'dense': checkpoint},
        'tasks': ['quotes']}, "a task row with no task name: 'quotes'")):
    summary.write_text(json.dumps(written))
    with pytest.raises(ValueError) as refused:
      view.write_page(out, compare_dir=str(tmp_path))
    assert str(refused.value) == (f'{summary} is not a compare summary '
                                  f'({missing})')
  circuits = tmp_path / 'circuits'
  circuits.mkdir()
  for damage, wrong in (({'run': None}, 'run None is not a string'),
                        ({'step': None}, 'step None is not an integer'),
                        ({'step': True}, 'step True is not an integer'),
                        ({'task': ['a']}, "task ['a'] is not a string")):
    (circuits / 'a.json').write_text(json.dumps({**_big_circuit(2, 2),
                                                 **damage}))
    with pytest.raises(ValueError) as refused:
      view.write_page(out, circuits_dir=str(circuits))
    assert str(refused.value) == (f'{circuits / "a.json"} is not a circuit '
                                  f'file the page can read ({wrong})')
  assert not os.path.exists(out)


def test_cli_not_a_compare_summary_is_one_line_exit_1(tmp_path):
  (tmp_path / 'comparison.json').write_text('{}')
  proc = subprocess.run(
      [sys.executable, '-m', 'sparse_gpt2.circuits.view',
       f'--compare={tmp_path}', f'--out={tmp_path / "page.html"}'],
      capture_output=True, text=True, timeout=120, cwd=REPO)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f'error: {tmp_path / "comparison.json"} is not a compare summary (no '
      'checkpoints.sparse)'], proc.stderr


def test_cli_bad_input_is_one_line_exit_1(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'sparse_gpt2.circuits.view',
       '--compare=/no/such/dir', f'--out={tmp_path / "page.html"}'],
      capture_output=True, text=True, timeout=120, cwd=REPO)
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
  assert '/no/such/dir is not a directory' in lines[0]
  assert not os.path.exists(tmp_path / 'page.html')


def test_a_run_or_compare_directory_as_circuits_says_where_they_are(
    tmp_path):
  """--circuits given a run's directory (its circuits are in
  RUN/circuits/TASK/circuit.json) or compare's: the refusal says where to
  look, not only that there are none."""
  run = tmp_path / 'run'
  (run / 'circuits' / 'one').mkdir(parents=True)
  (run / 'config.json').write_text('{}')
  (run / 'circuits' / 'one' / 'circuit.json').write_text(json.dumps(
      _big_circuit(2, 2)))
  out = str(tmp_path / 'page.html')
  with pytest.raises(ValueError) as refused:
    view.write_page(out, circuits_dir=str(run), load_runs=False)
  assert str(refused.value) == (
      f'no circuit files in {run} (looked for circuit.json, *.json and '
      f"*/circuit.json): a run's circuits are in {run / 'circuits'}")
  view.write_page(out, circuits_dir=str(run / 'circuits'), load_runs=False)
  (run / 'comparison.json').write_text('{}')
  with pytest.raises(ValueError, match=r'\): give --compare=.*/run for a '
                     'compare output$'):
    view.write_page(out, circuits_dir=str(run), load_runs=False)


def test_bad_directories_are_refused_before_any_work(tmp_path):
  out = str(tmp_path / 'page.html')
  with pytest.raises(ValueError, match='no circuit files'):
    view.write_page(out, circuits_dir=str(tmp_path))
  with pytest.raises(ValueError, match='no comparison.json'):
    view.write_page(out, compare_dir=str(tmp_path))
  with pytest.raises(ValueError, match='exactly one'):
    view.write_page(out, compare_dir=str(tmp_path),
                    circuits_dir=str(tmp_path))
  (tmp_path / 'comparison.json').write_text(json.dumps(
      {'checkpoints': {m: {'run': m, 'step': 1, 'val_loss': 3.0}
                       for m in ('sparse', 'dense')},
       'tasks': [{'task': 'gone'}]}))
  with pytest.raises(ValueError, match='gone.json is missing'):
    view.write_page(out, compare_dir=str(tmp_path))
  (tmp_path / 'page_dir').mkdir()
  with pytest.raises(ValueError, match='page_dir is a directory, not an'):
    view.write_page(str(tmp_path / 'page_dir'), circuits_dir=str(tmp_path))
  assert os.listdir(tmp_path / 'page_dir') == []
  # Damaged files are named: half a circuit, and JSON that does not parse.
  circuits = tmp_path / 'circuits'
  circuits.mkdir()
  (circuits / 'a.json').write_text(json.dumps({'task': 'a', 'nodes': []}))
  with pytest.raises(ValueError, match=r"a.json is not a whole circuit file "
                     r"\(no \['run', 'step', 'edges', 'losses', 'solved', "
                     r"'num_layers', 'layer_sizes'\]\)"):
    view.write_page(out, circuits_dir=str(circuits))
  (circuits / 'a.json').write_text('{"task": "a",')
  with pytest.raises(ValueError, match=r'a.json is not valid JSON'):
    view.write_page(out, circuits_dir=str(circuits))
  # Whole, but not as prune writes it: an edge to a node it does not list,
  # a location of no model, a loss that diverged.
  whole = {**_big_circuit(2, 2), 'task': 'a'}
  for damage, message in (
      ({'edges': [{**whole['edges'][0], 'dst': [9, 'q', 0]}]},
       r"a.json is not a circuit file the page can read \(KeyError: \(9, "
       r"'q', 0\)\)$"),
      ({'nodes': [{**whole['nodes'][0], 'location': 'nowhere'}],
        'edges': []},
       r"a.json is not a circuit file the page can read \(ValueError: node "
       r"location 'nowhere' is none of \['attn_in', "),
      ({'losses': {'full_model': float('nan')}},
       r"a.json: Out of range float values are not JSON compliant.*leave it "
       r'out$')):
    (circuits / 'a.json').write_text(json.dumps({**whole, **damage}))
    with pytest.raises(ValueError, match=message):
      view.write_page(out, circuits_dir=str(circuits))
  assert not os.path.exists(out)


def test_a_circuit_the_page_cannot_draw_is_refused_naming_why(tmp_path):
  """A hand-edited circuit file with a node outside its own model shape,
  a shape that is none, a loss that is no number, or example prompts not
  as prune writes them: refused in one line naming the file, where the
  page was written and drew the node off its panel (with its run loaded, a
  traceback indexing the weights by it), every node at NaN (console
  errors), or stopped its script at a loss or the prompts."""
  out = str(tmp_path / 'page.html')
  circuits = tmp_path / 'circuits'
  circuits.mkdir()
  sizes = _big_circuit(2, 2)['layer_sizes']
  examples = 'not a list of {prompt, correct, incorrect} strings'
  for damage, wrong in (
      ({'nodes': [{'layer': 4, 'location': 'q', 'index': 0}]},
       'node 4/q/0 is outside its 4 layers of 128 q'),
      ({'nodes': [{'layer': 0, 'location': 'mlp_neuron', 'index': 512}]},
       'node 0/mlp_neuron/512 is outside its 4 layers of 512 mlp_neuron'),
      ({'nodes': [{'layer': 1, 'location': 'k', 'index': -1}]},
       'node 1/k/-1 is outside its 4 layers of 128 k'),
      ({'num_layers': 0}, 'num_layers 0 is not a positive integer'),
      ({'num_layers': '4'}, "num_layers '4' is not a positive integer"),
      ({'layer_sizes': {k: v for k, v in sizes.items() if k != 'q'}},
       'layer_sizes {'),
      ({'examples': 'x = 1'}, 'examples is ' + examples),
      ({'examples': ['x = 1']}, 'examples is ' + examples),
      ({'examples': [{'correct': 'a', 'incorrect': 'b'}]},
       'examples is ' + examples),
      ({'val_loss': '3.5'}, "val_loss '3.5' is not a number"),
      ({'losses': {'full_model': 0.1, 'circuit_only': [0.4]}},
       'losses.circuit_only [0.4] is not a number')):
    (circuits / 'a.json').write_text(json.dumps(
        {**_big_circuit(2, 2), 'edges': [], **damage}))
    with pytest.raises(ValueError) as refused:
      view.write_page(out, circuits_dir=str(circuits), load_runs=False)
    assert str(refused.value).startswith(
        f'{circuits / "a.json"} is not a circuit file the page can read '
        f'({wrong}'), str(refused.value)
    assert not os.path.exists(out)


def test_a_circuit_mask_keeps_exactly_its_nodes():
  """The mask the page's circuit-only probabilities are computed under:
  1 at each of the circuit's nodes, 0 elsewhere."""
  means = {f'block_{l}': {'q': np.full(4, 0.5), 'mlp_out': np.full(3, 0.5)}
           for l in range(2)}
  mask = view._circuit_mask(
      {'nodes': [{'layer': 1, 'location': 'q', 'index': 2},
                 {'layer': 0, 'location': 'mlp_out', 'index': 0}]}, means)
  assert jax.tree.map(np.ndarray.tolist, mask) == {
      'block_0': {'q': [0, 0, 0, 0], 'mlp_out': [1, 0, 0]},
      'block_1': {'q': [0, 0, 1, 0], 'mlp_out': [0, 0, 0]}}


def test_calibrated_probability_is_the_calibrated_loss():
  """-log of the page's calibrated probability, averaged, is the calibrated
  loss prune reports for the same scale and shift."""
  from sparse_gpt2.circuits import prune  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 2, (64, 10)).astype(np.float32)
  correct = rng.integers(0, 5, 64)
  incorrect = correct + rng.integers(1, 5, 64)
  swap = rng.random(64) < 0.5
  correct, incorrect = (np.where(swap, incorrect, correct),
                        np.where(swap, correct, incorrect))
  loss, _, scale, shift = prune.calibrated_loss(jax.numpy.asarray(logits),
                                                correct, incorrect)
  p = view.calibrated_probability(logits, correct, incorrect, float(scale),
                                  float(shift))
  np.testing.assert_allclose(np.mean(-np.log(p)), float(loss), rtol=1e-4)


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_node_activations_of_a_remat_model(remat):
  """A run trained with remat: its nodes are read as without it (the
  explorer stopped with an UnexpectedTracerError)."""
  shape = dict(vocab_size=50, num_layers=2, d_model=16, num_heads=2,
               max_len=12)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 50)
  plain = model_lib.GPT2(**shape)
  params = nn.unbox(plain.init(jax.random.key(0), tokens)['params'])
  want = view._node_activations(plain)(params, tokens)
  got = view._node_activations(model_lib.GPT2(**shape, remat=remat))(
      params, tokens)
  jax.tree.map(np.testing.assert_array_equal, got, want)
