"""Device mesh, logical axis rules, and the shardings of state and batches.

The model names every weight's axes ('embed', 'heads', 'mlp', 'vocab', ...)
and its activations' ('batch', 'length', 'act_embed'); `config.mesh.rules`
maps them onto a 3-D mesh ('data', 'fsdp', 'model'). By default batches split
over 'data' and 'fsdp', every weight's 'embed' axis over 'fsdp' (so
parameters, masks and Adam moments are split, ZeRO-3 style, and gathered one
layer at a time in the step), and heads/MLP/vocab over 'model' (Megatron-style
tensor parallelism). Adam moments take exactly their weight's sharding;
masks too, but for a last axis that bit-packing leaves too short for the
weight's mesh axes to divide, which they keep whole (`state_shardings`).
The functions below read the rules in effect
(`nn.logical_axis_rules(rules(config.mesh))`), as the model does.
"""

import math

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import optax

from sparse_gpt2 import defaults

AXES = ('data', 'fsdp', 'model')


def mesh_axes(entry):
  """A PartitionSpec's or a rule's entry (None, a mesh axis, or a tuple of
  them; a config read back from JSON holds lists) as a tuple of axes."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (list, tuple)) else (entry,)


def rules(mesh_config):
  """config.mesh.rules as flax wants them: a tuple of (logical, mesh axes)
  pairs. A rule for a logical axis the model does not name is refused:
  flax ignores it, so a misspelt 'embed' silently left every weight whole
  on each device (no FSDP)."""
  known = [logical for logical, _ in defaults.base().mesh.rules]
  out = []
  for rule in mesh_config.rules:
    if not (isinstance(rule, (list, tuple)) and len(rule) == 2):
      raise ValueError(f'mesh.rules: each rule is a (logical axis, mesh '
                       f'axes) pair, got {rule!r}')
    logical, axes = rule
    if logical not in known:
      raise ValueError(f'mesh.rules: unknown logical axis {logical!r}; the '
                       f'model names {known}')
    if isinstance(axes, list):
      axes = tuple(axes)
    for axis in mesh_axes(axes):
      if axis not in AXES:
        raise ValueError(f'mesh.rules: {logical!r} maps to unknown mesh axis '
                         f'{axis!r}; the axes are {AXES}')
    out.append((logical, axes))
  return tuple(out)


def make_mesh(config, devices=None):
  """Mesh of config.data x config.fsdp x config.model devices; one of them
  may be -1: all the devices the others leave."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  sizes = [config.data, config.fsdp, config.model]
  for axis, size in zip(AXES, sizes):
    if size < 1 and size != -1:
      raise ValueError(f'mesh.{axis} must be >= 1, or -1 for the devices the '
                       f'other axes leave; got {size}')
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh: at most one axis may be -1; got data='
                     f'{config.data}, fsdp={config.fsdp}, model={config.model}')
  if sizes.count(-1) == 1:
    rest = -math.prod(sizes)
    sizes[sizes.index(-1)] = n // rest if rest > 0 and n % rest == 0 else 0
  if min(sizes) < 1 or math.prod(sizes) != n:  # Smaller is refused too.
    raise ValueError(f'mesh data={config.data} x fsdp={config.fsdp} x '
                     f'model={config.model} does not fit the {n} available '
                     'device(s): a mesh takes them all, one axis may be -1 '
                     'for the devices the others leave')
  try:
    grid = mesh_utils.create_device_mesh(sizes, devices)
  except NotImplementedError as e:  # E.g. data 2 x fsdp 8 on a 4 x 4 v5e.
    logging.warning('mesh %s does not follow the devices\' physical axes '
                    '(%s); splitting them, which may slow its collectives',
                    sizes, str(e).splitlines()[0])
    grid = mesh_utils.create_device_mesh(sizes, devices,
                                         allow_split_physical_axes=True)
  # Auto axes: linen's logical partitioning assumes them (jax's default
  # Explicit axes break the embedding lookup).
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def to_shardings(logical_specs, mesh):
  return nn.logical_to_mesh_sharding(logical_specs, mesh)


def state_shardings(boxed_variables, abstract_state, tx, mesh):
  """Shardings of a TrainState: params and masks from the model's logical
  axes, Adam moments as their params, scalars replicated.

  A mask is its weight bit-packed along the last axis (`sparsity.pack`),
  so that axis is 8x shorter; where the weight's mesh axes no longer
  divide it, the mask keeps that axis whole (it is 1/32 of the weight).
  """
  specs = nn.get_partition_spec(boxed_variables)
  params = to_shardings(specs['params'], mesh)
  masks = jax.tree.map(_fitted, to_shardings(specs.get('sparsity', {}), mesh),
                       abstract_state.masks)
  replicated = NamedSharding(mesh, P())
  opt_state = optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_state.opt_state, params,
      transform_non_params=lambda _: replicated)
  return abstract_state.replace(step=replicated, params=params, masks=masks,
                                opt_state=opt_state)


def _fitted(sharding, x):
  """`sharding` without the mesh axes of any dimension of x they do not
  divide."""
  spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  fitted = []
  for size, axes in zip(x.shape, spec):
    fitted.append(axes if size % math.prod(
        sharding.mesh.shape[a] for a in mesh_axes(axes)) == 0 else None)
  return NamedSharding(sharding.mesh, P(*fitted))


def batch_sharding(mesh):
  """Rows of a [B, T + 1] batch of tokens over the mesh axes of 'batch',
  each row whole: T + 1 (129 for seq_len 128) is rarely divisible by the
  mesh axes of 'length', which shard the model's [B, T, ...] activations."""
  return to_shardings(P('batch', None), mesh)


def data_parallel(mesh, mesh_config):
  """How many ways a batch is split: the size of the 'batch' axes."""
  with nn.logical_axis_rules(rules(mesh_config)):
    spec = batch_sharding(mesh).spec[0]
  return math.prod(mesh.shape[axis] for axis in mesh_axes(spec))
