"""Switch Transformer: top-1 softmax routing, Switch load-balancing loss + z-loss.

tiny: 8 experts of width 384 (= the dense quickstart's d_ff), so the active FFN FLOPs
equal configs/moe/dense.py; 8x the FFN parameters.
  python -m moejax.train --config configs/moe/switch.py --workdir runs/switch
Args: "" / "tiny", "runlocal", "large" (128 experts of width 8192).
renormalize=False: with one expert the renormalised gate would be 1 for every token and
the router would get no gradient from the LM loss (validation rejects it).
Dispatch: every preset, large included, is dropless (causal). The paper's capacity
dispatch (capacity_factor 1.25, overflow skips the layer) is NOT causal in a decoder: a
token's drop depends on later tokens of the batch. It is an explicit opt-in:
  --config.model.moe.backend=capacity --config.model.moe.allow_noncausal=True
"""

from moejax.config import base_config
from moejax.presets import apply_size


def get_config(arg: str = ""):
  config = base_config()
  size = apply_size(config, arg)
  config.name = f"switch_{size}"
  e = config.model.moe
  e.num_experts, e.experts_per_token, e.renormalize = 8, 1, False
  e.router, e.jitter = "topk", 0.0
  e.load_balance_coef, e.z_loss_coef = 0.01, 1e-3
  e.backend = "dropless"  # causal at every size; capacity dispatch is an opt-in (docstring)
  if size == "large":
    e.num_experts = 128
  return config
