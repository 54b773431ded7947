"""Hugging Face checkpoints in and out: `load(path) -> (model, variables)`, `save(...)`.

    model, variables = moejax.hf.load("path/to/Qwen3-30B-A3B", dtype="bfloat16", mesh=mesh)
    logits_BTV = model.apply(variables, input_ids_BT)          # float32 [B, T, V]
    moejax.hf.save(model, variables, "out/")                   # config.json + safetensors

Families (one tensor table each, moejax/hf/families.py): Llama, Mistral, Qwen2, Qwen3,
Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; per-expert and transformers 5's fused expert
tensors are both read. `config_from_hf(path)` gives the full moejax config (what
`python -m moejax.convert from-hf` writes next to the orbax checkpoint).
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors.numpy import save_file

from moejax import config as config_lib
from moejax import parallel
from moejax.hf import checkpoint as ckpt_lib
from moejax.hf import families as fam_lib
from moejax.hf.checkpoint import CheckpointError  # noqa: F401 (re-exported)
from moejax.hf.families import SUPPORTED, UnsupportedModel  # noqa: F401 (re-exported)
from moejax.models.lm import LM, LMConfig

DTYPES = ("float32", "bfloat16", "float16")


def read_hf_config(path: str) -> dict[str, Any]:
  where = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise CheckpointError(f"Hugging Face folder {path!r} does not exist")
  if not os.path.isfile(where):
    raise CheckpointError(f"{path!r} has no config.json: not a Hugging Face model folder")
  with open(where) as f:
    return json.load(f)


def config_from_hf(path: str, dtype: str = "float32", scan_layers: bool = True,
                   base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """The moejax config of a Hugging Face folder: its model section mapped field by field,
  its tokenizer.json (if any) as data.tokenizer='hf'. The model section is validated
  (the rest when it is trained)."""
  if dtype not in DTYPES:
    raise config_lib.ConfigError(f"dtype = {dtype!r} is not allowed: one of {list(DTYPES)}")
  hf = read_hf_config(path)
  c = base if base is not None else config_lib.base_config()
  _, c = fam_lib.to_moejax(hf, c, os.path.join(path, "config.json"))
  c.name = os.path.basename(os.path.normpath(path))
  c.model.param_dtype = c.model.compute_dtype = dtype
  c.model.scan_layers = scan_layers
  c.model.init_std = float(hf.get("initializer_range", 0.02))
  c.data.seq_len = min(c.data.seq_len, c.model.max_seq_len)
  if os.path.isfile(os.path.join(path, "tokenizer.json")):
    c.data.tokenizer, c.data.hf_tokenizer = "hf", os.path.abspath(path)
  config_lib.validate_model(c)
  return c


def model_from_config(c: ml_collections.ConfigDict, decode: bool = False) -> LM:
  lm = LMConfig.from_config(c.model, seq_len=c.model.max_seq_len or c.data.seq_len,
                            vocab_size=c.model.vocab_size)
  return LM(lm, decode=decode)


def abstract_params(model: LM) -> Any:
  """Boxed ShapeDtypeStructs of the model's params (nothing allocated)."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))["params"]


def load_params(path: str, cfg: LMConfig, shapes: Any, shardings: Any,
                verbose: bool = False) -> Any:
  """The params of an LMConfig `cfg` (abstract tree `shapes`, its `shardings`) read from
  a Hugging Face folder, each leaf built in its sharding."""
  fam = fam_lib.family_of(read_hf_config(path), os.path.join(path, "config.json"))
  folder = ckpt_lib.TensorFolder(path)
  sources, _ = ckpt_lib.plan(cfg, fam, shapes, folder)
  bar = None
  if verbose:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top  (only with a progress bar)
    bar = tqdm(total=len(jax.tree.leaves(shapes)), desc="moejax.hf.load", unit="tensor")
  params = ckpt_lib.place(sources, shapes, shardings, folder,
                          progress=bar.update if bar else None)
  if bar:
    bar.close()
  return params


def load(path: str, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None,
         scan_layers: bool = True, verbose: bool = False) -> tuple[LM, dict[str, Any]]:
  """(model, variables) from a Hugging Face folder; `model.apply(variables, ids_BT)`
  returns float32 logits. With `mesh`, every parameter is placed in its sharding by the
  logical-axis rules (moejax.parallel), each device's slice read on its own."""
  c = config_from_hf(path, dtype, scan_layers)
  model = model_from_config(c)
  boxed = abstract_params(model)
  shapes = nn.unbox(boxed)
  if mesh is None:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: dev, shapes)
  else:
    shardings = parallel.logical_shardings(boxed, mesh, parallel.rules_from_config(c.mesh))
  return model, {"params": load_params(path, model.cfg, shapes, shardings, verbose)}


ARCH_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "d_ff", "rope_theta", "norm_eps", "tie_embeddings", "qkv_bias", "out_bias",
               "qk_norm", "sliding_window")
MOE_FIELDS = ("num_experts", "experts_per_token", "expert_d_ff", "num_shared_experts",
              "shared_expert_d_ff", "shared_expert_gate", "renormalize", "first_dense",
              "moe_every", "granularity", "router")


def architecture_diff(path: str, model_cfg: ml_collections.ConfigDict) -> list[str]:
  """Fields of `model_cfg` that differ from what the Hugging Face folder's config.json
  says (the architecture only: dtypes, remat, training coefficients may differ)."""
  want = config_from_hf(path).model
  diff = [f"model.{f}: config {model_cfg[f]!r}, {path}/config.json {want[f]!r}"
          for f in ARCH_FIELDS if model_cfg[f] != want[f]]
  diff += [f"model.rope_scaling.{f}: config {model_cfg.rope_scaling[f]!r}, checkpoint "
           f"{want.rope_scaling[f]!r}" for f in want.rope_scaling
           if model_cfg.rope_scaling[f] != want.rope_scaling[f]]
  if want.moe.num_experts or model_cfg.moe.num_experts:
    diff += [f"model.moe.{f}: config {model_cfg.moe[f]!r}, checkpoint {want.moe[f]!r}"
             for f in MOE_FIELDS if model_cfg.moe[f] != want.moe[f]]
  return diff


def _to_hf_array(x: np.ndarray, transform: str) -> np.ndarray:
  if transform == "copy":
    return x
  if transform == "linear":
    return x.reshape(x.shape[0], -1).T
  if transform == "linear2":
    return x.reshape(-1, x.shape[-1]).T
  if transform == "bias":
    return x.reshape(-1)
  raise ValueError(transform)


def save(model: LM, variables: dict[str, Any], path: str, dtype: str | None = None,
         max_shard_bytes: int = 4 << 30) -> dict[str, Any]:
  """Writes config.json + safetensors (per-expert layout, shards + index above
  `max_shard_bytes`) that transformers loads; returns the config dict."""
  cfg = model.cfg
  fam = fam_lib.infer_family(cfg)
  hf = fam_lib.to_hf_config(fam, cfg)
  params = nn.unbox(variables["params"])
  np_dtype = None if dtype is None else {"float32": np.float32, "bfloat16": jnp.bfloat16,
                                         "float16": np.float16}[dtype]
  hf["torch_dtype"] = dtype or cfg.param_dtype
  slots = ckpt_lib.layer_slots(cfg)
  tensors: dict[str, np.ndarray] = {}

  def get(keys):
    node = params
    for k in keys:
      node = node[k]
    return np.asarray(jax.device_get(node))

  def put(name, x):
    x = np.ascontiguousarray(x)
    tensors[name] = x.astype(np_dtype) if np_dtype is not None else x

  for p, name, t in fam_lib.top_table(cfg.tie_embeddings):
    put(name, _to_hf_array(get(tuple(p.split("/"))), t))
  for prefix, layers in slots.items():
    for r, (i, kind) in enumerate(layers):
      for p, name, t in fam_lib.block_table(fam, cfg, kind, i, fused=False):
        x = get(prefix + tuple(p.split("/")))
        x = x[r] if cfg.scan_layers else x
        if t == "experts":
          for e in range(x.shape[0]):
            put(name.format(e=e), _to_hf_array(x[e], "linear"))
        else:
          put(name, _to_hf_array(x, t))
  os.makedirs(path, exist_ok=True)
  shards, cur, size = [], {}, 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if cur and size + nbytes > max_shard_bytes:
      shards.append(cur)
      cur, size = {}, 0
    cur[name], size = tensors[name], size + nbytes
  shards.append(cur)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, ckpt_lib.SINGLE), metadata={"format": "pt"})
  else:
    weight_map = {}
    for j, shard in enumerate(shards):
      file = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
      weight_map |= {n: file for n in shard}
    with open(os.path.join(path, ckpt_lib.INDEX), "w") as f:
      json.dump({"metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
                 "weight_map": weight_map}, f, indent=1)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=1)
  return hf
