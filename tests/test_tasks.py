"""Tests for the circuit tasks, against a tokenizer trained like the model's."""

import json
import os
import random
import sysconfig

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sparse_gpt2.circuits import tasks

N = 200
SEQ_LEN = 128


@pytest.fixture(scope='module')
def tokenizer():
  """A 2048-token byte-level BPE on 300 standard-library files (~2 s).

  The model's tokenizer sees the whole library; a sample is enough to catch
  a candidate that is not one token, or that merges with its prompt.
  """
  root = sysconfig.get_paths()['stdlib']
  files = []
  for d, dirs, names in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in ('site-packages',
                                                   'dist-packages'))
    files += [os.path.join(d, f) for f in sorted(names) if f.endswith('.py')]
  files = random.Random(0).sample(files, min(300, len(files)))

  def texts():
    for path in files:
      with open(path, encoding='utf-8', errors='replace') as f:
        yield f.read()

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts(), trainers.BpeTrainer(
      vocab_size=2048, special_tokens=['<|endoftext|>'], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


@pytest.mark.parametrize('name', tasks.TASKS)
def test_generate_is_deterministic(name):
  assert tasks.generate(name, N, seed=3) == tasks.generate(name, N, seed=3)
  assert tasks.generate(name, N, seed=3) != tasks.generate(name, N, seed=4)


@pytest.mark.parametrize('name', tasks.TASKS)
def test_generate_balances_answers(name):
  data = tasks.generate(name, N)
  assert len(data) == N
  for d in data:
    assert set(d) == {'prompt', 'correct', 'incorrect'}
    assert all(isinstance(v, str) and v for v in d.values())
    assert d['correct'] != d['incorrect']
  for role in ('correct', 'incorrect'):
    counts = np.unique([d[role] for d in data], return_counts=True)[1]
    assert len(counts) >= 2 and counts.max() <= N // 2
  if len({d['correct'] for d in data} | {d['incorrect'] for d in data}) == 2:
    assert sum(d['correct'] == data[0]['correct'] for d in data) == N // 2


@pytest.mark.parametrize('name', tasks.TASKS)
def test_prompt_context_is_python(name):
  """All but the prompt's last line compile, once that line is a `pass`."""
  for d in tasks.generate(name, N):
    *context, last = d['prompt'].split('\n')
    indent = len(last) - len(last.lstrip(' ')) + (not last.strip())
    compile('\n'.join(context + [' ' * indent + 'pass']), name, 'exec')


@pytest.mark.parametrize('name', tasks.TASKS)
def test_encode_task(name, tokenizer):
  data = tasks.generate(name, N)
  enc = tasks.encode(data, tokenizer, SEQ_LEN, name)
  assert len(enc['index']) >= 0.9 * N
  for r, i in enumerate(enc['index']):
    ids = tokenizer.encode(data[i]['prompt']).ids[-SEQ_LEN:]
    assert enc['lengths'][r] == len(ids)
    assert enc['tokens'][r, :len(ids)].tolist() == ids
    assert not enc['tokens'][r, len(ids):].any()
    assert tokenizer.encode(data[i]['correct']).ids == [enc['correct'][r]]
    assert tokenizer.encode(data[i]['incorrect']).ids == [enc['incorrect'][r]]
  assert (enc['correct'] != enc['incorrect']).all()
  assert enc['tokens'].dtype == np.int32


def test_generate_unknown_task():
  with pytest.raises(ValueError, match='bracket_counting'):
    tasks.generate('no_such_task', 4)


def test_load_jsonl_round_trip(tmp_path):
  data = tasks.generate('else_elif', 10) + [
      {'prompt': 'x = "a  ', 'correct': '"', 'incorrect': "'"}]
  path = tmp_path / 'task.jsonl'
  path.write_text('\n'.join(json.dumps(d) for d in data) + '\n\n')
  assert tasks.load_jsonl(path) == data


@pytest.mark.parametrize('text, match', [
    ('', 'no datapoints'),
    ('\n  \n', 'no datapoints'),
    ('{"prompt": "a", "correct": "b"}', r':1: missing key\(s\) incorrect'),
    ('{"prompt": "a", "correct": "b", "incorrect": "c"}\n{oops',
     ':2: not JSON'),
    ('["a", "b", "c"]', ':1: expected an object'),
    ('{"prompt": "a", "correct": "b", "incorrect": 3}', 'non-empty strings'),
    ('{"prompt": "a", "correct": "", "incorrect": "c"}', 'non-empty strings'),
    ('{"prompt": "a", "correct": "b", "incorrect": "b"}', 'the same'),
])
def test_load_jsonl_errors(tmp_path, text, match):
  path = tmp_path / 'task.jsonl'
  path.write_text(text)
  with pytest.raises(ValueError, match=match):
    tasks.load_jsonl(path)


def test_encode_rejects_multi_token_candidate(tokenizer):
  data = [{'prompt': 'x = 1', 'correct': ' zqxjvkw', 'incorrect': ','}]
  with pytest.raises(ValueError, match="my_task: candidate ' zqxjvkw'"):
    tasks.encode(data, tokenizer, SEQ_LEN, 'my_task')


def test_encode_rejects_padding_in_prompt(tokenizer):
  data = [{'prompt': '<|endoftext|>x = 1', 'correct': ',', 'incorrect': ')'}]
  with pytest.raises(ValueError, match='padding'):
    tasks.encode(data, tokenizer, SEQ_LEN)


def test_encode_skips_candidates_that_merge(tokenizer):
  merging = {'prompt': 'def f():\n    retur', 'correct': 'n', 'incorrect': 'x'}
  fine = {'prompt': 'def f():\n    return x', 'correct': ',',
          'incorrect': ')'}
  enc = tasks.encode([merging, fine], tokenizer, SEQ_LEN)
  assert enc['index'].tolist() == [1]
  with pytest.raises(ValueError, match='merges'):
    tasks.encode([merging], tokenizer, SEQ_LEN)


def test_encode_keeps_the_end_of_long_prompts(tokenizer):
  data = [{'prompt': 'x = [' + ', '.join(map(str, range(50))),
           'correct': ']', 'incorrect': '}'}]
  enc = tasks.encode(data, tokenizer, 8)
  ids = tokenizer.encode(data[0]['prompt']).ids
  assert len(ids) > 8
  assert enc['lengths'].tolist() == [8]
  assert enc['tokens'][0].tolist() == ids[-8:]


def test_task_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 11)).astype(np.float32) * 3
  correct = np.array([0, 3, 5, 10, 2, 7])
  incorrect = np.array([1, 4, 6, 9, 8, 0])
  lc = logits[np.arange(6), correct].astype(np.float64)
  li = logits[np.arange(6), incorrect].astype(np.float64)
  loss, accuracy = tasks.task_loss(logits, correct, incorrect)
  np.testing.assert_allclose(loss, np.mean(np.logaddexp(0, li - lc)),
                             rtol=1e-6)
  np.testing.assert_allclose(accuracy, np.mean(lc > li))


def test_last_logits_picks_last_prompt_position():
  logits = np.arange(3 * 5 * 7, dtype=np.float32).reshape(3, 5, 7)
  lengths = np.array([1, 5, 3])
  np.testing.assert_array_equal(
      tasks.last_logits(logits, lengths),
      np.stack([logits[0, 0], logits[1, 4], logits[2, 2]]))
