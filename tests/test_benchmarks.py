"""The speed suite's quick mode end to end, and its two peers."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import peers  # pylint: disable=g-import-not-at-top

TINY = peers.Shape(vocab_size=64, d_model=32, num_layers=1, num_heads=2,
                   seq_len=16, batch_size=4)
DAMAGES = ("['delete', 'empty', 'flip_byte', 'garbage', 'half', "
           "'zeros_middle', 'zeros_start']")


@pytest.mark.parametrize('script, args, code, message', [
    # Found before anything is measured, not after a 10-30 minute run.
    ('run.py', ['--quick', '--out=README.md'], 1,
     '--out README.md exists and is not a directory'),
    ('whole_runs.py', ['--out=README.md'], 1,
     '--out README.md exists and is not a directory'),
    ('checkpoint_damage.py', ['--out=README.md'], 1,
     '--out README.md exists and is not a directory'),
    ('run.py', ['--quick', '--out='], 1,
     '--out is empty: give a folder for the results'),
    ('run.py', ['--quick', '--num_cpu_devices=3'], 1,
     '--num_cpu_devices=3 must divide the batch of 4'),
    # An `error:` line as every refusal, not a bare `sys.exit` message.
    ('whole_runs.py', ['--baseline=deadbeef'], 1,
     'commit deadbeef not found (fatal: not a valid object name: deadbeef)'),
    ('checkpoint_damage.py', ['--ways=bogus'], 1,
     f"unknown --ways ['bogus']; known: {DAMAGES}"),
    # Missing at the checkout, or at the baseline (the paper's config came
    # after c25ae90): refused before the first config's run, which the
    # rejected override here would end in a traceback.
    ('whole_runs.py', ['--configs=tiny,no_such_config', '--baseline=HEAD',
                       '--set=config.no_such_field=1'], 1,
     '--configs: configs/no_such_config.py not at the checkout'),
    ('whole_runs.py', ['--configs=sparse_gpt2_paper', '--baseline=c25ae90',
                       '--set=config.no_such_field=1'], 1,
     '--configs: configs/sparse_gpt2_paper.py not at commit c25ae90'),
    # Not the whole suite run for a flag without its dashes.
    ('run.py', ['quick'], 2, "unexpected arguments: ['quick']"),
    # run.py's flags, which the scripts that import it parse too: not the
    # full step profiled, nor a table left unwritten, in silence.
    ('step_profile.py', ['--step=torch', '--steps=1', '--quick'], 1,
     "--quick is run.py's flag; step_profile.py does not read it"),
    ('matmuls.py', ['--quick', '--out=README.md'], 1,
     "--out is run.py's flag; matmuls.py does not read it"),
    # As run.py refuses it: not jax's sharding error, which names neither
    # the flag nor the batch.
    ('matmuls.py', ['--quick', '--num_cpu_devices=3'], 1,
     '--num_cpu_devices=3 must divide the batch of 4'),
    ('step_profile.py', ['--step=gpt2', '--num_cpu_devices=3'], 1,
     '--num_cpu_devices=3 must divide the batch of 16'),
    # Git took it as its own option: a traceback of tar.
    ('whole_runs.py', ['--baseline=--list'], 1,
     "--baseline='--list' is not a commit"),
    # Below a file: os.makedirs's "[Errno 20] Not a directory: ...", which
    # named no flag.
    ('whole_runs.py', ['--out=README.md/sub'], 1,
     f"--out README.md/sub: {os.path.join(ROOT, 'README.md')} is a file, "
     'not a directory'),
    # Not one config trained twice for one result (the override would end
    # that run), nor "configs/.py, configs/.py not at the checkout".
    ('whole_runs.py', ['--configs=tiny,dense_small,tiny', '--baseline=HEAD',
                       '--set=config.no_such_field=1'], 1,
     '--configs names tiny more than once'),
    ('whole_runs.py', ['--configs=,', '--baseline=HEAD'], 1,
     '--configs has an empty name'),
    # The torch peer runs as its user runs it: the flag was ignored.
    ('step_profile.py', ['--step=torch', '--steps=1', '--num_cpu_devices=3'],
     1, '--num_cpu_devices splits the JAX steps; --step=torch does not read '
     'it'),
])
def test_bad_input_is_one_line_before_any_measure(script, args, code,
                                                  message):
  # Under PYTHONSAFEPATH, which keeps a script's folder off the path: each
  # puts it there itself to import its siblings (two were a traceback).
  result = subprocess.run(
      [sys.executable, os.path.join('benchmarks', script), *args], cwd=ROOT,
      capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONSAFEPATH='1'))
  assert result.returncode == code, result.stderr
  assert result.stderr.strip() == f'error: {message}', result.stderr


@pytest.mark.parametrize('script, read', [
    ('matmuls.py', ['--[no]quick', '--num_cpu_devices']),
    ('step_profile.py', ['--num_cpu_devices', '--step', '--steps']),
])
def test_help_lists_the_flags_a_script_reads(script, read):
  # run.py's flags that it reads too (matmuls.py's --help listed no flag),
  # not those it refuses (--out, --baseline).
  result = subprocess.run(
      [sys.executable, os.path.join('benchmarks', script), '--help'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  listed = [line.split(':')[0].strip() for line in result.stdout.splitlines()
            if line.startswith('  --')]
  assert sorted(listed) == sorted(read), result.stdout


def test_prepare_out_refuses_a_folder_it_cannot_write(tmp_path):
  # A folder that exists, but not for this user's files: found before the
  # run, not at its final write.
  import provenance  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'read_only'
  out.mkdir()
  out.chmod(0o555)
  if os.access(out, os.W_OK):  # root writes there anyway; not in /proc.
    out = '/proc'
  with pytest.raises(ValueError, match=f'^--out {out}: cannot write in '):
    provenance.prepare_out(str(out), 'run')


def test_results_a_full_disk_stops_leave_the_earlier_ones_whole(tmp_path,
                                                                full_disk):
  import provenance  # pylint: disable=g-import-not-at-top
  provenance.write(str(tmp_path), 'run', {'step_s': 1.0}, '| earlier |\n')
  with full_disk(), pytest.raises(OSError):
    provenance.write(str(tmp_path), 'run', {'rows': ['x' * 10_000]},
                     'y' * 10_000)
  assert json.loads((tmp_path / 'run.json').read_text()) == {'step_s': 1.0}
  assert (tmp_path / 'run.md').read_text() == '| earlier |\n'
  assert sorted(os.listdir(tmp_path)) == ['run.json', 'run.md']


@pytest.mark.parametrize('script, folder, args', [
    # Each with a refusal of its own that the old check let it reach first.
    ('run.py', 'run.json', ['--quick', '--num_cpu_devices=3']),
    ('whole_runs.py', 'whole_runs.md', ['--baseline=deadbeef']),
    ('checkpoint_damage.py', 'checkpoint_damage.md', ['--ways=bogus']),
])
def test_a_result_file_that_is_a_folder_is_refused_before_any_measure(
    script, folder, args, tmp_path):
  # The whole run measured, then its results lost at the final write.
  (tmp_path / folder).mkdir()
  result = subprocess.run(
      [sys.executable, os.path.join('benchmarks', script), f'--out={tmp_path}',
       *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stderr
  assert result.stderr.strip() == (
      f'error: --out {tmp_path}: {tmp_path / folder} is a directory, not a '
      'file'), result.stderr


def test_prepare_out_leaves_earlier_results_as_they_are(tmp_path):
  # Checked writable, not emptied: a run refused later keeps them.
  import provenance  # pylint: disable=g-import-not-at-top
  (tmp_path / 'run.json').write_text('{"earlier": 1}')
  provenance.prepare_out(str(tmp_path), 'run')
  assert (tmp_path / 'run.json').read_text() == '{"earlier": 1}'
  assert sorted(os.listdir(tmp_path)) == ['run.json']


@pytest.mark.parametrize('args', [[], ['--check'], ['code', 'a.py', 'b.py']])
def test_twin_worker_without_its_arguments_is_a_usage_line(args):
  # No arguments was an IndexError's traceback, a third a TypeError's.
  result = subprocess.run(
      [sys.executable, 'benchmarks/twin_worker.py', *args], cwd=ROOT,
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stderr
  assert result.stderr.strip() == (
      'usage: twin_worker.py CODE_DIR CONFIG_FILE | --check CODE_DIR '
      'CONFIG_FILE...'), result.stderr


def _interpreter(code, *args, **run_args):
  """`code` run in a fresh interpreter from the project's folder, the
  benchmarks' on its path, with `args` as its sys.argv[1:] (`run_args`: of
  `subprocess.run`): the benchmarks' flags (--out, --baseline, ...) clash
  with each other's, and with those of modules other tests import."""
  return subprocess.run(
      [sys.executable, '-c',
       f'import sys; sys.path.insert(0, {os.path.join(ROOT, "benchmarks")!r})'
       f'\n{code}', *args],
      **{'cwd': ROOT, 'capture_output': True, 'text': True, 'timeout': 300,
         **run_args})


def _python(code, *args, **run_args):
  """stdout of `_interpreter`, which must exit 0."""
  result = _interpreter(code, *args, **run_args)
  if result.returncode:
    pytest.fail(f'exit {result.returncode}:\n{result.stderr}', pytrace=False)
  return result.stdout


# `main` of a benchmark with its measuring replaced: a check that comes
# after the first section (or the first run) is a failed test, in seconds.
_STUBBED_RUN = """
import os, shutil
import provenance, run
from sparse_gpt2 import cli
def measured(*args):
  sys.exit('measured before the baseline was checked')
run.peers_section = run.modes_section = run.sizes_section = measured
def unpack_without_train(baseline, dest):  # An old tree: no train.py yet.
  for part in ('sparse_gpt2', 'configs'):
    shutil.copytree(part, os.path.join(dest, part))
  os.remove(os.path.join(dest, 'sparse_gpt2', 'train.py'))
if sys.argv[1] == '--baseline=too_old':
  provenance.unpack = unpack_without_train
sys.argv = ['run.py', '--quick', *sys.argv[1:]]
cli.run(run.main)
"""


@pytest.mark.parametrize('baseline, message', [
    ('no_such_commit', 'commit no_such_commit not found (fatal: not a valid '
     'object name: no_such_commit); --baseline= skips the twins'),
    # Git's option, not a commit ("not a valid object name: sparse_gpt2").
    ('-v', "--baseline='-v' is not a commit; --baseline= skips the twins"),
    ('too_old', "--baseline=too_old cannot run the twins (--baseline= skips "
     "them): ImportError: cannot import name 'train' from 'sparse_gpt2'"),
])
def test_run_checks_the_baseline_before_any_section(baseline, message,
                                                    tmp_path):
  # Not a note in run.md, nor a worker's traceback after every other
  # section was measured (and lost).
  result = _interpreter(_STUBBED_RUN, f'--baseline={baseline}',
                        f'--out={tmp_path}', timeout=120)
  assert result.returncode == 1, result.stderr
  assert result.stderr.startswith(f'error: {message}'), result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def _marked_checkout(tmp_path):
  """(a git repo holding this project's code, configs and benchmarks, the
  file its code appends to): its commit's `sparse_gpt2` appends 'old PATH'
  to that file when imported, its work tree's 'new PATH', so that each
  process of a benchmark run from it tells which code it imported."""
  repo, which = tmp_path / 'checkout', tmp_path / 'which_code'
  for part in ('sparse_gpt2', 'configs', 'benchmarks'):
    shutil.copytree(os.path.join(ROOT, part), repo / part,
                    ignore=shutil.ignore_patterns('__pycache__', 'out'))
  init = repo / 'sparse_gpt2' / '__init__.py'
  mark = ("import os\nwith open(os.environ['WHICH_CODE'], 'a') as f:\n"
          "  f.write('{} ' + __file__ + '\\n')\n")
  init.write_text(mark.format('old'))
  git = lambda *args: subprocess.run(
      ['git', '-C', str(repo), '-c', 'user.name=t', '-c', 'user.email=t@t',
       *args], check=True, capture_output=True)
  git('init', '-q')
  git('add', '.')
  git('commit', '-q', '-m', 'baseline')
  init.write_text(mark.format('new'))
  return repo, which


def _run_in(repo, which, code, timeout=300, **env):
  """stdout of `code` run from `repo` with its benchmarks on the path, as
  `PYTHONPATH=. python benchmarks/...` runs there (and `env`): the checkout
  on every child's path too."""
  result = subprocess.run(
      [sys.executable, '-c',
       f"import sys; sys.path.insert(0, 'benchmarks')\n{code}"],
      cwd=repo, capture_output=True, text=True, timeout=timeout,
      env={**os.environ, 'PYTHONPATH': str(repo), 'WHICH_CODE': str(which),
           **env})
  if result.returncode:
    pytest.fail(f'exit {result.returncode}:\n{result.stderr}', pytrace=False)
  return result.stdout


def test_whole_runs_trains_the_baselines_code_not_the_checkouts(tmp_path):
  # The old run's `main`, refused by the override after it imported its
  # code: which code that was is all this test needs of it. Run twice from
  # one process (its child inherits the variable): with PYTHONSAFEPATH
  # unset, then set, which keeps `-m` from putting the old tree (its cwd)
  # on its path.
  repo, which = _marked_checkout(tmp_path)
  old_dir = tmp_path / 'old'
  out = _run_in(repo, which, f"""
import os
from absl import flags
import whole_runs
flags.FLAGS(['whole_runs.py', '--baseline=HEAD'])
whole_runs.provenance.unpack('HEAD', {str(old_dir)!r})
for safe_path in ('', '1'):
  os.environ['PYTHONSAFEPATH'] = safe_path
  try:
    whole_runs._main({str(old_dir)!r}, 'tiny', {str(tmp_path / 'run')!r},
                     '--config.no_such_field=1')
  except ValueError as e:
    print(e)
""")
  assert len(out.splitlines()) == 2, out
  for line in out.splitlines():
    assert line.startswith('tiny at commit HEAD failed (exit 2): '), out
  assert which.read_text().splitlines() == [
      f"new {repo / 'sparse_gpt2' / '__init__.py'}",  # whole_runs itself.
      *[f"old {old_dir / 'sparse_gpt2' / '__init__.py'}"] * 2]


def test_twin_worker_splits_a_batch_over_devices_to_the_same_losses(
    tmp_path):
  # The small twins' path (their configs ask for 2 CPU devices), which the
  # quick suite's tiny config never takes: the worker splits the CPU and
  # each batch, and its step's losses are the one-device step's. One layer
  # of tiny's two: the split and its losses do not depend on the depth,
  # and the three programs compiled here take half the time.
  config_file = tmp_path / 'two_devices.py'
  config_file.write_text('from configs import tiny\n\ndef get_config():\n'
                         '  config = tiny.get_config()\n'
                         '  config.model.num_layers = 1\n'
                         '  config.num_cpu_devices = 2\n  return config\n')
  out = _python('''
import io, json
import twin_worker
from sparse_gpt2 import optim, sharding, train
config_file = sys.argv[1]
rows = []
data_parallel = twin_worker.make_data_parallel_step
def recorded(config, *modules):
  step, state, tokens = data_parallel(config, *modules)
  rows.append([shard.data.shape[0] for shard in tokens.addressable_shards])
  return step, state, tokens
twin_worker.make_data_parallel_step = recorded
sys.stdin = io.StringIO('2\\n')
twin_worker.main('.', config_file)
print(json.dumps(rows))
def losses(step, state, tokens):
  out = []
  for _ in range(3):
    state, metrics = step(state, tokens)
    out.append(float(metrics['loss']))
  return out
# schedule_steps 0 resolved by both steps as a new run resolves it: the
# same initial masks.
print(json.dumps([
    losses(*data_parallel(twin_worker.load_config(config_file), train, optim,
                          sharding)),
    losses(*twin_worker.make_step(twin_worker.load_config(config_file), train,
                                  optim))]))
''', str(config_file))
  ready, times, rows, losses = out.splitlines()
  assert ready == 'ready'
  assert len(json.loads(times)) == 2 and min(json.loads(times)) > 0
  assert json.loads(rows) == [[4, 4]]  # tiny's batch of 8, split in two.
  split, single = json.loads(losses)
  np.testing.assert_allclose(split, single, rtol=1e-4)
  assert split[-1] < split[0]  # Steps that train, not a frozen state.


def test_quick_suite_writes_every_section_and_skips_a_missing_peer(tmp_path):
  # torch hidden: the suite must say the peer was skipped, not fail. Run
  # from a marked checkout (`_marked_checkout`), its baseline unpacked under
  # `scratch` (TMPDIR), so that the end of this test checks which code its
  # twins timed too.
  repo, which = _marked_checkout(tmp_path)
  out, scratch = tmp_path / 'out', tmp_path / 'scratch'
  scratch.mkdir()
  code = ("import runpy; sys.modules['torch'] = None; "
          f"sys.argv = ['run.py', '--quick', '--out={out}', "
          "'--baseline=HEAD']; "
          "runpy.run_path('benchmarks/run.py', run_name='__main__')")
  _run_in(repo, which, code, timeout=None, TMPDIR=str(scratch))
  result = json.loads((out / 'run.json').read_text())
  assert set(result) >= {'peers', 'modes', 'sizes', 'twins', 'date',
                         'machine', 'commit'}
  assert 'PyTorch peer skipped' in result['peers']['note']
  assert 'pip install -r requirements-dev.txt' in result['peers']['note']
  assert result['command'] == ('python benchmarks/run.py --quick '
                               f'--out={out} --baseline=HEAD')
  assert set(result['peers']['results']) == {'sparse_gpt2 (dense)',
                                             'plain Flax + optax'}
  modes = result['modes'][0]
  assert set(modes['results']) == {'none', 'static', 'topk'}
  for r in [*result['peers']['results'].values(), *modes['results'].values(),
            *result['sizes']['results']]:
    assert r['step_s'] > 0 and 0 < r['mfu'] < 1.5 and r['peak_flops'] > 0
  # Two timings of millisecond steps: on a loaded machine the top-k alone
  # can outlast a whole step, so only the sign is checked.
  assert modes['topk_share_of_step'] > 0
  memory = modes['memory']['results']
  assert memory['topk']['fp32_params'] == memory['none']['fp32_params'] > 0
  assert set(result['seconds']) == {'peers', 'modes', 'sizes', 'twins'}
  assert all(s > 0 for s in result['seconds'].values())
  twins = result['twins']['results']['configs/tiny.py']
  assert twins['old_step_s'] > 0 and twins['new_step_s'] > 0
  # One model's FLOPs over each step's time and the peak timed before it.
  assert 0 < twins['old_mfu'] < 1.5 and 0 < twins['new_mfu'] < 1.5
  assert twins['speedup'] == pytest.approx(
      twins['old_step_s'] / twins['new_step_s'])
  # Every derived number, recomputed from those it comes from.
  for section, rows in ((result['peers'], result['peers']['results'].values()),
                        (modes, modes['results'].values()),
                        (result['sizes'], result['sizes']['results'])):
    tokens = section['shape']['batch_size'] * section['shape']['seq_len']
    for r in rows:
      assert r['tokens_per_s'] == pytest.approx(tokens / r['step_s'])
  for r in modes['results'].values():
    assert r['vs_dense'] == pytest.approx(
        r['step_s'] / modes['results']['none']['step_s'])
  assert modes['topk_share_of_step'] == pytest.approx(
      modes['topk_s'] / modes['results']['topk']['step_s'])
  total = lambda r: (r['arguments'] + r['outputs'] - r['aliased']
                     + r['temporaries'])
  assert modes['memory']['sparse_extra_vs_params'] == pytest.approx(
      (total(memory['topk']) - total(memory['none']))
      / memory['none']['fp32_params'], rel=1e-12)
  markdown = (out / 'run.md').read_text()
  for heading in ('**Peers**', '**Sparsity modes**', '**Sizes**',
                  '**Twins**', 'PyTorch peer skipped', 'Wall time'):
    assert heading in markdown
  for mode, r in modes['results'].items():
    assert (f"| {mode} | {1e3 * r['step_s']:.0f} | "
            f"{r['tokens_per_s']:,.0f} | {r['vs_dense']:.3f} | "
            f"{100 * r['mfu']:.1f}% |") in markdown.splitlines()
  assert (f"| configs/tiny.py | {1e3 * twins['old_step_s']:.0f} | "
          f"{1e3 * twins['new_step_s']:.0f} | {twins['speedup']:.2f}x | "
          f"{100 * twins['old_mfu']:.1f}% | {100 * twins['new_mfu']:.1f}% |"
         ) in markdown.splitlines()
  # The quick suite's baseline is HEAD, the checkout's own code: a baseline
  # worker that imported the checkout would pass all of the above, timing
  # new against new. This process and the new worker import the checkout;
  # the baseline's check and its worker, the commit unpacked.
  new = f"new {repo / 'sparse_gpt2' / '__init__.py'}"
  imported = sorted(which.read_text().splitlines())
  assert imported[:2] == [new, new], imported
  old = imported[2:]
  assert len(old) == 2 and old[0] == old[1], imported
  assert old[0].startswith(f'old {scratch}{os.sep}'), imported
  assert old[0].endswith(os.path.join('', 'sparse_gpt2', '__init__.py')), (
      imported)


def test_suite_cpu_records_each_tests_own_and_its_childrens_cpu(tmp_path):
  # Two tests, one of which spends its CPU in a child it waits for.
  (tmp_path / 'test_two.py').write_text(
      'import subprocess, sys\n'
      'def test_busy():\n'
      '  sum(range(3_000_000))\n'
      'def test_child():\n'
      '  subprocess.run([sys.executable, "-c", "sum(range(3_000_000))"],\n'
      '                 check=True)\n')
  rows = tmp_path / 'cpu.jsonl'
  env = {**os.environ, 'SUITE_CPU': str(rows),
         'PYTHONPATH': os.path.join(ROOT, 'benchmarks')}
  subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'suite_cpu',
                  '-p', 'no:cacheprovider', 'test_two.py'], cwd=tmp_path,
                 env=env, check=True, capture_output=True, timeout=120)
  busy, child = (json.loads(line) for line in rows.read_text().splitlines())
  assert (busy['id'], child['id']) == ('test_two.py::test_busy',
                                       'test_two.py::test_child')
  assert busy['self'] > 0.02 and busy['children'] == 0
  assert child['children'] > 0.02 > child['self']
  summary = subprocess.run(
      [sys.executable, 'benchmarks/suite_cpu.py', str(rows)], cwd=ROOT,
      check=True, capture_output=True, text=True, timeout=60).stdout
  total = busy['self'] + child['self'] + child['children']
  assert summary.startswith(f'2 tests: {total:,.0f} s of CPU, '), summary
  longest = sorted((r['self'] + r['children'], r['id']) for r in (busy, child))
  assert summary.splitlines()[-2:] == [
      f'{cpu:8.1f} s  {name}' for cpu, name in reversed(longest)], summary


@pytest.mark.parametrize('make', [peers.flax_step, peers.torch_step])
def test_peers_train(make):
  step = make(TINY, lr=1e-2)
  losses = [step() for _ in range(20)]
  # The same batch every step: a trainer that learns drives its loss down.
  assert np.isfinite(losses).all()
  assert losses[-1] < losses[0] - 0.5


def test_matmuls_quick_times_every_kind_beside_both_steps():
  out = subprocess.run([sys.executable, 'benchmarks/matmuls.py', '--quick'],
                       cwd=ROOT, check=True, capture_output=True,
                       text=True).stdout
  rows = {line.split(' | ')[0].strip('| '): line.split(' | ')[1:]
          for line in out.splitlines() if line.startswith('| ')}
  assert set(rows) >= {'forward (ms, GFLOP/s)', 'input gradient (ms, GFLOP/s)',
                       'kernel gradient (ms, GFLOP/s)',
                       'all weight matmuls (ms)', 'train step (ms)'}
  for name in ('all weight matmuls (ms)', 'train step (ms)'):
    assert all(float(v.strip(' |')) > 0 for v in rows[name])
  assert "A step 1.3x PyTorch's:" in out


def test_matmuls_without_torch_is_one_line_before_any_compile():
  # torch hidden, and the project's step made uncallable: a traceback if
  # matmuls.py built it (seconds of compiling) before finding torch missing.
  code = ("import runpy; "
          "sys.modules['torch'] = None; import run; run.project_step = None; "
          "sys.argv = ['matmuls.py', '--quick']; "
          "runpy.run_path('benchmarks/matmuls.py', run_name='__main__')")
  result = _interpreter(code, timeout=120)
  assert result.returncode == 1, result.stderr
  assert result.stderr.strip() == (
      'error: import of torch halted; None in sys.modules (the PyTorch peer: '
      'pip install -r requirements-dev.txt)')


def test_step_profile_refuses_zero_steps_before_any_step():
  # Not a ZeroDivisionError after the warm-up steps. torch hidden: a
  # profile that started would end on that instead, in seconds.
  code = ("import runpy; sys.modules['torch'] = None; "
          "sys.argv = ['step_profile.py', '--step=torch', '--steps=0']; "
          "runpy.run_path('benchmarks/step_profile.py', run_name='__main__')")
  result = _interpreter(code, timeout=120)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip() == (
      'error: flag --steps=0: 0 is not a positive integer')


def test_step_profile_names_the_part_of_every_op_of_a_sparse_step():
  # The paper architecture (bigram table, sinks, untied unembedding) in topk
  # mode on two devices has ops of every part; 'other' holds only what XLA
  # made up (copies, constants), not a matmul or a scatter of the step.
  # Compiled anew: the compile cache's key leaves out the name stacks, so a
  # cached program would show the scopes of the code that filled it. One
  # layer: a second one adds ops of the same parts.
  code = '''
import re
import jax
jax.config.update('jax_num_cpu_devices', 2)
jax.config.update('jax_enable_compilation_cache', False)
import run, step_profile
from configs import tiny
config = tiny.get_config('topk')
config.model.num_layers = 1
_, jitted, holder, tokens = run.project_step(config)
text = jitted.lower(holder[0], tokens).compile().as_text()
parts = step_profile.parts_of_ops(text)
named = {p for p, _ in step_profile.PARTS} | {'gradient all-reduce'}
assert set(parts.values()) == named | {'other'}, set(parts.values()) ^ named
opcode = dict(re.findall(r'^\\s*(?:ROOT )?%(\\S+) = .*? ([\\w-]+)\\(', text,
                        re.M))
unnamed = [n for n, p in parts.items()
           if p == 'other' and opcode[n] in ('dot', 'scatter')]
assert not unnamed, unnamed
dots = {parts[n] for n in parts if opcode[n] == 'dot'}
assert dots >= {'MLP', 'unembedding', 'attention: q/k/v and output matmuls',
                'attention: scores, softmax, weighted values'}, dots
'''
  _python(code, timeout=None)


def test_gpu_check_trains_both_twins_and_writes_its_tables(tiny_config,
                                                           tmp_path):
  """benchmarks/gpu.sh end to end, shrunk onto the CPU: both 124M configs
  through sparse_gpt2.main, the JSON and the table from their logs, in an
  OUT_DIR relative to where it was called."""
  config = tiny_config()
  shrink = (f'--config.data.source={config.data.source} '
            f'--config.data.data_dir={config.data.data_dir} '
            '--config.data.vocab_size=512 --config.batch_size=8 '
            '--config.microbatches=2 --config.seq_len=32 '
            '--config.model.max_len=32 --config.model.num_layers=1 '
            '--config.model.d_model=32 --config.model.num_heads=2 '
            '--config.model.d_head=16 --config.model.d_mlp=64')
  runs = ('dense_gpt2_124m|dense_gpt2_124m|\nsparse_gpt2_124m|sparse_gpt2_124m|'
          '\nbroken|dense_gpt2_124m|--config.no_such_field=1')
  # Called from tmp_path with OUT_DIR=rel/out: the caller's ./rel/out, not
  # the repository's, holds the results, the failed run's log included.
  out = tmp_path / 'rel' / 'out'
  check = subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'gpu.sh')],
                         cwd=tmp_path, capture_output=True, text=True, env={
                             **os.environ, 'OUT_DIR': 'rel/out',
                             'STEPS': '10', 'RUNS': runs, 'EXTRA': shrink})
  # The broken run fails alone (at once, leaving its log); the others are
  # measured, then the exit status says so.
  assert check.returncode == 1, check.stderr
  assert check.stderr.strip().splitlines()[-1] == (
      f'error: failed: broken (their logs are in {out})')
  assert (out / 'broken.log').exists()
  result = json.loads((out / 'gpu.json').read_text())
  assert set(result['runs']) == {'dense_gpt2_124m', 'sparse_gpt2_124m'}
  for run in result['runs'].values():
    assert run['steps'] == 10 and run['step_s'] > 0
    assert run['tokens_per_s'] == pytest.approx(8 * 32 / run['step_s'])
    assert 0 < run['mfu_timed'] and run['peak_memory_gib'] is None  # CPU.
  assert result['sparse_over_dense_step_time'] == pytest.approx(
      result['runs']['sparse_gpt2_124m']['step_s']
      / result['runs']['dense_gpt2_124m']['step_s'])
  table = (out / 'gpu.md').read_text()
  assert '| dense_gpt2_124m |' in table and 'sparse/dense step time' in table
  assert (out / 'sparse_gpt2_124m.log').exists()


def test_gpu_check_refuses_an_out_dir_it_cannot_make(tmp_path):
  (tmp_path / 'a_file').write_text('')
  check = subprocess.run(
      ['bash', 'benchmarks/gpu.sh'], cwd=ROOT, capture_output=True, text=True,
      env={**os.environ, 'OUT_DIR': str(tmp_path / 'a_file' / 'out')})
  assert check.returncode == 1, check.stderr
  lines = check.stderr.strip().splitlines()
  assert len(lines) == 1, check.stderr
  assert lines[0].startswith(f"error: OUT_DIR {tmp_path}/a_file/out: cannot "
                             'create directory'), check.stderr


def test_gpu_check_removes_its_temporary_folder_when_it_stops_early(
    tmp_path):
  # The matmul peak fails (no such platform): the script exits there, and
  # its `mktemp -d` folder goes with it.
  (tmp_path / 'tmp').mkdir()
  check = subprocess.run(
      ['bash', 'benchmarks/gpu.sh'], cwd=ROOT, capture_output=True, text=True,
      env={**os.environ, 'OUT_DIR': str(tmp_path / 'out'),
           'TMPDIR': str(tmp_path / 'tmp'), 'JAX_PLATFORMS': 'no_such'})
  assert check.returncode == 1, check.stderr
  assert check.stderr.strip().splitlines()[-1] == (
      'error: the matmul peak failed (above)')
  assert not os.listdir(tmp_path / 'tmp')


def test_gpu_check_refuses_an_argument_and_prints_its_usage(tmp_path):
  # Its settings are environment variables: --help, or an override meant
  # for EXTRA, was ignored and the whole check ran (here it would stop at
  # the matmul peak, on no platform).
  env = {**os.environ, 'OUT_DIR': str(tmp_path / 'out'),
         'JAX_PLATFORMS': 'no_such'}
  usage = subprocess.run(['bash', 'benchmarks/gpu.sh', '--help'], cwd=ROOT,
                         capture_output=True, text=True, env=env)
  assert usage.returncode == 0, usage.stderr
  assert all(f'{name}=' in usage.stdout
             for name in ('STEPS', 'RUNS', 'EXTRA', 'RUN_TIMEOUT', 'OUT_DIR'))
  assert usage.stdout.endswith('exits 1, naming it.\n')  # The whole header.
  check = subprocess.run(
      ['bash', 'benchmarks/gpu.sh', '--config.train_steps=5'], cwd=ROOT,
      capture_output=True, text=True, env=env)
  assert check.returncode == 2, check.stderr
  assert check.stderr == (
      'error: gpu.sh takes no arguments, got --config.train_steps=5: set '
      'STEPS, RUNS, EXTRA, RUN_TIMEOUT or OUT_DIR instead (--help)\n')
  assert not (tmp_path / 'out').exists()


def test_whole_runs_keeps_the_configs_before_a_failed_run(tmp_path):
  # tiny's runs faked (seconds each, not minutes), dense_small's real: the
  # baseline's main rejects the override, as an older commit's can. One
  # line, and tiny's result already written, with the command as typed.
  code = """
import whole_runs
from sparse_gpt2 import cli
real_main = whole_runs._main
def fake_main(code_dir, config, *args):
  if config == 'tiny':
    return 2.0, 'Done: 10 steps in 1.5 s'
  return real_main(code_dir, config, *args)
whole_runs._main = fake_main
whole_runs.runs.val_losses = lambda workdir: {'10': 5.0}
sys.argv = ['whole_runs.py', *sys.argv[1:]]
cli.run(whole_runs.main)
"""
  args = ['--configs=tiny,dense_small', '--baseline=HEAD', f'--out={tmp_path}',
          '--set=config.no_such_field=1']
  result = _interpreter(code, *args, timeout=120)
  assert result.returncode == 1, result.stderr
  assert result.stderr.strip() == (
      'error: dense_small at the checkout failed (exit 2): no such config '
      "field: 'no_such_field'")
  written = json.loads((tmp_path / 'whole_runs.json').read_text())
  assert list(written['results']) == ['tiny']
  command = 'python benchmarks/whole_runs.py ' + ' '.join(args)
  assert written['command'] == command
  markdown = (tmp_path / 'whole_runs.md').read_text()
  assert f'(`{command}`)' in markdown and '| tiny |' in markdown


# checkpoint_damage.py with its training faked: a checkpoint 20 of two files,
# every resume restoring the state as saved; with FAIL_IF_TRAINED set, a
# training ends the process.
_STUBBED_DAMAGE = """
import os, types
import checkpoint_damage
from sparse_gpt2 import cli
def train_and_evaluate(config, run):
  if os.environ.get('FAIL_IF_TRAINED'):
    sys.exit('trained')
  state = os.path.join(run, checkpoint_damage.workdir_lib.CHECKPOINTS, '20',
                       'state')
  os.makedirs(os.path.join(state, 'd'), exist_ok=True)
  for name in ('_METADATA', 'd/chunk'):
    with open(os.path.join(state, name), 'w') as f:
      f.write('saved')
  return {}
checkpoint_damage.train = types.SimpleNamespace(
    train_and_evaluate=train_and_evaluate,
    load_run=lambda run, step: (None, None, {}))
sys.argv = ['checkpoint_damage.py', *sys.argv[1:]]
cli.run(checkpoint_damage.main)
"""


def test_checkpoint_damage_records_its_command_and_choice(tmp_path):
  args = ['--ways=flip_byte,delete', '--path_contains=state/d',
          f'--out={tmp_path}']
  _python(_STUBBED_DAMAGE, *args, timeout=120)
  result = json.loads((tmp_path / 'checkpoint_damage.json').read_text())
  command = 'python benchmarks/checkpoint_damage.py ' + ' '.join(args)
  assert result['command'] == command
  assert result['ways'] == ['flip_byte', 'delete']
  assert result['path_contains'] == 'state/d'
  assert [c['file'] for c in result['cases']] == ['state/d/chunk'] * 2
  assert f'(`{command}`)' in (tmp_path / 'checkpoint_damage.md').read_text()


@pytest.mark.parametrize('args, fail_if_trained, message', [
    # Known before the run trains.
    (['--ways='], True, f'--ways is empty; known: {DAMAGES}'),
    # Known once it has saved its checkpoint.
    (['--path_contains=no_such_file'], False,
     '--path_contains=no_such_file matches none of the 2 files of checkpoint '
     '20 (in state, state/d)'),
])
def test_checkpoint_damage_refuses_a_choice_of_no_case(args, fail_if_trained,
                                                       message, tmp_path):
  # Not a report of no cases, and its malformed table.
  env = {**os.environ, 'FAIL_IF_TRAINED': '1' if fail_if_trained else ''}
  result = _interpreter(_STUBBED_DAMAGE, *args, f'--out={tmp_path}', env=env,
                        timeout=120)
  assert result.returncode == 1, result.stderr
  assert result.stderr.strip() == f'error: {message}'
  assert not os.listdir(tmp_path)


def test_whole_runs_trains_both_versions_and_writes_its_table(tiny_config,
                                                              tmp_path):
  """benchmarks/whole_runs.py end to end on configs/tiny.py, this checkout
  against itself (HEAD): both runs train, from their own workdirs, to the
  same losses; the JSON and the table hold both; a missing commit is one
  line and a non-zero exit."""
  config = tiny_config()
  # One layer of tiny's two: each run compiles from an empty cache, and
  # what is checked does not depend on the depth.
  cmd = [sys.executable, 'benchmarks/whole_runs.py', '--configs=tiny',
         '--baseline=HEAD', f'--out={tmp_path}', '--set=config.train_steps=10',
         '--set=config.model.num_layers=1',
         f'--set=config.data.source={config.data.source}',
         f'--set=config.data.data_dir={config.data.data_dir}']
  subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
  result = json.loads((tmp_path / 'whole_runs.json').read_text())
  tiny = result['results']['tiny']
  for version in ('old', 'new'):
    assert 0 < tiny[version]['done_s'] < tiny[version]['wall_s']
    assert list(tiny[version]['val_loss']) == ['10']
  # The same code and config, so the same losses.
  assert tiny['old']['val_loss'] == tiny['new']['val_loss']
  assert tiny['speedup'] == pytest.approx(
      tiny['old']['wall_s'] / tiny['new']['wall_s'])
  old, new = tiny['old'], tiny['new']
  assert (f"| tiny | {old['wall_s']:.1f} | {new['wall_s']:.1f} | "
          f"**{tiny['speedup']:.2f}x** | {old['done_s']:.1f} / "
          f"{new['done_s']:.1f} | {old['val_loss']['10']:.4f} | "
          f"{new['val_loss']['10']:.4f} |"
         ) in (tmp_path / 'whole_runs.md').read_text().splitlines()
  missing = subprocess.run([*cmd[:3], '--baseline=no_such_commit'], cwd=ROOT,
                           capture_output=True, text=True)
  assert missing.returncode != 0
  assert 'commit no_such_commit not found' in missing.stderr.splitlines()[-1]


def test_checkpoint_damage_resumes_on_each_damaged_file(tiny_config,
                                                        tmp_path):
  """benchmarks/checkpoint_damage.py on two damages of one file (the
  orbax metadata of the arrays): both fall back to the previous checkpoint,
  and the JSON and the table say so; an unknown damage is one line and a
  non-zero exit."""
  config = tiny_config()
  # One layer of tiny's two: fewer arrays to save and compile, the same
  # checkpoint files.
  cmd = [sys.executable, 'benchmarks/checkpoint_damage.py',
         '--ways=flip_byte,delete', '--path_contains=state/_METADATA',
         f'--out={tmp_path}', '--config.model.num_layers=1',
         f'--config.data.source={config.data.source}',
         f'--config.data.data_dir={config.data.data_dir}']
  subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
  result = json.loads((tmp_path / 'checkpoint_damage.json').read_text())
  assert [(c['way'], c['file'], c['outcome']) for c in result['cases']] == [
      ('flip_byte', 'state/_METADATA', 'fell back'),
      ('delete', 'state/_METADATA', 'fell back')]
  assert '| flip_byte | 1 |' in (tmp_path / 'checkpoint_damage.md').read_text()
  unknown = subprocess.run([*cmd[:2], '--ways=melted'], cwd=ROOT,
                           capture_output=True, text=True)
  assert unknown.returncode != 0
  assert 'unknown --ways' in unknown.stderr.splitlines()[-1]


def _python_parts(*codes, **run_args):
  """[stdout of each of `codes`], run one after the other by one `_python`,
  each in a namespace of its own: the tests of a benchmark's functions on
  fakes, which need it imported in a fresh interpreter (its flags clash
  with other modules'), but not one each. A part that patches what a later
  one calls puts it back."""
  marker = '--- end of part ---'
  script = ''.join(
      f'exec(compile({code!r}, "<part {i}>", "exec"), {{"sys": sys}})\n'
      f'print({marker!r})\n' for i, code in enumerate(codes))
  return _python(script, **run_args).split(f'{marker}\n')[:-1]


def test_run_interleaved_twins_memory_markdown_and_a_failed_worker(tmp_path):
  # Four checks of run.py's functions in one interpreter (`_python_parts`):
  # interleaved's medians of its timed rounds; the twins' and the memory's
  # results from faked measures; the markdown's twins row; a twin worker
  # that fails as one line.
  _, _, markdown, failed = _python_parts('''
# Fake steps and peaks: the warm-up's time left out, then the median of
# the step times, of the peaks and of each step's own MFU.
import run
peaks = iter([10.0, 40.0, 20.0])
run.metrics.measure_peak_flops = lambda **kwargs: next(peaks)
times = iter([[100.0], [1.0, 1.0], [2.0, 2.0], [6.0, 6.0]])
calls = []
def fake_run(n):
  calls.append(n)
  return next(times)
result = run.interleaved({'a': (fake_run, 120.0)}, rounds=3, steps=2)
assert calls == [1, 2, 2, 2], calls
# MFUs of the steps: 12, 12, 1.5, 1.5, 1, 1.
assert result == {'a': {'step_s': 2.0, 'peak_flops': 20.0, 'mfu': 1.5}}, result
''', '''
# Fake twin workers (old 3x slower) and fake compiled steps' memory.
import types
import numpy as np
import run
run.metrics.measure_peak_flops = lambda **kwargs: 1e9
class Worker:
  def __init__(self, seconds):
    self.seconds = seconds
  def wait_ready(self):
    pass
  def steps(self, n):
    return [self.seconds] * n
  def close(self):
    pass
name = 'configs/tiny.py'
out = run._time_twins('abc', {name: {'old': Worker(0.3), 'new': Worker(0.1)}},
                      rounds=2, steps=2)
flops = run._flops_per_step(run.twin_worker.load_config(
    run.os.path.join(run.ROOT, name)))
r = out['results'][name]
assert out['baseline'] == 'abc'
assert r['old_step_s'] == 0.3 and r['new_step_s'] == 0.1, r
assert np.isclose(r['speedup'], 3.0), r
assert np.isclose(r['old_mfu'], flops / 0.3 / 1e9), (r, flops)
assert np.isclose(r['new_mfu'], flops / 0.1 / 1e9), (r, flops)

def fake(arguments, outputs, aliased, temporaries, params):
  analysis = types.SimpleNamespace(
      argument_size_in_bytes=arguments, output_size_in_bytes=outputs,
      alias_size_in_bytes=aliased, temp_size_in_bytes=temporaries)
  compiled = types.SimpleNamespace(memory_analysis=lambda: analysis)
  lowered = types.SimpleNamespace(compile=lambda: compiled)
  jitted = types.SimpleNamespace(lower=lambda state, tokens: lowered)
  state = types.SimpleNamespace(params={'w': np.zeros(params, np.float32)})
  return None, jitted, [state], None
mem = run.memory({'none': fake(100, 100, 80, 50, 25),
                  'topk': fake(110, 130, 90, 70, 25)})
# Dense holds 100 + 100 - 80 + 50 = 170, topk 110 + 130 - 90 + 70 = 220.
assert mem['results']['none']['fp32_params'] == 100, mem
assert np.isclose(mem['sparse_extra_vs_params'], (220 - 170) / 100), mem
''', '''import run
row = {'step_s': 0.01, 'tokens_per_s': 1e4, 'mfu': 0.1}
shape = dict(vocab_size=8, d_model=4, num_layers=1, num_heads=1, seq_len=4,
             batch_size=2)
print(run.to_markdown({
    'date': 'today', 'machine': 'm', 'commit': 'c', 'command': 'cmd',
    'num_cpu_devices': 2, 'peers': {'shape': shape, 'results': {'p': row},
                                    'note': None},
    'modes': [], 'sizes': {'shape': shape, 'results': []},
    'twins': {'baseline': 'abc', 'results': {'configs/x.py': {
        'old_step_s': 0.5, 'new_step_s': 0.2, 'speedup': 2.5,
        'old_mfu': 0.04, 'new_mfu': 0.1}}},
    'seconds': {'peers': 1.0}}))
''', f'''
# A worker on a tree without the package: a ValueError of one line, which
# `cli.run` prints, not a RuntimeError holding its traceback.
import run
worker = run._Worker({str(tmp_path)!r}, 'configs/tiny.py')
try:
  worker.wait_ready()
except ValueError as e:
  print(e)
''')
  assert '| configs/x.py | 500 | 200 | 2.50x | 4.0% | 10.0% |' in (
      markdown.splitlines())
  assert failed == (f'the twin worker of {tmp_path} failed to start (exit 1): '
                    "ModuleNotFoundError: No module named 'sparse_gpt2'\n")


def test_whole_runs_markdown_reads_the_last_eval_or_none_of_each_version():
  # Two tables in one interpreter (`_python_parts`): the last evaluation of
  # each version, whatever the order of its steps; and runs that evaluated
  # nothing (--set=config.train_steps=0): both runs' times in the table,
  # not a bare "max() arg is an empty sequence" after them and no file
  # written.
  last, none = _python_parts('''
import whole_runs
print(whole_runs.to_markdown({
    'date': 'today', 'machine': 'm', 'commit': 'c', 'baseline': 'b',
    'command': 'cmd', 'results': {'tiny': {
        'old': {'wall_s': 30.0, 'done_s': 20.0,
                'val_loss': {'5': 9.0, '10': 7.0, '100': 3.25}},
        'new': {'wall_s': 12.0, 'done_s': 8.0,
                'val_loss': {'5': 8.0, '100': 3.5, '10': 6.0}},
        'speedup': 2.5}}}))
''', '''
import whole_runs
print(whole_runs.to_markdown({
    'date': 'today', 'machine': 'm', 'commit': 'c', 'baseline': 'b',
    'command': 'cmd', 'results': {'tiny': {
        'old': {'wall_s': 30.0, 'done_s': 20.0, 'val_loss': {}},
        'new': {'wall_s': 12.0, 'done_s': 8.0, 'val_loss': {}},
        'speedup': 2.5}}}))
''')
  assert ('| tiny | 30.0 | 12.0 | **2.50x** | 20.0 / 8.0 | 3.2500 | 3.5000 |'
          in last.splitlines())
  assert ('| tiny | 30.0 | 12.0 | **2.50x** | 20.0 / 8.0 | - | - |'
          in none.splitlines())


def test_checkpoint_damage_markdown_and_outcome_of_each_resume(tmp_path):
  # Two checks in one interpreter (`_python_parts`): the markdown counts
  # one case as one ('1 cases' of one --ways on one --path_contains file);
  # `outcome` tells each way a resume ended.
  markdown, outcomes = _python_parts('''
import checkpoint_damage
for cases in (1, 2):
  print(checkpoint_damage.to_markdown({
      'date': 'today', 'machine': 'm', 'commit': 'c', 'command': 'cmd',
      'ways': ['delete'], 'cases': [
          {'way': 'delete', 'file': 'f', 'outcome': 'fell back'}] * cases}))
''', f'''
import os
import numpy as np
import checkpoint_damage
saved = {{'a': np.arange(3), 'b': np.ones(2)}}
other = {{'a': np.arange(3), 'b': np.zeros(2)}}
workdir = {str(tmp_path)!r}
print(checkpoint_damage.outcome(workdir, dict(saved), saved))
print(checkpoint_damage.outcome(workdir, other, saved))
os.makedirs(os.path.join(workdir, checkpoint_damage.workdir_lib.CORRUPT))
print(checkpoint_damage.outcome(workdir, dict(saved), saved))
''')
  assert [l for l in markdown.splitlines() if l.startswith('Measured')] == [
      f'Measured today on m, commit `c` (`cmd`): {n}, each file of a '
      'checkpoint damaged alone.' for n in ('1 case', '2 cases')]
  assert outcomes.splitlines() == ['restored as saved', 'restored OTHER VALUES',
                                   'fell back']


def test_provenance_marks_only_a_modified_checkout(tmp_path, monkeypatch):
  import provenance  # pylint: disable=g-import-not-at-top
  git = lambda *args: subprocess.run(
      ['git', '-C', str(tmp_path), '-c', 'user.name=t', '-c',
       'user.email=t@t', *args], check=True, capture_output=True, text=True)
  git('init', '-q')
  (tmp_path / 'f').write_text('a')
  git('add', 'f')
  git('commit', '-q', '-m', 'c')
  head = git('rev-parse', '--short', 'HEAD').stdout.strip()
  monkeypatch.setattr(provenance, 'ROOT', str(tmp_path))
  assert provenance.commit() == head
  (tmp_path / 'f').write_text('b')
  assert provenance.commit() == f'{head} (modified)'


@pytest.mark.parametrize('where', ['a copy without .git',
                                   "inside another repository's folder",
                                   'a machine without git'])
def test_provenance_commit_is_unknown_where_git_does_not_track_it(
    where, tmp_path, monkeypatch):
  # Not 'unknown (modified)', nor the commit of a repository that does not
  # hold the code (a home directory kept in git), nor a traceback; a
  # baseline there is refused saying what to do, not by git's "fatal: not
  # a git repository" (or "pathspec 'sparse_gpt2' did not match").
  import provenance  # pylint: disable=g-import-not-at-top
  copy = tmp_path / 'copy'
  copy.mkdir()
  (copy / 'f').write_text('a')
  if where == "inside another repository's folder":
    subprocess.run(['git', '-C', str(tmp_path), '-c', 'user.name=t', '-c',
                    'user.email=t@t', 'init', '-q'], check=True)
    subprocess.run(['git', '-C', str(tmp_path), '-c', 'user.name=t', '-c',
                    'user.email=t@t', 'commit', '-q', '--allow-empty', '-m',
                    'c'], check=True)
  elif where == 'a machine without git':
    monkeypatch.setenv('PATH', str(tmp_path / 'no_programs'))
  monkeypatch.setattr(provenance, 'ROOT', str(copy))
  assert provenance.commit() == 'unknown'
  with pytest.raises(ValueError) as refused:
    provenance.unpack('HEAD', str(tmp_path / 'old'))
  assert str(refused.value) == (
      f'commit HEAD not found: git does not track {copy} (a copy without '
      '.git, or no git); run from a git clone of the project')


@pytest.mark.parametrize('flags, isa', [
    ('fpu avx2 avx512f sse', ' (AVX-512)'),
    ('fpu avx2 sse', ' (AVX2)'),
    ('fpu sse', ''),
])
def test_provenance_machine_names_the_widest_vectors(flags, isa, monkeypatch):
  import io  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  import provenance  # pylint: disable=g-import-not-at-top
  cpuinfo = f'processor\t: 0\nmodel name\t: Fake CPU\nflags\t\t: {flags}\n'
  monkeypatch.setattr(provenance, 'open', lambda path: io.StringIO(cpuinfo),
                      raising=False)
  # No jax backend started in this process: other tests choose its devices.
  monkeypatch.setattr(provenance, 'jax', types.SimpleNamespace(
      devices=lambda: [types.SimpleNamespace(device_kind='cpu')]))
  assert provenance.machine().startswith(f'Fake CPU{isa}, ')


def test_provenance_machine_counts_the_cores_the_run_may_use(monkeypatch):
  # A run pinned to one core of two (`taskset -c 0`, a container's cpuset)
  # read '2 cores': its numbers put beside those of runs on two.
  import types  # pylint: disable=g-import-not-at-top
  import provenance  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(provenance.os, 'cpu_count', lambda: 2)
  monkeypatch.setattr(provenance, 'jax', types.SimpleNamespace(
      devices=lambda: [types.SimpleNamespace(device_kind='cpu')]))
  monkeypatch.setattr(provenance.os, 'sched_getaffinity', lambda pid: {0},
                      raising=False)
  assert ', 1 of 2 cores, ' in provenance.machine()
  monkeypatch.setattr(provenance.os, 'sched_getaffinity', lambda pid: {0, 1})
  assert ', 2 cores, ' in provenance.machine()


def test_matmuls_time_in_turns_table_ratios_and_the_same_products():
  # Three checks of matmuls.py in one interpreter (`_python_parts`), in this
  # order: `time_in_turns` is the median after a warm call (its faked clock
  # put back after); the table's ratios are PyTorch's over this project's,
  # each row's its own (the medians faked, the steps not built); jax and
  # torch run the same products (on the 2 CPU devices `main` set up, each
  # its share of the tokens).
  _, out, _ = _python_parts('''
import matmuls
clock = [0.0]
perf_counter = matmuls.time.perf_counter  # Put back below.
matmuls.time.perf_counter = lambda: clock[0]
def advancing(seconds):
  seconds = iter(seconds)
  def fn():
    clock[0] += next(seconds)
  return fn
median = matmuls.time_in_turns({'a': advancing([100, 1, 5, 2]),
                                'b': advancing([50, 7, 3, 4])}, rounds=3)
assert median == {'a': 2, 'b': 4}, median
matmuls.time.perf_counter = perf_counter
''', '''
from absl import flags
import matmuls
ms = {('jax', 'forward'): 1, ('torch', 'forward'): 3,
      ('jax', 'input gradient'): 2, ('torch', 'input gradient'): 3,
      ('jax', 'kernel gradient'): 4, ('torch', 'kernel gradient'): 2,
      ('jax', 'step'): 10, ('torch', 'step'): 15}
def fake_time_in_turns(contenders, rounds):
  assert set(contenders) == set(ms), set(contenders) ^ set(ms)
  return {key: 1e-3 * v for key, v in ms.items()}
matmuls.time_in_turns = fake_time_in_turns
matmuls.peers.torch_step = lambda shape: None
matmuls.run.project_step = lambda config: (None,)
flags.FLAGS(['matmuls.py', '--quick'])
matmuls.main()
''', '''
import numpy as np
import matmuls
operands = matmuls._operands(matmuls._TINY, np.random.default_rng(0))
ours, theirs = matmuls.jax_matmuls(operands), matmuls.torch_matmuls(operands)
assert set(ours) == set(theirs) == set(matmuls._KINDS)
for kind in matmuls._KINDS:
  for (x, w, dy), a, b in zip(operands, ours[kind](), theirs[kind]()):
    a = np.asarray(a)
    if kind == 'kernel gradient':  # Each device's part of X^T dY.
      a = a.sum(0)
    want = {'forward': x @ w, 'input gradient': dy @ w.T,
            'kernel gradient': x.T @ dy}[kind]
    np.testing.assert_allclose(a, want, rtol=1e-4, atol=1e-5, err_msg=kind)
    np.testing.assert_allclose(b.numpy(), want, rtol=1e-4, atol=1e-5,
                               err_msg=kind)
''')
  ratios = {line.split(' | ')[0].strip('| '): line.split(' | ')[-1].strip(' |')
            for line in out.splitlines() if line.startswith('| ')}
  assert {k: v for k, v in ratios.items() if '(' in k} == {
      'forward (ms, GFLOP/s)': '3.00', 'input gradient (ms, GFLOP/s)': '1.50',
      'kernel gradient (ms, GFLOP/s)': '0.50',
      'all weight matmuls (ms)': '1.14', 'train step (ms)': '1.50'}
  assert "A step 1.3x PyTorch's: 11.5 ms;" in out


def test_step_profile_helpers_on_end_markers_overlaps_and_collectives():
  # Two checks of step_profile.py's helpers in one interpreter
  # (`_python_parts`; a subprocess: its flags would clash with those of
  # modules other tests import). First, an op timed to its end marker: an
  # Eigen dot's event ends at once and its `end:` marker comes when the
  # thread pool is done, here on the other thread; the op the first thread
  # ran meanwhile counts once, as its own. Then overlapping starts, spans
  # that hold others, busy time and the parts of collectives.
  _python_parts('''
import step_profile
events = [(0, 1, 'dot.1', 'a'), (2, 3, 'fusion.2', 'b'),
          (4, 2, 'fusion.3', 'a'), (9, 1, 'end: dot.1', 'b'),
          (20, 1, 'dot.1', 'b'), (24, 2, 'end: dot.1', 'a')]
spans = sorted(step_profile._op_spans(events))
assert spans == [(0, 10, 'dot.1', 'a'), (2, 5, 'fusion.2', 'b'),
                 (4, 6, 'fusion.3', 'a'), (20, 26, 'dot.1', 'b')], spans
own = step_profile._self_times([s[:3] for s in spans if s[3] == 'a'])
assert sorted(own) == [('dot.1', 8), ('fusion.3', 2)], own
assert step_profile._busy_ns([s[:2] for s in spans]) == 16
''', '''
import step_profile
# Two starts of one op before either marker: the first marker closes the
# first start.
events = [(0, 1, 'dot.1', 'a'), (2, 1, 'dot.1', 'b'),
          (5, 1, 'end: dot.1', 'b'), (8, 1, 'end: dot.1', 'a')]
spans = sorted(step_profile._op_spans(events))
assert spans == [(0, 6, 'dot.1', 'a'), (2, 9, 'dot.1', 'b')], spans
# Two spans from one start: the longer holds the shorter.
own = step_profile._self_times([(0, 4, 'inner'), (0, 10, 'outer')])
assert sorted(own) == [('inner', 4), ('outer', 6)], own
busy = [step_profile._busy_ns([(0, 5), (3, 8)]),
        step_profile._busy_ns([(0, 5), (6, 8)])]
assert busy == [8, 7], busy
grad = 'transpose(jvp(GPT2))/block_0/mlp/mlp_fc/dot_general'
hlo = '\\n'.join(
    f'  {root}%{name} = f32[4]{{0}} {op}(f32[4]{{0}} %p), '
    f'metadata={{op_name="jit(step)/{stack}"}}'
    for root, name, op, stack in (
        ('', 'all-reduce.1', 'all-reduce', 'reproject/shard_map/psum'),
        ('', 'all-reduce.2', 'all-reduce', grad),
        ('ROOT ', 'fusion.3', 'fusion', grad)))
parts = step_profile.parts_of_ops(hlo)
assert parts == {'all-reduce.1': 'top-k and masks',
                 'all-reduce.2': 'gradient all-reduce',
                 'fusion.3': 'MLP'}, parts
''', cwd=os.path.join(ROOT, 'benchmarks'))


def test_attention_blocks_times_each_split_and_names_the_chosen_one():
  """A row per length: the three splits' medians, and how many blocks
  `model._query_blocks` cuts that length into (one under 48 tokens, four
  at training's 128)."""
  from sparse_gpt2 import model  # pylint: disable=g-import-not-at-top
  result = subprocess.run(
      [sys.executable, 'benchmarks/attention_blocks.py', '--batch=2',
       '--heads=2', '--lengths=8,128'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [l.strip('| ').split(' | ') for l in result.stdout.splitlines()
          if l.startswith('| ')]
  assert rows[0] == ['T', '1 block (ms)', '2 blocks (ms)', '4 blocks (ms)',
                     'chosen']
  assert [row[0] for row in rows[1:]] == ['8', '128']
  for row in rows[1:]:
    assert all(float(ms) > 0 for ms in row[1:4]), row
    assert int(row[4]) == len(model._query_blocks(int(row[0])))  # pylint: disable=protected-access
  assert [row[4] for row in rows[1:]] == ['1', '4']


@pytest.mark.parametrize('args, message', [
    (['--lengths=8,-3'], "flag --lengths=['8', '-3']: one or more positive "
     'integers, comma-separated'),
    (['--lengths=abc'], "flag --lengths=['abc']: one or more positive "
     'integers, comma-separated'),
    (['--lengths='], 'flag --lengths=[]: one or more positive integers, '
     'comma-separated'),
    (['--batch=0'], 'flag --batch=0: 0 is not a positive integer'),
    (['--heads=-1'], 'flag --heads=-1: -1 is not a positive integer'),
])
def test_attention_blocks_refuses_bad_sizes_before_any_row(args, message):
  # Else a table of the lengths before the bad one, then a jax error of
  # several lines (or, --lengths= and --batch=0, a table of nothing).
  result = subprocess.run(
      [sys.executable, 'benchmarks/attention_blocks.py', '--batch=2',
       '--heads=2', *args], cwd=ROOT, capture_output=True, text=True,
      timeout=120)
  assert (result.returncode, result.stdout) == (2, ''), result.stdout
  assert result.stderr.strip() == f'error: {message}', result.stderr
