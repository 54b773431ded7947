"""TPU lowering of gmm / tgmm: Pallas Mosaic kernels with scalar-prefetched group metadata
(also run by `interpret=True` on CPU).

Inputs arrive padded as for the Triton kernels, with the local group boundaries as
absolute row offsets `offsets_L1` [L + 1]. Mosaic pipelines BlockSpec tiles through VMEM
along a sequential grid, so instead of looping over groups inside a program the grid walks
a list of *visits*, built in plain JAX and prefetched into SMEM:

gmm   visits = (M-tile, local group) pairs in M-tile order: every M-tile once per local
      group owning one of its rows, and once (no compute) when it has none, so that every
      output tile is written. At most M/tm + L visits. Grid (N-tiles, visits, K-tiles);
      the K axis accumulates into a float32 VMEM scratch; at the last K step the visit
      stores the rows of its group into the output tile (zeroed on the tile's first
      visit). Visits of one tile are consecutive, so the tile stays in VMEM between them.
tgmm  visits = (local group, M-tile) pairs in group order: every M-tile holding rows of
      the group, and one (no compute) for an empty group, whose output must be zeros.
      At most M/tm + 2L visits. Grid (K-tiles, N-tiles, visits); the accumulator is
      zeroed when the group changes and stored when it is about to change.
The visit axis has a dynamic length (the number of visits in use), so no grid step is
spent on padding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moejax.kernels.gmm_triton import tile_groups

Array = jax.Array
_COMPUTE, _FIRST = 1, 2  # visit flags


def gmm_visits(offsets_L1: Array, tiles_m: int, tm: int) -> tuple[Array, Array, Array, Array]:
  """(tile_V, group_V, flags_V, num_visits) of the gmm visit list (V = tiles_m + L)."""
  num_local = offsets_L1.shape[0] - 1
  v = tiles_m + num_local
  first_T, count_T = tile_groups(offsets_L1, tiles_m, tm)
  visits_T = jnp.maximum(count_T, 1)
  start_T = jnp.cumsum(visits_T) - visits_T
  num_visits = jnp.sum(visits_T)
  tile_V = jnp.repeat(jnp.arange(tiles_m, dtype=jnp.int32), visits_T, total_repeat_length=v)
  pos_V = jnp.arange(v, dtype=jnp.int32) - start_T[tile_V]
  group_V = jnp.minimum(first_T[tile_V] + pos_V, num_local - 1)
  live_V = jnp.arange(v) < num_visits
  nonempty_V = offsets_L1[group_V + 1] > offsets_L1[group_V]
  compute_V = live_V & (count_T[tile_V] > 0) & nonempty_V
  first_V = live_V & (pos_V == 0)
  flags_V = compute_V * _COMPUTE + first_V * _FIRST
  return tile_V, group_V.astype(jnp.int32), flags_V.astype(jnp.int32), num_visits


def tgmm_visits(offsets_L1: Array, tiles_m: int, tm: int) -> tuple[Array, Array, Array, Array]:
  """(tile_V, group_V, compute_V, num_visits) of the tgmm visit list (V = tiles_m + 2L)."""
  num_local = offsets_L1.shape[0] - 1
  v = tiles_m + 2 * num_local
  lo_L, hi_L = offsets_L1[:-1], offsets_L1[1:]
  t0_L = lo_L // tm
  tiles_L = jnp.where(hi_L > lo_L, (hi_L + tm - 1) // tm - t0_L, 0)
  visits_L = jnp.maximum(tiles_L, 1)
  start_L = jnp.cumsum(visits_L) - visits_L
  num_visits = jnp.sum(visits_L)
  group_V = jnp.repeat(jnp.arange(num_local, dtype=jnp.int32), visits_L, total_repeat_length=v)
  pos_V = jnp.arange(v, dtype=jnp.int32) - start_L[group_V]
  tile_V = jnp.clip(t0_L[group_V] + pos_V, 0, tiles_m - 1).astype(jnp.int32)
  compute_V = (jnp.arange(v) < num_visits) & (tiles_L[group_V] > 0)
  return tile_V, group_V, compute_V.astype(jnp.int32), num_visits


def _row_mask(tile, group, offsets_ref, shape, tm):
  rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  return (rows >= offsets_ref[group]) & (rows < offsets_ref[group + 1])


def _gmm_kernel(tile_ref, group_ref, flags_ref, offsets_ref, lhs_ref, rhs_ref, out_ref,
                acc_ref, *, tm: int, k_tiles: int, transpose_rhs: bool):
  w, kk = pl.program_id(1), pl.program_id(2)
  flags = flags_ref[w]
  compute = (flags & _COMPUTE) != 0

  @pl.when(kk == 0)
  def _zero_acc():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(compute)
  def _accumulate():
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    acc_ref[...] += jax.lax.dot_general(lhs_ref[...], rhs_ref[...], dims,
                                        preferred_element_type=jnp.float32)

  @pl.when(kk == k_tiles - 1)
  def _store():
    @pl.when((flags & _FIRST) != 0)
    def _zero_out():
      out_ref[...] = jnp.zeros_like(out_ref)

    @pl.when(compute)
    def _store_rows():
      mine = _row_mask(tile_ref[w], group_ref[w], offsets_ref, out_ref.shape, tm)
      out_ref[...] = jnp.where(mine, acc_ref[...].astype(out_ref.dtype), out_ref[...])


def gmm(lhs_MK: Array, rhs: Array, offsets_L1: Array, *, tm: int, tk: int, tn: int,
        transpose_rhs: bool, out_dtype, interpret: bool) -> Array:
  """As gmm_triton.gmm: out[m] = lhs[m] @ rhs[l] (or rhs[l]^T) for rows of local group l."""
  m, k = lhs_MK.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tile_V, group_V, flags_V, num_visits = gmm_visits(offsets_L1, m // tm, tm)

  def rhs_index(j, w, kk, tile_ref, group_ref, flags_ref, offsets_ref):
    return (group_ref[w], j, kk) if transpose_rhs else (group_ref[w], kk, j)

  rhs_block = (pl.squeezed, tn, tk) if transpose_rhs else (pl.squeezed, tk, tn)
  kernel = functools.partial(_gmm_kernel, tm=tm, k_tiles=k // tk, transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(n // tn, num_visits, k // tk),
          in_specs=[pl.BlockSpec((tm, tk), lambda j, w, kk, tile_ref, *_: (tile_ref[w], kk)),
                    pl.BlockSpec(rhs_block, rhs_index)],
          out_specs=pl.BlockSpec((tm, tn), lambda j, w, kk, tile_ref, *_: (tile_ref[w], j)),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=(pltpu.PARALLEL, pltpu.ARBITRARY, pltpu.ARBITRARY)),
      interpret=interpret,
      name="moejax_gmm",
  )(tile_V, group_V, flags_V, offsets_L1, lhs_MK, rhs)


def _tgmm_kernel(tile_ref, group_ref, compute_ref, offsets_ref, lhs_ref, grad_ref, out_ref,
                 acc_ref, *, tm: int):
  w, last = pl.program_id(2), pl.num_programs(2) - 1
  group = group_ref[w]
  starts = (w == 0) | (group_ref[jnp.maximum(w - 1, 0)] != group)
  ends = (w == last) | (group_ref[jnp.minimum(w + 1, last)] != group)

  @pl.when(starts)
  def _zero_acc():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(compute_ref[w] != 0)
  def _accumulate():
    tile = tile_ref[w]
    # Mask in float32 and transpose there (32-bit transposes lower everywhere on Mosaic).
    x_TK = lhs_ref[...].astype(jnp.float32)
    dy_TN = grad_ref[...].astype(jnp.float32)
    x_TK = jnp.where(_row_mask(tile, group, offsets_ref, x_TK.shape, tm), x_TK, 0.0)
    dy_TN = jnp.where(_row_mask(tile, group, offsets_ref, dy_TN.shape, tm), dy_TN, 0.0)
    acc_ref[...] += jnp.dot(x_TK.T.astype(lhs_ref.dtype), dy_TN.astype(grad_ref.dtype),
                            preferred_element_type=jnp.float32)

  @pl.when(ends)
  def _store():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs_MK: Array, grad_MN: Array, offsets_L1: Array, *, tm: int, tk: int, tn: int,
         out_dtype, interpret: bool) -> Array:
  """As gmm_triton.tgmm: out[l] = lhs[rows of l]^T @ grad[rows of l], [L, K, N]."""
  (m, k), n = lhs_MK.shape, grad_MN.shape[1]
  num_local = offsets_L1.shape[0] - 1
  tile_V, group_V, compute_V, num_visits = tgmm_visits(offsets_L1, m // tm, tm)
  kernel = functools.partial(_tgmm_kernel, tm=tm)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_local, k, n), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(k // tk, n // tn, num_visits),
          in_specs=[pl.BlockSpec((tm, tk), lambda a, b, w, tile_ref, *_: (tile_ref[w], a)),
                    pl.BlockSpec((tm, tn), lambda a, b, w, tile_ref, *_: (tile_ref[w], b))],
          out_specs=pl.BlockSpec((pl.squeezed, tk, tn),
                                 lambda a, b, w, tile_ref, group_ref, *_: (group_ref[w], a, b)),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY)),
      interpret=interpret,
      name="moejax_tgmm",
  )(tile_V, group_V, compute_V, offsets_L1, lhs_MK, grad_MN)
