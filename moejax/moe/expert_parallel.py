"""Expert parallelism: tokens travel to their experts' devices with `all_to_all`.

Experts are split over the mesh axis "expert" (E_local = E / ep per device); tokens are
split over the batch axes (data, fsdp, expert). Inside `jax.shard_map` each device:

  1. lays its assignments (slot-major: every token's first choice before any second
     choice, the Switch/GShard priority) into a send buffer [ep, E_local, C, D]: row
     (destination device, local expert, slot); an expert's assignments past its
     capacity C on this device are dropped (they pass through the residual);
  2. `all_to_all` over "expert": device i receives [ep (source), E_local, C, D];
  3. runs its E_local experts on every received slot (one batched SwiGLU einsum);
  4. `all_to_all` back, then combines each kept assignment's output times its gate.

C = max(min_capacity, ceil(capacity_factor * local assignments / E)): static shapes, so
it runs on every backend, CPU included. The result equals the `capacity` backend applied
to each device's tokens separately (tested), and with nothing dropped equals dropless
dispatch. Expert weights stay put: the compiled step has all-to-alls, no all-gather of
expert weights (tested).

Dropless (`ep_moe_ffn_dropless`, used when model.moe.backend is a dropless one): every
assignment is computed. Each device sorts its assignments by expert (so by destination
device), exchanges the per-destination counts (an all_gather of the [ep] send sizes gives
every device the [ep, ep] matrix S[source, dest]), and sends exactly S[me, t] rows to
device t; rows from source s land at offset sum_{s' < s} S[s', me] of the receive buffer.
The receiver runs its local experts on the received rows with `jax.lax.ragged_dot`
(grouped by local expert) and the results return the same way in reverse. The receive
buffer must hold the worst case (every device sends all its rows here): ep * A_local rows.
Two exchanges implement the same contract (`EXCHANGES`):
  ragged   `jax.lax.ragged_all_to_all`: moves only the real rows. TPU/GPU; XLA:CPU does not
           implement the collective, so on this machine it is only lowered (tested).
  padded   `jax.lax.all_to_all` of [ep, A_local] row blocks (each destination's rows
           padded to A_local), then compacted into the ragged layout: the same result
           at ep x the bytes. Runs everywhere; it is what CPU meshes use and what the
           tests compare against the single-device dropless reference.
`ragged_plan` is the host-side (numpy) statement of the offset arithmetic.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

Array = jax.Array
BATCH_AXES = ("data", "fsdp", "expert")
EXCHANGES = ("auto", "ragged", "padded")


def local_capacity(tokens_local: int, k: int, num_experts: int, capacity_factor: float,
                   min_capacity: int) -> int:
  return max(min_capacity, math.ceil(capacity_factor * tokens_local * k / num_experts))


def mesh_batch_axes(mesh) -> tuple[str, ...]:
  return tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)


def _layout(mesh, num_experts: int, num_tokens: int):
  """(ep, E, E_local, token shards, token spec, expert-weight spec), checked."""
  ep = mesh.shape["expert"]
  if num_experts % ep:
    raise ValueError(f"{num_experts} experts do not split over mesh axis 'expert' of size {ep}")
  axes = mesh_batch_axes(mesh)
  shards = math.prod(mesh.shape[a] for a in axes)
  if num_tokens % shards:
    raise ValueError(f"{num_tokens} tokens do not split over the batch axes {axes} "
                     f"({shards} shards)")
  return (ep, num_experts, num_experts // ep, shards, P(axes if axes else None, None),
          P("expert", None, None))


def ep_moe_ffn(x_ND: Array, expert_NK: Array, gate_NK: Array, w_gate_EDF: Array,
               w_up_EDF: Array, w_down_EFD: Array, *, mesh, capacity_factor: float,
               min_capacity: int = 1) -> tuple[Array, Array]:
  """(y [N, D], dropped [N, K]) with experts sharded over mesh axis "expert".

  `mesh`: the (abstract or concrete) mesh of the surrounding jit; N must split over its
  batch axes and E over "expert".
  """
  ep, e, e_local, shards, tok, wspec = _layout(mesh, w_gate_EDF.shape[0], expert_NK.shape[0])
  n, k = expert_NK.shape
  d = x_ND.shape[-1]
  cap = local_capacity(n // shards, k, e, capacity_factor, min_capacity)

  def local(x, e_nk, g_nk, wg, wu, wd):
    nl = x.shape[0]
    e_a = e_nk.T.reshape(-1)  # slot-major priority
    g_a = g_nk.T.reshape(-1)
    t_a = jnp.tile(jnp.arange(nl), k)
    a = e_a.shape[0]
    onehot = jax.nn.one_hot(e_a, e, dtype=jnp.int32)
    pos_a = (jnp.cumsum(onehot, axis=0) - 1)[jnp.arange(a), e_a]
    keep = pos_a < cap
    dest, le = e_a // e_local, e_a % e_local
    slot = jnp.where(keep, pos_a, cap)  # out of range -> dropped by the scatter
    send = jnp.zeros((ep, e_local, cap, d), x.dtype).at[dest, le, slot].set(x[t_a], mode="drop")
    recv = jax.lax.all_to_all(send, "expert", 0, 0, tiled=True)  # [ep (source), El, C, D]
    h = jax.nn.silu(jnp.einsum("secd,edf->secf", recv, wg)) * jnp.einsum(
        "secd,edf->secf", recv, wu)
    out = jnp.einsum("secf,efd->secd", h, wd)
    back = jax.lax.all_to_all(out, "expert", 0, 0, tiled=True)  # [ep (dest), El, C, D]
    got = back[dest, le, jnp.minimum(slot, cap - 1)]
    w = (g_a * keep).astype(got.dtype)
    y = jnp.zeros((nl, d), got.dtype).at[t_a].add(got * w[:, None])
    return y, (~keep).reshape(k, nl).T

  fn = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, wspec, wspec, wspec),
                     out_specs=(tok, tok))
  return fn(x_ND, expert_NK, gate_NK, w_gate_EDF, w_up_EDF, w_down_EFD)


def ragged_plan(expert_NK: np.ndarray, num_experts: int, ep: int) -> dict[str, np.ndarray]:
  """Offsets and sizes for a dropless `jax.lax.ragged_all_to_all` exchange (host-side
  reference of the arithmetic; XLA:CPU cannot run the collective itself).

  expert_NK: [ep, n_local, K] the assignments of each source device. Returns, per source
  device s and destination device t: send_sizes[s, t] (rows s sends t), input_offsets[s, t]
  (where in s's expert-sorted send buffer they start), output_offsets[s, t] (where in t's
  receive buffer they land: after the rows from sources < s) and recv_sizes[t, s].
  """
  e_local = num_experts // ep
  send = np.zeros((ep, ep), np.int64)
  for s in range(ep):
    dest = np.asarray(expert_NK[s]).reshape(-1) // e_local
    send[s] = np.bincount(dest, minlength=ep)
  input_offsets = np.concatenate([np.zeros((ep, 1), np.int64), np.cumsum(send, 1)[:, :-1]], 1)
  recv = send.T.copy()
  output_offsets = np.zeros((ep, ep), np.int64)  # [s, t]
  for t in range(ep):
    output_offsets[:, t] = np.concatenate([[0], np.cumsum(send[:, t])[:-1]])
  return {"send_sizes": send, "input_offsets": input_offsets,
          "output_offsets": output_offsets, "recv_sizes": recv}


# ----------------------------------------------------------------------------- dropless


def resolve_exchange(exchange: str) -> str:
  """"auto" -> "ragged" on TPU/GPU, "padded" on CPU (XLA:CPU lacks ragged_all_to_all)."""
  if exchange not in EXCHANGES:
    raise ValueError(f"expert-parallel exchange {exchange!r} is unknown; allowed: "
                     f"{', '.join(EXCHANGES)}")
  if exchange == "auto":
    return "padded" if jax.default_backend() == "cpu" else "ragged"
  return exchange


def _exclusive_cumsum(v: Array, axis: int = -1) -> Array:
  return jnp.cumsum(v, axis=axis) - v


def _ragged_exchange(rows: Array, input_offsets: Array, send_sizes: Array,
                     output_offsets: Array, recv_sizes: Array, out_rows: int,
                     max_send: int) -> Array:
  del max_send
  out = jnp.zeros((out_rows,) + rows.shape[1:], rows.dtype)
  return jax.lax.ragged_all_to_all(rows, out, input_offsets, send_sizes, output_offsets,
                                   recv_sizes, axis_name="expert")


def _padded_exchange(rows: Array, input_offsets: Array, send_sizes: Array,
                     output_offsets: Array, recv_sizes: Array, out_rows: int,
                     max_send: int) -> Array:
  """ragged_all_to_all's result built from a dense all_to_all of row blocks padded to
  `max_send` (the most rows one device can send to one other).

  `output_offsets` (where the receiver puts this device's rows) is implied here: the
  receiver packs sources in order, at the exclusive cumsum of its recv_sizes, which is
  what the ragged caller computes too.
  """
  del output_offsets
  ep = send_sizes.shape[0]
  block = max_send
  j = jnp.arange(block, dtype=jnp.int32)
  src = input_offsets[:, None] + j[None]  # [ep, block]
  valid = j[None] < send_sizes[:, None]
  send = jnp.take(rows, jnp.where(valid, src, rows.shape[0]), axis=0, mode="fill",
                  fill_value=0)  # [ep (dest), block, ...]
  got = jax.lax.all_to_all(send, "expert", 0, 0, tiled=True)  # [ep (source), block, ...]
  dest = jnp.where(j[None] < recv_sizes[:, None],
                   _exclusive_cumsum(recv_sizes)[:, None] + j[None], out_rows)
  out = jnp.zeros((out_rows,) + rows.shape[1:], rows.dtype)
  return out.at[dest.reshape(-1)].set(got.reshape((ep * block,) + rows.shape[1:]), mode="drop")


_EXCHANGE_FNS = {"ragged": _ragged_exchange, "padded": _padded_exchange}


def ep_moe_ffn_dropless(x_ND: Array, expert_NK: Array, gate_NK: Array, w_gate_EDF: Array,
                        w_up_EDF: Array, w_down_EFD: Array, *, mesh,
                        exchange: str = "auto") -> tuple[Array, Array]:
  """(y [N, D], dropped [N, K] = all False): every assignment reaches its expert's device.

  Equals single-device dropless dispatch (tested with the padded exchange on CPU).
  """
  ep, _, e_local, _, tok, wspec = _layout(mesh, w_gate_EDF.shape[0], expert_NK.shape[0])
  k = expert_NK.shape[1]
  move = _EXCHANGE_FNS[resolve_exchange(exchange)]

  def local(x, e_nk, g_nk, wg, wu, wd):
    nl = x.shape[0]
    a = nl * k
    e_a, g_a = e_nk.reshape(-1), g_nk.reshape(-1)
    t_a = jnp.repeat(jnp.arange(nl, dtype=jnp.int32), k)
    order = jnp.argsort(e_a, stable=True)  # by expert, hence by destination device
    e_s = e_a[order]
    send_sizes = jnp.zeros((ep,), jnp.int32).at[e_s // e_local].add(1)
    input_offsets = _exclusive_cumsum(send_sizes)
    sizes = jax.lax.all_gather(send_sizes, "expert")  # S[source, dest]
    me = jax.lax.axis_index("expert")
    recv_sizes = sizes[:, me]
    output_offsets = _exclusive_cumsum(sizes, axis=0)[me]  # in each receiver's buffer
    cap = ep * a  # worst case: every device sends all its rows here
    rows = move(x[t_a[order]], input_offsets, send_sizes, output_offsets, recv_sizes, cap, a)
    ids = move((e_s % e_local)[:, None], input_offsets, send_sizes, output_offsets,
               recv_sizes, cap, a)[:, 0]
    total = jnp.sum(recv_sizes)
    ids = jnp.where(jnp.arange(cap) < total, ids, e_local)  # unused rows sort last
    lorder = jnp.argsort(ids, stable=True)
    group = jnp.zeros((e_local,), jnp.int32).at[ids].add(1, mode="drop")
    xs = rows[lorder]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, wg, group)) * jax.lax.ragged_dot(xs, wu, group)
    out_s = jax.lax.ragged_dot(h, wd, group)
    out = jnp.zeros_like(out_s).at[lorder].set(out_s)
    # back: rows from source s sit at recv offset s; they return to s's send position
    back = move(out, _exclusive_cumsum(recv_sizes), recv_sizes,
                _exclusive_cumsum(sizes, axis=1)[:, me], send_sizes, a, a)
    y_a = jnp.zeros_like(back).at[order].set(back)  # assignment order again
    w = g_a.astype(jnp.float32)[:, None]
    y = jnp.zeros((nl, x.shape[1]), jnp.float32).at[t_a].add(y_a.astype(jnp.float32) * w)
    return y.astype(x.dtype), jnp.zeros((nl, k), bool)

  fn = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, wspec, wspec, wspec),
                     out_specs=(tok, tok))
  return fn(x_ND, expert_NK, gate_NK, w_gate_EDF, w_up_EDF, w_down_EFD)
