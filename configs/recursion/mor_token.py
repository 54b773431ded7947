"""Mixture-of-Recursions, token-choice: one router assigns each token a depth of 1-3
loops up front (balancing loss + z-loss); capacities (1, 0.67, 0.33) cap each loop in
training (a balanced router fills them exactly).

Args: "" / "tiny" (the quickstart budget), "runlocal" (seconds), "large" (pod scale).
    python -m moejax.train --config configs/recursion/mor_token.py --workdir runs/mor_token
"""

from moejax.config import base_config
from moejax.presets import apply_recursion, apply_size


def get_config(arg: str = ""):
  config = base_config()
  size = apply_size(config, arg)
  apply_recursion(config, "mor_token", size)
  config.name = f"mor_token_{size}"
  return config
