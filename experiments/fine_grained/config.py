"""Fine-grained and shared experts vs top-2 at equal active and total parameters
(DeepSeekMoE, section 3).

One router family for all three (sigmoid affinities, chosen gates normalised and scaled by
the number of routed experts chosen, Switch balance loss 0.01, z-loss 1e-3, no bias), tiny
preset, 600 steps x 16 x 128 tokens:
  top2          8 experts of width 192, k = 2;
  fine          the same 8 split m = 4 ways: 32 experts of width 48, k = 8;
  fine_shared   32 routed of width 48 + 1 shared, k = 7 routed (DeepSeekMoE keeps the
                active width at 8 x 48 = 384 this way; total +3% for the shared expert).
    python experiments/fine_grained/run.py
"""

import os

from moejax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def get_config(arg: str = ""):
  c = load_config(os.path.join(ROOT, "configs/moe/gshard_top2.py") + (f":{arg}" if arg else ""))
  c.name = "fine_grained"
  e = c.model.moe
  e.router, e.n_groups, e.topk_groups, e.bias_update_rate = "deepseek", 1, 1, 0.0
  e.load_balance_coef, e.z_loss_coef, e.seq_balance_coef = 0.01, 1e-3, 0.0
  return c


def get_sweep(arg: str = ""):
  del arg
  return [
      {"name": "top2", "model.moe.granularity": 1, "model.moe.num_shared_experts": 0,
       "model.moe.route_scale": 2.0},
      {"name": "fine", "model.moe.granularity": 4, "model.moe.num_shared_experts": 0,
       "model.moe.route_scale": 8.0},
      {"name": "fine_shared", "model.moe.granularity": 4, "model.moe.num_shared_experts": 1,
       "model.moe.route_scale": 7.0},
  ]
