"""Attention options of `config.model` (defaults and validation beside the layer).

`add_defaults(m)` adds the fields to the model section `moejax.config.base_config()`
builds; `validate(config)` checks them. The Attention layer (moejax/layers/attention.py)
takes them as plain fields; `model.rope_scaling` becomes a `RopeScaling`.
"""

from __future__ import annotations

import ml_collections

from moejax.configlib import boolean, choice, fail, float_range, nonneg_int

QK_NORMS = ("none", "head", "full")
ROPE_TYPES = ("none", "linear", "llama3", "yarn")  # moejax/layers/rope.py implements them


def add_defaults(m: ml_collections.ConfigDict) -> None:
  m.qkv_bias = False  # biases on the q, k, v projections (Qwen2)
  m.out_bias = False  # bias on the attention output projection
  m.qk_norm = "none"  # none | head (RMSNorm per head: Qwen3) | full (over H*Dh: OLMoE)
  m.sliding_window = 0  # > 0: each query sees only the last n positions (Mistral)
  r = m.rope_scaling = ml_collections.ConfigDict()
  r.type = "none"  # none | linear | llama3 | yarn
  r.factor = 1.0
  r.original_max_len = 0  # llama3 / yarn: the pretraining context length
  r.low_freq_factor = 1.0  # llama3
  r.high_freq_factor = 4.0  # llama3
  r.beta_fast = 32.0  # yarn
  r.beta_slow = 1.0  # yarn
  r.mscale = 0.0  # yarn: attention factor mscale / mscale_all_dim (DeepSeek); 0 = unused
  r.mscale_all_dim = 0.0
  r.attention_factor = 0.0  # yarn: 0 = 0.1 ln(factor) + 1
  r.truncate = True  # yarn: round the correction range to whole dimensions


def validate(config: ml_collections.ConfigDict) -> None:
  m = config.model
  boolean(config, "model.qkv_bias")
  boolean(config, "model.out_bias")
  choice(config, "model.qk_norm", QK_NORMS)
  nonneg_int(config, "model.sliding_window")
  r = m.rope_scaling
  choice(config, "model.rope_scaling.type", ROPE_TYPES)
  if r.type == "none":
    return
  float_range(config, "model.rope_scaling.factor", 0, 1e6, lo_open=True)
  if r.type in ("llama3", "yarn"):
    if r.original_max_len <= 0:
      fail("model.rope_scaling.original_max_len", r.original_max_len,
           f"must be > 0 with rope_scaling.type={r.type!r} (the pretraining context)")
  if r.type == "llama3" and not 0 < r.low_freq_factor < r.high_freq_factor:
    fail("model.rope_scaling.low_freq_factor", r.low_freq_factor,
         f"must lie in (0, high_freq_factor={r.high_freq_factor})")
  if r.type == "yarn":
    for f in ("beta_fast", "beta_slow"):
      float_range(config, f"model.rope_scaling.{f}", 0, 1e6, lo_open=True)
    for f in ("mscale", "mscale_all_dim", "attention_factor"):
      float_range(config, f"model.rope_scaling.{f}", 0, 1e6)
    boolean(config, "model.rope_scaling.truncate")
