"""Decoder-only language model assembled from the layers by a plain-field config.

Pre-norm blocks: x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x)). Identical blocks are
stacked with `nn.scan` (parameters get a leading 'layers' axis) under a configurable
remat policy. Every parameter carries logical axis names; the main activations are
constrained with logical names, so sharding is a rules table, not model code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.layers.common import Array, RMSNorm, constrain, dtype, param_init
from moejax.layers.rope import RopeScaling
from moejax.models.block import REMAT_POLICIES, Block, BlockGroup  # noqa: F401 (re-exported)
from moejax.moe.layer import MoEConfig
from moejax.recursion.mor import RecursiveStack
from moejax.recursion.sharing import RecursionConfig


@dataclasses.dataclass(frozen=True)
class LMConfig:
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_ff: int
  max_seq_len: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = True
  init_std: float = 0.02
  logits_soft_cap: float = 0.0
  qkv_bias: bool = False
  out_bias: bool = False
  qk_norm: str = "none"
  sliding_window: int = 0
  rope_scaling: RopeScaling | None = None
  moe: MoEConfig | None = None
  recursion: RecursionConfig | None = None

  @classmethod
  def from_config(cls, model_cfg: Any, *, seq_len: int, vocab_size: int) -> "LMConfig":
    """Build from `config.model`; vocab_size=0 there means the tokenizer's (padded to 8)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in dict(model_cfg).items()
          if k in fields and k not in ("moe", "recursion", "rope_scaling")}
    if "rope_scaling" in model_cfg and model_cfg.rope_scaling.type != "none":
      kw["rope_scaling"] = RopeScaling.from_config(model_cfg.rope_scaling)
    if "moe" in model_cfg:
      kw["moe"] = MoEConfig.from_config(model_cfg.moe, model_cfg.d_ff)
    if "recursion" in model_cfg:
      kw["recursion"] = RecursionConfig.from_config(model_cfg.recursion, model_cfg.num_layers)
    kw["vocab_size"] = model_cfg.vocab_size or -(-vocab_size // 8) * 8
    kw["max_seq_len"] = model_cfg.max_seq_len or seq_len
    return cls(**kw)

  @property
  def out_std(self) -> float:
    return self.init_std / math.sqrt(2 * self.num_layers)

  def layer_kinds(self) -> list[str]:
    return ["moe" if self.moe is not None and self.moe.is_moe_layer(i) else "dense"
            for i in range(self.num_layers)]

  def unique_kind(self, name: str) -> str:
    """FFN kind of a recursive model's unique layer: the looped core `shared_{u}` layers
    follow model.moe (first_dense / moe_every over u); the unique ends stay dense."""
    if self.moe is None or not name.startswith("shared_"):
      return "dense"
    return "moe" if self.moe.is_moe_layer(int(name.split("_")[1])) else "dense"

  def segments(self) -> list[tuple[str, tuple[str, ...], int]]:
    """(param name, block pattern, repeats): runs of identical groups for nn.scan.

    Dense: [("layers", ("dense",), L)]. MoE: the first dense layers, then groups of
    `moe_every` blocks whose first has the MoE FFN, e.g. [("dense_layers", ("dense",), 1),
    ("moe_layers", ("moe", "dense"), 3)] for L=7, first_dense=1, moe_every=2.
    """
    if self.moe is None:
      return [("layers", ("dense",), self.num_layers)]
    k, n = self.moe.first_dense, self.moe.moe_every
    segs = [("dense_layers", ("dense",), k)] if k else []
    return segs + [("moe_layers", ("moe",) + ("dense",) * (n - 1), (self.num_layers - k) // n)]


SIDE_COLLECTIONS = ("cache", "moe_bias", "moe_losses", "moe_stats", "moe_routes")
# Non-trainable state a run keeps (and checkpoints) besides the parameters.
STATE_COLLECTIONS = ("moe_bias", "mor_bias")


class LM(nn.Module):
  """tokens [B, T] int32 -> logits [B, T, V] float32.

  deterministic=False in training (router jitter, training capacity factor).
  """
  cfg: LMConfig
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, tokens_BT: Array, positions_BT: Array | None = None,
               segment_ids_BT: Array | None = None) -> Array:
    """positions_BT: RoPE positions (default 0..T-1; packed documents restart them);
    segment_ids_BT: packed documents' ids, so attention never crosses documents."""
    c = self.cfg
    if segment_ids_BT is not None and self.decode:
      raise ValueError("segment_ids_BT (document masking) is for training and evaluation; "
                       "decoding runs one document per row")
    cdt, pdt = dtype(c.compute_dtype), dtype(c.param_dtype)
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32),
                                      tokens_BT.shape)
    embed = nn.Embed(c.vocab_size, c.d_model, dtype=cdt, param_dtype=pdt,
                     embedding_init=param_init(c.init_std, ("vocab", "embed")), name="embed")
    x_BTD = constrain(embed(tokens_BT), ("batch", "length", "embed"))

    layer = 0
    if c.recursion is not None:
      x_BTD = RecursiveStack(c, self.decode, self.deterministic, name="recursion")(
          x_BTD, positions_BT, tokens_BT, segment_ids_BT)
    for name, kinds, repeats in ([] if c.recursion is not None else c.segments()):
      if len(kinds) == 1:
        unit, args = Block, (c, self.decode, self.deterministic, kinds[0])
      else:
        unit, args = BlockGroup, (c, kinds, self.decode, self.deterministic)
      if c.remat != "none":
        unit = nn.remat(unit, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
      if c.scan_layers:
        stack = nn.scan(unit, variable_axes={k: 0 for k in ("params",) + SIDE_COLLECTIONS},
                        split_rngs={"params": True, "jitter": True},
                        in_axes=(nn.broadcast,) * 3, length=repeats,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        x_BTD, _ = stack(*args, name=name)(x_BTD, positions_BT, tokens_BT, segment_ids_BT)
      else:
        for _ in range(repeats):
          x_BTD, _ = unit(*args, name=f"layer_{layer}")(x_BTD, positions_BT, tokens_BT,
                                                        segment_ids_BT)
          layer += len(kinds)

    x_BTD = RMSNorm(c.norm_eps, cdt, pdt, name="final_norm")(x_BTD)
    if c.tie_embeddings:
      logits_BTV = embed.attend(x_BTD)
    else:
      w_DV = self.param("unembed", param_init(c.init_std, ("embed", "vocab")),
                        (c.d_model, c.vocab_size), pdt)
      logits_BTV = x_BTD @ w_DV.astype(cdt)
    logits_BTV = logits_BTV.astype(jnp.float32)
    if c.logits_soft_cap:
      logits_BTV = c.logits_soft_cap * jnp.tanh(logits_BTV / c.logits_soft_cap)
    return constrain(logits_BTV, ("batch", "length", "vocab"))


def init_params(model: LM, rng: Array, batch: int = 1, length: int = 8):
  """Boxed (logically partitioned) params; use nn.unbox for the raw arrays."""
  tokens = jnp.zeros((batch, length), jnp.int32)
  return model.init(rng, tokens)["params"]


def param_count(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(nn.unbox(params))))
