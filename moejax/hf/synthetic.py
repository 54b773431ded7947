"""Random Hugging Face checkpoints of any size, written shard by shard (tests, benchmarks).

`write_random(folder, config)` writes config.json and safetensors shards (+ index) for the
moejax config's model, holding at most one shard in memory; the tensors are what
`moejax.hf.load` expects for the config's family (moejax.hf.families.infer_family).
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import ml_collections
import numpy as np
from safetensors.numpy import save_file

from moejax import hf
from moejax.hf import checkpoint as ckpt_lib
from moejax.hf import families as fam_lib
from moejax.layers.common import dtype as jnp_dtype


def write_random(folder: str, config: ml_collections.ConfigDict, dtype: str = "bfloat16",
                 max_shard_bytes: int = 1 << 30, seed: int = 0, std: float = 0.02) -> dict:
  """Returns {"tensors", "bytes", "largest_bytes", "shards", "params"}."""
  model = hf.model_from_config(config)
  fam = fam_lib.infer_family(model.cfg)
  shapes = nn.unbox(hf.abstract_params(model))
  sources, _ = ckpt_lib.plan(model.cfg, fam, shapes, None, fused=False)
  tensors = ckpt_lib.tensors_of(sources)
  np_dtype = np.dtype(jnp_dtype(dtype))
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  groups, cur, size = [], [], 0
  for t in tensors:
    nbytes = int(np.prod(t.hf_shape)) * np_dtype.itemsize
    if cur and size + nbytes > max_shard_bytes:
      groups.append(cur)
      cur, size = [], 0
    cur.append(t)
    size += nbytes
  groups.append(cur)
  weight_map, total, largest = {}, 0, 0
  for j, group in enumerate(groups):
    file = (ckpt_lib.SINGLE if len(groups) == 1 else
            f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors")
    shard = {}
    for t in group:
      x = (rng.standard_normal(t.hf_shape, np.float32) * std).astype(np_dtype)
      if "norm" in t.name:
        x = (1 + x).astype(np_dtype)
      shard[t.name] = x
      total += x.nbytes
      largest = max(largest, x.nbytes)
    save_file(shard, os.path.join(folder, file), metadata={"format": "pt"})
    weight_map |= {n: file for n in shard}
    del shard
  if len(groups) > 1:
    with open(os.path.join(folder, ckpt_lib.INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  hf_cfg = fam_lib.to_hf_config(fam, model.cfg)
  hf_cfg["torch_dtype"] = dtype
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=1)
  return {"tensors": len(tensors), "bytes": total, "largest_bytes": largest,
          "shards": len(groups),
          "params": int(sum(np.prod(t.hf_shape) for t in tensors))}
