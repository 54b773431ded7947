"""Untied -> relaxed recursive conversion (moejax/recursion/relaxed.py).

Tiny dense models (d_model 32, 2 heads, 1 kv head, head_dim 16, d_ff 64, vocab 64,
T 16) with a large init_std so logits are O(1) and the tolerances mean something.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import base_config, validate
from moejax.models.lm import LM, LMConfig, init_params
from moejax.recursion import relaxed

T = 16
V = 64
FULL_RANK = 64  # >= min(fan_in, fan_out) of every projection at these dims


def make_cfg(num_layers: int = 4, strategy: str = "none", loops: int = 1, rank: int = 0,
             unshared: bool = False, scan: bool = True, tie: bool = True,
             router: str = "none", **model_kw) -> LMConfig:
  """An LMConfig through base_config + validate, as an experiment would build it."""
  c = base_config()
  m = c.model
  m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.d_ff = 32, 2, 1, 16, 64
  m.num_layers, m.scan_layers, m.tie_embeddings, m.init_std = num_layers, scan, tie, 0.25
  for k, v in model_kw.items():
    m[k] = v
  r = m.recursion
  r.strategy, r.num_loops, r.lora_rank, r.unshared_norms, r.router = (
      strategy, loops, rank, unshared, router)
  validate(c)
  return LMConfig.from_config(m, seq_len=T, vocab_size=V)


def param_spec(cfg: LMConfig):
  """Unboxed parameter shapes/dtypes of LM(cfg), without running (or compiling) init."""
  return jax.eval_shape(lambda: nn.unbox(init_params(LM(cfg), jax.random.PRNGKey(0))))


@functools.lru_cache(maxsize=None)
def untied(num_layers: int = 4, scan: bool = True, tie: bool = True):
  """An untied model with random weights and random (not all-ones) norm scales, so every
  layer differs (numpy-filled: an eager LM init costs seconds)."""
  cfg = make_cfg(num_layers, scan=scan, tie=tie)
  rng = np.random.default_rng(num_layers + 10 * scan + 100 * tie)

  def fill(path, spec):
    name = path[-1].key
    if name == "scale":
      x = 1.0 + 0.2 * rng.standard_normal(spec.shape)
    else:
      x = (cfg.out_std if name in ("o", "down") else cfg.init_std) * rng.standard_normal(
          spec.shape)
    return jnp.asarray(x, spec.dtype)

  return cfg, jax.tree_util.tree_map_with_path(fill, param_spec(cfg))


@functools.lru_cache(maxsize=None)
def forward(cfg: LMConfig):
  return jax.jit(lambda p, t: LM(cfg).apply({"params": p}, t))


def tokens() -> jax.Array:
  return jax.random.randint(jax.random.PRNGKey(2), (2, T), 0, V)


def max_logit_err(rec_cfg: LMConfig, init: str, num_layers: int = 4, scan: bool = True,
                  tie: bool = True) -> float:
  ucfg, uparams = untied(num_layers, scan, tie)
  params = relaxed.convert(uparams, ucfg, rec_cfg, init)
  want = forward(ucfg)(uparams, tokens())
  got = forward(rec_cfg)(params, tokens())
  assert float(jnp.std(want)) > 0.3  # logits are O(1), not a near-zero signal
  return float(jnp.max(jnp.abs(got - want)))


def layer(params, i: int, cfg: LMConfig, path: tuple[str, ...]) -> np.ndarray:
  if cfg.scan_layers:
    node = params["layers"]
  else:
    node = params[f"layer_{i}"]
  for k in path:
    node = node[k]
  return np.asarray(node[i] if cfg.scan_layers else node)


def get(params, *path: str) -> np.ndarray:
  for k in path:
    params = params[k]
  return np.asarray(params)


# ---------------------------------------------------------------- exact reproduction

@pytest.mark.parametrize("init", relaxed.INITS)
@pytest.mark.parametrize("strategy,num_layers", [("cycle", 4), ("middle_cycle", 6)])
def test_full_rank_reproduces_untied_logits(strategy, num_layers, init):
  rec = make_cfg(num_layers, strategy, 2, FULL_RANK, unshared=True)
  assert max_logit_err(rec, init, num_layers) < 1e-4


@pytest.mark.parametrize("strategy", ["sequence", "middle_sequence"])
def test_full_rank_reproduces_sequence_strategies(strategy):
  rec = make_cfg(4, strategy, 2, FULL_RANK, unshared=True)
  assert max_logit_err(rec, "stepwise") < 1e-4


def test_full_rank_from_unrolled_untied_model_with_unembed():
  rec = make_cfg(6, "middle_cycle", 2, FULL_RANK, unshared=True, scan=False, tie=False)
  assert max_logit_err(rec, "average", 6, scan=False, tie=False) < 1e-4


def test_lora_alpha_scale_is_divided_out():
  rec = make_cfg(4, "cycle", 2, FULL_RANK, unshared=True)
  rec = dataclasses.replace(rec, recursion=dataclasses.replace(rec.recursion, lora_alpha=16.0))
  assert rec.recursion.lora_scale == 0.25
  assert max_logit_err(rec, "stepwise") < 1e-4


# ---------------------------------------------------------------- layer choice, no LoRA

@pytest.mark.parametrize("strategy,init,want", [
    ("cycle", "stepwise", [[0], [2]]),  # every R-th layer
    ("cycle", "lower", [[0], [1]]),
    ("cycle", "average", [[0, 2], [1, 3]]),  # the tied layers
    ("sequence", "stepwise", [[0], [2]]),  # the first of each tied group
    ("sequence", "average", [[0, 1], [2, 3]]),
])
def test_rank0_shared_weights_are_the_chosen_layers(strategy, init, want):
  ucfg, uparams = untied()
  rec = make_cfg(4, strategy, 2)
  params = relaxed.convert(uparams, ucfg, rec, init)
  for u, src in enumerate(want):
    slot = params["recursion"][f"shared_{u}"]
    assert not any("lora" in k for k in list(slot["attn"]) + list(slot["ffn"]))
    for path in relaxed.NORMS + tuple(relaxed.PROJECTIONS):
      expect = np.mean([layer(uparams, i, ucfg, path).astype(np.float64) for i in src], 0)
      if len(src) == 1:
        np.testing.assert_array_equal(get(slot, *path), layer(uparams, src[0], ucfg, path))
      else:
        np.testing.assert_allclose(get(slot, *path), expect, rtol=1e-6, atol=1e-7)
  for path in (("embed", "embedding"), ("final_norm", "scale")):
    np.testing.assert_array_equal(get(params, *path), get(uparams, *path))


def test_middle_ends_are_copied_and_unshared_norms_follow_the_schedule():
  ucfg, uparams = untied(6)
  rec = make_cfg(6, "middle_cycle", 2, 4, unshared=True)
  params = relaxed.convert(uparams, ucfg, rec, "lower")["recursion"]
  for name, i in (("first_layer", 0), ("last_layer", 5)):
    for path in relaxed.NORMS + tuple(relaxed.PROJECTIONS):
      np.testing.assert_array_equal(get(params[name], *path), layer(uparams, i, ucfg, path))
  # F A B A B L: shared_0 replaces layers 1 (loop 0) and 3 (loop 1), shared_1 2 and 4.
  for u, per_loop in ((0, (1, 3)), (1, (2, 4))):
    for path in relaxed.NORMS:
      scale_RD = get(params[f"shared_{u}"], *path)
      assert scale_RD.shape == (2, 32)
      for r, i in enumerate(per_loop):
        np.testing.assert_array_equal(scale_RD[r], layer(uparams, i, ucfg, path))


# ---------------------------------------------------------------- rank sweep

def with_decaying_layer_diffs(cfg: LMConfig, params) -> dict:
  """Scanned untied params whose layers differ from layer 0 by a full-rank difference with
  singular values 2^-j (as between trained layers; random layers differ by a flat spectrum,
  where a few LoRA ranks do not help), of the same norm as the weight."""
  rng = np.random.default_rng(5)
  layers = {"attn": dict(params["layers"]["attn"]), "ffn": dict(params["layers"]["ffn"])}
  for (blk, name), n_in in relaxed.PROJECTIONS.items():
    w_L = np.asarray(layers[blk][name], np.float64)
    shape = w_L.shape[1:]
    m, n = int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:]))
    k = min(m, n)
    base_MN = w_L[0].reshape(m, n)
    out = []
    for _ in range(cfg.num_layers):
      u_MK, _ = np.linalg.qr(rng.standard_normal((m, k)))
      v_NK, _ = np.linalg.qr(rng.standard_normal((n, k)))
      diff_MN = (u_MK * 0.5 ** np.arange(k)) @ v_NK.T
      diff_MN *= np.linalg.norm(base_MN) / np.linalg.norm(diff_MN)
      out.append((base_MN + diff_MN).reshape(shape))
    layers[blk][name] = jnp.asarray(np.stack(out), jnp.float32)
  return {**params, "layers": {**params["layers"], **layers}}


def test_logit_error_decreases_with_rank():
  ucfg, uparams = untied()
  uparams = with_decaying_layer_diffs(ucfg, uparams)
  want = forward(ucfg)(uparams, tokens())
  rms = []
  for rank in (2, 8, FULL_RANK):
    rec = make_cfg(4, "cycle", 2, rank, unshared=True)
    got = forward(rec)(relaxed.convert(uparams, ucfg, rec, "stepwise"), tokens())
    rms.append(float(jnp.sqrt(jnp.mean((got - want) ** 2))))
  assert rms[0] > 0.5 and rms[0] > 3 * rms[1] and rms[1] > 1e3 * rms[2]
  assert rms[2] < 1e-5


def test_lora_residual_decreases_with_rank():
  ucfg, uparams = untied()
  rec = make_cfg(4, "cycle", 2, 8, unshared=True)
  res = {k: relaxed.lora_residual(uparams, ucfg, rec, "average", k) for k in (0, 2, 8, 32)}
  assert set(res[0]) == {"attn/q", "attn/k", "attn/v", "attn/o", "ffn/gate", "ffn/up",
                         "ffn/down"}
  for proj in res[0]:
    assert res[0][proj] > res[2][proj] > res[8][proj] > res[32][proj]
    assert res[32][proj] < 1e-6  # 32 = min(fan_in, fan_out) everywhere here
  # rank 0: ||W_orig - mean of its tied layers|| / ||W_orig||, over slots and loops
  w = [layer(uparams, i, ucfg, ("ffn", "down")).astype(np.float64) for i in range(4)]
  want = np.mean([np.linalg.norm(w[i] - (w[i % 2] + w[i % 2 + 2]) / 2) / np.linalg.norm(w[i])
                  for i in range(4)])
  np.testing.assert_allclose(res[0]["ffn/down"], want, rtol=1e-6)
  assert relaxed.lora_residual(uparams, ucfg, rec, "average") == res[8]


# ---------------------------------------------------------------- tree, dtypes, extras

def assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype


@pytest.mark.parametrize("kw", [
    dict(num_layers=4, strategy="cycle", rank=4),
    dict(num_layers=6, strategy="middle_sequence", rank=4, unshared=True,
         param_dtype="bfloat16"),
    dict(num_layers=4, strategy="sequence", rank=0, unshared=True),
])
def test_tree_matches_recursive_init(kw):
  ucfg, uparams = untied(kw["num_layers"])
  rec = make_cfg(loops=2, **kw)
  params = relaxed.convert(uparams, ucfg, rec)
  assert type(params) is dict
  assert_same_tree(params, param_spec(rec))


def test_router_params_come_from_template_or_init():
  ucfg, uparams = untied(2)
  rec = make_cfg(2, "cycle", 2, router="expert")  # small: an init compile costs seconds
  spec = param_spec(rec)
  template = jax.tree.map(lambda x: jnp.full(x.shape, 3.0, x.dtype), spec)
  from_template = relaxed.convert(uparams, ucfg, rec, template=template)
  default = relaxed.convert(uparams, ucfg, rec)  # one compiled init, PRNGKey(0)
  seeded = relaxed.convert(uparams, ucfg, rec, rng=jax.random.PRNGKey(7))
  for params in (from_template, default, seeded):
    assert_same_tree(params, spec)
    # converted leaves never come from the template / init
    np.testing.assert_array_equal(params["recursion"]["shared_0"]["attn"]["q"],
                                  layer(uparams, 0, ucfg, ("attn", "q")))
  for name in ("router", "router_bias"):
    np.testing.assert_array_equal(from_template["recursion"][name], 3.0)
  router_RD = np.asarray(default["recursion"]["router"])
  np.testing.assert_array_equal(default["recursion"]["router_bias"], 0.0)
  assert 0.5 * rec.init_std < router_RD.std() < 2 * rec.init_std  # normal(init_std) init
  assert not np.array_equal(router_RD, seeded["recursion"]["router"])
  again = relaxed.convert(uparams, ucfg, rec, rng=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(router_RD, again["recursion"]["router"])


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("field,kw", [
    ("d_model", dict(d_model=48)),
    ("d_ff", dict(d_ff=128)),
    ("num_kv_heads", dict(num_kv_heads=2)),
    ("head_dim", dict(head_dim=8)),
    ("tie_embeddings", dict(tie=False)),
])
def test_mismatched_dims_name_the_field(field, kw):
  ucfg, uparams = untied()
  rec = make_cfg(4, "cycle", 2, **kw)
  with pytest.raises(ValueError, match=field):
    relaxed.convert(uparams, ucfg, rec)


def test_other_errors():
  ucfg, uparams = untied()
  with pytest.raises(ValueError, match="num_layers"):
    relaxed.convert(uparams, ucfg, make_cfg(6, "cycle", 2))
  rec = make_cfg(4, "cycle", 2)
  with pytest.raises(ValueError, match="allowed.*stepwise"):
    relaxed.convert(uparams, ucfg, rec, "middle")
  with pytest.raises(ValueError, match="recursion"):
    relaxed.convert(uparams, ucfg, ucfg)
  c = base_config()
  c.model.moe.num_experts = 4
  moe_cfg = dataclasses.replace(ucfg, moe=LMConfig.from_config(c.model, seq_len=T,
                                                               vocab_size=V).moe)
  with pytest.raises(ValueError, match="dense FFNs"):
    relaxed.convert(uparams, moe_cfg, rec)
  unrolled_cfg, _ = untied(4, scan=False)
  with pytest.raises(ValueError, match="untied_params"):  # params of another layout
    relaxed.convert(uparams, unrolled_cfg, rec)
