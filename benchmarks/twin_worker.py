"""Times train steps of one config for `run.py`, in its own process, so that
two versions of this project (the checkout and a baseline commit unpacked
elsewhere) can be timed in turns on the same machine in one run.

  python benchmarks/twin_worker.py CODE_DIR CONFIG_FILE

imports `sparse_gpt2` from CODE_DIR, compiles the step, prints `ready`, then
answers every stdin line `N` with a JSON list of N step times in seconds.
Uses only what every version of the project has: `train.make_model`,
`optim.make`, `train.init_state`, `train.train_step`.
"""

import functools
import importlib.util
import json
import sys
import time

import jax


def make_step(config, train, optim):
  """(jitted train step with the state donated, initial state, tokens) of a
  config, from a version's `train` and `optim` modules."""
  model = train.make_model(config)
  tx = optim.make(config, config.train_steps)
  state = jax.jit(functools.partial(train.init_state, config, model, tx))(
      jax.random.key(0), None)
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx,
                                   config=config), donate_argnums=0)
  tokens = jax.random.randint(jax.random.key(1),
                              (config.batch_size, config.seq_len + 1), 0,
                              config.model.vocab_size)
  return step, state, tokens


def main(code_dir, config_file):
  sys.path.insert(0, code_dir)
  from sparse_gpt2 import optim  # pylint: disable=g-import-not-at-top
  from sparse_gpt2 import train  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('config', config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  step, state, tokens = make_step(module.get_config(), train, optim)
  state, out = step(state, tokens)
  jax.block_until_ready(out)
  print('ready', flush=True)
  for line in sys.stdin:
    times = []
    for _ in range(int(line)):
      start = time.perf_counter()
      state, out = step(state, tokens)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - start)
    print(json.dumps(times), flush=True)


if __name__ == '__main__':
  main(*sys.argv[1:])
