"""Model-size presets shared by the experiment configs (big_vision-style `arg`).

  "runlocal": seconds on a CPU, for smoke tests;
  "" / "tiny": CPU-sized, the quickstart budget (~3 min on 2 cores);
  "large":     a realistic pod-scale model (not run here; for accounting and meshes).
"""

from __future__ import annotations


def apply_size(config, arg: str) -> str:
  """Set model / data / train sizes for `arg`; returns the preset name used."""
  m, d, o, t = config.model, config.data, config.optim, config.train
  arg = arg or "tiny"
  if arg == "tiny":
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.d_ff = 128, 4, 4, 2, 32, 384
    d.seq_len, d.batch_size = 128, 16
    o.lr, o.warmup_steps, o.min_lr_ratio, o.weight_decay = 5e-3, 50, 0.05, 0.05
    t.num_steps, t.eval_every, t.eval_batches, t.log_every, t.checkpoint_every = 600, 150, 16, 20, 300
  elif arg == "runlocal":
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.d_ff = 32, 2, 4, 2, 8, 64
    d.seq_len, d.batch_size = 32, 8
    o.warmup_steps = 2
    t.num_steps, t.eval_every, t.eval_batches, t.log_every, t.checkpoint_every = 20, 10, 2, 5, 10
  elif arg == "large":
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.d_ff = 2048, 24, 16, 8, 128, 8192
    m.compute_dtype, m.remat = "bfloat16", "dots_no_batch"
    d.seq_len, d.batch_size = 2048, 512
    o.lr, o.warmup_steps, o.min_lr_ratio, o.weight_decay = 3e-4, 2000, 0.1, 0.1
    t.num_steps, t.eval_every, t.eval_batches, t.log_every, t.checkpoint_every = 100_000, 1000, 50, 50, 1000
  else:
    raise ValueError(f"config arg {arg!r} is not allowed: use '', 'tiny', 'runlocal' or 'large'")
  return arg


RECURSION_VARIANTS = ("vanilla", "cycle", "middle_cycle", "mor_expert", "mor_token", "relaxed")


def apply_recursion(config, variant: str, size: str) -> None:
  """The recursion study's variants at one effective depth (6 layers tiny, 24 large).

  vanilla: untied. cycle: 2 (tiny) / 8 (large) unique layers looped 3 times.
  middle_cycle: unique first and last layers around a core looped twice.
  mor_expert / mor_token: the cycle model with Mixture-of-Recursions routing at
  capacities (1, 2/3, 1/3). relaxed: the cycle model with per-loop LoRA.
  """
  m, r = config.model, config.model.recursion
  m.num_layers = 24 if size == "large" else 6
  if variant == "vanilla":
    return
  if variant not in RECURSION_VARIANTS:
    raise ValueError(f"recursion variant {variant!r} is not allowed: use {RECURSION_VARIANTS}")
  r.strategy, r.num_loops = "cycle", 3
  if variant == "middle_cycle":
    r.strategy, r.num_loops = "middle_cycle", 2
  elif variant in ("mor_expert", "mor_token"):
    r.router = variant.split("_")[1]
    r.capacities = (1.0, 0.67, 0.33)
    # expert choice trains on top-k over the sequence (looks ahead; inference is causal)
    r.allow_noncausal_training = r.router == "expert"
  elif variant == "relaxed":
    r.lora_rank = 64 if size == "large" else max(4, m.d_model // 8)
