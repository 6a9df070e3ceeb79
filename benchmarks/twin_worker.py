"""Times train steps of one config for `run.py`, in its own process, so that
two versions of this project (the checkout and a baseline commit unpacked
elsewhere) can be timed in turns on the same machine in one run.

  python benchmarks/twin_worker.py CODE_DIR CONFIG_FILE
  python benchmarks/twin_worker.py --check CODE_DIR CONFIG_FILE...

imports `sparse_gpt2` from CODE_DIR, compiles the step, prints `ready`, then
answers every stdin line `N` with a JSON list of N step times in seconds.
`--check` only imports what the workers of those configs would call, and
exits non-zero (the error last on stderr) where one is missing: `run.py`
checks a baseline so before it measures anything.
Uses only what every version of the project has: `train.make_model`,
`optim.make`, `train.init_state`, `train.train_step`; a config that asks for
several CPU devices (`num_cpu_devices`, newer versions) gets them and its
step runs data-parallel over them, as `main` runs it.
"""

import functools
import importlib
import importlib.util
import json
import sys
import time

import flax.linen as nn
import jax

# The state is built once and never timed, so its program is compiled for
# compile time: at LLVM's level 0 with XLA:CPU's loop emitters, as the test
# suite compiles (`tests/conftest.py`). A topk or static state, whose masks
# take a top-k, was built in 18-28 s and is now in 10-17 s (`run.py`'s
# modes section on a slow 2-core machine); the values differ by rounding.
_CHEAP_COMPILE = {'xla_backend_optimization_level': 0,
                  'xla_cpu_use_fusion_emitters': False}


def make_step(config, train, optim):
  """(jitted train step with the state donated, initial state, tokens) of a
  config, from a version's `train` and `optim` modules, its schedules over
  `schedule_steps` as `make_data_parallel_step`'s (a topk state starts
  dense, as `main`'s does)."""
  config.schedule_steps = config.get('schedule_steps') or config.train_steps
  model = train.make_model(config)
  tx = optim.make(config, config.schedule_steps)
  state = jax.jit(functools.partial(train.init_state, config, model, tx),
                  compiler_options=_CHEAP_COMPILE)(jax.random.key(0), None)
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx,
                                   config=config), donate_argnums=0)
  tokens = jax.random.randint(jax.random.key(1),
                              (config.batch_size, config.seq_len + 1), 0,
                              config.model.vocab_size)
  return step, state, tokens


def make_data_parallel_step(config, train, optim, sharding):
  """`make_step` laid out on all devices as `main` lays a run out (batch
  rows split, the state as the mesh rules place it), its schedules over
  `schedule_steps` as a new run resolves them (0: `train_steps`), so that
  a `sparse_small` state starts dense and anneals, as `main`'s does."""
  # Resolved here, not by `workdir.schedule_steps`: a baseline commit may
  # predate it (and `schedule_steps` itself).
  config.schedule_steps = config.get('schedule_steps') or config.train_steps
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(config.mesh)):
    model = train.make_model(config)
    tx = optim.make(config, config.schedule_steps)
    _, state_sharding, batch_sharding = train.layout(config, model, tx, mesh)
    state = jax.jit(functools.partial(train.init_state, config, model, tx),
                    out_shardings=state_sharding,
                    compiler_options=_CHEAP_COMPILE)(jax.random.key(0), None)
    step = train.jit_train_step(config, model, tx, state_sharding,
                                batch_sharding)
  tokens = jax.device_put(
      jax.random.randint(jax.random.key(1),
                         (config.batch_size, config.seq_len + 1), 0,
                         config.model.vocab_size), batch_sharding)
  return step, state, tokens


def load_config(config_file):
  """get_config() of a config file (`configs/NAME.py`), by its path."""
  spec = importlib.util.spec_from_file_location('config', config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def check(code_dir, config_files):
  """Raises where the code in `code_dir` lacks what `main` calls for one of
  `config_files` (read from there too): in seconds, not after a compile."""
  sys.path.insert(0, code_dir)
  from sparse_gpt2 import optim  # pylint: disable=g-import-not-at-top
  from sparse_gpt2 import train  # pylint: disable=g-import-not-at-top
  needs = [(train, 'make_model'), (optim, 'make'), (train, 'init_state'),
           (train, 'train_step')]
  if any(load_config(f).get('num_cpu_devices', 0) > 1 for f in config_files):
    from sparse_gpt2 import sharding  # pylint: disable=g-import-not-at-top
    needs += [(sharding, 'make_mesh'), (sharding, 'rules'), (train, 'layout'),
              (train, 'jit_train_step')]
  missing = [f'{module.__name__}.{name}' for module, name in needs
             if not hasattr(module, name)]
  if missing:
    raise AttributeError(f"no {', '.join(missing)}")


def main(code_dir, config_file):
  sys.path.insert(0, code_dir)
  from sparse_gpt2 import optim  # pylint: disable=g-import-not-at-top
  from sparse_gpt2 import train  # pylint: disable=g-import-not-at-top
  config = load_config(config_file)
  if importlib.util.find_spec('sparse_gpt2.cli'):  # Newer versions set up
    cli = importlib.import_module('sparse_gpt2.cli')  # the process as `main`.
    if hasattr(cli, 'keep_freed_memory') and config.train_steps >= getattr(
        cli, 'STEPS_TO_EARN_BACK_FREED_MEMORY', 0):
      cli.keep_freed_memory()
  if config.get('num_cpu_devices', 0) > 1:
    from sparse_gpt2 import sharding  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_num_cpu_devices', config.num_cpu_devices)
    step, state, tokens = make_data_parallel_step(config, train, optim,
                                                  sharding)
  else:
    step, state, tokens = make_step(config, train, optim)
  state, out = step(state, tokens)
  jax.block_until_ready(out)
  print('ready', flush=True)
  for line in sys.stdin:
    times = []
    for _ in range(int(line)):
      start = time.perf_counter()
      state, out = step(state, tokens)
      jax.block_until_ready((state, out))  # The whole update.
      times.append(time.perf_counter() - start)
    print(json.dumps(times), flush=True)


if __name__ == '__main__':
  if len(sys.argv) < 3 or len(sys.argv) > 3 and sys.argv[1] != '--check':
    sys.exit('usage: twin_worker.py CODE_DIR CONFIG_FILE | '
             '--check CODE_DIR CONFIG_FILE...')  # Not an IndexError.
  if sys.argv[1] == '--check':
    check(sys.argv[2], sys.argv[3:])
  else:
    main(*sys.argv[1:])
