"""Auxiliary-loss-free balancing vs an auxiliary balance loss (Wang et al. 2024; DeepSeek-V3).

The DeepSeek-style tiny model (configs/moe/deepseek.py: 32 fine-grained experts of width
48, 7 routed + 1 shared, sigmoid gate, 4 groups keep 2), 600 steps x 16 x 128 tokens:
  loss_free   selection bias b_i += 1e-3 * sign(mean load - load_i) after every step, no
              balance loss;
  aux_loss    Switch balance loss alpha = 0.01, no bias;
  none        neither;
  loss_free_fast  the bias at 10x the rate (1e-2).
    python experiments/loss_free/run.py
"""

import os

from moejax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def get_config(arg: str = ""):
  c = load_config(os.path.join(ROOT, "configs/moe/deepseek.py") + (f":{arg}" if arg else ""))
  c.name = "loss_free"
  c.model.moe.seq_balance_coef = 0.0
  return c


def get_sweep(arg: str = ""):
  del arg
  return [
      {"name": "loss_free", "model.moe.bias_update_rate": 1e-3,
       "model.moe.load_balance_coef": 0.0},
      {"name": "aux_loss", "model.moe.bias_update_rate": 0.0,
       "model.moe.load_balance_coef": 0.01},
      {"name": "none", "model.moe.bias_update_rate": 0.0, "model.moe.load_balance_coef": 0.0},
      # added after the first three: is 1e-3 (the paper's rate, for ~100k steps) too slow
      # for a 600-step run?
      {"name": "loss_free_fast", "model.moe.bias_update_rate": 1e-2,
       "model.moe.load_balance_coef": 0.0},
  ]
