"""Quickstart: a ~0.82M-parameter byte-level decoder LM on the embedded corpus.

Trains on a 2-core laptop-class CPU in about three minutes (600 steps of 16 x 128
tokens, 1.2M tokens) and reaches about 2.1 bits per byte on the held-out split of the
Python standard library sources.

    python -m moejax.train --config configs/quickstart.py --workdir runs/quickstart
    python -m moejax.train --config configs/quickstart.py:runlocal --workdir /tmp/q

`arg` presets (big_vision style): "" (default), "runlocal" (seconds, for smoke tests).
"""

from moejax.config import base_config
from moejax.presets import apply_size


def get_config(arg: str = ""):
  """The "tiny" preset of moejax/presets.py (shared with the MoE comparison configs):
  d_model 128, 4 layers, 4 query / 2 KV heads of 32, SwiGLU 384, tied embeddings;
  16 x 128 tokens per step; AdamW lr 5e-3, 50 warmup steps, cosine to 5%; 600 steps."""
  if arg not in ("", "runlocal"):
    raise ValueError(f"configs/quickstart.py: unknown arg {arg!r}; allowed: '', 'runlocal'")
  config = base_config()
  apply_size(config, arg)
  config.name = "quickstart"
  return config
