"""Multi-host start-up through JAX's own multi-controller runtime.

Every process runs the same command; `initialize(config.dist)` calls
`jax.distributed.initialize` before any device is touched:
  - explicit: config.dist.coordinator ("host:port"), num_processes, process_id (or the
    environment variables MOEJAX_COORDINATOR, MOEJAX_NUM_PROCESSES, MOEJAX_PROCESS_ID);
  - automatic: on Cloud TPU pods and under SLURM (srun with several tasks) JAX finds the
    coordinator, process count and id itself (config.dist.auto = True, the default).
With one process and nothing configured it does nothing. After it, `jax.devices()` are
the global devices; each process feeds its slice of every batch (moejax.data), logs and
writes metrics from process 0, and checkpoints are written collectively by orbax.
`heartbeat_timeout_s` bounds how long the others wait for a dead process.
"""

from __future__ import annotations

import os
from typing import Any

import jax

_STARTED = False


def _slurm_multi_task() -> bool:
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ


def _tpu_pod() -> bool:
  return bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))


def settings(dist_cfg: Any = None) -> dict | None:
  """The keyword arguments for jax.distributed.initialize, or None for one process."""
  env = os.environ
  coord = (dist_cfg.coordinator if dist_cfg is not None else "") or env.get("MOEJAX_COORDINATOR", "")
  nproc = (dist_cfg.num_processes if dist_cfg is not None else 0) or int(
      env.get("MOEJAX_NUM_PROCESSES", "0"))
  pid = dist_cfg.process_id if dist_cfg is not None and dist_cfg.process_id >= 0 else int(
      env.get("MOEJAX_PROCESS_ID", "-1"))
  timeouts = {}
  if dist_cfg is not None:
    timeouts = {"initialization_timeout": int(dist_cfg.initialization_timeout_s),
                "heartbeat_timeout_seconds": int(dist_cfg.heartbeat_timeout_s)}
  if coord:
    if nproc < 1 or pid < 0:
      raise ValueError(f"config.dist.coordinator = {coord!r} needs config.dist.num_processes "
                       f"(got {nproc}) and config.dist.process_id (got {pid}), or "
                       "MOEJAX_NUM_PROCESSES / MOEJAX_PROCESS_ID in the environment")
    return {"coordinator_address": coord, "num_processes": nproc, "process_id": pid, **timeouts}
  auto = dist_cfg.auto if dist_cfg is not None else True
  if auto and (_slurm_multi_task() or _tpu_pod()):
    return dict(timeouts)  # JAX's cluster detection fills in the rest
  return None


def initialize(dist_cfg: Any = None) -> bool:
  """Start the multi-process runtime if configured; True if it is running."""
  global _STARTED
  if _STARTED:
    return True
  kw = settings(dist_cfg)
  if kw is None:
    return False
  jax.distributed.initialize(**kw)
  _STARTED = True
  return True
