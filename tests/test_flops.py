"""Analytic FLOP accounting (moejax/flops.py) against XLA's own count of the compiled step.

XLA's HloCostAnalysis counts every op (elementwise ones too) and a dot as 2*M*N*K; the
analytic count has matmuls only, so the two agree to within the elementwise share, which
is small at these widths. The models here use `scan_layers=False`: XLA counts the body
of a while loop (what `nn.scan` becomes) once, not once per layer, so a scanned model
would read as ~1/num_layers of its layer FLOPs.

Run with `pytest -s` to see the measured ratios.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from moejax import flops
from moejax.models.lm import LM, LMConfig, init_params, param_count

CASES = {
    # d_model 128, 2 layers, T 64, d_ff 512, grouped-query (4 heads / 2 kv heads), tied
    "gqa_d128_T64": (LMConfig(vocab_size=256, d_model=128, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=32, d_ff=512, max_seq_len=64,
                              scan_layers=False), 64, 2),
    # d_model 256, 3 layers, T 128, untied embeddings
    "untied_d256_T128": (LMConfig(vocab_size=512, d_model=256, num_layers=3, num_heads=4,
                                  num_kv_heads=4, head_dim=64, d_ff=1024, max_seq_len=128,
                                  tie_embeddings=False, scan_layers=False), 128, 2),
}


def xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0]
  return float(cost["flops"])


def shapes(cfg: LMConfig, b: int, t: int):
  model = LM(cfg)
  params = jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.PRNGKey(0))))
  tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
  return model, params, tokens


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_train_flops_match_xla(name):
  cfg, t, b = CASES[name]
  model, params, tokens = shapes(cfg, b, t)
  acct = flops.account(cfg, t)
  assert param_count(params) == acct.total_params

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, tokens).compile()
  train = jax.jit(jax.value_and_grad(loss_fn)).lower(params, tokens, tokens).compile()
  fwd_ratio = xla_flops(fwd) / (b * t * acct.forward_flops_per_token)
  train_ratio = xla_flops(train) / (b * t * acct.train_flops_per_token)
  print(f"\n[flops] {name}: forward {acct.forward_flops_per_token / 1e6:.3f} MFLOP/token, "
        f"XLA/analytic forward {fwd_ratio:.4f}, train {train_ratio:.4f}")
  assert abs(fwd_ratio - 1) < 0.10, fwd_ratio
  assert abs(train_ratio - 1) < 0.10, train_ratio


def test_account_by_hand():
  cfg, t, _ = CASES["gqa_d128_T64"]
  a = flops.account(cfg, t)
  d, f, v, L = 128, 512, 256, 2
  qkvo = d * 32 * (4 + 2 + 2 + 4)  # q, k, v, o weights
  layer_params = qkvo + 3 * d * f + 2 * d
  assert a.total_params == v * d + L * layer_params + d
  assert a.embedding_params == v * d
  per_layer = 2 * qkvo + 2 * 2 * t * 4 * 32 + 2 * 3 * d * f  # projections, QK^T + PV, FFN
  assert a.forward_flops_per_token == L * per_layer + 2 * d * v
  assert a.train_flops_per_token == 3 * a.forward_flops_per_token
  assert a.active_params == a.total_params


def test_attention_flops_grow_linearly_with_seq_len():
  cfg, _, _ = CASES["untied_d256_T128"]
  f = [flops.account(cfg, t).forward_flops_per_token for t in (128, 256, 512)]
  step = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * 128
  assert f[1] - f[0] == step and f[2] - f[1] == 2 * step


def test_untying_adds_parameters_but_not_flops():
  cfg, t, _ = CASES["gqa_d128_T64"]
  tied = flops.account(cfg, t)
  untied = flops.account(dataclasses.replace(cfg, tie_embeddings=False), t)
  assert untied.total_params - tied.total_params == cfg.vocab_size * cfg.d_model
  assert untied.embedding_params == 2 * tied.embedding_params
  assert untied.forward_flops_per_token == tied.forward_flops_per_token


def test_summary_and_dict():
  cfg, t, _ = CASES["gqa_d128_T64"]
  a = flops.account(cfg, t)
  d = a.as_dict()
  assert set(d) == {"total_params", "active_params", "embedding_params",
                    "forward_flops_per_token", "train_flops_per_token"}
  assert f"total {a.total_params / 1e6:.3f}M" in a.summary()
  assert f"forward {a.forward_flops_per_token / 1e6:.2f}M" in a.summary()
