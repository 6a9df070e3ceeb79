"""What a user meets before any run: config files as `sparse_gpt2.main`
takes them, and the example that writes a user task."""

import json
import os
import subprocess
import sys

import pytest

from configs import tiny
from sparse_gpt2 import defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('body, error', [
    # A misspelt field is a new one that nothing reads: the run trained at
    # tiny's density, 0.25, without a word.
    ('config = tiny.get_config()\n  config.sparsity.densty = 0.05\n'
     '  config.train_step = 1\n  config.data.source = "/no/such/code"\n',
     'no such config field: sparsity.densty, train_step (every field is in '
     'sparse_gpt2/defaults.py)'),
    # Not built on base(): a traceback at the first field main read.
    ('config = ml_collections.ConfigDict(dict(train_steps=1, model=dict(\n'
     '      d_model=8)))\n',
     'the config lacks batch_size, checkpoint_every, data, eval_batches and '
     '33 more: build it on sparse_gpt2.defaults.base()'),
    ('config = dict(tiny.get_config())\n',
     'the config is a dict, not a ConfigDict: build it on '
     'sparse_gpt2.defaults.base()'),
])
def test_main_refuses_a_config_file_whose_fields_are_not_the_defaults(
    tmp_path, body, error):
  config_file = tmp_path / 'mine.py'
  config_file.write_text(
      'import ml_collections\nfrom configs import tiny\n\n'
      f'def get_config():\n  {body}  return config\n')
  result = subprocess.run(
      [sys.executable, '-m', 'sparse_gpt2.main', f'--config={config_file}',
       f'--workdir={tmp_path / "run"}'], capture_output=True, text=True,
      cwd=ROOT, timeout=120)
  assert (result.returncode, result.stderr) == (2, f'error: {error}\n')
  assert not (tmp_path / 'run').exists()


def test_a_section_set_to_none_is_named_as_lacking_its_fields():
  # ml_collections takes None for a section (`config.sparsity = None`, as
  # if for a dense run), which has none of the section's fields.
  config = tiny.get_config()
  config.sparsity = None
  with pytest.raises(ValueError, match=r'^the config lacks sparsity\.\*: '
                     r'build it on sparse_gpt2\.defaults\.base\(\)$'):
    defaults.check_fields(config)


@pytest.mark.parametrize('command', [
    ['sparse_gpt2.plan', '--topology=cpu:1'],
    ['sparse_gpt2.convert', '--from_hf=nowhere', '--to_run=run'],
])
def test_plan_and_convert_refuse_a_misspelt_field_as_main_does(
    tmp_path, command):
  # Checked where every config file flag is parsed: `plan` planned the run
  # with the field ignored, `convert` made a run of it.
  (tmp_path / 'mine.py').write_text(
      'from configs import tiny\n\ndef get_config():\n'
      '  config = tiny.get_config()\n  config.sparsity.densty = 0.05\n'
      '  return config\n')
  result = subprocess.run(
      [sys.executable, '-m', *command, f'--config={tmp_path / "mine.py"}'],
      capture_output=True, text=True, cwd=tmp_path,
      env={**os.environ, 'PYTHONPATH': ROOT}, timeout=120)
  assert (result.returncode, result.stderr) == (
      2, 'error: no such config field: sparsity.densty (every field is in '
      'sparse_gpt2/defaults.py)\n')
  assert not (tmp_path / 'run').exists()


def test_main_reads_a_config_file_under_home_named_with_a_tilde(tmp_path):
  # The shell leaves `~` as it is after `=`: the file was refused as missing.
  (tmp_path / 'mine.py').write_text(
      'from configs import tiny\n\ndef get_config():\n'
      '  config = tiny.get_config()\n  config.train_step = 1\n'
      '  return config\n')
  result = subprocess.run(
      [sys.executable, '-m', 'sparse_gpt2.main', '--config=~/mine.py',
       f'--workdir={tmp_path / "run"}'], capture_output=True, text=True,
      cwd=ROOT, env={**os.environ, 'HOME': str(tmp_path)}, timeout=120)
  assert (result.returncode, result.stderr) == (
      2, 'error: no such config field: train_step (every field is in '
      'sparse_gpt2/defaults.py)\n')


def test_main_refuses_a_config_file_whose_path_holds_a_colon(tmp_path):
  # config_flags reads all after the first `:` as the config's argument:
  # the file was refused as "No such file or directory: '.../a'", a path
  # the user never gave.
  folder = tmp_path / 'a:b'
  folder.mkdir()
  (folder / 'mine.py').write_text(
      'from configs import tiny\n\ndef get_config(arg=None):\n'
      '  return tiny.get_config(arg)\n')
  result = subprocess.run(
      [sys.executable, '-m', 'sparse_gpt2.main',
       f'--config={folder / "mine.py"}:static',
       f'--workdir={tmp_path / "run"}'], capture_output=True, text=True,
      cwd=ROOT, timeout=120)
  assert (result.returncode, result.stderr) == (
      2, f'error: --config={folder / "mine.py"}:static: a \':\' ends a '
      "config file's path (what follows is the config's argument, "
      f'file.py:arg), so {folder / "mine.py"} cannot be given: move or '
      'link it to a path without one\n')
  assert not (tmp_path / 'run').exists()


def test_tiny_refuses_an_unknown_argument_as_it_loads(tmp_path):
  # As sparse_medium's does: it was refused only as the run began, exit 1.
  result = subprocess.run(
      [sys.executable, '-m', 'sparse_gpt2.main',
       '--config=configs/tiny.py:sttic', f'--workdir={tmp_path / "run"}'], capture_output=True, text=True,
      cwd=ROOT, timeout=120)
  assert (result.returncode, result.stderr) == (
      2, 'error: flag --config=configs/tiny.py:sttic: Error whilst parsing '
      "config file: ValueError: tiny: unknown arg 'sttic'; known: 'topk', "
      "'static', 'none'\n")
  assert not (tmp_path / 'run').exists()


def _example(cwd, *args):
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, 'examples', 'cls_self_task.py'),
       *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_the_example_writes_its_task_file_and_again_over_its_own(tmp_path):
  for _ in range(2):  # The same file again loses nothing.
    result = _example(tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (
        0, '600 datapoints of cls_self -> cls_self.jsonl\n', '')
  lines = (tmp_path / 'cls_self.jsonl').read_text().splitlines()
  assert len(lines) == 600
  assert {tuple(sorted(json.loads(l))) for l in lines} == {
      ('correct', 'incorrect', 'pair', 'prompt')}


@pytest.mark.parametrize('args, error', [
    # A second path was ignored; a name without .jsonl made a file that
    # --task_file refuses.
    (['a.jsonl', 'b.jsonl'],
     "expected at most one .jsonl path, got ['a.jsonl', 'b.jsonl']"),
    (['cls_self'], "expected at most one .jsonl path, got ['cls_self']"),
    # Written over: a run's metrics were lost.
    (['metrics.jsonl'], 'metrics.jsonl exists and holds other datapoints or '
     'records: name a new file, or remove it first'),
    # A traceback.
    (['no/such/dir/x.jsonl'],
     "[Errno 2] No such file or directory: 'no/such/dir/x.jsonl'"),
])
def test_the_example_refuses_a_path_it_should_not_write_in_one_line(
    tmp_path, args, error):
  metrics = tmp_path / 'metrics.jsonl'
  metrics.write_text('{"step": 10, "loss": 5.0}\n')
  result = _example(tmp_path, *args)
  assert (result.returncode, result.stdout, result.stderr) == (
      1, '', f'error: {error}\n')
  assert metrics.read_text() == '{"step": 10, "loss": 5.0}\n'
  assert sorted(os.listdir(tmp_path)) == ['metrics.jsonl']
