"""GPU lowering of gmm / tgmm: Pallas Triton kernels (also run by `interpret=True` on CPU).

Inputs arrive padded (rows to a multiple of tm, K and N to multiples of tk and tn) and with
the group boundaries of the L local groups as absolute row offsets `offsets_L1` [L + 1]
(group l owns rows [offsets_L1[l], offsets_L1[l + 1])). Refs are whole arrays in global
memory; each program loads its tiles with `pl.ds` windows (no BlockSpecs), so the grid is
static and every program writes a disjoint output tile: no atomics, no zero-initialisation.

gmm   grid (M-tiles, N-tiles). Metadata per M-tile: the first local group that owns one of
      its rows and how many consecutive groups it spans (tile->group metadata). The
      program loops over those groups (usually one; two or more only at group
      boundaries, so at most M/tm + L - 1 tile products in all), skips empty ones, runs
      the K loop into a float32 accumulator and keeps the rows of that group
      (`where`); rows of no local group stay 0. One store per tile.
tgmm  grid (L, K-tiles, N-tiles). Program (l, a, b) walks the M-tiles that hold group l's
      rows, zeroes rows of other groups in both operands, and accumulates
      lhs_tile^T @ grad_tile in float32. Empty groups store zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

Array = jax.Array

# Triton launch parameters (untuned: no GPU has run these kernels yet).
NUM_WARPS = 4
NUM_STAGES = 3


def tile_groups(offsets_L1: Array, tiles_m: int, tm: int) -> tuple[Array, Array]:
  """(first_T, count_T) for the T = tiles_m row tiles: the first local group owning a row
  of tile t (clamped into [0, L)) and the number of consecutive local groups spanning its
  rows (0 when none of its rows is local; empty groups in between are counted)."""
  num_local = offsets_L1.shape[0] - 1
  ends_L = offsets_L1[1:]
  tile_T = jnp.arange(tiles_m, dtype=jnp.int32)
  lo_T = jnp.maximum(tile_T * tm, offsets_L1[0])
  hi_T = jnp.minimum((tile_T + 1) * tm, offsets_L1[-1])
  first_T = jnp.searchsorted(ends_L, lo_T, side="right").astype(jnp.int32)
  last_T = jnp.searchsorted(ends_L, hi_T - 1, side="right").astype(jnp.int32)
  count_T = jnp.where(hi_T > lo_T, last_T - first_T + 1, 0).astype(jnp.int32)
  return jnp.minimum(first_T, num_local - 1), count_T


def _gmm_kernel(first_ref, count_ref, offsets_ref, lhs_ref, rhs_ref, out_ref, *,
                tm: int, tk: int, tn: int, k_tiles: int, transpose_rhs: bool):
  i, j = pl.program_id(0), pl.program_id(1)
  row0 = i * tm
  rows_T = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm,), 0)
  dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

  def group_step(c, out_TN):
    g = first_ref[i] + c
    lo, hi = offsets_ref[g], offsets_ref[g + 1]

    def product(out_TN):
      def k_step(kk, acc_TN):
        a_TK = lhs_ref[pl.ds(row0, tm), pl.ds(kk * tk, tk)]
        if transpose_rhs:  # rhs is [L, N, K]
          b = rhs_ref[g, pl.ds(j * tn, tn), pl.ds(kk * tk, tk)]
        else:
          b = rhs_ref[g, pl.ds(kk * tk, tk), pl.ds(j * tn, tn)]
        return acc_TN + jax.lax.dot_general(a_TK, b, dims, preferred_element_type=jnp.float32)

      acc_TN = jax.lax.fori_loop(0, k_tiles, k_step, jnp.zeros((tm, tn), jnp.float32))
      mine_T = (rows_T >= lo) & (rows_T < hi)
      return jnp.where(mine_T[:, None], acc_TN, out_TN)

    return jax.lax.cond(hi > lo, product, lambda o: o, out_TN)

  out_TN = jax.lax.fori_loop(0, count_ref[i], group_step, jnp.zeros((tm, tn), jnp.float32))
  out_ref[pl.ds(row0, tm), pl.ds(j * tn, tn)] = out_TN.astype(out_ref.dtype)


def gmm(lhs_MK: Array, rhs: Array, offsets_L1: Array, *, tm: int, tk: int, tn: int,
        transpose_rhs: bool, out_dtype, interpret: bool) -> Array:
  """out[m] = lhs[m] @ rhs[l] (rhs[l]^T with transpose_rhs) for rows m of local group l,
  0 for other rows. rhs is [L, K, N] ([L, N, K] with transpose_rhs); all dims padded."""
  m, k = lhs_MK.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tiles_m = m // tm
  first_T, count_T = tile_groups(offsets_L1, tiles_m, tm)
  kernel = functools.partial(_gmm_kernel, tm=tm, tk=tk, tn=tn, k_tiles=k // tk,
                             transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(tiles_m, n // tn),
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      interpret=interpret,
      name="moejax_gmm",
  )(first_T, count_T, offsets_L1, lhs_MK, rhs)


def _tgmm_kernel(offsets_ref, lhs_ref, grad_ref, out_ref, *, tm: int, tk: int, tn: int):
  g, a, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  lo, hi = offsets_ref[g], offsets_ref[g + 1]
  t_start = jax.lax.div(lo, tm)
  t_end = jnp.where(hi > lo, jax.lax.div(hi + tm - 1, tm), t_start)
  iota_T = jax.lax.broadcasted_iota(jnp.int32, (tm,), 0)

  def m_step(t, acc_KN):
    row0 = t * tm
    rows_T = row0 + iota_T
    mine_T1 = ((rows_T >= lo) & (rows_T < hi))[:, None]
    x_TK = jnp.where(mine_T1, lhs_ref[pl.ds(row0, tm), pl.ds(a * tk, tk)], 0)
    dy_TN = jnp.where(mine_T1, grad_ref[pl.ds(row0, tm), pl.ds(b * tn, tn)], 0)
    return acc_KN + jax.lax.dot_general(x_TK, dy_TN, (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)

  acc_KN = jax.lax.fori_loop(t_start, t_end, m_step, jnp.zeros((tk, tn), jnp.float32))
  out_ref[g, pl.ds(a * tk, tk), pl.ds(b * tn, tn)] = acc_KN.astype(out_ref.dtype)


def tgmm(lhs_MK: Array, grad_MN: Array, offsets_L1: Array, *, tm: int, tk: int, tn: int,
         out_dtype, interpret: bool) -> Array:
  """out[l] = lhs[rows of l]^T @ grad[rows of l]: [L, K, N]; all dims padded."""
  (_, k), n = lhs_MK.shape, grad_MN.shape[1]
  num_local = offsets_L1.shape[0] - 1
  kernel = functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_local, k, n), out_dtype),
      grid=(num_local, k // tk, n // tn),
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      interpret=interpret,
      name="moejax_tgmm",
  )(offsets_L1, lhs_MK, grad_MN)
