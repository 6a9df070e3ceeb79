r"""Binary next-token tasks on Python code, for finding circuits.

A datapoint is `{"prompt", "correct", "incorrect", "pair"}`: the model sees
the prompt and should put more logit on `correct` than on `incorrect` at the
last prompt position (Gao et al. 2025, "Weight-sparse transformers have
interpretable circuits"). The paper's generators are not public; these are
written from the task descriptions, with the paper's task names.

Datapoints come in contrastive pairs, as in the paper's released task files:
a prompt and a minimally different one whose answer is the other candidate.
A generator `gen(rng, answer)` builds the prompt whose correct candidate is
its task's candidate number `answer`, and `generate` calls it twice with the
same random state, so both members share every choice that does not depend
on the answer. That makes the two classes exactly balanced for every
candidate pair, and leaves the answer to be read from the code that differs:
the prompts of a pair end in the same words, so neither a constant answer
nor the last word or token predicts it (the tests check all three).

Every answer is decidable from its prompt, and the wrong candidate would be
a syntax error (`if x` then ` =`), fail at run time (`seen = set()` then
`seen +=`) or contradict the code (`return True` after a loop that already
returns True); where it would be legal but odd (a parameter annotation, a
comparison as a statement), the task's docstring says so.

Candidates are single tokens of a small byte-level BPE trained on Python,
the ones it produces at that point (`')` where the string's call closes,
not `'`), and prompts end so that BPE merges nothing across the boundary:
tokenize(prompt + candidate) == tokenize(prompt) + [candidate]. That holds
when the prompt ends in a letter or digit and the candidate starts with
punctuation or a space, or the prompt ends in punctuation and the candidate
starts with a letter or a space; prompts never end in whitespace, except
`else_elif`, whose prompt ends one space short of the indentation, as
byte-level BPE itself splits `\n    else` into `\n   ` and ` else`. `encode`
checks both properties against the actual tokenizer, so a task that a
tokenizer cannot represent is caught rather than silently scored on the
wrong token.
"""

from collections.abc import Callable
import json
import random

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from sparse_gpt2.circuits import pools
from sparse_gpt2.circuits.pools import pick


def single_double_quote(rng, answer):
  """Close a string with the quote that opened it; other strings distract.

  The pair differs in that quote only. The wrong quote leaves the string
  open to the end of the line, a syntax error. A candidate includes the
  punctuation that follows the string, as BPE merges it with the quote
  (`')`, `':`, `',`, `']`).
  """
  templates = (
      ('raise ValueError(', ')'), ('raise TypeError(', ')'), ('msg = ', ''),
      ('name = ', ''), ('self.assertEqual(result, ', ')'), ('print(', ')'),
      ('warnings.warn(', ', DeprecationWarning)'), ('parser.error(', ')'),
      ('sys.stderr.write(', ')'), ('return ', ''), ('if mode == ', ':'),
      ('headers[', '] = value'), ('self._name = ', ''), ('prefix = ', ''),
      ('logger.debug(', ')'), ('options.setdefault(', ', None)'),
      ('encoding = ', ''), ('raise RuntimeError(', ')'),
  )
  lines, indent, args = pools.function(rng, fillers=(0, 0))
  method = indent == '        '
  for _ in range(rng.randint(0, 3)):
    if rng.random() < 0.5:
      lines.append(pools.statement(rng, indent, args, method))
    else:
      before, after = pick(rng, templates)
      q = pick(rng, pools.QUOTES)
      lines.append(f'{indent}{before}{q}{pools.phrase(rng)}{q}{after}')
      if after == ':':
        lines.append(f'{indent}    return None')
  before, after = pick(rng, templates)
  # Two words at least, so the last word does not hold the quote.
  text = pools.phrase(rng, min_words=2)
  lines.append(f'{indent}{before}{pools.QUOTES[answer]}{text}')
  return pools.datapoint(lines, [q + after[:1] for q in pools.QUOTES], answer)


def bracket_counting(rng, answer):
  """`)` or `))`: how many parentheses are open at the end.

  The paper counts brackets, `]` against `]]`, but `]]` is a marginal merge
  in a 2048-token BPE of the standard library (about the 2000th, and missing
  from most 300-file samples of it), while `))` is a common token and
  parentheses nest the same way. The pair differs by an outer call around
  the same inner one. With one open, `))` is a syntax error. With two open,
  `)` leaves the outer call open where the statement ends, as in
  `len(str(x))`. Closed calls and subscripts in the arguments are
  distractors; the inner call has one at least, so the last word is the
  final argument.
  """
  def closed():
    if rng.random() < 0.4:
      return f'{pick(rng, pools.CALLS)}({pick(rng, pools.ATOMS)})'
    return pick(rng, pools.ATOMS + ('x[0]', 'args[1:]', 'self._items[i]'))

  lines, indent, _ = pools.function(rng)
  outer = pick(rng, pools.CALLS) + '('
  outer += ''.join(closed() + ', ' for _ in range(rng.choice((0, 0, 1, 2))))
  inner = pick(rng, pools.CALLS) + '('
  inner += ''.join(closed() + ', ' for _ in range(rng.choice((1, 1, 2))))
  expr = (outer if answer else '') + inner + pick(rng, pools.ATOMS)
  stmt = pick(rng, ('{} = {}', 'return {1}', 'yield {1}', 'assert {1}',
                    'self._{} = {}', '{} += {}'))
  lines.append(indent + stmt.format(pick(rng, pools.NAMES), expr))
  return pools.datapoint(lines, (')', '))'), answer)


def bracket_brace(rng, answer):
  """`]` or `}`: is the open bracket a list's or a set's?

  The pair differs in that bracket only; closed dicts, sets, subscripts and
  calls before it distract. The wrong bracket does not match the open one,
  a syntax error. Inside a call the candidates are `])` and `})`, the
  tokens BPE makes there. A list or set has two items at least, so the last
  word is not the bracket, and ends in a plain atom, so the candidate does
  not merge with a `)` or `]` before it.
  """
  def kv():
    return ', '.join(
        f'{pools.quoted(rng, pools.KEYS)}: {pick(rng, pools.ATOMS)}'
        for _ in range(rng.randint(1, 3)))

  def element():
    return pick(rng, pools.ATOMS + (
        'x[0]', 'args[1:]', 'self._items[i]', 'frozenset({1, 2})',
        'tuple(args)', 'names[-1]', 'len(data)',
        f'{pick(rng, pools.CALLS)}(x)'))

  seq, item = pick(rng, pools.SEQS)
  lines, indent, _ = pools.function(rng)
  if rng.random() < 0.5:
    lines.append(indent + pick(rng, (
        f'{pick(rng, pools.NAMES)} = {{{kv()}}}',
        f'{pick(rng, pools.NAMES)} = [{pools.atom_list(rng)}]',
        f'{pick(rng, pools.NAMES)} = {{{pools.quoted(rng, pools.KEYS)}: '
        f'[{pools.atom_list(rng)}]}}')))
  items = pick(rng, (
      ''.join(element() + ', ' for _ in range(rng.randint(1, 3)))
      + pick(rng, pools.ATOMS),
      f'{item} for {item} in {seq}',
      f'{item}.strip() for {item} in {seq} if {item}'))
  stmt, close = pick(rng, (
      ('{} = {}', ''), ('return {1}', ''), ('self._{} = {}', ''),
      ('{}.update({}', ')'), ('{}.extend({}', ')'), ('{} = sorted({}', ')'),
      ('{} = frozenset({}', ')'), ('return len({1}', ')')))
  expr = '[{'[answer] + items
  lines.append(indent + stmt.format(pick(rng, pools.NAMES), expr))
  return pools.datapoint(lines, (']' + close, '}' + close), answer)


_ACCUMULATORS = ('result', 'out', 'seen', 'found', 'text', 'buf', 'acc',
                 'names', 'output', 'collected', 'pending', 'chars', 'parts',
                 'visited', 'res', 'words', 'keys', 'data', 'lines', 's')


def _set_or_string(rng, answer, fixed_name):
  seq, item = pick(rng, pools.SEQS)
  var, other = ('x', None) if fixed_name else pick(
      rng, [a for a in _ACCUMULATORS if a not in (seq, item)], 2)
  empty_str = pick(rng, ("''", '""'))
  if other and rng.random() < 0.5:
    other_first = rng.random() < 0.5
    other_used = rng.random() < 0.7
  else:
    other = None
  lines, _, _ = pools.function(rng, [seq], method=False, fillers=(0, 1))
  skip = rng.choice((
      [], [f'        if not {item}:', '            continue'],
      [f'        if {item}.startswith({empty_str[0]}_{empty_str[0]}):',
       '            continue'],
      [f'        {item} = {item}.strip()']))
  is_set = answer == 0
  inits = [f'    {var} = {"set()" if is_set else empty_str}']
  if other:  # A variable of the other type.
    inits.insert(0 if other_first else 1,
                 f'    {other} = {empty_str if is_set else "set()"}')
  lines += inits + [f'    for {item} in {seq}:'] + skip
  if other and other_used:
    lines.append(f'        {other} += {item}' if is_set
                 else f'        {other}.add({item})')
  lines.append(f'        {var}')
  return pools.datapoint(lines, ('.', ' +='), answer)


def set_or_string(rng, answer):
  """`.` (for `.add`) or ` +=`: was the variable made by `set()` or `''`?

  The pair swaps the initialisation. The wrong one fails at run time: a
  set has no `+=` with a string, a string has no `.add`. Names vary and
  half the prompts also build a variable of the other type, so the model
  has to bind the name to its initialisation.
  """
  return _set_or_string(rng, answer, fixed_name=False)


def set_or_string_fixedvarname(rng, answer):
  """`set_or_string` with the variable always named `x` and no distractor."""
  return _set_or_string(rng, answer, fixed_name=True)


def final_kwarg(rng, answer):
  """`)` or `,`: has the call passed every required keyword argument?

  The callee's parameters have no defaults; the pair passes all of them or
  leaves one out, by keyword, in order or shuffled, and ends on the same
  argument. Closing an incomplete call is a TypeError at run time; after a
  complete one, `,` could only be a trailing comma with nothing after it.
  The caller has another name than the callee, whose def it would replace.
  """
  params = pick(rng, pools.NAMES, rng.randint(3, 5))
  first, keywords = params[0], params[1:]
  star = '*, ' if rng.random() < 0.5 else ''
  callee = pools.func_name(rng)
  lines = [f'def {callee}({first}, {star}{", ".join(keywords)}):']
  if rng.random() < 0.5:
    lines.append(f'    """{pick(rng, pools.VERBS).capitalize()} the '
                 f'{pick(rng, pools.NOUNS)} of *{first}*."""')
  lines += [f'    return {first}.{pick(rng, pools.VERBS)}({keywords[0]})',
            '', '']
  caller, _, caller_args = pools.function(rng, method=False, fillers=(0, 1))
  # Named as the callee, the caller's def would rebind the name and the call
  # reach the caller itself; drawn again (both members alike), so a pair
  # that never drew the name is as it was.
  while caller[0].startswith(f'def {callee}('):
    caller, _, caller_args = pools.function(rng, method=False,
                                            fillers=(0, 1))
  lines += caller
  if rng.random() < 0.5:
    rng.shuffle(keywords)
  values = caller_args + list(pools.ATOMS)
  kwargs = [f'{k}={pick(rng, values)}' for k in keywords]
  left_out = rng.randrange(len(kwargs) - 1)
  if answer:
    del kwargs[left_out]
  call = pick(rng, ('return ', 'result = ', f'{pick(rng, pools.NAMES)} = '))
  lines.append(f'    {call}{callee}({pick(rng, caller_args)}, '
               f'{", ".join(kwargs)}')
  return pools.datapoint(lines, (')', ','), answer)


def class_init(rng, answer):
  """In `__init__`, `self.size =` is followed by the parameter ` size`.

  The pair assigns one of two parameters that no earlier line stores, and
  the candidates are those two. Storing the other one is legal but
  contradicts the attribute's name: `__init__` copies each parameter to its
  own attribute.
  """
  params = pick(rng, pools.NAMES, rng.randint(2, 5))
  n_defaults = rng.randint(0, len(params) - 1)
  signature = ', '.join(
      p if i < len(params) - n_defaults else
      f'{p}={pick(rng, ("None", "0", "False", "True", "1", "()", "-1"))}'
      for i, p in enumerate(params))
  base = pick(rng, ('', '', '(object)', f'({pick(rng, pools.CLASSES)})'))
  lines = [f'class {pick(rng, pools.CLASSES)}{base}:']
  if rng.random() < 0.5:
    lines.append(f'    """A {pick(rng, pools.NOUNS)} read from a '
                 f'{pick(rng, pools.NOUNS)}."""')
    lines.append('')
  lines.append(f'    def __init__(self, {signature}):')
  private = '_' if rng.random() < 0.4 else ''
  candidates = pick(rng, params, 2)
  for p in params:
    if p not in candidates and rng.random() < 0.7:
      lines.append(f'        self.{private}{p} = {p}')
    if rng.random() < 0.2:
      attr = pick(rng, [k for k in pools.KEYS if k not in params])
      lines.append(f'        self._{attr} = '
                   f'{pick(rng, ("None", "False", "[]", "{}", "0"))}')
  lines.append(f'        self.{private}{candidates[answer]} =')
  return pools.datapoint(lines, [' ' + p for p in candidates], answer)


def with_as(rng, answer):
  """`with open(src) as f, open(dst, 'w') as g:` reads ` f`, writes ` g`.

  The body's line reads or writes; the pair swaps the two aliases, so the
  same line needs the other name, and the model must bind each alias to the
  mode its file was opened in. The wrong one is a file in the wrong mode,
  io.UnsupportedOperation at run time.
  """
  aliases = pick(rng, (('f', 'g'), ('a', 'b'), ('f', 'file'), ('f', 'h'),
                       ('x', 'y'), ('g', 'h')))
  src, dst = pick(rng, (('path', 'tmp'), ('src', 'dst'), ('infile', 'outfile'),
                        ('source', 'target'), ('filename', 'backup'),
                        ('old', 'new')))
  extra = pick(rng, ('encoding', 'errors', 'data', 'config', 'verbose'),
               rng.randint(0, 2))
  lines, indent, _ = pools.function(rng, [src, dst] + extra)
  reader = pick(rng, ('open({})', "open({}, encoding='utf-8')",
                      "open({}, 'r')", 'tokenize.open({})', 'io.open({})'))
  writer = pick(rng, ("open({}, 'w')", "open({}, 'w', encoding='utf-8')",
                      "open({}, mode='w')", "io.open({}, 'w')"))
  input_first = rng.random() < 0.5
  reads = rng.random() < 0.5
  context, space = pick(rng, (
      ('for line in', ' '), ('data = json.load(', ''),
      ('rows = list(csv.reader(', ''), ('lines = list(', ''),
      ('for lineno, line in enumerate(', ''), ('return json.load(', ''),
      ('tree = ElementTree.parse(', ''), ('config.read_file(', '')
  ) if reads else (
      ('json.dump(data,', ' '), ('print(line, file=', ''),
      ('writer = csv.writer(', ''), ('config.write(', ''),
      ('tree.write(', ''), ('pprint.pprint(data, stream=', ''),
      ('traceback.print_exc(file=', '')))
  right, wrong = aliases[answer], aliases[1 - answer]
  read_as, write_as = (right, wrong) if reads else (wrong, right)
  items = [f'{reader.format(src)} as {read_as}',
           f'{writer.format(dst)} as {write_as}']
  if not input_first:
    items.reverse()
  lines.append(f'{indent}with {", ".join(items)}:')
  lines.append(f'{indent}    {context}')
  return pools.datapoint(lines, [space + a for a in aliases], answer)


def with_open(rng, answer):
  """`r` or `w` in `open(path, '`: the function's name says which.

  The pair swaps the function's verb for its opposite (`load`, `save`),
  and the docstring (in 60% of pairs) says "from" or "to". `w` in a reader
  empties the file it is to read, and then reading fails at run time
  (io.UnsupportedOperation), as writing does to a file opened with `r`.
  """
  verbs = pick(rng, (('read', 'write'), ('load', 'save'), ('load', 'dump'),
                     ('parse', 'write'), ('restore', 'store'),
                     ('fetch', 'store'), ('scan', 'emit'),
                     ('import', 'export'), ('get', 'put')))
  noun = pick(rng, pools.NOUNS)
  path = pick(rng, ('path', 'filename', 'name', 'file', 'fn', 'dest'))
  args = f'self, {path}' if rng.random() < 0.4 else path
  private = pick(rng, ('', '_'))
  doc = rng.random() < 0.6
  q = pick(rng, pools.QUOTES)
  fillers = pools.statements(rng, '    ', [path], 0, 1)
  opener = pick(rng, (f'    with open({path}, {q}', f'    f = open({path}, {q}',
                      f'    with open({path}, mode={q}'))
  verb = verbs[answer]
  lines = [f'def {private}{verb}_{noun}({args}):']
  if doc:
    prep = ('from', 'to')[answer]
    lines.append(f'    """{verb.capitalize()} the {noun} {prep} *{path}*."""')
  lines += fillers + [opener]
  return pools.datapoint(lines, ('r', 'w'), answer)


def for_while(rng, answer):
  """` in` after `for name`, `:` after `while name`.

  The pair differs in the keyword (and a `while` condition's prefix); both
  end in the same name, bound before as a parameter or a variable, so both
  classes end in the same words. `for name:` is a syntax error; ` in` after
  `while name` would be legal, starting a membership test, but nothing in
  the prompt is a container to test it against.
  """
  name, value = pick(rng, (
      ('node', 'tree.root'), ('line', 'f.readline()'),
      ('chunk', 'f.read(8192)'), ('data', 'sock.recv(1024)'),
      ('match', 'pattern.search(text)'), ('item', 'queue.get()'),
      ('frame', 'sys._getframe()'), ('entry', 'table.first()'),
      ('token', 'next(tokens, None)'), ('block', 'stream.read(size)'),
      ('path', 'os.getcwd()'), ('key', 'next(keys, None)')))
  as_param = rng.random() < 0.5
  lines, indent, _ = pools.function(
      rng, [name] if as_param else None,
      names=[n for n in pools.NAMES if n != name])
  if not as_param:
    lines.append(f'{indent}{name} = {value}')
  prefix = pick(rng, ('', '', 'not ', 'i < n and ', 'self._running and '))
  lines.append(f'{indent}for {name}' if answer == 0 else
               f'{indent}while {prefix}{name}')
  return pools.datapoint(lines, (' in', ':'), answer)


def else_elif(rng, answer):
  """` else` or ` elif` at the start of a line: which header does it continue?

  The pair has the same blocks under different headers: a `for`, `while` or
  `try` (with an `except`) against an `if` (with an `elif`). After the
  first, only ` else` is legal; `elif` is a syntax error. The `if` chain
  dispatches on a variable whose allowed values are checked above, one
  branch a value, and two of them at least are untested, so the chain
  continues with ` elif`; ` else` would be legal but would lump the
  untested values together, against the dispatch. The prompt's last block
  is sometimes nested deeper, so the model must match the indentation
  rather than look at the latest header. The prompt ends one space short of
  the keyword's indent, as BPE splits `    else` that way.
  """
  var = pick(rng, ('kind', 'mode', 'op', 'action', 'how', 'typ', 'which'))
  lines, indent, args = pools.function(
      rng, [var] + pick(rng, pools.NAMES, rng.randint(0, 2)), fillers=(0, 1))
  method = indent == '        '
  choices = pick(rng, ('file', 'dir', 'link', 'fifo', 'socket', 'block',
                       'read', 'write', 'append', 'add', 'sub', 'mul', 'div',
                       'start', 'stop', 'restart', 'status'), 4)
  q = pick(rng, pools.QUOTES)

  def body(ind):
    return [ind + pick(rng, (
        f'return {pick(rng, pools.ATOMS)}',
        f'self._{pick(rng, pools.KEYS)} = {pick(rng, pools.ATOMS)}',
        f'{pick(rng, pools.NAMES)}.append({pick(rng, pools.ATOMS)})',
        f'{pick(rng, pools.NAMES)} = {pick(rng, pools.ATOMS)}'))
            for _ in range(rng.randint(1, 2))]

  inner = indent + '    '
  listed = ', '.join(f'{q}{c}{q}' for c in choices)
  lines += [f'{indent}if {var} not in ({listed}):',
            f'{inner}raise ValueError({q}bad {var}: %r{q} % {var})']
  lines += pools.statements(rng, indent, args, 0, 1, method)
  seq, item = pick(rng, pools.SEQS)
  header = pick(rng, (f'for {item} in {seq}:',
                      f'while {pick(rng, pools.CONDITIONS)}:', 'try:'))
  first, second = body(inner), body(inner)
  error = pick(rng, ('KeyError', 'OSError', 'ValueError', 'ImportError'))
  nested = pick(rng, (None, None, None, f'if {pick(rng, pools.CONDITIONS)}:',
                      f'for {item} in {seq}:'))
  last = body(inner + '    ')
  if answer:
    lines += [f'{indent}if {var} == {q}{choices[0]}{q}:'] + first
    if header == 'try:':
      lines += [f'{indent}elif {var} == {q}{choices[1]}{q}:'] + second
  else:
    lines += [indent + header] + first
    if header == 'try:':
      lines += [f'{indent}except {error}:'] + second
  if nested:  # A deeper block the answer must skip.
    lines += [inner + nested] + last
  lines.append(indent[:-1])
  return pools.datapoint(lines, (' else', ' elif'), answer)


# Replacement-field expressions with a space in them: `{n - 1` and `{n} - 1`
# end in the same word.
_FIELDS = ('n - 1', 'i + 1', 'end - start', 'len(args) - 1', 'count * 2',
           'size // 2', 'total / count', 'lineno + 1', 'offset + size',
           'self.pos - start', 'len(data) + 4', 'value * 100',
           'name or default', 'x if x else y', 'width - len(text)')


def fstring_brace(rng, answer):
  """`}` or the closing quote: is an f-string replacement field still open?

  The pair ends in the same words, `{n - 1` against `{n} - 1`, after text
  with closed fields. Before Python 3.12 neither candidate may appear in the
  other's place: the quote cannot close a string inside a field, and a lone
  `}` is an error in the text. Where a call closes after the string the
  quote's candidate is `')`, the token BPE makes there.
  """
  q = pick(rng, pools.QUOTES)
  text = pick(rng, pools.FSTRINGS)
  cuts, depth = [0], 0
  for i, c in enumerate(text):
    depth += {'{': 1, '}': -1}.get(c, 0)
    if c == ' ' and not depth:
      cuts.append(i + 1)
  prefix = text[:pick(rng, cuts)]
  head, tail = pick(rng, _FIELDS).split(' ', 1)
  field = f'{{{head} {tail}' if answer == 0 else f'{{{head}}} {tail}'
  before, close = pick(rng, (
      ('raise ValueError(', ')'), ('msg = ', ''), ('print(', ')'),
      ('return ', ''), ('self.fail(', ')'), ('logger.warning(', ')'),
      ('lines.append(', ')'), ('raise OSError(errno.ENOENT, ', ')'),
      ('sys.stdout.write(', ')')))
  lines, indent, _ = pools.function(rng)
  lines.append(f'{indent}{before}f{q}{prefix}{field}')
  return pools.datapoint(lines, ('}', q + close), answer)


def _block_before(rng, indent, keyword):
  """The `if` block that `elif` needs first; nothing for other keywords."""
  if keyword != 'elif':
    return []
  return [f'{indent}if {pick(rng, pools.CONDITIONS)}:',
          f'{indent}    return {pick(rng, pools.ATOMS)}']


def if_ternary(rng, answer):
  """`:` after an `if` statement's condition, ` else` after a conditional
  expression's.

  The pair ends in the same condition. Either candidate in the other's
  place is a syntax error.
  """
  cond = pick(rng, pools.CONDITIONS)
  lines, indent, args = pools.function(rng)
  keyword = pick(rng, ('if', 'elif', 'while'))
  lines += _block_before(rng, indent, keyword)
  a, b = pick(rng, pools.NAMES), pick(rng, args)
  ternary = pick(rng, (
      f'{a} = {b} if {cond}', f'return {b} if {cond}',
      f'self._{a} = {pick(rng, pools.ATOMS)} if {cond}',
      f'{a}.append({b} if {cond}', f'yield {b} if {cond}'))
  lines.append(indent + (f'{keyword} {cond}' if answer == 0 else ternary))
  return pools.datapoint(lines, (':', ' else'), answer)


def var_swap(rng, answer):
  """`x[i], x[j] = x[j], x[` is followed by `i`: completing a swap.

  Elements of a sequence or attributes of an object are swapped, so the
  prompt ends in `x[` or `x.`; the pair lists the two in the other order.
  `x[i], x[j] = x[j], x[j]` is legal but copies instead of swapping, which
  `x[i] = x[j]` would say.
  """
  lines, indent, _ = pools.function(rng)
  if rng.random() < 0.6:
    a, b = pick(rng, (('i', 'j'), ('j', 'k'), ('i', 'k'), ('start', 'end'),
                      ('i', 'n'), ('a', 'b'), ('x', 'y'), ('p', 'q'),
                      ('lo', 'pos'), ('first', 'index')))
    seq = pick(rng, ('items', 'values', 'data', 'self._heap', 'lst', 'perm',
                     'heap', 'self._queue'))
    element, line = '{0}[{1}]', '{0}[{1}], {0}[{2}] = {0}[{2}], {0}['
  else:
    a, b = pick(rng, (('x', 'y'), ('start', 'end'), ('key', 'value'),
                      ('name', 'value'), ('w', 'h'), ('u', 'v'),
                      ('first', 'right'), ('data', 'text')))
    seq = pick(rng, ('self', 'node', 'other', 'self._range', 'rect', 'pair'))
    element, line = '{0}.{1}', '{0}.{1}, {0}.{2} = {0}.{2}, {0}.'
  if rng.random() < 0.5:
    lines.append(f'{indent}if {element.format(seq, a)} > '
                 f'{element.format(seq, b)}:')
    indent += '    '
  first, second = (a, b) if answer == 0 else (b, a)
  lines.append(indent + line.format(seq, first, second))
  return pools.datapoint(lines, (a, b), answer)


def indent_for(rng, answer):
  """The line after `for ...:` is indented one level deeper.

  Byte-level BPE tokenizes a newline and all but the last space of the next
  line's indent as one token, so the candidates are `\n` plus 3 spaces more
  than the body's indent (4 in a function, 8 in a method) and `\n` plus 7
  more. The pair puts the same `for` line after a block or inside it, so
  the same two indents are right once each. Level with the `for` is an
  IndentationError; two levels deeper is legal but breaks the 4-space
  indentation of everything else.
  """
  lines, indent, args = pools.function(rng)
  method = indent == '        '
  inner = indent + '    '
  lines.append(indent + pick(rng, (
      f'if {pick(rng, pools.CONDITIONS)}:',
      f'with open({pick(rng, pools.NAMES)}) as f:',
      'with self._lock:', f'while {pick(rng, pools.CONDITIONS)}:',
      f'for {pick(rng, pools.NAMES)} in {pick(rng, args)}:')))
  lines += pools.statements(rng, inner, args, 1, 2, method)
  seq, item = pick(rng, pools.SEQS)
  loop = pick(rng, (
      f'for {item} in {seq}:', f'for i in range(len({seq})):',
      f'for key, value in self._{pick(rng, pools.KEYS)}.items():',
      f'for i, {item} in enumerate({seq}):', 'for line in f:',
      f'for name in sorted(os.listdir({pick(rng, pools.NAMES)})):',
      f'for _ in range({pick(rng, pools.ATOMS)}):',
      f'for {item} in self.{seq}:', f'for {item} in reversed({seq}):'))
  lines.append((indent, inner)[answer] + loop)
  candidates = ['\n' + ' ' * (len(indent) + n) for n in (3, 7)]
  return pools.datapoint(lines, candidates, answer)


def lambda_func(rng, answer):
  """`:` after a lambda's parameters, `):` after a def's.

  The pair defines the same parameters in the same function body, with a
  lambda or a nested def; two of them at least, so both end in the same
  words. `):` after a lambda's parameters is a syntax error. A def's last
  parameter could take a `:` annotation: where it has a default that is a
  syntax error too, elsewhere it is legal but rare in the standard library.
  """
  lines, indent, _ = pools.function(rng)
  names = pick(rng, pools.NAMES, rng.randint(2, 4))
  if rng.random() < 0.4:
    names[-1] += f'={pick(rng, ("None", "0", "False", "True", "1"))}'
  params = ', '.join(names)
  target = pick(rng, pools.NAMES)
  lambdas = [f'callback = lambda {params}', f'self._{target} = lambda {params}',
             f'return lambda {params}', f'{target} = lambda {params}',
             f'handlers.append(lambda {params}',
             f'atexit.register(lambda {params}']
  if len(names) == 2:
    lambdas += [f'return functools.reduce(lambda {params}',
                f'items.sort(key=functools.cmp_to_key(lambda {params}']
  lam = pick(rng, lambdas)
  name = pools.func_name(rng)
  lines.append(indent + (lam if answer == 0 else f'def {name}({params}'))
  return pools.datapoint(lines, (':', '):'), answer)


def if_equals(rng, answer):
  """` ==` in a condition, ` =` at the start of a statement.

  The pair ends in the same target, after a keyword or at the start of the
  line. ` =` in a condition is a syntax error; a comparison as a statement
  (`self.mode == x`) is legal but does nothing.
  """
  lines, indent, args = pools.function(rng)
  target = pick(rng, (pick(rng, args), f'self.{pick(rng, pools.NAMES)}',
                      f'self._{pick(rng, pools.NAMES)}',
                      f'{pick(rng, pools.NAMES)}.{pick(rng, pools.KEYS)}'))
  keyword = pick(rng, ('if', 'elif', 'while', 'assert', 'if not', 'return',
                       'if x and'))
  lines += _block_before(rng, indent, keyword)
  lines.append(indent + (f'{keyword} {target}' if answer == 0 else target))
  return pools.datapoint(lines, (' ==', ' ='), answer)


def enumerate_range(rng, answer):
  """In a loop over `range(len(seq))` the element is `seq[i]`; in one over
  `enumerate(seq)` it is the loop's own name.

  The pair has the same body under `for i in range(len(lines)):` or
  `for i, line in enumerate(lines, 1):`, and the prompt ends where the body
  uses the element: `lines` (then `[i]`) or `line`. After `range` the name
  `line` is unbound, a NameError; the enumerate loops are ones where
  `lines[i]` is a different element (counting from 1, sorted, reversed), an
  IndexError or a contradiction.
  """
  seq, item = pick(rng, (('lines', 'line'), ('args', 'arg'), ('keys', 'key'),
                         ('items', 'item'), ('names', 'name'),
                         ('values', 'value'), ('modules', 'module')))
  index = pick(rng, ('i', 'j', 'n', 'k', 'pos', 'index', 'lineno'))
  names = [n for n in pools.NAMES if n not in (seq, item, index)]
  extra = pick(rng, names, rng.randint(0, 1))
  lines, indent, _ = pools.function(rng, [seq] + extra, names=names)
  ranges = pick(rng, (f'range(len({seq}))', f'range(1, len({seq}))',
                      f'range(len({seq}) - 1)', f'range(0, len({seq}), 2)'))
  enumerates = pick(rng, (f'enumerate({seq}, 1)', f'enumerate({seq}, start=1)',
                          f'enumerate(sorted({seq}))',
                          f'enumerate(reversed({seq}))'))
  body = indent + '    '
  skip = pick(rng, ([], [], [f'{body}if {index} == 0:', f'{body}    continue'],
                    [f'{body}if {index} % 2:', f'{body}    continue']))
  use = pick(rng, ('{} = int(', '{}.append(', 'print(', 'total += len(',
                   '_{}(', '{} = convert(', 'yield {}(', 'if not check('))
  use = use.format(pick(rng, ('acc', 'rows', 'handle', 'parse', 'emit')))
  lines += [f'{indent}for {index} in {ranges}:' if answer == 0 else
            f'{indent}for {index}, {item} in {enumerates}:']
  lines += skip + [body + use]
  return pools.datapoint(lines, (seq, item), answer)


def var_if(rng, answer):
  """`if` tests the variable this function just assigned, not another
  function's.

  The paper names this task without describing it. Here a helper function
  assigns and returns one name, and the function the prompt ends in assigns
  another from a call that may return None, then starts `if`. The pair
  swaps the two names, so the candidates are the same; the other function's
  local is not in scope, a NameError at run time.
  """
  a, b = pick(rng, pools.NAMES, 2)
  names = [n for n in pools.NAMES if n not in (a, b)]
  helper = pools.func_name(rng)
  helper_args = pick(rng, names, rng.randint(1, 2))
  helper_value = pick(rng, (
      f'{helper_args[0]}.strip()', f'len({helper_args[0]})',
      f'{helper_args[0]}.get({pools.quoted(rng, pools.KEYS)})',
      f'os.fspath({helper_args[0]})',
      f'{pick(rng, pools.CALLS)}({", ".join(helper_args)})'))
  helper_use = pick(rng, ('return {}', 'return {} or None',
                          '_cache[{0}] = {0}', 'print({})'))
  args = pick(rng, names, rng.randint(1, 3))
  lines, indent, _ = pools.function(rng, args, method=False, names=names)
  arg = pick(rng, args)
  value = pick(rng, (
      f'pattern.match({arg})', f'cache.get({arg})', f'_lookup({arg})',
      f'os.environ.get({pools.quoted(rng, pools.KEYS)})',
      f'getattr({arg}, {pools.quoted(rng, pools.KEYS)}, None)',
      f'next(iter({arg}), None)', f'shutil.which({arg})',
      f're.search({pools.quoted(rng, ("x", "_", "0"))}, {arg})'))
  after = pools.statements(rng, indent, args, 0, 1, names=names)
  own, other = (a, b) if answer == 0 else (b, a)
  prompt = [f'def {helper}({", ".join(helper_args)}):',
            f'    {other} = {helper_value}',
            '    ' + helper_use.format(other), '', '']
  prompt += lines + [f'{indent}{own} = {value}'] + after + [f'{indent}if']
  return pools.datapoint(prompt, (' ' + a, ' ' + b), answer)


def while_return_true(rng, answer):
  """` False` after a loop whose body returns True, and vice versa.

  The pair swaps the two constants. Returning the same value after the loop
  as inside it would make the early return pointless.
  """
  early = ('False', 'True')[answer]  # The other candidate is right.
  noun, attr = pick(rng, pools.NOUNS), pick(rng, pools.KEYS)
  name = pick(rng, ('value', 'key', 'name', 'chars', 'sep', 'prefix',
                    'target', 'needle'))
  loop = rng.randint(0, 3)
  if loop == 0:
    args = f'node, {name}'
    body = ['    while node is not None:',
            f'        if node.{attr} == {name}:', f'            return {early}',
            '        node = node.next']
  elif loop == 1:
    args = f'text, {name}'
    body = ['    i = 0', '    while i < len(text):',
            f'        if text[i] in {name}:', f'            return {early}',
            '        i += 1']
  elif loop == 2:
    args = f'self, {name}'
    body = ['    stack = [self]', '    while stack:',
            '        node = stack.pop()',
            f'        if {pick(rng, ("not ", ""))}node.{attr}:',
            f'            return {early}',
            f'        stack.extend(node.{pick(rng, ("children", "_nodes"))})']
  else:
    seq, item = pick(rng, pools.SEQS)
    args = seq
    body = [f'    for {item} in {seq}:',
            f'        if {item}.{pick(rng, ("startswith", "endswith"))}('
            f'{pools.quoted(rng, pools.KEYS)}):', f'            return {early}']
  lines = [f'def {pick(rng, ("is", "has", "_is", "_has", "contains"))}_{noun}'
           f'({args}):']
  if rng.random() < 0.5:
    lines.append(f'    """Return {early} if any {noun} matches."""')
  lines += body + ['    return']
  return pools.datapoint(lines, (' True', ' False'), answer)


TASKS: dict[str, Callable[[random.Random, int], dict]] = {
    f.__name__: f for f in (
        single_double_quote, bracket_counting, set_or_string,
        set_or_string_fixedvarname, final_kwarg, class_init, with_as,
        bracket_brace, with_open, for_while, else_elif, fstring_brace,
        if_ternary, var_swap, indent_for, lambda_func, if_equals,
        enumerate_range, var_if, while_return_true)
}


def generate(name, n, seed=0):
  """`n` datapoints of task `name`, n/2 contrastive pairs; the same for the
  same seed.

  Pair i is datapoints 2i (answer 0) and 2i + 1 (answer 1), both with
  `"pair": i`: the task's generator called twice with copies of one random
  state, so the two prompts differ only where the answer needs them to and
  have the same candidates, swapped. Each candidate is therefore the
  correct one exactly as often as the incorrect one.
  """
  if name not in TASKS:
    raise ValueError(f'Unknown task {name!r}; known tasks: {", ".join(TASKS)}')
  if n % 2:
    raise ValueError(f'{name}: n={n} is odd; datapoints come in pairs.')
  rng = random.Random(seed)
  data = []
  for pair in range(n // 2):
    state = rng.getrandbits(64)
    for answer in (0, 1):
      data.append({**TASKS[name](random.Random(state), answer), 'pair': pair})
  return data


# The keys of a user task's datapoint (`load_jsonl`): those it must have,
# and all it reads.
_REQUIRED_KEYS = ('prompt', 'correct', 'incorrect')
_TASK_KEYS = frozenset(_REQUIRED_KEYS + ('pair',))


def load_jsonl(path):
  """A user task: one `{"prompt", "correct", "incorrect"}` object per line.

  An optional `"pair"` (an integer or a string) groups datapoints into
  contrastive pairs or larger groups, which `encode` numbers. Other keys are
  dropped with one warning that names them: a misspelt "pair" would
  otherwise leave every datapoint its own group, and a pair's two prompts
  free to land in different splits. A UTF-8 byte order mark, as some
  editors write, is skipped. Prompts and answers are read as written,
  whitespace and all: to a byte-level BPE a space or a newline is text
  (' ==' and indent_for's '\n        ' are answers of their own), so an
  answer of whitespace is one like any other, and `encode` refuses one
  that whitespace makes more than one token.
  """
  data, unused = [], set()
  try:
    with open(path, encoding='utf-8-sig') as f:
      lines = f.readlines()
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: not UTF-8 ({e}).') from None
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f'{path}:{lineno}'
    try:
      d = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{where}: not JSON ({e}).') from None
    except (ValueError, RecursionError) as e:  # An integer past Python's
      # 4,300 digits; arrays or objects nested past the recursion limit.
      raise ValueError(f'{where}: not JSON that Python reads ({e}).') from None
    if not isinstance(d, dict):
      raise ValueError(
          f'{where}: expected an object, got {type(d).__name__}.')
    missing = [k for k in _REQUIRED_KEYS if k not in d]
    if missing:
      raise ValueError(f'{where}: missing key(s) {", ".join(missing)}.')
    kept = {k: d[k] for k in _REQUIRED_KEYS}
    if not all(isinstance(v, str) and v for v in kept.values()):
      raise ValueError(f'{where}: prompt, correct and incorrect must be '
                       'non-empty strings.')
    for key, text in kept.items():
      try:  # JSON's \ud800 escapes decode to strings no tokenizer takes.
        text.encode('utf-8')
      except UnicodeEncodeError:
        raise ValueError(f'{where}: {key} is not valid Unicode (a lone '
                         'surrogate escape).') from None
    if kept['correct'] == kept['incorrect']:
      raise ValueError(f'{where}: correct and incorrect are the same.')
    if 'pair' in d:
      if isinstance(d['pair'], bool) or not isinstance(d['pair'], (int, str)):
        raise ValueError(f'{where}: pair must be an integer or a string.')
      kept['pair'] = d['pair']
    data.append(kept)
    unused.update(d.keys() - _TASK_KEYS)
  if not data:
    raise ValueError(f'{path}: no datapoints.')
  if unused:
    logging.warning('%s: ignored key(s) %s; a task file reads only %s.', path,
                    ', '.join(map(repr, sorted(unused))),
                    ', '.join(sorted(_TASK_KEYS)))
  return data


def datapoint_lines(path):
  """The line of `path` that each of its `load_jsonl` datapoints is on,
  counted from 1 as an editor counts them: blank lines hold none, so the
  datapoints' own numbers drift from the lines after the first."""
  with open(path, encoding='utf-8-sig') as f:
    return [lineno for lineno, line in enumerate(f, 1) if line.strip()]


def encode(datapoints, tokenizer, seq_len, name='datapoints', lines=None):
  """Token arrays for `datapoints`, checked against `tokenizer`.

  Each candidate must be one token, or its logit would not be its
  probability. Token 0 is padding, so prompts and candidates must not
  contain it. A datapoint is kept only if BPE merges nothing across the
  prompt/candidate boundary for either candidate, or the model would be
  scored on a token that never follows this prompt in real text; the tasks
  here are written so that this holds, and skipped datapoints are counted in
  the log. `name` labels errors and log lines, and `lines` [N], where given
  (`datapoint_lines`), names a datapoint by its task file's line in them;
  else by its number, counting from 1.

  Returns `tokens` int32 [N, seq_len] (right-padded with 0; long prompts keep
  their last seq_len tokens), `lengths` [N] (prompt tokens kept), the
  `correct` and `incorrect` token ids [N], `index` [N], each row's position
  in `datapoints`, and `pair` [N], a group id numbering the rows' `"pair"`
  values from 0 in order of appearance; a datapoint without one is a group
  of its own, and so is a pair's member whose partner was skipped. Groups
  that share a prompt (its tokens as kept) are one group, said in the log:
  the pruning's splits keep a group whole, so no prompt it tests on is one
  it trained on.
  """
  if not datapoints:
    raise ValueError(f'{name}: no datapoints.')
  ids_of = {}
  for d in datapoints:
    for c in (d['correct'], d['incorrect']):
      if c not in ids_of:
        ids_of[c] = tokenizer.encode(c).ids
        if len(ids_of[c]) != 1 or ids_of[c] == [0]:
          raise ValueError(f'{name}: candidate {c!r} is tokens {ids_of[c]}, '
                           'not one non-padding token'
                           + _whitespace_hint(c, tokenizer) + '.')
  prompts = [d['prompt'] for d in datapoints]
  encoded = tokenizer.encode_batch(prompts)
  with_correct = tokenizer.encode_batch(
      [p + d['correct'] for p, d in zip(prompts, datapoints)])
  with_incorrect = tokenizer.encode_batch(
      [p + d['incorrect'] for p, d in zip(prompts, datapoints)])
  rows = []
  for index, (d, e, ec, ei) in enumerate(
      zip(datapoints, encoded, with_correct, with_incorrect)):
    if not e.ids or 0 in e.ids:
      raise ValueError(f'{name}: prompt {d["prompt"]!r} is empty or contains '
                       'token 0, which is padding.')
    c, i = ids_of[d['correct']], ids_of[d['incorrect']]
    if ec.ids == e.ids + c and ei.ids == e.ids + i:
      group = ('pair', d['pair']) if 'pair' in d else ('row', index)
      rows.append((e.ids[-seq_len:], c[0], i[0], index, group))
  skipped = len(datapoints) - len(rows)
  if not rows:
    raise ValueError(f'{name}: in all {skipped} datapoints a candidate merges '
                     'with the end of the prompt.')
  if skipped:
    logging.warning('%s: skipped %d of %d datapoints where a candidate merges '
                    'with the end of the prompt.', name, skipped,
                    len(datapoints))
  cut = sum(len(e.ids) > seq_len for e in encoded)
  if cut:
    logging.warning('%s: %d of %d prompts are longer than %d tokens and keep '
                    'their last %d.', name, cut, len(datapoints), seq_len,
                    seq_len)
  _check_consistent(rows, seq_len, name, lines)
  tokens = np.zeros((len(rows), seq_len), np.int32)
  for r, (ids, *_) in enumerate(rows):
    tokens[r, :len(ids)] = ids
  _, correct, incorrect, index, _ = zip(*rows)
  pair = _groups([(group, ('prompt', tuple(ids)))
                  for ids, *_, group in rows])
  given = len({group for *_, group in rows})
  if given > len(set(pair)):  # Else "too few pairs" would puzzle.
    logging.warning('%s: its %d groups (pairs, or unpaired prompts) are %d: '
                    'groups that share a prompt are one, so that no prompt '
                    'is both trained on and tested.', name, given,
                    len(set(pair)))
  return {
      'tokens': tokens,
      'lengths': np.array([len(ids) for ids, *_ in rows], np.int32),
      'correct': np.array(correct, np.int32),
      'incorrect': np.array(incorrect, np.int32),
      'index': np.array(index, np.int32),
      'pair': np.array(pair, np.int32),
  }


def _whitespace_hint(candidate, tokenizer):
  """Where whitespace around a candidate is what makes it more than one
  token (a pasted 'True '), that said: it is part of the answer, not
  stripped."""
  stripped = candidate.strip()
  if stripped == candidate or len(tokenizer.encode(stripped).ids) != 1:
    return ''
  return (f' (its whitespace is part of it: {stripped!r} alone is one '
          'token)')


def _check_consistent(rows, seq_len, name, lines=None):
  """Refuses datapoints whose preferences on one prompt, as the model reads
  it, go round a cycle: one is another's with the answers swapped, or a
  over b, b over c and c over a. No model's logits order a cycle, so none
  answers all of them; pairs that differ only before their last seq_len
  tokens become one prompt when cut. Named by their `lines` in a task file
  where given (`encode`)."""
  prefers = {}  # Prompt ids -> {answer: {answer it beats: datapoint index}}.
  cycles = []  # ([datapoint indices around the cycle], prompt length).
  for ids, correct, incorrect, index, _ in rows:
    beats = prefers.setdefault(tuple(ids), {})
    path = _preference_path(beats, incorrect, correct)
    if path is None:
      beats.setdefault(correct, {}).setdefault(incorrect, index)
    else:  # Left out of the graph: every later cycle is one of its own.
      cycles.append((sorted(path + [index]), len(ids)))
  if cycles:
    members, length = cycles[0]
    numbers = [lines[i] if lines else i + 1 for i in members]
    listed = ', '.join(map(str, numbers[:-1])) + f' and {numbers[-1]}'
    where = (f'lines {listed} of the task file' if lines
             else f'datapoints {listed}, counting from 1')
    raise ValueError(
        f'{name}: {len(cycles)} datapoint(s) '
        + ('read the same prompt as one with the answers swapped'
           if len(members) == 2 else 'read the same prompt as others and '
           'with them prefer each answer to the next round a cycle')
        + f' (first: {where})'
        + (f', prompts keeping their last {seq_len} tokens'
           if length == seq_len else '')
        + (': no model answers both.' if len(members) == 2
           else ': no model answers all of them.'))


def _preference_path(beats, start, goal):
  """Indices of the datapoints that lead from answer `start` to `goal` in
  `beats` ({answer: {answer it beats: datapoint index}}), each preferring
  one answer to the next; None if none does (breadth first)."""
  via = {start: None}  # Answer -> (the answer before it, datapoint index).
  frontier = [start]
  while frontier and goal not in via:
    reached = []
    for answer in frontier:
      for after, index in beats.get(answer, {}).items():
        if after not in via:
          via[after] = (answer, index)
          reached.append(after)
    frontier = reached
  if goal not in via:
    return None
  path, answer = [], goal
  while via[answer] is not None:
    answer, index = via[answer]
    path.append(index)
  return path


def _groups(keys):
  """Group ids [N] of rows with `keys` [N][K], numbered from 0 in order of
  appearance: rows that share any key are in one group (union-find)."""
  parent = list(range(len(keys)))

  def root(r):
    while parent[r] != r:
      parent[r] = parent[parent[r]]
      r = parent[r]
    return r

  first = {}
  for r, row_keys in enumerate(keys):
    for key in row_keys:
      parent[root(r)] = root(first.setdefault(key, r))
  number = {}
  return [number.setdefault(root(r), len(number)) for r in range(len(keys))]


# The most datapoints of a task that a fixed preference between its
# candidates may answer (the built-in tasks' bound for a constant answer).
MAX_FIXED_PREFERENCE = 0.6


def candidate_pairs(encoded):
  """Each datapoint's pair of candidates, unordered, as an id [N] (by the
  pairs' token ids), and whether it is the candidate of lower token id that
  is right [N] bool."""
  low = np.minimum(encoded['correct'], encoded['incorrect'])
  high = np.maximum(encoded['correct'], encoded['incorrect'])
  ids = np.unique(np.stack([low, high], 1), axis=0,
                  return_inverse=True)[1].reshape(-1)
  return ids, encoded['correct'] == low


def fixed_preference(encoded):
  """The share of the datapoints (at least half) that a fixed preference
  answers: for each pair of candidates, always the one of the two that is
  more often right. A model can hold such a preference without reading the
  prompt (its prior between the two), and one calibrated scale sets every
  pair's prior gap apart at once: a task whose ')' beat ' =' and ',' beat
  ')' every time, half its answers each of lower token id, read calibrated
  loss 0.000 with every node ablated."""
  ids, low_right = candidate_pairs(encoded)
  right = np.bincount(ids, weights=low_right)
  total = np.bincount(ids)
  return float(np.maximum(right, total - right).sum() / len(ids))


def check_balanced(encoded, name):
  """Refuses a task whose answers a fixed preference predicts.

  The calibration that every reported task loss goes through
  (`prune.calibrated_loss`) fits a scale and a shift towards the candidate
  of lower token id. Where one candidate of a pair is right in most of its
  datapoints, that alone scores well without the prompt being read, and
  any circuit, even none, looks solved: a task whose answer was always
  ` ==` read test loss 0.000 for the full model, the circuit and the
  circuit ablated. The built-in tasks' contrastive pairs give each
  candidate both answers against the other, so the share is exactly one
  half; a task file must keep it within MAX_FIXED_PREFERENCE.
  `encoded` as `encode` returns it.
  """
  share = fixed_preference(encoded)
  if share > MAX_FIXED_PREFERENCE:
    # Past the bound by less than the rounding, it would read as the bound.
    shown = f'{share:.0%}'
    if shown == f'{MAX_FIXED_PREFERENCE:.0%}':
      shown = f'more than {shown}'
    raise ValueError(
        f'{name}: a fixed preference between the candidates (of each pair '
        f'of candidates, the one more often right) answers {shown} of '
        'the datapoints, which the calibrated loss would reward without '
        f'reading the prompts; keep it within {MAX_FIXED_PREFERENCE:.0%} by '
        'giving each candidate both answers against the other (contrastive '
        'pairs do).')


def task_loss(logits_last, correct, incorrect):
  """Binary cross-entropy between the two candidates, and accuracy.

  logits_last: [N, vocab] at the last prompt position.
  """
  rows = jnp.arange(logits_last.shape[0])
  margin = (logits_last[rows, correct] -
            logits_last[rows, incorrect]).astype(jnp.float32)
  return jnp.mean(jax.nn.softplus(-margin)), jnp.mean(margin > 0)
