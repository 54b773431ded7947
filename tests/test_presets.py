"""The shipped configs (configs/**): every preset validates, and the MoE presets match the
papers they name (DeepSeek-V3 routing and balancing; causal dispatch for Switch / GShard).
Nothing here compiles: configs are loaded, validated and resolved only."""

from __future__ import annotations

import dataclasses
import glob
import os

import pytest

from moejax import flops
from moejax.config import ConfigError, load_config, validate
from moejax.models.lm import LMConfig
from moejax.moe.config import CAPACITY_BACKENDS
from moejax.moe.layer import MoEConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.relpath(p, ROOT)
                 for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True))
SIZES = ("runlocal", "", "large")


def _load(path: str, arg: str = ""):
  return load_config(os.path.join(ROOT, path) + (f":{arg}" if arg else ""))


@pytest.mark.parametrize("path", CONFIGS)
def test_every_shipped_config_validates_at_every_size(path):
  """Each file under configs/ at each preset it accepts (files without size presets ignore
  the arg): no shipped config trips a validation rule (e.g. top-1 with renormalised gates,
  capacity dispatch without the non-causal opt-in)."""
  assert len(CONFIGS) >= 15
  loaded = 0
  for arg in SIZES:
    try:
      c = _load(path, arg)
    except ConfigError as err:  # a file without this size preset (e.g. quickstart: no large)
      assert "get_config(" in str(err) and arg, err
      continue
    loaded += 1
    validate(c)
    e = c.model.moe
    if e.num_experts and e.router == "topk":
      k = e.experts_per_token * e.granularity - e.num_shared_experts
      assert k >= 2 or not e.renormalize, (path, arg)
    if e.num_experts and e.backend in CAPACITY_BACKENDS:
      assert e.allow_noncausal, (path, arg)
  assert loaded >= 1


@pytest.mark.parametrize("path", ["configs/moe/deepseek.py:large", "configs/scale/deepseek_v3.py"])
def test_deepseek_v3_presets_route_8_of_256_plus_1_shared(path):
  """DeepSeek-V3: 256 routed experts of width 2048, 8 routed + 1 shared active per token,
  8 groups keep 4, route scale 2.5, the first 3 layers dense."""
  c = load_config(os.path.join(ROOT, path))
  validate(c)
  mc = MoEConfig.from_config(c.model.moe, c.model.d_ff)
  assert (mc.num_experts, mc.k, mc.num_shared, mc.expert_d_ff) == (256, 8, 1, 2048)
  assert (mc.router, mc.n_groups, mc.topk_groups, mc.route_scale, mc.first_dense) == (
      "deepseek", 8, 4, 2.5, 3)
  # active FFN compute per token: 9 experts of width 2048, the shared one included
  lm = LMConfig.from_config(c.model, seq_len=c.data.seq_len, vocab_size=257)
  fewer = LMConfig.from_config(c.model, seq_len=c.data.seq_len, vocab_size=257)
  fewer = dataclasses.replace(fewer, moe=dataclasses.replace(fewer.moe, k=mc.k - 1))
  moe_layers = c.model.num_layers - mc.first_dense
  per_expert = 2 * 3 * c.model.d_model * mc.expert_d_ff  # forward FLOPs of one SwiGLU expert
  assert (flops.account(lm, c.data.seq_len).forward_flops_per_token
          - flops.account(fewer, c.data.seq_len).forward_flops_per_token) == pytest.approx(
              moe_layers * per_expert, rel=1e-9)


@pytest.mark.parametrize("path", ["configs/moe/deepseek.py", "configs/moe/deepseek.py:runlocal",
                                  "configs/moe/deepseek.py:large", "configs/scale/deepseek_v3.py"])
def test_deepseek_presets_are_auxiliary_loss_free(path):
  """As in DeepSeek-V3: the selection bias does the balancing (gamma = 1e-3), no
  expert-level balance loss, only a tiny sequence-wise balance loss (alpha = 1e-4)."""
  e = load_config(os.path.join(ROOT, path)).model.moe
  assert e.router == "deepseek" and e.bias_update_rate == pytest.approx(1e-3)
  assert e.load_balance_coef == 0.0
  assert e.seq_balance_coef == pytest.approx(1e-4)


@pytest.mark.parametrize("name", ["switch", "gshard_top2"])
@pytest.mark.parametrize("arg", SIZES)
def test_switch_and_gshard_presets_dispatch_causally(name, arg):
  """Capacity dispatch lets later tokens evict earlier ones, so the presets (large
  included) use dropless dispatch; the papers' capacity dispatch is an explicit opt-in."""
  c = _load(f"configs/moe/{name}.py", arg)
  assert c.model.moe.backend not in CAPACITY_BACKENDS and not c.model.moe.allow_noncausal
