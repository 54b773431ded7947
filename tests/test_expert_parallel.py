"""Expert parallelism by shard_map + all_to_all (moejax/moe/expert_parallel.py).

Reference: the `capacity` dispatch backend applied to each device's tokens on its own
(the same per-device capacity and slot-major priority), and dropless dispatch when
nothing overflows. Edge cases: all tokens to one expert, k = E, empty experts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import parallel
from moejax.config import base_config
from moejax.moe.dispatch import moe_ffn
from moejax.moe import expert_parallel as ep_lib
from moejax.moe.expert_parallel import ep_moe_ffn, ep_moe_ffn_dropless, local_capacity, ragged_plan
from moejax.moe.routing import Routing

D, F = 8, 16


def mesh_of(**sizes):
  c = base_config().mesh
  for a in parallel.AXES:
    c[a] = sizes.get(a, 1)
  return parallel.make_mesh(c)


def case(n, e, k, kind, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, D)).astype(np.float32)
  if kind == "one_expert":
    experts = np.zeros((n, k), np.int64) + np.arange(k)[None]  # everyone to experts 0..k-1
  elif kind == "k_eq_e":
    experts = np.tile(np.arange(e), (n, 1))
  elif kind == "empty_experts":  # only experts 0 and 1 get tokens
    experts = np.stack([rng.permutation(2)[:k] if k <= 2 else np.arange(k) for _ in range(n)])
  else:
    experts = np.stack([rng.permutation(e)[:k] for _ in range(n)])
  gates = rng.uniform(0.1, 1.0, (n, k)).astype(np.float32)
  w = [rng.standard_normal(s).astype(np.float32) * 0.3 for s in ((e, D, F), (e, D, F), (e, F, D))]
  return x, experts.astype(np.int32), gates, w


def reference(x, experts, gates, w, shards, cap):
  """The capacity backend on each device's tokens separately."""
  n, k = experts.shape
  nl = n // shards
  ys, drops = [], []
  for s in range(shards):
    sl = slice(s * nl, (s + 1) * nl)
    e_nk, g_nk = jnp.asarray(experts[sl]), jnp.asarray(gates[sl])
    r = Routing(jnp.tile(jnp.arange(nl), k), e_nk.T.reshape(-1), g_nk.T.reshape(-1), {}, {},
                w[0].shape[0], nl)
    y, dropped = moe_ffn(jnp.asarray(x[sl]), r, *map(jnp.asarray, w), backend="capacity",
                         capacity=cap)
    ys.append(y)
    drops.append(dropped.reshape(k, nl).T)
  return jnp.concatenate(ys), jnp.concatenate(drops)


def run_ep(mesh, x, experts, gates, w, cf, min_cap=1):
  axes = tuple(a for a in ("data", "fsdp", "expert") if mesh.shape[a] > 1)
  tok = NamedSharding(mesh, P(axes, None))
  wsh = NamedSharding(mesh, P("expert", None, None))
  args = [jax.device_put(a, tok) for a in (x, experts, gates)] + [jax.device_put(a, wsh) for a in w]

  @jax.jit
  def f(x, e, g, *w):
    return ep_moe_ffn(x, e, g, *w, mesh=mesh, capacity_factor=cf, min_capacity=min_cap)

  with jax.set_mesh(mesh):
    return f(*args), f


@pytest.mark.parametrize("sizes", [dict(data=2, expert=4),
                                   pytest.param(dict(expert=8), marks=pytest.mark.slow)],
                         ids=["dp2_ep4", "ep8"])
@pytest.mark.parametrize("kind,e,k,cf", [
    ("random", 8, 2, 1.0),       # some overflow
    ("random", 8, 2, 8.0),       # nothing dropped
    ("one_expert", 8, 1, 1.25),  # all tokens to expert 0: most dropped
    ("k_eq_e", 8, 8, 1.0),       # every token to every expert
    ("empty_experts", 8, 2, 2.0),
    ("random", 16, 4, 0.5),      # two experts per device
])
def test_all_to_all_dispatch_equals_per_device_capacity_reference(sizes, kind, e, k, cf):
  mesh = mesh_of(**sizes)
  n = 64
  x, experts, gates, w = case(n, e, k, kind)
  (y, dropped), _ = run_ep(mesh, x, experts, gates, w, cf)
  shards = 8
  cap = local_capacity(n // shards, k, e, cf, 1)
  y_ref, d_ref = reference(x, experts, gates, w, shards, cap)
  np.testing.assert_allclose(y, y_ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(dropped, d_ref)
  if kind == "one_expert":
    assert np.asarray(dropped).mean() > 0.5
  if cf >= e / k:  # room for everything: dropless dispatch
    r = Routing(jnp.tile(jnp.arange(n), k), jnp.asarray(experts).T.reshape(-1),
                jnp.asarray(gates).T.reshape(-1), {}, {}, e, n)
    y_dl, _ = moe_ffn(jnp.asarray(x), r, *map(jnp.asarray, w), backend="reference", capacity=0)
    np.testing.assert_allclose(y, y_dl, atol=1e-4, rtol=1e-4)
    assert not np.asarray(dropped).any()


def test_all_to_all_on_a_pure_expert_mesh():
  test_all_to_all_dispatch_equals_per_device_capacity_reference(dict(expert=8), "random", 8, 2,
                                                                1.0)


def test_gradients_equal_the_reference():
  mesh = mesh_of(data=2, expert=4)
  x, experts, gates, w = case(64, 8, 2, "random", seed=3)
  cap = local_capacity(8, 2, 8, 1.0, 1)

  def loss_ep(x, g, *w):
    y, _ = ep_moe_ffn(x, jnp.asarray(experts), g, *w, mesh=mesh, capacity_factor=1.0)
    return jnp.sum(jnp.sin(y))

  def loss_ref(x, g, *w):
    y, _ = reference(x, experts, g, w, 8, cap)
    return jnp.sum(jnp.sin(y))

  with jax.set_mesh(mesh):
    g_ep = jax.jit(jax.grad(loss_ep, argnums=(0, 1, 2, 3, 4)))(x, gates, *w)
  g_ref = jax.grad(loss_ref, argnums=(0, 1, 2, 3, 4))(x, gates, *w)
  for a, b in zip(g_ep, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def compiled_moe_step(overrides):
  """HLO text of the jitted MoE train step (gshard runlocal, 8 x 16 tokens) and its
  LMConfig and config, compiled from abstract inputs (nothing runs)."""
  from moejax.config import load_config  # pylint: disable=g-import-not-at-top
  from moejax.models.lm import LM  # pylint: disable=g-import-not-at-top
  from moejax.train.loop import Sharded, build_model, init_state, state_shardings  # pylint: disable=g-import-not-at-top
  from moejax.train.optimizer import make_optimizer  # pylint: disable=g-import-not-at-top
  from moejax.train.steps import make_train_step  # pylint: disable=g-import-not-at-top
  c = load_config("configs/moe/gshard_top2.py:runlocal", overrides)
  c.data.seq_len, c.data.batch_size = 16, 8
  mesh = parallel.make_mesh(c.mesh)
  rules = parallel.rules_from_config(c.mesh)
  model, mc = build_model(c, 257)
  tx, _ = make_optimizer(c.optim, 10)
  sh = state_shardings(model, tx, 0, 16, mesh, rules)
  shapes = jax.eval_shape(lambda: init_state(model, tx, 0, 16))
  abstract = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                          shapes, sh)
  bsh = parallel.batch_sharding(mesh, rules)
  batch = {k: jax.ShapeDtypeStruct((8, 16), jnp.int32, sharding=bsh)
           for k in ("inputs", "targets")}
  step = Sharded(make_train_step(LM(mc, deterministic=False)), mesh, rules,
                 in_shardings=(sh, bsh), out_shardings=(sh, None))
  return step.lower(abstract, batch).compile().as_text(), mc, c


def test_compiled_moe_step_exchanges_tokens_not_weights():
  """Expert weights [E, D, F] stay sharded: all-to-alls in the HLO, no all-gather of them."""
  hlo = {}
  for mode in ("all_to_all", "gspmd"):
    hlo[mode], mc, _ = compiled_moe_step(["mesh.data=2", "mesh.expert=4",
                                          f"mesh.expert_dispatch={mode}"])
  ep = hlo["all_to_all"]
  assert "all-to-all" in ep
  e, d, f = 8, mc.d_model, mc.moe.expert_d_ff
  full_expert_shapes = [f"[{e},{d},{f}]", f"[{e},{f},{d}]"]
  gathers = [l for l in ep.splitlines() if "all-gather" in l]
  assert not any(s in l for l in gathers for s in full_expert_shapes), gathers[:3]
  # the check can fail: plain GSPMD sharding of the same step gathers the expert weights
  gspmd_gathers = [l for l in hlo["gspmd"].splitlines() if "all-gather" in l]
  print("\n".join(gspmd_gathers[:5]))
  assert any(s in l for l in gspmd_gathers for s in full_expert_shapes)


def test_ragged_plan_offsets_match_a_simulated_exchange():
  """The offset/size arithmetic of a dropless ragged_all_to_all, checked by simulating
  the exchange with numpy (XLA:CPU cannot run the collective)."""
  rng = np.random.default_rng(0)
  ep, e, nl, k = 4, 8, 10, 2
  experts = rng.integers(0, e, (ep, nl, k))
  plan = ragged_plan(experts, e, ep)
  e_local = e // ep
  recv_buffers = [np.full((ep * nl * k,), -1) for _ in range(ep)]
  for s in range(ep):
    flat = experts[s].reshape(-1)
    order = np.argsort(flat // e_local, kind="stable")
    send_buf = np.arange(flat.size)[order] + 1000 * s  # ids of s's assignments, by dest
    for t in range(ep):
      size = plan["send_sizes"][s, t]
      src = send_buf[plan["input_offsets"][s, t]:plan["input_offsets"][s, t] + size]
      off = plan["output_offsets"][s, t]
      assert (recv_buffers[t][off:off + size] == -1).all()  # no overlap
      recv_buffers[t][off:off + size] = src
  for t in range(ep):
    got = recv_buffers[t][recv_buffers[t] >= 0]
    assert got.size == plan["recv_sizes"][t].sum()
    want = [1000 * s + i for s in range(ep)
            for i in np.flatnonzero(experts[s].reshape(-1) // e_local == t)]
    assert sorted(got.tolist()) == sorted(want)
    assert (recv_buffers[t][got.size:] == -1).all()  # packed from offset 0


def test_calculator_all_to_all_bytes_match_the_compiled_program():
  from moejax.planning import plan  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  hlo, _, c = compiled_moe_step(["mesh.data=2", "mesh.expert=4", "model.scan_layers=false",
                                 "model.moe.backend=capacity"])
  mesh = parallel.make_mesh(c.mesh)
  sizes = []  # bytes of each all-to-all's result (XLA:CPU returns a tuple of ep pieces)
  for line in hlo.splitlines():
    if " all-to-all(" not in line:
      continue
    result = line.split(" = ", 1)[1].split(" all-to-all(", 1)[0]
    sizes.append(sum(math.prod(int(v) for v in dims.split(",")) * (4 if t == "f32" else 2)
                     for t, dims in re.findall(r"(f32|bf16)\[([\d,]+)\]", result)))
  r = plan(c, dict(mesh.shape), vocab_size=257)
  assert r["moe_layers"] == 2 and len(sizes) == 4 * r["moe_layers"]
  assert all(s == r["all_to_all_buffer_bytes"] for s in sizes), (sizes, r["all_to_all_buffer_bytes"])
  assert r["traffic_bytes_per_step"]["expert_all_to_all"] == pytest.approx(sum(sizes) * 3 / 4)


# ------------------------------------------------------------------ dropless (exact) exchange


def dropless_reference(x, experts, gates, w):
  n, k = experts.shape
  r = Routing(jnp.tile(jnp.arange(n), k), jnp.asarray(experts).T.reshape(-1),
              jnp.asarray(gates).T.reshape(-1), {}, {}, w[0].shape[0], n)
  return moe_ffn(jnp.asarray(x), r, *map(jnp.asarray, w), backend="reference")[0]


def run_dropless(mesh, x, experts, gates, w, exchange="padded", grad=False):
  axes = tuple(a for a in ("data", "fsdp", "expert") if mesh.shape[a] > 1)
  tok = NamedSharding(mesh, P(axes, None))
  wsh = NamedSharding(mesh, P("expert", None, None))
  args = [jax.device_put(a, tok) for a in (x, experts, gates)] + [jax.device_put(a, wsh) for a in w]

  def f(x, e, g, *w):
    return ep_moe_ffn_dropless(x, e, g, *w, mesh=mesh, exchange=exchange)

  if grad:  # d/d(x, gates, weights) of a fixed random projection of the output
    proj = np.random.default_rng(9).standard_normal((x.shape[0], D)).astype(np.float32)
    f = jax.grad(lambda x, e, g, *w, f=f: jnp.sum(f(x, e, g, *w)[0] * proj),
                 argnums=(0, 2, 3, 4, 5))
  with jax.set_mesh(mesh):
    return jax.jit(f)(*args), jax.jit(f).lower(*args)


@pytest.mark.parametrize("sizes,kind,e,k", [
    (dict(data=2, expert=4), "random", 8, 2), (dict(data=2, expert=4), "one_expert", 8, 2),
    (dict(data=2, expert=4), "k_eq_e", 8, 8), (dict(expert=8), "empty_experts", 8, 2),
    (dict(expert=8), "random", 16, 3)])
def test_dropless_exchange_equals_single_device_dropless(sizes, kind, e, k):
  """Every assignment is computed, wherever its expert lives, however skewed the routing."""
  x, experts, gates, w = case(32, e, k, kind, seed=e + k)
  (y, dropped), _ = run_dropless(mesh_of(**sizes), x, experts, gates, w)
  np.testing.assert_allclose(np.asarray(y), np.asarray(dropless_reference(x, experts, gates, w)),
                             atol=2e-5, rtol=1e-5)
  assert not np.asarray(dropped).any()


def test_dropless_exchange_gradients_equal_the_reference():
  x, experts, gates, w = case(32, 8, 2, "one_expert", seed=3)
  got, _ = run_dropless(mesh_of(data=2, expert=4), x, experts, gates, w, grad=True)
  proj = np.random.default_rng(9).standard_normal((32, D)).astype(np.float32)
  ref = jax.grad(lambda x, g, *w: jnp.sum(dropless_reference(x, experts, g, w) * proj),
                 argnums=(0, 1, 2, 3, 4))(x, gates, *w)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=1e-4)


def test_padded_exchange_has_ragged_all_to_all_semantics():
  """The padded exchange against a numpy statement of ragged_all_to_all: device t's output
  rows output_offsets[s, t] .. + send_sizes[s, t] hold source s's rows input_offsets[s, t]
  .. + send_sizes[s, t]; offsets from `ragged_plan` on random skewed routings."""
  ep, rows = 8, 12
  mesh = mesh_of(expert=ep)
  rng = np.random.default_rng(0)
  probs = [0.4, 0.2, 0.15, 0.1, 0.1, 0.05, 0.0, 0.0]
  dest = [np.sort(rng.choice(ep, rows, p=probs)) for _ in range(ep)]
  plan = ragged_plan(np.stack(dest)[:, :, None] * 2, 2 * ep, ep)  # 2 experts per device
  data = rng.standard_normal((ep, rows, 3)).astype(np.float32)
  out_rows = ep * rows
  expect = np.zeros((ep, out_rows, 3), np.float32)
  for s in range(ep):
    for t in range(ep):
      n, i0, o0 = (plan[k][s, t] for k in ("send_sizes", "input_offsets", "output_offsets"))
      expect[t, o0:o0 + n] = data[s, i0:i0 + n]
  spec = P("expert")

  def f(d, io, ss, oo, rs):
    return ep_lib._padded_exchange(d[0], io[0], ss[0], oo[0], rs[0], out_rows, rows)[None]

  args = [data] + [plan[k].astype(np.int32) for k in
                   ("input_offsets", "send_sizes", "output_offsets")] + [
                       plan["recv_sizes"].astype(np.int32)]
  args = [jax.device_put(a, NamedSharding(mesh, spec)) for a in args]
  got = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec))(*args)
  np.testing.assert_array_equal(np.asarray(got), expect)
  assert plan["send_sizes"][:, 7].sum() == 0  # an empty destination is covered


def test_ragged_exchange_lowers_to_ragged_all_to_all():
  """XLA:CPU cannot run ragged_all_to_all, but the path must trace and lower (forward and
  backward) to the collective, with the same offsets the padded exchange is tested with."""
  x, experts, gates, w = case(32, 8, 2, "random")
  mesh = mesh_of(data=2, expert=4)
  axes = ("data", "expert")
  tok = NamedSharding(mesh, P(axes, None))
  wsh = NamedSharding(mesh, P("expert", None, None))
  args = [jax.device_put(a, tok) for a in (x, experts, gates)] + [jax.device_put(a, wsh) for a in w]
  f = lambda x, e, g, *w: jnp.sum(ep_moe_ffn_dropless(x, e, g, *w, mesh=mesh,
                                                      exchange="ragged")[0])
  with jax.set_mesh(mesh):
    fwd = jax.jit(f).lower(*args).as_text()
    bwd = jax.jit(jax.grad(f, argnums=(0, 3))).lower(*args).as_text()
  assert fwd.count("ragged_all_to_all") >= 3  # rows, expert ids, results back
  # rows and ids forward, then the transposes of the two row exchanges (the combine
  # exchange's forward value is not needed for the gradient)
  assert bwd.count("ragged_all_to_all") >= 4
  assert ep_lib.resolve_exchange("auto") == "padded"  # this CPU
  with pytest.raises(ValueError, match="allowed: auto, ragged, padded"):
    ep_lib.resolve_exchange("rdma")
