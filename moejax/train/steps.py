"""TrainState and the pure, jitted train / eval steps.

A batch is {"inputs", "targets"} int32 [B, T], plus "positions" and "segment_ids" when
the data packs documents with masking (config.data.document_mask).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from moejax.moe.side_outputs import stack_moe_layers, update_bias


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 scalar: optimizer steps taken (skipped updates included)
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key; per-step keys are fold_in(rng, step)
  model_state: Any  # non-trainable collections, e.g. {"moe_bias": ...}; {} for dense
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, params, tx, rng, model_state=None) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               rng=rng, model_state=model_state or {}, tx=tx)


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sum of token losses (nats) and token count, in float32."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32),
                                                           targets_BT)
  return losses.sum(), jnp.asarray(losses.size, jnp.float32)


def mor_tree(tree: Any) -> dict[str, jax.Array]:
  """{name: value} of the (single) Mixture-of-Recursions node of a mor_* collection."""
  while hasattr(tree, "items") and len(tree) == 1 and hasattr(next(iter(tree.values())), "items"):
    tree = next(iter(tree.values()))
  return dict(tree) if hasattr(tree, "items") else {}


def update_mor_bias(mor_bias: Any, mor_stats: dict, rate: float) -> Any:
  """Loss-free depth balancing: bias_r += rate * sign(mean load - load_r)."""
  load = mor_stats["depth_load"]
  return jax.tree.map(lambda b: b + rate * jnp.sign(jnp.mean(load) - load), mor_bias)


def make_train_step(model, *, bias_update_rate: float = 0.0, debug_nan_step: int = -1,
                    mor_bias_rate: float = 0.0) -> Callable:
  """(state, batch) -> (state, metrics) for `model` = LM(cfg, deterministic=False).

  loss = cross-entropy + the MoE auxiliary losses (already weighted by their coefs).
  After the optimizer step the DeepSeek selection bias moves by
  `bias_update_rate * sign(mean_load - load)` (loads of this global batch).
  A non-finite loss or gradient never updates the state: the update is dropped and
  `metrics["finite"]` is False; the loop then stops or goes on by `train.nan_policy`.
  `debug_nan_step >= 1` poisons the loss of that step to exercise this path in tests.
  """

  def loss_fn(params, model_state, batch, rng):
    variables = {"params": params, **model_state}
    logits, side = model.apply(variables, batch["inputs"], batch.get("positions"),
                               batch.get("segment_ids"), rngs={"jitter": rng},
                               mutable=["moe_losses", "moe_stats", "mor_losses", "mor_stats"])
    total, count = cross_entropy(logits, batch["targets"])
    ce = total / count
    losses = stack_moe_layers(side.get("moe_losses", {}))
    mor_losses = mor_tree(side.get("mor_losses", {}))
    aux = sum((jnp.sum(v) for v in list(losses.values()) + list(mor_losses.values())),
              jnp.zeros((), jnp.float32))
    return ce + aux, (ce, losses, side.get("moe_stats", {}), mor_losses,
                      mor_tree(side.get("mor_stats", {})))

  def train_step(state, batch: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, (ce, losses, stats_tree, mor_losses, mor_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(
        state.params, state.model_state, batch, rng)
    if debug_nan_step >= 1:
      poison = jnp.where(state.step + 1 == debug_nan_step, jnp.nan, 1.0)
      loss, ce, grads = loss * poison, ce * poison, jax.tree.map(lambda g: g * poison, grads)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = state.tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_model_state = dict(state.model_state)
    if bias_update_rate > 0 and "moe_bias" in new_model_state:
      new_model_state["moe_bias"] = update_bias(state.model_state["moe_bias"], stats_tree,
                                                bias_update_rate)
    if mor_bias_rate > 0 and "mor_bias" in new_model_state:
      new_model_state["mor_bias"] = update_mor_bias(state.model_state["mor_bias"], mor_stats,
                                                    mor_bias_rate)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(step=state.step + 1, params=keep(new_params, state.params),
                              opt_state=keep(new_opt, state.opt_state),
                              model_state=keep(new_model_state, state.model_state))
    metrics = {"loss": loss, "ce_loss": ce, "grad_norm": grad_norm, "finite": finite}
    if stats_tree:
      metrics["aux_loss"] = loss - ce
      metrics["moe_losses"] = losses
      metrics["moe_stats"] = stack_moe_layers(stats_tree)
    if mor_stats:
      metrics["aux_loss"] = loss - ce
      metrics["mor_losses"] = mor_losses
      metrics["mor_stats"] = mor_stats
    return new_state, metrics

  return train_step


def make_eval_step(model) -> Callable:
  """(params, model_state, batch) -> summed cross-entropy, for LM(cfg, deterministic=True)."""
  def eval_step(params, model_state, batch: dict) -> dict:
    logits = model.apply({"params": params, **model_state}, batch["inputs"],
                         batch.get("positions"), batch.get("segment_ids"))
    total, count = cross_entropy(logits, batch["targets"])
    return {"loss_sum": total, "count": count}
  return eval_step
