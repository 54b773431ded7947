"""SwiGLU feed-forward block: out = (silu(x W_gate) * (x W_up)) W_down."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.layers.common import Array, constrain, param_init


def swiglu(x_BTD: Array, w_gate_DF: Array, w_up_DF: Array, w_down_FD: Array) -> Array:
  """The SwiGLU product; shared by the dense FFN and the expert kernels."""
  h = jax.nn.silu(x_BTD @ w_gate_DF) * (x_BTD @ w_up_DF)
  return h @ w_down_FD


class MLP(nn.Module):
  d_ff: int
  init_std: float = 0.02
  out_std: float = 0.02
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    d = x_BTD.shape[-1]
    w_gate = self.param("gate", param_init(self.init_std, ("embed", "mlp")), (d, self.d_ff),
                        self.param_dtype)
    w_up = self.param("up", param_init(self.init_std, ("embed", "mlp")), (d, self.d_ff),
                      self.param_dtype)
    w_down = self.param("down", param_init(self.out_std, ("mlp", "embed")), (self.d_ff, d),
                        self.param_dtype)
    x = x_BTD.astype(self.dtype)
    h_BTF = jax.nn.silu(x @ w_gate.astype(self.dtype)) * (x @ w_up.astype(self.dtype))
    h_BTF = constrain(h_BTF, ("batch", "length", "mlp"))
    return constrain(h_BTF @ w_down.astype(self.dtype), ("batch", "length", "embed"))
