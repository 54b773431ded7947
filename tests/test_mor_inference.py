"""Mixture-of-Recursions at inference computes only the kept tokens, exactly.

Eval / prefill gather each loop's kept tokens (the causal router's decision, then the
causal capacity rule) into static buffers sized by the capacity; decoding gathers the
rows whose token is still active into the smallest of a few static row buffers. Both
must equal the masked reference (dispatch='mask', every token computed and masked):
logits and every routing statistic, for both routers, with KV sharing and with the
recursion-wise cache. The buffers' FLOPs are measured in benchmarks/recursion.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.generate import generate
from moejax.models.lm import LM
from moejax.recursion.mor import decode_buckets, first_positions
from test_recursion import V, draw_params, model_cfg, tokens, variables

ROUTED = {
    "token": dict(router="token", capacities=(1.0, 0.5, 0.25)),
    "token_bias_kvshare": dict(router="token", balance="bias", capacities=(1.0, 0.75, 0.5),
                               kv_sharing=True),
    "expert": dict(router="expert", capacities=(1.0, 0.5, 0.25)),
    "expert_causal_kvshare": dict(router="expert", capacities=(0.75, 0.5, 0.25),
                                  aux="causal_router", kv_sharing=True),
    "expert_recursion_wise_cache": dict(router="expert", capacities=(1.0, 0.5, 0.25),
                                        kv_cache_fractions=(1.0, 0.75, 0.5)),
}


def cfg_of(name, dispatch="gather"):
  return model_cfg(num_layers=3, strategy="cycle", num_loops=3, dispatch=dispatch,
                   **ROUTED[name])


def test_first_positions_and_decode_buckets():
  sel = jnp.array([[0, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, 1]], bool)
  idx, valid = first_positions(sel, 3)
  np.testing.assert_array_equal(idx, [[1, 2, 4], [5, 0, 0]])
  np.testing.assert_array_equal(valid, [[1, 1, 1], [1, 0, 0]])
  assert decode_buckets(1) == [1]
  assert decode_buckets(8) == list(range(1, 9))
  assert decode_buckets(32) == [4, 8, 12, 16, 20, 24, 28, 32]
  assert decode_buckets(10) == [2, 4, 6, 8, 10]


@pytest.mark.parametrize("name", list(ROUTED))
def test_eval_gather_equals_masked_path(name):
  """Inference (deterministic) routing: same logits and statistics, kept tokens only."""
  cfg, ref = cfg_of(name), cfg_of(name, "mask")
  params = draw_params(LM(cfg), router_std=1.0)
  x = tokens(b=3)
  cols = ["mor_stats"]
  lg1, s1 = LM(cfg).apply(variables(cfg, params), x, mutable=cols)
  lg2, s2 = LM(ref).apply(variables(ref, params), x, mutable=cols)
  np.testing.assert_allclose(lg1, lg2, atol=2e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s1, s2)
  st = s1["mor_stats"]["recursion"]
  frac = np.asarray(st["active_fraction"])
  # routing really varies (some tokens exit early), and no loop exceeds its capacity
  assert 0.0 < float(st["mean_depth"]) < 3.0
  assert np.all(frac <= np.asarray(cfg.recursion.capacities) + 1e-6)


def test_causal_capacity_rule_keeps_the_first_tokens_by_position():
  """Token router: each loop keeps the first ceil(capacity * T) tokens (by position)
  that the router sends on; later ones exit there, counted in capacity_cut."""
  cfg = model_cfg(num_layers=3, strategy="cycle", num_loops=3, router="token",
                  capacities=(1.0, 0.25, 0.25), balance="bias")
  params = draw_params(LM(cfg), router_std=0.01)  # near-uniform depth choices
  var = variables(cfg, params)
  var["mor_bias"]["recursion"]["bias"] = jnp.array([-9.0, -9.0, 9.0])  # everyone: depth 3
  _, side = LM(cfg).apply(var, tokens(b=2), mutable=["mor_stats"])
  st = side["mor_stats"]["recursion"]
  np.testing.assert_allclose(st["active_fraction"], [1.0, 0.25, 0.25], atol=1e-6)
  np.testing.assert_allclose(st["capacity_cut"], [0.0, 0.75, 0.0], atol=1e-6)


def _decode_vs_full(cfg, params, b):
  prompt = tokens(b=b, t=5, seed=1)
  state = {k: v for k, v in variables(cfg, params).items() if k != "params"}
  out, step_logits = generate(cfg, params, prompt, 8, return_logits=True, model_state=state)
  full = LM(dataclasses.replace(cfg, max_seq_len=13)).apply(variables(cfg, params), out)
  return out, step_logits, full[:, 4:12]


@pytest.mark.parametrize("name", [n if n in ("token", "expert_causal_kvshare") else
                                  pytest.param(n, marks=pytest.mark.slow) for n in ROUTED])
def test_decode_row_gather_equals_full_forward_and_masked_decode(name):
  """Batch 8: the active rows of each decoding step use buffers of 1..8 rows."""
  cfg, ref = cfg_of(name), cfg_of(name, "mask")
  params = draw_params(LM(cfg), router_std=1.0)
  out, step_logits, full = _decode_vs_full(cfg, params, 8)
  np.testing.assert_allclose(step_logits, full, atol=2e-4, rtol=2e-4)
  prompt = out[:, :5]
  state = {k: v for k, v in variables(cfg, params).items() if k != "params"}
  out2, logits2 = generate(ref, params, prompt, 8, return_logits=True, model_state=state)
  np.testing.assert_array_equal(out, out2)
  np.testing.assert_allclose(step_logits, logits2, atol=2e-5, rtol=1e-5)


def test_decode_step_branches_on_the_number_of_active_rows():
  """The gather dispatch's decoding step holds a switch over row buffers; mask has none."""
  def prims(cfg):
    model = LM(dataclasses.replace(cfg, max_seq_len=8), decode=True)
    params = draw_params(LM(cfg), router_std=1.0)
    x, pos = jnp.zeros((8, 1), jnp.int32), jnp.zeros((8, 1), jnp.int32)
    cache = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, pos)["cache"])
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache)
    jaxpr = jax.make_jaxpr(lambda p, c: model.apply({"params": p, "cache": c}, x, pos,
                                                     mutable=["cache"]))(params, cache)
    return str(jaxpr)
  assert "cond[" in prims(cfg_of("expert")) or "switch" in prims(cfg_of("expert"))
  masked = prims(cfg_of("expert", "mask"))
  assert "cond[" not in masked and "switch" not in masked


def test_inference_is_causal_with_gathered_loops():
  cfg = cfg_of("token")
  params = draw_params(LM(cfg), router_std=1.0)
  x = tokens(b=2)
  y = x.at[:, 9:].set((x[:, 9:] + 7) % V)
  a = LM(cfg).apply(variables(cfg, params), x)
  b = LM(cfg).apply(variables(cfg, params), y)
  np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-5)
  assert np.abs(a[:, 9:] - b[:, 9:]).max() > 1e-3
