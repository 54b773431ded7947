"""Expert choice (each expert takes its top-C tokens of every sequence): perfectly balanced.

NOT causal: an expert's choice of token t depends on later tokens, so the LM loss here is
not a valid causal-LM number. Use it for encoder-style analysis of routing; the config
opts in explicitly with model.moe.allow_noncausal=True (it is rejected otherwise).
tiny: 8 experts of width 192, capacity factor 1 with k=2 -> C = T*2/8 tokens per expert
per sequence: active FFN width 384 on average.
Args: "" / "tiny", "runlocal", "large".
"""

from moejax.config import base_config
from moejax.presets import apply_size


def get_config(arg: str = ""):
  config = base_config()
  size = apply_size(config, arg)
  config.name = f"expert_choice_{size}"
  e = config.model.moe
  e.num_experts, e.experts_per_token = 8, 2
  e.expert_d_ff = config.model.d_ff // 2
  e.router, e.capacity_factor, e.eval_capacity_factor = "expert_choice", 1.0, 1.0
  e.allow_noncausal = True
  e.z_loss_coef, e.load_balance_coef = 1e-3, 0.0
  e.backend = "dropless"
  if size == "large":
    e.num_experts = 64
  return config
