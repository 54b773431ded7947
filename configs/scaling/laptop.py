"""The laptop scaling sweep: dense and MoE language models on the embedded corpus.

Four widths (d_model 16 / 32 / 64 / 128, 3 layers, byte tokens, 128-token sequences, batch 8)
trained at three compute budgets each, so every budget holds three model sizes (an
isoFLOP profile) and every size sees three token counts (for the Chinchilla fit); and
MoE versions of widths 32 / 64 / 128 with 4 and 16 experts (GShard top-2, experts of width
d_ff / 2, so the active FLOPs equal the dense model's; E = 1 is the dense model) at the
middle budget, for the routed law. Every point at a budget trains for the same steps as
the dense model of its width, so budgets are equal in FLOPs up to the router (< 1%).

    python -m moejax.sweep --config configs/scaling/laptop.py --workdir runs/scaling_laptop
    python experiments/scaling_laptop/analyze.py runs/scaling_laptop   # fits and plots

Args: "" (the sweep above) or "smoke" (3 points, a few steps each, for tests).
"""

from moejax.config import base_config

WIDTHS = (32, 64, 128)
LAYERS = 3
SEQ, BATCH = 128, 8
# Training compute per budget, FLOPs (6 x active params x tokens, as counted by
# moejax/flops.py); each width's step count is budget / (FLOPs per token * tokens/step).
BUDGETS = (5e11, 1e12, 2e12)
EXPERTS = (4, 16)


def get_config(arg: str = ""):
  del arg
  c = base_config()
  c.name = "scaling_laptop"
  m, d, o, t = c.model, c.data, c.optim, c.train
  m.num_layers = LAYERS
  d.seq_len, d.batch_size = SEQ, BATCH
  o.lr, o.warmup_steps, o.min_lr_ratio, o.weight_decay = 5e-3, 30, 0.1, 0.05
  t.eval_batches, t.log_every, t.keep_checkpoints = 8, 25, 1
  size(c, 64)
  return c


def size(c, width: int) -> None:
  m = c.model
  m.d_model, m.num_heads, m.head_dim, m.d_ff = width, width // 16, 16, 3 * width
  m.num_kv_heads = m.num_heads


def _size_overrides(width: int) -> dict:
  return {"model.d_model": width, "model.num_heads": max(1, width // 16), "model.num_kv_heads":
          max(1, width // 16), "model.head_dim": 16, "model.d_ff": 3 * width}


def train_flops_per_token(width: int, experts: int = 0) -> float:
  from moejax import flops  # pylint: disable=g-import-not-at-top
  from moejax.models.lm import LMConfig  # pylint: disable=g-import-not-at-top
  c = get_config()
  size(c, width)
  if experts:
    _moe(c.model.moe, experts, 3 * width)
  mc = LMConfig.from_config(c.model, seq_len=SEQ, vocab_size=264)
  return flops.account(mc, SEQ).train_flops_per_token


def _moe(e, experts: int, d_ff: int) -> None:
  e.num_experts, e.experts_per_token, e.renormalize = experts, 2, True
  e.expert_d_ff = d_ff // 2
  e.router, e.load_balance_coef, e.z_loss_coef, e.backend = "topk", 0.01, 1e-3, "dropless"


def _moe_overrides(experts: int, width: int) -> dict:
  return {"model.moe.num_experts": experts, "model.moe.experts_per_token": 2,
          "model.moe.renormalize": True, "model.moe.expert_d_ff": 3 * width // 2,
          "model.moe.router": "topk", "model.moe.load_balance_coef": 0.01,
          "model.moe.backend": "dropless"}


def _steps(budget: float, width: int) -> int:
  return max(1, round(budget / (train_flops_per_token(width) * SEQ * BATCH)))


def _train_overrides(steps: int) -> dict:
  return {"train.num_steps": steps, "optim.warmup_steps": min(30, steps // 4),
          "train.eval_every": max(1, steps // 4),
          "train.checkpoint_every": max(1, steps // 2)}


def get_sweep(arg: str = ""):
  if arg == "smoke":
    return [{"name": "dense_w32", **_size_overrides(32), **_train_overrides(4)},
            {"name": "dense_w64", **_size_overrides(64), **_train_overrides(3)},
            {"name": "moe4_w32", **_size_overrides(32), **_moe_overrides(4, 32),
             **_train_overrides(4)}]
  points = []
  for b, budget in enumerate(BUDGETS):
    for w in WIDTHS:
      points.append({"name": f"dense_w{w}_c{b}", **_size_overrides(w),
                     **_train_overrides(_steps(budget, w))})
  mid = BUDGETS[1]
  for e in EXPERTS:
    for w in WIDTHS:
      points.append({"name": f"moe{e}_w{w}_c1", **_size_overrides(w), **_moe_overrides(e, w),
                     **_train_overrides(_steps(mid, w))})
  # Added after the first run showed width 32 winning every budget: a smaller width so
  # that each isoFLOP profile brackets its minimum (appended, so the earlier points keep
  # their indices and are not re-run).
  for b, budget in enumerate(BUDGETS):
    points.append({"name": f"dense_w16_c{b}", **_size_overrides(16),
                   **_train_overrides(_steps(budget, 16))})
  return points
