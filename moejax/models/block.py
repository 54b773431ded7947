"""Pre-norm transformer blocks: x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x)).

`cfg` is an `LMConfig` (moejax.models.lm). A block inside a recursive model's looped
core (`shared=True`) is called once per loop: it takes the loop index (per-loop LoRA,
per-loop norms, a KV cache per loop), an optional token mask (Mixture-of-Recursions: the
tokens attention keeps as keys and the MoE FFN counts) and optional shared keys/values,
and returns its keys/values for KV sharing. While decoding, `rows_N` says which batch rows
of the caches the (row-gathered) input holds; `cache_view` / `write_kv` split such a step
into a read-only attention and a cache write (moejax.layers.attention). `segment_ids_BT`
(packed documents, training and evaluation only) keeps attention inside each document.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax

from moejax.layers.attention import Attention
from moejax.layers.common import Array, RMSNorm, constrain, dtype
from moejax.layers.mlp import MLP
from moejax.moe.layer import MoEFFN


class Block(nn.Module):
  cfg: Any  # LMConfig
  decode: bool = False
  deterministic: bool = True
  kind: str = "dense"  # dense | moe (the FFN)
  shared: bool = False  # a looped block of a recursive model

  @nn.compact
  def __call__(self, x_BTD: Array, positions_BT: Array, tokens_BT: Array,
               segment_ids_BT: Array | None = None, loop: int = 0,
               token_mask_BT: Array | None = None, shared_kv: tuple | None = None,
               rows_N: Array | None = None, cache_view: tuple | None = None,
               write_kv: tuple | None = None):
    c = self.cfg
    cdt, pdt = dtype(c.compute_dtype), dtype(c.param_dtype)
    rc = c.recursion if self.shared else None
    loops = rc.num_loops if rc else 1
    copies = loops if rc and rc.unshared_norms else 0
    lora_rank = rc.lora_rank if rc else 0
    lora_scale = rc.lora_scale if rc else 1.0
    cache_lens = ()
    if rc and rc.kv_cache_fractions:
      cache_lens = tuple(max(1, math.ceil(f * c.max_seq_len)) for f in rc.kv_cache_fractions)

    attn = Attention(c.num_heads, c.num_kv_heads, c.head_dim, c.rope_theta, c.init_std,
                     c.out_std, c.max_seq_len, self.decode, cdt, pdt, loops, lora_rank,
                     lora_scale, cache_lens, qkv_bias=c.qkv_bias, out_bias=c.out_bias,
                     qk_norm=c.qk_norm, norm_eps=c.norm_eps, sliding_window=c.sliding_window,
                     rope_scaling=c.rope_scaling, name="attn")
    if write_kv is not None:  # the cache write of a row-gathered decoding step only
      attn(x_BTD, positions_BT, slot=loop, token_mask_BT=token_mask_BT, write_kv=write_kv)
      return x_BTD, None
    h = RMSNorm(c.norm_eps, cdt, pdt, copies, name="attn_norm")(x_BTD, loop)
    out = attn(h, positions_BT, loop=loop, slot=loop, token_mask_BT=token_mask_BT,
               shared_kv=shared_kv, return_kv=self.shared, rows_N=rows_N,
               cache_view=cache_view, segment_ids_BT=segment_ids_BT)
    out, kv = out if self.shared else (out, None)
    x_BTD = x_BTD + out
    h = RMSNorm(c.norm_eps, cdt, pdt, copies, name="ffn_norm")(x_BTD, loop)
    if self.kind == "moe":
      ffn = MoEFFN(c.moe, c.init_std, c.out_std, self.deterministic, cdt, pdt, name="moe")
      x_BTD = x_BTD + ffn(h, tokens_BT, loop=loop, token_mask_BT=token_mask_BT)
    else:
      x_BTD = x_BTD + MLP(c.d_ff, c.init_std, c.out_std, cdt, pdt, loops, lora_rank, lora_scale,
                          name="ffn")(h, loop)
    return constrain(x_BTD, ("batch", "length", "embed")), kv


class BlockGroup(nn.Module):
  """Several blocks in sequence (e.g. one MoE block then dense ones): a scan unit."""
  cfg: Any
  kinds: tuple[str, ...]
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD: Array, positions_BT: Array, tokens_BT: Array,
               segment_ids_BT: Array | None = None):
    for i, kind in enumerate(self.kinds):
      x_BTD, _ = Block(self.cfg, self.decode, self.deterministic, kind, name=f"block_{i}")(
          x_BTD, positions_BT, tokens_BT, segment_ids_BT)
    return x_BTD, None


REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
