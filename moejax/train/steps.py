"""TrainState and the pure, jitted train / eval steps."""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 scalar: optimizer steps taken (skipped updates included)
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key; per-step keys are fold_in(rng, step)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, params, tx, rng) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               rng=rng, tx=tx)


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sum of token losses (nats) and token count, in float32."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32),
                                                           targets_BT)
  return losses.sum(), jnp.asarray(losses.size, jnp.float32)


def make_train_step(apply_fn: Callable, debug_nan_step: int = -1) -> Callable:
  """(state, batch) -> (state, metrics). A non-finite loss or gradient never updates
  the state: the update is dropped and `metrics["finite"]` is False; the loop then
  stops or goes on by `train.nan_policy`. `debug_nan_step >= 0` poisons the loss of
  that step (counted from 1) to exercise this path in tests."""

  def loss_fn(params, batch):
    logits = apply_fn({"params": params}, batch["inputs"])
    total, count = cross_entropy(logits, batch["targets"])
    loss = total / count
    return loss, {"loss": loss}

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    if debug_nan_step >= 0:
      poison = jnp.where(state.step + 1 == debug_nan_step, jnp.nan, 1.0)
      loss, grads = loss * poison, jax.tree.map(lambda g: g * poison, grads)
      aux = dict(aux, loss=loss)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = state.tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(step=state.step + 1, params=keep(new_params, state.params),
                              opt_state=keep(new_opt, state.opt_state))
    metrics = dict(aux, grad_norm=grad_norm, finite=finite)
    return new_state, metrics

  return train_step


def make_eval_step(apply_fn: Callable) -> Callable:
  def eval_step(params, batch: dict) -> dict:
    logits = apply_fn({"params": params}, batch["inputs"])
    total, count = cross_entropy(logits, batch["targets"])
    return {"loss_sum": total, "count": count}
  return eval_step
