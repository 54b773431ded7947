"""AdamW with warmup + cosine / warmup-stable-decay schedules, clipping, decay mask."""

from __future__ import annotations

from typing import Any

import jax
import optax


def make_schedule(o: Any, num_steps: int) -> optax.Schedule:
  """Learning rate per step from `config.optim`."""
  peak, floor, warm = o.lr, o.lr * o.min_lr_ratio, o.warmup_steps
  warmup = optax.linear_schedule(0.0, peak, max(warm, 1))
  rest = max(num_steps - warm, 1)
  if o.schedule == "constant":
    main = optax.constant_schedule(peak)
  elif o.schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, rest, alpha=o.min_lr_ratio)
  elif o.schedule == "wsd":
    decay = max(int(round(rest * o.decay_fraction)), 1)
    main = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)],
        [rest - decay])
  else:
    raise ValueError(f"config.optim.schedule = {o.schedule!r}; allowed: cosine, wsd, constant")
  if warm == 0:
    return main
  return optax.join_schedules([warmup, main], [warm])


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices (ndim >= 2, embeddings included), not on norm scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(o: Any, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = make_schedule(o, num_steps)
  parts = []
  if o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip))
  parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule
