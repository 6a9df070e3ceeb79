r"""Binary next-token tasks on Python code, for finding circuits.

A datapoint is `{"prompt", "correct", "incorrect"}`: the model sees the prompt
and should put more logit on `correct` than on `incorrect` at the last prompt
position (Gao et al. 2025, "Weight-sparse transformers have interpretable
circuits"). The paper's generators are not public; these are written from the
task descriptions, with the paper's task names.

Prompts imitate the CPython standard library the model is trained on: 4-space
indents, identifiers and values drawn from varied pools, varied lengths. Every
answer is decidable from its prompt. Usually the wrong candidate would be a
syntax error (`if x` then ` =`), fail at run time (`seen = set()` then
`seen +=`) or contradict the code (`return True` after a loop that already
returns True); where it would merely be pointless (`a, b = b, b`), the task's
docstring says so.

Candidates are chosen to be single tokens of a small byte-level BPE trained on
Python, and prompts end so that BPE merges nothing across the boundary:
tokenize(prompt + candidate) == tokenize(prompt) + [candidate]. That holds when
the prompt ends in a letter or digit and the candidate starts with punctuation
or a space, or the prompt ends in punctuation and the candidate starts with a
letter or a space; prompts never end in whitespace, except `else_elif`, whose
prompt ends one space short of the indentation, as byte-level BPE itself splits
`\n    else` into `\n   ` and ` else`. `encode` checks both properties against
the actual tokenizer, so a task that a tokenizer cannot represent is caught
rather than silently scored on the wrong token.
"""

import collections
from collections.abc import Callable
import json
import random

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

_QUOTES = ("'", '"')

# Names that are single tokens after a space in each of 16 2048-token BPEs
# trained on 300 random standard-library files, with ids under 1450 in one
# trained on all of it. Names nearer the end of the vocabulary
# (` timeout`, ` flags`, ` count`, ...) come and go with the sample. Tasks whose
# answer is a name draw it from here.
_NAMES = (
    'name', 'path', 'size', 'data', 'value', 'key', 'encoding', 'default',
    'context', 'method', 'state', 'code', 'text', 'file', 'filename', 'args',
    'values', 'message', 'msg', 'start', 'end', 'result', 'obj', 'line', 'out',
)
_VERBS = (
    'get', 'parse', 'format', 'check', 'make', 'find', 'build', 'update',
    'handle', 'process', 'normalize', 'split', 'resolve', 'convert', 'collect',
    'validate', 'compute', 'extract', 'render', 'encode', 'decode', 'lookup',
    'iter', 'add', 'remove', 'reset', 'apply', 'visit', 'scan', 'strip',
)
_NOUNS = (
    'name', 'path', 'header', 'config', 'state', 'entry', 'record', 'node',
    'token', 'line', 'message', 'request', 'module', 'source', 'field',
    'option', 'section', 'element', 'attribute', 'frame', 'buffer', 'archive',
    'member', 'address', 'cookie', 'charset', 'locale', 'pattern', 'handler',
    'signature', 'manifest', 'index', 'cache', 'package', 'params', 'tokens',
    'names', 'items', 'lines', 'args', 'fields', 'values', 'parts', 'chunks',
)
_CLASSES = (
    'Entry', 'Record', 'Handler', 'Connection', 'Request', 'Parser', 'Reader',
    'Writer', 'Session', 'Token', 'Node', 'Option', 'Section', 'Frame',
    'Member', 'Formatter', 'Result', 'Channel', 'Worker', 'Job', 'Event',
    'Message', 'Header', 'Cookie', 'Policy', 'Loader', 'Finder', 'Spec',
    'Transport', 'Protocol', 'Server', 'Client', 'Context', 'Stream', 'Queue',
)
_SEQS = (  # A sequence parameter and the name of one of its elements.
    ('items', 'item'), ('lines', 'line'), ('args', 'arg'), ('names', 'name'),
    ('values', 'value'), ('keys', 'key'), ('parts', 'part'),
    ('fields', 'field'), ('tokens', 'token'), ('nodes', 'node'),
    ('entries', 'entry'), ('paths', 'path'), ('words', 'word'),
    ('chunks', 'chunk'), ('files', 'filename'), ('modules', 'module'),
)
_ATOMS = (
    '0', '1', '2', '3', '8', '16', '32', '64', '255', '1024', '-1', 'None',
    'True', 'False', 'x', 'n', 'i', 'size', 'count', 'self.width', 'offset',
    'n - 1', 'i + 1', 'self.count', 'MAX_SIZE', 'sys.maxsize', 'os.sep',
    'value', 'key', 'self.mode', 'DEFAULT_TIMEOUT', 'b', 'pos', 'start',
)
_CALLS = (
    'len', 'str', 'int', 'repr', 'sorted', 'list', 'set', 'tuple', 'max',
    'min', 'print', 'format', 'abs', 'round', 'getattr', 'isinstance', 'zip',
    'os.path.join', 'os.path.dirname', 'os.fspath', 'self._get', 'map',
    'self._convert', 'dict', 'enumerate', 'bytes', 'hash', 'callable',
)
_CONDITIONS = (  # Complete boolean expressions ending in a word or number.
    'x is None', 'self.debug', 'n > 0', 'not args', 'key in cache',
    'i < n', 'self._closed', 'node is not None', 'pos >= end', 'not data',
    'size == 0', 'value is not None', 'count > 1', 'self.verbose',
    'isinstance(value, str) and value', 'name in self._names', 'timeout < 0',
    'len(items) > 1', 'mode == MODE_READ', 'sys.platform == WINDOWS',
)
_KEYS = (
    'name', 'version', 'timeout', 'mode', 'host', 'port', 'level', 'path',
    'encoding', 'size', 'count', 'debug', 'user', 'flags', 'format', 'type',
    'default', 'maxsize', 'lineno', 'offset', 'key', 'value', 'id', 'args',
)
_STRINGS = (
    'invalid literal for int with base %d', 'cannot import name %r',
    'expected str, bytes or os.PathLike object', 'unsupported operand type',
    'No such file or directory', 'utf-8', 'Content-Type', 'application/json',
    '%s is not a valid mode', 'unknown encoding %s', 'text/plain', '__main__',
    'localhost', 'latin-1', 'ascii', 'surrogateescape', 'HTTP/1',
    'attempted relative import with no known parent package',
    '%(levelname)s %(name)s %(message)s', 'Set-Cookie', 'read-only attribute',
    '%r object has no attribute %r', 'bad magic number in %s',
    'timed out waiting for the lock', 'maximum recursion depth exceeded',
    'must be called with a callable', 'file is not a zip file', 'wb',
    'Transfer-Encoding', 'generator already executing', 'tostring',
    'can only concatenate list to list', 'Connection reset by peer',
    'missing required argument %s', 'line %d column %d', 'strict',
)
_FSTRINGS = (
    'invalid literal for int() with base {base}: {value!r}',
    '{name!r} is not a valid mode', 'expected {n} arguments, got {len(args)}',
    'unknown encoding: {encoding}', 'line {lineno} column {col}',
    '{self.__class__.__name__} object has no attribute {name!r}',
    'bad magic number in {filename}', '{cls.__name__}({self.value!r})',
    '{key}={value}', 'timed out after {timeout:.1f} seconds',
    '{self.host}:{self.port}', 'Error {err.errno} while reading {filename}',
    'cannot import name {name!r} from {module.__name__!r}',
    '{count} files in {path}', 'Content-Length: {len(body)}',
    'missing required argument {name}', '{i}: {line}',
    'HTTP/{version} {status} {reason}', '{type(obj).__name__} is not supported',
    '{path} is not a directory', 'elapsed {elapsed:.3f}s', '__{name}__',
    '<{self.__class__.__name__} {self.name!r}>', '{prefix}{name}{suffix}',
    '{os.path.basename(filename)} was modified', 'got {x} and {y} instead',
)


def _pick(rng, pool, k=None):
  return rng.choice(pool) if k is None else rng.sample(pool, k)


def _atoms(rng):
  return ', '.join(_pick(rng, _ATOMS, rng.randint(1, 4)))


def _func_name(rng):
  name = f'{_pick(rng, _VERBS)}_{_pick(rng, _NOUNS)}'
  return '_' + name if rng.random() < 0.3 else name


def _phrase(rng):
  """A prefix of a message that ends inside a word, so quotes do not merge."""
  words = _pick(rng, _STRINGS).split(' ')
  cut = rng.randint(1, len(words))
  while cut > 1 and not words[cut - 1][-1].isalnum():
    cut -= 1
  return ' '.join(words[:cut])


def _quoted(rng, pool):
  q = _pick(rng, _QUOTES)
  return f'{q}{_pick(rng, pool)}{q}'


def _datapoint(lines, correct, incorrect):
  return {'prompt': '\n'.join(lines), 'correct': correct,
          'incorrect': incorrect}


def _function(rng, args=None, method=None, fillers=(0, 2)):
  """Opening lines of a function or a method, and statements using its args.

  `args` is a list of parameter names (random by default); `method` puts the
  function in a class (at random by default). Returns (lines, indent, args),
  indent being the body's.
  """
  args = args or _pick(rng, _NAMES, rng.randint(1, 3))
  if method is None:
    method = rng.random() < 0.4
  if method:
    lines = [f'class {_pick(rng, _CLASSES)}:']
    if rng.random() < 0.5:
      doc = f'{_pick(rng, _CLASSES)} for {_pick(rng, _NOUNS)}.'
      lines += [f'    """{doc}"""', '']
    lines.append(f'    def {_func_name(rng)}(self, {", ".join(args)}):')
    indent = '        '
  else:
    lines, indent = [f'def {_func_name(rng)}({", ".join(args)}):'], '    '
  return lines + _fillers(rng, indent, args, *fillers), indent, args


def _statement(rng, indent, args):
  """A line that uses the function's `args`, so prompts vary."""
  arg, new = _pick(rng, args), _pick(rng, _NAMES)
  method = indent == '        '
  return indent + _pick(rng, (
      f'{new} = {arg}.strip()',
      f'if {arg} is None:\n{indent}    {arg} = {_pick(rng, _ATOMS)}',
      f'{new} = os.path.join({arg}, {_quoted(rng, _KEYS)})',
      f'{new} = len({arg})',
      f'{new} = {arg}.split({_quoted(rng, (",", ":", "."))})',
      f'if not {arg}:\n{indent}    return None',
      f'{new} = {{}}',
      f'{new} = []',
      f'{new} = int({arg})',
      f'{new} = getattr({arg}, {_quoted(rng, _KEYS)}, None)',
      f'{arg} = self._{arg}' if method else f'{arg} = {arg}[1:]',
      f'self._{new} = {arg}' if method else f'{new} = list({arg})',
  ))


def _fillers(rng, indent, args, low=0, high=2):
  return [_statement(rng, indent, args) for _ in range(rng.randint(low, high))]


def single_double_quote(rng):
  """Close a string with the quote that opened it; other strings distract."""
  templates = (
      ('raise ValueError(', ')'), ('raise TypeError(', ')'), ('msg = ', ''),
      ('name = ', ''), ('self.assertEqual(result, ', ')'), ('print(', ')'),
      ('warnings.warn(', ', DeprecationWarning)'), ('parser.error(', ')'),
      ('sys.stderr.write(', ')'), ('return ', ''), ('if mode == ', ':'),
      ('headers[', '] = value'), ('self._name = ', ''), ('prefix = ', ''),
      ('logger.debug(', ')'), ('options.setdefault(', ', None)'),
      ('encoding = ', ''), ('raise RuntimeError(', ')'),
  )
  lines, indent, args = _function(rng, fillers=(0, 0))
  for _ in range(rng.randint(0, 3)):
    if rng.random() < 0.5:
      lines.append(_statement(rng, indent, args))
    else:
      before, after = _pick(rng, templates)
      q = _pick(rng, _QUOTES)
      lines.append(f'{indent}{before}{q}{_phrase(rng)}{q}{after}')
      if after == ':':
        lines.append(f'{indent}    return None')
  quote = _pick(rng, _QUOTES)
  before, _ = _pick(rng, templates)
  lines.append(f'{indent}{before}{quote}{_phrase(rng)}')
  return _datapoint(lines, quote, _QUOTES[1 - _QUOTES.index(quote)])


def bracket_counting(rng):
  """`)` or `))`: how many parentheses are open at the end.

  The paper counts brackets, `]` against `]]`, but `]]` is a marginal merge
  in a 2048-token BPE of the standard library (about the 2000th, and missing
  from most 300-file samples of it), while `))` is a common token and
  parentheses nest the same way. With one open, `))` is a syntax error. With
  two open, `)` is legal but must be followed by another argument, and
  prompts end where one would close the whole call, as in `len(str(x))`.
  Closed calls and subscripts in the arguments are distractors.
  """
  depth = rng.choice((1, 2))

  def closed():
    if rng.random() < 0.4:
      return f'{_pick(rng, _CALLS)}({_pick(rng, _ATOMS)})'
    return _pick(rng, _ATOMS + ('x[0]', 'args[1:]', 'self._items[i]'))

  expr = ''
  for _ in range(depth):
    before = ''.join(closed() + ', ' for _ in range(rng.choice((0, 0, 1, 2))))
    expr += f'{_pick(rng, _CALLS)}({before}'
  expr += _pick(rng, _ATOMS)
  stmt = _pick(rng, ('{} = {}', 'return {1}', 'yield {1}', 'if {1}',
                     'assert {1}', 'self._{} = {}', '{} += {}'))
  lines, indent, _ = _function(rng)
  lines.append(indent + stmt.format(_pick(rng, _NAMES), expr))
  return _datapoint(lines, ')' * depth, ')' * (3 - depth))


def bracket_brace(rng):
  """`]` or `}`: which kind of bracket is innermost open (list, dict, set)."""
  def key():
    return _quoted(rng, _KEYS)

  def kv():
    return ', '.join(f'{key()}: {_pick(rng, _ATOMS)}'
                     for _ in range(rng.randint(1, 3)))

  seq, item = _pick(rng, _SEQS)
  kind = _pick(rng, ('list', 'dict'))
  if kind == 'list':
    expr = _pick(rng, (
        f'[{_atoms(rng)}',
        f'[{item} for {item} in {seq}',
        f'[{{{kv()}}}, {{{kv()}}}, {_atoms(rng)}',
        f'{{{kv()}, {key()}: [{_atoms(rng)}',
        f'({_atoms(rng)}, [{_atoms(rng)}',
    ))
  else:  # Sets close with `}` too.
    expr = _pick(rng, (
        f'{{{kv()}',
        f'{{{_atoms(rng)}',
        f'{{{item}: {_pick(rng, _ATOMS)} for {item} in {seq}',
        f'[{{{kv()}}}, {{{kv()}',
        f'{{{kv()}, {key()}: [{_atoms(rng)}], {key()}: {_pick(rng, _ATOMS)}',
    ))
  lines, indent, _ = _function(rng)
  stmt = _pick(rng, ('{} = {}', 'return {1}', 'self._{} = {}',
                     '{}.update({}', '{}.append({}'))
  lines.append(indent + stmt.format(_pick(rng, _NAMES), expr))
  correct = ']' if kind == 'list' else '}'
  return _datapoint(lines, correct, '}' if correct == ']' else ']')


def _set_or_string(rng, fixed_name):
  is_set = rng.random() < 0.5
  seq, item = _pick(rng, _SEQS)
  accumulators = ('result', 'out', 'seen', 'found', 'text', 'buf', 'acc',
                  'names', 'output', 'collected', 'pending', 'chars', 'parts',
                  'visited', 'res', 'words', 'keys', 'data', 'lines', 's')
  var, other = ('x', None) if fixed_name else _pick(
      rng, [a for a in accumulators if a != seq], 2)
  empty_str = _pick(rng, ("''", '""'))
  inits = [f'    {var} = {"set()" if is_set else empty_str}']
  if other and rng.random() < 0.5:  # A variable of the other type.
    inits.append(f'    {other} = {empty_str if is_set else "set()"}')
    rng.shuffle(inits)
  else:
    other = None
  lines, _, _ = _function(rng, [seq], method=False, fillers=(0, 1))
  lines += inits + [f'    for {item} in {seq}:']
  lines += rng.choice((
      [], [f'        if not {item}:', '            continue'],
      [f'        if {item}.startswith({empty_str[0]}_{empty_str[0]}):',
       '            continue'],
      [f'        {item} = {item}.strip()']))
  if other and rng.random() < 0.7:
    lines.append(f'        {other} += {item}' if is_set
                 else f'        {other}.add({item})')
  lines.append(f'        {var}')
  return _datapoint(lines, *(('.', ' +=') if is_set else (' +=', '.')))


def set_or_string(rng):
  """`.` (for `.add`) or ` +=`: was the variable made by `set()` or `''`?

  Names vary and half the prompts also build a variable of the other type,
  so the model has to bind the name to its initialisation.
  """
  return _set_or_string(rng, fixed_name=False)


def set_or_string_fixedvarname(rng):
  """`set_or_string` with the variable always named `x` and no distractor."""
  return _set_or_string(rng, fixed_name=True)


def final_kwarg(rng):
  """`)` or `,`: has the call passed every required keyword argument?

  The callee's parameters have no defaults, so leaving one out is an error;
  they are passed by keyword, in order or shuffled.
  """
  params = _pick(rng, _NAMES, rng.randint(3, 5))
  first, keywords = params[0], params[1:]
  star = '*, ' if rng.random() < 0.5 else ''
  callee = _func_name(rng)
  lines = [f'def {callee}({first}, {star}{", ".join(keywords)}):']
  if rng.random() < 0.5:
    lines.append(f'    """{_pick(rng, _VERBS).capitalize()} the '
                 f'{_pick(rng, _NOUNS)} of *{first}*."""')
  lines += [f'    return {first}.{_pick(rng, _VERBS)}({keywords[0]})', '', '']
  caller, _, caller_args = _function(rng, method=False, fillers=(0, 1))
  lines += caller
  complete = rng.random() < 0.5
  passed = list(keywords) if complete else rng.sample(
      keywords, rng.randint(1, len(keywords) - 1))
  if complete and rng.random() < 0.5:
    rng.shuffle(passed)
  values = caller_args + list(_ATOMS)
  kwargs = ', '.join(f'{k}={_pick(rng, values)}' for k in passed)
  call = _pick(rng, ('return ', 'result = ', f'{_pick(rng, _NAMES)} = '))
  lines.append(f'    {call}{callee}({_pick(rng, caller_args)}, {kwargs}')
  return _datapoint(lines, *((')', ',') if complete else (',', ')')))


def class_init(rng):
  """In `__init__`, `self.size =` is followed by the parameter ` size`.

  Storing another parameter there is legal, but `__init__` copies each
  parameter to its own attribute.
  """
  params = _pick(rng, _NAMES, rng.randint(2, 5))
  n_defaults = rng.randint(0, len(params) - 1)
  signature = ', '.join(
      p if i < len(params) - n_defaults else
      f'{p}={_pick(rng, ("None", "0", "False", "True", "1", "()", "-1"))}'
      for i, p in enumerate(params))
  base = _pick(rng, ('', '', '(object)', f'({_pick(rng, _CLASSES)})'))
  lines = [f'class {_pick(rng, _CLASSES)}{base}:']
  if rng.random() < 0.5:
    lines.append(f'    """A {_pick(rng, _NOUNS)} read from a '
                 f'{_pick(rng, _NOUNS)}."""')
    lines.append('')
  lines.append(f'    def __init__(self, {signature}):')
  private = '_' if rng.random() < 0.4 else ''
  target = _pick(rng, params)
  for p in params:
    if p != target and rng.random() < 0.7:
      lines.append(f'        self.{private}{p} = {p}')
    if rng.random() < 0.2:
      attr = _pick(rng, [k for k in _KEYS if k not in params])
      lines.append(f'        self._{attr} = '
                   f'{_pick(rng, ("None", "False", "[]", "{}", "0"))}')
  lines.append(f'        self.{private}{target} =')
  wrong = _pick(rng, [p for p in params if p != target])
  return _datapoint(lines, ' ' + target, ' ' + wrong)


def with_as(rng):
  """The body of `with open(path) as f:` reads from ` f`, not ` path`.

  Half the prompts also open an output file in the same `with`; then the
  body either reads (from the input's name) or writes (to the output's), and
  `f` or `file` can be either, so the model must bind names to roles.
  """
  opener = _pick(rng, ('open({})', 'open({}, "rb")', "open({}, 'r')",
                       'gzip.open({})', 'tokenize.open({})',
                       "open({}, encoding='utf-8')", 'self._open({})',
                       'io.open({}, newline="")'))
  res, alias = _pick(rng, (('path', 'f'), ('filename', 'f'), ('name', 'f'),
                           ('file', 'f'), ('path', 'file'),
                           ('filename', 'file'), ('name', 'file')))
  args = [res] + _pick(rng, ('encoding', 'errors', 'mode', 'data', 'count',
                             'config'), rng.randint(0, 2))
  lines, indent, _ = _function(rng, args)
  items = f'{opener.format(res)} as {alias}'
  contexts = (('for line in', ' '), ('data = json.load(', ''),
              ('return pickle.load(', ''), ('rows = list(csv.reader(', ''),
              ('lines = list(', ''), ('for lineno, line in enumerate(', ''),
              ('tree = ast.parse(', ''), ('return self._parse(', ''),
              ('header = read_header(', ''))
  right, wrong = alias, res
  if rng.random() < 0.5:
    out = _pick(rng, [n for n in ('out', 'f', 'file') if n not in (alias, res)])
    items += f", open({res} + '.tmp', 'w') as {out}"
    right, wrong = alias, out
    if rng.random() < 0.5:
      contexts = (('json.dump(data,', ' '), ('pickle.dump(obj,', ' '),
                  ('print(line, file=', ''), ('writer = csv.writer(', ''),
                  ('shutil.copyfileobj(buf,', ' '), ('self._write(', ''))
      right, wrong = out, alias
  lines.append(f'{indent}with {items}:')
  context, space = _pick(rng, contexts)
  lines.append(f'{indent}    {context}')
  return _datapoint(lines, space + right, space + wrong)


def with_open(rng):
  """`r` or `w` in `open(path, '`: the function's name says which.

  Verbs like `load` and `save`, a docstring half the time, and the data
  argument that writers take all point the same way.
  """
  write = rng.random() < 0.5
  verbs = (('read', 'load', 'parse', 'restore', 'fetch', 'scan') if not write
           else ('write', 'save', 'dump', 'store', 'export', 'emit'))
  verb, noun = _pick(rng, verbs), _pick(rng, _NOUNS)
  path = _pick(rng, ('path', 'filename', 'name', 'file', 'fn', 'dest'))
  args = f'self, {path}' if rng.random() < 0.4 else path
  if write:
    args += f', {_pick(rng, ("data", "lines", "obj", "text", "config"))}'
  q = _pick(rng, _QUOTES)
  lines = [f'def {_pick(rng, ("", "_"))}{verb}_{noun}({args}):']
  if rng.random() < 0.6:
    prep = 'to' if write else 'from'
    lines.append(f'    """{verb.capitalize()} the {noun} {prep} *{path}*."""')
  lines += _fillers(rng, '    ', [path], 0, 1)
  lines.append(_pick(rng, (f'    with open({path}, {q}',
                           f'    f = open({path}, {q}',
                           f'    with open({path}, mode={q}')))
  return _datapoint(lines, *(('w', 'r') if write else ('r', 'w')))


def for_while(rng):
  """` in` after `for target`, `:` after `while condition`."""
  is_for = rng.random() < 0.5
  lines, indent, _ = _function(rng)
  if is_for:
    seq, item = _pick(rng, _SEQS)
    target = _pick(rng, (item, f'i, {item}', 'key, value', 'name', 'k, v',
                         '_', 'line', 'i', f'{item}, value'))
    lines.append(f'{indent}for {target}')
  else:
    cond = _pick(rng, _CONDITIONS + ('True', '1', 'queue', 'not done',
                                     'self._running', 'stack'))
    lines.append(f'{indent}while {cond}')
  return _datapoint(lines, *((' in', ':') if is_for else (':', ' in')))


def else_elif(rng):
  """` elif` or ` else` at the start of a line: which header does it continue?

  `elif` is only legal after an `if`; after a `for`, `while` or `try` block
  only `else` is. The `if` chains dispatch on a variable whose allowed values
  are checked above and not all tested yet, so another `elif` is expected.
  The prompt's last block is sometimes nested deeper, so the model must match
  the indentation rather than look at the latest header. The prompt ends one
  space short of the keyword's indent, as BPE splits `    else` that way.
  """
  is_if = rng.random() < 0.5
  lines, indent, _ = _function(rng, fillers=(0, 1))
  var = _pick(rng, ('kind', 'mode', 'op', 'action', 'how', 'typ', 'which'))
  choices = _pick(rng, ('file', 'dir', 'link', 'fifo', 'socket', 'block',
                        'read', 'write', 'append', 'add', 'sub', 'mul', 'div',
                        'start', 'stop', 'restart', 'status'), 4)
  q = _pick(rng, _QUOTES)

  def body(ind):
    return [ind + _pick(rng, (
        f'return {_pick(rng, _ATOMS)}',
        f'self._{_pick(rng, _KEYS)} = {_pick(rng, _ATOMS)}',
        f'{_pick(rng, _NAMES)}.append({_pick(rng, _ATOMS)})',
        f'{_pick(rng, _NAMES)} = {_pick(rng, _ATOMS)}'))
            for _ in range(rng.randint(1, 2))]

  inner = indent + '    '
  if is_if:
    listed = ', '.join(f'{q}{c}{q}' for c in choices)
    lines += [f'{indent}if {var} not in ({listed}):',
              f'{inner}raise ValueError({q}bad {var}: %r{q} % {var})']
    for i in range(rng.randint(1, 2)):
      keyword = 'elif' if i else 'if'
      lines.append(f'{indent}{keyword} {var} == {q}{choices[i]}{q}:')
      lines += body(inner)
    if rng.random() < 0.4:  # A deeper `for` block the answer must skip.
      seq, item = _pick(rng, _SEQS)
      lines.append(f'{inner}for {item} in {seq}:')
      lines += body(inner + '    ')
  else:
    seq, item = _pick(rng, _SEQS)
    header = _pick(rng, ('for', 'while', 'try'))
    if header == 'for':
      lines.append(f'{indent}for {item} in {seq}:')
    elif header == 'while':
      lines.append(f'{indent}while {_pick(rng, _CONDITIONS)}:')
    else:
      lines.append(f'{indent}try:')
      lines += body(inner)
      error = _pick(rng, ('KeyError', 'OSError', 'ValueError', 'ImportError'))
      lines.append(f'{indent}except {error}:')
    if rng.random() < 0.4:  # A deeper `if` block the answer must skip.
      lines.append(f'{inner}if {_pick(rng, _CONDITIONS)}:')
      lines += body(inner + '    ')
      if header != 'try':
        lines.append(f'{inner}    break')
    else:
      lines += body(inner)
  lines.append(indent[:-1])
  return _datapoint(lines, *((' elif', ' else') if is_if else
                             (' else', ' elif')))


def fstring_brace(rng):
  """`}` or the closing quote: is an f-string replacement field still open?

  Before Python 3.12 neither may appear in the other's place: the quote
  cannot occur inside a field, and a lone `}` is an error in the text. The
  prompt ends after a word, inside or outside a field, with the field's
  brackets balanced so far.
  """
  q = _pick(rng, _QUOTES)
  in_field = rng.random() < 0.5
  cuts = []
  while not cuts:
    text, field = _pick(rng, _FSTRINGS), None
    for i, c in enumerate(text):
      field = i if c == '{' else None if c == '}' else field
      inside = field is not None
      if (c.isalnum() and not (text[i + 1:i + 2].isalnum() or
                               text[i + 1:i + 2] == '_')
          and inside == in_field and
          (not inside or text.count('(', field, i) ==
           text.count(')', field, i))):
        cuts.append(i + 1)
  templates = ('raise ValueError({}', 'msg = {}', 'print({}', 'return {}',
               'self.fail({}', 'logger.warning({}', 'lines.append({}',
               'raise OSError(errno.ENOENT, {}', 'sys.stdout.write({}')
  lines, indent, _ = _function(rng)
  literal = f'f{q}{text[:_pick(rng, cuts)]}'
  lines.append(indent + _pick(rng, templates).format(literal))
  return _datapoint(lines, *(('}', q) if in_field else (q, '}')))


def _keyword(rng, indent, keywords):
  """One of `keywords`, and the `if` block it needs first if it is `elif`."""
  keyword = _pick(rng, keywords)
  if keyword != 'elif':
    return [], keyword
  return [f'{indent}if {_pick(rng, _CONDITIONS)}:',
          f'{indent}    return {_pick(rng, _ATOMS)}'], keyword


def if_ternary(rng):
  """`:` after an `if` statement's condition, ` else` after a conditional
  expression's."""
  ternary = rng.random() < 0.5
  cond = _pick(rng, _CONDITIONS)
  lines, indent, args = _function(rng)
  if ternary:
    a, b = _pick(rng, _NAMES), _pick(rng, args)
    lines.append(indent + _pick(rng, (
        f'{a} = {b} if {cond}', f'return {b} if {cond}',
        f'self._{a} = {_pick(rng, _ATOMS)} if {cond}',
        f'{a}.append({b} if {cond}', f'yield {b} if {cond}')))
  else:
    before, keyword = _keyword(rng, indent, ('if', 'elif', 'while'))
    lines += before + [f'{indent}{keyword} {cond}']
  return _datapoint(lines, *((' else', ':') if ternary else (':', ' else')))


def var_swap(rng):
  """`a, b = b,` is followed by ` a`: completing a swap.

  `a, b = b, b` is legal but would be written `a = b`.
  """
  form = rng.random()
  lines, indent, _ = _function(rng)
  if form < 0.5:
    a, b = _pick(rng, (('a', 'b'), ('x', 'y'), ('i', 'j'), ('j', 'k'),
                       ('start', 'end'), ('key', 'value'), ('name', 'value'),
                       ('s', 't'), ('n', 'm'), ('p', 'r'), ('c', 'd'),
                       ('w', 'h'), ('text', 'data'), ('path', 'name')))
    if rng.random() < 0.5:
      a, b = b, a
    if rng.random() < 0.5:
      lines.append(f'{indent}if {a} > {b}:')
      indent += '    '
    lines.append(f'{indent}{a}, {b} = {b},')
    return _datapoint(lines, ' ' + a, ' ' + b)
  if form < 0.8:  # Swapping two elements of a sequence.
    a, b = _pick(rng, (('i', 'j'), ('j', 'k'), ('i', 'k'), ('start', 'end'),
                       ('i', 'n'), ('a', 'b'), ('x', 'y'), ('p', 'q')))
    seq = _pick(rng, ('items', 'values', 'data', 'self._heap', 'lst', 'perm'))
    line = '{0}[{1}], {0}[{2}] = {0}[{2}], {0}['
  else:  # Swapping two attributes.
    a, b = _pick(rng, (('x', 'y'), ('start', 'end'), ('key', 'value'),
                       ('name', 'value'), ('w', 'h'), ('u', 'v')))
    seq = _pick(rng, ('self', 'node', 'other', 'self._range', 'rect'))
    line = '{0}.{1}, {0}.{2} = {0}.{2}, {0}.'
  if rng.random() < 0.5:
    a, b = b, a
  lines.append(indent + line.format(seq, a, b))
  return _datapoint(lines, a, b)


def indent_for(rng):
  """The line after `for ...:` is indented one level deeper.

  Byte-level BPE tokenizes a newline and all but the last space of the next
  line's indent as one token, so the candidates are `\n` plus 7 or 11
  spaces: deeper than the loop (right) or level with it (a syntax error).
  The loop sits 4 or 8 spaces deep, so each candidate is right in half the
  prompts.
  """
  deep = rng.random() < 0.5
  lines, indent, args = _function(rng, method=deep and rng.random() < 0.6)
  if deep and len(indent) == 4:
    lines.append(indent + _pick(rng, (
        f'if {_pick(rng, _CONDITIONS)}:',
        f'with open({_pick(rng, _NAMES)}) as f:',
        'with self._lock:', f'while {_pick(rng, _CONDITIONS)}:',
        f'for {_pick(rng, _NAMES)} in {_pick(rng, args)}:')))
    indent += '    '
    lines += _fillers(rng, indent, args, 0, 1)
  seq, item = _pick(rng, _SEQS)
  lines.append(indent + _pick(rng, (
      f'for {item} in {seq}:', f'for i in range(len({seq})):',
      f'for key, value in self._{_pick(rng, _KEYS)}.items():',
      f'for i, {item} in enumerate({seq}):', 'for line in f:',
      f'for name in sorted(os.listdir({_pick(rng, _NAMES)})):',
      f'for _ in range({_pick(rng, _ATOMS)}):', f'for {item} in self.{seq}:',
      f'for {item} in reversed({seq}):')))
  body, level = (' ' * 11, ' ' * 7) if deep else (' ' * 7, ' ' * 3)
  return _datapoint(lines, '\n' + body, '\n' + level)


def lambda_func(rng):
  """`:` after a lambda's parameters, `)` after a def's.

  A def parameter could take a `:` annotation; the standard library rarely
  annotates, and the earlier parameters here never are.
  """
  is_lambda = rng.random() < 0.5
  names = _pick(rng, _NAMES, rng.randint(2, 4))
  params = ', '.join(names[:-1])
  if is_lambda:
    lines, indent, _ = _function(rng)
    seq, item = _pick(rng, _SEQS)
    lines.append(indent + _pick(rng, (
        f'{seq}.sort(key=lambda {item}',
        f'return sorted({seq}, key=lambda {item}',
        f'callback = lambda {params}', f'self._{item} = lambda {params}',
        f'return map(lambda {item}', f'{item} = max({seq}, key=lambda {item}',
        f'return filter(lambda {item}', f'atexit.register(lambda {params}')))
  else:
    lines = []
    if rng.random() < 0.5:  # Another function first.
      lines = _function(rng, fillers=(1, 2))[0] + ['']
    method = rng.random() < 0.5
    prefix = '    ' if method else ''
    if method:
      lines.append(f'class {_pick(rng, _CLASSES)}:')
      params = 'self, ' + params
    last = _pick(rng, (names[-1], f'{names[-1]}=None',
                       f'{names[-1]}={_pick(rng, _ATOMS)}'))
    lines.append(f'{prefix}def {_func_name(rng)}({params}, {last}')
  return _datapoint(lines, *((':', ')') if is_lambda else (')', ':')))


def if_equals(rng):
  """` ==` in a condition, ` =` at the start of a statement.

  A comparison as a statement (`self.mode == x`) is legal but does nothing.
  """
  compare = rng.random() < 0.5
  lines, indent, args = _function(rng)
  target = _pick(rng, (_pick(rng, args), f'self.{_pick(rng, _NAMES)}',
                       f'self._{_pick(rng, _NAMES)}',
                       f'{_pick(rng, _NAMES)}.{_pick(rng, _KEYS)}'))
  if compare:
    before, keyword = _keyword(rng, indent, ('if', 'elif', 'while', 'assert',
                                             'if not', 'return', 'if x and'))
    lines += before + [f'{indent}{keyword} {target}']
  else:
    lines.append(indent + target)
  return _datapoint(lines, *((' ==', ' =') if compare else (' =', ' ==')))


def enumerate_range(rng):
  """`enumerate(` takes the sequence, `range(` takes `len` of it."""
  use_range = rng.random() < 0.5
  seq, item = _pick(rng, (('lines', 'line'), ('args', 'arg'), ('keys', 'key'),
                          ('data', 'byte'), ('text', 'char')))
  lines, indent, _ = _function(rng, [seq])
  if use_range:
    lines.append(f'{indent}for i in range(')
  else:
    lines.append(f'{indent}for i, {item} in enumerate(')
  return _datapoint(lines, *(('len', seq) if use_range else (seq, 'len')))


def while_return_true(rng):
  """` False` after a loop whose body returns True, and vice versa.

  Returning the same value after the loop as inside it would make the
  early return pointless.
  """
  early = rng.choice(('True', 'False'))
  late = 'False' if early == 'True' else 'True'
  noun, attr = _pick(rng, _NOUNS), _pick(rng, _KEYS)
  name = _pick(rng, ('value', 'key', 'name', 'chars', 'sep', 'prefix',
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
            f'        if {_pick(rng, ("not ", ""))}node.{attr}:',
            f'            return {early}',
            f'        stack.extend(node.{_pick(rng, ("children", "_nodes"))})']
  else:
    seq, item = _pick(rng, _SEQS)
    args = seq
    body = [f'    for {item} in {seq}:',
            f'        if {item}.{_pick(rng, ("startswith", "endswith"))}('
            f'{_quoted(rng, _KEYS)}):', f'            return {early}']
  lines = [f'def {_pick(rng, ("is", "has", "_is", "_has", "contains"))}_{noun}'
           f'({args}):']
  if rng.random() < 0.5:
    lines.append(f'    """Return {early} if any {noun} matches."""')
  lines += body + ['    return']
  return _datapoint(lines, ' ' + late, ' ' + early)


TASKS: dict[str, Callable[[random.Random], dict]] = {
    f.__name__: f for f in (
        single_double_quote, bracket_counting, set_or_string,
        set_or_string_fixedvarname, final_kwarg, class_init, with_as,
        bracket_brace, with_open, for_while, else_elif, fstring_brace,
        if_ternary, var_swap, indent_for, lambda_func, if_equals,
        enumerate_range, while_return_true)
}


def generate(name, n, seed=0):
  """`n` datapoints of task `name`, the same for the same seed.

  No candidate is the correct one in more than half of them (rounded up),
  nor the incorrect one. Where one candidate is in every datapoint (`}` in
  `fstring_brace`, both in most tasks) that balances the two classes exactly,
  so a model that ignores the prompt scores at most chance. Generators draw
  either class with probability 1/2, so the last places take about n extra
  draws.
  """
  if name not in TASKS:
    raise ValueError(f'Unknown task {name!r}; known tasks: {", ".join(TASKS)}')
  rng = random.Random(seed)
  counts = collections.Counter()
  data = []
  while len(data) < n:
    d = TASKS[name](rng)
    roles = [('correct', d['correct']), ('incorrect', d['incorrect'])]
    if all(counts[r] < (n + 1) // 2 for r in roles):
      counts.update(roles)
      data.append(d)
  return data


def load_jsonl(path):
  """A user task: one `{"prompt", "correct", "incorrect"}` object per line."""
  data = []
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{path}:{lineno}'
      try:
        d = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where}: not JSON ({e}).') from None
      if not isinstance(d, dict):
        raise ValueError(
            f'{where}: expected an object, got {type(d).__name__}.')
      missing = [k for k in ('prompt', 'correct', 'incorrect') if k not in d]
      if missing:
        raise ValueError(f'{where}: missing key(s) {", ".join(missing)}.')
      d = {k: d[k] for k in ('prompt', 'correct', 'incorrect')}
      if not all(isinstance(v, str) and v for v in d.values()):
        raise ValueError(f'{where}: prompt, correct and incorrect must be '
                         'non-empty strings.')
      if d['correct'] == d['incorrect']:
        raise ValueError(f'{where}: correct and incorrect are the same.')
      data.append(d)
  if not data:
    raise ValueError(f'{path}: no datapoints.')
  return data


def encode(datapoints, tokenizer, seq_len, name='datapoints'):
  """Token arrays for `datapoints`, checked against `tokenizer`.

  Each candidate must be one token, or its logit would not be its
  probability. Token 0 is padding, so prompts and candidates must not
  contain it. A datapoint is kept only if BPE merges nothing across the
  prompt/candidate boundary for either candidate, or the model would be
  scored on a token that never follows this prompt in real text; the tasks
  here are written so that this holds, and skipped datapoints are counted in
  the log. `name` labels errors and log lines.

  Returns `tokens` int32 [N, seq_len] (right-padded with 0; long prompts keep
  their last seq_len tokens), `lengths` [N] (prompt tokens kept), the
  `correct` and `incorrect` token ids [N], and `index` [N], each row's
  position in `datapoints`.
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
                           'not one non-padding token.')
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
      rows.append((e.ids[-seq_len:], c[0], i[0], index))
  skipped = len(datapoints) - len(rows)
  if not rows:
    raise ValueError(f'{name}: in all {skipped} datapoints a candidate merges '
                     'with the end of the prompt.')
  if skipped:
    logging.warning('%s: skipped %d of %d datapoints where a candidate merges '
                    'with the end of the prompt.', name, skipped,
                    len(datapoints))
  tokens = np.zeros((len(rows), seq_len), np.int32)
  for r, (ids, *_) in enumerate(rows):
    tokens[r, :len(ids)] = ids
  _, correct, incorrect, index = zip(*rows)
  return {
      'tokens': tokens,
      'lengths': np.array([len(ids) for ids, *_ in rows], np.int32),
      'correct': np.array(correct, np.int32),
      'incorrect': np.array(incorrect, np.int32),
      'index': np.array(index, np.int32),
  }


def task_loss(logits_last, correct, incorrect):
  """Binary cross-entropy between the two candidates, and accuracy.

  logits_last: [N, vocab] at the last prompt position.
  """
  rows = jnp.arange(logits_last.shape[0])
  margin = (logits_last[rows, correct] -
            logits_last[rows, incorrect]).astype(jnp.float32)
  return jnp.mean(jax.nn.softplus(-margin)), jnp.mean(margin > 0)


def last_logits(logits, lengths):
  """Logits [N, L, V] at each row's last prompt position -> [N, V]."""
  return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
