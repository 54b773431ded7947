"""Causal grouped-query attention with RoPE and an optional KV cache.

Decoding keeps the cache in the flax collection "cache" (k, v: [B, S, K, Dh] and the
write index). Prefill writes T entries at once; each further call writes one. Queries
see cache entries at positions <= their own, so unwritten slots are never read.

Recursive models call one Attention several times (one `slot` per loop, each with its
own cache). With a `token_mask` (Mixture-of-Recursions) keys are only the active tokens,
and the decoding cache is compacted: only active tokens are written, each with its
position, into `cache_len` slots (recursion-wise KV caching). `shared_kv` makes a call
attend to another call's keys and values (KV sharing) instead of computing its own.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.layers import rope as rope_lib
from moejax.layers.common import Array, RMSNorm, constrain, param_init
from moejax.layers.lora import lora_delta, lora_factors

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
  num_loops: int = 1  # per-loop LoRA factors are stacked over loops
  lora_rank: int = 0
  lora_scale: float = 1.0
  cache_lens: tuple[int, ...] = ()  # compacted cache slots per slot index; () = max_seq_len
  qkv_bias: bool = False  # biases on q, k, v (Qwen2)
  out_bias: bool = False  # bias on the output projection
  qk_norm: str = "none"  # none | head (RMSNorm per head, Qwen3) | full (over H*Dh, OLMoE)
  norm_eps: float = 1e-6  # of the QK norms
  sliding_window: int = 0  # > 0: a query sees only the last `sliding_window` positions
  rope_scaling: rope_lib.RopeScaling | None = None

  @nn.compact
  def __call__(self, x_BTD: Array, positions_BT: Array, *, loop: int = 0, slot: int = 0,
               token_mask_BT: Array | None = None, shared_kv: tuple | None = None,
               return_kv: bool = False, rows_N: Array | None = None,
               cache_view: tuple | None = None, write_kv: tuple | None = None,
               segment_ids_BT: Array | None = None):
    """segment_ids_BT (packed documents; not while decoding): a query sees only keys of
    its own segment, so with positions restarting per document each document attends
    exactly as if it ran alone.

    cache_view / write_kv split a row-gathered decoding step (MoR) in two, so the
    caches stay out of the conditional that picks the row buffer (XLA copies whole
    caches through a conditional's branches): cache_view = this slot's compact cache
    (k, v, pos, count; full batch, read only) -> attend over the rows_N rows with the new
    token placed where the write will put it, and return its (k, v) instead of writing;
    write_kv = (k_BTKD, v_BTKD) -> only write them into the cache (token_mask_BT, slot)."""
    if write_kv is not None:
      self._update_compact_cache(*write_kv, positions_BT, token_mask_BT, slot)
      return None
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
    lora = {}
    if self.lora_rank:
      for name, ins, outs in (("q", (d,), (h, dh)), ("k", (d,), (k, dh)), ("v", (d,), (k, dh)),
                              ("o", (h, dh), (d,))):
        lora[name] = lora_factors(self, name, ins, outs, self.num_loops, self.lora_rank,
                                  self.init_std, self.param_dtype)

    def proj(name, x, w, spec, n_in=1):
      y = jnp.einsum(spec, x, w.astype(self.dtype))
      if name in lora:
        y = y + lora_delta(x, *lora[name], loop, n_in, self.lora_scale)
      return y

    inv_freq, rope_factor = rope_lib.frequencies(dh, self.rope_theta, self.rope_scaling)

    def project(name, x, w, spec, n):  # [B, T, n, Dh]: projection, bias, QK norm, RoPE
      y = proj(name, x, w, spec)
      if self.qkv_bias:
        axes = ("heads" if name == "q" else "kv_heads", "head_dim")
        y = y + self.param(f"{name}_bias", nn.with_logical_partitioning(
            nn.initializers.zeros, axes), (n, dh), self.param_dtype).astype(self.dtype)
      if self.qk_norm == "head" and name != "v":
        y = RMSNorm(self.norm_eps, self.dtype, self.param_dtype, axis="head_dim",
                    name=f"{name}_norm")(y)
      elif self.qk_norm == "full" and name != "v":
        b_, t_ = y.shape[:2]
        y = RMSNorm(self.norm_eps, self.dtype, self.param_dtype, axis=None,
                    name=f"{name}_norm")(y.reshape(b_, t_, n * dh)).reshape(b_, t_, n, dh)
      if name == "v":
        return y
      return rope_lib.apply_rope(y, positions_BT, inv_freq, rope_factor)

    x = x_BTD.astype(self.dtype)
    q_BTHD = constrain(project("q", x, w_q, "btd,dhe->bthe", h),
                       ("batch", "length", "heads", "head_dim"))
    if shared_kv is not None:  # KV sharing: another call's keys/values (already cached)
      k_all, v_all, kpos_BS, kvalid_BS = shared_kv
    else:
      k_BTKD = constrain(project("k", x, w_k, "btd,dke->btke", k),
                         ("batch", "length", "kv_heads", "head_dim"))
      v_BTKD = project("v", x, w_v, "btd,dke->btke", k)
      if cache_view is not None:
        k_all, v_all, kpos_BS, kvalid_BS = self._view_compact_cache(
            cache_view, k_BTKD, v_BTKD, positions_BT, token_mask_BT, rows_N)
      elif self.decode and token_mask_BT is not None:
        k_all, v_all, kpos_BS, kvalid_BS = self._update_compact_cache(
            k_BTKD, v_BTKD, positions_BT, token_mask_BT, slot)
      elif self.decode:
        k_all, v_all, kpos_BS = self._update_cache(k_BTKD, v_BTKD, slot)
        kvalid_BS = None
      else:
        k_all, v_all, kpos_BS, kvalid_BS = k_BTKD, v_BTKD, positions_BT, token_mask_BT
    mask_BTS = kpos_BS[:, None, :] <= positions_BT[:, :, None]
    if self.sliding_window:
      mask_BTS = mask_BTS & (kpos_BS[:, None, :] > positions_BT[:, :, None] - self.sliding_window)
    if kvalid_BS is not None:
      mask_BTS = mask_BTS & kvalid_BS[:, None, :]
    if segment_ids_BT is not None:
      if self.decode:
        raise ValueError("segment_ids_BT is not supported while decoding")
      mask_BTS = mask_BTS & (segment_ids_BT[:, None, :] == segment_ids_BT[:, :, None])
    out_BTHD = attend(q_BTHD, k_all, v_all, mask_BTS)
    out_BTD = proj("o", out_BTHD, w_o, "bthe,hed->btd", n_in=2)
    if self.out_bias:
      out_BTD = out_BTD + self.param("o_bias", nn.with_logical_partitioning(
          nn.initializers.zeros, ("embed",)), (d,), self.param_dtype).astype(self.dtype)
    out_BTD = constrain(out_BTD, ("batch", "length", "embed"))
    if return_kv and cache_view is not None:
      return out_BTD, (k_BTKD, v_BTKD)
    if return_kv:
      return out_BTD, (k_all, v_all, kpos_BS, kvalid_BS)
    return out_BTD

  @staticmethod
  def _place_compact(ck, cv, cpos, count_N, k_BTKD, v_BTKD, positions_BT, mask_BT):
    """N rows of a compact cache with the masked tokens' K/V packed in after each row's
    count_N filled slots (inactive tokens and overflow are dropped): (k, v, pos, new
    counts, written-slot mask)."""
    s = ck.shape[1]
    m = mask_BT.astype(jnp.int32)
    dest_BT = jnp.where(mask_BT, count_N[:, None] + jnp.cumsum(m, axis=1) - 1, s)
    r_N1 = jnp.arange(ck.shape[0])[:, None]
    ck = ck.at[r_N1, dest_BT].set(k_BTKD.astype(ck.dtype), mode="drop")
    cv = cv.at[r_N1, dest_BT].set(v_BTKD.astype(cv.dtype), mode="drop")
    cpos = cpos.at[r_N1, dest_BT].set(positions_BT.astype(jnp.int32), mode="drop")
    count_N = count_N + m.sum(axis=1)
    return ck, cv, cpos, count_N, jnp.arange(s)[None, :] < count_N[:, None]

  @classmethod
  def _view_compact_cache(cls, view, k_BTKD, v_BTKD, positions_BT, mask_BT, rows_N):
    """The rows_N rows of a compact cache view (k, v, pos, count) as
    `_update_compact_cache` would leave them, without writing it."""
    rows = jnp.arange(view[0].shape[0]) if rows_N is None else rows_N
    ck, cv, cpos, _, written_BS = cls._place_compact(
        *(a[rows] for a in view), k_BTKD, v_BTKD, positions_BT, mask_BT)
    return ck, cv, cpos, written_BS

  @staticmethod
  def cache_names(slot: int) -> tuple[str, ...]:
    """The cache variables of one slot: (k, v, index / count, pos)."""
    sfx = f"_{slot}" if slot else ""
    return tuple(n + sfx for n in ("k", "v", "index", "pos"))

  def _update_compact_cache(self, k_BTKD, v_BTKD, positions_BT, mask_BT, slot: int):
    """Write only the active tokens' K/V, packed, with their positions (MoR caching)."""
    b, t, k, dh = k_BTKD.shape
    s = self.cache_lens[slot] if self.cache_lens else self.max_seq_len
    nk, nv, nidx, npos = self.cache_names(slot)
    ck = self.variable("cache", nk, jnp.zeros, (b, s, k, dh), k_BTKD.dtype)
    cv = self.variable("cache", nv, jnp.zeros, (b, s, k, dh), v_BTKD.dtype)
    cpos = self.variable("cache", npos, jnp.zeros, (b, s), jnp.int32)
    count = self.variable("cache", nidx, lambda: jnp.zeros((b,), jnp.int32))
    ck.value, cv.value, cpos.value, count.value, written_BS = self._place_compact(
        ck.value, cv.value, cpos.value, count.value, k_BTKD, v_BTKD, positions_BT, mask_BT)
    return ck.value, cv.value, cpos.value, written_BS

  def _update_cache(self, k_BTKD: Array, v_BTKD: Array, slot: int = 0):
    b, t, k, dh = k_BTKD.shape
    s = self.max_seq_len
    nk, nv, nidx, _ = self.cache_names(slot)
    ck = self.variable("cache", nk, jnp.zeros, (b, s, k, dh), k_BTKD.dtype)
    cv = self.variable("cache", nv, jnp.zeros, (b, s, k, dh), v_BTKD.dtype)
    idx = self.variable("cache", nidx, lambda: jnp.zeros((), jnp.int32))
    i = idx.value
    ck.value = jax.lax.dynamic_update_slice(ck.value, k_BTKD.astype(ck.value.dtype), (0, i, 0, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, v_BTKD.astype(cv.value.dtype), (0, i, 0, 0))
    idx.value = i + t
    kpos_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    # Slots not yet written sit at positions >= i + t > every query position.
    return ck.value, cv.value, kpos_BS
