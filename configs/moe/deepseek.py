"""DeepSeek-style MoE: fine-grained experts (m=4), 1 shared expert, sigmoid gate with a
selection-only bias balanced without an auxiliary loss, group-limited routing.

tiny: 8 experts of width 192 split m=4 ways -> 32 experts of width 48; k = 2*4 = 8
segments, minus the 1 shared expert (DeepSeekMoE keeps compute constant this way), so
7 routed + 1 shared = active FFN width 384 = configs/moe/dense.py. 4 groups, keep 2.
route_scale = 7 (= routed k): the gates are normalised to sum to 1, so without a scale the
routed output is an average of 7 narrow experts, ~7x weaker than the dense FFN they
segment; at the quickstart budget route_scale 1 / 2.5 / 7 reach 2.315 / 2.087 / 2.067
val bits/byte (experiments/moe_vs_dense). DeepSeek-V3 uses 2.5 with k = 8 of 256.
Balancing as in DeepSeek-V3 (auxiliary-loss-free): the selection bias (gamma 1e-3) does
it, no expert-level balance loss (load_balance_coef 0), only a tiny sequence-wise balance
loss (seq_balance_coef 1e-4, the paper's alpha), no z-loss.
Args: "" / "tiny", "runlocal", "large" (DeepSeek-V3-like routing: 256 routed experts of
width 2048, 8 routed + 1 shared active per token -- experts_per_token 9 of which one is
the shared expert, as with the tiny preset's segments --, 8 groups keep 4, route scale 2.5,
first 3 layers dense; the dense sizes are the shared "large" preset's, not V3's).
"""

from moejax.config import base_config
from moejax.presets import apply_size


def get_config(arg: str = ""):
  config = base_config()
  size = apply_size(config, arg)
  config.name = f"deepseek_{size}"
  e = config.model.moe
  e.num_experts, e.experts_per_token, e.granularity = 8, 2, 4
  e.expert_d_ff = config.model.d_ff // 2
  e.num_shared_experts = 1
  e.router, e.route_scale = "deepseek", 7.0
  e.n_groups, e.topk_groups = 4, 2
  e.bias_update_rate = 1e-3
  e.load_balance_coef, e.z_loss_coef, e.seq_balance_coef = 0.0, 0.0, 1e-4
  e.backend = "dropless"
  if size == "large":
    # 9 per token of which 1 is the shared expert: 8 routed of 256 + 1 shared (V3)
    e.num_experts, e.experts_per_token, e.granularity = 256, 9, 1
    e.expert_d_ff, e.num_shared_experts = 2048, 1
    e.n_groups, e.topk_groups, e.route_scale, e.first_dense = 8, 4, 2.5, 3
    config.model.num_layers = 27
  return config
