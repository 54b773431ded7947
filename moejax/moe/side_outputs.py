"""The MoE layers' side-output collections as data: per-layer stacking and the bias update.

`MoEFFN` (moejax/moe/layer.py) writes "moe_losses", "moe_stats", "moe_bias" and
"moe_routes"; the train step (moejax/train/steps.py) and the analysis helpers read them.
Both sides import from here, so moe never imports train. Pure tree functions: no flax
modules, nothing jitted here.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp


def _natural_key(s: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(s))]


def _moe_nodes(tree: Any) -> list[dict]:
  """The per-layer leaf dicts of a moe_* collection in layer order (natural key sort)."""
  if not hasattr(tree, "items"):
    return []
  if tree and all(not hasattr(v, "items") for v in tree.values()):
    return [tree]
  out = []
  for k in sorted(tree.keys(), key=_natural_key):
    out += _moe_nodes(tree[k])
  return out


def _is_scanned(node: dict) -> bool:
  # Per layer: "load"/"bias" are [E], "gates" [N, E], scalars []; scanned adds a leading R.
  for name, ndim in (("load", 1), ("bias", 1), ("gates", 2)):
    if name in node:
      return node[name].ndim == ndim + 1
  return all(v.ndim == 1 for v in node.values())


def stack_moe_layers(tree: Any) -> dict[str, jax.Array]:
  """{name: [num_moe_layers, ...]} from a moe_stats / moe_losses tree (scanned or not)."""
  nodes = _moe_nodes(tree)
  if not nodes:
    return {}
  names = sorted(set().union(*[n.keys() for n in nodes]))
  out = {}
  for name in names:
    parts = []
    for n in nodes:
      v = n.get(name)
      if v is None:
        continue
      # scanned segments carry a leading repeat axis; unrolled layers do not
      parts.append(v if v.ndim and _is_scanned(n) else v[None])
    out[name] = jnp.concatenate(parts, axis=0)
  return out


def update_bias(moe_bias: Any, moe_stats: Any, rate: float) -> Any:
  """Aux-loss-free balancing: b_i += rate * sign(mean_load - load_i), per layer.

  `moe_stats` comes from the forward pass over the whole (global) batch, so the loads
  are global counts. Trees: moe_bias[...]["bias"] pairs with moe_stats[...]["load"].
  """
  def upd(path_bias, stats_node):
    load = stats_node["load"]
    mean = jnp.mean(load, axis=-1, keepdims=True)
    return path_bias + rate * jnp.sign(mean - load)

  def walk(bias_node, stats_node):
    if isinstance(bias_node, dict) or hasattr(bias_node, "items"):
      if "bias" in bias_node and not hasattr(bias_node["bias"], "items"):
        out = dict(bias_node)
        out["bias"] = upd(bias_node["bias"], stats_node)
        return out
      return {k: walk(v, stats_node[k]) for k, v in bias_node.items()}
    raise TypeError(f"unexpected moe_bias node {type(bias_node)}")

  return walk(moe_bias, moe_stats)
