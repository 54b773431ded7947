"""Expert dispatch: tokens x routing -> SwiGLU experts -> combined output, one signature.

    y_ND, dropped_A = moe_ffn(x_ND, routing, w_gate_EDF, w_up_EDF, w_down_EFD,
                              backend=..., capacity=...)

y_n = sum over assignments a with token_A[a] == n of gate_A[a] * expert_{expert_A[a]}(x_n),
expert_e(x) = (silu(x Wg_e) * (x Wu_e)) Wd_e. Matmuls run in x's dtype (weights are cast to
it); gates multiply in float32 and a token's assignments are summed in float32, cast to x's
dtype at the end. Backends differ in speed, never in results (tests/test_dispatch.py checks
outputs and gradients against "reference"), except that the capacity backends drop the
assignments that overflow an expert's buffer (dropped_A says which; they contribute 0 and the
token passes through the residual outside this function). Assignments of masked-out tokens
(token_A == N, gate 0: see moejax/moe/routing.py) add nothing to any output; the capacity
backends give them no slot and do not count them in the positions that decide drops, and
the tiled backends give them no row.

Backends (`BACKENDS`):
  reference        every expert on every token ([E, N, F]), combined by
                   `routing.combine_NE()`. Tests only.
  capacity         Switch/GShard semantics: assignment a takes position
                   p_a = #earlier assignments (A order: first choices before second choices)
                   to its expert and is dropped iff p_a >= capacity. Resolves to
                   capacity_tiled on CPU and capacity_einsum elsewhere.
  capacity_einsum  [E, C, D] buffers: gather, batched einsum over E, gate-weighted
                   scatter-add. Static shapes; the [E, C, D] buffer is also what expert
                   parallelism exchanges with all_to_all (see `capacity_slots`).
  capacity_tiled   the capacity semantics on the tiled kernel below.
  dropless         every assignment computed. Resolves to dropless_tiled on CPU and
                   dropless_ragged elsewhere.
  dropless_ragged  sort by expert, gather rows, `jax.lax.ragged_dot`, unsort + combine. On
                   XLA:CPU it is slow: 8-10x a dense FFN of equal active FLOPs at E=8, k=2;
                   32x forward at E=64, k=16, whose backward asks for 69 GB.
  dropless_tiled   sorted, tile-padded layout run tile by tile by one fused kernel
                   (gather rows -> SwiGLU of the tile's expert -> gate -> scatter-add) with
                   a custom VJP. It never materialises an [A, D] tensor: on this CPU writing
                   a fresh buffer costs ~0.5 ms/MB (page faults; the [A, D] gather at E=64,
                   k=16, N=8192, D=512 is 268 MB), while 256-row matmuls run at the
                   matmul peak. Measured (benchmarks/moe_layer.py, 4 runs on the shared
                   2-core CPU): 1.05-1.12x / 0.99-1.28x the time of a dense FFN of equal
                   active FLOPs (forward / forward+backward) at E=8, k=2; 1.13-1.20x /
                   1.25-1.48x at E=64, k=16. Tile padding costs ~6% (tile / 2 rows per
                   expert), and small per-tile matmuls suffer more than one large one when
                   another process shares the cores.
  pallas           dropless_ragged's dataflow with the Pallas grouped matmul
                   (moejax/kernels/gmm.py) instead of ragged_dot: sort by expert, gather
                   rows, gmm(x, [Wg | Wu]) (one kernel for both), SwiGLU, gmm(h, Wd),
                   gate-weighted unsort + combine; gradients through the kernels' custom
                   VJP. Triton on GPU, Mosaic on TPU; on CPU the kernels run in interpret
                   mode (exact, but slow: CPU runs should use dropless_tiled). Not yet
                   measured on an accelerator (benchmarks/gpu_check.sh), so "dropless"
                   does not resolve to it.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from moejax.kernels import gmm as gmm_lib
from moejax.moe.config import BACKENDS, CAPACITY_BACKENDS  # noqa: F401 (re-exported)
from moejax.moe.routing import Routing

Array = jax.Array



def expert_capacity(num_assignments: int, num_experts: int, capacity_factor: float,
                    min_capacity: int) -> int:
  """Slots per expert: max(min_capacity, ceil(capacity_factor * A / E)), at most A.

  The product is rounded to 6 decimals before the ceil so that 1.1 * 100 / 10 gives 11.
  """
  c = math.ceil(round(capacity_factor * num_assignments / num_experts, 6))
  return int(min(max(min_capacity, c), num_assignments))


# ----------------------------------------------------------------------------- helpers


def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


def _sort_by_expert(expert_A: Array, num_experts: int) -> tuple[Array, Array, Array, Array]:
  """(order_S, expert_S, pos_A, count_E) for a stable sort of the assignments by expert.

  pos_A[a] = number of earlier assignments (in A order) to a's expert. The sort is one
  single-operand sort of expert * A + a when that fits int32 (5x faster on CPU than a
  stable two-operand argsort).
  """
  a = expert_A.shape[0]
  iota = jnp.arange(a, dtype=jnp.int32)
  if num_experts * a < 2 ** 31:
    key_S = jnp.sort(expert_A * a + iota)
    order_S, expert_S = key_S % a, key_S // a
  else:
    order_S = jnp.argsort(expert_A, stable=True).astype(jnp.int32)
    expert_S = expert_A[order_S]
  count_E = jnp.zeros((num_experts,), jnp.int32).at[expert_A].add(1)
  start_E = jnp.cumsum(count_E) - count_E
  pos_A = jnp.zeros((a,), jnp.int32).at[order_S].set(iota - start_E[expert_S])
  return order_S, expert_S, pos_A, count_E


def _invert(row_A: Array, num_rows: int) -> Array:
  """row -> assignment map (sentinel A for empty rows); rows >= num_rows are dropped."""
  a = row_A.shape[0]
  return jnp.full((num_rows,), a, jnp.int32).at[row_A].set(
      jnp.arange(a, dtype=jnp.int32), mode="drop")


def _take_rows(x: Array, idx: Array) -> Array:
  """x[idx] along axis 0, zeros for out-of-range (sentinel) indices."""
  return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)


def _rows_of(routing: Routing, assign_R: Array) -> tuple[Array, Array]:
  """(token_R, gate_R) of a row -> assignment map; sentinel rows get token N, gate 0."""
  a = routing.token_A.shape[0]
  token_R = jnp.where(assign_R < a, _take_rows(routing.token_A, assign_R), routing.num_tokens)
  return token_R.astype(jnp.int32), _take_rows(routing.gate_A, assign_R)


def _combine(rows_MD: Array, gate_M: Array, token_M: Array, num_tokens: int) -> Array:
  """float32 sum_m gate_m * rows_m into token_m; sentinel tokens (>= N) are dropped."""
  weighted = rows_MD.astype(jnp.float32) * gate_M[:, None].astype(jnp.float32)
  return jnp.zeros((num_tokens, rows_MD.shape[1]), jnp.float32).at[token_M].add(
      weighted, mode="drop")


# ----------------------------------------------------------------------------- reference


def _reference(x_ND, routing, wg, wu, wd, capacity):
  del capacity
  h_ENF = jax.nn.silu(jnp.einsum("nd,edf->enf", x_ND, wg)) * jnp.einsum("nd,edf->enf", x_ND, wu)
  out_END = jnp.einsum("enf,efd->end", h_ENF, wd).astype(jnp.float32)
  y_ND = jnp.einsum("ne,end->nd", routing.combine_NE(), out_END)
  return y_ND, jnp.zeros(routing.token_A.shape, bool)


# ----------------------------------------------------------------------------- capacity


def capacity_slots(routing: Routing, capacity: int) -> tuple[Array, Array]:
  """(slot_A, dropped_A): the [E * C] buffer slot e * C + p_a of each assignment (E * C,
  out of range, when dropped: p_a >= C)."""
  e = routing.num_experts
  valid_A, pos_A, _ = _real_positions(routing)
  dropped_A = valid_A & (pos_A >= capacity)
  slot_A = jnp.where(dropped_A | ~valid_A, e * capacity, routing.expert_A * capacity + pos_A)
  return slot_A, dropped_A


def _real_positions(routing: Routing) -> tuple[Array, Array, Array]:
  """(valid_A, pos_A, count_E) counting real tokens' assignments only: masked-out ones go
  to a virtual expert E, so they take no position and no count."""
  e, valid_A = routing.num_experts, routing.valid_A()
  _, _, pos_A, count_E = _sort_by_expert(jnp.where(valid_A, routing.expert_A, e), e + 1)
  return valid_A, pos_A, count_E[:e]


def _check_capacity(capacity) -> int:
  if capacity is None or int(capacity) < 1:
    raise ValueError(f"capacity backends need capacity >= 1 slots per expert; got {capacity!r}")
  return int(capacity)


def _capacity_einsum(x_ND, routing, wg, wu, wd, capacity):
  c = _check_capacity(capacity)
  e, d = routing.num_experts, x_ND.shape[1]
  slot_A, dropped_A = capacity_slots(routing, c)
  token_S, gate_S = _rows_of(routing, _invert(slot_A, e * c))  # S = E * C slots
  x_ECD = _take_rows(x_ND, token_S).reshape(e, c, d)
  h_ECF = jax.nn.silu(jnp.einsum("ecd,edf->ecf", x_ECD, wg)) * jnp.einsum("ecd,edf->ecf", x_ECD, wu)
  out_ECD = jnp.einsum("ecf,efd->ecd", h_ECF, wd)
  return _combine(out_ECD.reshape(e * c, d), gate_S, token_S, routing.num_tokens), dropped_A


# ----------------------------------------------------------------------------- ragged


def _dropless_ragged(x_ND, routing, wg, wu, wd, capacity):
  del capacity
  order_S, _, _, count_E = _sort_by_expert(routing.expert_A, routing.num_experts)
  token_S = routing.token_A[order_S]
  x_SD = x_ND[token_S]
  h_SF = (jax.nn.silu(jax.lax.ragged_dot(x_SD, wg, count_E))
          * jax.lax.ragged_dot(x_SD, wu, count_E))
  out_SD = jax.lax.ragged_dot(h_SF, wd, count_E)
  y_ND = _combine(out_SD, routing.gate_A[order_S], token_S, routing.num_tokens)
  return y_ND, jnp.zeros(order_S.shape, bool)


# ----------------------------------------------------------------------------- pallas


def _pallas(x_ND, routing, wg, wu, wd, capacity):
  del capacity
  f = wg.shape[2]
  order_S, _, _, count_E = _sort_by_expert(routing.expert_A, routing.num_experts)
  token_S = routing.token_A[order_S]
  x_SD = x_ND[token_S]
  gu_S2F = gmm_lib.gmm(x_SD, jnp.concatenate([wg, wu], axis=2), count_E)
  h_SF = jax.nn.silu(gu_S2F[:, :f]) * gu_S2F[:, f:]
  out_SD = gmm_lib.gmm(h_SF, wd, count_E)
  y_ND = _combine(out_SD, routing.gate_A[order_S], token_S, routing.num_tokens)
  return y_ND, jnp.zeros(order_S.shape, bool)


# ----------------------------------------------------------------------------- tiled


def tile_size(num_assignments: int, num_experts: int) -> int:
  """Rows per tile: the power of two nearest below 1/8 of the mean expert load, in [8, 256].

  Padding wastes < tile rows per expert (about tile / 2 on average); every tile costs a
  loop step and small tiles run below the matmul peak. Measured on the 2-core CPU at 2048
  rows per expert: 256 and 512 about tie, 128 is ~10% slower.
  """
  per8 = max(1, num_assignments // (8 * num_experts))
  return int(min(256, max(8, 1 << (per8.bit_length() - 1))))


def tiled_layout(routing: Routing, tile: int, capacity: int | None = None
                 ) -> tuple[Array, Array, Array, Array]:
  """Sorted, tile-padded rows: each expert's assignments, in A order, from a tile boundary.

  With `capacity`, only the first `capacity` assignments of each expert get rows; masked-out
  tokens' assignments get none.
  Returns (assign_R, expert_G, num_tiles, dropped_A): the assignment of each of the
  R = G * tile rows (sentinel A for padding), the expert of each of the G tiles (G is a
  static upper bound: ceil(A / tile) + E, and at most E * ceil(capacity / tile)), the
  number of tiles in use, and the dropped mask.
  """
  a, e = routing.token_A.shape[0], routing.num_experts
  valid_A, pos_A, count_E = _real_positions(routing)
  g = -(-a // tile) + e
  if capacity is not None:
    count_E = jnp.minimum(count_E, capacity)
    g = min(g, e * -(-capacity // tile))
  dropped_A = valid_A & (pos_A >= capacity) if capacity is not None else jnp.zeros((a,), bool)
  tiles_E = -(-count_E // tile)
  tile_end_E = jnp.cumsum(tiles_E)
  row_start_E = (tile_end_E - tiles_E) * tile
  row_A = jnp.where(dropped_A | ~valid_A, g * tile, row_start_E[routing.expert_A] + pos_A)
  expert_G = jnp.searchsorted(tile_end_E, jnp.arange(g, dtype=jnp.int32), side="right")
  expert_G = jnp.minimum(expert_G, e - 1).astype(jnp.int32)
  return _invert(row_A, g * tile), expert_G, tile_end_E[-1], dropped_A


def _tiled_ffn_fwd(tile, x_ND, wgu, wd, gate_R, token_R, expert_G, num_tiles):
  r, f = token_R.shape[0], wd.shape[1]

  def body(i, carry):
    y_ND, gu_R2F = carry
    e = expert_G[i]
    tok_T = jax.lax.dynamic_slice_in_dim(token_R, i * tile, tile)
    gate_T = jax.lax.dynamic_slice_in_dim(gate_R, i * tile, tile)
    gu_T2F = _take_rows(x_ND, tok_T) @ wgu[e]
    o_TD = (jax.nn.silu(gu_T2F[:, :f]) * gu_T2F[:, f:]) @ wd[e]
    y_ND = y_ND.at[tok_T].add(o_TD.astype(jnp.float32) * gate_T[:, None], mode="drop")
    return y_ND, jax.lax.dynamic_update_slice_in_dim(gu_R2F, gu_T2F, i * tile, 0)

  init = (jnp.zeros(x_ND.shape, jnp.float32), jnp.zeros((r, 2 * f), x_ND.dtype))
  y_ND, gu_R2F = jax.lax.fori_loop(0, num_tiles, body, init)
  return y_ND, (x_ND, wgu, wd, gate_R, token_R, expert_G, num_tiles, gu_R2F)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tiled_ffn(tile: int, x_ND: Array, wgu: Array, wd: Array, gate_R: Array, token_R: Array,
               expert_G: Array, num_tiles: Array) -> Array:
  """float32 y_n = sum over rows r with token_R[r] == n of gate_R[r] * expert(x_n), the
  expert being that of r's tile; wgu_E,D,2F = [Wg | Wu]. Tiles >= num_tiles are skipped.

  The forward keeps the pre-activations [R, 2F] (as autodiff of a dense FFN would); the
  backward walks the tiles again, accumulating weight gradients per expert in float32.
  """
  return _tiled_ffn_fwd(tile, x_ND, wgu, wd, gate_R, token_R, expert_G, num_tiles)[0]


def _tiled_ffn_bwd(tile, res, dy_ND):
  x_ND, wgu, wd, gate_R, token_R, expert_G, num_tiles, gu_R2F = res
  cdt, f = x_ND.dtype, wd.shape[1]

  def body(i, carry):
    dx_ND, dwgu, dwd, dgate_R = carry
    e = expert_G[i]
    tok_T = jax.lax.dynamic_slice_in_dim(token_R, i * tile, tile)
    gate_T1 = jax.lax.dynamic_slice_in_dim(gate_R, i * tile, tile)[:, None]
    gu_T2F = jax.lax.dynamic_slice_in_dim(gu_R2F, i * tile, tile)
    g_TF, u_TF = gu_T2F[:, :f], gu_T2F[:, f:]
    x_TD = _take_rows(x_ND, tok_T)
    dy_TD = _take_rows(dy_ND, tok_T)  # float32
    sig = jax.nn.sigmoid(g_TF)
    silu = g_TF * sig
    h_TF = silu * u_TF
    dh_TF = jnp.einsum("td,fd->tf", dy_TD.astype(cdt), wd[e]).astype(jnp.float32)
    dgate_T = jnp.sum(dh_TF * h_TF.astype(jnp.float32), axis=-1)
    dh = (dh_TF * gate_T1).astype(cdt)
    dgu_T2F = jnp.concatenate([dh * u_TF * (sig * (1 + g_TF * (1 - sig))), dh * silu], axis=1)
    do_TD = (dy_TD * gate_T1).astype(cdt)
    dwd = dwd.at[e].add(jnp.einsum("tf,td->fd", h_TF, do_TD).astype(jnp.float32))
    dwgu = dwgu.at[e].add(jnp.einsum("td,tf->df", x_TD, dgu_T2F).astype(jnp.float32))
    dx_TD = jnp.einsum("tf,df->td", dgu_T2F, wgu[e])
    dx_ND = dx_ND.at[tok_T].add(dx_TD.astype(jnp.float32), mode="drop")
    dgate_R = jax.lax.dynamic_update_slice_in_dim(dgate_R, dgate_T, i * tile, 0)
    return dx_ND, dwgu, dwd, dgate_R

  f32 = jnp.float32
  init = (jnp.zeros(x_ND.shape, f32), jnp.zeros(wgu.shape, f32), jnp.zeros(wd.shape, f32),
          jnp.zeros(gate_R.shape, f32))
  dx_ND, dwgu, dwd, dgate_R = jax.lax.fori_loop(0, num_tiles, body, init)
  return (dx_ND.astype(x_ND.dtype), dwgu.astype(wgu.dtype), dwd.astype(wd.dtype),
          dgate_R.astype(gate_R.dtype), None, None, None)


_tiled_ffn.defvjp(_tiled_ffn_fwd, _tiled_ffn_bwd)


def _tiled(x_ND, routing, wg, wu, wd, capacity, *, tile: int | None = None):
  """Dropless (capacity None) or capacity-limited dispatch through `_tiled_ffn`."""
  a = routing.token_A.shape[0]
  tile = tile or tile_size(a if capacity is None else min(a, capacity * routing.num_experts),
                           routing.num_experts)
  assign_R, expert_G, num_tiles, dropped_A = tiled_layout(routing, tile, capacity)
  token_R, gate_R = _rows_of(routing, assign_R)
  wgu = jnp.concatenate([wg, wu], axis=2)
  return _tiled_ffn(tile, x_ND, wgu, wd, gate_R, token_R, expert_G, num_tiles), dropped_A


def _dropless_tiled(x_ND, routing, wg, wu, wd, capacity, *, tile: int | None = None):
  del capacity
  return _tiled(x_ND, routing, wg, wu, wd, None, tile=tile)


def _capacity_tiled(x_ND, routing, wg, wu, wd, capacity, *, tile: int | None = None):
  return _tiled(x_ND, routing, wg, wu, wd, _check_capacity(capacity), tile=tile)


# ----------------------------------------------------------------------------- selection

# Implementations by name. "pallas" goes into _PLATFORM_CHOICE once a GPU/TPU measurement
# shows it is the fastest dropless there.
_IMPLS: dict[str, Callable] = {
    "reference": _reference,
    "capacity_einsum": _capacity_einsum,
    "capacity_tiled": _capacity_tiled,
    "dropless_ragged": _dropless_ragged,
    "dropless_tiled": _dropless_tiled,
    "pallas": _pallas,
}
# Generic names -> (CPU choice, GPU/TPU choice): the fastest exact implementation of each.
_PLATFORM_CHOICE = {"capacity": ("capacity_tiled", "capacity_einsum"),
                    "dropless": ("dropless_tiled", "dropless_ragged")}


def resolve_backend(backend: str) -> str:
  """The implementation a backend name runs on this platform ("dropless" -> "dropless_tiled"
  on CPU, "dropless_ragged" on GPU/TPU); a ValueError for unknown names."""
  if backend in _PLATFORM_CHOICE:
    cpu, accel = _PLATFORM_CHOICE[backend]
    return cpu if _on_cpu() else accel
  if backend not in _IMPLS:
    raise ValueError(f"moe dispatch backend {backend!r} is unknown; allowed: "
                     f"{', '.join(BACKENDS)}")
  return backend


def moe_ffn(x_ND: Array, routing: Routing, w_gate_EDF: Array, w_up_EDF: Array,
            w_down_EFD: Array, *, backend: str, capacity: int | None = None
            ) -> tuple[Array, Array]:
  """SwiGLU experts applied to routed tokens: (y_ND in x's dtype, dropped_A bool [A]).

  `capacity` (slots per expert) is required by the capacity backends, ignored by the others.
  """
  impl = _IMPLS[resolve_backend(backend)]
  n, d = x_ND.shape
  e, f = routing.num_experts, w_gate_EDF.shape[-1]
  if routing.num_tokens != n:
    raise ValueError(f"routing.num_tokens={routing.num_tokens} but x_ND has {n} rows")
  for name, w, shape in (("w_gate_EDF", w_gate_EDF, (e, d, f)), ("w_up_EDF", w_up_EDF, (e, d, f)),
                         ("w_down_EFD", w_down_EFD, (e, f, d))):
    if w.shape != shape:
      raise ValueError(f"{name} has shape {w.shape}; expected {shape} from routing and x_ND")
  if backend in CAPACITY_BACKENDS:
    _check_capacity(capacity)
  cdt = x_ND.dtype
  wg, wu, wd = (w.astype(cdt) for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
  y_ND, dropped_A = impl(x_ND, routing, wg, wu, wd, capacity)
  return y_ND.astype(cdt), dropped_A
