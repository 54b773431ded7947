"""Recursive transformer, middle-cycle sharing: unique first and last layers around 2
shared layers looped twice (F A B A B L): 4 unique layers, 6 effective. Large: 1+11x2+1.

Args: "" / "tiny" (the quickstart budget), "runlocal" (seconds), "large" (pod scale).
    python -m moejax.train --config configs/recursion/middle_cycle.py --workdir runs/middle_cycle
"""

from moejax.config import base_config
from moejax.presets import apply_recursion, apply_size


def get_config(arg: str = ""):
  config = base_config()
  size = apply_size(config, arg)
  apply_recursion(config, "middle_cycle", size)
  config.name = f"middle_cycle_{size}"
  return config
