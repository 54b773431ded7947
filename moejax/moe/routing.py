"""Routers: logits -> a `Routing` of (token, expert, gate) assignments + losses + stats.

Every router returns the same typed result, so every dispatch backend serves every
router. An assignment list has a static length A:
  token choice (top-k, DeepSeek, hash): A = N * k, ordered slot-major (all tokens' first
    choices, then all second choices, ...), which is also the priority order when a
    capacity-limited backend must drop assignments (Switch/GShard convention);
  expert choice: A = B * E * C (each expert takes its top-C tokens of each sequence).

Token masks: every router takes `token_mask_N` (bool, None = every token is real). A
masked-out token (inactive in a Mixture-of-Recursions loop, padding of a gathered buffer)
counts for nothing: its assignments get the sentinel token N and gate 0 (dispatch already
skips rows >= N; `valid_A()`), so it adds no load, takes no expert slot, gets zero output
and is left out of every loss and statistic (means run over the real tokens only). The
same real tokens then route identically however many masked ones surround them.

All router math is float32 whatever the compute dtype. Shapes: B batch, T length,
N = B * T tokens, E experts, K experts per token, A assignments.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


class Routing(flax.struct.PyTreeNode):
  token_A: Array  # int32: row of x_ND each assignment reads and writes; N = masked out
  expert_A: Array  # int32: expert of each assignment
  gate_A: Array  # float32: combine weight
  losses: dict  # unweighted auxiliary losses (scalars)
  stats: dict  # float32 telemetry (router entropy, ...)
  num_experts: int = flax.struct.field(pytree_node=False)
  num_tokens: int = flax.struct.field(pytree_node=False)

  def valid_A(self) -> Array:
    """bool [A]: the assignment belongs to a real token (not masked out)."""
    return self.token_A < self.num_tokens

  def load_E(self) -> Array:
    """Assignments of real tokens per expert (before any capacity drop)."""
    return jnp.zeros((self.num_experts,), jnp.float32).at[self.expert_A].add(
        self.valid_A().astype(jnp.float32))

  def combine_NE(self) -> Array:
    """Dense [N, E] combine weights (the reference view of the routing)."""
    return jnp.zeros((self.num_tokens, self.num_experts), jnp.float32).at[
        self.token_A, self.expert_A].add(self.gate_A, mode="drop")


def _weights(token_mask_N: Array | None) -> Array | None:
  return None if token_mask_N is None else token_mask_N.astype(jnp.float32)


def _mean(v_N: Array, w_N: Array | None) -> Array:
  """Mean over the real tokens (all tokens when w_N is None) along axis 0."""
  if w_N is None:
    return jnp.mean(v_N, axis=0)
  w = w_N.reshape(w_N.shape + (1,) * (v_N.ndim - 1))
  return jnp.sum(v_N * w, axis=0) / jnp.maximum(jnp.sum(w_N), 1.0)


def _mask_assignments(token_A: Array, gate_A: Array, token_mask_N: Array | None,
                      n: int) -> tuple[Array, Array]:
  """Assignments of masked-out tokens -> sentinel token n, gate 0."""
  if token_mask_N is None:
    return token_A, gate_A
  valid_A = token_mask_N[token_A]
  return jnp.where(valid_A, token_A, n).astype(jnp.int32), jnp.where(valid_A, gate_A, 0.0)


def _entropy(probs_NE: Array, w_N: Array | None = None) -> Array:
  return -_mean(jnp.sum(probs_NE * jnp.log(jnp.maximum(probs_NE, 1e-20)), axis=-1), w_N)


def z_loss(logits_NE: Array, w_N: Array | None = None) -> Array:
  """ST-MoE router z-loss: mean_t logsumexp(logits_t)^2 (over real tokens)."""
  return _mean(jnp.square(jax.nn.logsumexp(logits_NE, axis=-1)), w_N)


def switch_load_balance(probs_NE: Array, expert_NK: Array, num_experts: int,
                        w_N: Array | None = None) -> Array:
  """E * sum_i f_i P_i; f_i = fraction of the N*K assignments to expert i, P_i = mean prob
  (both over the real tokens when w_N, float 0/1 per token, is given)."""
  n, k = expert_NK.shape
  ones_NK = jnp.ones((n, k), jnp.float32) if w_N is None else jnp.broadcast_to(w_N[:, None],
                                                                                (n, k))
  count_E = jnp.zeros((num_experts,), jnp.float32).at[expert_NK.reshape(-1)].add(
      ones_NK.reshape(-1))
  f_E = count_E / (n * k if w_N is None else jnp.maximum(jnp.sum(w_N) * k, 1.0))
  return num_experts * jnp.sum(f_E * _mean(probs_NE, w_N))


def _slot_major(expert_NK: Array, gate_NK: Array) -> tuple[Array, Array, Array]:
  n, k = expert_NK.shape
  token_A = jnp.tile(jnp.arange(n, dtype=jnp.int32), k)
  return token_A, expert_NK.T.reshape(-1).astype(jnp.int32), gate_NK.T.reshape(-1)


def topk_softmax(logits_NE: Array, k: int, *, renormalize: bool = True,
                 token_mask_N: Array | None = None) -> Routing:
  """Switch (k=1) / GShard (k=2) routing: softmax probabilities, top-k experts.

  Gates are the chosen probabilities, renormalised to sum to 1 over the k when
  `renormalize` (GShard's second-expert renormalisation); Switch uses k=1 without it.
  """
  logits = logits_NE.astype(jnp.float32)
  n, e = logits.shape
  probs = jax.nn.softmax(logits, axis=-1)
  gate_NK, expert_NK = jax.lax.top_k(probs, k)
  if renormalize:
    gate_NK = gate_NK / jnp.sum(gate_NK, axis=-1, keepdims=True)
  token_A, expert_A, gate_A = _slot_major(expert_NK, gate_NK)
  token_A, gate_A = _mask_assignments(token_A, gate_A, token_mask_N, n)
  w_N = _weights(token_mask_N)
  losses = {"load_balance": switch_load_balance(probs, expert_NK, e, w_N),
            "z_loss": z_loss(logits, w_N)}
  return Routing(token_A, expert_A, gate_A, losses, {"router_entropy": _entropy(probs, w_N)},
                 e, n)


def group_limited_mask(scores_NE: Array, n_groups: int, topk_groups: int) -> Array:
  """True for experts inside the `topk_groups` best of `n_groups` groups per token.

  A group's score is the sum of its two best expert scores (one if a group has one).
  """
  n, e = scores_NE.shape
  if n_groups <= 1 or topk_groups >= n_groups:
    return jnp.ones((n, e), bool)
  per = e // n_groups
  grouped = scores_NE.reshape(n, n_groups, per)
  top = jax.lax.top_k(grouped, min(2, per))[0]
  group_score_NG = jnp.sum(top, axis=-1)
  _, keep_NK = jax.lax.top_k(group_score_NG, topk_groups)
  keep_NG = jnp.zeros((n, n_groups), bool).at[jnp.arange(n)[:, None], keep_NK].set(True)
  return jnp.repeat(keep_NG, per, axis=1)


def deepseek_v3(logits_NE: Array, bias_E: Array, k: int, *, n_groups: int = 1,
                topk_groups: int = 1, route_scale: float = 1.0,
                seq_shape: tuple[int, int] | None = None,
                token_mask_N: Array | None = None) -> Routing:
  """DeepSeek-V3 gate: sigmoid affinities; the bias only picks experts; gates are the
  unbiased affinities of the chosen experts, normalised to 1, times `route_scale`.

  Losses: the sequence-wise balance loss (per sequence: sum_i f_i P_i with
  f_i = E/(K T) * #tokens choosing i, P_i = mean normalised affinity; with a token mask T
  counts a sequence's real tokens and sequences without any are left out of the mean),
  z-loss for logging.
  """
  logits = logits_NE.astype(jnp.float32)
  n, e = logits.shape
  s_NE = jax.nn.sigmoid(logits)
  biased = s_NE + bias_E.astype(jnp.float32)[None, :]
  mask = group_limited_mask(biased, n_groups, topk_groups)
  _, expert_NK = jax.lax.top_k(jnp.where(mask, biased, -jnp.inf), k)
  s_NK = jnp.take_along_axis(s_NE, expert_NK, axis=-1)
  gate_NK = s_NK / jnp.maximum(jnp.sum(s_NK, axis=-1, keepdims=True), 1e-20) * route_scale
  token_A, expert_A, gate_A = _slot_major(expert_NK, gate_NK)
  token_A, gate_A = _mask_assignments(token_A, gate_A, token_mask_N, n)
  w_N = _weights(token_mask_N)

  b, t = seq_shape if seq_shape is not None else (1, n)
  chosen_BTE = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], expert_NK].set(
      1.0).reshape(b, t, e)
  probs = s_NE / jnp.sum(s_NE, axis=-1, keepdims=True)
  p_BTE = probs.reshape(b, t, e)
  if w_N is None:
    f_BE = chosen_BTE.sum(axis=1) * (e / (k * t))
    seq_balance = jnp.mean(jnp.sum(f_BE * p_BTE.mean(axis=1), axis=-1))
  else:
    w_BT1 = w_N.reshape(b, t, 1)
    t_B1 = jnp.maximum(jnp.sum(w_BT1, axis=1), 1.0)
    f_BE = jnp.sum(chosen_BTE * w_BT1, axis=1) * e / (k * t_B1)
    per_B = jnp.sum(f_BE * jnp.sum(p_BTE * w_BT1, axis=1) / t_B1, axis=-1)
    has_B = (jnp.sum(w_BT1, axis=(1, 2)) > 0).astype(jnp.float32)
    seq_balance = jnp.sum(per_B * has_B) / jnp.maximum(jnp.sum(has_B), 1.0)
  losses = {"seq_balance": seq_balance, "z_loss": z_loss(logits, w_N),
            "load_balance": switch_load_balance(probs, expert_NK, e, w_N)}
  return Routing(token_A, expert_A, gate_A, losses, {"router_entropy": _entropy(probs, w_N)},
                 e, n)


def expert_choice(logits_NE: Array, capacity: int, seq_shape: tuple[int, int],
                  token_mask_N: Array | None = None) -> Routing:
  """Each expert takes its top-`capacity` tokens of every sequence by softmax score.

  Perfectly balanced; a token gets 0..E experts. NOT causal: whether token t is chosen
  depends on the scores of later tokens in its sequence. Masked-out tokens are never
  chosen (a sequence with fewer real tokens than `capacity` leaves slots empty), but the
  capacity is set by the caller from the static length, so a masked batch and the same
  real tokens gathered into a shorter one get different capacities.
  """
  logits = logits_NE.astype(jnp.float32)
  n, e = logits.shape
  b, t = seq_shape
  c = min(capacity, t)
  probs = jax.nn.softmax(logits, axis=-1)
  score = probs if token_mask_N is None else jnp.where(token_mask_N[:, None], probs, -1.0)
  score_BET = score.reshape(b, t, e).transpose(0, 2, 1)
  _, pos_BEC = jax.lax.top_k(score_BET, c)
  token_BEC = pos_BEC + (jnp.arange(b) * t)[:, None, None]
  gate_BEC = probs[token_BEC, jnp.arange(e)[None, :, None]]
  expert_BEC = jnp.broadcast_to(jnp.arange(e)[None, :, None], (b, e, c))
  token_A, gate_A = _mask_assignments(token_BEC.reshape(-1).astype(jnp.int32),
                                      gate_BEC.reshape(-1), token_mask_N, n)
  w_N = _weights(token_mask_N)
  losses = {"z_loss": z_loss(logits, w_N)}
  return Routing(token_A, expert_BEC.reshape(-1).astype(jnp.int32), gate_A, losses,
                 {"router_entropy": _entropy(probs, w_N)}, e, n)


def hash_expert(token_ids_N: Array, num_experts: int) -> Array:
  """A fixed pseudo-random expert per token id (Knuth multiplicative hash)."""
  h = (token_ids_N.astype(jnp.uint32) * jnp.uint32(2654435761)) >> jnp.uint32(7)
  return (h % jnp.uint32(num_experts)).astype(jnp.int32)


def hash_routing(token_ids_N: Array, num_experts: int,
                 token_mask_N: Array | None = None) -> Routing:
  """Hash routing (no learning): k=1, gate 1."""
  n = token_ids_N.shape[0]
  expert_A = hash_expert(token_ids_N, num_experts)
  token_A, gate_A = _mask_assignments(jnp.arange(n, dtype=jnp.int32),
                                      jnp.ones((n,), jnp.float32), token_mask_N, n)
  return Routing(token_A, expert_A, gate_A, {}, {}, num_experts, n)


def routing_stats(routing: Routing, dropped_A: Array | None = None) -> dict[str, Any]:
  """Per-layer telemetry: load histogram, max/mean load, coefficient of variation,
  dropped fraction (of the real tokens' assignments), router entropy."""
  load = routing.load_E()
  mean = jnp.mean(load)
  dropped = jnp.zeros((), jnp.float32)
  if dropped_A is not None:
    valid_A = routing.valid_A().astype(jnp.float32)
    dropped = jnp.sum(dropped_A.astype(jnp.float32) * valid_A) / jnp.maximum(jnp.sum(valid_A),
                                                                              1.0)
  out = {
      "load": load,
      "max_over_mean_load": jnp.max(load) / jnp.maximum(mean, 1e-9),
      "load_cv": jnp.std(load) / jnp.maximum(mean, 1e-9),
      "dropped_fraction": dropped,
  }
  out.update(routing.stats)
  return out
