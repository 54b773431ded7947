"""model.moe.init_scale: the Switch paper's reduced initialisation (Fedus et al. 2021, 2.3)
as a multiplier on the init std of the router and expert weights (shared experts too);
every other weight keeps model.init_std."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import ConfigError, load_config, validate
from moejax.models.lm import LM, LMConfig

MOE_WEIGHTS = ("router", "gate", "up", "down")


def _params(name, init_scale):
  cfg = load_config(f"configs/moe/{name}.py:runlocal", [f"model.moe.init_scale={init_scale}"])
  validate(cfg)
  mc = LMConfig.from_config(cfg.model, seq_len=cfg.data.seq_len, vocab_size=257)
  variables = nn.unbox(LM(mc).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(variables["params"])[0]}
  return mc, flat


@pytest.mark.parametrize("name", ["switch", "deepseek"])
def test_init_scale_scales_router_and_expert_std(name):
  s = math.sqrt(0.1)  # 10x smaller variance, as s = 0.1 instead of 1.0 in the paper
  mc, base = _params(name, 1.0)
  _, small = _params(name, s)
  moe_keys = [k for k in base if "/moe/" in k and k.rsplit("/", 1)[-1] in MOE_WEIGHTS]
  assert {k.rsplit("/", 1)[-1] for k in moe_keys} == set(MOE_WEIGHTS)
  if name == "deepseek":
    assert any("/shared/" in k for k in moe_keys)  # the shared experts are scaled too
  for k in moe_keys:
    want = mc.out_std if k.endswith("down") else mc.init_std
    assert base[k].std() == pytest.approx(want, rel=0.1), k
    assert small[k].std() == pytest.approx(s * want, rel=0.1), k
  for k in base:  # attention, embeddings, norms: untouched
    if k not in moe_keys:
      np.testing.assert_array_equal(small[k], base[k], err_msg=k)


@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_init_scale_is_rejected_naming_the_field(value):
  cfg = load_config("configs/moe/switch.py:runlocal")
  cfg.model.moe.init_scale = value
  with pytest.raises(ConfigError, match=r"model\.moe\.init_scale"):
    validate(cfg)
