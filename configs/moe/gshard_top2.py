"""GShard top-2: softmax routing, the two chosen gates renormalised to 1.

tiny: 8 experts of width 192, k=2: active FFN width 384 = configs/moe/dense.py.
Args: "" / "tiny", "runlocal", "large" (64 experts of width 4096).
Dispatch: every preset, large included, is dropless (causal). GShard's capacity dispatch
(capacity_factor 1.25; a token's second choice can be evicted by later tokens' first
choices) is NOT causal in a decoder; it is an explicit opt-in:
  --config.model.moe.backend=capacity --config.model.moe.allow_noncausal=True
"""

from moejax.config import base_config
from moejax.presets import apply_size


def get_config(arg: str = ""):
  config = base_config()
  size = apply_size(config, arg)
  config.name = f"gshard_top2_{size}"
  e = config.model.moe
  e.num_experts, e.experts_per_token, e.renormalize = 8, 2, True
  e.expert_d_ff = config.model.d_ff // 2
  e.router, e.load_balance_coef, e.z_loss_coef = "topk", 0.01, 1e-3
  e.backend = "dropless"  # causal at every size; capacity dispatch is an opt-in (docstring)
  if size == "large":
    e.num_experts = 64
  return config
