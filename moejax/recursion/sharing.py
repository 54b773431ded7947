"""Layer -> shared-slot maps for L effective layers built from U unique layers.

Strategies (R = num_loops):
  cycle            A B C A B C           the block of U = L/R layers looped R times
  sequence         A A B B C C           each unique layer repeated R times in place
  middle_cycle     F A B A B L           first and last layers unique, the middle cycled
  middle_sequence  F A A B B L           first and last layers unique, the middle sequenced
Unique core layers are named `shared_{u}`; the unique ends `first_layer`, `last_layer`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

STRATEGIES = ("cycle", "sequence", "middle_cycle", "middle_sequence")


@dataclasses.dataclass(frozen=True)
class RecursionConfig:
  """Resolved `config.model.recursion` (see moejax/config.py for each field's meaning)."""
  strategy: str
  num_loops: int
  num_layers: int  # effective depth L
  unshared_norms: bool = False
  lora_rank: int = 0
  lora_alpha: float = 0.0
  router: str = "none"  # none | expert | token
  capacities: tuple[float, ...] = ()
  gate: str = "sigmoid"
  gate_alpha: float = 1.0
  aux: str = "bce"
  aux_coef: float = 0.1
  threshold: float = 0.5
  eval_routing: str = "threshold"
  balance: str = "loss"
  balance_coef: float = 0.01
  bias_update_rate: float = 1e-3
  z_loss_coef: float = 1e-3
  dispatch: str = "gather"
  kv_sharing: bool = False
  eval_loops: int = 0
  kv_cache_fractions: tuple[float, ...] = ()
  allow_noncausal_training: bool = False

  @classmethod
  def from_config(cls, r: Any, num_layers: int) -> "RecursionConfig | None":
    if r.strategy == "none":
      return None
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in dict(r).items() if k in fields}
    kw["capacities"] = tuple(float(c) for c in r.capacities) or (1.0,) * r.num_loops
    kw["kv_cache_fractions"] = tuple(float(c) for c in r.kv_cache_fractions)
    return cls(num_layers=num_layers, **kw)

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise ValueError(f"model.recursion.strategy = {self.strategy!r}; allowed: {STRATEGIES}")
    if not self.capacities:
      object.__setattr__(self, "capacities", (1.0,) * self.num_loops)

  @property
  def middle(self) -> bool:
    return self.strategy.startswith("middle")

  @property
  def num_core(self) -> int:
    """Unique layers in the looped block."""
    return (self.num_layers - 2 * self.middle) // self.num_loops

  @property
  def num_unique(self) -> int:
    return self.num_core + 2 * self.middle

  @property
  def lora_scale(self) -> float:
    return (self.lora_alpha or self.lora_rank) / max(self.lora_rank, 1)

  def loops_at(self, deterministic: bool) -> int:
    return self.eval_loops if deterministic and self.eval_loops else self.num_loops

  def capacity_tokens(self, step: int, length: int) -> int:
    return max(1, math.ceil(self.capacities[step] * length))

  def schedule(self, loops: int | None = None) -> list[tuple[str, int]]:
    """(unique layer name, loop index) for each effective layer, in depth order."""
    loops = self.num_loops if loops is None else loops
    core = [f"shared_{u}" for u in range(self.num_core)]
    if self.strategy in ("cycle", "middle_cycle"):
      body = [(name, r) for r in range(loops) for name in core]
    else:
      body = [(name, r) for name in core for r in range(loops)]
    if self.middle:
      return [("first_layer", 0)] + body + [("last_layer", 0)]
    return body

  def tied_layers(self) -> dict[str, list[int]]:
    """unique layer name -> the effective layer indices that share it."""
    out: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(self.schedule()):
      out.setdefault(name, []).append(i)
    return out
