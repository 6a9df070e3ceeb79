"""Tests for the circuit tasks, against a tokenizer trained like the model's."""

import argparse
import collections
import json
import os
import random
import re
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sparse_gpt2.circuits import tasks

N = 200
N_SHORTCUT = 400  # Prompts per task that the shortcut predictors see.
SEQ_LEN = 128


@pytest.fixture(scope='module')
def sample():
  """The texts of 300 standard-library files."""
  root = sysconfig.get_paths()['stdlib']
  files = []
  for d, dirs, names in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in ('site-packages',
                                                   'dist-packages'))
    files += [os.path.join(d, f) for f in sorted(names) if f.endswith('.py')]
  texts = []
  for path in random.Random(0).sample(files, min(300, len(files))):
    with open(path, encoding='utf-8', errors='replace') as f:
      texts.append(f.read())
  return texts


@pytest.fixture(scope='module')
def tokenizer(sample):
  """A 2048-token byte-level BPE on the sample (~2 s).

  The model's tokenizer sees the whole library; a sample is enough to catch
  a candidate that is not one token, or that merges with its prompt.
  """
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(sample, trainers.BpeTrainer(
      vocab_size=2048, special_tokens=['<|endoftext|>'], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


@pytest.fixture(scope='module')
def sample_ids(sample, tokenizer):
  """The ids the tokenizer produces on its own training sample.

  A BPE's vocabulary holds merges that it rarely or never outputs whole, so
  being in the vocabulary is not enough: a candidate must be a token the
  tokenizer makes in code.
  """
  return {i for e in tokenizer.encode_batch(sample) for i in e.ids}


def _shortcut_accuracy(data, feature=None):
  """Accuracy of a rule that ignores what the task is about.

  Fit on the even pairs, scored on the odd ones: per unordered candidate
  pair the majority correct candidate, or with `feature` (of a datapoint)
  the majority correct candidate per feature value, falling back to the
  former on a tie or an unseen value.
  """
  fit = [d for d in data if d['pair'] % 2 == 0]
  test = [d for d in data if d['pair'] % 2]
  by_set = collections.defaultdict(collections.Counter)
  by_feature = collections.defaultdict(collections.Counter)
  for d in fit:
    by_set[frozenset((d['correct'], d['incorrect']))][d['correct']] += 1
    if feature:
      by_feature[feature(d)][d['correct']] += 1

  def predict(d):
    a, b = sorted((d['correct'], d['incorrect']))
    counts = [by_set[frozenset((a, b))]]
    if feature:
      counts.insert(0, by_feature[feature(d)])
    for c in counts:
      if c[a] != c[b]:
        return a if c[a] > c[b] else b
    return a

  return np.mean([predict(d) == d['correct'] for d in test])


def _last_word(d):
  return d['prompt'].split()[-1]


@pytest.mark.parametrize('name', tasks.TASKS)
def test_generate_is_deterministic(name):
  assert tasks.generate(name, N, seed=3) == tasks.generate(name, N, seed=3)
  assert tasks.generate(name, N, seed=3) != tasks.generate(name, N, seed=4)


@pytest.mark.parametrize('name', tasks.TASKS)
def test_generate_makes_contrastive_pairs(name):
  data = tasks.generate(name, N)
  assert len(data) == N
  assert [d['pair'] for d in data] == [i // 2 for i in range(N)]
  for d in data:
    assert set(d) == {'prompt', 'correct', 'incorrect', 'pair'}
    assert all(isinstance(d[k], str) and d[k]
               for k in ('prompt', 'correct', 'incorrect'))
  for a, b in zip(data[::2], data[1::2]):
    assert (a['correct'], a['incorrect']) == (b['incorrect'], b['correct'])
    assert a['prompt'] != b['prompt']
    # The module's promise: a pair's prompts end in the same words, so the
    # answer is in the code that differs, not in the word it ends on.
    assert _last_word(a) == _last_word(b), (a['prompt'], b['prompt'])
  counts = collections.Counter(
      (frozenset((d['correct'], d['incorrect'])), d['correct']) for d in data)
  for (candidates, correct), n in counts.items():
    other, = candidates - {correct}
    assert counts[candidates, other] == n


@pytest.mark.parametrize('name', tasks.TASKS)
def test_no_shortcut_predicts_the_answer(name, tokenizer):
  data = tasks.generate(name, N_SHORTCUT)
  last_token = {d['prompt']: e.ids[-1] for d, e in zip(
      data, tokenizer.encode_batch([d['prompt'] for d in data]))}
  assert _shortcut_accuracy(data) <= 0.6
  assert _shortcut_accuracy(data, _last_word) <= 0.7
  assert _shortcut_accuracy(data, lambda d: last_token[d['prompt']]) <= 0.7


def test_shortcut_accuracy_finds_shortcuts():
  """The predictors above see a shortcut where there is one."""
  data = [{'prompt': f'x = {i} {word}', 'correct': correct,
           'incorrect': incorrect, 'pair': i}
          for i in range(N_SHORTCUT // 2)
          for word, correct, incorrect in (('a', '+', '-'), ('b', '-', '+'))]
  assert _shortcut_accuracy(data) == 0.5
  assert _shortcut_accuracy(data, _last_word) == 1
  assert _shortcut_accuracy([d for d in data if d['correct'] == '+']) == 1


@pytest.mark.parametrize('name', tasks.TASKS)
def test_candidates_are_tokens_the_tokenizer_makes(name, tokenizer,
                                                    sample_ids):
  for c in {d['correct'] for d in tasks.generate(name, N)}:
    ids = tokenizer.encode(c).ids
    assert len(ids) == 1 and ids[0] in sample_ids, (c, ids)


def test_the_example_user_task_is_well_posed(tmp_path, tokenizer, sample_ids):
  """examples/cls_self_task.py's file, read as a user task, passes the
  built-in tasks' checks: contrastive pairs that differ in the decorator
  alone, no shortcut, candidates the tokenizer makes."""
  path = tmp_path / 'cls_self.jsonl'
  subprocess.run([sys.executable, 'examples/cls_self_task.py', str(path)],
                 check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  data = tasks.load_jsonl(path)
  assert len(data) == 600
  for a, b in zip(data[::2], data[1::2]):
    assert a['pair'] == b['pair']
    assert (a['correct'], a['incorrect']) == (b['incorrect'], b['correct'])
    assert a['prompt'].replace('@classmethod', '@property') == b['prompt']
  assert _shortcut_accuracy(data) <= 0.6
  assert _shortcut_accuracy(data, _last_word) <= 0.7
  for c in ('cls', 'self'):
    ids = tokenizer.encode(c).ids
    assert len(ids) == 1 and ids[0] in sample_ids, (c, ids)


def test_while_return_true_returns_the_incorrect_answer_in_the_loop():
  """The loop's early `return X` is the incorrect candidate: after the
  loop comes the other constant, never the one the loop already returns."""
  for d in tasks.generate('while_return_true', N):
    early = d['incorrect'].strip()
    assert f'            return {early}\n' in d['prompt'], d
    assert f'return {d["correct"].strip()}' not in d['prompt'], d
    assert d['prompt'].endswith('\n    return')


def test_final_kwarg_s_caller_is_not_named_as_its_callee():
  """The function that makes the call is never named as the one it calls:
  its def would rebind the name, so the call would reach the caller itself,
  whose parameters are not the signature the answer is read from (seed 1
  drew one in pair 926, one pair in about 3,000)."""
  for d in tasks.generate('final_kwarg', 1854, seed=1):
    callee, caller = re.findall(r'^def (\w+)\(', d['prompt'], re.M)
    assert caller != callee, d['prompt']


def _still_open(text):
  """The brackets of `text` left open, innermost last."""
  stack = []
  for c in text:
    if c in '([{':
      stack.append(c)
    elif c in ')]}':
      stack.pop()
  return stack


def _with_as(prompt, last, _):
  writes = any(w in last for w in ('write', 'dump', 'print'))
  alias = next(a for opener, a in re.findall(r'(\w+\([^)]*\)) as (\w+)',
                                             prompt)
               if ("'w'" in opener) == writes)
  return ' ' * last.endswith((' in', ',')) + alias


def _final_kwarg(prompt, last, _):
  signature = prompt.split('\n')[0]
  keywords = signature.count(',') - ('*' in signature)
  return ')' if last.count('=') - last.count(' = ') == keywords else ','


def _else_elif(prompt, *_):
  """` elif` where the last line at the keyword's indent is an `if` or an
  `elif`."""
  indent = len(prompt.split('\n')[-1]) + 1
  header = [l.strip() for l in prompt.split('\n')
            if l.strip() and len(l) - len(l.lstrip(' ')) == indent][-1]
  return ' elif' if header.startswith(('if ', 'elif ')) else ' else'


def _enumerate_range(prompt, _, candidates):
  """The sequence (the longer name) after `range`, its element after
  `enumerate`."""
  loop = [l for l in prompt.split('\n') if 'for ' in l][-1]
  return sorted(candidates, key=len)['range(' in loop]


def _var_if(prompt, _, candidates):
  """The name the prompt's last function assigns."""
  body = prompt.rsplit('\ndef ', 1)[1]
  return next(c for c in candidates if f'\n    {c.strip()} = ' in body)


def _quote_or_brace(_, last, __):
  if _still_open(last)[-1:] == ['{']:
    return '}'
  return re.search('f([\'"])', last)[1]


# Each task's correct candidate as its docstring decides it from the prompt,
# written apart from the generator: (prompt, its last line stripped, the
# two candidates) -> the correct candidate or, where a candidate holds what
# follows it (`')`, `])`), its start.
_ANSWERS = {
    'single_double_quote': lambda p, s, _: next(
        q for q in '\'"' if s.count(q) % 2),
    'bracket_counting': lambda p, s, _: ')' * len(_still_open(s)),
    'set_or_string': lambda p, s, _: '.' if f'    {s} = set()' in p else ' +=',
    'final_kwarg': _final_kwarg,
    'class_init': lambda p, s, _: ' ' + s[len('self.'):-len(' =')].lstrip('_'),
    'with_as': _with_as,
    'bracket_brace': lambda p, s, _: {'[': ']', '{': '}'}[
        [c for c in _still_open(s) if c != '('][-1]],
    'with_open': lambda p, s, _: 'r' if re.match(r'def _?([a-z]+)_', p)[1] in (
        'read', 'load', 'parse', 'restore', 'fetch', 'scan', 'import', 'get'
    ) else 'w',
    'for_while': lambda p, s, _: ' in' if s.startswith('for ') else ':',
    'else_elif': _else_elif,
    'fstring_brace': _quote_or_brace,
    'if_ternary': lambda p, s, _: (
        ':' if s.startswith(('if ', 'elif ', 'while ')) else ' else'),
    'var_swap': lambda p, s, _: re.split(r'[\[.]', s.split(', ')[0])[-1].rstrip(
        ']'),
    'indent_for': lambda p, s, _: '\n' + ' ' * (
        len(p.split('\n')[-1]) - len(s) + 3),
    'lambda_func': lambda p, s, _: ':' if 'lambda ' in s else '):',
    'if_equals': lambda p, s, _: ' ==' if ' ' in s else ' =',
    'enumerate_range': _enumerate_range,
    'var_if': _var_if,
    'while_return_true': lambda p, s, _: (
        ' False' if '            return True\n' in p else ' True'),
}
_ANSWERS['set_or_string_fixedvarname'] = _ANSWERS['set_or_string']


@pytest.mark.parametrize('name', tasks.TASKS)
def test_each_answer_is_the_one_its_prompt_decides(name):
  """The correct candidate is the one the task's rule reads from the
  prompt, the rule written here apart from the generator: one that labels
  its pairs the wrong way round passes every check above, as its pairs stay
  contrastive and balanced."""
  for d in tasks.generate(name, N):
    last = d['prompt'].split('\n')[-1].strip()
    answer = _ANSWERS[name](d['prompt'], last,
                            (d['correct'], d['incorrect']))
    assert d['correct'] == answer or (
        d['correct'].startswith(answer)
        and not d['incorrect'].startswith(answer)), (d, answer)


def test_generate_rejects_odd_n():
  with pytest.raises(ValueError, match='odd'):
    tasks.generate('var_if', 5)


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
  assert len(enc['index']) >= 0.95 * N
  for r, i in enumerate(enc['index']):
    ids = tokenizer.encode(data[i]['prompt']).ids[-SEQ_LEN:]
    assert enc['lengths'][r] == len(ids)
    assert enc['tokens'][r, :len(ids)].tolist() == ids
    assert not enc['tokens'][r, len(ids):].any()
    assert tokenizer.encode(data[i]['correct']).ids == [enc['correct'][r]]
    assert tokenizer.encode(data[i]['incorrect']).ids == [enc['incorrect'][r]]
  assert (enc['correct'] != enc['incorrect']).all()
  assert enc['tokens'].dtype == np.int32
  tasks.check_balanced(enc, name)  # Even where this tokenizer skips some.
  pairs = [data[i]['pair'] for i in enc['index']]
  assert (np.equal.outer(pairs, pairs) ==
          np.equal.outer(enc['pair'], enc['pair'])).all()


def test_generate_unknown_task():
  with pytest.raises(ValueError, match="^Unknown task 'no_such_task'; known "
                     'tasks: single_double_quote, bracket_counting'):
    tasks.generate('no_such_task', 4)


def test_load_jsonl_round_trip(tmp_path):
  data = tasks.generate('else_elif', 10) + [
      {'prompt': 'x = "a  ', 'correct': '"', 'incorrect': "'"},
      {'prompt': 'x = (1', 'correct': ')', 'incorrect': ']', 'pair': 'a'}]
  path = tmp_path / 'task.jsonl'
  lines = [json.dumps(d) for d in data]
  lines[0] = json.dumps(dict(data[0], note='dropped'))
  path.write_text('\n'.join(lines) + '\n\n')
  assert tasks.load_jsonl(path) == data
  path.write_text('\ufeff' + '\r\n'.join(lines), encoding='utf-8')
  assert tasks.load_jsonl(path) == data  # A byte order mark, CRLF lines.
  path.write_bytes('\n'.join(lines).encode('latin-1', 'replace') + b'\xe9')
  with pytest.raises(ValueError, match=rf'^{path}: not UTF-8 \('):
    tasks.load_jsonl(path)


def test_check_balanced_refuses_a_fixed_preference(tokenizer):
  """A task that always answers ',' (or does 4 times in 6) is refused: the
  calibration's shift alone would score it. Both answers half the time, or
  at the bound (3 of 5), pass."""
  def encoded(answers):
    return tasks.encode(
        [{'prompt': f'x = {i}', 'correct': c, 'incorrect': ',)'.strip(c)}
         for i, c in enumerate(answers)], tokenizer, SEQ_LEN)
  for answers, share in ((',,,,,,', 100), (',,,,))', 67), ('))))))', 100),
                         (')),))))', 86)):
    with pytest.raises(ValueError, match=r'^t: a fixed preference .* '
                       rf'answers {share}% of the datapoints'):
      tasks.check_balanced(encoded(answers), 't')
  for answers in (',),),)', ',,,)))', ',,,))'):
    tasks.check_balanced(encoded(answers), 't')
  # Two pairs of candidates, each answered one way, half of all answers the
  # one of lower token id: a prior between each pair's two answers them all.
  def ids(c):
    return tokenizer.encode(c).ids[0]
  lower_first = ids(',') < ids(')')
  right, wrong = (':', ';') if (ids(':') < ids(';')) != lower_first else (
      ';', ':')
  data = [{'prompt': f'x = {i}', 'correct': ',', 'incorrect': ')'}
          for i in range(6)]
  data += [{'prompt': f'y = {i}', 'correct': right, 'incorrect': wrong}
           for i in range(6)]
  enc = tasks.encode(data, tokenizer, SEQ_LEN)
  assert np.mean(enc['correct'] < enc['incorrect']) == 0.5
  with pytest.raises(ValueError, match=r'^t: a fixed preference .* answers '
                     r'100% of the datapoints'):
    tasks.check_balanced(enc, 't')
  for i in (0, 1, 2, -1, -2, -3):  # Each pair's answers half each way.
    data[i] = {**data[i], 'correct': data[i]['incorrect'],
               'incorrect': data[i]['correct']}
  tasks.check_balanced(tasks.encode(data, tokenizer, SEQ_LEN), 't')


def test_a_share_just_past_the_bound_is_not_said_to_be_the_bound():
  """121 answers of 200 one way (60.5%) are refused, and were said to be
  60%, "keep it within 60%" beside it: past the bound by less than the
  rounding, the share is said to be more than it."""
  encoded = {'correct': np.array([1] * 121 + [2] * 79),
             'incorrect': np.array([2] * 121 + [1] * 79)}
  with pytest.raises(ValueError, match=r'^t: a fixed preference .* answers '
                     r'more than 60% of the datapoints, .* within 60% by'):
    tasks.check_balanced(encoded, 't')
  encoded['correct'][:3], encoded['incorrect'][:3] = 2, 1  # 118 of 200.
  tasks.check_balanced(encoded, 't')

def test_encode_says_how_many_prompts_it_cuts(tokenizer, caplog):
  data = [{'prompt': 'x = 1\n' * n + 'y = (1', 'correct': ')',
           'incorrect': ']'} for n in (1, 40, 50)]
  enc = tasks.encode(data, tokenizer, SEQ_LEN, 'long')
  assert (enc['lengths'] == [len(tokenizer.encode(data[0]['prompt']).ids),
                             SEQ_LEN, SEQ_LEN]).all()
  assert ('long: 2 of 3 prompts are longer than 128 tokens and keep their '
          'last 128.') in caplog.text
  caplog.clear()  # A prompt of exactly seq_len tokens is whole.
  tasks.encode(data[:1], tokenizer, int(enc['lengths'][0]), 'whole')
  assert 'whole' not in caplog.text


def test_encode_refuses_prompts_that_read_the_same_with_answers_swapped(
    tokenizer):
  """A pair that differs only before the last SEQ_LEN tokens is cut into
  one prompt with both answers; so is a plain contradiction."""
  tail = 'x = 1\n' * 60 + 'y = (1'
  pair = [{'prompt': f'# {head}\n' + tail, 'correct': c, 'incorrect': i}
          for head, c, i in (('round', ')', ']'), ('square', ']', ')'))]
  fine = {'prompt': 'z = [1', 'correct': ']', 'incorrect': ')'}
  with pytest.raises(ValueError) as refused:
    tasks.encode([fine, *pair], tokenizer, SEQ_LEN, 'cut')
  assert str(refused.value) == (
      'cut: 1 datapoint(s) read the same prompt as one with the answers '
      'swapped (first: datapoints 2 and 3, counting from 1), prompts keeping '
      'their last 128 tokens: no model answers both.')
  swapped = dict(fine, correct=')', incorrect=']')
  with pytest.raises(ValueError, match=r'^short: 1 datapoint\(s\) .* '
                     r'datapoints 1 and 3, counting from 1\): no model'):
    tasks.encode([fine, pair[0], swapped], tokenizer, SEQ_LEN, 'short')
  # Three answers round a cycle on one prompt (] over ), ) over }, } over ]),
  # each pair of them consistent.
  cycle = [dict(fine, correct=c, incorrect=i)
           for c, i in ((']', ')'), (')', '}'), ('}', ']'))]
  with pytest.raises(ValueError) as refused:
    tasks.encode([pair[0], *cycle], tokenizer, SEQ_LEN, 'cycle')
  assert str(refused.value) == (
      'cycle: 1 datapoint(s) read the same prompt as others and with them '
      'prefer each answer to the next round a cycle (first: datapoints 2, 3 '
      'and 4, counting from 1): no model answers all of them.')
  assert tasks.encode(cycle[:2] + [dict(fine, correct=']', incorrect='}')],
                      tokenizer, SEQ_LEN)['pair'].size == 3  # In order.
  # Uncut, the pair is two prompts; a repeated datapoint is no clash.
  assert tasks.encode([*pair, fine, fine], tokenizer, 256)['pair'].size == 4


def test_encode_numbers_pairs(tokenizer):
  groups = ['a', 7, None, 'a', 7, None, 'b', '7']
  data = [{'prompt': f'x = {i}', 'correct': ',', 'incorrect': ')'}
          for i in range(len(groups))]
  for d, g in zip(data, groups):
    if g is not None:
      d['pair'] = g
  enc = tasks.encode(data, tokenizer, SEQ_LEN)
  assert enc['pair'].dtype == np.int32
  assert enc['pair'].tolist() == [0, 1, 2, 0, 1, 3, 4, 5]


def test_encode_joins_groups_that_share_a_prompt(tokenizer):
  """A prompt in two groups would be trained on in one split and tested in
  another: its groups become one, and so do two unpaired copies."""
  rows = [('a', 0), ('a', 1), ('b', 2), ('b', 0), (None, 4), (None, 4),
          ('c', 6), ('c', 7)]
  data = []
  for g, i in rows:
    data.append({'prompt': f'x = {i}', 'correct': ',', 'incorrect': ')'})
    if g is not None:
      data[-1]['pair'] = g
  enc = tasks.encode(data, tokenizer, SEQ_LEN)
  assert enc['pair'].tolist() == [0, 0, 0, 0, 1, 1, 2, 2]


def test_encode_says_how_many_groups_shared_prompts_join(tokenizer, caplog):
  """40 pairs on 3 prompts split as 3 groups, and a task refused for too
  few pairs must say why it has fewer than it wrote; none joined, no
  word."""
  data = [{'prompt': f'x = {q}{("name", "value", "path")[i % 3]}',
           'correct': q, 'incorrect': other, 'pair': i}
          for i in range(40) for q, other in (("'", '"'), ('"', "'"))]
  assert len(set(tasks.encode(data, tokenizer, SEQ_LEN, 'few')['pair'])) == 3
  assert ('few: its 40 groups (pairs, or unpaired prompts) are 3: groups '
          'that share a prompt are one, so that no prompt is both trained '
          'on and tested.') in caplog.text
  caplog.clear()
  tasks.encode(tasks.generate('var_if', 64), tokenizer, SEQ_LEN, 'var_if')
  assert 'var_if: its' not in caplog.text


def test_load_jsonl_names_the_keys_it_ignores(tmp_path, caplog):
  """A misspelt "pair" is dropped with a warning, never silently."""
  path = tmp_path / 'task.jsonl'
  path.write_text(
      '{"prompt": "a", "correct": "b", "incorrect": "c", "Pair": 1}\n'
      '{"prompt": "d", "correct": "c", "incorrect": "b", "pair": 1, "id": 7}\n')
  data = tasks.load_jsonl(path)
  assert [sorted(d) for d in data] == [
      ['correct', 'incorrect', 'prompt'],
      ['correct', 'incorrect', 'pair', 'prompt']]
  assert (f"{path}: ignored key(s) 'Pair', 'id'; a task file reads only "
          'correct, incorrect, pair, prompt.') in caplog.text


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
    ('{"prompt": "a", "correct": "b", "incorrect": "c", "pair": 1.5}',
     ':1: pair must be'),
    ('{"prompt": "a", "correct": "b", "incorrect": "c", "pair": true}',
     ':1: pair must be'),
    ('{"prompt": "x = \\ud800", "correct": "b", "incorrect": "c"}',
     r':1: prompt is not valid Unicode \(a lone surrogate escape\)'),
    ('{"prompt": "a", "correct": "\\udc80", "incorrect": "c"}',
     ':1: correct is not valid Unicode'),
])
def test_load_jsonl_errors(tmp_path, text, match):
  path = tmp_path / 'task.jsonl'
  path.write_text(text)
  with pytest.raises(ValueError, match=match):
    tasks.load_jsonl(path)


def test_load_jsonl_names_the_line_of_json_python_cannot_read(tmp_path):
  """JSON that Python's reader refuses other than as a decoding error is
  refused in one line naming its line too: an integer past Python's 4,300
  digits was a ValueError naming neither file nor line, arrays nested past
  the recursion limit a RecursionError, a traceback."""
  path = tmp_path / 'task.jsonl'
  fine = '{"prompt": "a", "correct": "b", "incorrect": "c"}\n'
  big = fine.replace('}', ', "pair": ' + '1' * 5000 + '}')
  for text, line, why in ((fine + big, 2, 'Exceeds the limit'),
                          (fine + fine + '[' * 100000, 3, 'maximum recursion')):
    path.write_text(text)
    with pytest.raises(ValueError, match=rf'^{re.escape(str(path))}:{line}: '
                       rf'not JSON that Python reads \({why}'):
      tasks.load_jsonl(path)


def test_encode_rejects_multi_token_candidate(tokenizer):
  data = [{'prompt': 'x = 1', 'correct': ' zqxjvkw', 'incorrect': ','}]
  with pytest.raises(ValueError, match="my_task: candidate ' zqxjvkw'"):
    tasks.encode(data, tokenizer, SEQ_LEN, 'my_task')


def test_encode_rejects_padding_in_prompt_or_candidate(tokenizer):
  data = [{'prompt': '<|endoftext|>x = 1', 'correct': ',', 'incorrect': ')'}]
  with pytest.raises(ValueError, match='padding'):
    tasks.encode(data, tokenizer, SEQ_LEN)
  data = [{'prompt': 'x = 1', 'correct': ',', 'incorrect': '<|endoftext|>'}]
  with pytest.raises(ValueError, match=r"^mine: candidate '<\|endoftext\|>' "
                     r'is tokens \[0\], not one non-padding token\.$'):
    tasks.encode(data, tokenizer, SEQ_LEN, 'mine')


def test_encode_skips_candidates_that_merge(tokenizer):
  merging = {'prompt': 'def f():\n    retur', 'correct': 'n', 'incorrect': 'x'}
  fine = {'prompt': 'def f():\n    return x', 'correct': ',',
          'incorrect': ')'}
  enc = tasks.encode([merging, fine], tokenizer, SEQ_LEN)
  assert enc['index'].tolist() == [1]
  # Only the incorrect candidate merges: skipped all the same, as the model
  # would be scored on a token that never follows this prompt.
  wrong_merges = dict(merging, correct='(', incorrect='n')
  assert tokenizer.encode(wrong_merges['prompt'] + '(').ids == (
      tokenizer.encode(wrong_merges['prompt']).ids + tokenizer.encode('(').ids)
  enc = tasks.encode([fine, wrong_merges], tokenizer, SEQ_LEN)
  assert enc['index'].tolist() == [0]
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
  # A tie is no answer: a model whose logits are all equal is at chance.
  loss, accuracy = tasks.task_loss(np.zeros((2, 11)), correct[:2],
                                   incorrect[:2])
  assert accuracy == 0
  np.testing.assert_allclose(loss, np.log(2), rtol=1e-6)


@pytest.mark.parametrize('flag', ['--task', '--task_file'])
def test_cli_refuses_a_task_file_named_like_a_built_in_task(flag, tmp_path):
  """An edited dump of for_while, given by either flag, would replace the
  built-in task's circuit in RUN/circuits/for_while: refused before the run
  is read (it does not exist here) unless --out is given."""
  result = subprocess.run(
      [sys.executable, '-m', 'sparse_gpt2.circuits',
       f'--workdir={tmp_path / "no_run"}', f'{flag}=for_while.jsonl'],
      capture_output=True, text=True, timeout=120,
      cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode == 1, result.stderr
  assert result.stderr.strip().splitlines() == [
      f'error: {flag}=for_while.jsonl is named like the built-in task '
      f'for_while, whose circuit is {tmp_path}/no_run/circuits/for_while: '
      'pass --out or rename the file']


def test_too_few_pairs_tells_a_task_file_nothing_of_num_prompts(
    tokenizer, monkeypatch):
  """An edited dump of for_while keeps its name but is used whole: raising
  --num_prompts, which only a built-in task reads, would not help it."""
  from sparse_gpt2.circuits import runs  # pylint: disable=g-import-not-at-top
  from sparse_gpt2.circuits import settings  # pylint: disable=g-import-not-at-top
  encoded = tasks.encode(tasks.generate('for_while', 8), tokenizer, SEQ_LEN)
  monkeypatch.setattr(runs, 'encode_task',
                      lambda _, task, *a: (runs.task_name(task), [], encoded))
  for task, hint in (('for_while', True), ('edited/for_while.jsonl', False)):
    for check in (
        lambda: runs.find_circuit('no_run', settings.Settings(), task=task),
        lambda: runs.evaluate_tasks('no_run', [task], num_prompts=8,
                                    steps=[None])):
      with pytest.raises(ValueError, match='^for_while: ') as refused:
        check()
      assert str(refused.value).endswith(
          ' (built in: raise --num_prompts)') == hint, refused.value


def test_a_built_in_task_s_prompts_are_those_of_the_seed():
  """--seed draws a built-in task's prompts, as it does the splits."""
  from sparse_gpt2.circuits import runs  # pylint: disable=g-import-not-at-top
  for seed in (0, 1):
    assert runs.task_datapoints('var_if', 4, seed) == (
        'var_if', tasks.generate('var_if', 4, seed))


def test_a_contradiction_in_a_task_file_is_named_by_its_lines(
    tokenizer, tmp_path, monkeypatch):
  """The refusal of two datapoints that read the same prompt with the
  answers swapped names them by the lines an editor shows: numbered as
  datapoints, they missed every blank line above them."""
  from sparse_gpt2.circuits import runs  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(runs, '_corpus', lambda _: argparse.Namespace(
      tokenizer=tokenizer))
  monkeypatch.setattr(runs, '_config', lambda _: argparse.Namespace(
      seq_len=SEQ_LEN))
  fine = {'prompt': 'z = [1', 'correct': ']', 'incorrect': ')'}
  clash = {'prompt': 'y = (1', 'correct': ')', 'incorrect': ']'}
  swapped = dict(clash, correct=']', incorrect=')')
  path = tmp_path / 'mine.jsonl'
  path.write_text('\ufeff\n' + '\n\n'.join(
      json.dumps(d) for d in (fine, clash, fine, swapped)) + '\n')
  with pytest.raises(ValueError) as refused:
    runs.encode_task('no_run', str(path), 0, 0)
  assert str(refused.value) == (
      'mine: 1 datapoint(s) read the same prompt as one with the answers '
      'swapped (first: lines 4 and 8 of the task file): no model answers '
      'both.')


def test_dump_prompts_overwrites_no_other_file(tmp_path):
  """--dump_prompts pointed at a run's metrics.jsonl, or at a dump since
  edited into a task of its own, replaced it: refused, the file as it was.
  The same dump again is written. One that a full disk stops leaves no file
  (half of one was then refused as other datapoints)."""
  def dump(path, num_prompts=4, disk_full=False):
    # A disk full at 4 KiB a file: a file size limit, its signal ignored
    # (EFBIG instead), set by a shell (a preexec_fn forks this process's
    # threads).
    limit = ['bash', '-c', 'ulimit -f 4; trap "" XFSZ; exec "$@"', '-']
    return subprocess.run(
        [*limit * disk_full, sys.executable, '-m', 'sparse_gpt2.circuits',
         '--task=for_while', f'--num_prompts={num_prompts}',
         f'--dump_prompts={path}'],
        capture_output=True, text=True, timeout=120,
        cwd=os.path.dirname(os.path.dirname(__file__)))
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'config.json').write_text('{}')
  metrics = tmp_path / 'run' / 'metrics.jsonl'
  metrics.write_text('{"step": 100, "val_loss": 3.2}\n')
  mine = tmp_path / 'for_while.jsonl'
  assert dump(mine).returncode == 0
  assert dump(mine).returncode == 0  # The same dump again.
  assert tasks.load_jsonl(mine) == tasks.generate('for_while', 4)
  edited = mine.read_text().replace(' in', ' of', 1)
  mine.write_text(edited)
  for path, kept in ((metrics, '{"step": 100, "val_loss": 3.2}\n'),
                     (mine, edited)):
    result = dump(path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f'error: --dump_prompts={path} exists and holds other datapoints or '
        'records: name a new file, or remove it first']
    assert path.read_text() == kept
  stopped = tmp_path / 'stopped.jsonl'
  result = dump(stopped, num_prompts=200, disk_full=True)
  assert result.returncode != 0 and 'File too large' in result.stderr
  assert sorted(os.listdir(tmp_path)) == ['for_while.jsonl', 'run']


def test_cli_refuses_an_out_inside_the_run_s_checkpoints(tmp_path):
  """--out=RUN/checkpoints/30 made a folder that every later command, and
  the run's resumption, read as a damaged checkpoint at step 30 (and one
  in a kept checkpoint changed its digest): refused before the run is
  read, as compare refuses it, and nothing is made."""
  run = tmp_path / 'run'
  (run / 'checkpoints' / '20').mkdir(parents=True)
  for out in (run / 'checkpoints' / '30', run / 'checkpoints' / '20' / 'q'):
    result = subprocess.run(
        [sys.executable, '-m', 'sparse_gpt2.circuits', f'--workdir={run}',
         '--task=for_while', f'--out={out}'],
        capture_output=True, text=True, timeout=120,
        cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f'error: --out {out} is inside the checkpoints of {run}: give a '
        'folder of its own']
    assert not out.exists()


def test_a_candidate_that_whitespace_makes_two_tokens_is_told_so(tokenizer):
  """An answer is read as written (indent_for's are whitespace alone, and
  kept): one pasted with a trailing space or newline is refused as two
  tokens, and the refusal says that its whitespace is what makes them."""
  fine = {'prompt': 'x = 1', 'correct': ',', 'incorrect': ')'}
  for candidate in ('True ', ' True\n'):
    with pytest.raises(ValueError) as refused:
      tasks.encode([fine, dict(fine, correct=candidate)], tokenizer, SEQ_LEN,
                   'mine')
    assert str(refused.value) == (
        f'mine: candidate {candidate!r} is tokens '
        f'{tokenizer.encode(candidate).ids}, not one non-padding token (its '
        "whitespace is part of it: 'True' alone is one token).")
  with pytest.raises(ValueError, match=r"^mine: candidate ' zqxjvkw' is "
                     r'tokens \[[\d, ]+\], not one non-padding token\.$'):
    tasks.encode([dict(fine, correct=' zqxjvkw')], tokenizer, SEQ_LEN, 'mine')
  assert tasks.encode([dict(fine, correct='\n', incorrect=' ')], tokenizer,
                      SEQ_LEN)['correct'].tolist() == (
                          tokenizer.encode('\n').ids)
