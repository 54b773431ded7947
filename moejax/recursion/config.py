"""The `model.recursion` config section: defaults and validation.

`defaults()` is mounted at `config.model.recursion` by `moejax.config.base_config()`;
`validate(config)` checks it before anything is built. RecursionConfig
(moejax/recursion/sharing.py) is the resolved, plain-field form the layers take.
"""

from __future__ import annotations

import ml_collections

from moejax.configlib import boolean, choice, fail, float_range, floats, nonneg_int, pos_int


def defaults() -> ml_collections.ConfigDict:
  r = ml_collections.ConfigDict()
  # L = model.num_layers effective layers from U unique layers looped R = num_loops times.
  r.strategy = "none"  # none | cycle | sequence | middle_cycle | middle_sequence
  r.num_loops = 1  # R; >= 2 with a strategy
  r.unshared_norms = False  # WideNet: each loop keeps its own RMSNorm scales
  r.lora_rank = 0  # relaxed recursion: per-loop LoRA on attention and dense FFN; 0 = off
  r.lora_alpha = 0.0  # LoRA scale alpha / rank; 0 -> alpha = rank (scale 1)
  r.router = "none"  # Mixture-of-Recursions: none | expert | token
  r.capacities = ()  # per-step kept fraction, e.g. (1.0, 0.67, 0.33); () = all 1.0
  r.gate = "sigmoid"  # sigmoid | tanh | none: the router weight on a step's update
  r.gate_alpha = 1.0
  r.aux = "bce"  # expert: bce (router learns top-k membership) | causal_router
  r.aux_coef = 0.1
  r.threshold = 0.5  # expert, inference: a token goes on while its router prob > threshold
  r.eval_routing = "threshold"  # expert, eval: threshold (causal) | topk (non-causal)
  r.balance = "loss"  # token: loss | bias (loss-free) | none
  r.balance_coef = 0.01
  r.bias_update_rate = 1e-3
  r.z_loss_coef = 1e-3  # token router z-loss
  r.dispatch = "gather"  # gather (kept tokens only: saves compute) | mask (reference)
  r.kv_sharing = False  # every step attends to the first recursion's K/V
  r.eval_loops = 0  # inference depth: run only this many loops (0 = num_loops)
  r.kv_cache_fractions = ()  # decoding: slots per step as a fraction of max_seq_len; () = 1.0
  # Expert-choice MoR with a capacity < 1 trains by picking each step's top-k tokens over
  # the whole sequence, which looks at later tokens (the method's design; inference is
  # causal: threshold routing). Such a config must say so by setting this to True.
  r.allow_noncausal_training = False
  return r


STRATEGIES = ("none", "cycle", "sequence", "middle_cycle", "middle_sequence")




def validate(config) -> None:
  """The `model.recursion` section."""
  m, r = config.model, config.model.recursion
  choice(config, "model.recursion.strategy", STRATEGIES)
  pos_int(config, "model.recursion.num_loops")
  choice(config, "model.recursion.router", ("none", "expert", "token"))
  if r.strategy == "none":
    for f, default in (("num_loops", 1), ("router", "none"), ("lora_rank", 0),
                       ("unshared_norms", False), ("kv_sharing", False)):
      if r[f] != default:
        fail(f"model.recursion.{f}", r[f],
              "needs a sharing strategy: set model.recursion.strategy to one of "
              f"{list(STRATEGIES[1:])}")
    return
  big_r, layers = r.num_loops, m.num_layers
  if big_r < 2:
    fail("model.recursion.num_loops", big_r, "must be >= 2 with a sharing strategy")
  if r.strategy.startswith("middle"):
    if layers < 2 + big_r or (layers - 2) % big_r:
      fail("model.num_layers", layers,
            f"{r.strategy} keeps the first and last layers unique, so model.num_layers - 2 "
            f"must be a positive multiple of model.recursion.num_loops={big_r}")
  elif layers % big_r:
    fail("model.num_layers", layers,
          f"must be a multiple of model.recursion.num_loops={big_r} for {r.strategy}")
  nonneg_int(config, "model.recursion.lora_rank")
  float_range(config, "model.recursion.lora_alpha", 0, 1e6)
  for f in ("unshared_norms", "kv_sharing"):
    if not isinstance(r[f], bool):
      fail(f"model.recursion.{f}", r[f], "must be True or False")
  choice(config, "model.recursion.gate", ("sigmoid", "tanh", "none"))
  choice(config, "model.recursion.aux", ("bce", "causal_router"))
  choice(config, "model.recursion.eval_routing", ("threshold", "topk"))
  choice(config, "model.recursion.balance", ("loss", "bias", "none"))
  choice(config, "model.recursion.dispatch", ("gather", "mask"))
  float_range(config, "model.recursion.gate_alpha", 0, 1e3, lo_open=True)
  float_range(config, "model.recursion.threshold", 0, 1, lo_open=True, hi_open=True)
  for f in ("aux_coef", "balance_coef", "bias_update_rate", "z_loss_coef"):
    float_range(config, f"model.recursion.{f}", 0, 1e3)
  nonneg_int(config, "model.recursion.eval_loops")
  if r.eval_loops > big_r:
    fail("model.recursion.eval_loops", r.eval_loops, f"must lie in [0, num_loops={big_r}]")
  floats(config, "model.recursion.capacities", 0.0, 1.0, big_r)
  floats(config, "model.recursion.kv_cache_fractions", 0.0, 1.0, big_r)
  looped = r.strategy in ("cycle", "middle_cycle")
  if r.router != "none" and not looped:
    fail("model.recursion.router", r.router,
          "Mixture-of-Recursions routes tokens between loops of the whole shared block, so "
          "it needs model.recursion.strategy = 'cycle' or 'middle_cycle'")
  if r.kv_sharing and not looped:
    fail("model.recursion.kv_sharing", r.kv_sharing,
          "needs model.recursion.strategy = 'cycle' or 'middle_cycle'")
  if r.capacities and r.router == "none":
    fail("model.recursion.capacities", r.capacities,
          "capacities need a recursion router (model.recursion.router = 'expert' or 'token')")
  if r.router == "expert" and r.capacities and any(
      a < b for a, b in zip(r.capacities, r.capacities[1:])):
    fail("model.recursion.capacities", r.capacities,
          "expert-choice routing is hierarchical (only a step's survivors go on), so the "
          "capacities must not increase")
  boolean(config, "model.recursion.allow_noncausal_training")
  lookahead = r.router == "expert" and any(c < 1.0 for c in r.capacities)
  if lookahead and not r.allow_noncausal_training:
    fail("model.recursion.allow_noncausal_training", r.allow_noncausal_training,
         "expert-choice MoR with capacities < 1 trains on each step's top-k tokens over the "
         "whole sequence, which looks at later tokens (inference stays causal: threshold "
         "routing); set it to True to accept that training path, or use router='token', "
         "whose capacity rule is causal")
  if r.allow_noncausal_training and not lookahead:
    fail("model.recursion.allow_noncausal_training", r.allow_noncausal_training,
         "only expert-choice MoR with a capacity < 1 has a look-ahead training path; "
         "leave it False")
  if r.bias_update_rate and r.balance == "bias" and r.router != "token":
    fail("model.recursion.balance", r.balance, "loss-free bias balancing is for router='token'")
