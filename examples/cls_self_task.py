r"""Writes a user task the circuits were never developed on: `cls_self`.

  python examples/cls_self_task.py [cls_self.jsonl]

A method's first parameter is `cls` under `@classmethod` and `self` under
`@property`: each contrastive pair is one class, its two prompts differ only
in the decorator, and the answers swap. The file is in the user-task format
(README, Circuits and the comparison), so `--task_file` and `compare
--tasks` take it as they take a built-in task.
"""

import json
import random
import sys

CLASSES = ('Parser', 'Config', 'Record', 'Handler', 'Node', 'Reader', 'Entry',
           'Client', 'Table', 'Token')
NAMES = ('name', 'path', 'key', 'items', 'line', 'value', 'text', 'size',
         'data', 'default', 'source', 'result')
BASES = ('object', 'Base', 'dict', 'Exception')
PAIRS = 300


def datapoints(seed=1):
  rng = random.Random(seed)
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


if __name__ == '__main__':
  path = sys.argv[1] if len(sys.argv) > 1 else 'cls_self.jsonl'
  with open(path, 'w', encoding='utf-8') as f:
    for d in datapoints():
      f.write(json.dumps(d) + '\n')
  print(f'{2 * PAIRS} datapoints of cls_self -> {path}')
