"""The `model.moe` config section: defaults and validation (beside MoEConfig's users).

`defaults()` is the section `moejax.config.base_config()` mounts at `config.model.moe`;
`validate(config)` checks it before anything is built. MoEConfig (moejax/moe/layer.py)
is the resolved, plain-field form the layers take.
"""

from __future__ import annotations

import ml_collections

from moejax.configlib import choice, fail, float_range, nonneg_int, pos_int

# The dispatch backends (moejax/moe/dispatch.py implements them; listed here so that
# validating a config imports nothing heavy).
BACKENDS = ("reference", "capacity", "capacity_einsum", "capacity_tiled", "dropless",
            "dropless_ragged", "dropless_tiled", "pallas")
CAPACITY_BACKENDS = ("capacity", "capacity_einsum", "capacity_tiled")


def defaults() -> ml_collections.ConfigDict:
  e = ml_collections.ConfigDict()
  e.num_experts = 0  # routed experts before fine-grained segmentation; 0 = dense model
  e.experts_per_token = 2  # k before segmentation
  e.granularity = 1  # m: m*N experts of width expert_d_ff/m, m*k active (DeepSeekMoE)
  e.expert_d_ff = 0  # width of one unsegmented expert; 0 -> model.d_ff
  e.num_shared_experts = 0  # K_s shared experts (segmented width), see every token
  e.shared_expert_d_ff = 0  # total width of the shared experts; 0 = K_s * segment width
  e.shared_expert_gate = False  # sigmoid(x w) gate on the shared experts' output (Qwen2-MoE)
  e.router = "topk"  # topk | deepseek | expert_choice | hash
  e.renormalize = True  # topk: renormalise the k chosen probabilities
  e.jitter = 0.0  # topk: multiplicative input noise in training (Switch)
  e.route_scale = 1.0  # deepseek
  e.init_scale = 1.0  # multiplier on the router and expert weights' init std (Switch 2.3)
  e.n_groups = 1  # deepseek group-limited routing
  e.topk_groups = 1
  e.bias_update_rate = 0.0  # deepseek aux-loss-free balancing (gamma); 0 = off
  e.load_balance_coef = 0.01  # Switch loss alpha
  e.z_loss_coef = 1e-3  # ST-MoE router z-loss beta
  e.seq_balance_coef = 0.0  # DeepSeek sequence-wise balance loss
  e.backend = "dropless"  # reference | capacity | dropless | dropless_* variants
  e.capacity_factor = 1.25  # capacity backend (training) / expert choice
  e.eval_capacity_factor = 2.0  # capacity backend at evaluation
  e.min_capacity = 4
  e.moe_every = 1  # MoE FFN every n-th layer (after the first dense ones)
  e.first_dense = 0  # the first k layers keep a dense FFN
  # must be True for a non-causal MoE in a causal LM: the expert_choice router, or a
  # capacity backend (a token's drop depends on the later tokens of the batch)
  e.allow_noncausal = False
  return e


ROUTERS = ("topk", "deepseek", "expert_choice", "hash")


def validate(config) -> None:
  """The `model.moe` section (and how it meets the rest of `model`)."""
  m, e = config.model, config.model.moe
  nonneg_int(config, "model.moe.num_experts")
  if not e.num_experts:
    return
  for f in ("experts_per_token", "granularity", "moe_every", "min_capacity"):
    pos_int(config, f"model.moe.{f}")
  for f in ("expert_d_ff", "num_shared_experts", "first_dense", "n_groups", "topk_groups",
            "shared_expert_d_ff"):
    nonneg_int(config, f"model.moe.{f}")
  choice(config, "model.moe.router", ROUTERS)
  choice(config, "model.moe.backend", BACKENDS)
  if e.experts_per_token > e.num_experts:
    fail("model.moe.experts_per_token", e.experts_per_token,
          f"must be <= model.moe.num_experts={e.num_experts}")
  if e.experts_per_token * e.granularity - e.num_shared_experts < 1:
    fail("model.moe.num_shared_experts", e.num_shared_experts,
          "must be < experts_per_token * granularity (each shared expert replaces one "
          "routed segment, DeepSeekMoE-style)")
  width = e.expert_d_ff or m.d_ff
  if width % e.granularity:
    fail("model.moe.granularity", e.granularity,
          f"must divide the expert width {width} (model.moe.expert_d_ff or model.d_ff)")
  if e.first_dense >= m.num_layers:
    fail("model.moe.first_dense", e.first_dense, f"must be < model.num_layers={m.num_layers}")
  if (m.num_layers - e.first_dense) % e.moe_every:
    fail("model.moe.moe_every", e.moe_every,
          f"must divide model.num_layers - model.moe.first_dense = "
          f"{m.num_layers - e.first_dense}")
  n_exp = e.num_experts * e.granularity
  if e.router == "deepseek" and e.n_groups > 1:
    if n_exp % e.n_groups:
      fail("model.moe.n_groups", e.n_groups,
            f"must divide the number of (segmented) experts {n_exp}")
    if not 1 <= e.topk_groups <= e.n_groups:
      fail("model.moe.topk_groups", e.topk_groups, f"must lie in [1, n_groups={e.n_groups}]")
    if e.topk_groups * (n_exp // e.n_groups) < e.experts_per_token * e.granularity - e.num_shared_experts:
      fail("model.moe.topk_groups", e.topk_groups,
            "the kept groups must hold at least k (segmented) experts")
  if (e.shared_expert_d_ff or e.shared_expert_gate) and not e.num_shared_experts:
    fail("model.moe.num_shared_experts", e.num_shared_experts,
         "must be >= 1 when shared_expert_d_ff or shared_expert_gate is set")
  for f in ("renormalize", "allow_noncausal", "shared_expert_gate"):
    if not isinstance(e[f], bool):
      fail(f"model.moe.{f}", e[f], "must be True or False")
  if e.router == "expert_choice" and not e.allow_noncausal:
    fail("model.moe.router", e.router,
          "expert choice looks at every token of a sequence, so it leaks the future in a "
          "causal LM; set model.moe.allow_noncausal=True to use it for encoder-style analysis")
  if e.router == "hash" and e.experts_per_token != 1:
    fail("model.moe.experts_per_token", e.experts_per_token, "hash routing uses exactly 1")
  if e.router == "hash" and e.granularity != 1:
    # the hash picks one expert per token; segmenting would count m active segments
    # (moejax.flops, MoEConfig.k) while only one runs
    fail("model.moe.granularity", e.granularity,
          "hash routing sends each token to exactly 1 expert; use granularity=1 (for "
          "fine-grained experts use router='topk' or 'deepseek')")
  k_routed = e.experts_per_token * e.granularity - e.num_shared_experts
  if e.router == "topk" and k_routed == 1 and e.renormalize:
    fail("model.moe.renormalize", e.renormalize,
          "with one routed expert per token (experts_per_token * granularity - "
          "num_shared_experts = 1) the renormalised gate is 1 for every token, so the LM "
          "loss never trains the router; set renormalize=False (Switch: the gate is the "
          "router probability) or experts_per_token >= 2")
  if e.backend in CAPACITY_BACKENDS and not e.allow_noncausal:
    fail("model.moe.backend", e.backend,
          "capacity dispatch drops assignments by priority over the whole batch, so a "
          "token's output depends on later tokens: not causal in a causal LM. Use a "
          f"dropless backend {[b for b in BACKENDS if b not in CAPACITY_BACKENDS]} or set "
          "model.moe.allow_noncausal=True to accept the leak (Switch/GShard-style "
          "training; its losses are then not causal-LM numbers)")
  if e.bias_update_rate and e.router != "deepseek":
    fail("model.moe.bias_update_rate", e.bias_update_rate,
          "aux-loss-free bias balancing needs model.moe.router='deepseek'")
  for f in ("jitter",):
    float_range(config, f"model.moe.{f}", 0, 1, hi_open=True)
  for f in ("route_scale", "init_scale", "capacity_factor", "eval_capacity_factor"):
    float_range(config, f"model.moe.{f}", 0, 1e6, lo_open=True)
  for f in ("bias_update_rate", "load_balance_coef", "z_loss_coef", "seq_balance_coef"):
    float_range(config, f"model.moe.{f}", 0, 1e3)
