"""Device mesh, logical axis rules, and the shardings of state and batches.

The model names every weight's axes ('embed', 'heads', 'mlp', 'vocab', ...);
the rules below map them onto a 2-D mesh ('data', 'model'): batches split over
'data', heads/MLP/vocab over 'model' (Megatron-style tensor parallelism).
Masks and Adam moments take exactly their weight's sharding.
"""

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import optax

LOGICAL_RULES = (
    ('batch', 'data'),
    ('length', None),
    ('embed', None),
    ('positions', None),
    ('heads', 'model'),
    ('heads_only', None),
    ('mlp', 'model'),
    ('vocab', 'model'),
    ('vocab_in', None),
)


def make_mesh(config, devices=None):
  """Mesh of config.data x config.model devices (-1 = all that remain)."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  model = config.model
  data = n // model if config.data == -1 else config.data
  if model < 1 or data < 1 or data * model != n:
    raise ValueError(f'mesh data={config.data} x model={config.model} does '
                     f'not fit the {n} available device(s)')
  grid = mesh_utils.create_device_mesh((data, model), devices)
  # Auto axes: linen's logical partitioning assumes them (jax's default
  # Explicit axes break the embedding lookup).
  return Mesh(grid, ('data', 'model'), axis_types=(AxisType.Auto,) * 2)


def to_shardings(logical_specs, mesh):
  return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)


def state_shardings(boxed_variables, abstract_state, tx, mesh):
  """Shardings of a TrainState: params and masks from the model's logical
  axes, Adam moments as their params, scalars replicated."""
  specs = nn.get_partition_spec(boxed_variables)
  params = to_shardings(specs['params'], mesh)
  masks = to_shardings(specs.get('sparsity', {}), mesh)
  replicated = NamedSharding(mesh, P())
  opt_state = optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_state.opt_state, params,
      transform_non_params=lambda _: replicated)
  return abstract_state.replace(step=replicated, params=params, masks=masks,
                                opt_state=opt_state)


def batch_sharding(mesh):
  return NamedSharding(mesh, P('data', None))
