"""The recursive stack: tied layers looped, and Mixture-of-Recursions routing.

One module runs every sharing strategy. The looped core (`shared_{u}` blocks) is one set
of parameters called once per loop r (Python-unrolled: loops are few, and MoR steps
have different static shapes). With a recursion router (MoR) each step r:

  expert  A router w_r scores the tokens still active. Training (and eval_routing='topk')
          keeps the top ceil(capacity_r * T) of them per sequence; only those are
          gathered and run through the core (static shapes), so skipped tokens cost
          nothing. Their update is gated by g(score) (sigmoid/tanh times alpha) and
          scattered back; the rest keep their hidden state. Top-k over a sequence looks
          at future tokens, so an auxiliary BCE teaches the router's own score
          (aux='bce') or a small causal router on the detached state
          (aux='causal_router') to predict top-k membership; at inference a token goes
          on while that probability exceeds `threshold` (causal, per-token early exit).
  token   One router gives each token its depth up front (argmax of softmax over R,
          plus a loss-free bias if balance='bias'); a token runs steps r < depth, its
          updates gated by its chosen probability. Balancing loss and z-loss.

Causality. Every inference path is causal, and so is every training path but expert
choice's top-k over the sequence (the method needs it; a config must say
model.recursion.allow_noncausal_training). A capacity below 1 is enforced by the causal
capacity rule: of the tokens the router sends on at step r, the first ceil(capacity_r * T)
of each sequence by position are kept, later ones exit there (stats: capacity_cut; while
decoding a per-sequence counter in the cache carries the count across calls).

Attention at a step runs among the tokens active at that step (recursion-wise); with
kv_sharing every later step attends to the first step's keys/values instead. Steps at
capacity 1.0 keep every active token (the router still gates). Eval and prefill gather
the kept tokens of each step into static buffers of ceil(capacity_r * T) rows per
sequence, so exited tokens cost nothing; decoding gathers the active rows into a bounded
row buffer (`_decode_rows`). dispatch='mask' runs every token and masks the results: the
reference every gathered path is tested against (same results, no savings).

Decoding keeps, per loop, only the K/V of tokens that reached it (recursion-wise cache;
`kv_cache_fractions` sizes each loop's compacted cache, and a token finding its loop's
cache full exits there, counted in cache/overflow_r).

Side outputs: "mor_losses" (weighted losses, added to the training loss), "mor_stats"
(per-token depth histogram, active fraction per step, depth load), "mor_bias" (the
token router's loss-free bias, updated by the train step).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from moejax.layers.attention import Attention
from moejax.layers.common import Array, param_init
from moejax.models.block import REMAT_POLICIES, Block


def gate_fn(kind: str, score: Array, alpha: float) -> Array | None:
  if kind == "sigmoid":
    return alpha * jax.nn.sigmoid(score)
  if kind == "tanh":
    return alpha * jnp.tanh(score)
  return None


def gated_update(x_BTD: Array, h_BTD: Array, gate_BT: Array | None, keep_BT: Array) -> Array:
  """A MoR step's update over the whole batch: x + gate * (h - x) where kept, x elsewhere."""
  delta = h_BTD - x_BTD
  if gate_BT is not None:
    delta = delta * gate_BT[..., None].astype(delta.dtype)
  return x_BTD + jnp.where(keep_BT[..., None], delta, 0).astype(x_BTD.dtype)


def topk_positions(score_BT: Array, candidates_BT: Array, k: int) -> Array:
  """Indices [B, k] (ascending, so causal order is kept) of the k best candidates."""
  _, idx = jax.lax.top_k(jnp.where(candidates_BT, score_BT, -jnp.inf), k)
  return jnp.sort(idx, axis=-1)


def first_positions(sel_BT: Array, c: int) -> tuple[Array, Array]:
  """(idx_BC, valid_BC): each row's first c selected positions, ascending. A row with
  fewer than c selected pads with index 0 and valid False."""
  b, t = sel_BT.shape
  rank_BT = jnp.cumsum(sel_BT.astype(jnp.int32), axis=1)
  dest_BT = jnp.where(sel_BT & (rank_BT <= c), rank_BT - 1, c)
  pos_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  idx_BC = jnp.zeros((b, c + 1), jnp.int32).at[jnp.arange(b)[:, None], dest_BT].set(pos_BT)
  valid_BC = jnp.arange(c)[None, :] < jnp.minimum(rank_BT[:, -1:], c)
  return idx_BC[:, :c], valid_BC


def decode_buckets(batch: int) -> list[int]:
  """Row-buffer sizes for a decoding step: multiples of ceil(B/8), ending at B."""
  step = max(1, -(-batch // 8))
  return sorted({min(batch, step * i) for i in range(1, 9)})


def masked_bce(logits: Array, labels: Array, where: Array) -> Array:
  losses = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32))
  w = where.astype(jnp.float32)
  return jnp.sum(losses * w) / jnp.maximum(jnp.sum(w), 1.0)


class RecursiveStack(nn.Module):
  """x [B, T, D] -> x after the effective L layers of `cfg.recursion`."""
  cfg: Any  # LMConfig with .recursion set
  decode: bool = False
  deterministic: bool = True

  def setup(self):
    # Blocks are made in setup (names as before: first_layer, shared_{u}, last_layer) so
    # the decode row-gather's nn.switch branches can reach them as attributes.
    c = self.cfg
    unit = Block
    if c.remat != "none" and not self.decode:  # loop index (arg 4, counting self) is static
      unit = nn.remat(Block, policy=REMAT_POLICIES[c.remat], static_argnums=(4,))
    for n in self._block_names():
      setattr(self, n, unit(c, self.decode, self.deterministic, c.unique_kind(n),
                            shared=n.startswith("shared_")))

  def _block_names(self) -> list[str]:
    names = self._core_names()
    return ["first_layer"] + names + ["last_layer"] if self.cfg.recursion.middle else names

  @nn.compact
  def __call__(self, x_BTD: Array, positions_BT: Array, tokens_BT: Array,
               segment_ids_BT: Array | None = None) -> Array:
    rc = self.cfg.recursion
    if segment_ids_BT is not None and rc.router != "none":
      raise ValueError("document masking (segment ids) is not supported with "
                       f"Mixture-of-Recursions (router={rc.router!r})")
    blocks = {n: getattr(self, n) for n in self._block_names()}
    core = [blocks[n] for n in self._core_names()]

    if rc.middle:
      x_BTD, _ = blocks["first_layer"](x_BTD, positions_BT, tokens_BT, segment_ids_BT)
    loops = rc.loops_at(self.deterministic)
    if rc.strategy in ("sequence", "middle_sequence"):
      for blk in core:
        for r in range(loops):
          x_BTD, _ = blk(x_BTD, positions_BT, tokens_BT, segment_ids_BT, r)
    else:
      x_BTD = self._loop(core, loops, x_BTD, positions_BT, tokens_BT, segment_ids_BT)
    if rc.middle:
      x_BTD, _ = blocks["last_layer"](x_BTD, positions_BT, tokens_BT, segment_ids_BT)
    return x_BTD

  def _routers(self, d: int) -> dict:
    """The router parameters (declared here so every mode has the same tree)."""
    rc, std = self.cfg.recursion, self.cfg.init_std
    p = {}
    if rc.router == "expert":
      p["w"] = self.param("router", param_init(std, ("loops", "embed")), (rc.num_loops, d),
                          jnp.float32)
      p["b"] = self.param("router_bias", nn.with_logical_partitioning(
          nn.initializers.zeros, ("loops",)), (rc.num_loops,), jnp.float32)
      if rc.aux == "causal_router":
        p["cw"] = self.param("causal_router", param_init(std, ("loops", "embed")),
                             (rc.num_loops, d), jnp.float32)
        p["cb"] = self.param("causal_router_bias", nn.with_logical_partitioning(
            nn.initializers.zeros, ("loops",)), (rc.num_loops,), jnp.float32)
    elif rc.router == "token":
      p["w"] = self.param("router", param_init(std, ("embed", "loops")), (d, rc.num_loops),
                          jnp.float32)
      if rc.balance == "bias":
        p["bias"] = self.variable("mor_bias", "bias", jnp.zeros, (rc.num_loops,),
                                  jnp.float32).value
    return p

  def _fit_cache(self, sel_BT: Array, r: int) -> Array:
    """Decoding with compacted caches of ceil(fraction_r * max_seq_len) slots: a token
    that finds step r's cache full stops there (as if the router had let it exit), so no
    token ever attends to keys that were not stored. `cache/overflow_{r}` counts them."""
    c, rc = self.cfg, self.cfg.recursion
    slots = max(1, math.ceil(rc.kv_cache_fractions[r] * c.max_seq_len))
    b = sel_BT.shape[0]
    used = self.variable("cache", f"depth_count_{r}", jnp.zeros, (b,), jnp.int32)
    over = self.variable("cache", f"overflow_{r}", jnp.zeros, (b,), jnp.int32)
    rank_BT = used.value[:, None] + jnp.cumsum(sel_BT.astype(jnp.int32), axis=1)
    fits_BT = sel_BT & (rank_BT <= slots)
    used.value = used.value + fits_BT.sum(axis=1).astype(jnp.int32)
    over.value = over.value + (sel_BT & ~fits_BT).sum(axis=1).astype(jnp.int32)
    return fits_BT

  def _capacity_limit(self, r: int, t: int) -> int:
    """Step r's per-sequence token budget: ceil(capacity_r * T), with T = max_seq_len
    while decoding (prefill + decode then equal one full forward of max_seq_len)."""
    return self.cfg.recursion.capacity_tokens(r, self.cfg.max_seq_len if self.decode else t)

  def _causal_capacity(self, want_BT: Array, r: int) -> Array:
    """The causal capacity rule: of the tokens the router sends on, the first
    ceil(capacity_r * T) of each sequence (by position) are kept, later ones exit here.
    A token's fate depends only on itself and earlier tokens. Decoding counts the
    tokens kept in earlier calls (`cache/capacity_count_{r}`)."""
    b, t = want_BT.shape
    limit = self._capacity_limit(r, t)
    rank_BT = jnp.cumsum(want_BT.astype(jnp.int32), axis=1)
    if self.decode:
      used = self.variable("cache", f"capacity_count_{r}", jnp.zeros, (b,), jnp.int32)
      rank_BT = rank_BT + used.value[:, None]
    keep_BT = want_BT & (rank_BT <= limit)
    if self.decode:
      used.value = used.value + keep_BT.sum(axis=1).astype(jnp.int32)
    return keep_BT

  def _run_core(self, blocks, r: int, x_BTD, positions_BT, tokens_BT, mask_BT, shared,
                rows_N=None, views=None, segment_ids_BT=None):
    """The core's blocks at step r. With `views` (decoding: each block's read-only cache
    for this step) it returns (h, {u: the new token's (k, v)}) and writes nothing."""
    h = x_BTD
    new_kv = {}
    for u, blk in enumerate(blocks):
      kv_in = shared.get(u) if self.cfg.recursion.kv_sharing and r > 0 else None
      if kv_in is not None and rows_N is not None:
        kv_in = tuple(a[rows_N] for a in kv_in)
      view = views.get(u) if views is not None else None
      h, kv = blk(h, positions_BT, tokens_BT, segment_ids_BT, r, mask_BT, kv_in, rows_N,
                   cache_view=view)
      if view is not None:
        new_kv[u] = kv
      if r == 0 and views is None:
        shared[u] = kv
    return (h, new_kv) if views is not None else h

  def _cache_views(self, r: int) -> dict:
    """{u: (k, v, pos, count)} of step r's compact cache in each core block (read here,
    outside the row-buffer switch); {} where the step attends to shared K/V."""
    if self.cfg.recursion.kv_sharing and r > 0:
      return {}
    nk, nv, nidx, npos = Attention.cache_names(r)
    views = {}
    for u, name in enumerate(self._core_names()):
      cache = getattr(self, name).variables["cache"]["attn"]
      views[u] = (cache[nk], cache[nv], cache[npos], cache[nidx])
    return views

  def _decode_rows(self, r: int, x_BTD, positions_BT, tokens_BT, sel_BT, gate_BT, shared):
    """One decoding step (T = 1) of loop r on only the rows whose token is still active.

    Design: per-step gather of the active rows into a bounded buffer. The buffer size is
    picked at run time among a few static sizes (multiples of B/8, via nn.switch), the
    smallest that holds every active row, so nothing is ever dropped and the result
    equals the masked path exactly; a step whose active rows need the whole batch runs
    the masked path, and a step with no active row skips the loop (its weights and
    caches are not touched). Chosen over continuous depth-wise batching (Relaxed Recursive
    Transformers): it keeps `generate`'s one-token-per-sequence scan and its caches
    unchanged, at the cost of rounding each step's rows up to the next bucket.
    The KV caches stay out of the switch (XLA copies whole buffers through a
    conditional's branches): each branch attends over a read-only view of the rows it
    holds and returns their new K/V, which are written after it, by the masked path's
    write. Measured (benchmarks/recursion.py, depth ~0.65, three runs): 1.00-1.21x the
    recursive model's tokens/s; the copy of the gathered rows' caches and the per-step weight reads
    are what is left.
    """
    c = self.cfg
    b = x_BTD.shape[0]

    def blocks(mdl):
      return [getattr(mdl, n) for n in mdl._core_names()]

    def zeros_kv(views):
      return {u: tuple(jnp.zeros((b, 1) + a.shape[2:], a.dtype) for a in v[:2])
              for u, v in views.items()}

    def gathered(n, mdl, x_BTD, sel_BT, gate_BT, kv, views):
      rows_1N, valid_1N = first_positions(sel_BT[:, 0][None], n)
      rows_N, valid_N = rows_1N[0], valid_1N[0]
      xg = x_BTD[rows_N]
      h, new = mdl._run_core(blocks(mdl), r, xg, positions_BT[rows_N], tokens_BT[rows_N],
                             valid_N[:, None], dict(kv), rows_N, views)
      delta = h - xg
      if gate_BT is not None:
        delta = delta * gate_BT[rows_N][..., None].astype(delta.dtype)
      delta = jnp.where(valid_N[:, None, None], delta, 0)
      dest_N = jnp.where(valid_N, rows_N, b)  # padding rows scatter nowhere
      full_kv = {u: tuple(z.at[dest_N].set(a.astype(z.dtype), mode="drop")
                          for z, a in zip(zkv, new[u]))
                 for u, zkv in zeros_kv(views).items()}
      return x_BTD.at[rows_N].add(delta.astype(x_BTD.dtype)), full_kv

    def full(mdl, x_BTD, sel_BT, gate_BT, kv, views):
      h, new = mdl._run_core(blocks(mdl), r, x_BTD, positions_BT, tokens_BT, sel_BT,
                             dict(kv), None, views)
      return gated_update(x_BTD, h, gate_BT, sel_BT), new

    def skip(mdl, x_BTD, sel_BT, gate_BT, kv, views):  # no active row: the loop is not run
      return x_BTD, zeros_kv(views)

    sizes = decode_buckets(b)
    kv = {u: v for u, v in shared.items()} if c.recursion.kv_sharing else {}
    if self.is_initializing():  # creates the caches the normal way
      h = self._run_core(blocks(self), r, x_BTD, positions_BT, tokens_BT, sel_BT, dict(kv))
      return gated_update(x_BTD, h, gate_BT, sel_BT)

    views = self._cache_views(r)
    n_active = jnp.sum(sel_BT[:, 0].astype(jnp.int32))
    index = jnp.searchsorted(jnp.asarray([0] + sizes[:-1], jnp.int32), n_active)
    branches = [skip] + [functools.partial(gathered, n) for n in sizes[:-1]] + [full]
    # the caches stay out of the switch: XLA would copy them through its branches
    x_BTD, new_kv = nn.switch(index, branches, self, x_BTD, sel_BT, gate_BT, kv, views,
                              variables=nn.DenyList("cache"))
    for u, blk in enumerate(blocks(self)):
      if u in new_kv:  # each row's new K/V into its compact cache: the masked path's write
        blk(x_BTD, positions_BT, tokens_BT, None, r, sel_BT, write_kv=new_kv[u])
    return x_BTD

  def _core_names(self) -> list[str]:
    return [f"shared_{u}" for u in range(self.cfg.recursion.num_core)]

  def _loop(self, core, loops: int, x_BTD: Array, positions_BT: Array, tokens_BT: Array,
            segment_ids_BT: Array | None = None):
    rc = self.cfg.recursion
    b, t, d = x_BTD.shape
    f32 = jnp.float32
    p = self._routers(d)
    rows = jnp.arange(b)[:, None]
    topk_mode = not self.decode and (not self.deterministic or rc.eval_routing == "topk")
    losses: dict[str, Array] = {}
    stats: dict[str, Array] = {}
    bce_terms, causal_terms = [], []

    depth_BT = gate_tok_BT = None
    if rc.router == "token":
      logits_BTR = x_BTD.astype(f32) @ p["w"]
      probs_BTR = jax.nn.softmax(logits_BTR, axis=-1)
      sel_logits = logits_BTR + jax.lax.stop_gradient(p["bias"]) if "bias" in p else logits_BTR
      choice_BT = jnp.argmax(sel_logits, axis=-1)
      depth_BT = choice_BT + 1
      gate_tok_BT = jnp.take_along_axis(probs_BTR, choice_BT[..., None], -1)[..., 0]
      onehot = jax.nn.one_hot(choice_BT, rc.num_loops, dtype=f32)
      load_R = onehot.mean(axis=(0, 1))
      stats["depth_load"] = load_R
      if rc.balance == "loss" and rc.balance_coef > 0:
        losses["balance"] = rc.balance_coef * rc.num_loops * jnp.sum(
            load_R * probs_BTR.mean(axis=(0, 1)))
      if rc.z_loss_coef > 0:
        losses["z_loss"] = rc.z_loss_coef * jnp.mean(
            jax.nn.logsumexp(logits_BTR, axis=-1) ** 2)
      if "bias" in p:
        stats["bias"] = p["bias"]

    active_BT = jnp.ones((b, t), bool)
    steps_BT = jnp.zeros((b, t), jnp.int32)
    shared: dict[int, tuple] = {}
    active_frac, cut_frac = [], []
    for r in range(loops):
      cap = rc.capacities[r]
      sel_BT, gate_BT, idx_BC, valid_BC = active_BT, None, None, None
      want_BT = None  # tokens the router sends on before the capacity rule
      if rc.router == "expert":
        score_BT = x_BTD.astype(f32) @ p["w"][r] + p["b"][r]
        gate_BT = gate_fn(rc.gate, score_BT, rc.gate_alpha)
        causal_BT = None
        if "cw" in p:
          causal_BT = jax.lax.stop_gradient(x_BTD).astype(f32) @ p["cw"][r] + p["cb"][r]
        if cap < 1.0 and topk_mode:  # training: top-k over the sequence (looks ahead)
          idx_BC = topk_positions(score_BT, active_BT, rc.capacity_tokens(r, t))
          sel_BT = jnp.zeros((b, t), bool).at[rows, idx_BC].set(True) & active_BT
          valid_BC = jnp.take_along_axis(sel_BT, idx_BC, axis=1)
          labels = jax.lax.stop_gradient(sel_BT)
          bce_terms.append(masked_bce(score_BT, labels, active_BT))
          if causal_BT is not None:
            causal_terms.append(masked_bce(causal_BT, labels, active_BT))
        elif cap < 1.0:  # inference: causal per-token decision, then the capacity rule
          decide_BT = causal_BT if causal_BT is not None else score_BT
          want_BT = active_BT & (jax.nn.sigmoid(decide_BT) > rc.threshold)
      elif rc.router == "token":
        gate_BT = gate_tok_BT * rc.gate_alpha if rc.gate != "none" else None
        want_BT = active_BT & (depth_BT > r)
        sel_BT = want_BT
      if want_BT is not None and cap < 1.0:
        sel_BT = self._causal_capacity(want_BT, r)
      cut_frac.append(jnp.mean((want_BT & ~sel_BT).astype(f32)) if want_BT is not None
                      else jnp.zeros((), f32))

      if self.decode and rc.router != "none" and rc.kv_cache_fractions:
        sel_BT = self._fit_cache(sel_BT, r)
        idx_BC = valid_BC = None
      gather = rc.router != "none" and cap < 1.0 and rc.dispatch == "gather"
      if gather and self.decode and t == 1 and not (rc.kv_sharing and r == 0):
        x_BTD = self._decode_rows(r, x_BTD, positions_BT, tokens_BT, sel_BT, gate_BT, shared)
      elif gather and not (self.decode and t == 1):
        # gather the kept tokens, run them, scatter their (gated) updates back
        if idx_BC is None:
          idx_BC, valid_BC = first_positions(sel_BT, min(t, self._capacity_limit(r, t)))
        take = lambda a: jnp.take_along_axis(a, idx_BC, axis=1)
        xg_BCD = jnp.take_along_axis(x_BTD, idx_BC[..., None], axis=1)
        h = self._run_core(core, r, xg_BCD, take(positions_BT), take(tokens_BT), valid_BC,
                           shared)
        delta = h - xg_BCD
        if gate_BT is not None:
          delta = delta * take(gate_BT)[..., None].astype(delta.dtype)
        delta = jnp.where(valid_BC[..., None], delta, 0)
        x_BTD = x_BTD.at[rows, idx_BC].add(delta.astype(x_BTD.dtype))
      else:
        mask_BT = sel_BT if rc.router != "none" else None
        h = self._run_core(core, r, x_BTD, positions_BT, tokens_BT, mask_BT, shared,
                           segment_ids_BT=segment_ids_BT)
        if rc.router == "none":
          x_BTD = h
        else:
          x_BTD = gated_update(x_BTD, h, gate_BT, sel_BT)
      active_BT = sel_BT
      steps_BT = steps_BT + sel_BT.astype(jnp.int32)
      active_frac.append(jnp.mean(sel_BT.astype(f32)))

    if bce_terms and rc.aux == "bce" and rc.aux_coef > 0:
      losses["router_bce"] = rc.aux_coef * sum(bce_terms) / len(bce_terms)
    if causal_terms and rc.aux_coef > 0:
      losses["causal_router_bce"] = rc.aux_coef * sum(causal_terms) / len(causal_terms)
    stats["depth_hist"] = jax.nn.one_hot(steps_BT, rc.num_loops + 1, dtype=f32).mean((0, 1))
    stats["active_fraction"] = jnp.stack(
        active_frac + [jnp.zeros((), f32)] * (rc.num_loops - loops))
    stats["mean_depth"] = jnp.mean(steps_BT.astype(f32))
    stats["capacity_cut"] = jnp.stack(cut_frac + [jnp.zeros((), f32)] * (rc.num_loops - loops))
    if self.is_mutable_collection("mor_losses"):
      for name, v in losses.items():
        self.sow("mor_losses", name, v, init_fn=lambda: jnp.zeros((), f32),
                 reduce_fn=lambda a, b: b)
    if self.is_mutable_collection("mor_stats"):
      for name, v in stats.items():
        self.sow("mor_stats", name, v, init_fn=lambda v=v: jnp.zeros_like(v),
                 reduce_fn=lambda a, b: b)
    return x_BTD
