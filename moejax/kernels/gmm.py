"""Grouped matmul as Pallas kernels, differentiable: the expert FFN of dropless MoE.

    out_MN = gmm(lhs_MK, rhs_GKN, group_sizes_G)      out[m] = lhs[m] @ rhs[g(m)]
    d_GKN  = tgmm(lhs_MK, grad_MN, group_sizes_G)     d[g] = lhs[rows of g]^T @ grad[rows of g]

Rows of lhs are sorted by group: group g owns rows [offset_g, offset_g + size_g),
offset_g = size_0 + ... + size_{g-1}. Rows past sum(group_sizes) belong to no group and
give 0 (as in `jax.lax.ragged_dot`); groups reaching past row M are cut at M. `gmm` has a
custom VJP: d lhs = gmm(grad, rhs^T) (the kernel reads rhs transposed, no copy) and
d rhs = tgmm(lhs, grad). Products accumulate in float32 whatever the input dtype; the
output has lhs's dtype unless `preferred_element_type` says otherwise.

Expert parallelism: with `group_offset=g0`, rhs holds only the L = rhs.shape[0] local
groups g0 .. g0 + L - 1 of the G in group_sizes; rows of other groups give 0 (and get 0
gradient), and tgmm returns [L, K, N]. g0 may be traced (e.g. from `jax.lax.axis_index`).

Lowerings (moejax/kernels/gmm_triton.py, gmm_mosaic.py), picked by `jax.default_backend()`
or `impl`:
  triton  GPU: grid (M-tiles, N-tiles) with tile->group metadata; tgmm grid
          (groups, K-tiles, N-tiles). Also the CPU default, run with `interpret=True`.
  mosaic  TPU: scalar-prefetched visit lists (PrefetchScalarGridSpec), VMEM accumulator.
On CPU (`jax.default_backend() == "cpu"`) kernels run in interpret mode: exact but slow
(the grid becomes an XLA loop over tiles); CPU MoE should use dispatch backend
"dropless_tiled". Status: both lowerings are verified in interpret mode and lower to the
Triton / Mosaic custom call (tests/test_kernels.py), but neither has run on a GPU or TPU
yet; the default tilings and Triton launch parameters are untuned, and the Triton grid
visits M-tiles in plain order (no grouped/swizzled order for L2 reuse yet). jax 0.12 marks
the Pallas Triton backend deprecated in favour of Mosaic GPU (a DeprecationWarning at
lowering); a Mosaic GPU lowering would be a third module beside these two.
Sharding: XLA cannot partition a Pallas custom call; under jit with sharded operands it
gathers them and runs the kernel replicated (correct, not scalable). Across devices call
gmm per shard inside shard_map, with group_offset selecting the shard's experts.

Tiling (tm, tk, tn): rows, contraction and output columns per tile; defaults per platform
in `DEFAULT_TILING`. A tile larger than its (padded) dimension shrinks to it; dimensions
that are not tile multiples are zero-padded (rows of lhs: a copy of lhs; K or N: a copy of
the weights too, so keep model dims multiples of the tile). Triton needs power-of-two
tiles >= 16; Mosaic needs tm % 8 == 0 and tk, tn multiples of 128 (or the whole dim).

Token permutation is not fused into the kernels' loads yet (the caller gathers the sorted
rows into an [A, D] array first, see moejax/moe/dispatch.py "pallas"). Why not yet:
  * Mosaic: BlockSpec pipelining DMAs one contiguous [tm, tk] block per step. Gathering
    rows needs tm separate row DMAs per block from HBM (memory_space ANY, make_async_copy
    per row, semaphores, hand-written double buffering): a different kernel.
  * Triton: a gathered load (pointer offsets from a row-index vector) is expressible, but
    (a) nothing could be measured here (no GPU), and the payoff is bounded: the gather is
    one memory-bound pass over [A, D] (read + write) against 2 A D F FLOPs per expert
    matmul; for D = 4096, F = 14336, bf16, at H100 rates (3.35 TB/s, 990 TFLOP/s) that is
    ~4% of one matmul's time, ~1.4% of the SwiGLU forward's three; (b) it saves only the
    forward gather: the backward still scatter-adds d lhs rows into tokens (k rows per
    token) and the forward output still needs the gate-weighted unsort, so the [A, D]
    buffers exist anyway unless both ends are fused (atomics or a sorted-combine kernel).
  Do it once the GPU benchmark (benchmarks/gmm.py) shows the gather/unsort passes matter.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from moejax.kernels import gmm_mosaic, gmm_triton

Array = jax.Array

IMPLS = ("triton", "mosaic")
DTYPES = ("float32", "bfloat16", "float16")
# (tm, tk, tn) by jax.default_backend(). GPU: a common Triton bf16 matmul tile; TPU: VMEM
# use ~3 MB (double-buffered bf16 tiles + f32 accumulator); CPU: few interpret-mode grid
# steps. None of them is tuned on hardware yet.
DEFAULT_TILING = {"gpu": (128, 64, 128), "tpu": (256, 512, 512), "cpu": (128, 128, 128)}


@dataclasses.dataclass(frozen=True)
class _Config:
  tiling: tuple[int, int, int]
  impl: str
  interpret: bool
  out_dtype: str


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _check_tiling(tiling) -> tuple[int, int, int]:
  ok = (isinstance(tiling, (tuple, list)) and len(tiling) == 3
        and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and t > 0
                for t in tiling))
  if not ok:
    raise ValueError(f"tiling must be 3 positive ints (tm, tk, tn); got {tiling!r}")
  return tuple(int(t) for t in tiling)


def _platform() -> str:
  """jax.default_backend(); tests replace it to lower for another platform on CPU."""
  return jax.default_backend()


def _config(tiling, impl, interpret, out_dtype) -> _Config:
  platform = _platform()
  if impl is None:
    impl = "mosaic" if platform == "tpu" else "triton"
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is unknown; allowed: {', '.join(IMPLS)} (or None: by "
                     f"platform)")
  native = {"triton": "gpu", "mosaic": "tpu"}[impl]
  if interpret is None:
    interpret = platform != native
  if not interpret and platform != native:
    raise ValueError(f"impl={impl!r} compiles only on {native}, this is {platform}; pass "
                     f"interpret=True (or interpret=None) to run it in interpret mode")
  tiling = _check_tiling(DEFAULT_TILING.get(platform, DEFAULT_TILING["cpu"])
                         if tiling is None else tiling)
  if jnp.dtype(out_dtype).name not in DTYPES:
    raise ValueError(f"preferred_element_type={jnp.dtype(out_dtype).name} is not allowed; "
                     f"allowed: {', '.join(DTYPES)}")
  return _Config(tiling, impl, bool(interpret), jnp.dtype(out_dtype).name)


def _fit(tile: int, dim: int, impl: str) -> int:
  """The tile used for a dimension of size `dim` (shrunk when the dim is smaller)."""
  if impl == "triton":
    return min(tile, max(16, 1 << max(0, dim - 1).bit_length()))
  return min(tile, _round_up(dim, 8))


def _check_native_tiles(cfg: _Config, tm: int, tk: int, tn: int, kp: int, np_: int):
  if cfg.interpret:
    return
  if cfg.impl == "triton" and not all(t >= 16 and t & (t - 1) == 0 for t in (tm, tk, tn)):
    raise ValueError(f"tiling (tm, tk, tn)={(tm, tk, tn)} (after fitting to the shapes) is "
                     f"not allowed for Triton: tiles must be powers of two >= 16")
  if cfg.impl == "mosaic" and (tm % 8 or (tk % 128 and tk != kp) or (tn % 128 and tn != np_)):
    raise ValueError(f"tiling (tm, tk, tn)={(tm, tk, tn)} (after fitting to the shapes) is "
                     f"not allowed for Mosaic: tm must be a multiple of 8, tk and tn "
                     f"multiples of 128 or the whole (padded) dimension")


def _check_common(lhs, group_sizes, what: str):
  if lhs.ndim != 2:
    raise ValueError(f"{what}: lhs must be 2-D [M, K]; got shape {lhs.shape}")
  if jnp.dtype(lhs.dtype).name not in DTYPES:
    raise ValueError(f"{what}: lhs dtype {lhs.dtype} is not allowed; allowed: "
                     f"{', '.join(DTYPES)}")
  if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"{what}: group_sizes must be a 1-D integer array [G]; got "
                     f"{group_sizes.dtype}{list(group_sizes.shape)}")


def _check_group_offset(group_offset, num_groups: int, num_local: int, what: str) -> Array:
  if group_offset is None:
    if num_local != num_groups:
      raise ValueError(f"{what}: group_sizes has {num_groups} entries but there are "
                       f"{num_local} groups of weights; they must match (or pass "
                       f"group_offset for a shard of the groups)")
    return jnp.zeros((), jnp.int32)
  if num_local > num_groups:
    raise ValueError(f"{what}: {num_local} local groups but group_sizes has only "
                     f"{num_groups} entries")
  if isinstance(group_offset, (numbers.Integral, np.integer)):
    if not 0 <= int(group_offset) <= num_groups - num_local:
      raise ValueError(f"{what}: group_offset={int(group_offset)} is out of range: must be "
                       f"in [0, {num_groups - num_local}] for {num_local} local of "
                       f"{num_groups} groups")
  group_offset = jnp.asarray(group_offset)
  if group_offset.shape != () or not jnp.issubdtype(group_offset.dtype, jnp.integer):
    raise ValueError(f"{what}: group_offset must be an integer scalar; got "
                     f"{group_offset.dtype}{list(group_offset.shape)}")
  return group_offset.astype(jnp.int32)


def _local_offsets(group_sizes: Array, group_offset: Array, num_local: int, m: int) -> Array:
  """Row offsets [L + 1] of the local groups, clamped into [0, M]."""
  ends = jnp.clip(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), 0, m)
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends.astype(jnp.int32)])
  return jax.lax.dynamic_slice_in_dim(offsets, group_offset, num_local + 1)


def _pad(x: Array, shape: tuple[int, ...]) -> Array:
  if x.shape == shape:
    return x
  return jnp.pad(x, [(0, t - s) for s, t in zip(x.shape, shape)])


def _lowering(impl: str):
  return gmm_triton if impl == "triton" else gmm_mosaic


def _gmm_call(lhs, rhs, group_sizes, group_offset, cfg: _Config, transpose_rhs: bool):
  """The kernel call: pads, fits tiles, slices. rhs is [L, K, N] or [L, N, K]."""
  (m, k), num_local = lhs.shape, rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  out_dtype = jnp.dtype(cfg.out_dtype)
  if 0 in (m, k, n, num_local):
    return jnp.zeros((m, n), out_dtype)
  tm, tk, tn = (_fit(t, d, cfg.impl) for t, d in zip(cfg.tiling, (m, k, n)))
  mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
  _check_native_tiles(cfg, tm, tk, tn, kp, np_)
  offsets = _local_offsets(group_sizes, group_offset, num_local, m)
  rhs_p = _pad(rhs, (num_local, np_, kp) if transpose_rhs else (num_local, kp, np_))
  out = _lowering(cfg.impl).gmm(_pad(lhs, (mp, kp)), rhs_p, offsets, tm=tm, tk=tk, tn=tn,
                                transpose_rhs=transpose_rhs, out_dtype=out_dtype,
                                interpret=cfg.interpret)
  return out[:m, :n]


def _tgmm_call(lhs, grad, group_sizes, group_offset, num_local: int, cfg: _Config):
  (m, k), n = lhs.shape, grad.shape[1]
  out_dtype = jnp.dtype(cfg.out_dtype)
  if 0 in (m, k, n, num_local):
    return jnp.zeros((num_local, k, n), out_dtype)
  tm, tk, tn = (_fit(t, d, cfg.impl) for t, d in zip(cfg.tiling, (m, k, n)))
  mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
  _check_native_tiles(cfg, tm, tk, tn, kp, np_)
  offsets = _local_offsets(group_sizes, group_offset, num_local, m)
  out = _lowering(cfg.impl).tgmm(_pad(lhs, (mp, kp)), _pad(grad, (mp, np_)), offsets, tm=tm,
                                 tk=tk, tn=tn, out_dtype=out_dtype, interpret=cfg.interpret)
  return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm(lhs, rhs, group_sizes, group_offset, cfg: _Config):
  return _gmm_call(lhs, rhs, group_sizes, group_offset, cfg, transpose_rhs=False)


def _gmm_fwd(lhs, rhs, group_sizes, group_offset, cfg):
  out = _gmm_call(lhs, rhs, group_sizes, group_offset, cfg, transpose_rhs=False)
  return out, (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(cfg, res, grad):
  lhs, rhs, group_sizes, group_offset = res
  grad = grad.astype(lhs.dtype)
  d_lhs = _gmm_call(grad, rhs, group_sizes, group_offset,
                    dataclasses.replace(cfg, out_dtype=jnp.dtype(lhs.dtype).name),
                    transpose_rhs=True)
  d_rhs = _tgmm_call(lhs, grad, group_sizes, group_offset, rhs.shape[0],
                     dataclasses.replace(cfg, out_dtype=jnp.dtype(rhs.dtype).name))
  return d_lhs, d_rhs, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs_MK: Array, rhs_GKN: Array, group_sizes_G: Array, *,
        group_offset: int | Array | None = None, tiling: tuple[int, int, int] | None = None,
        preferred_element_type=None, impl: str | None = None,
        interpret: bool | None = None) -> Array:
  """out[m] = lhs[m] @ rhs[g(m) - group_offset] for the rows of local groups, else 0: [M, N].

  Differentiable in lhs and rhs (custom VJP through gmm with rhs transposed and tgmm).
  `impl` "triton" / "mosaic" (default by platform); `interpret` None = interpret unless on
  the impl's own platform.
  """
  lhs_MK, rhs_GKN, group_sizes_G = (jnp.asarray(a) for a in (lhs_MK, rhs_GKN, group_sizes_G))
  _check_common(lhs_MK, group_sizes_G, "gmm")
  if rhs_GKN.ndim != 3 or rhs_GKN.shape[1] != lhs_MK.shape[1]:
    raise ValueError(f"gmm: rhs must be [G, K, N] with K = lhs.shape[1] = {lhs_MK.shape[1]}; "
                     f"got shape {rhs_GKN.shape}")
  if rhs_GKN.dtype != lhs_MK.dtype:
    raise ValueError(f"gmm: dtype mismatch: lhs is {lhs_MK.dtype}, rhs is {rhs_GKN.dtype}; "
                     f"cast one so both are the same of {', '.join(DTYPES)}")
  g0 = _check_group_offset(group_offset, group_sizes_G.shape[0], rhs_GKN.shape[0], "gmm")
  cfg = _config(tiling, impl, interpret, preferred_element_type or lhs_MK.dtype)
  return _gmm(lhs_MK, rhs_GKN, group_sizes_G.astype(jnp.int32), g0, cfg)


def tgmm(lhs_MK: Array, grad_MN: Array, group_sizes_G: Array, *,
         num_groups: int | None = None, group_offset: int | Array | None = None,
         tiling: tuple[int, int, int] | None = None, preferred_element_type=None,
         impl: str | None = None, interpret: bool | None = None) -> Array:
  """out[l] = lhs[rows of group g0 + l]^T @ grad[same rows]: [L, K, N], zeros for empty
  groups. L = `num_groups` (default: all G groups; required with `group_offset`).
  The weight gradient of gmm; not differentiable itself."""
  lhs_MK, grad_MN, group_sizes_G = (jnp.asarray(a) for a in (lhs_MK, grad_MN, group_sizes_G))
  _check_common(lhs_MK, group_sizes_G, "tgmm")
  if grad_MN.ndim != 2 or grad_MN.shape[0] != lhs_MK.shape[0]:
    raise ValueError(f"tgmm: grad must be [M, N] with M = lhs.shape[0] = {lhs_MK.shape[0]}; "
                     f"got shape {grad_MN.shape}")
  if grad_MN.dtype != lhs_MK.dtype:
    raise ValueError(f"tgmm: dtype mismatch: lhs is {lhs_MK.dtype}, grad is {grad_MN.dtype}; "
                     f"cast one so both are the same of {', '.join(DTYPES)}")
  total = group_sizes_G.shape[0]
  if num_groups is None:
    if group_offset is not None:
      raise ValueError("tgmm: num_groups (the number of local groups) is required with "
                       "group_offset")
    num_groups = total
  if not isinstance(num_groups, numbers.Integral) or num_groups < 0:
    raise ValueError(f"tgmm: num_groups must be an int >= 0; got {num_groups!r}")
  g0 = _check_group_offset(group_offset, total, int(num_groups), "tgmm")
  cfg = _config(tiling, impl, interpret, preferred_element_type or lhs_MK.dtype)
  return _tgmm_call(lhs_MK, grad_MN, group_sizes_G.astype(jnp.int32), g0, int(num_groups), cfg)
