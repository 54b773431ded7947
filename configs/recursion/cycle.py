"""Recursive transformer, cycle sharing: 2 unique layers looped 3 times (A B A B A B),
6 effective layers with a third of vanilla's layer parameters. Large: 8 unique x 3.

Args: "" / "tiny" (the quickstart budget), "runlocal" (seconds), "large" (pod scale).
    python -m moejax.train --config configs/recursion/cycle.py --workdir runs/cycle
"""

from moejax.config import base_config
from moejax.presets import apply_recursion, apply_size


def get_config(arg: str = ""):
  config = base_config()
  size = apply_size(config, arg)
  apply_recursion(config, "cycle", size)
  config.name = f"cycle_{size}"
  return config
