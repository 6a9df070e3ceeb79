"""Word pools and prompt helpers for the circuit tasks in `tasks`.

Prompts imitate the CPython standard library the model is trained on:
4-space indents, identifiers and values drawn from varied pools, varied
lengths. The helpers draw from a `random.Random`, so a task generator that
calls them in the same order for both members of a contrastive pair gets the
same code in both.
"""

QUOTES = ("'", '"')

# Names that are single tokens after a space in each of 16 2048-token BPEs
# trained on 300 random standard-library files, with ids under 1450 in one
# trained on all of it. Names nearer the end of the vocabulary
# (` timeout`, ` flags`, ` count`, ...) come and go with the sample. Tasks whose
# answer is a name draw it from here.
NAMES = (
    'name', 'path', 'size', 'data', 'value', 'key', 'encoding', 'default',
    'context', 'method', 'state', 'code', 'text', 'file', 'filename', 'args',
    'values', 'message', 'msg', 'start', 'end', 'result', 'obj', 'line', 'out',
)
VERBS = (
    'get', 'parse', 'format', 'check', 'make', 'find', 'build', 'update',
    'handle', 'process', 'normalize', 'split', 'resolve', 'convert', 'collect',
    'validate', 'compute', 'extract', 'render', 'encode', 'decode', 'lookup',
    'iter', 'add', 'remove', 'reset', 'apply', 'visit', 'scan', 'strip',
)
NOUNS = (
    'name', 'path', 'header', 'config', 'state', 'entry', 'record', 'node',
    'token', 'line', 'message', 'request', 'module', 'source', 'field',
    'option', 'section', 'element', 'attribute', 'frame', 'buffer', 'archive',
    'member', 'address', 'cookie', 'charset', 'locale', 'pattern', 'handler',
    'signature', 'manifest', 'index', 'cache', 'package', 'params', 'tokens',
    'names', 'items', 'lines', 'args', 'fields', 'values', 'parts', 'chunks',
)
CLASSES = (
    'Entry', 'Record', 'Handler', 'Connection', 'Request', 'Parser', 'Reader',
    'Writer', 'Session', 'Token', 'Node', 'Option', 'Section', 'Frame',
    'Member', 'Formatter', 'Result', 'Channel', 'Worker', 'Job', 'Event',
    'Message', 'Header', 'Cookie', 'Policy', 'Loader', 'Finder', 'Spec',
    'Transport', 'Protocol', 'Server', 'Client', 'Context', 'Stream', 'Queue',
)
SEQS = (  # A sequence parameter and the name of one of its elements.
    ('items', 'item'), ('lines', 'line'), ('args', 'arg'), ('names', 'name'),
    ('values', 'value'), ('keys', 'key'), ('parts', 'part'),
    ('fields', 'field'), ('tokens', 'token'), ('nodes', 'node'),
    ('entries', 'entry'), ('paths', 'path'), ('words', 'word'),
    ('chunks', 'chunk'), ('files', 'filename'), ('modules', 'module'),
)
ATOMS = (
    '0', '1', '2', '3', '8', '16', '32', '64', '255', '1024', '-1', 'None',
    'True', 'False', 'x', 'n', 'i', 'size', 'count', 'self.width', 'offset',
    'n - 1', 'i + 1', 'self.count', 'MAX_SIZE', 'sys.maxsize', 'os.sep',
    'value', 'key', 'self.mode', 'DEFAULT_TIMEOUT', 'b', 'pos', 'start',
)
CALLS = (
    'len', 'str', 'int', 'repr', 'sorted', 'list', 'set', 'tuple', 'max',
    'min', 'print', 'format', 'abs', 'round', 'getattr', 'isinstance', 'zip',
    'os.path.join', 'os.path.dirname', 'os.fspath', 'self._get', 'map',
    'self._convert', 'dict', 'enumerate', 'bytes', 'hash', 'callable',
)
CONDITIONS = (  # Complete boolean expressions ending in a word or number.
    'x is None', 'self.debug', 'n > 0', 'not args', 'key in cache',
    'i < n', 'self._closed', 'node is not None', 'pos >= end', 'not data',
    'size == 0', 'value is not None', 'count > 1', 'self.verbose',
    'isinstance(value, str) and value', 'name in self._names', 'timeout < 0',
    'len(items) > 1', 'mode == MODE_READ', 'sys.platform == WINDOWS',
)
KEYS = (
    'name', 'version', 'timeout', 'mode', 'host', 'port', 'level', 'path',
    'encoding', 'size', 'count', 'debug', 'user', 'flags', 'format', 'type',
    'default', 'maxsize', 'lineno', 'offset', 'key', 'value', 'id', 'args',
)
STRINGS = (
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
FSTRINGS = (
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


def pick(rng, pool, k=None):
  """One element of `pool`, or a list of `k` distinct ones."""
  return rng.choice(pool) if k is None else rng.sample(pool, k)


def atom_list(rng):
  """1 to 4 atoms joined by commas: arguments or the items of a literal."""
  return ', '.join(pick(rng, ATOMS, rng.randint(1, 4)))


def func_name(rng):
  name = f'{pick(rng, VERBS)}_{pick(rng, NOUNS)}'
  return '_' + name if rng.random() < 0.3 else name


def phrase(rng, min_words=1):
  """A prefix of a message that ends inside a word, so quotes do not merge.

  It has at least `min_words` words, so with 2 the text before its last
  space does not end in the quote that opened it.
  """
  words = pick(rng, [s for s in STRINGS if s.count(' ') >= min_words - 1])
  words = words.split(' ')
  cut = rng.randint(min_words, len(words))
  while cut > min_words and not words[cut - 1][-1].isalnum():
    cut -= 1
  return ' '.join(words[:cut])


def quoted(rng, pool):
  q = pick(rng, QUOTES)
  return f'{q}{pick(rng, pool)}{q}'


def datapoint(lines, candidates, answer):
  """A task datapoint whose correct candidate is `candidates[answer]`."""
  return {'prompt': '\n'.join(lines), 'correct': candidates[answer],
          'incorrect': candidates[1 - answer]}


def function(rng, args=None, method=None, fillers=(0, 2), names=NAMES):
  """Opening lines of a function or a method, and statements using its args.

  `args` is a list of parameter names (random by default); `method` puts the
  function in a class (at random by default); `names` are those the
  statements may assign, which tasks that test variable scope restrict.
  Returns (lines, indent, args), indent being the body's.
  """
  args = args or pick(rng, names, rng.randint(1, 3))
  if method is None:
    method = rng.random() < 0.4
  if method:
    lines = [f'class {pick(rng, CLASSES)}:']
    if rng.random() < 0.5:
      doc = f'{pick(rng, CLASSES)} for {pick(rng, NOUNS)}.'
      lines += [f'    """{doc}"""', '']
    lines.append(f'    def {func_name(rng)}(self, {", ".join(args)}):')
    indent = '        '
  else:
    lines, indent = [f'def {func_name(rng)}({", ".join(args)}):'], '    '
  body = statements(rng, indent, args, *fillers, method=method, names=names)
  return lines + body, indent, args


def statement(rng, indent, args, method=False, names=NAMES):
  """A line that uses the function's `args`, so prompts vary.

  It may assign one of `names`; `method` says whether `self` is bound.
  """
  arg, new = pick(rng, args), pick(rng, names)
  return indent + pick(rng, (
      f'{new} = {arg}.strip()',
      f'if {arg} is None:\n{indent}    {arg} = {pick(rng, ATOMS)}',
      f'{new} = os.path.join({arg}, {quoted(rng, KEYS)})',
      f'{new} = len({arg})',
      f'{new} = {arg}.split({quoted(rng, (",", ":", "."))})',
      f'if not {arg}:\n{indent}    return None',
      f'{new} = {{}}',
      f'{new} = []',
      f'{new} = int({arg})',
      f'{new} = getattr({arg}, {quoted(rng, KEYS)}, None)',
      f'{arg} = self._{arg}' if method else f'{arg} = {arg}[1:]',
      f'self._{new} = {arg}' if method else f'{new} = list({arg})',
  ))


def statements(rng, indent, args, low=0, high=2, method=False, names=NAMES):
  """`low` to `high` statements, as `statement` makes them."""
  return [statement(rng, indent, args, method, names)
          for _ in range(rng.randint(low, high))]
