"""Communication and memory calculator for a config on a mesh (no devices needed).

    python -m moejax.planning --config configs/scale/mixtral_8x7b.py \
        --mesh data=1,fsdp=32,tensor=1,expert=8

Per device and per training step (forward + backward), from the config's parameter
shapes and the logical-axis rules:
  memory: parameters, gradients and Adam moments (f32) by their shardings; activations
    saved for the backward pass (Megatron-style estimate per layer and token: 34 D + 5 H T
    bytes in 16-bit without remat; only the layer inputs with remat 'full'), divided by
    the tensor axis;
  traffic (bytes each device sends, ring algorithms):
    fsdp      all-gather the sharded weights in forward and again in backward, and
              reduce-scatter the gradients: 3 x P_shard x (f - 1)
    data      all-reduce of the gradient shard: 2 x G x (d - 1) / d
    tensor    2 all-reduces of [tokens, D] per block in forward and 2 in backward:
              4 x 2 x A x (t - 1) / t per block
    expert    2 all-to-alls per MoE layer forward (dispatch, combine) and 2 backward,
              each of the capacity-padded buffer E x C x D (what moejax sends for the
              capacity backends): 4 x buffer x (ep - 1) / ep per MoE layer; for the
              dropless backends (ragged_all_to_all) the buffer is the rows actually
              sent, tokens x k x D, taken at balanced routing (skew changes who sends
              how much, not the total), plus the int32 expert id of every row once
Estimates, not measurements: they ignore overlap, latency and XLA's own choices; the
all-to-all buffer size is checked against a compiled program in the tests.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import parallel
from moejax.models.lm import LM, LMConfig

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _param_shards(mc: LMConfig, sizes: dict[str, int], rules) -> tuple[float, float]:
  """(total parameter count, per-device parameter count) under the rules."""
  model = LM(mc)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  total = per_dev = 0.0
  for leaf in jax.tree.leaves(boxed["params"],
                              is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
    n = math.prod(leaf.value.shape)
    div = 1
    for entry in nn.logical_to_mesh_axes(leaf.names, rules):
      for a in ((entry,) if isinstance(entry, str) else tuple(entry or ())):
        div *= sizes.get(a, 1)
    total, per_dev = total + n, per_dev + n / div
  return total, per_dev


def plan(config: Any, sizes: dict[str, int] | None = None, vocab_size: int = 32000) -> dict:
  """Per-device memory (bytes) and per-step traffic (bytes sent) for config on a mesh."""
  mc = LMConfig.from_config(config.model, seq_len=config.data.seq_len, vocab_size=vocab_size)
  sizes = dict(sizes or {a: 1 for a in parallel.AXES})
  for a in parallel.AXES:
    sizes.setdefault(a, 1)
  n_dev = math.prod(sizes.values())
  rules = parallel.rules_from_config(config.get("mesh"))
  with jax.default_device(jax.devices("cpu")[0]):
    total, per_dev = _param_shards(mc, sizes, rules)
  pbytes = BYTES[mc.param_dtype]
  cbytes = BYTES[mc.compute_dtype]
  f, d, t, ep = sizes["fsdp"], sizes["data"], sizes["tensor"], sizes["expert"]
  batch_shards = d * f * ep
  tokens_dev = config.data.batch_size * config.data.seq_len / batch_shards
  layers = mc.num_layers
  moe_layers = sum(k == "moe" for k in mc.layer_kinds()) if mc.moe else 0

  mem_params = per_dev * pbytes
  mem_grads = per_dev * 4
  mem_adam = per_dev * 4 * 2
  if mc.remat == "full":  # only each layer's input is kept
    act_16bit = 2 * mc.d_model
  else:  # Korthikanti et al.: bytes per token per layer in 16-bit
    act_16bit = 34 * mc.d_model + 5 * mc.num_heads * config.data.seq_len
  act = act_16bit * (cbytes / 2) * tokens_dev * layers / t

  # traffic
  shard_bytes = per_dev * pbytes
  fsdp_bytes = 3 * shard_bytes * (f - 1)
  dp_bytes = 2 * per_dev * 4 * (d - 1) / d
  act_bytes = tokens_dev * mc.d_model * cbytes
  tp_bytes = layers * 4 * 2 * act_bytes * (t - 1) / t
  a2a_buffer = ids_bytes = 0.0
  if mc.moe is not None and ep > 1:
    m = mc.moe
    from moejax.moe.dispatch import CAPACITY_BACKENDS  # pylint: disable=g-import-not-at-top
    if m.backend in CAPACITY_BACKENDS:
      cf = m.capacity_factor
      cap = max(m.min_capacity, math.ceil(cf * tokens_dev * m.k / m.num_experts))
      a2a_buffer = m.num_experts * cap * mc.d_model * cbytes
    else:
      a2a_buffer = tokens_dev * m.k * mc.d_model * cbytes
      ids_bytes = tokens_dev * m.k * 4
  ep_bytes = moe_layers * (4 * a2a_buffer + ids_bytes) * (ep - 1) / ep
  return {
      "mesh": sizes, "devices": n_dev, "total_params": total,
      "params_per_device": per_dev, "tokens_per_device": tokens_dev,
      "memory_bytes": {"params": mem_params, "grads_f32": mem_grads, "adam_f32": mem_adam,
                       "activations": act,
                       "total": mem_params + mem_grads + mem_adam + act},
      "traffic_bytes_per_step": {"fsdp_all_gather_reduce_scatter": fsdp_bytes,
                                 "data_all_reduce": dp_bytes, "tensor_all_reduce": tp_bytes,
                                 "expert_all_to_all": ep_bytes,
                                 "total": fsdp_bytes + dp_bytes + tp_bytes + ep_bytes},
      "all_to_all_buffer_bytes": a2a_buffer, "moe_layers": moe_layers,
  }


def _gib(x: float) -> str:
  return f"{x / 2 ** 30:.2f} GiB"


def main(argv=None) -> int:
  from moejax.config import load_config  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="moejax.planning", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True)
  p.add_argument("--mesh", default="data=1", help="e.g. data=2,fsdp=16,tensor=1,expert=8")
  p.add_argument("--vocab_size", type=int, default=32000)
  a, rest = p.parse_known_args(argv)
  config = load_config(a.config, rest)
  sizes = {k: int(v) for k, v in (kv.split("=") for kv in a.mesh.split(",") if kv)}
  r = plan(config, sizes, a.vocab_size)
  print(f"{config.name} on {r['mesh']} ({r['devices']} devices): "
        f"{r['total_params'] / 1e9:.2f}B params, {r['params_per_device'] / 1e9:.3f}B per device, "
        f"{r['tokens_per_device']:.0f} tokens per device per step")
  for k, v in r["memory_bytes"].items():
    print(f"  memory {k:24s} {_gib(v)}")
  for k, v in r["traffic_bytes_per_step"].items():
    print(f"  traffic {k:31s} {_gib(v)} per step")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
