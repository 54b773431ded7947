"""Expert dispatch: tokens x routing -> SwiGLU experts -> combined output, one signature.

    y_ND, dropped_A = moe_ffn(x_ND, routing, w_gate_EDF, w_up_EDF, w_down_EFD,
                              backend=..., capacity=...)

y_N = sum over assignments a with token_A[a] == n of gate_A[a] * expert_{expert_A[a]}(x_n),
expert_e(x) = (silu(x Wg_e) * (x Wu_e)) Wd_e. Matmuls run in x's dtype; gates multiply in
float32 and the sum over a token's assignments accumulates in float32 (cast to x's dtype at
the end). Backends differ in speed, never in results (tests/test_dispatch.py proves it),
except that "capacity" drops the assignments that overflow an expert's buffer.

Backends:
  reference        every expert on every token, combined by `routing.combine_NE()`.
                   O(E N F); tests only.
  capacity         Switch/GShard buffers [E, C, D]: assignment a sits at position
                   p_a = #earlier assignments (in A order, i.e. first choices before second
                   choices) to the same expert; dropped iff p_a >= C. Gather, batched einsum
                   over E, gate-weighted scatter-add back. Static shapes; the [E, C, D]
                   buffer is also what expert parallelism exchanges with all_to_all.
  dropless_ragged  sort by expert, gather rows, `jax.lax.ragged_dot`, unsort + combine.
                   The right choice on GPU/TPU; on XLA:CPU ragged_dot costs as much as
                   running every expert on every row.
  dropless_tiled   sorted, tile-padded layout processed tile by tile by a fused kernel
                   (gather rows -> SwiGLU of the tile's expert -> gate -> scatter-add),
                   custom VJP. Never materialises an [A, D] tensor: on CPU writing fresh
                   large buffers costs about as much as the matmuls (page faults), so the
                   fusion is what makes it fast. The CPU choice.
  dropless         the fastest exact dropless implementation for the current platform
                   (CPU: dropless_tiled; GPU/TPU: dropless_ragged).
  (pallas)         reserved: a Pallas grouped matmul (moejax/kernels/gmm.py) will plug in at
                   `_IMPLS` below with the same signature.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from moejax.moe.routing import Routing

Array = jax.Array

BACKENDS = ("reference", "capacity", "dropless", "dropless_ragged", "dropless_tiled")


def expert_capacity(num_assignments: int, num_experts: int, capacity_factor: float,
                    min_capacity: int) -> int:
  """Slots per expert: max(min_capacity, ceil(capacity_factor * A / E)), at most A.

  The product is rounded to 6 decimals before the ceil so that e.g. 1.1 * 100 / 10 gives
  11, not 12.
  """
  c = math.ceil(round(capacity_factor * num_assignments / num_experts, 6))
  return int(min(max(min_capacity, c), num_assignments))


# ----------------------------------------------------------------------------- helpers


def _swiglu(x_MD: Array, wg_DF: Array, wu_DF: Array, wd_FD: Array) -> Array:
  return (jax.nn.silu(x_MD @ wg_DF) * (x_MD @ wu_DF)) @ wd_FD


def _positions(expert_A: Array, num_experts: int) -> tuple[Array, Array, Array]:
  """(order_A, pos_A, count_E): a stable sort by expert, each assignment's rank among the
  earlier assignments (in A order) to its expert, and the assignments per expert."""
  a = expert_A.shape[0]
  order_A = jnp.argsort(expert_A, stable=True).astype(jnp.int32)
  count_E = jnp.zeros((num_experts,), jnp.int32).at[expert_A].add(1)
  start_E = jnp.cumsum(count_E) - count_E
  sorted_expert = expert_A[order_A]
  pos_sorted = jnp.arange(a, dtype=jnp.int32) - start_E[sorted_expert]
  pos_A = jnp.zeros((a,), jnp.int32).at[order_A].set(pos_sorted)
  return order_A, pos_A, count_E


def _invert(row_A: Array, num_rows: int) -> Array:
  """row -> assignment map (sentinel A for empty rows); rows >= num_rows are dropped."""
  a = row_A.shape[0]
  return jnp.full((num_rows,), a, jnp.int32).at[row_A].set(
      jnp.arange(a, dtype=jnp.int32), mode="drop")


def _take_rows(x_ND: Array, idx_M: Array) -> Array:
  """x_ND[idx_M] with zero rows for out-of-range (sentinel) indices."""
  return jnp.take(x_ND, idx_M, axis=0, mode="fill", fill_value=0)


def _combine(rows_MD: Array, gate_M: Array, token_M: Array, num_tokens: int) -> Array:
  """float32 sum_m gate_m * rows_m into token_m; sentinel tokens (>= N) are dropped."""
  weighted = rows_MD.astype(jnp.float32) * gate_M[:, None].astype(jnp.float32)
  return jnp.zeros((num_tokens, rows_MD.shape[1]), jnp.float32).at[token_M].add(
      weighted, mode="drop")


# ----------------------------------------------------------------------------- reference


def _reference(x_ND, routing, wg, wu, wd, capacity):
  del capacity
  h_ENF = jax.nn.silu(jnp.einsum("nd,edf->enf", x_ND, wg)) * jnp.einsum("nd,edf->enf", x_ND, wu)
  out_END = jnp.einsum("enf,efd->end", h_ENF, wd)
  y = jnp.einsum("ne,end->nd", routing.combine_NE(), out_END.astype(jnp.float32))
  return y, jnp.zeros(routing.token_A.shape, bool)


# ----------------------------------------------------------------------------- capacity


def capacity_slots(routing: Routing, capacity: int) -> tuple[Array, Array]:
  """(slot_A, dropped_A): buffer slot e * C + p_a of each assignment (E * C if dropped)."""
  e = routing.num_experts
  _, pos_A, _ = _positions(routing.expert_A, e)
  dropped_A = pos_A >= capacity
  slot_A = jnp.where(dropped_A, e * capacity, routing.expert_A * capacity + pos_A)
  return slot_A, dropped_A


def _capacity(x_ND, routing, wg, wu, wd, capacity):
  if capacity is None or capacity < 1:
    raise ValueError(f"backend='capacity' needs capacity >= 1 slots per expert; got {capacity!r}")
  e, n, d = routing.num_experts, routing.num_tokens, x_ND.shape[1]
  slot_A, dropped_A = capacity_slots(routing, capacity)
  assign_S = _invert(slot_A, e * capacity)  # S = E * C slots
  token_S = _take_rows(routing.token_A, assign_S).astype(jnp.int32)
  token_S = jnp.where(assign_S < slot_A.shape[0], token_S, n)
  gate_S = _take_rows(routing.gate_A, assign_S)
  x_ECD = _take_rows(x_ND, token_S).reshape(e, capacity, d)
  h_ECF = jax.nn.silu(jnp.einsum("ecd,edf->ecf", x_ECD, wg)) * jnp.einsum("ecd,edf->ecf", x_ECD, wu)
  out_ECD = jnp.einsum("ecf,efd->ecd", h_ECF, wd)
  return _combine(out_ECD.reshape(e * capacity, d), gate_S, token_S, n), dropped_A


# ----------------------------------------------------------------------------- dropless


def _dropless_ragged(x_ND, routing, wg, wu, wd, capacity):
  del capacity
  e, n = routing.num_experts, routing.num_tokens
  order_A, _, count_E = _positions(routing.expert_A, e)
  token_S = routing.token_A[order_A]
  x_SD = x_ND[token_S]
  h_SF = (jax.nn.silu(jax.lax.ragged_dot(x_SD, wg, count_E))
          * jax.lax.ragged_dot(x_SD, wu, count_E))
  out_SD = jax.lax.ragged_dot(h_SF, wd, count_E)
  return _combine(out_SD, routing.gate_A[order_A], token_S, n), jnp.zeros(order_A.shape, bool)


def tile_size(num_assignments: int, num_experts: int) -> int:
  """Rows per tile of the tiled kernel: about a quarter of the mean expert load, a power of
  two in [8, 512] (padding wastes < E * tile rows; each tile costs a loop step)."""
  mean = max(1, num_assignments // num_experts)
  t = 1 << max(3, (mean // 4).bit_length())
  return int(min(512, t))


def tiled_layout(routing: Routing, tile: int) -> tuple[Array, Array, Array, Array]:
  """Sorted, tile-padded layout: each expert's rows start at a tile boundary.

  Returns (assign_R, expert_G, num_tiles, row_A): the assignment in each of the R = G * tile
  rows (sentinel A for padding), the expert of each of the G = ceil(A / tile) + E tiles,
  the number of tiles in use, and each assignment's row.
  """
  a, e = routing.token_A.shape[0], routing.num_experts
  g = -(-a // tile) + e
  _, pos_A, count_E = _positions(routing.expert_A, e)
  tiles_E = -(-count_E // tile)
  tile_end_E = jnp.cumsum(tiles_E)
  row_start_E = (tile_end_E - tiles_E) * tile
  row_A = row_start_E[routing.expert_A] + pos_A
  assign_R = _invert(row_A, g * tile)
  expert_G = jnp.minimum(jnp.searchsorted(tile_end_E, jnp.arange(g), side="right"), e - 1)
  return assign_R, expert_G.astype(jnp.int32), tile_end_E[-1], row_A


def _tiled_ffn_fwd(tile, x_ND, wgu, wd, gate_R, token_R, expert_G, num_tiles):
  r, f = token_R.shape[0], wd.shape[1]

  def body(i, carry):
    y_ND, gu_R2F = carry
    e = expert_G[i]
    tok = jax.lax.dynamic_slice_in_dim(token_R, i * tile, tile)
    gate = jax.lax.dynamic_slice_in_dim(gate_R, i * tile, tile)
    gu_T2F = _take_rows(x_ND, tok) @ wgu[e]
    o_TD = (jax.nn.silu(gu_T2F[:, :f]) * gu_T2F[:, f:]) @ wd[e]
    y_ND = y_ND.at[tok].add(o_TD.astype(jnp.float32) * gate[:, None], mode="drop")
    return y_ND, jax.lax.dynamic_update_slice_in_dim(gu_R2F, gu_T2F, i * tile, 0)

  init = (jnp.zeros(x_ND.shape, jnp.float32), jnp.zeros((r, 2 * f), x_ND.dtype))
  y_ND, gu_R2F = jax.lax.fori_loop(0, num_tiles, body, init)
  return y_ND, (x_ND, wgu, wd, gate_R, token_R, expert_G, num_tiles, gu_R2F)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tiled_ffn(tile, x_ND, wgu, wd, gate_R, token_R, expert_G, num_tiles):
  """float32 y_N = sum over rows r with token_R[r] == n of gate_R[r] * expert_{tile's}(x_n);
  wgu_E,D,2F = [Wg | Wu]."""
  return _tiled_ffn_fwd(tile, x_ND, wgu, wd, gate_R, token_R, expert_G, num_tiles)[0]


def _tiled_ffn_bwd(tile, res, dy_ND):
  x_ND, wgu, wd, gate_R, token_R, expert_G, num_tiles, gu_R2F = res
  cdt, f = x_ND.dtype, wd.shape[1]

  def body(i, carry):
    dx_ND, dwgu, dwd, dgate_R = carry
    e = expert_G[i]
    tok = jax.lax.dynamic_slice_in_dim(token_R, i * tile, tile)
    gate = jax.lax.dynamic_slice_in_dim(gate_R, i * tile, tile)[:, None]
    gu_T2F = jax.lax.dynamic_slice_in_dim(gu_R2F, i * tile, tile)
    g_TF, u_TF = gu_T2F[:, :f], gu_T2F[:, f:]
    x_TD = _take_rows(x_ND, tok)
    dy_TD = _take_rows(dy_ND, tok)  # float32
    sig = jax.nn.sigmoid(g_TF)
    silu = g_TF * sig
    h_TF = silu * u_TF
    dh_raw = jnp.einsum("td,fd->tf", dy_TD.astype(cdt), wd[e]).astype(jnp.float32)
    dgate = jnp.sum(dh_raw * h_TF.astype(jnp.float32), axis=-1)
    dh = (dh_raw * gate).astype(cdt)
    dgu_T2F = jnp.concatenate([dh * u_TF * (sig * (1 + g_TF * (1 - sig))), dh * silu], axis=1)
    dwd = dwd.at[e].add(jnp.einsum("tf,td->fd", h_TF, (dy_TD * gate).astype(cdt)
                                   ).astype(jnp.float32))
    dwgu = dwgu.at[e].add(jnp.einsum("td,tf->df", x_TD, dgu_T2F).astype(jnp.float32))
    dx_TD = jnp.einsum("tf,df->td", dgu_T2F, wgu[e])
    dx_ND = dx_ND.at[tok].add(dx_TD.astype(jnp.float32), mode="drop")
    dgate_R = jax.lax.dynamic_update_slice_in_dim(dgate_R, dgate, i * tile, 0)
    return dx_ND, dwgu, dwd, dgate_R

  acc = jnp.float32
  init = (jnp.zeros(x_ND.shape, acc), jnp.zeros(wgu.shape, acc), jnp.zeros(wd.shape, acc),
          jnp.zeros(gate_R.shape, jnp.float32))
  dx_ND, dwgu, dwd, dgate_R = jax.lax.fori_loop(0, num_tiles, body, init)
  return (dx_ND.astype(x_ND.dtype), dwgu.astype(wgu.dtype), dwd.astype(wd.dtype), dgate_R,
          None, None, None)


_tiled_ffn.defvjp(_tiled_ffn_fwd, _tiled_ffn_bwd)


def _dropless_tiled(x_ND, routing, wg, wu, wd, capacity, *, tile: int | None = None):
  del capacity
  a, e, n = routing.token_A.shape[0], routing.num_experts, routing.num_tokens
  tile = tile or tile_size(a, e)
  assign_R, expert_G, num_tiles, _ = tiled_layout(routing, tile)
  token_R = jnp.where(assign_R < a, _take_rows(routing.token_A, assign_R), n).astype(jnp.int32)
  gate_R = _take_rows(routing.gate_A, assign_R)
  wgu = jnp.concatenate([wg, wu], axis=2)
  y = _tiled_ffn(tile, x_ND, wgu, wd, gate_R, token_R, expert_G, num_tiles)
  return y, jnp.zeros((a,), bool)


def _dropless(x_ND, routing, wg, wu, wd, capacity):
  impl = _dropless_tiled if jax.default_backend() == "cpu" else _dropless_ragged
  return impl(x_ND, routing, wg, wu, wd, capacity)


# A Pallas grouped-matmul backend ("pallas", moejax/kernels/gmm.py) registers here.
_IMPLS: dict[str, Callable] = {
    "reference": _reference,
    "capacity": _capacity,
    "dropless": _dropless,
    "dropless_ragged": _dropless_ragged,
    "dropless_tiled": _dropless_tiled,
}


def moe_ffn(x_ND: Array, routing: Routing, w_gate_EDF: Array, w_up_EDF: Array,
            w_down_EFD: Array, *, backend: str, capacity: int | None = None
            ) -> tuple[Array, Array]:
  """SwiGLU experts applied to routed tokens. Returns (y_ND in x's dtype, dropped_A bool).

  `capacity` (slots per expert) is required by "capacity" and ignored by the others.
  """
  if backend not in _IMPLS:
    raise ValueError(f"moe backend {backend!r} unknown; allowed: {', '.join(BACKENDS)}")
  n, d = x_ND.shape
  e, f = routing.num_experts, w_gate_EDF.shape[2]
  if routing.num_tokens != n:
    raise ValueError(f"routing.num_tokens={routing.num_tokens} but x has {n} tokens")
  for name, w, shape in (("w_gate_EDF", w_gate_EDF, (e, d, f)), ("w_up_EDF", w_up_EDF, (e, d, f)),
                         ("w_down_EFD", w_down_EFD, (e, f, d))):
    if w.shape != shape:
      raise ValueError(f"{name} has shape {w.shape}; expected {shape} (E, D, F from routing/x)")
  cdt = x_ND.dtype
  wg, wu, wd = (w.astype(cdt) for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
  y_ND, dropped_A = _IMPLS[backend](x_ND, routing, wg, wu, wd, capacity)
  return y_ND.astype(cdt), dropped_A
