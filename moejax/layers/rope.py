"""Rotary position embeddings with the context-extension scalings real checkpoints use.

`RopeScaling.type`: "none" (plain RoPE), "linear" (positions / factor), "llama3" (Llama
3.1: low frequencies / factor, high kept, a smooth ramp between) and "yarn" (YaRN: per-
frequency blend of interpolation and extrapolation, plus an attention factor that scales
cos and sin, so the logits by its square). The inverse frequencies are a static function
of the config, computed once in numpy float32 as transformers does.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from moejax.layers.config import ROPE_TYPES as TYPES


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  type: str = "none"
  factor: float = 1.0
  original_max_len: int = 0  # llama3 / yarn: the pretraining context
  low_freq_factor: float = 1.0  # llama3
  high_freq_factor: float = 4.0  # llama3
  beta_fast: float = 32.0  # yarn
  beta_slow: float = 1.0  # yarn
  mscale: float = 0.0  # yarn (DeepSeek): attention factor from mscale / mscale_all_dim
  mscale_all_dim: float = 0.0
  attention_factor: float = 0.0  # yarn: 0 = derived from factor (and mscale)
  truncate: bool = True  # yarn: round the correction range to whole dimensions

  @classmethod
  def from_config(cls, c) -> "RopeScaling":
    return cls(**{f.name: c[f.name] for f in dataclasses.fields(cls)})


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def frequencies(dim: int, theta: float, s: RopeScaling | None) -> tuple[np.ndarray, float]:
  """(inverse frequencies [dim / 2] float32, attention factor on cos and sin)."""
  exps = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
  pos_freqs = np.power(np.float32(theta), exps, dtype=np.float32)
  inv = (np.float32(1.0) / pos_freqs).astype(np.float32)
  if s is None or s.type == "none":
    return inv, 1.0
  if s.type == "linear":
    return (inv / np.float32(s.factor)).astype(np.float32), 1.0
  if s.type == "llama3":
    old = s.original_max_len
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = (2 * math.pi / inv).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv / np.float32(s.factor), inv).astype(np.float32)
    smooth = ((old / wavelen - s.low_freq_factor) /
              (s.high_freq_factor - s.low_freq_factor)).astype(np.float32)
    smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
  if s.type == "yarn":
    factor = s.factor
    if s.attention_factor:
      att = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
      att = _yarn_mscale(factor, s.mscale) / _yarn_mscale(factor, s.mscale_all_dim)
    else:
      att = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
      return (dim * math.log(s.original_max_len / (rotations * 2 * math.pi))) / (
          2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
      high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolate = (1 - ramp).astype(np.float32)
    interp = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
    return (interp * (1 - extrapolate) + inv * extrapolate).astype(np.float32), float(att)
  raise ValueError(f"model.rope_scaling.type = {s.type!r}; allowed: {TYPES}")


def apply_rope(x_BTHD: jax.Array, positions_BT: jax.Array, inv_freq: np.ndarray,
               attention_factor: float = 1.0) -> jax.Array:
  """Rotate-half RoPE (the Hugging Face / Llama layout), computed in float32."""
  angle_BTF = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  sin = (jnp.sin(angle_BTF) * attention_factor)[:, :, None, :]
  cos = (jnp.cos(angle_BTF) * attention_factor)[:, :, None, :]
  x = x_BTHD.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHD.dtype)
