"""Small shared pieces: dtypes, initialisers with logical axes, RMSNorm, RoPE.

Tensor names carry their shapes (NanoDO style): B batch, T length, S cache length,
D d_model, H query heads, K kv heads, G query heads per kv head, Dh head dim, F ffn
width, V vocab.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.layers import rope as rope_lib

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype(name: str):
  return _DTYPES[name]


def param_init(std: float, axes: Sequence[str]):
  """Normal(std) initialiser whose parameter carries logical axis names."""
  return nn.with_logical_partitioning(nn.initializers.normal(std), tuple(axes))


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
  """Logical sharding constraint on an activation (a no-op without rules/mesh)."""
  return nn.with_logical_constraint(x, tuple(axes))


class RMSNorm(nn.Module):
  """RMSNorm in float32; a learned scale with logical axis 'embed'.

  copies > 0 keeps that many scales [copies, D] and `index` picks one (per-loop norms
  of a recursive block, WideNet-style).
  """
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  copies: int = 0
  axis: str | None = "embed"  # logical axis of the scale

  @nn.compact
  def __call__(self, x_BTD: Array, index: int = 0) -> Array:
    d = x_BTD.shape[-1]
    if self.copies:
      scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                                 ("loops", self.axis)),
                           (self.copies, d), self.param_dtype)[index]
    else:
      scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                                 (self.axis,)),
                           (d,), self.param_dtype)
    x = x_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale_D.astype(jnp.float32)).astype(self.dtype)


def rope(x_BTHD: Array, positions_BT: Array, theta: float) -> Array:
  """Plain rotary position embedding (rotate-half); scalings in moejax.layers.rope."""
  return rope_lib.apply_rope(x_BTHD, positions_BT, *rope_lib.frequencies(x_BTHD.shape[-1],
                                                                        theta, None))
