"""Pallas grouped matmul (moejax/kernels/gmm.py): gmm, tgmm and the custom VJP.

Forward outputs and both gradients (d lhs, d rhs) must equal a float64 numpy reference and
`jax.lax.ragged_dot` (with autodiff) within the dtype's tolerance, over random group sizes
(empty groups, one giant group, sizes that are not tile multiples, rows past the last
group), shapes that are and are not tile multiples, float32 and bfloat16. Group sizes are
data, not shapes, so every hypothesis example of a shape bucket reuses one compilation.

On CPU both lowerings run in interpret mode; on a GPU the Triton kernels run for real (the
Mosaic ones interpreted); a lowering test checks that both lower to their custom calls
without hardware.
"""

from __future__ import annotations

import contextlib
import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.kernels import gmm as gmm_lib

ON_GPU = jax.default_backend() == "gpu"
# Triton (the GPU and CPU default) needs power-of-two tiles >= 16 when compiled; Mosaic is
# interpreted here, so it also gets tiles smaller than the dims' 8-row granularity.
TRITON_TILING = (16, 16, 16)
MOSAIC_TILING = (8, 8, 8)
# (M, K, N, G): tile multiples; and not (rows, K and N get padded).
BUCKETS = ((64, 32, 16, 4), (40, 24, 20, 7))
TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def _normal(seed: int, *shape: int) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _assert_close(actual, expected, tol: float, what: str = ""):
  """max |actual - expected| <= tol * max(1, max |expected|)."""
  a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert a.shape == b.shape, (what, a.shape, b.shape)
  scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
  err = float(np.max(np.abs(a - b))) if a.size else 0.0
  assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol:.1g} * {scale:.3g}"


def _highest():
  """float32 references at full precision (GPUs default to TF32 for float32 matmuls)."""
  return jax.default_matmul_precision("highest")


# ----------------------------------------------------------------------------- references


def _numpy_reference(lhs, rhs, sizes, cot, group_offset=0):
  """float64 (out, d lhs, d rhs) of sum(gmm(lhs, rhs, sizes) * cot), local groups only."""
  lhs, rhs, cot = (np.asarray(a, np.float64) for a in (lhs, rhs, cot))
  m, n = lhs.shape[0], rhs.shape[2]
  out, d_lhs, d_rhs = np.zeros((m, n)), np.zeros_like(lhs), np.zeros_like(rhs)
  ends = np.minimum(np.cumsum(sizes), m)
  starts = np.concatenate([[0], ends[:-1]])
  for local in range(rhs.shape[0]):
    lo, hi = starts[group_offset + local], ends[group_offset + local]
    out[lo:hi] = lhs[lo:hi] @ rhs[local]
    d_lhs[lo:hi] = cot[lo:hi] @ rhs[local].T
    d_rhs[local] = lhs[lo:hi].T @ cot[lo:hi]
  return out, d_lhs, d_rhs


@functools.partial(jax.jit, static_argnames=("impl", "tiling", "out_dtype"))
def _gmm_and_grads(lhs, rhs, sizes, cot, group_offset=None, *, impl, tiling, out_dtype=None):
  def loss(a, b):
    out = gmm_lib.gmm(a, b, sizes, group_offset=group_offset, tiling=tiling, impl=impl,
                      preferred_element_type=out_dtype)
    return jnp.sum(out.astype(jnp.float32) * cot), out
  (_, out), (d_lhs, d_rhs) = jax.value_and_grad(loss, (0, 1), has_aux=True)(lhs, rhs)
  return out, d_lhs, d_rhs


@jax.jit
def _ragged_and_grads(lhs, rhs, sizes, cot):
  def loss(a, b):
    out = jax.lax.ragged_dot(a, b, sizes)
    return jnp.sum(out.astype(jnp.float32) * cot), out
  (_, out), (d_lhs, d_rhs) = jax.value_and_grad(loss, (0, 1), has_aux=True)(lhs, rhs)
  return out, d_lhs, d_rhs


def _check_all(impl: str, tiling, bucket, dtype, sizes, seed: int):
  m, k, n, g = bucket
  lhs = jnp.asarray(_normal(seed, m, k), dtype)
  rhs = jnp.asarray(_normal(seed + 1, g, k, n) / np.sqrt(k), dtype)
  cot = jnp.asarray(_normal(seed + 2, m, n))
  sizes_j = jnp.asarray(sizes, jnp.int32)
  with _highest():
    got = _gmm_and_grads(lhs, rhs, sizes_j, cot, impl=impl, tiling=tiling)
    ragged = _ragged_and_grads(lhs, rhs, sizes_j, cot)
  # The numpy reference sees the bf16-rounded inputs and the cotangent the kernel gets.
  cot_seen = np.asarray(cot.astype(dtype).astype(jnp.float32))
  want = _numpy_reference(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes, cot_seen)
  tol = TOL[jnp.dtype(dtype).name]
  for name, x, r, w in zip(("out", "d_lhs", "d_rhs"), got, ragged, want):
    assert x.dtype == dtype and x.shape == w.shape, (name, x.dtype, x.shape)
    _assert_close(x, w, tol, f"{impl} {name} vs numpy")
    _assert_close(x, r, tol, f"{impl} {name} vs ragged_dot")


# ----------------------------------------------------------------------------- properties


@st.composite
def _group_sizes(draw, m: int, g: int) -> list[int]:
  """G sizes summing to at most M: random cuts, so zeros, big groups and odd sizes occur;
  `fill` < 1 leaves rows past the last group."""
  fill = draw(st.sampled_from([1.0, 1.0, 0.6]))
  total = int(fill * m)
  cuts = sorted(draw(st.lists(st.integers(0, total), min_size=g - 1, max_size=g - 1)))
  return np.diff([0, *cuts, total]).astype(int).tolist()


def _giant(bucket, at: int) -> list[int]:
  sizes = [0] * bucket[3]
  sizes[at] = bucket[0]
  return sizes


_PROPERTY = hypothesis.settings(max_examples=12, deadline=None, derandomize=True,
                                database=None, suppress_health_check=list(hypothesis.HealthCheck))


@_PROPERTY
@hypothesis.given(data=st.data(), b=st.sampled_from(range(len(BUCKETS))),
                  dtype=st.sampled_from(["float32", "bfloat16"]), seed=st.integers(0, 2 ** 16))
@hypothesis.example(data=None, b=0, dtype="float32", seed=1)  # one giant group (first)
@hypothesis.example(data=None, b=1, dtype="bfloat16", seed=2)  # one giant group (last)
def test_property_triton_equals_references(data, b, dtype, seed):
  """Triton lowering (interpret mode on CPU, compiled on GPU): forward, d lhs, d rhs."""
  bucket = BUCKETS[b]
  if data is None:
    sizes = _giant(bucket, 0 if b == 0 else bucket[3] - 1)
  else:
    sizes = data.draw(_group_sizes(bucket[0], bucket[3]), label="sizes")
  _check_all("triton", TRITON_TILING, bucket, jnp.dtype(dtype), sizes, seed)


@hypothesis.settings(_PROPERTY, max_examples=6)
@hypothesis.given(data=st.data(), dtype=st.sampled_from(["float32", "bfloat16"]),
                  seed=st.integers(0, 2 ** 16))
def test_property_mosaic_equals_references(data, dtype, seed):
  """Mosaic lowering (always interpret mode off TPU) on the padded bucket."""
  bucket = BUCKETS[1]
  sizes = data.draw(_group_sizes(bucket[0], bucket[3]), label="sizes")
  _check_all("mosaic", MOSAIC_TILING, bucket, jnp.dtype(dtype), sizes, seed)


@pytest.mark.slow
@hypothesis.settings(_PROPERTY, max_examples=40)
@hypothesis.given(data=st.data(), impl=st.sampled_from(gmm_lib.IMPLS),
                  b=st.sampled_from(range(len(BUCKETS) + 1)),
                  dtype=st.sampled_from(["float32", "bfloat16"]), seed=st.integers(0, 2 ** 16))
def test_property_many_examples(data, impl, b, dtype, seed):
  """More examples, both lowerings, and a larger bucket (M 256, K 128, N 96, G 16)."""
  bucket = (BUCKETS + ((256, 128, 96, 16),))[b]
  sizes = data.draw(_group_sizes(bucket[0], bucket[3]), label="sizes")
  tiling = TRITON_TILING if impl == "triton" else MOSAIC_TILING
  _check_all(impl, tiling, bucket, jnp.dtype(dtype), sizes, seed)


@pytest.mark.parametrize("impl", gmm_lib.IMPLS)
def test_edge_group_sizes(impl):
  """All rows in one group, every group empty, sizes one off a tile multiple."""
  tiling = TRITON_TILING if impl == "triton" else MOSAIC_TILING
  bucket = BUCKETS[0]
  for sizes in (_giant(bucket, 2), [0, 0, 0, 0], [15, 17, 1, 31]):
    _check_all(impl, tiling, bucket, jnp.float32, sizes, 3)


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("impl", gmm_lib.IMPLS)
def test_group_offset_computes_only_local_groups(impl):
  """Two shards of 2 of G = 4 groups (offset traced): each equals the reference restricted
  to its groups, rows of other groups are 0 with 0 gradient, and the shards add up."""
  tiling = TRITON_TILING if impl == "triton" else MOSAIC_TILING
  m, k, n, g = BUCKETS[0]
  sizes = [13, 0, 30, 21]
  lhs, cot = jnp.asarray(_normal(4, m, k)), jnp.asarray(_normal(5, m, n))
  rhs = jnp.asarray(_normal(6, g, k, n) / np.sqrt(k))
  outs = []
  for g0 in (0, 2):
    with _highest():
      out, d_lhs, d_rhs = _gmm_and_grads(lhs, rhs[g0:g0 + 2], jnp.asarray(sizes, jnp.int32),
                                         cot, jnp.int32(g0), impl=impl, tiling=tiling)
    want = _numpy_reference(lhs, rhs[g0:g0 + 2], sizes, cot, group_offset=g0)
    for name, x, w in zip(("out", "d_lhs", "d_rhs"), (out, d_lhs, d_rhs), want):
      _assert_close(x, w, 1e-5, f"{impl} shard {g0} {name}")
    local = slice(0, 13) if g0 == 0 else slice(13, m)
    other = np.ones(m, bool)
    other[local] = False
    assert np.all(np.asarray(out)[other] == 0) and np.all(np.asarray(d_lhs)[other] == 0)
    outs.append(np.asarray(out))
    tg = gmm_lib.tgmm(lhs, cot, jnp.asarray(sizes), num_groups=2, group_offset=g0,
                      tiling=tiling, impl=impl)
    _assert_close(tg, want[2], 1e-5, f"{impl} tgmm shard {g0}")
  _assert_close(outs[0] + outs[1], _numpy_reference(lhs, rhs, sizes, cot)[0], 1e-5, "sum")


def test_float32_accumulation_of_bfloat16():
  """1 + 31 * 2^-9 summed in bf16 stays 1 (2^-9 is under half an ulp of 1); in float32 it
  is 1.060546875, exact with preferred_element_type=float32, 1.0625 rounded to bf16."""
  k = 32
  lhs = jnp.asarray(np.r_[1.0, np.full(k - 1, 2.0 ** -9)][None].repeat(16, 0), jnp.bfloat16)
  rhs = jnp.ones((1, k, 16), jnp.bfloat16)
  sizes = jnp.asarray([16], jnp.int32)
  out32 = gmm_lib.gmm(lhs, rhs, sizes, tiling=TRITON_TILING, preferred_element_type=jnp.float32)
  out16 = gmm_lib.gmm(lhs, rhs, sizes, tiling=TRITON_TILING)
  assert out32.dtype == jnp.float32 and out16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out32), 1.060546875)
  np.testing.assert_array_equal(np.asarray(out16, np.float32), 1.0625)
  d_rhs = gmm_lib.tgmm(lhs, jnp.ones((16, 16), jnp.bfloat16), sizes, tiling=TRITON_TILING,
                       preferred_element_type=jnp.float32)
  np.testing.assert_array_equal(np.asarray(d_rhs[0, 1:]), 16 * 2.0 ** -9)


def test_default_tiling_and_degenerate_shapes():
  """Platform default tiles (larger than these dims: they shrink); M = 0 and G = 0."""
  lhs, rhs = jnp.asarray(_normal(7, 24, 16)), jnp.asarray(_normal(8, 2, 16, 16))
  sizes = jnp.asarray([10, 14], jnp.int32)
  with _highest():
    _assert_close(gmm_lib.gmm(lhs, rhs, sizes), jax.lax.ragged_dot(lhs, rhs, sizes), 1e-5)
  assert gmm_lib.gmm(lhs[:0], rhs, sizes).shape == (0, 16)
  empty = gmm_lib.gmm(lhs, rhs[:0], sizes, group_offset=0)
  assert empty.shape == (24, 16) and not np.any(np.asarray(empty))
  assert gmm_lib.tgmm(lhs, lhs, sizes).shape == (2, 16, 16)


def test_errors_name_the_argument():
  lhs, rhs = jnp.zeros((8, 4)), jnp.zeros((2, 4, 3))
  sizes = jnp.asarray([4, 4], jnp.int32)
  cases = [
      (lambda: gmm_lib.gmm(lhs, rhs, jnp.asarray([2, 2, 4])), r"group_sizes has 3 entries.*2"),
      (lambda: gmm_lib.gmm(lhs, rhs.astype(jnp.bfloat16), sizes), r"dtype mismatch.*float32.*bf"),
      (lambda: gmm_lib.gmm(lhs, rhs, sizes, tiling=(8, 0, 8)), r"tiling must be 3 positive"),
      (lambda: gmm_lib.gmm(lhs, rhs, sizes, tiling=(8, 8)), r"tiling must be 3 positive"),
      (lambda: gmm_lib.gmm(lhs, rhs, sizes, impl="cuda"), r"impl='cuda'.*triton, mosaic"),
      (lambda: gmm_lib.gmm(lhs, rhs, sizes, preferred_element_type=jnp.int32),
       r"preferred_element_type=int32 is not allowed; allowed: float32"),
      (lambda: gmm_lib.gmm(lhs, rhs[:, :3], sizes), r"rhs must be \[G, K, N\] with K = .*4"),
      (lambda: gmm_lib.gmm(lhs, rhs, sizes.astype(jnp.float32)), r"group_sizes must be .*int"),
      (lambda: gmm_lib.gmm(lhs.astype(jnp.int32), rhs.astype(jnp.int32), sizes),
       r"lhs dtype int32 is not allowed; allowed: float32"),
      (lambda: gmm_lib.gmm(lhs, rhs[:1], sizes, group_offset=2), r"group_offset=2 .*\[0, 1\]"),
      (lambda: gmm_lib.tgmm(lhs, lhs, sizes, group_offset=1), r"num_groups .* required"),
      (lambda: gmm_lib.tgmm(lhs, lhs[:4], sizes), r"grad must be \[M, N\] with M = .*8"),
  ]
  foreign, native = ("mosaic", "tpu") if ON_GPU else ("triton", "gpu")
  cases.append((lambda: gmm_lib.gmm(lhs, rhs, sizes, impl=foreign, interpret=False),
                rf"compiles only on {native}.*interpret=True"))
  for fn, pattern in cases:
    with pytest.raises(ValueError, match=pattern):
      fn()


# ----------------------------------------------------------------------------- lowering


def _gpu_target():
  """An abstract H100 for lowering Triton without a GPU (jax >= 0.11 asks for one)."""
  try:
    from jax._src.mesh import AbstractDevice, AbstractMesh
  except ImportError:
    return contextlib.nullcontext()
  device = AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
  return jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=device))


@pytest.mark.parametrize("impl,platform,call", [("triton", "cuda", "xla.gpu.triton"),
                                                ("mosaic", "tpu", "tpu_custom_call")])
def test_lowers_to_the_native_kernel(monkeypatch, impl, platform, call):
  """Forward + both gradients lower (no interpret) to 3 Triton / Mosaic custom calls, in
  bf16 at the platform's default tiling: catches primitives or block shapes the backend
  rejects at lowering time. (Compiling the kernels needs the hardware.)"""
  monkeypatch.setattr(gmm_lib, "_platform", lambda: "gpu" if platform == "cuda" else "tpu")
  spec = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)

  def f(lhs, rhs, sizes, g0):
    fn = lambda a, b: jnp.sum(gmm_lib.gmm(a, b, sizes, group_offset=g0, impl=impl,
                                          interpret=False).astype(jnp.float32) ** 2)
    return jax.value_and_grad(fn, (0, 1))(lhs, rhs)

  args = (spec(1024, 512), spec(2, 512, 512), spec(4, dt=jnp.int32), spec(dt=jnp.int32))
  with _gpu_target() if platform == "cuda" else contextlib.nullcontext():
    text = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  assert sum(call in line for line in text.splitlines() if "custom_call" in line) == 3
