"""Per-loop LoRA factors for a projection (relaxed recursion).

A projection y = x W (W with `in_axes` input dims and `out_axes` output dims) gets, for
each loop r, a low-rank correction y += scale * (x A_r) B_r. A_r: [R, *in, rank] starts
small and random, B_r: [R, rank, *out] starts at zero, so a fresh relaxed model equals the
plain recursive one; `moejax.recursion.relaxed` fills them from an SVD instead.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from moejax.layers.common import Array, param_init


def lora_factors(module: nn.Module, name: str, in_shape: Sequence[int], out_shape: Sequence[int],
                 loops: int, rank: int, std: float, param_dtype) -> tuple[Array, Array]:
  """Declare `{name}_lora_a` [R, *in, rank] and `{name}_lora_b` [R, rank, *out] on module."""
  a = module.param(f"{name}_lora_a",
                   param_init(std, ("loops",) + (None,) * len(in_shape) + ("lora",)),
                   (loops, *in_shape, rank), param_dtype)
  b = module.param(f"{name}_lora_b",
                   nn.with_logical_partitioning(nn.initializers.zeros,
                                                ("loops", "lora") + (None,) * len(out_shape)),
                   (loops, rank, *out_shape), param_dtype)
  return a, b


def lora_delta(x: Array, a: Array, b: Array, loop: int, n_in: int, scale: float) -> Array:
  """scale * (x A[loop]) B[loop], contracting the last `n_in` dims of x."""
  a_r, b_r = a[loop].astype(x.dtype), b[loop].astype(x.dtype)
  h = jnp.tensordot(x, a_r, axes=n_in)
  return scale * jnp.tensordot(h, b_r, axes=1)
