"""SwiGLU feed-forward block: out = (silu(x W_gate) * (x W_up)) W_down."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.layers.common import Array, constrain, param_init
from moejax.layers.lora import lora_delta, lora_factors


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
  num_loops: int = 1  # relaxed recursion: per-loop LoRA on gate, up and down
  lora_rank: int = 0
  lora_scale: float = 1.0

  @nn.compact
  def __call__(self, x_BTD: Array, loop: int = 0) -> Array:
    d = x_BTD.shape[-1]
    w_gate = self.param("gate", param_init(self.init_std, ("embed", "mlp")), (d, self.d_ff),
                        self.param_dtype)
    w_up = self.param("up", param_init(self.init_std, ("embed", "mlp")), (d, self.d_ff),
                      self.param_dtype)
    w_down = self.param("down", param_init(self.out_std, ("mlp", "embed")), (self.d_ff, d),
                        self.param_dtype)
    lora = {}
    if self.lora_rank:
      for name, n_in, n_out in (("gate", d, self.d_ff), ("up", d, self.d_ff),
                                ("down", self.d_ff, d)):
        lora[name] = lora_factors(self, name, (n_in,), (n_out,), self.num_loops, self.lora_rank,
                                  self.init_std, self.param_dtype)

    def proj(name, x, w):
      y = x @ w.astype(self.dtype)
      return y + lora_delta(x, *lora[name], loop, 1, self.lora_scale) if name in lora else y

    x = x_BTD.astype(self.dtype)
    h_BTF = jax.nn.silu(proj("gate", x, w_gate)) * proj("up", x, w_up)
    h_BTF = constrain(h_BTF, ("batch", "length", "mlp"))
    return constrain(proj("down", h_BTF, w_down), ("batch", "length", "embed"))
