"""Capacity factor vs dropped tokens and loss (Switch Transformer, section 2.2).

GShard top-2 at the quickstart budget (configs/moe/gshard_top2.py, tiny: 8 experts of
width 192, 600 steps x 16 x 128 tokens) with capacity-limited dispatch at capacity factors
0.5 / 1.0 / 1.25 / 2.0 (training and evaluation alike), against dropless dispatch.
    python experiments/capacity_factor/run.py
"""

import os

from moejax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FACTORS = (0.5, 1.0, 1.25, 2.0)


def get_config(arg: str = ""):
  c = load_config(os.path.join(ROOT, "configs/moe/gshard_top2.py") + (f":{arg}" if arg else ""))
  c.name = "capacity_factor"
  return c


def get_sweep(arg: str = ""):
  del arg
  pts = [{"name": "dropless", "model.moe.backend": "dropless"}]
  for cf in FACTORS:
    # capacity dispatch is not causal (a token's drop depends on later tokens): the
    # explicit opt-in that validation requires; the measured losses carry that leak
    pts.append({"name": f"cf{cf}", "model.moe.backend": "capacity",
                "model.moe.allow_noncausal": True,
                "model.moe.capacity_factor": cf, "model.moe.eval_capacity_factor": cf})
  return pts
