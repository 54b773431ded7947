"""Mixture-of-Recursions, expert-choice: the cycle model (2 layers x 3 loops) whose
router keeps the top 100% / 67% / 33% of tokens at loops 1 / 2 / 3 (hierarchically).
Only kept tokens are computed in training; the router learns top-k membership with an
auxiliary BCE and decides causally (sigmoid > 0.5) at inference.

Args: "" / "tiny" (the quickstart budget), "runlocal" (seconds), "large" (pod scale).
    python -m moejax.train --config configs/recursion/mor_expert.py --workdir runs/mor_expert
"""

from moejax.config import base_config
from moejax.presets import apply_recursion, apply_size


def get_config(arg: str = ""):
  config = base_config()
  size = apply_size(config, arg)
  apply_recursion(config, "mor_expert", size)
  config.name = f"mor_expert_{size}"
  return config
