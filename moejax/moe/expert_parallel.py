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
expert weights (tested). A dropless variant would exchange exact counts with
`jax.lax.ragged_all_to_all` (TPU/GPU only); `ragged_plan` computes its offsets and sizes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

Array = jax.Array
BATCH_AXES = ("data", "fsdp", "expert")


def local_capacity(tokens_local: int, k: int, num_experts: int, capacity_factor: float,
                   min_capacity: int) -> int:
  return max(min_capacity, math.ceil(capacity_factor * tokens_local * k / num_experts))


def mesh_batch_axes(mesh) -> tuple[str, ...]:
  return tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)


def ep_moe_ffn(x_ND: Array, expert_NK: Array, gate_NK: Array, w_gate_EDF: Array,
               w_up_EDF: Array, w_down_EFD: Array, *, mesh, capacity_factor: float,
               min_capacity: int = 1) -> tuple[Array, Array]:
  """(y [N, D], dropped [N, K]) with experts sharded over mesh axis "expert".

  `mesh`: the (abstract or concrete) mesh of the surrounding jit; N must split over its
  batch axes and E over "expert".
  """
  ep = mesh.shape["expert"]
  e = w_gate_EDF.shape[0]
  if e % ep:
    raise ValueError(f"{e} experts do not split over mesh axis 'expert' of size {ep}")
  e_local = e // ep
  n, k = expert_NK.shape
  d = x_ND.shape[-1]
  axes = mesh_batch_axes(mesh)
  shards = math.prod(mesh.shape[a] for a in axes)
  if n % shards:
    raise ValueError(f"{n} tokens do not split over the batch axes {axes} ({shards} shards)")
  cap = local_capacity(n // shards, k, e, capacity_factor, min_capacity)
  tok = P(axes if axes else None, None)
  wspec = P("expert", None, None)

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
