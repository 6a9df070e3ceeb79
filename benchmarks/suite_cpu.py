"""The test suite's CPU, test by test: a pytest plugin, and its summary.

The suite's wall time from an empty compile cache is what CI pays, and on a
2-core machine it is its CPU over two: most of it in the processes tests
start (a command line, fake devices), which pytest's --durations times only
as wall time, inflated by whatever the other worker runs meanwhile. This
plugin records each test's own CPU and that of the children it waited for:

  rm -rf /tmp/sparse_gpt2_jax_cache  # An empty compile cache, as CI's.
  SUITE_CPU=/tmp/suite_cpu.jsonl PYTHONPATH=benchmarks \\
      python -m pytest -q -p suite_cpu
  python benchmarks/suite_cpu.py /tmp/suite_cpu.jsonl

Each worker appends a line a test: {"id", "wall", "self", "children"}, in
seconds (setup and teardown included).
"""

import collections
import json
import os
import resource
import sys
import time

import pytest


def _cpu():
  """(this process's CPU, its waited-for children's) in seconds."""
  own, children = (resource.getrusage(who) for who in (
      resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
  return (own.ru_utime + own.ru_stime,
          children.ru_utime + children.ru_stime)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):  # pylint: disable=unused-argument
  start, (own, children) = time.perf_counter(), _cpu()
  yield
  own_end, children_end = _cpu()
  with open(os.environ['SUITE_CPU'], 'a') as f:
    f.write(json.dumps({'id': item.nodeid,
                        'wall': time.perf_counter() - start,
                        'self': own_end - own,
                        'children': children_end - children}) + '\n')


def main(path, top=20):
  rows = [json.loads(line) for line in open(path)]
  cpu = lambda r: r['self'] + r['children']
  print(f"{len(rows)} tests: {sum(cpu(r) for r in rows):,.0f} s of CPU, "
        f"{sum(r['self'] for r in rows):,.0f} in the pytest workers and "
        f"{sum(r['children'] for r in rows):,.0f} in processes they started")
  files = collections.defaultdict(float)
  for r in rows:
    files[r['id'].split('::')[0]] += cpu(r)
  for name, seconds in sorted(files.items(), key=lambda f: -f[1]):
    print(f'{seconds:8.1f} s  {name}')
  print(f'the {top} longest:')
  for r in sorted(rows, key=cpu, reverse=True)[:top]:
    print(f"{cpu(r):8.1f} s  {r['id']}")


if __name__ == '__main__':
  if len(sys.argv) != 2:
    sys.exit('usage: suite_cpu.py SUITE_CPU_FILE')
  main(sys.argv[1])
