"""Recursive transformers and Mixture-of-Recursions (moejax/recursion).

Every fast path is checked against a plain reference: a recursive model equals an
untied model whose layers are copies of the shared ones in schedule order; the gathered
MoR training path equals the masked path (dispatch='mask') that runs every token;
cached decoding equals the full forward in the inference mode; inference is causal.
Tiny configs (d_model 32, T 16) with a large init_std so logits are O(1).
"""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax import flops
from moejax.config import ConfigError, base_config, validate
from moejax.generate import generate
from moejax.models.lm import LM, LMConfig, param_count
from moejax.recursion.sharing import RecursionConfig

T = 16
V = 64


def model_cfg(num_layers=4, moe=False, **rec) -> LMConfig:
  c = base_config()
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.d_ff = (
      32, num_layers, 4, 2, 8, 64)
  m.init_std = 0.25
  if moe:
    m.moe.num_experts, m.moe.experts_per_token = 4, 2
  for k, v in rec.items():
    m.recursion[k] = v
  # expert-choice MoR with capacities < 1 trains with look-ahead: configs must say so
  m.recursion.allow_noncausal_training = (
      rec.get("router") == "expert" and any(x < 1.0 for x in rec.get("capacities", ())))
  c.data.seq_len = T
  validate(c)
  return LMConfig.from_config(m, seq_len=T, vocab_size=V)


def draw_params(model: LM, seed: int = 0, router_std: float | None = None):
  """Random params of the model's init structure (numpy draws: no init compilation)."""
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0),
                                                      jnp.zeros((1, 4), jnp.int32))["params"]))
  rng = np.random.default_rng(seed)
  std = model.cfg.init_std

  def draw(path, s):
    key = jax.tree_util.keystr(path)
    if key.endswith("['scale']"):
      value = 1.0 + 0.1 * rng.standard_normal(s.shape)
    elif "router" in key and router_std is not None:
      value = router_std * rng.standard_normal(s.shape)
    else:
      value = std * rng.standard_normal(s.shape)
    return jnp.asarray(value, s.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def variables(cfg: LMConfig, params) -> dict:
  """params plus the non-param state a model needs (the token router's loss-free bias)."""
  rc = cfg.recursion
  if rc is not None and rc.router == "token" and rc.balance == "bias":
    bias = jnp.asarray(np.linspace(-0.2, 0.2, rc.num_loops), jnp.float32)
    return {"params": params, "mor_bias": {"recursion": {"bias": bias}}}
  return {"params": params}


def tokens(b=2, t=T, seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, V)


def untied_reference(cfg: LMConfig, params, loops: int | None = None):
  """An untied, unrolled LM whose layer i is a copy of the shared layer of schedule[i]."""
  rc = cfg.recursion
  sched = rc.schedule(loops)
  ref_cfg = dataclasses.replace(cfg, recursion=None, num_layers=len(sched), scan_layers=False)
  ref = {k: v for k, v in params.items() if k != "recursion"}
  for i, (name, r) in enumerate(sched):
    p = jax.tree.map(lambda x: x, params["recursion"][name])
    if rc.unshared_norms and name.startswith("shared_"):
      for norm in ("attn_norm", "ffn_norm"):
        p[norm] = {"scale": p[norm]["scale"][r]}
    ref[f"layer_{i}"] = p
  return LM(ref_cfg), ref


# ------------------------------------------------------------------ sharing strategies

def test_schedules():
  mk = lambda s, layers: RecursionConfig(strategy=s, num_loops=2, num_layers=layers)
  assert mk("cycle", 4).schedule() == [("shared_0", 0), ("shared_1", 0), ("shared_0", 1),
                                       ("shared_1", 1)]
  assert mk("sequence", 4).schedule() == [("shared_0", 0), ("shared_0", 1), ("shared_1", 0),
                                          ("shared_1", 1)]
  assert [n for n, _ in mk("middle_cycle", 6).schedule()] == [
      "first_layer", "shared_0", "shared_1", "shared_0", "shared_1", "last_layer"]
  assert [n for n, _ in mk("middle_sequence", 6).schedule()] == [
      "first_layer", "shared_0", "shared_0", "shared_1", "shared_1", "last_layer"]
  assert mk("middle_cycle", 6).tied_layers() == {"first_layer": [0], "shared_0": [1, 3],
                                                 "shared_1": [2, 4], "last_layer": [5]}
  assert mk("cycle", 4).schedule(loops=1) == [("shared_0", 0), ("shared_1", 0)]


@pytest.mark.parametrize("strategy,layers", [("cycle", 6), ("sequence", 6),
                                             ("middle_cycle", 8), ("middle_sequence", 8)])
def test_tied_parameter_count(strategy, layers):
  rec = model_cfg(num_layers=layers, strategy=strategy, num_loops=3)
  vanilla = model_cfg(num_layers=layers)
  p_rec = draw_params(LM(rec))
  p_van = draw_params(LM(vanilla))
  rc = rec.recursion
  per_layer = flops.layer_params(vanilla)[0]
  assert rc.num_unique == (2 if "middle" not in strategy else 4)
  assert param_count(p_van) - param_count(p_rec) == (layers - rc.num_unique) * per_layer
  assert param_count(p_rec) == flops.account(rec, T).total_params
  # the effective depth's compute is that of the untied model
  assert flops.account(rec, T).forward_flops_per_token == pytest.approx(
      flops.account(vanilla, T).forward_flops_per_token)


def test_lora_and_unshared_norm_parameter_count():
  base = model_cfg(strategy="cycle", num_loops=2)
  relaxed = model_cfg(strategy="cycle", num_loops=2, lora_rank=4, unshared_norms=True)
  n0, n1 = param_count(draw_params(LM(base))), param_count(draw_params(LM(relaxed)))
  d, h, k, dh, f, r, loops, core = 32, 4, 2, 8, 64, 4, 2, 2
  lora = r * (2 * (d + h * dh) + 2 * (d + k * dh) + 3 * (d + f))
  assert n1 - n0 == core * (loops * lora + (loops - 1) * 2 * d)
  assert n1 == flops.account(relaxed, T).total_params


@pytest.mark.parametrize("rec", [
    dict(strategy="cycle", num_loops=2),
    dict(strategy="sequence", num_loops=2),
    dict(strategy="middle_cycle", num_loops=2, num_layers=6),
    dict(strategy="middle_sequence", num_loops=2, num_layers=6, unshared_norms=True),
], ids=["cycle", "sequence", "middle_cycle", "middle_sequence_widenet"])
def test_recursive_model_equals_untied_copies(rec):
  cfg = model_cfg(**rec)
  params = draw_params(LM(cfg))
  ref_model, ref_params = untied_reference(cfg, params)
  x = tokens()
  got = LM(cfg).apply({"params": params}, x)
  want = ref_model.apply({"params": ref_params}, x)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_lora_changes_each_loop_and_zero_lora_is_the_recursive_model():
  cfg = model_cfg(strategy="cycle", num_loops=2, lora_rank=4)
  params = draw_params(LM(cfg))
  x = tokens()
  zeroed = jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.zeros_like(v) if "lora_b" in jax.tree_util.keystr(p) else v, params)
  plain_cfg = model_cfg(strategy="cycle", num_loops=2)
  strip = lambda t: {k: (strip(v) if isinstance(v, dict) else v) for k, v in t.items()
                     if "lora" not in k}
  plain = strip(zeroed)
  np.testing.assert_allclose(LM(cfg).apply({"params": zeroed}, x),
                             LM(plain_cfg).apply({"params": plain}, x), atol=1e-5)
  assert not np.allclose(LM(cfg).apply({"params": params}, x),
                         LM(plain_cfg).apply({"params": plain}, x), atol=1e-3)


def test_fewer_loops_at_inference():
  cfg = model_cfg(strategy="middle_cycle", num_loops=2, num_layers=6, eval_loops=1)
  params = draw_params(LM(cfg))
  ref_model, ref_params = untied_reference(cfg, params, loops=1)
  x = tokens()
  np.testing.assert_allclose(LM(cfg).apply({"params": params}, x),
                             ref_model.apply({"params": ref_params}, x), atol=2e-5)
  # training still runs every loop
  full_model, full_params = untied_reference(cfg, params)
  np.testing.assert_allclose(LM(cfg, deterministic=False).apply({"params": params}, x),
                             full_model.apply({"params": full_params}, x), atol=2e-5)


# ------------------------------------------------------------------ Mixture-of-Recursions

MOR = {
    "expert_bce": dict(router="expert", capacities=(1.0, 0.5, 0.25)),
    "expert_causal": dict(router="expert", capacities=(1.0, 0.5, 0.25), aux="causal_router"),
    "expert_tanh_kvshare": dict(router="expert", capacities=(0.75, 0.5, 0.25), gate="tanh",
                                kv_sharing=True),
    "token": dict(router="token", capacities=(1.0, 0.5, 0.25)),
    "token_bias_kvshare": dict(router="token", balance="bias", kv_sharing=True),
}


def mor_cfg(name, strategy="middle_cycle", **kw):
  """Three loops of a one-layer core (plus unique first/last layers for middle_cycle)."""
  layers = 5 if strategy == "middle_cycle" else 3
  return model_cfg(num_layers=layers, strategy=strategy, num_loops=3, **{**MOR[name], **kw})


def test_mor_at_full_capacity_equals_plain_recursion():
  cfg = model_cfg(num_layers=6, strategy="middle_cycle", num_loops=2, router="expert",
                  capacities=(1.0, 1.0), gate="none")
  plain = model_cfg(num_layers=6, strategy="middle_cycle", num_loops=2)
  params = draw_params(LM(cfg))
  plain_params = dict(params, recursion={k: v for k, v in params["recursion"].items()
                                         if not k.startswith("router")})
  x = tokens()
  want = LM(plain).apply({"params": plain_params}, x)
  for det in (True, False):
    np.testing.assert_allclose(LM(cfg, deterministic=det).apply({"params": params}, x), want,
                               atol=2e-5)


# covered by the other two (expert choice, token choice) + tests/test_mor_inference.py,
# which checks expert_causal's gathered path against the mask in eval and decoding
GATHER_SLOW = ("expert_bce", "expert_causal", "token_bias_kvshare")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in GATHER_SLOW
                                  else n for n in MOR])
def test_gathered_training_path_equals_masked_reference(name):
  """Same logits, losses, statistics and gradients: only the kept tokens are computed."""
  cfg = mor_cfg(name)
  ref = dataclasses.replace(cfg, recursion=dataclasses.replace(cfg.recursion, dispatch="mask"))
  params = draw_params(LM(cfg), router_std=1.0)
  x = tokens()
  cols = ["mor_losses", "mor_stats"]

  def loss(p, model):
    logits, side = model.apply({**variables(cfg, p)}, x, mutable=cols)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, x).mean()
    aux = sum(jax.tree.leaves(side.get("mor_losses", {})))
    return ce + aux, (logits, side)

  (l1, (lg1, s1)), g1 = jax.value_and_grad(loss, has_aux=True)(params, LM(cfg, deterministic=False))
  (l2, (lg2, s2)), g2 = jax.value_and_grad(loss, has_aux=True)(params, LM(ref, deterministic=False))
  np.testing.assert_allclose(lg1, lg2, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s1, s2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=3e-5, rtol=1e-4), g1, g2)
  hist = np.asarray(s1["mor_stats"]["recursion"]["depth_hist"])
  assert hist.shape == (4,) and hist.sum() == pytest.approx(1.0)
  if name.startswith("expert"):  # hierarchical top-k: exactly the capacities' share
    frac = np.asarray(s1["mor_stats"]["recursion"]["active_fraction"])
    np.testing.assert_allclose(frac, cfg.recursion.capacities, atol=1 / T)
    assert "router_bce" in s1["mor_losses"]["recursion"] or \
        "causal_router_bce" in s1["mor_losses"]["recursion"]
  # the router learns: its parameters get gradient
  assert float(jnp.abs(g1["recursion"]["router"]).sum()) > 0


def test_remat_gives_the_same_loss_and_gradients():
  cfg = model_cfg(num_layers=2, strategy="cycle", num_loops=2, router="expert",
                  capacities=(1.0, 0.5), aux="causal_router")
  remat = dataclasses.replace(cfg, remat="dots")
  params = draw_params(LM(cfg), router_std=1.0)
  x = tokens()

  def loss(p, c):
    logits = LM(c, deterministic=False).apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, x).mean()

  l1, g1 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, cfg)
  l2, g2 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, remat)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g1, g2)


def test_expert_choice_training_routing_sees_the_future_but_inference_does_not():
  """The causality check can fail: top-k over a sequence leaks, threshold routing does not."""
  cfg = mor_cfg("expert_bce")
  params = draw_params(LM(cfg), router_std=1.0)
  x = tokens(b=4)
  y = x.at[:, -1].set((x[:, -1] + 1) % V)
  train = LM(cfg, deterministic=False)
  leak = np.abs(train.apply({"params": params}, x)[:, :-1]
                - train.apply({"params": params}, y)[:, :-1]).max()
  assert leak > 1e-4
  infer = LM(cfg)
  np.testing.assert_array_equal(infer.apply({"params": params}, x)[:, :-1],
                                infer.apply({"params": params}, y)[:, :-1])


CAUSAL_VARIANTS = {
    "cycle": dict(strategy="cycle", num_loops=2),
    "middle_cycle_relaxed": dict(strategy="middle_cycle", num_loops=2, num_layers=6,
                                 lora_rank=4, unshared_norms=True),
    "middle_sequence": dict(strategy="middle_sequence", num_loops=2, num_layers=6),
    "kv_sharing": dict(strategy="cycle", num_loops=2, kv_sharing=True),
    **{f"mor_{k}": dict(strategy="middle_cycle", num_loops=3, num_layers=5, **v)
       for k, v in MOR.items()},
}


CAUSAL_SLOW = ("middle_sequence", "mor_expert_bce", "mor_token")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in CAUSAL_SLOW
                                  else n for n in CAUSAL_VARIANTS])
def test_inference_is_causal(name):
  cfg = model_cfg(**CAUSAL_VARIANTS[name])
  params = draw_params(LM(cfg), router_std=1.0)
  model = LM(cfg)
  x = tokens(b=2)
  for p in (5, 11):
    y = x.at[:, p:].set((x[:, p:] + 7) % V)
    a = model.apply(variables(cfg, params), x)
    b = model.apply(variables(cfg, params), y)
    np.testing.assert_allclose(a[:, :p], b[:, :p], atol=1e-5)
    assert np.abs(a[:, p:] - b[:, p:]).max() > 1e-3


DECODE_VARIANTS = {
    "cycle": dict(strategy="cycle", num_loops=2),
    "middle_cycle_relaxed_fewer_loops": dict(strategy="middle_cycle", num_loops=2, num_layers=6,
                                             lora_rank=4, unshared_norms=True, eval_loops=1),
    "middle_sequence": dict(strategy="middle_sequence", num_loops=2, num_layers=6),
    "kv_sharing": dict(strategy="cycle", num_loops=2, kv_sharing=True),
    "mor_token": dict(strategy="middle_cycle", num_loops=3, num_layers=5, **MOR["token"]),
    "mor_token_bias_kvshare": dict(strategy="middle_cycle", num_loops=3, num_layers=5,
                                   **MOR["token_bias_kvshare"]),
    "mor_expert_causal_router": dict(strategy="middle_cycle", num_loops=3, num_layers=5,
                                     **MOR["expert_causal"]),
    "mor_expert_bce_kvshare": dict(strategy="cycle", num_loops=3, num_layers=3,
                                   **MOR["expert_tanh_kvshare"]),
    "mor_expert_compact_cache": dict(strategy="cycle", num_loops=3, num_layers=3,
                                     kv_cache_fractions=(1.0, 1.0, 1.0), **MOR["expert_bce"]),
}


DECODE_SLOW = ("middle_sequence", "mor_token", "mor_expert_compact_cache")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in DECODE_SLOW
                                  else n for n in DECODE_VARIANTS])
def test_cached_decoding_equals_full_forward(name):
  cfg = model_cfg(**DECODE_VARIANTS[name])
  params = draw_params(LM(cfg), router_std=1.0)
  prompt = tokens(b=2, t=5)
  state = {k: v for k, v in variables(cfg, params).items() if k != "params"}
  out, step_logits = generate(cfg, params, prompt, 8, return_logits=True, model_state=state)
  full = LM(dataclasses.replace(cfg, max_seq_len=13)).apply(variables(cfg, params), out)
  np.testing.assert_allclose(step_logits, full[:, 4:12], atol=2e-4, rtol=2e-4)


def test_recursion_wise_cache_holds_only_tokens_that_reached_a_depth():
  cfg = model_cfg(num_layers=3, strategy="cycle", num_loops=3, router="expert",
                  capacities=(1.0, 0.5, 0.25), kv_cache_fractions=(1.0, 0.5, 0.5))
  params = draw_params(LM(cfg), router_std=1.0)
  model = LM(dataclasses.replace(cfg, max_seq_len=T), decode=True)
  x = tokens(b=2)
  from moejax.generate import init_cache  # pylint: disable=g-import-not-at-top
  cache = init_cache(model, 2)
  _, side = model.apply({"params": params, "cache": cache}, x, mutable=["cache", "mor_stats"])
  attn = side["cache"]["recursion"]["shared_0"]["attn"]
  assert attn["k"].shape[1] == T and attn["k_1"].shape[1] == T // 2  # compacted slots
  counts = [np.asarray(attn[n]) for n in ("index", "index_1", "index_2")]
  frac = np.asarray(side["mor_stats"]["recursion"]["active_fraction"])
  np.testing.assert_array_equal(counts[0], [T, T])
  for r in (1, 2):  # entries written == tokens active at that depth (capped by the slots)
    assert counts[r].sum() <= frac[r] * 2 * T + 1e-6
  assert counts[1].sum() > counts[2].sum() or frac[2] == frac[1]


def test_mor_flop_accounting_matches_xla():
  """Analytic forward FLOPs of a gathered MoR model count only the tokens kept."""
  base = dict(num_layers=3, strategy="cycle", num_loops=3, router="expert")
  full = model_cfg(**base, capacities=(1.0, 1.0, 1.0))
  cut = model_cfg(**base, capacities=(1.0, 0.5, 0.25))
  x = jax.ShapeDtypeStruct((2, T), jnp.int32)
  ratios = []
  for cfg in (full, cut):
    model = LM(cfg, deterministic=False)
    params = jax.eval_shape(lambda m=model: nn.unbox(
        m.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]))
    comp = jax.jit(lambda p, t, m=model: m.apply({"params": p}, t)).lower(params, x).compile()
    cost = comp.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    ratios.append(float(cost["flops"]) / (2 * T * flops.account(cfg, T).forward_flops_per_token))
  assert all(abs(r - 1) < 0.15 for r in ratios), ratios
  saving = flops.account(cut, T).forward_flops_per_token / flops.account(full, T).forward_flops_per_token
  assert saving < 0.75


def test_token_choice_bias_update_balances_depths():
  from moejax.train import steps  # pylint: disable=g-import-not-at-top
  cfg = mor_cfg("token_bias_kvshare", strategy="cycle")
  model = LM(cfg, deterministic=False)
  variables = model.init(jax.random.PRNGKey(0), tokens())
  params = nn.unbox(variables["params"])
  # a bias that sends (nearly) every token to depth 1 gives the balancing work to do
  start = jnp.asarray([2.0, 0.0, 0.0], jnp.float32)
  tx = optax.sgd(0.0)
  state = steps.TrainState.create(params, tx, jax.random.PRNGKey(1),
                                  {"mor_bias": {"recursion": {"bias": start}}})
  step = jax.jit(steps.make_train_step(model, mor_bias_rate=0.05))
  batch = {"inputs": tokens(seed=1), "targets": tokens(seed=2)}
  loads = []
  for _ in range(40):
    state, m = step(state, batch)
    loads.append(np.asarray(m["mor_stats"]["depth_load"]))
  bias = np.asarray(state.model_state["mor_bias"]["recursion"]["bias"])
  assert loads[0][0] > 0.9
  assert bias[0] - bias[1:].max() < 1.0  # the overloaded depth lost its 2.0 head start
  assert np.abs(loads[-1] - 1 / 3).max() < np.abs(loads[0] - 1 / 3).max()


def test_moe_inside_the_shared_block():
  cfg = model_cfg(num_layers=3, moe=True, strategy="cycle", num_loops=3, router="expert",
                  capacities=(1.0, 0.5, 0.25))
  ref = dataclasses.replace(cfg, recursion=dataclasses.replace(cfg.recursion, dispatch="mask"))
  params = draw_params(LM(cfg), router_std=1.0)
  assert "moe" in params["recursion"]["shared_0"]
  x = tokens()
  cols = ["moe_losses", "moe_stats", "mor_losses", "mor_stats"]
  a, side = LM(cfg, deterministic=False).apply({"params": params}, x, mutable=cols)
  b, _ = LM(ref, deterministic=False).apply({"params": params}, x, mutable=cols)
  np.testing.assert_allclose(a, b, atol=2e-5)  # dropless experts: per-token results agree
  moe_stats = side["moe_stats"]["recursion"]["shared_0"]["moe"]
  # loads add up over the loops: every routed (token, slot) of the 3 steps
  n_tokens = sum(max(1, int(np.ceil(c * T))) for c in cfg.recursion.capacities) * 2
  assert float(np.sum(moe_stats["load"])) == pytest.approx(n_tokens * cfg.moe.k)
  assert float(side["moe_losses"]["recursion"]["shared_0"]["moe"]["load_balance"]) > 0


# ------------------------------------------------------------------ config errors

@pytest.mark.parametrize("fields,bad", [
    (dict(strategy="loop"), "model.recursion.strategy"),
    (dict(strategy="cycle", num_loops=1), "model.recursion.num_loops"),
    (dict(strategy="cycle", num_loops=3), "model.num_layers"),
    (dict(strategy="middle_cycle", num_loops=3), "model.num_layers"),
    (dict(num_loops=2), "model.recursion.num_loops"),
    (dict(router="expert"), "model.recursion.router"),
    (dict(strategy="sequence", num_loops=2, router="expert"), "model.recursion.router"),
    (dict(strategy="sequence", num_loops=2, kv_sharing=True), "model.recursion.kv_sharing"),
    (dict(strategy="cycle", num_loops=2, router="expert", capacities=(0.5, 1.0)),
     "model.recursion.capacities"),
    (dict(strategy="cycle", num_loops=2, router="expert", capacities=(1.0,)),
     "model.recursion.capacities"),
    (dict(strategy="cycle", num_loops=2, router="expert", capacities=(1.0, 0.0)),
     "model.recursion.capacities"),
    (dict(strategy="cycle", num_loops=2, capacities=(1.0, 0.5)), "model.recursion.capacities"),
    (dict(strategy="cycle", num_loops=2, gate="relu"), "model.recursion.gate"),
    (dict(strategy="cycle", num_loops=2, threshold=1.0), "model.recursion.threshold"),
    (dict(strategy="cycle", num_loops=2, eval_loops=3), "model.recursion.eval_loops"),
    (dict(strategy="cycle", num_loops=2, lora_rank=-1), "model.recursion.lora_rank"),
    (dict(strategy="cycle", num_loops=2, dispatch="fast"), "model.recursion.dispatch"),
    (dict(strategy="cycle", num_loops=2, kv_cache_fractions=(1.0, 2.0)),
     "model.recursion.kv_cache_fractions"),
    (dict(strategy="cycle", num_loops=2, router="token", aux="maybe"), "model.recursion.aux"),
])
def test_bad_recursion_configs_name_the_field(fields, bad):
  c = base_config()
  for k, v in fields.items():
    c.model.recursion[k] = v
  with pytest.raises(ConfigError, match=bad.replace(".", r"\.")):
    validate(c)


# ------------------------------------------------------------------ training runs

RUN_OVERRIDES = ["--config.train.num_steps=6", "--config.train.checkpoint_every=3",
                 "--config.train.eval_every=6", "--config.train.log_every=3",
                 "--config.train.eval_batches=1",
                 "--config.train.progress_bar=false", "--config.train.tensorboard=false",
                 "--config.train.async_checkpoint=false", "--config.train.peak_flops=1e11"]


def test_mor_token_run_logs_depths_and_resumes_exactly(tmp_path):
  """A token-choice MoR run with loss-free depth balancing: the depth histogram is in the
  metrics, the bias is checkpointed, and a crash after step 3 resumes bit-identically."""
  import shutil  # pylint: disable=g-import-not-at-top
  from moejax.config import load_config  # pylint: disable=g-import-not-at-top
  from moejax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from moejax.train.loop import abstract_train_state, train  # pylint: disable=g-import-not-at-top
  from moejax.train.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  cfg = load_config("configs/recursion/mor_token.py:runlocal",
                    RUN_OVERRIDES + ["--config.model.recursion.balance=bias",
                                     "--config.model.recursion.bias_update_rate=0.01"])

  def final():
    ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    payload, _, meta = ck.restore_latest(abstract_train_state(cfg, 257))
    ck.close()
    return payload, int(meta["step"])

  summary = train(cfg, str(tmp_path))
  rows = [r for r in read_metrics(str(tmp_path)) if r["split"] == "train"]
  hist = rows[-1]["mor/depth_hist"]
  assert len(hist) == 4 and sum(hist) == pytest.approx(1.0, abs=1e-5)
  assert len(rows[-1]["mor/depth_load"]) == 3 and "mor/balance_loss" not in rows[-1]
  assert summary["final_val_bpb"] > 0
  ref, step = final()
  bias = np.asarray(ref["model_state"]["mor_bias"]["recursion"]["bias"])
  assert step == 6 and np.abs(bias).max() > 0
  shutil.rmtree(tmp_path / "checkpoints" / "6")
  train(cfg, str(tmp_path))
  again, step = final()
  assert step == 6
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mor_expert_train_step_reports_router_losses():
  """The train step adds the router's BCE to the loss and the loop's metrics show it."""
  from moejax.config import load_config  # pylint: disable=g-import-not-at-top
  from moejax.train import steps  # pylint: disable=g-import-not-at-top
  from moejax.train.loop import build_model, mor_metrics  # pylint: disable=g-import-not-at-top
  cfg = load_config("configs/recursion/mor_expert.py:runlocal")
  _, mc = build_model(cfg, 257)
  model = LM(mc, deterministic=False)
  state = steps.TrainState.create(draw_params(model, router_std=1.0), optax.sgd(1e-3),
                                  jax.random.PRNGKey(0))
  x = jax.random.randint(jax.random.PRNGKey(1), (8, 32), 0, 257)
  _, metrics = jax.jit(steps.make_train_step(model))(state, {"inputs": x, "targets": x})
  row = mor_metrics(metrics)
  assert row["mor/router_bce_loss"] > 0
  assert row["aux_loss"] == pytest.approx(row["mor/router_bce_loss"], rel=1e-4)
  np.testing.assert_allclose(row["mor/active_fraction"], [1.0, 0.67, 0.33], atol=1 / 32)
  assert len(row["mor/depth_hist"]) == 4
  full = load_config("configs/recursion/cycle.py:runlocal")
  full_mc = LMConfig.from_config(full.model, seq_len=full.data.seq_len, vocab_size=257)
  want = flops.account(full_mc, full.data.seq_len).forward_flops_per_token
  # capacities (1, .67, .33) of the 3 loops: the accounted compute is about 2/3 of it
  assert flops.account(mc, cfg.data.seq_len).forward_flops_per_token < 0.8 * want


def test_full_compacted_cache_makes_tokens_exit_never_attend_to_missing_keys():
  """Loop 1's compacted cache holds ceil(0.125 * 16) = 2 tokens. A router that sends every
  token on: the first two keep depth 2, the other four exit at loop 1 (counted as
  overflow) instead of attending to keys that were never stored."""
  cfg = model_cfg(num_layers=2, strategy="cycle", num_loops=2, router="expert",
                  capacities=(1.0, 0.5), kv_cache_fractions=(1.0, 0.125))
  params = draw_params(LM(cfg))
  params["recursion"]["router"] = jnp.zeros_like(params["recursion"]["router"])
  params["recursion"]["router_bias"] = jnp.full_like(params["recursion"]["router_bias"], 5.0)
  prompt = tokens(b=1, t=6)
  from moejax.generate import init_cache  # pylint: disable=g-import-not-at-top
  dec = LM(dataclasses.replace(cfg, max_seq_len=T), decode=True)
  logits, side = dec.apply({"params": params, "cache": init_cache(dec, 1)}, prompt,
                           mutable=["cache"])
  rec = side["cache"]["recursion"]
  assert int(rec["depth_count_1"][0]) == 2 and int(rec["overflow_1"][0]) == 4
  assert int(rec["shared_0"]["attn"]["index_1"][0]) == 2
  assert int(rec["shared_0"]["attn"]["index"][0]) == 6
  full = LM(dataclasses.replace(cfg, max_seq_len=T)).apply({"params": params}, prompt)
  np.testing.assert_allclose(logits[:, :2], full[:, :2], atol=1e-4)  # room for these two
  assert np.abs(logits[:, 2:] - full[:, 2:]).max() > 1e-3  # the others stopped at depth 1
