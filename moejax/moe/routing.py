"""Routers: logits -> a `Routing` of (token, expert, gate) assignments + losses + stats.

Every router returns the same typed result, so every dispatch backend serves every
router. An assignment list has a static length A:
  token choice (top-k, DeepSeek, hash): A = N * k, ordered slot-major (all tokens' first
    choices, then all second choices, ...), which is also the priority order when a
    capacity-limited backend must drop assignments (Switch/GShard convention);
  expert choice: A = B * E * C (each expert takes its top-C tokens of each sequence).

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
  token_A: Array  # int32: row of x_ND each assignment reads and writes
  expert_A: Array  # int32: expert of each assignment
  gate_A: Array  # float32: combine weight
  losses: dict  # unweighted auxiliary losses (scalars)
  stats: dict  # float32 telemetry (router entropy, ...)
  num_experts: int = flax.struct.field(pytree_node=False)
  num_tokens: int = flax.struct.field(pytree_node=False)

  def load_E(self) -> Array:
    """Assignments per expert (before any capacity drop)."""
    return jnp.zeros((self.num_experts,), jnp.float32).at[self.expert_A].add(1.0)

  def combine_NE(self) -> Array:
    """Dense [N, E] combine weights (the reference view of the routing)."""
    return jnp.zeros((self.num_tokens, self.num_experts), jnp.float32).at[
        self.token_A, self.expert_A].add(self.gate_A)


def _entropy(probs_NE: Array) -> Array:
  return -jnp.mean(jnp.sum(probs_NE * jnp.log(jnp.maximum(probs_NE, 1e-20)), axis=-1))


def z_loss(logits_NE: Array) -> Array:
  """ST-MoE router z-loss: mean_t logsumexp(logits_t)^2."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_NE, axis=-1)))


def switch_load_balance(probs_NE: Array, expert_NK: Array, num_experts: int) -> Array:
  """E * sum_i f_i P_i; f_i = fraction of the N*K assignments to expert i, P_i = mean prob."""
  n, k = expert_NK.shape
  f_E = jnp.zeros((num_experts,), jnp.float32).at[expert_NK.reshape(-1)].add(1.0) / (n * k)
  p_E = jnp.mean(probs_NE, axis=0)
  return num_experts * jnp.sum(f_E * p_E)


def _slot_major(expert_NK: Array, gate_NK: Array) -> tuple[Array, Array, Array]:
  n, k = expert_NK.shape
  token_A = jnp.tile(jnp.arange(n, dtype=jnp.int32), k)
  return token_A, expert_NK.T.reshape(-1).astype(jnp.int32), gate_NK.T.reshape(-1)


def topk_softmax(logits_NE: Array, k: int, *, renormalize: bool = True) -> Routing:
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
  losses = {"load_balance": switch_load_balance(probs, expert_NK, e), "z_loss": z_loss(logits)}
  return Routing(token_A, expert_A, gate_A, losses, {"router_entropy": _entropy(probs)}, e, n)


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
                seq_shape: tuple[int, int] | None = None) -> Routing:
  """DeepSeek-V3 gate: sigmoid affinities; the bias only picks experts; gates are the
  unbiased affinities of the chosen experts, normalised to 1, times `route_scale`.

  Losses: the sequence-wise balance loss (per sequence: sum_i f_i P_i with
  f_i = E/(K T) * #tokens choosing i, P_i = mean normalised affinity), z-loss for logging.
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

  b, t = seq_shape if seq_shape is not None else (1, n)
  chosen_BTE = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], expert_NK].set(
      1.0).reshape(b, t, e)
  f_BE = chosen_BTE.sum(axis=1) * (e / (k * t))
  p_norm = (s_NE / jnp.sum(s_NE, axis=-1, keepdims=True)).reshape(b, t, e)
  seq_balance = jnp.mean(jnp.sum(f_BE * p_norm.mean(axis=1), axis=-1))
  probs = s_NE / jnp.sum(s_NE, axis=-1, keepdims=True)
  losses = {"seq_balance": seq_balance, "z_loss": z_loss(logits),
            "load_balance": switch_load_balance(probs, expert_NK, e)}
  return Routing(token_A, expert_A, gate_A, losses, {"router_entropy": _entropy(probs)}, e, n)


def expert_choice(logits_NE: Array, capacity: int, seq_shape: tuple[int, int]) -> Routing:
  """Each expert takes its top-`capacity` tokens of every sequence by softmax score.

  Perfectly balanced; a token gets 0..E experts. NOT causal: whether token t is chosen
  depends on the scores of later tokens in its sequence.
  """
  logits = logits_NE.astype(jnp.float32)
  n, e = logits.shape
  b, t = seq_shape
  c = min(capacity, t)
  probs = jax.nn.softmax(logits, axis=-1)
  probs_BET = probs.reshape(b, t, e).transpose(0, 2, 1)
  gate_BEC, pos_BEC = jax.lax.top_k(probs_BET, c)
  token_BEC = pos_BEC + (jnp.arange(b) * t)[:, None, None]
  expert_BEC = jnp.broadcast_to(jnp.arange(e)[None, :, None], (b, e, c))
  losses = {"z_loss": z_loss(logits)}
  return Routing(token_BEC.reshape(-1).astype(jnp.int32), expert_BEC.reshape(-1).astype(jnp.int32),
                 gate_BEC.reshape(-1), losses, {"router_entropy": _entropy(probs)}, e, n)


def hash_expert(token_ids_N: Array, num_experts: int) -> Array:
  """A fixed pseudo-random expert per token id (Knuth multiplicative hash)."""
  h = (token_ids_N.astype(jnp.uint32) * jnp.uint32(2654435761)) >> jnp.uint32(7)
  return (h % jnp.uint32(num_experts)).astype(jnp.int32)


def hash_routing(token_ids_N: Array, num_experts: int) -> Routing:
  """Hash routing (no learning): k=1, gate 1."""
  n = token_ids_N.shape[0]
  expert_A = hash_expert(token_ids_N, num_experts)
  return Routing(jnp.arange(n, dtype=jnp.int32), expert_A, jnp.ones((n,), jnp.float32), {},
                 {}, num_experts, n)


def routing_stats(routing: Routing, dropped_A: Array | None = None) -> dict[str, Any]:
  """Per-layer telemetry: load histogram, max/mean load, coefficient of variation,
  dropped fraction, router entropy."""
  load = routing.load_E()
  mean = jnp.mean(load)
  out = {
      "load": load,
      "max_over_mean_load": jnp.max(load) / jnp.maximum(mean, 1e-9),
      "load_cv": jnp.std(load) / jnp.maximum(mean, 1e-9),
      "dropped_fraction": (jnp.mean(dropped_A.astype(jnp.float32)) if dropped_A is not None
                           else jnp.zeros((), jnp.float32)),
  }
  out.update(routing.stats)
  return out
