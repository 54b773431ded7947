"""The decoder LM (moejax/models/lm.py), its KV cache (moejax/generate.py) and RoPE.

Tiny configs (d_model <= 64, <= 2 layers, T = 16) with a large init_std so logits are
O(1) and the tolerances below mean something.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax import flops, parallel
from moejax.generate import generate, init_cache
from moejax.layers.common import rope
from moejax.models.lm import LM, LMConfig, init_params, param_count

T = 16
V = 64


def make_cfg(**kw) -> LMConfig:
  base = dict(vocab_size=V, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
              d_ff=64, max_seq_len=T, init_std=0.25)
  base.update(kw)
  return LMConfig(**base)


def param_shapes(model: LM):
  """Unboxed parameter shapes from `init_params`, without running (or compiling) it."""
  return jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.PRNGKey(0))))


def make(cfg: LMConfig, seed: int = 0):
  """The model and random params of init_params' structure, drawn with numpy.

  Compiling `init` costs seconds per config on this CPU (threefry per parameter), so
  most tests draw N(0, init_std) weights and 1 +- 0.1 norm scales directly;
  test_init_params_statistics_and_hand_count covers the real initialiser.
  """
  model = LM(cfg)
  rng = np.random.default_rng(seed)

  def draw(path, s):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      value = 1.0 + 0.1 * rng.standard_normal(s.shape)
    else:
      value = cfg.init_std * rng.standard_normal(s.shape)
    return jnp.asarray(value, s.dtype)

  return model, jax.tree_util.tree_map_with_path(draw, param_shapes(model))


@functools.lru_cache(maxsize=None)
def forward_fn(model: LM):
  """Jitted forward, one per model, so tests with equal configs share compilations."""
  return jax.jit(lambda p, x, pos: model.apply({"params": p}, x, pos))


def tokens(seed: int, b: int = 2, t: int = T, v: int = V):
  return jnp.asarray(np.random.default_rng(seed).integers(0, v, (b, t)), jnp.int32)


def positions(b: int, t: int, offset: int = 0):
  return jnp.broadcast_to(jnp.arange(offset, offset + t, dtype=jnp.int32), (b, t))


def random_cfg(seed: int) -> LMConfig:
  rng = np.random.default_rng(seed)
  h = int(rng.choice([2, 4, 6]))
  divisors = [k for k in range(1, h + 1) if h % k == 0]
  return make_cfg(num_heads=h, num_kv_heads=int(rng.choice(divisors)),
                  head_dim=int(rng.choice([4, 8, 16])), d_model=int(rng.choice([16, 32, 48])),
                  d_ff=int(rng.choice([32, 64])), num_layers=int(rng.choice([1, 2])),
                  scan_layers=bool(rng.integers(2)), tie_embeddings=bool(rng.integers(2)))


# ------------------------------------------------------------------ causality

CAUSAL_CFGS = {
    "mqa_kv1_scan": make_cfg(num_kv_heads=1, scan_layers=True),
    "mha_kv4_unrolled_softcap_remat": make_cfg(num_kv_heads=4, scan_layers=False,
                                               logits_soft_cap=5.0, remat="dots"),
    "random_2": random_cfg(2),  # 6 heads / 2 kv heads, unrolled, untied
    "random_7": random_cfg(7),  # 6 heads / 3 kv heads, scanned, untied
}


@pytest.mark.parametrize("name", list(CAUSAL_CFGS))
def test_causality(name):
  cfg = CAUSAL_CFGS[name]
  model, params = make(cfg, seed=3)
  rng = np.random.default_rng(0)
  base = rng.integers(0, cfg.vocab_size, T)
  cuts = [0, 3, 7, 12, 14]
  rows = [base]
  for t in cuts:
    row = base.copy()
    # every token after t changes (to a different token)
    row[t + 1:] = (row[t + 1:] + rng.integers(1, cfg.vocab_size, T - t - 1)) % cfg.vocab_size
    assert (row[t + 1:] != base[t + 1:]).all()
    rows.append(row)
  x = jnp.asarray(np.stack(rows), jnp.int32)
  logits = np.asarray(forward_fn(model)(params, x, positions(len(rows), T)))
  chex.assert_shape(logits, (len(rows), T, cfg.vocab_size))
  assert logits.dtype == np.float32
  assert np.abs(logits).max() > 0.5  # the comparisons below are not between tiny numbers
  for i, t in enumerate(cuts, start=1):
    np.testing.assert_allclose(logits[i, :t + 1], logits[0, :t + 1], rtol=0, atol=1e-5,
                               err_msg=f"{name}: future tokens changed logits at <= {t}")
    # and the test is sensitive: the first changed position does change
    assert np.abs(logits[i, t + 1] - logits[0, t + 1]).max() > 1e-3


def test_logits_depend_only_on_relative_positions():
  model, params = make(CAUSAL_CFGS["mqa_kv1_scan"], seed=4)
  x = tokens(5, b=6)  # the causality test's shapes: same compiled forward
  f = forward_fn(model)
  ref = f(params, x, positions(6, T))
  assert float(jnp.abs(ref).max()) > 0.5
  shifted = f(params, x, positions(6, T, offset=37))
  chex.assert_trees_all_close(shifted, ref, atol=1e-4, rtol=1e-4)
  # but positions are used: swapping two positions changes the logits
  perm = jnp.asarray(np.r_[1, 0, 2:T])
  swapped = f(params, x, positions(6, T)[:, perm])
  assert float(jnp.abs(swapped - ref).max()) > 1e-3


# ------------------------------------------------------------------ KV cache

@pytest.mark.parametrize("scan,kv,prefill", [(True, 2, (5, 9)), (False, 1, (7,))],
                         ids=["scan_gqa_two_prefills", "unrolled_mqa"])
def test_kv_cache_decoding_matches_full_forward(scan, kv, prefill):
  cfg = make_cfg(scan_layers=scan, num_kv_heads=kv)
  model, params = make(cfg, seed=1)
  x = tokens(2, b=2)
  full = forward_fn(model)(params, x, positions(2, T))

  dec = LM(cfg, decode=True)
  step = jax.jit(lambda p, c, x, pos: dec.apply({"params": p, "cache": c}, x, pos,
                                                mutable=["cache"]))
  cache = init_cache(dec, 2)
  for leaf in jax.tree.leaves(cache):
    assert not leaf.any()
  # prefill (in one or two multi-token calls), then one token per call
  bounds = (0,) + prefill + tuple(range(prefill[-1] + 1, T + 1))
  chunks = list(zip(bounds[:-1], bounds[1:]))
  p0 = prefill[0]
  outs = []
  for a, b in chunks:
    logits, mut = step(params, cache, x[:, a:b], positions(2, b - a, offset=a))
    cache = mut["cache"]
    outs.append(logits)
    if a == 0:
      flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(cache)}
      ks = [np.asarray(v) for k, v in flat.items() if k.endswith("['k']")]
      if scan:  # one stacked cache [L, B, S, K, Dh]
        assert len(ks) == 1 and ks[0].shape == (cfg.num_layers, 2, T, kv, cfg.head_dim)
      else:  # one [B, S, K, Dh] cache per layer
        assert len(ks) == cfg.num_layers and ks[0].shape == (2, T, kv, cfg.head_dim)
      for k in ks:  # the prefilled slots are written, the rest still zero
        assert (np.abs(k[..., :p0, :, :]).sum(axis=(-1, -2)) > 0).all()
        assert not k[..., p0:, :, :].any()
  indices = [v for k, v in jax.tree_util.tree_leaves_with_path(cache)
             if jax.tree_util.keystr(k).endswith("['index']")]
  assert indices and all((np.asarray(i) == T).all() for i in indices)
  decoded = jnp.concatenate(outs, axis=1)
  chex.assert_shape(decoded, (2, T, V))
  chex.assert_trees_all_close(decoded, full, atol=1e-4, rtol=1e-4)


def test_generate_greedy_logits_equal_full_forward():
  cfg = make_cfg(num_kv_heads=2)
  model, params = make(cfg, seed=6)
  p, n = 5, 11
  prompt = tokens(8, b=3, t=p)
  out, logits = generate(cfg, params, prompt, n, return_logits=True)
  chex.assert_shape(out, (3, p + n))
  chex.assert_shape(logits, (3, n, V))
  assert out.dtype == jnp.int32 and logits.dtype == jnp.float32
  np.testing.assert_array_equal(out[:, :p], prompt)
  assert len(set(np.asarray(out[:, p:]).ravel().tolist())) > 2  # not one repeated token
  full = jax.jit(lambda p_, x: model.apply({"params": p_}, x))(params, out)
  # logits at position t predict token t+1: the generated ones are at P-1 .. P+N-2
  chex.assert_trees_all_close(logits, full[:, p - 1:p + n - 1], atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(out[:, p:], jnp.argmax(logits, -1))
  # greedy w.r.t. the full forward too (up to near-ties)
  picked = jnp.take_along_axis(full[:, p - 1:p + n - 1], out[:, p:, None], -1)[..., 0]
  assert bool((picked >= full[:, p - 1:p + n - 1].max(-1) - 1e-4).all())
  # top_k=1 sampling is greedy at any temperature (and returns just the tokens)
  sampled = generate(cfg, params, prompt, n, temperature=1.5, top_k=1,
                     rng=jax.random.PRNGKey(9))
  assert isinstance(sampled, jax.Array)
  np.testing.assert_array_equal(sampled, out)


# ------------------------------------------------------------- scan vs unrolled

def test_scan_and_unrolled_layers_give_same_logits():
  cfg = make_cfg()
  model, params = make(cfg, seed=2)
  unrolled_cfg = dataclasses.replace(cfg, scan_layers=False)
  unrolled = LM(unrolled_cfg)
  per_layer = {k: v for k, v in params.items() if k != "layers"}
  for i in range(cfg.num_layers):
    per_layer[f"layer_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["layers"])
  chex.assert_trees_all_equal_shapes_and_dtypes(per_layer, param_shapes(unrolled))
  x = tokens(3)
  a = forward_fn(model)(params, x, positions(2, T))
  b = forward_fn(unrolled)(per_layer, x, positions(2, T))
  assert float(jnp.abs(a).max()) > 0.5
  chex.assert_trees_all_close(a, b, atol=1e-5, rtol=1e-5)
  # the layers really are different weights (the mapping is not trivially symmetric)
  assert float(jnp.abs(per_layer["layer_0"]["ffn"]["up"]
                       - per_layer["layer_1"]["ffn"]["up"]).max()) > 0


# ------------------------------------------------------------------ remat

def _value_and_grad(cfg, x):
  model = LM(cfg)

  def loss_fn(p):
    logits = model.apply({"params": p}, x[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

  return jax.value_and_grad(loss_fn)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_remat_policies_give_identical_loss_and_grads(scan):
  cfg = make_cfg(scan_layers=scan, num_layers=2 if scan else 1)
  _, params = make(cfg, seed=5)
  x = tokens(6, t=T + 1)
  policies = ["none", "full", "dots", "dots_no_batch"] if scan else ["none", "full"]
  fns = {r: _value_and_grad(dataclasses.replace(cfg, remat=r), x) for r in policies}
  for r, fn in fns.items():  # the policy is really applied (or not)
    assert ("remat" in str(jax.make_jaxpr(fn)(params))) == (r != "none"), r
  # one compilation for all policies (compiling each alone costs seconds here)
  results = jax.jit(lambda p: {r: fn(p) for r, fn in fns.items()})(params)
  loss0, grads0 = results["none"]
  assert float(loss0) > 1.0
  assert sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grads0)) > 1e-6
  for r in policies[1:]:
    loss, grads = results[r]
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6, atol=0, err_msg=r)
    chex.assert_trees_all_close(grads, grads0, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------- params and accounting

def test_tied_vs_untied_embedding_param_counts():
  tied = LM(make_cfg(tie_embeddings=True))
  untied = LM(make_cfg(tie_embeddings=False))
  pt = jax.eval_shape(lambda: init_params(tied, jax.random.PRNGKey(0)))
  pu = jax.eval_shape(lambda: init_params(untied, jax.random.PRNGKey(0)))
  assert "unembed" not in pt and "unembed" in pu
  assert pu["unembed"].names == ("embed", "vocab")
  assert pu["unembed"].value.shape == (32, V)
  assert param_count(pu) - param_count(pt) == V * 32
  a_t, a_u = flops.account(tied.cfg, T), flops.account(untied.cfg, T)
  assert a_t.embedding_params == V * 32 and a_u.embedding_params == 2 * V * 32
  # the unembedding matmul is counted once either way
  assert a_t.forward_flops_per_token == a_u.forward_flops_per_token


@pytest.mark.parametrize("cfg", [
    make_cfg(),
    make_cfg(num_kv_heads=1, tie_embeddings=False, scan_layers=False),
    make_cfg(vocab_size=264, d_model=48, num_layers=3, num_heads=6, num_kv_heads=3,
             head_dim=16, d_ff=96),
    make_cfg(num_heads=2, num_kv_heads=2, head_dim=32, num_layers=1, tie_embeddings=False),
    random_cfg(3),
], ids=["base", "mqa_untied_unrolled", "gqa_3layers", "wide_heads_1layer", "random_3"])
def test_param_count_equals_accounting(cfg):
  model = LM(cfg)
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
  acct = flops.account(cfg, cfg.max_seq_len)
  assert param_count(shapes) == acct.total_params
  assert acct.active_params == acct.total_params  # dense model


def test_init_params_statistics_and_hand_count():
  cfg = make_cfg(d_model=64, d_ff=128, num_heads=4, num_kv_heads=2, head_dim=16,
                 vocab_size=256, init_std=0.02)
  boxed = jax.jit(lambda k: init_params(LM(cfg), k))(jax.random.PRNGKey(0))
  per_layer = 64 * 16 * (4 + 2 + 2 + 4) + 3 * 64 * 128 + 2 * 64
  assert param_count(boxed) == 256 * 64 + 2 * per_layer + 64 == 90432
  p = nn.unbox(boxed)
  lay = p["layers"]
  out_std = 0.02 / np.sqrt(2 * cfg.num_layers)
  assert cfg.out_std == pytest.approx(out_std)
  for w, std in [(p["embed"]["embedding"], 0.02), (lay["attn"]["q"], 0.02),
                 (lay["ffn"]["gate"], 0.02), (lay["attn"]["o"], out_std),
                 (lay["ffn"]["down"], out_std)]:
    assert float(jnp.mean(w)) == pytest.approx(0.0, abs=0.1 * std)
    assert float(jnp.std(w)) == pytest.approx(std, rel=0.1)
  for scale in (p["final_norm"]["scale"], lay["attn_norm"]["scale"], lay["ffn_norm"]["scale"]):
    np.testing.assert_array_equal(scale, 1.0)
  # each scanned layer gets its own random draw
  assert float(jnp.abs(lay["attn"]["q"][0] - lay["attn"]["q"][1]).max()) > 0.01


def _boxed_leaves(params):
  return jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_every_param_is_logically_partitioned(scan):
  cfg = make_cfg(scan_layers=scan, tie_embeddings=False)
  params = jax.eval_shape(lambda: init_params(LM(cfg), jax.random.PRNGKey(0)))
  leaves = _boxed_leaves(params)
  assert len(leaves) == 2 + 9 * (1 if scan else cfg.num_layers) + 1  # embed/unembed/norms
  rule_names = {name for name, _ in parallel.RULES}
  for path, leaf in leaves:
    key = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), key
    assert len(leaf.names) == leaf.value.ndim, (key, leaf.names, leaf.value.shape)
    assert set(leaf.names) <= rule_names, (key, leaf.names)  # every name has a sharding rule
    if scan and key.startswith("['layers']"):
      assert leaf.names[0] == "layers" and leaf.value.shape[0] == cfg.num_layers, key
    else:
      assert "layers" not in leaf.names, key
  scanned = [p for p, _ in leaves if jax.tree_util.keystr(p).startswith("['layers']")]
  assert bool(scanned) == scan


# ------------------------------------------------------------------ dtypes

def test_bfloat16_compute_runs_and_is_close_to_float32():
  cfg = make_cfg()
  model, params = make(cfg, seed=7)
  bf_model = LM(dataclasses.replace(cfg, compute_dtype="bfloat16"))
  # the compute dtype does not change the params (still float32)
  chex.assert_trees_all_equal_shapes_and_dtypes(param_shapes(bf_model), params)
  x = tokens(8)
  ref = forward_fn(model)(params, x, positions(2, T))
  out = forward_fn(bf_model)(params, x, positions(2, T))
  assert out.dtype == jnp.float32
  chex.assert_tree_all_finite(out)
  scale = float(jnp.abs(ref).max())
  err = float(jnp.abs(out - ref).max())
  assert 0 < err < 0.05 * scale, (err, scale)  # close, and really computed in bf16
  jaxpr = str(jax.make_jaxpr(lambda p: bf_model.apply({"params": p}, x))(params))
  assert "bf16" in jaxpr


def test_bfloat16_params():
  cfg = make_cfg(param_dtype="bfloat16", tie_embeddings=False)
  model, params = make(cfg)
  for leaf in jax.tree.leaves(params):
    assert leaf.dtype == jnp.bfloat16
  out = forward_fn(model)(params, tokens(9), positions(2, T))
  assert out.dtype == jnp.float32
  chex.assert_tree_all_finite(out)
  assert float(jnp.abs(out).max()) > 0.1


# ------------------------------------------------------------------ RoPE

def _rope_reference(x, pos, theta):
  """Rotate-half RoPE written with complex numbers: pair i is (x_i, x_{i + Dh/2})."""
  dh = x.shape[-1]
  z = x[..., :dh // 2] + 1j * x[..., dh // 2:]
  freq = theta ** (-np.arange(0, dh, 2) / dh)
  z = z * np.exp(1j * pos[..., None, None] * freq)
  return np.concatenate([z.real, z.imag], -1)


class RopeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_scores_depend_only_on_relative_position(self):
    n, dh, theta = 256, 16, 10000.0
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(n, 1, 2, dh)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(n, 1, 2, dh)), jnp.float32)
    m = rng.integers(0, 512, (n, 1))
    nn_ = rng.integers(0, 512, (n, 1))
    s = rng.integers(-256, 512, (n, 1))
    s = np.maximum(s, -np.minimum(m, nn_))  # keep positions >= 0

    @self.variant
    def score(q, k, pm, pn):
      return jnp.sum(rope(q, pm, theta) * rope(k, pn, theta), axis=-1)

    i32 = lambda a: jnp.asarray(a, jnp.int32)
    base = score(q, k, i32(m), i32(nn_))
    moved = score(q, k, i32(m + s), i32(nn_ + s))
    chex.assert_shape(base, (n, 1, 2))
    np.testing.assert_allclose(moved, base, atol=2e-3 * dh, rtol=0)
    # a different relative offset gives a different score
    other = score(q, k, i32(m + 1), i32(nn_))
    assert np.abs(np.asarray(other - base)).mean() > 0.1

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_complex_rotation_and_preserves_norm(self):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    pos = rng.integers(0, 100, (2, 5))
    out = self.variant(lambda x, p: rope(x, p, 500.0))(jnp.asarray(x), jnp.asarray(pos))
    chex.assert_shape(out, x.shape)
    chex.assert_type(out, jnp.float32)
    np.testing.assert_allclose(out, _rope_reference(x.astype(np.float64), pos, 500.0),
                               atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-5)
    zero = self.variant(lambda x, p: rope(x, p, 500.0))(jnp.asarray(x), jnp.zeros((2, 5), int))
    np.testing.assert_allclose(zero, x, atol=1e-7)

  def test_keeps_dtype(self):
    x = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    out = rope(x, positions(1, 4), 10000.0)
    chex.assert_type(out, jnp.bfloat16)
