"""Device mesh and logical-axis rules.

Layers name their axes logically ("batch", "embed", "mlp", ...); `RULES` maps those
names to mesh axes. The foundation runs pure data parallelism over every device; the
other rules are placeholders the scale-out work fills in (fsdp / tensor / expert).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# logical name -> mesh axis (None: replicated)
RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("length", None),
    ("embed", None),
    ("vocab", None),
    ("heads", None),
    ("kv_heads", None),
    ("head_dim", None),
    ("mlp", None),
    ("layers", None),
    ("loops", None),
    ("lora", None),
)


def make_mesh(devices=None) -> Mesh:
  """A 1-D ('data',) mesh over all devices, with Auto (GSPMD-style) axis types."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  kwargs = {}
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is not None:
    kwargs["axis_types"] = (axis_type.Auto,)
  return Mesh(devices.reshape(-1), ("data",), **kwargs)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
