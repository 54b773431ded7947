"""Metrics sinks: JSONL (always), TensorBoard event files (tensorboardX), console."""

from __future__ import annotations

import json
import math
import os
from typing import Any


def _clean(v: Any) -> Any:
  if isinstance(v, (list, tuple)):
    return [_clean(x) for x in v]
  try:
    v = float(v)
  except (TypeError, ValueError):
    return v
  return v if math.isfinite(v) else str(v)


class MetricsWriter:
  """Appends {"step": s, "split": ..., **scalars} lines to metrics.jsonl in the workdir."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if enabled and tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:  # optional dependency
        self.tb = None

  def truncate_after(self, step: int) -> None:
    """Drop lines logged after `step` (a resumed run re-logs them identically)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(lines)
    os.replace(tmp, self.path)

  def write(self, step: int, split: str, scalars: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "split": split, **{k: _clean(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in row.items():
        if k not in ("step", "split") and isinstance(v, float):
          self.tb.add_scalar(f"{split}/{k}", v, step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.flush()
      self.tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]
