"""Vanilla (untied) baseline of the recursion study: 6 unique layers (tiny), 24 (large).

Args: "" / "tiny" (the quickstart budget), "runlocal" (seconds), "large" (pod scale).
    python -m moejax.train --config configs/recursion/vanilla.py --workdir runs/vanilla
"""

from moejax.config import base_config
from moejax.presets import apply_recursion, apply_size


def get_config(arg: str = ""):
  config = base_config()
  size = apply_size(config, arg)
  apply_recursion(config, "vanilla", size)
  config.name = f"vanilla_{size}"
  return config
