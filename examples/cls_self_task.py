r"""Writes a user task the circuits were never developed on: `cls_self`.

  python examples/cls_self_task.py [cls_self.jsonl]

A method's first parameter is `cls` under `@classmethod` and `self` under
`@property`: each contrastive pair is one class, its two prompts differ only
in the decorator, and the answers swap. The file is in the user-task format
(README, Circuits and the comparison), so `--task_file` and `compare
--tasks` take it as they take a built-in task.
"""

import json
import os
import random
import sys

CLASSES = ('Parser', 'Config', 'Record', 'Handler', 'Node', 'Reader', 'Entry',
           'Client', 'Table', 'Token')
NAMES = ('name', 'path', 'key', 'items', 'line', 'value', 'text', 'size',
         'data', 'default', 'source', 'result')
BASES = ('object', 'Base', 'dict', 'Exception')
PAIRS = 300


def datapoints():
  rng = random.Random(1)
  out = []
  for pair in range(PAIRS):
    cls, base = rng.choice(CLASSES), rng.choice(BASES)
    method, attr = rng.sample(NAMES, 2)
    noun, role = rng.choice(NAMES), rng.choice(['reader', 'holder', 'wrapper'])
    head = (f'class {cls}({base}):\n    """A {noun} {role}."""\n\n'
            f'    def __init__(self, {attr}):\n'
            f'        self._{attr} = {attr}\n\n')
    for decorator, correct, incorrect in (('classmethod', 'cls', 'self'),
                                          ('property', 'self', 'cls')):
      out.append({'prompt': f'{head}    @{decorator}\n    def {method}(',
                  'correct': correct, 'incorrect': incorrect, 'pair': pair})
  return out


def main(args):
  """Writes the task to the one path in `args`, as `--dump_prompts` writes a
  built-in task: to a `.jsonl` file only (what `--task_file` reads; a second
  path was ignored, and a name without `.jsonl` made a file the circuits
  refuse), never over a file that holds anything else (a run's
  `metrics.jsonl` was lost), and a path it cannot write said in one line."""
  if len(args) > 1 or (args and not args[0].endswith('.jsonl')):
    sys.exit(f'error: expected at most one .jsonl path, got {args}')
  path = args[0] if args else 'cls_self.jsonl'
  text = ''.join(json.dumps(d) + '\n' for d in datapoints())
  try:
    if os.path.isfile(path):
      with open(path, encoding='utf-8', errors='replace') as f:
        if f.read() != text:
          sys.exit(f'error: {path} exists and holds other datapoints or '
                   'records: name a new file, or remove it first')
    with open(path, 'w', encoding='utf-8') as f:
      f.write(text)
  except OSError as e:
    sys.exit(f'error: {e}')
  print(f'{2 * PAIRS} datapoints of cls_self -> {path}')


if __name__ == '__main__':
  main(sys.argv[1:])
