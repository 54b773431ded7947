"""Dispatch backends (moejax/moe/dispatch.py) against the dense reference.

Every implementation must equal "reference" in outputs and in gradients w.r.t. x, the
three weight stacks and the gates, for every router; the capacity implementations must
drop exactly the assignments Switch/GShard priority predicts. Everything runs under jit.
"""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe import dispatch
from moejax.moe import routing as routing_lib
from moejax.moe.routing import Routing

IMPLS = ("capacity_einsum", "capacity_tiled", "dropless_ragged", "dropless_tiled", "pallas")
CAPACITY = ("capacity_einsum", "capacity_tiled")
# Shared shapes keep the number of compilations (the cost of this file) small: every router
# below yields A in {N, 2N, 4N} assignments over E = 4 experts.
N, D, F, E = 24, 16, 8, 4


# Test data comes from numpy: every new shape of a jax.random call is another compilation.
def _normal(seed: int, *shape: int) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _params(seed: int, n: int, d: int, f: int, e: int, dtype=jnp.float32):
  """(x_ND, w_gate_EDF, w_up_EDF, w_down_EFD), fan-in scaled."""
  arrays = (_normal(seed, n, d), _normal(seed + 1, e, d, f) / np.sqrt(d),
            _normal(seed + 2, e, d, f) / np.sqrt(d), _normal(seed + 3, e, f, d) / np.sqrt(f))
  return tuple(jnp.asarray(a, dtype) for a in arrays)


_topk = jax.jit(routing_lib.topk_softmax, static_argnums=1)


def _plain(r: Routing) -> Routing:
  """The routing without losses/stats, so equal shapes share one jit compilation."""
  return r.replace(losses={}, stats={})


def _routing(kind: str, seed: int, n: int = N, e: int = E) -> Routing:
  logits_NE = jnp.asarray(2.0 * _normal(seed, n, e))
  if kind.startswith("topk"):
    r = _topk(logits_NE, e if kind == "topkE" else int(kind[4:]))
  elif kind == "deepseek":
    bias_E = jnp.asarray(0.1 * _normal(seed + 1, e))
    r = jax.jit(functools.partial(routing_lib.deepseek_v3, k=2, n_groups=2, topk_groups=1,
                                  route_scale=2.5))(logits_NE, bias_E)
  elif kind == "hash":
    ids_N = jnp.asarray(np.random.default_rng(seed).integers(0, 1000, n), jnp.int32)
    r = jax.jit(routing_lib.hash_routing, static_argnums=1)(ids_N, e)
  elif kind == "expert_choice":  # 2 sequences x E experts x capacity n / E = 2N assignments
    r = jax.jit(routing_lib.expert_choice, static_argnums=(1, 2))(logits_NE, n // e, (2, n // 2))
  else:
    raise ValueError(kind)
  return _plain(r)


@functools.partial(jax.jit, static_argnames=("backend", "capacity", "tile"))
def _fwd_bwd(x_ND, ws, routing: Routing, cot_ND, keep_A=None, *, backend: str,
             capacity: int | None = None, tile: int | None = None):
  """(y_ND, dropped_A, (dx, dw_gate, dw_up, dw_down, dgate_A)) for the cotangent cot_ND;
  `keep_A` (float 0/1) multiplies the gates inside (the reference of a capacity drop)."""

  def f(x, wg, wu, wd, gate_A):
    r = routing.replace(gate_A=gate_A if keep_A is None else gate_A * keep_A)
    if tile is not None:  # an explicit tile size for the tiled kernel
      fn = dispatch._dropless_tiled if capacity is None else dispatch._capacity_tiled
      y, dropped = fn(x, r, wg, wu, wd, capacity, tile=tile)
      return y.astype(x.dtype), dropped
    return dispatch.moe_ffn(x, r, wg, wu, wd, backend=backend, capacity=capacity)

  y, vjp, dropped = jax.vjp(f, x_ND, *ws, routing.gate_A, has_aux=True)
  return y, dropped, vjp(cot_ND.astype(y.dtype))


@functools.partial(jax.jit, static_argnames=("backend", "capacity", "tile"))
def _forward(x_ND, ws, routing: Routing, keep_A=None, *, backend: str,
             capacity: int | None = None, tile: int | None = None):
  if keep_A is not None:
    routing = routing.replace(gate_A=routing.gate_A * keep_A)
  if tile is not None:
    return dispatch._dropless_tiled(x_ND, routing, *ws, None, tile=tile)
  return dispatch.moe_ffn(x_ND, routing, *ws, backend=backend, capacity=capacity)


def _assert_close(actual, expected, tol: float, what: str = ""):
  """max |actual - expected| <= tol * max(1, max |expected|)."""
  a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert a.shape == b.shape, (what, a.shape, b.shape)
  scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
  err = float(np.max(np.abs(a - b))) if a.size else 0.0
  assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol:.1g} * {scale:.3g}"


def _check_against_reference(backend, x, ws, r, *, capacity=None, tile=None, tol=2e-5,
                             dropped_A=None):
  """Outputs and all gradients equal the reference's; with `dropped_A`, the reference's
  gates of those assignments are multiplied by 0 (so their gate gradient is 0 too)."""
  cot = jnp.asarray(_normal(7, *x.shape))
  y, dropped, grads = _fwd_bwd(x, ws, r, cot, backend=backend, capacity=capacity, tile=tile)
  keep = np.ones(r.token_A.shape, bool) if dropped_A is None else ~np.asarray(dropped_A)
  ry, rdropped, rgrads = _fwd_bwd(x, ws, r, cot, jnp.asarray(keep, jnp.float32),
                                  backend="reference")
  assert y.dtype == x.dtype and y.shape == x.shape
  assert dropped.dtype == jnp.bool_ and dropped.shape == r.token_A.shape
  assert not np.any(rdropped)
  _assert_close(y, ry, tol, f"{backend} y")
  for name, g, rg in zip(("x", "w_gate", "w_up", "w_down", "gate"), grads, rgrads):
    assert g.dtype == rg.dtype
    _assert_close(g, rg, tol, f"{backend} d{name}")
  return dropped


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("kind", ["topk1", "topk2", "topkE", "deepseek", "hash", "expert_choice"])
@pytest.mark.parametrize("backend", IMPLS)
def test_matches_reference(backend, kind):
  r = _routing(kind, 1)
  x, *ws = _params(2, N, D, F, E)
  a = r.token_A.shape[0]
  dropped = _check_against_reference(backend, x, ws, r,
                                     capacity=a if backend in CAPACITY else None)
  assert not np.any(dropped)


@functools.partial(jax.jit, static_argnames=("backend", "k"))
def _grad_logits(logits_NE, x, wg, wu, wd, cot, *, backend: str, k: int):
  def loss(lg):
    r = routing_lib.topk_softmax(lg, k)
    y, _ = dispatch.moe_ffn(x, r, wg, wu, wd, backend=backend, capacity=x.shape[0] * k)
    return jnp.sum(y * cot)
  return jax.grad(loss)(logits_NE)


@pytest.mark.parametrize("backend", ["dropless_tiled", "capacity_tiled", "pallas"])
def test_gradients_through_router(backend):
  """d/d logits through topk_softmax's gates agrees with the reference (for the custom-VJP
  kernels; the others are plain autodiff, and all are checked w.r.t. gate_A above)."""
  e, k = E, 2
  x, wg, wu, wd = _params(3, N, D, F, e)
  logits, cot = jnp.asarray(_normal(4, N, e)), jnp.asarray(_normal(5, N, D))
  args = (logits, x, wg, wu, wd, cot)
  _assert_close(_grad_logits(*args, backend=backend, k=k),
                _grad_logits(*args, backend="reference", k=k), 2e-5)


def test_generic_names_resolve_to_the_platform_choice():
  """CPU: the tiled kernel; GPU/TPU: ragged_dot / einsum buffers. Same traced program."""
  cpu = jax.default_backend() == "cpu"
  choice = {"dropless": "dropless_tiled" if cpu else "dropless_ragged",
            "capacity": "capacity_tiled" if cpu else "capacity_einsum"}
  assert dispatch.resolve_backend("dropless_ragged") == "dropless_ragged"
  r = _routing("topk2", 1)
  x, *ws = _params(2, N, D, F, E)
  for generic, impl in choice.items():
    assert dispatch.resolve_backend(generic) == impl
    trace = lambda b: str(jax.make_jaxpr(functools.partial(
        dispatch.moe_ffn, backend=b, capacity=2 * N))(x, r, *ws))
    assert trace(generic) == trace(impl)


@functools.partial(jax.jit, static_argnames="backend")
def _two_layer_loss_and_grads(x_ND, ws, logits_NE, *, backend: str):
  """Two residual MoE layers in a scan with remat (as the LM calls dispatch)."""
  def loss(x, ws, logits):
    r = routing_lib.topk_softmax(logits, 2)
    def layer(h, _):
      return h + dispatch.moe_ffn(h, r, *ws, backend=backend, capacity=2 * x.shape[0])[0], None
    out, _ = jax.lax.scan(jax.checkpoint(layer), x, None, length=2)
    return jnp.sum(jnp.sin(out))
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(x_ND, ws, logits_NE)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (simulated on CPU; "
                    "a one-GPU machine has 1)")
@pytest.mark.parametrize("backend", ["dropless_tiled", "pallas"])
def test_tiled_under_sharding_scan_and_remat(backend):
  """Tokens sharded over the 8 simulated devices, inside lax.scan + jax.checkpoint (the
  custom-VJP backends)."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x, *ws = _params(21, 64, D, F, E)
  x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  logits = jnp.asarray(_normal(22, 64, E))
  got = _two_layer_loss_and_grads(x, ws, logits, backend=backend)
  want = _two_layer_loss_and_grads(x, ws, logits, backend="reference")
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _assert_close(g, w, 5e-5)


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend", IMPLS)
def test_expert_without_tokens(backend):
  logits = jnp.asarray(_normal(8, N, E)).at[:, 2].set(-1e9)
  r = _plain(_topk(logits, 2))
  assert float(r.load_E()[2]) == 0
  x, *ws = _params(9, N, D, F, E)
  _check_against_reference(backend, x, ws, r, capacity=2 * N)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("backend", IMPLS)
def test_all_tokens_to_one_expert(backend, k):
  logits = jnp.asarray(_normal(10, N, E)).at[:, 3].add(100.0)
  r = _plain(_topk(logits, k))
  assert float(r.load_E()[3]) == N
  x, *ws = _params(11, N, D, F, E)
  _check_against_reference(backend, x, ws, r, capacity=k * N)


@pytest.mark.parametrize("tile,capacity", [(1, None), (5, None), (3, 7), (64, 7)])
def test_tiles_not_dividing_tokens(tile, capacity):
  """N = 23 tokens, k = 2, tiles smaller and larger than an expert's load."""
  n, e = 23, 5
  r = _plain(_topk(jnp.asarray(_normal(12, n, e)), 2))
  x, *ws = _params(13, n, D, F, e)
  dropped = None if capacity is None else _expected_dropped(r, capacity)
  assert dropped is None or dropped.any()
  _check_against_reference("dropless_tiled" if capacity is None else "capacity_tiled", x, ws, r,
                           capacity=capacity, tile=tile, dropped_A=dropped)


@pytest.mark.parametrize("backend", ["capacity_einsum", "dropless_ragged", "dropless_tiled",
                                     "pallas"])
def test_bfloat16(backend):
  """bf16 in, bf16 out, close to the float32 reference on the same (bf16-rounded) values.
  (capacity_tiled runs the dropless_tiled kernel.)"""
  r = _routing("topk2", 14)
  x, *ws = _params(15, N, D, F, E, jnp.bfloat16)
  cot = jnp.asarray(_normal(16, N, D))
  y, _, grads = _fwd_bwd(x, ws, r, cot, backend=backend, capacity=2 * N)
  f32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)
  ry, _, rgrads = _fwd_bwd(f32(x), f32(ws), r, cot, jnp.ones(r.gate_A.shape), backend="reference")
  assert y.dtype == jnp.bfloat16
  assert [g.dtype for g in grads[:4]] == [jnp.bfloat16] * 4 and grads[4].dtype == jnp.float32
  _assert_close(y, ry, 3e-2, "bf16 y")
  for g, rg in zip(grads, rgrads):
    _assert_close(g, rg, 5e-2, "bf16 grad")


# ----------------------------------------------------------------------------- capacity


def _expected_dropped(r: Routing, capacity: int) -> np.ndarray:
  """Python statement of the rule: a is dropped iff >= capacity earlier same-expert ones."""
  seen: dict[int, int] = {}
  out = []
  for ex in np.asarray(r.expert_A).tolist():
    out.append(seen.get(ex, 0) >= capacity)
    seen[ex] = seen.get(ex, 0) + 1
  return np.array(out)


def _routing_from_lists(experts_KN: list[list[int]], gates_KN: list[list[float]],
                        num_experts: int) -> Routing:
  """A slot-major token-choice routing from explicit per-slot expert/gate lists."""
  k, n = len(experts_KN), len(experts_KN[0])
  return Routing(jnp.tile(jnp.arange(n, dtype=jnp.int32), k),
                 jnp.asarray(experts_KN, jnp.int32).reshape(-1),
                 jnp.asarray(gates_KN, jnp.float32).reshape(-1), {}, {}, num_experts, n)


@pytest.mark.parametrize("backend", CAPACITY)
def test_capacity_drops_overflow_in_order(backend):
  """6 tokens all to expert 0, capacity 4: tokens 4 and 5 are dropped and get 0."""
  n, e = 6, 3
  logits = jnp.zeros((n, e)).at[:, 0].set(5.0)
  r = _plain(_topk(logits, 1))
  x, *ws = _params(17, n, D, F, e)
  y, dropped = _forward(x, ws, r, backend=backend, capacity=4)
  np.testing.assert_array_equal(dropped, [False] * 4 + [True] * 2)
  np.testing.assert_array_equal(np.asarray(y[4:]), 0.0)
  ry, _ = _forward(x, ws, r, jnp.ones((n,)), backend="reference")
  _assert_close(y[:4], ry[:4], 2e-5)


@pytest.mark.parametrize("backend", CAPACITY)
def test_capacity_first_choices_take_priority(backend):
  """Tokens 0, 1 pick expert 0 second; tokens 2, 3 pick it first. Capacity 2: expert 0
  keeps the first choices of tokens 2, 3 and drops the second choices of tokens 0, 1,
  although those tokens come earlier."""
  r = _routing_from_lists([[1, 1, 0, 0], [0, 0, 2, 2]],
                          [[0.6, 0.7, 0.8, 0.9], [0.4, 0.3, 0.2, 0.1]], 3)
  x, *ws = _params(18, 4, D, F, 3)
  want = [False] * 4 + [True, True, False, False]
  dropped = _check_against_reference(backend, x, ws, r, capacity=2, dropped_A=want)
  np.testing.assert_array_equal(dropped, want)


@pytest.mark.parametrize("capacity", [3, 12])
@pytest.mark.parametrize("backend", CAPACITY)
def test_capacity_equals_reference_without_dropped(backend, capacity):
  """Outputs and gradients equal the reference with the dropped assignments' gates zeroed
  (dropped assignments contribute nothing, not even a gate gradient)."""
  r = _routing("topk2", 19)
  x, *ws = _params(20, N, D, F, E)
  want = _expected_dropped(r, capacity)
  assert want.any() and not want.all()
  dropped = _check_against_reference(backend, x, ws, r, capacity=capacity, dropped_A=want)
  np.testing.assert_array_equal(dropped, want)


@pytest.mark.parametrize("backend", IMPLS)
def test_masked_tokens_get_nothing_and_take_no_slot(backend):
  """Masked-out tokens (a router's token_mask_N: sentinel token N, gate 0) get zero output
  and no gradient and take no capacity slot: tokens 0-3 are masked and come first to
  expert 0, and with capacity 4 the real tokens 4-7 still keep all four slots."""
  n, e = 8, 3
  logits = jnp.zeros((n, e)).at[:, 0].set(5.0)
  mask = jnp.arange(n) >= 4
  r = _plain(_topk(logits, 1, token_mask_N=mask))
  np.testing.assert_array_equal(r.token_A, [n] * 4 + [4, 5, 6, 7])
  np.testing.assert_array_equal(r.load_E(), [4, 0, 0])
  x, *ws = _params(21, n, D, F, e)
  dropped = _check_against_reference(backend, x, ws, r,
                                     capacity=4 if backend in CAPACITY else None)
  assert not np.any(dropped)
  y, _ = _forward(x, ws, r, backend=backend, capacity=4 if backend in CAPACITY else None)
  np.testing.assert_array_equal(np.asarray(y[:4]), 0.0)
  assert float(jnp.min(jnp.abs(y[4:]).sum(-1))) > 0


def test_capacity_slots_are_expert_major():
  r = _routing_from_lists([[2, 0, 2, 2]], [[1.0] * 4], 3)
  slot_A, dropped_A = jax.jit(dispatch.capacity_slots, static_argnums=1)(r, 2)
  np.testing.assert_array_equal(slot_A, [4, 0, 5, 6])  # 6 = E * C: out of range
  np.testing.assert_array_equal(dropped_A, [False, False, False, True])


def test_expert_capacity_arithmetic():
  ec = dispatch.expert_capacity
  assert ec(16384, 8, 1.0, 4) == 2048
  assert ec(16384, 8, 1.25, 4) == 2560
  assert ec(131072, 64, 1.25, 4) == 2560
  assert ec(7, 2, 1.0, 1) == 4  # ceil(3.5)
  assert ec(100, 10, 1.1, 1) == 11  # not 12 from 11.000000000000002
  assert ec(10, 8, 1.0, 4) == 4  # min_capacity
  assert ec(3, 1, 2.0, 1) == 3  # at most A
  assert ec(2, 4, 1.0, 8) == 2  # min_capacity, then clamped to A


def test_errors_name_the_value():
  r = _routing("topk1", 1)
  x, *ws = _params(2, N, D, F, E)
  with pytest.raises(ValueError, match=r"'megablox'.*reference, capacity.*dropless_tiled"):
    dispatch.moe_ffn(x, r, *ws, backend="megablox")
  for b in ("capacity", *CAPACITY):
    with pytest.raises(ValueError, match="capacity >= 1.*None"):
      dispatch.moe_ffn(x, r, *ws, backend=b)
  with pytest.raises(ValueError, match="w_up_EDF has shape"):
    dispatch.moe_ffn(x, r, ws[0], ws[1][:, :, :4], ws[2], backend="dropless")
  with pytest.raises(ValueError, match="num_tokens"):
    dispatch.moe_ffn(x[:5], r, *ws, backend="dropless")
  assert set(dispatch.BACKENDS) >= {"reference", "capacity", "dropless", *IMPLS}


# ----------------------------------------------------------------------------- properties


def _numpy_topk(seed: int, n: int, e: int, k: int) -> Routing:
  """A top-k softmax routing built in numpy (no compilation per random shape)."""
  logits = 3.0 * _normal(seed, n, e)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  expert_NK = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
  gate_NK = np.take_along_axis(probs, expert_NK, axis=-1)
  gate_NK /= gate_NK.sum(-1, keepdims=True)
  return Routing(jnp.asarray(np.tile(np.arange(n), k), jnp.int32),
                 jnp.asarray(expert_NK.T.reshape(-1), jnp.int32),
                 jnp.asarray(gate_NK.T.reshape(-1), jnp.float32), {}, {}, e, n)


_PROPERTY = hypothesis.settings(max_examples=5, deadline=None, derandomize=True, database=None,
                                suppress_health_check=list(hypothesis.HealthCheck))


@_PROPERTY
@hypothesis.given(n=st.integers(1, 40), e=st.integers(1, 9), kfrac=st.floats(0, 1),
                  d=st.sampled_from([4, 8]), tile=st.sampled_from([None, 2, 7]),
                  seed=st.integers(0, 2 ** 16))
def test_property_dropless_equals_reference(n, e, kfrac, d, tile, seed):
  """Forward outputs of both dropless implementations on random top-k routings."""
  k = 1 + int(kfrac * (e - 1))
  r = _numpy_topk(seed, n, e, k)
  x, *ws = _params(seed + 1, n, d, 4, e)
  want, _ = _forward(x, ws, r, jnp.ones(r.gate_A.shape), backend="reference")
  for backend in ("dropless_tiled", "dropless_ragged"):
    y, dropped = _forward(x, ws, r, backend=backend, tile=tile if "tiled" in backend else None)
    _assert_close(y, want, 2e-5, backend)
    assert not np.any(dropped)


@_PROPERTY
@hypothesis.given(n=st.integers(1, 40), e=st.integers(1, 7), k=st.integers(1, 3),
                  capacity=st.integers(1, 12), seed=st.integers(0, 2 ** 16))
def test_property_capacity_drops_by_priority(n, e, k, capacity, seed):
  """Both capacity implementations drop exactly the predicted assignments and otherwise
  equal the reference."""
  k = min(k, e)
  r = _numpy_topk(seed, n, e, k)
  x, *ws = _params(seed + 1, n, 4, 4, e)
  want = _expected_dropped(r, capacity)
  ref, _ = _forward(x, ws, r, jnp.asarray(~want, jnp.float32), backend="reference")
  for backend in CAPACITY:
    y, dropped = _forward(x, ws, r, backend=backend, capacity=capacity)
    np.testing.assert_array_equal(dropped, want)
    _assert_close(y, ref, 2e-5, backend)
