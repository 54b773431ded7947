"""Causal grouped-query attention with RoPE and an optional KV cache.

Decoding keeps the cache in the flax collection "cache" (k, v: [B, S, K, Dh] and the
write index). Prefill writes T entries at once; each further call writes one. Queries
see cache entries at positions <= their own, so unwritten slots are never read.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.layers.common import Array, constrain, param_init, rope

NEG_INF = -1e30


def attend(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, mask_BTS: Array) -> Array:
  """Softmax attention for H query heads over K kv heads (G = H // K per group).

  mask_BTS: True where query t may see key s. Softmax in float32.
  """
  b, t, h, dh = q_BTHD.shape
  k = k_BSKD.shape[2]
  q_BTKGD = q_BTHD.reshape(b, t, k, h // k, dh)
  logits_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD,
                            preferred_element_type=jnp.float32) * (dh ** -0.5)
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, NEG_INF)
  probs = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKD.dtype)
  out_BTKGD = jnp.einsum("bkgts,bskd->btkgd", probs, v_BSKD)
  return out_BTKGD.reshape(b, t, h, dh)


class Attention(nn.Module):
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  init_std: float = 0.02
  out_std: float = 0.02
  max_seq_len: int = 2048  # cache length when decoding
  decode: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: Array, positions_BT: Array) -> Array:
    d = x_BTD.shape[-1]
    h, k, dh = self.num_heads, self.num_kv_heads, self.head_dim
    w_q = self.param("q", param_init(self.init_std, ("embed", "heads", "head_dim")),
                     (d, h, dh), self.param_dtype)
    w_k = self.param("k", param_init(self.init_std, ("embed", "kv_heads", "head_dim")),
                     (d, k, dh), self.param_dtype)
    w_v = self.param("v", param_init(self.init_std, ("embed", "kv_heads", "head_dim")),
                     (d, k, dh), self.param_dtype)
    w_o = self.param("o", param_init(self.out_std, ("heads", "head_dim", "embed")),
                     (h, dh, d), self.param_dtype)
    x = x_BTD.astype(self.dtype)
    q_BTHD = jnp.einsum("btd,dhe->bthe", x, w_q.astype(self.dtype))
    k_BTKD = jnp.einsum("btd,dke->btke", x, w_k.astype(self.dtype))
    v_BTKD = jnp.einsum("btd,dke->btke", x, w_v.astype(self.dtype))
    q_BTHD = constrain(rope(q_BTHD, positions_BT, self.rope_theta),
                       ("batch", "length", "heads", "head_dim"))
    k_BTKD = constrain(rope(k_BTKD, positions_BT, self.rope_theta),
                       ("batch", "length", "kv_heads", "head_dim"))

    if self.decode:
      k_all, v_all, kpos_BS = self._update_cache(k_BTKD, v_BTKD)
      mask_BTS = kpos_BS[:, None, :] <= positions_BT[:, :, None]
    else:
      k_all, v_all = k_BTKD, v_BTKD
      mask_BTS = positions_BT[:, None, :] <= positions_BT[:, :, None]
    out_BTHD = attend(q_BTHD, k_all, v_all, mask_BTS)
    out_BTD = jnp.einsum("bthe,hed->btd", out_BTHD, w_o.astype(self.dtype))
    return constrain(out_BTD, ("batch", "length", "embed"))

  def _update_cache(self, k_BTKD: Array, v_BTKD: Array):
    b, t, k, dh = k_BTKD.shape
    s = self.max_seq_len
    ck = self.variable("cache", "k", jnp.zeros, (b, s, k, dh), k_BTKD.dtype)
    cv = self.variable("cache", "v", jnp.zeros, (b, s, k, dh), v_BTKD.dtype)
    idx = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    i = idx.value
    ck.value = jax.lax.dynamic_update_slice(ck.value, k_BTKD.astype(ck.value.dtype), (0, i, 0, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, v_BTKD.astype(cv.value.dtype), (0, i, 0, 0))
    idx.value = i + t
    kpos_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    # Slots not yet written sit at positions >= i + t > every query position.
    return ck.value, cv.value, kpos_BS
