"""MoE feed-forward block: router -> dispatch backend -> SwiGLU experts (+ shared experts).

Side outputs live in named, non-param flax collections so the model stays pure:
  "moe_losses": this layer's weighted auxiliary losses (added to the training loss);
  "moe_stats":  telemetry (load histogram, max/mean load, CV, dropped fraction, entropy);
  "moe_bias":   the DeepSeek selection bias, not trained by gradients; the train step
                updates it after each optimizer step with
                `moejax.moe.side_outputs.update_bias`;
  "moe_routes": (analysis only) each token's gate per expert, see `token_assignments`.
With `nn.scan` over layers each collection gets a leading layer axis.

`token_mask_BT` (bool, None = every token is real) marks the tokens that count: a
Mixture-of-Recursions loop's active tokens on its masked path, the real rows of its
gathered buffers on the gathered path. A masked-out token adds nothing to the loads, the
losses, the statistics (so nor to the bias update) or the dispatch, and gets zero output,
so both paths give the same numbers. Not exact across the two paths where the result
depends on the static token count: the capacity backends' slots per expert and expert
choice's per-sequence capacity are sized from the (masked or gathered) buffer length
(and the expert-parallel capacity exchange still gives masked tokens slots, with gate 0),
and jitter noise is drawn per buffer row.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.layers.common import Array, constrain, param_init
from moejax.layers.mlp import MLP
from moejax.moe import expert_parallel as ep_lib
from moejax.moe import routing as routing_lib
from moejax.moe.config import CAPACITY_BACKENDS
from moejax.moe.dispatch import expert_capacity, moe_ffn
from moejax.moe.side_outputs import stack_moe_layers


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Resolved MoE fields: expert counts and widths are after fine-grained segmentation."""
  num_experts: int
  k: int
  expert_d_ff: int
  num_shared: int = 0
  shared_d_ff: int = 0  # total shared-expert width (0 = num_shared * expert_d_ff)
  shared_gate: bool = False  # sigmoid gate on the shared output (Qwen2-MoE)
  router: str = "topk"
  renormalize: bool = True
  jitter: float = 0.0
  route_scale: float = 1.0
  init_scale: float = 1.0  # multiplier on the router / expert init std (Switch reduced init)
  n_groups: int = 1
  topk_groups: int = 1
  bias_update_rate: float = 0.0
  load_balance_coef: float = 0.01
  z_loss_coef: float = 1e-3
  seq_balance_coef: float = 0.0
  backend: str = "dropless"
  capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  min_capacity: int = 4
  moe_every: int = 1
  first_dense: int = 0
  expert_dispatch: str = "gspmd"  # config.mesh.expert_dispatch: auto | gspmd | all_to_all
  ep_exchange: str = "auto"  # config.mesh.ep_exchange: dropless expert-parallel exchange

  @classmethod
  def from_config(cls, e: Any, d_ff: int) -> "MoEConfig | None":
    if not e.num_experts:
      return None
    m = e.granularity
    # DeepSeekMoE: segmenting each expert m ways multiplies experts and k by m; each
    # shared expert replaces one routed segment so the active compute stays constant.
    return cls(
        num_experts=e.num_experts * m, k=e.experts_per_token * m - e.num_shared_experts,
        expert_d_ff=(e.expert_d_ff or d_ff) // m, num_shared=e.num_shared_experts,
        shared_d_ff=e.get("shared_expert_d_ff", 0), shared_gate=e.get("shared_expert_gate", False),
        router=e.router, renormalize=e.renormalize, jitter=e.jitter, route_scale=e.route_scale,
        init_scale=e.init_scale,
        n_groups=e.n_groups, topk_groups=e.topk_groups, bias_update_rate=e.bias_update_rate,
        load_balance_coef=e.load_balance_coef, z_loss_coef=e.z_loss_coef,
        seq_balance_coef=e.seq_balance_coef, backend=e.backend,
        capacity_factor=e.capacity_factor, eval_capacity_factor=e.eval_capacity_factor,
        min_capacity=e.min_capacity, moe_every=e.moe_every, first_dense=e.first_dense)

  def is_moe_layer(self, i: int) -> bool:
    return i >= self.first_dense and (i - self.first_dense) % self.moe_every == 0


def route(cfg: MoEConfig, logits_NE: Array | None, token_ids_N: Array | None, bias_E: Array | None,
          seq_shape: tuple[int, int], capacity_factor: float,
          token_mask_N: Array | None = None) -> routing_lib.Routing:
  """The router selected by cfg.router (masked-out tokens count for nothing)."""
  if cfg.router == "topk":
    return routing_lib.topk_softmax(logits_NE, cfg.k, renormalize=cfg.renormalize,
                                    token_mask_N=token_mask_N)
  if cfg.router == "deepseek":
    return routing_lib.deepseek_v3(logits_NE, bias_E, cfg.k, n_groups=cfg.n_groups,
                                   topk_groups=cfg.topk_groups, route_scale=cfg.route_scale,
                                   seq_shape=seq_shape, token_mask_N=token_mask_N)
  if cfg.router == "expert_choice":
    c = max(1, math.ceil(capacity_factor * seq_shape[1] * cfg.k / cfg.num_experts))
    return routing_lib.expert_choice(logits_NE, c, seq_shape, token_mask_N)
  if cfg.router == "hash":
    return routing_lib.hash_routing(token_ids_N, cfg.num_experts, token_mask_N)
  raise ValueError(f"model.moe.router = {cfg.router!r}; allowed: topk, deepseek, "
                   "expert_choice, hash")


class MoEFFN(nn.Module):
  cfg: MoEConfig
  init_std: float = 0.02
  out_std: float = 0.02
  deterministic: bool = True  # False in training: jitter on, training capacity factor
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: Array, token_ids_BT: Array | None = None, loop: int = 0,
               token_mask_BT: Array | None = None) -> Array:
    """`loop` > 0: another call of a shared (recursive) block; its losses and loads add to
    the earlier calls', the other statistics are averaged over the calls.
    `token_mask_BT`: the tokens that count (module docstring); the others get output 0."""
    c = self.cfg
    b, t, d = x_BTD.shape
    n, e, f = b * t, c.num_experts, c.expert_d_ff
    x_ND = x_BTD.reshape(n, d).astype(self.dtype)
    mask_N = None if token_mask_BT is None else token_mask_BT.reshape(n).astype(bool)

    logits_NE, bias = None, None
    std_in, std_out = self.init_std * c.init_scale, self.out_std * c.init_scale
    if c.router != "hash":
      w_router = self.param("router", param_init(std_in, ("embed", "expert_router")),
                            (d, e), jnp.float32)
      xr = x_ND.astype(jnp.float32)
      if c.jitter > 0 and not self.deterministic:
        noise = jax.random.uniform(self.make_rng("jitter"), xr.shape, jnp.float32,
                                   1.0 - c.jitter, 1.0 + c.jitter)
        xr = xr * noise
      logits_NE = xr @ w_router
    if c.router == "deepseek":
      bias = self.variable("moe_bias", "bias", jnp.zeros, (e,), jnp.float32).value
    cf = c.eval_capacity_factor if self.deterministic else c.capacity_factor
    r = route(c, logits_NE, None if token_ids_BT is None else token_ids_BT.reshape(n), bias,
              (b, t), cf, mask_N)

    w_gate = self.param("gate", param_init(std_in, ("expert", "embed", "expert_mlp")),
                        (e, d, f), self.param_dtype)
    w_up = self.param("up", param_init(std_in, ("expert", "embed", "expert_mlp")),
                      (e, d, f), self.param_dtype)
    w_down = self.param("down", param_init(std_out, ("expert", "expert_mlp", "embed")),
                        (e, f, d), self.param_dtype)
    mesh = _expert_mesh() if c.expert_dispatch != "gspmd" else None
    if mesh is not None and c.router != "expert_choice":
      # expert parallel: tokens go to the experts' devices (shard_map), capacity-padded
      # for the capacity backends, exact (dropless) for the others
      k = r.expert_A.shape[0] // n
      args = (x_ND, r.expert_A.reshape(k, n).T, r.gate_A.reshape(k, n).T,
              w_gate.astype(self.dtype), w_up.astype(self.dtype), w_down.astype(self.dtype))
      if c.backend in CAPACITY_BACKENDS:
        y_ND, dropped_NK = ep_lib.ep_moe_ffn(*args, mesh=mesh, capacity_factor=cf,
                                             min_capacity=c.min_capacity)
      else:
        y_ND, dropped_NK = ep_lib.ep_moe_ffn_dropless(*args, mesh=mesh, exchange=c.ep_exchange)
      dropped_A = dropped_NK.T.reshape(-1)
    else:
      capacity = expert_capacity(r.token_A.shape[0], e, cf, c.min_capacity)
      y_ND, dropped_A = moe_ffn(x_ND, r, w_gate.astype(self.dtype), w_up.astype(self.dtype),
                                w_down.astype(self.dtype), backend=c.backend,
                                capacity=capacity)
    y_BTD = y_ND.reshape(b, t, d).astype(self.dtype)
    if c.num_shared:
      shared_BTD = MLP(c.shared_d_ff or c.num_shared * f, std_in, std_out, self.dtype,
                       self.param_dtype, name="shared")(x_BTD)
      if c.shared_gate:
        w_sg = self.param("shared_gate", param_init(std_in, ("embed", None)), (d, 1),
                          self.param_dtype)
        shared_BTD = jax.nn.sigmoid(x_BTD.astype(self.dtype) @ w_sg.astype(self.dtype)) * shared_BTD
      y_BTD = y_BTD + shared_BTD
    if token_mask_BT is not None:
      y_BTD = jnp.where(token_mask_BT[..., None].astype(bool), y_BTD, 0).astype(self.dtype)

    coefs = {"load_balance": c.load_balance_coef, "z_loss": c.z_loss_coef,
             "seq_balance": c.seq_balance_coef}
    def put(col, name, value, mean=False):
      var = self.variable(col, name, lambda: jnp.zeros_like(value))
      if loop == 0:
        var.value = value
      else:
        var.value = (var.value * loop + value) / (loop + 1) if mean else var.value + value

    if self.is_mutable_collection("moe_losses"):
      for name, value in r.losses.items():
        if coefs.get(name, 0.0) > 0:
          put("moe_losses", name, coefs[name] * jnp.asarray(value, jnp.float32))
    if self.is_mutable_collection("moe_stats"):
      stats = routing_lib.routing_stats(r, dropped_A)
      for name, value in stats.items():
        put("moe_stats", name, value, mean=name != "load")
      if bias is not None:
        self.variable("moe_stats", "bias", lambda: jnp.zeros_like(bias)).value = bias
    if self.is_mutable_collection("moe_routes"):  # analysis only (token_assignments)
      self.variable("moe_routes", "gates", lambda: jnp.zeros((n, e), jnp.float32)).value = (
          r.combine_NE())
    return constrain(y_BTD, ("batch", "length", "embed"))


def _expert_mesh():
  """The surrounding jit's mesh when it has an 'expert' axis of size > 1, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or getattr(mesh, "empty", False) or not mesh.shape:
    return None
  return mesh if mesh.shape.get("expert", 1) > 1 else None


def token_assignments(model, params, model_state: dict, tokens_BT: Array) -> dict[str, Array]:
  """Token -> expert routing of every MoE layer for a batch (notebooks, analysis).

  Returns {"gates": [layers, B, T, E] combine weights (0 = not routed there),
  "experts": [layers, B, T, E] bool}. `model` is an LM (deterministic=True for eval-time
  routing); layers are the MoE layers in depth order.
  """
  _, side = model.apply({"params": params, **model_state}, tokens_BT, mutable=["moe_routes"])
  gates = stack_moe_layers(side.get("moe_routes", {})).get("gates")
  if gates is None:
    raise ValueError("the model has no MoE layers")
  b, t = tokens_BT.shape
  gates = gates.reshape(gates.shape[0], b, t, gates.shape[-1])
  return {"gates": gates, "experts": gates > 0}
