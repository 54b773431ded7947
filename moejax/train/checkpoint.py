"""Atomic, verified checkpoints through orbax.

A checkpoint holds the TrainState (params, optimizer state, step, rng), the data
iterator's state and a small JSON with a checksum of the state. Orbax writes each
step into a temporary folder and renames it when complete, so a crash mid-write leaves
no half checkpoint behind. On restore, the newest step that loads AND matches its
checksum wins; a corrupt or truncated one is skipped with a warning.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("moejax")


@jax.jit
def _checksum_parts(tree) -> jax.Array:
  leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
  s1 = sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in leaves)
  s2 = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)
  return jnp.stack([s1, s2])


def checksum(tree) -> list[float]:
  """Two float32 sums over every leaf; cheap, and sensitive to any changed value."""
  return [float(v) for v in np.asarray(_checksum_parts(tree))]


def _checksum_ok(expected: list[float], got: list[float]) -> bool:
  return all(abs(a - b) <= 1e-5 * max(abs(a), 1.0) for a, b in zip(expected, got))


class Checkpointer:
  """Save / restore (state, data-iterator state, metadata) under `directory`."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: Any, data_state: Any, extra: dict | None = None,
           *, wait: bool = False) -> None:
    meta = dict(extra or {}, step=int(step), checksum=checksum(_payload(state)))
    self.manager.save(int(step), force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_payload(state)),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)))
    if wait:
      self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state: Any) -> tuple[Any, Any, dict] | None:
    """Newest good checkpoint as (state payload, data state, meta), or None.

    `abstract_state` leaves should carry the target sharding (ShapeDtypeStruct with
    .sharding) so a checkpoint written on another mesh restores onto this one.
    Steps that failed are listed in `self.bad_steps`; nothing is moved or deleted here.
    If checkpoints exist but none restores, raise: silently starting over would be worse.
    """
    bad = self.bad_steps = []
    errors = []
    for step in reversed(self.steps()):
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_payload(abstract_state)),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 - any failure means "not a good checkpoint"
        log.warning("checkpoint at step %d could not be restored (%s: %s); trying the previous one",
                    step, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        bad.append(step)
        errors.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
        continue
      meta = dict(out["meta"])
      got = checksum(out["state"])
      if not _checksum_ok(meta.get("checksum", [float("nan")] * 2), got):
        log.warning("checkpoint at step %d fails its checksum (%s != %s); trying the previous one",
                    step, got, meta.get("checksum"))
        bad.append(step)
        errors.append(f"step {step}: checksum mismatch")
        continue
      return out["state"], out["data"], meta
    if bad:
      raise RuntimeError(
          f"checkpoints exist in {self.directory} but none could be restored:\n  "
          + "\n  ".join(errors) + "\nIf the config changed, use a new --workdir; if they are "
          "corrupt, move them away to start over.")
    return None

  def quarantine(self, steps: list[int]) -> None:
    """Move unusable checkpoints (never delete) to `<directory>.corrupt/` so that a run
    resumed from an older step can write those steps again."""
    if not steps:
      return
    dest_root = self.directory + ".corrupt"
    os.makedirs(dest_root, exist_ok=True)
    for step in steps:
      src = os.path.join(self.directory, str(step))
      dest = os.path.join(dest_root, f"{step}-{int(time.time())}")
      if os.path.isdir(src):
        os.replace(src, dest)
        log.warning("moved unusable checkpoint %s to %s", src, dest)
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _payload(state: Any) -> dict:
  """The array part of a TrainState (the optimizer transform itself is code, not data)."""
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
          "rng": state.rng, "model_state": state.model_state} if not isinstance(state, dict) \
      else state
