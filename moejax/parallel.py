"""Device mesh, logical-axis rules and the shardings of the train state.

Layers name their axes logically ("batch", "embed", "mlp", "expert", ...). One rules
table maps those names to the four mesh axes:

  data    pure data parallelism (batch)
  fsdp    batch too, and parameters / optimizer state sharded along "embed" (ZeRO-3)
  tensor  Megatron-style: heads, kv_heads, mlp, expert_mlp and vocab split
  expert  experts split (expert parallelism); batch too for the rest of the model

The same table shards the parameters (jit in/out shardings) and constrains activations
(`nn.with_logical_constraint` inside the model), so a config moves from one CPU to a pod
by changing `config.mesh`. A mesh axis can shard one dimension of a tensor: when two
names of one tensor want the same axis (activations' batch and embed both list fsdp) the
first wins, so activations are batch-sharded and parameters embed-sharded.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor", "expert")

# logical name -> mesh axis, axes, or None (replicated)
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("expert_router", None),
    ("layers", None),
    ("loops", None),
    ("lora", None),
)


class MeshError(ValueError):
  """A mesh that does not fit the devices or the model (raised before compilation)."""


def rules_from_config(mesh_cfg: Any = None) -> tuple[tuple[str, Any], ...]:
  """RULES with `config.mesh.rules` overrides ("name=axis", "name=a+b", "name=")."""
  table = dict(RULES)
  for item in (mesh_cfg.rules if mesh_cfg is not None else ()):
    name, sep, target = item.partition("=")
    if not sep or not name:
      raise MeshError(f"config.mesh.rules entry {item!r} is not allowed: write "
                      "'logical_name=mesh_axis', 'name=axis1+axis2' or 'name=' (replicated)")
    axes = tuple(a for a in target.split("+") if a)
    for a in axes:
      if a not in AXES:
        raise MeshError(f"config.mesh.rules entry {item!r} is not allowed: mesh axis {a!r} "
                        f"is not one of {list(AXES)}")
    table[name] = None if not axes else axes[0] if len(axes) == 1 else axes
  return tuple(table.items())


def mesh_shape(mesh_cfg: Any = None, num_devices: int | None = None) -> dict[str, int]:
  """{axis: size} with one -1 filled from the device count; checks the product."""
  n = jax.device_count() if num_devices is None else num_devices
  sizes = {a: (int(getattr(mesh_cfg, a)) if mesh_cfg is not None else (-1 if a == "data" else 1))
           for a in AXES}
  free = [a for a, s in sizes.items() if s == -1]
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if len(free) > 1:
    raise MeshError(f"config.mesh has -1 for {free}: at most one axis may be -1 (the rest)")
  if free:
    if n % fixed:
      raise MeshError(f"config.mesh = {sizes} is not allowed: the fixed axes' product {fixed} "
                      f"must divide the {n} devices")
    sizes[free[0]] = n // fixed
  if math.prod(sizes.values()) != n:
    raise MeshError(f"config.mesh = {sizes} is not allowed: the axis sizes multiply to "
                    f"{math.prod(sizes.values())} but there are {n} devices")
  return sizes


def make_mesh(mesh_cfg: Any = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp, tensor, expert) mesh with Auto (GSPMD-style) axis types.

  Without a config: all devices on 'data'. On TPU/GPU the device order comes from
  `mesh_utils.create_device_mesh` (topology-aware: 'tensor' and 'expert', the last
  axes, get the fastest links); on CPU a plain reshape.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  arr = None
  if devices[0].platform in ("tpu", "gpu", "cuda", "rocm"):
    try:
      from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
      arr = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # pylint: disable=broad-except  (odd topologies: plain order)
      arr = None
  if arr is None:
    arr = np.asarray(devices).reshape(shape)
  kwargs = {}
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is not None:
    kwargs["axis_types"] = (axis_type.Auto,) * len(AXES)
  return Mesh(arr, AXES, **kwargs)


def batch_axes(mesh: Mesh, rules=RULES) -> tuple[str, ...]:
  target = dict(rules).get("batch")
  target = (target,) if isinstance(target, str) else tuple(target or ())
  return tuple(a for a in target if mesh.shape.get(a, 1) > 1) or ()


def batch_sharding(mesh: Mesh, rules=RULES) -> NamedSharding:
  axes = batch_axes(mesh, rules)
  return NamedSharding(mesh, P(axes if axes else None))


def data_parallel_size(mesh: Mesh, rules=RULES) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_shardings(boxed: Any, mesh: Mesh, rules=RULES) -> Any:
  """NamedShardings for a tree of nn.LogicallyPartitioned (e.g. eval_shape of init)."""
  specs = nn.get_partition_spec(boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def check_divisible(shapes: Any, shardings: Any, what: str = "parameter") -> None:
  """Every sharded dimension must split evenly: an error naming the array otherwise."""
  flat_shapes = jax.tree_util.tree_leaves_with_path(shapes)
  flat_sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, s), sh in zip(flat_shapes, flat_sh):
    for dim, axes in enumerate(sh.spec):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      n = math.prod(sh.mesh.shape[a] for a in axes)
      if s.shape[dim] % n:
        raise MeshError(
            f"{what} {jax.tree_util.keystr(path)} of shape {tuple(s.shape)}: dimension {dim} "
            f"({s.shape[dim]}) is sharded over mesh axes {axes} of total size {n}, which "
            "does not divide it; change config.mesh or the model size (or map that logical "
            "axis elsewhere with config.mesh.rules)")
