"""Relaxed recursive transformer: the cycle model with per-loop LoRA (rank 16 tiny, 64
large) on the shared block's attention and FFN projections. To start from a trained
untied model, see moejax.recursion.relaxed.convert.

Args: "" / "tiny" (the quickstart budget), "runlocal" (seconds), "large" (pod scale).
    python -m moejax.train --config configs/recursion/relaxed.py --workdir runs/relaxed
"""

from moejax.config import base_config
from moejax.presets import apply_recursion, apply_size


def get_config(arg: str = ""):
  config = base_config()
  size = apply_size(config, arg)
  apply_recursion(config, "relaxed", size)
  config.name = f"relaxed_{size}"
  return config
