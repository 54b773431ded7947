"""Per-device memory and per-step traffic of a config's train step on a mesh: a calculator.

    python -m moejax.planning --config configs/scale/deepseek_v3.py \
        --mesh data=1,fsdp=8,tensor=1,expert=32 [--platform tpu|gpu|cpu]

Pure arithmetic on the config: parameter shapes and logical axes come from an abstract
`eval_shape` of the model's init (nothing is compiled or allocated), shardings from the
rules table (moejax/parallel.py). The step is `make_train_step` with the state donated, as
moejax/train/loop.py runs it. Names: P = sum_i P_i, P_i the elements of parameter leaf i on
one device (its size over the mesh axes that shard it); p / c the parameter / compute dtype
bytes; N the tokens of one device (batch x length / (data x fsdp x expert)); a "layer call"
is one block call of the forward (a recursive block counts once per loop, on the tokens that
loop is given); t, f, d, ep the tensor, fsdp, data, expert axis sizes; D, F, H, K, Dh, E, k,
V the model sizes, F' one expert's width, S the keys a query row attends over.

Memory per device (bytes; what `compiled.memory_analysis()` reports as arguments + outputs
- aliased + temporaries). Live through the step:
  params        P p.
  grads         P p: gradients come in the parameter dtype.
  optimizer     AdamW mu and nu, 2 P p (optax keeps them in the parameter dtype).
  batch         inputs and targets, int32: 8 N.
Live in the forward/backward phase:
  activations   what the forward keeps for the backward, summed over the layer calls, by
                the remat policy, per token of the call (/t where the tensor axis splits it):
                  none  block input and the residual after attention (2 D c); per RMSNorm
                        the f32 normalised input and its compute-dtype output (4 D + D c);
                        q, k, v after RoPE and the attention output ((2H + 2K) Dh c / t); the
                        f32 masked scores and probabilities (XLA recomputes their exp), plus
                        the probabilities cast to c when c != 4: H S (8 [+ c]) / t; SwiGLU:
                        gate and up projections, sigmoid and silu of the gate, the product
                        (5 F c / t; 6 inside nn.scan, whose stacked residuals keep the gate
                        twice: as the matmul output and as silu's input); MoE layers: router
                        logits and probabilities (3 E 4 + 16 k) and the shared experts'
                        SwiGLU instead of the dense one (their dispatch rows: next term).
                  dots_no_batch  block input, q/k/v projections, attention output projection,
                        SwiGLU gate and up (the matmul outputs the policy saves).
                  dots  also the score and value einsums (H S 4 / t + H Dh c / t).
                  full  the block input (D c).
                MoR steps that gather their tokens add the gathered input and the scattered
                update (2 D c per token).
  dispatch_buffers  each MoE layer call's token rows, sized AS THE CODE ALLOCATES THEM; R
                rows per layer and device:
                  expert parallel, dropless (moejax/moe/expert_parallel.py): the receive
                    buffer is worst-case, R = ep x A_local (A_local = N k): every device
                    could send all its rows to one device, so both exchanges allocate that
                    many (ragged_all_to_all's output operand; the padded exchange's compact
                    buffer) and the experts then run on all R rows (sorted copy, SwiGLU,
                    output): every row buffer below is ep times what balanced routing needs.
                  expert parallel, capacity: the [ep, E_local, C, D] buffer, R = E C,
                    C = max(min_capacity, ceil(capacity_factor N k / E)).
                  one device (or gspmd dispatch): R = N k (ragged, pallas), E C
                    (capacity_einsum), the tile-padded layout (ceil(N k / tile) + E) tile
                    (tiled; at most E ceil(C / tile) tiles with capacity), E N (reference).
                Kept for backward per row (c bytes; the bool masks of out-of-range rows 1):
                  ragged exchange  2 D c + D + 5 F' c   (receive rows, sorted copy)
                  padded exchange  4 D c + 2 D + 5 F' c (+ the padded send/received blocks)
                  capacity (EP)    2 D c + 5 F' c
                  one device       D c + 5 F' c / t
                  tiled            2 F' c / t per row (its custom VJP keeps the gate|up rows)
                                   and the concatenated [E, D, 2F'] weights per layer
                (5 -> 6 inside nn.scan, as above). With remat none every MoE layer call's
                rows wait for the backward; with remat, one layer's (the one recomputed).
                The receive buffer alone, R D c, and what one forward allocates (ragged
                4 D c + 5 F' c, padded 8 D c + 5 F' c per row) are reported per layer.
  gathered_weights  the largest layer's weights as its forward uses them: gathered over
                fsdp (and the experts over tensor inside the expert-parallel shard_map),
                in c, plus that layer's gradient before the reduce-scatter (p); 0 without
                fsdp when c == p.
  backward      the backward of the largest layer call: the cotangents of its biggest part
                (attention, dense FFN, or the MoE FFN, whose rows' cotangents are
                R (2 D + 3 F') c: d(out), d(rows), SwiGLU's three), plus, with remat, the
                residuals the policy did not keep, recomputed (dispatch rows excluded:
                counted above). Tiled: f32 dx and the f32 per-expert weight-gradient sums.
  loss_head     final norm (4 D + D c per token), the logits in c, their f32 exp kept by the
                cross-entropy and the f32 logits / their cotangent: N (4 D + D c + V/t (c + 8)).
Live in the optimizer phase (the activations are gone by then):
  optimizer_update  the AdamW update tree, P p, materialised before the non-finite guard
                (train/steps.py `keep`) selects the new state.
  total         steady + max(forward/backward phase, optimizer phase).
Not counted: XLA's scheduling beyond the above (what is live at once is estimated, not
simulated), its copies of donated optimizer moments and of scanned weights into loops (seen
on CPU), collective scratch, small scalars.

Traffic per step (bytes each device sends; ring algorithms; B_i = P_i p):
  grad_reduce_scatter    leaves sharded over fsdp: (f - 1) B_i; likewise over expert with
                         gspmd dispatch, and the experts over tensor under expert-parallel
                         dispatch (whole inside the shard_map).
  grad_all_reduce_data   every leaf: 2 B_i (d - 1) / d.
  grad_all_reduce_expert leaves replicated over the expert axis (all but the experts, whose
                         gradients are complete on their device under expert-parallel
                         dispatch): 2 B_i (ep - 1) / ep. Each axis is its own all-reduce (the
                         expert axis over its fast links); one flat all-reduce over
                         data x expert would send 2 B_i (1 - 1 / (d ep)), at most the sum.
  grad_all_reduce_fsdp   leaves replicated over fsdp: 2 B_i (f - 1) / f.
  weight_all_gather      what is reduce-scattered is gathered in the forward and again in the
                         backward: 2 (axis - 1) B_i.
  tensor_all_reduce      [N_call, D] in c after attention and after the FFN of each layer
                         call, forward and backward (x 3 when remat recomputes), plus the
                         embedding lookup and the unembedding's input gradient; each
                         2 [N, D] c (t - 1) / t.
  expert_all_to_all      per MoE layer call: dispatch and combine, forward and backward (and
                         again when remat recomputes), each sending (ep - 1) / ep of: the
                         [ep, E_local, C, D] buffer (capacity); the [ep, A_local, D] padded
                         blocks (padded); the rows really sent, A_local D c at balanced
                         routing (ragged: skew moves who sends what, not the total); dropless
                         also sends each row's int32 local expert id once per forward.
Estimates, not measurements. tests/test_planning.py compares the memory total with XLA's
memory analysis of the compiled step (8 simulated CPU devices; dense, expert-parallel MoE,
MoR: within 20%) and the receive buffer with what expert_parallel.py traces;
tests/test_expert_parallel.py the capacity all-to-all bytes with the compiled program.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import parallel
from moejax.config import load_config
from moejax.models.lm import LM, LMConfig
from moejax.moe.config import CAPACITY_BACKENDS
from moejax.moe.dispatch import expert_capacity, tile_size
from moejax.moe.expert_parallel import local_capacity

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PLATFORMS = ("tpu", "gpu", "cpu")
# expert-parallel exchange -> ([R, D] value buffers kept for backward, [R, D] bool masks
# kept, [R, D] value buffers one forward allocates); each also has the SwiGLU's [R, F'] ones.
EP_ROW_BUFFERS = {"ragged": (2, 1, 4), "padded": (4, 2, 8), "capacity": (2, 0, 4)}
# memory terms live through the whole step / only during the forward and backward
STEADY = ("params", "grads", "optimizer", "batch")
BACKWARD_PHASE = ("activations", "dispatch_buffers", "gathered_weights", "backward", "loss_head")


# ----------------------------------------------------------------------------- parameters


@dataclasses.dataclass(frozen=True)
class Leaf:
  path: str
  size: int  # elements, whole array
  per_device: float  # elements on one device
  axes: frozenset  # mesh axes that shard it
  expert: bool  # an expert weight (logical axis "expert")


def param_leaves(mc: LMConfig, sizes: dict[str, int], rules) -> list[Leaf]:
  """Every parameter with its per-device size under the rules (abstract init, no arrays)."""
  boxed = jax.eval_shape(lambda: LM(mc).init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 8), jnp.int32)))
  is_boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)
  out = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(boxed["params"], is_leaf=is_boxed):
    n = math.prod(leaf.value.shape)
    axes = set()
    for entry in nn.logical_to_mesh_axes(leaf.names, rules):
      axes.update((entry,) if isinstance(entry, str) else tuple(entry or ()))
    div = math.prod(sizes.get(a, 1) for a in axes)
    out.append(Leaf(jax.tree_util.keystr(path), n, n / div,
                    frozenset(a for a in axes if sizes.get(a, 1) > 1), "expert" in leaf.names))
  return out


# ----------------------------------------------------------------------------- layer calls


@dataclasses.dataclass(frozen=True)
class Call:
  """One call of a block in the forward: its FFN kind, tokens per device and keys."""
  kind: str  # dense | moe
  tokens: float  # tokens of this call on one device
  keys: int  # attention keys per query row (sequence length, or a MoR step's tokens)
  recursive_step: bool = False  # a MoR step's gathered call


def layer_calls(mc: LMConfig, seq_len: int, seqs: float) -> list[Call]:
  """The block calls of one training forward, `seqs` sequences per device."""
  rc = mc.recursion
  if rc is None:
    return [Call(k, seqs * seq_len, seq_len) for k in mc.layer_kinds()]
  calls = []
  ends = ["first_layer", "last_layer"] if rc.middle else []
  for name in ends[:1]:
    calls.append(Call(mc.unique_kind(name), seqs * seq_len, seq_len))
  core = [f"shared_{u}" for u in range(rc.num_core)]
  loops = rc.num_loops
  steps = ([(n, r) for r in range(loops) for n in core] if rc.strategy in ("cycle", "middle_cycle")
           else [(n, r) for n in core for r in range(loops)])
  first = rc.capacity_tokens(0, seq_len) if rc.router != "none" else seq_len
  for name, r in steps:
    gathered = rc.router != "none" and rc.capacities[r] < 1.0 and rc.dispatch == "gather"
    n_r = min(seq_len, rc.capacity_tokens(r, seq_len)) if gathered else seq_len
    keys = first if (rc.kv_sharing and r > 0 and "cycle" in rc.strategy) else n_r
    calls.append(Call(mc.unique_kind(name), seqs * n_r, keys, recursive_step=gathered))
  for name in ends[1:]:
    calls.append(Call(mc.unique_kind(name), seqs * seq_len, seq_len))
  return calls


# ----------------------------------------------------------------------------- activations


def swiglu_saved(mc: LMConfig) -> int:
  """[rows, F] buffers a SwiGLU keeps for the backward: gate and up projections, sigmoid
  and silu of the gate, their product (5); inside nn.scan the residuals become the loop's
  stacked outputs and the gate is kept twice (the matmul output and silu's own input).
  With remat the values are recomputed inside the backward's loop body: 5 again."""
  return 6 if mc.scan_layers and mc.recursion is None and mc.remat == "none" else 5


def _parts_none(mc: LMConfig, call: Call, t: int) -> tuple[float, float]:
  """(attention part, FFN part without dispatch) of the remat-none residuals, per token."""
  c, d, sw = BYTES[mc.compute_dtype], mc.d_model, swiglu_saved(mc)
  h, k, dh = mc.num_heads, mc.num_kv_heads, mc.head_dim
  norm = 4 * d + d * c
  attn = d * c + norm + (2 * h + 2 * k) * dh * c / t + h * call.keys * (8 + (c if c != 4 else 0)) / t
  ffn = d * c + norm
  if call.kind == "moe":
    m = mc.moe
    ffn += 3 * m.num_experts * 4 + 16 * m.k + sw * (m.shared_d_ff or m.num_shared * m.expert_d_ff) * c / t
  else:
    ffn += sw * mc.d_ff * c / t
  if call.recursive_step:
    attn += 2 * d * c
  return attn, ffn


def saved_per_token(mc: LMConfig, call: Call, t: int) -> float:
  """Bytes per token that one block call keeps for the backward (dispatch excluded)."""
  c, d = BYTES[mc.compute_dtype], mc.d_model
  h, k, dh = mc.num_heads, mc.num_kv_heads, mc.head_dim
  policy = mc.remat
  step = 2 * d * c if call.recursive_step else 0
  if policy == "none":
    return sum(_parts_none(mc, call, t))
  if policy == "full":
    return d * c + step
  f = ((mc.moe.shared_d_ff or mc.moe.num_shared * mc.moe.expert_d_ff) if call.kind == "moe"
       else mc.d_ff)
  n = d * c + (h + 2 * k) * dh * c / t + d * c + 2 * f * c / t + step
  if call.kind == "moe":
    n += mc.moe.num_experts * 4
  if policy == "dots":  # the score and value einsums are dots too
    n += h * call.keys * 4 / t + h * dh * c / t
  return n


# ----------------------------------------------------------------------------- dispatch


def resolve_backend(backend: str, platform: str) -> str:
  """What moejax/moe/dispatch.py runs for `backend` on `platform`."""
  if backend == "dropless":
    return "dropless_tiled" if platform == "cpu" else "dropless_ragged"
  if backend == "capacity":
    return "capacity_tiled" if platform == "cpu" else "capacity_einsum"
  return backend


def dispatch_rows(mc: LMConfig, tokens: float, ep: int, platform: str, capacity_factor: float
                  ) -> tuple[str, float]:
  """(kind, R): the row count of one MoE layer call's dispatch buffers on one device."""
  m = mc.moe
  e, a = m.num_experts, tokens * m.k
  ep_path = ep > 1 and m.expert_dispatch != "gspmd" and m.router != "expert_choice"
  if ep_path and m.backend in CAPACITY_BACKENDS:
    cap = local_capacity(int(tokens), m.k, e, capacity_factor, m.min_capacity)
    return "capacity", e * cap
  if ep_path:
    exchange = m.ep_exchange
    if exchange == "auto":
      exchange = "padded" if platform == "cpu" else "ragged"
    return exchange, ep * a  # worst case: every device sends all its rows here
  b = resolve_backend(m.backend, platform)
  if b in ("capacity_einsum", "capacity_tiled"):
    cap = expert_capacity(int(a), e, capacity_factor, m.min_capacity)
    if b == "capacity_einsum":
      return "local", e * cap
    tile = tile_size(int(a), e)
    return "tiled", min(-(-int(a) // tile) + e, e * -(-cap // tile)) * tile
  if b == "dropless_tiled":
    tile = tile_size(int(a), e)
    return "tiled", (-(-int(a) // tile) + e) * tile
  if b == "reference":
    return "local", e * tokens
  return "local", a  # dropless_ragged, pallas


def dispatch_bytes(mc: LMConfig, kind: str, rows: float, tokens: float, t: int
                   ) -> tuple[float, float, float]:
  """(kept for backward, allocated by one forward, backward cotangents) bytes of one MoE
  layer call's row buffers (R = rows) on one device."""
  c, d, f, sw = BYTES[mc.compute_dtype], mc.d_model, mc.moe.expert_d_ff, swiglu_saved(mc)
  if kind in EP_ROW_BUFFERS:  # inside shard_map the experts are whole (F' not split)
    sv, mask, alloc = EP_ROW_BUFFERS[kind]
    return (rows * (sv * d * c + mask * d + sw * f * c), rows * (alloc * d * c + 5 * f * c),
            rows * (2 * d + 3 * f) * c)
  if kind == "tiled":
    # the custom VJP keeps the gate|up rows and the concatenated [E, D, 2F'] weights; its
    # backward sums dx and the per-expert weight gradients in f32, then casts and splits
    w = mc.moe.num_experts * d * f / t
    return (rows * 2 * f * c / t + 2 * w * c, rows * 2 * f * c / t + 2 * w * c,
            tokens * d * 4 + 3 * w * (4 + c))
  return (rows * (d * c + sw * f * c / t), rows * (2 * d * c + 5 * f * c / t),
          rows * (2 * d + 3 * f / t) * c)


# ----------------------------------------------------------------------------- plan


def _layer_groups(mc: LMConfig, leaves: list[Leaf]) -> dict[str, float]:
  """Elements of one layer's parameters on one device, by layer (or segment) name:
  scanned segments ('layers', 'moe_layers', ...) divided by their repeats."""
  repeats = {name: r for name, _, r in mc.segments()} if mc.scan_layers else {}
  out: dict[str, float] = {}
  for l in leaves:
    keys = [k.strip("[]'") for k in l.path.split("][")]
    name = "/".join(keys[:2]) if keys[0] == "recursion" and len(keys) > 2 else keys[0]
    out[name] = out.get(name, 0.0) + l.per_device / repeats.get(name, 1)
  return out


def _gathered_weights(mc: LMConfig, leaves: list[Leaf], sizes: dict[str, int],
                      ep_dispatch: bool) -> float:
  """Bytes of the largest layer's weights as its forward uses them: gathered over fsdp
  (and, inside the expert-parallel shard_map, the experts over tensor), cast to the
  compute dtype, plus that layer's unreduced gradient before the reduce-scatter."""
  p, c = BYTES[mc.param_dtype], BYTES[mc.compute_dtype]
  f, t = sizes["fsdp"], sizes["tensor"]
  widened, gathered = [], False
  for l in leaves:
    g = f if "fsdp" in l.axes else 1
    if l.expert and ep_dispatch and "tensor" in l.axes:
      g *= t
    gathered |= g > 1
    widened.append(dataclasses.replace(l, per_device=l.per_device * g))
  if not gathered and c == p:
    return 0.0  # nothing gathered, nothing cast: each layer reads its own shards
  per_byte = c + (p if gathered else 0)
  return max(_layer_groups(mc, widened).values()) * per_byte


def _memory(mc, leaves, sizes, calls, disp, n_tok, ep_dispatch) -> dict[str, float]:
  p, c, t = BYTES[mc.param_dtype], BYTES[mc.compute_dtype], sizes["tensor"]
  per_dev = sum(l.per_device for l in leaves)
  act = sum(saved_per_token(mc, cl, t) * cl.tokens for cl in calls)
  if mc.remat == "none":  # every MoE layer's rows wait for the backward
    dispatch = sum(v[2] for v in disp.values())
  else:  # one layer's, recomputed in the backward
    dispatch = max((v[2] for v in disp.values()), default=0.0)
  backward = 0.0
  for i, cl in enumerate(calls):
    attn, ffn = (x * cl.tokens for x in _parts_none(mc, cl, t))
    if i in disp:
      ffn += disp[i][4]
    recompute = 0.0  # with remat: the residuals the policy did not keep, recomputed
    if mc.remat != "none":
      kept = saved_per_token(mc, cl, t) - mc.d_model * c
      recompute = max(0.0, sum(_parts_none(mc, cl, t)) - kept) * cl.tokens
    backward = max(backward, recompute + max(attn, ffn))
  head = n_tok * (4 * mc.d_model + c * mc.d_model + mc.vocab_size / t * (c + 8))
  memory = {"params": per_dev * p, "grads": per_dev * p, "optimizer": 2 * per_dev * p,
            "batch": 8 * n_tok, "activations": act, "dispatch_buffers": dispatch,
            "gathered_weights": _gathered_weights(mc, leaves, sizes, ep_dispatch),
            "backward": backward, "loss_head": head, "optimizer_update": per_dev * p}
  steady = sum(memory[k] for k in STEADY)
  phase = sum(memory[k] for k in BACKWARD_PHASE)
  memory["total"] = steady + max(phase, memory["optimizer_update"])
  return memory


def _traffic(mc, leaves, sizes, calls, disp, n_tok, ep_dispatch) -> tuple[dict, float, float]:
  """(traffic terms, all-to-all buffer bytes, ids bytes) of the last MoE layer call."""
  p, c = BYTES[mc.param_dtype], BYTES[mc.compute_dtype]
  f, d, t, ep = sizes["fsdp"], sizes["data"], sizes["tensor"], sizes["expert"]
  rs = ar_data = ar_expert = ar_fsdp = gathers = 0.0
  for l in leaves:
    b = l.per_device * p
    if f > 1:
      if "fsdp" in l.axes:
        rs, gathers = rs + (f - 1) * b, gathers + 2 * (f - 1) * b
      else:
        ar_fsdp += 2 * b * (f - 1) / f
    if d > 1:
      ar_data += 2 * b * (d - 1) / d
    if ep > 1 and "expert" not in l.axes:
      ar_expert += 2 * b * (ep - 1) / ep
    elif ep > 1 and not (l.expert and ep_dispatch):  # gspmd: experts gathered, like fsdp
      rs, gathers = rs + (ep - 1) * b, gathers + 2 * (ep - 1) * b
    if t > 1 and l.expert and ep_dispatch and "tensor" in l.axes:  # whole in shard_map
      rs, gathers = rs + (t - 1) * b, gathers + 2 * (t - 1) * b
  passes = 3 if mc.remat != "none" else 2  # forward (+ recomputed forward) + backward
  tp = 0.0
  if t > 1:
    tp = (sum(2 * passes * cl.tokens for cl in calls) + 2 * n_tok) * mc.d_model * c * (t - 1) / t
  a2a = buf = ids = 0.0
  if ep > 1 and ep_dispatch:
    for i, (kind, rows) in ((i, v[:2]) for i, v in disp.items()):
      a_local = calls[i].tokens * mc.moe.k
      if kind == "capacity":
        buf, ids = rows * mc.d_model * c, 0.0
      elif kind == "padded":
        buf, ids = rows * mc.d_model * c, rows * 4
      else:  # ragged: the rows really sent
        buf, ids = a_local * mc.d_model * c, a_local * 4
      a2a += (2 * passes * buf + (passes - 1) * ids) * (ep - 1) / ep
  traffic = {"grad_reduce_scatter": rs, "grad_all_reduce_data": ar_data,
             "grad_all_reduce_expert": ar_expert, "grad_all_reduce_fsdp": ar_fsdp,
             "weight_all_gather": gathers, "tensor_all_reduce": tp, "expert_all_to_all": a2a}
  traffic["total"] = sum(traffic.values())
  return traffic, buf, ids


def plan(config: Any, sizes: dict[str, int] | None = None, vocab_size: int = 32000,
         platform: str = "tpu") -> dict:
  """Per-device memory (bytes) and per-step traffic (bytes sent) for config on a mesh.

  `platform` decides what "auto" backends resolve to (dropless -> tiled on CPU, ragged
  elsewhere; the expert-parallel exchange "auto" -> padded on CPU, ragged elsewhere).
  """
  if platform not in PLATFORMS:
    raise ValueError(f"platform {platform!r} is not allowed: use one of {PLATFORMS}")
  mc = LMConfig.from_config(config.model, seq_len=config.data.seq_len, vocab_size=vocab_size)
  mesh_cfg = config.get("mesh")
  if mc.moe is not None and mesh_cfg is not None:  # as moejax.train.loop.build_model
    mode = "all_to_all" if mesh_cfg.expert_dispatch == "auto" else mesh_cfg.expert_dispatch
    mc = dataclasses.replace(mc, moe=dataclasses.replace(
        mc.moe, expert_dispatch=mode, ep_exchange=mesh_cfg.get("ep_exchange", "auto")))
  sizes = dict(sizes or {a: 1 for a in parallel.AXES})
  for a in parallel.AXES:
    sizes.setdefault(a, 1)
  with jax.default_device(jax.devices("cpu")[0]):
    leaves = param_leaves(mc, sizes, parallel.rules_from_config(mesh_cfg))
  c, ep = BYTES[mc.compute_dtype], sizes["expert"]
  seqs = config.data.batch_size / (sizes["data"] * sizes["fsdp"] * ep)
  n_tok = seqs * config.data.seq_len
  calls = layer_calls(mc, config.data.seq_len, seqs)
  disp = {}  # call index -> (kind, rows, kept, allocated, cotangent bytes)
  for i, cl in enumerate(calls):
    if cl.kind == "moe":  # training capacity factor
      kind, rows = dispatch_rows(mc, cl.tokens, ep, platform, mc.moe.capacity_factor)
      disp[i] = (kind, rows) + dispatch_bytes(mc, kind, rows, cl.tokens, sizes["tensor"])
  ep_dispatch = (mc.moe is not None and mc.moe.expert_dispatch != "gspmd"
                 and mc.moe.router != "expert_choice" and ep > 1)  # the shard_map path
  args = (mc, leaves, sizes, calls, disp, n_tok, ep_dispatch)
  traffic, buf, ids = _traffic(*args)
  first = next(iter(disp.values()), None)
  return {
      "mesh": sizes, "devices": math.prod(sizes.values()), "platform": platform,
      "total_params": sum(l.size for l in leaves),
      "params_per_device": sum(l.per_device for l in leaves),
      "tokens_per_device": n_tok, "layer_calls": len(calls), "moe_layers": len(disp),
      "memory_bytes": _memory(*args), "traffic_bytes_per_step": traffic,
      "dispatch": None if first is None else {
          "kind": first[0], "rows_per_layer": first[1],
          "receive_buffer_bytes_per_layer": first[1] * mc.d_model * c,
          "saved_bytes_per_layer": first[2], "allocated_bytes_per_layer": first[3]},
      "all_to_all_buffer_bytes": buf, "all_to_all_ids_bytes": ids,
  }


def _gib(x: float) -> str:
  return f"{x / 2 ** 30:.2f} GiB"


def _count(n: float) -> str:
  return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.3f}M"


def format_plan(name: str, r: dict) -> str:
  """The plan as the CLI prints it (GiB per device)."""
  mem = r["memory_bytes"]
  lines = [f"{name} on {r['mesh']} ({r['devices']} devices, {r['platform']}): "
           f"{_count(r['total_params'])} params, {_count(r['params_per_device'])} per device, "
           f"{r['tokens_per_device']:.0f} tokens per device per step",
           "  memory per device (GiB)"]
  for group, keys in (("step", STEADY), ("forward/backward", BACKWARD_PHASE),
                      ("optimizer update", ("optimizer_update",))):
    lines.append(f"    {group}: " + ", ".join(f"{k} {mem[k] / 2 ** 30:.2f}" for k in keys))
  phase = sum(mem[k] for k in BACKWARD_PHASE)
  peak = "forward/backward" if phase >= mem["optimizer_update"] else "optimizer update"
  lines.append(f"    total {_gib(mem['total'])} (step + the larger phase: {peak})")
  dsp = r["dispatch"]
  if dsp is not None:
    worst = " (worst case: ep x local assignments)" if dsp["kind"] in ("ragged", "padded") else ""
    lines.append(f"  dispatch ({dsp['kind']}): {dsp['rows_per_layer']:.0f} rows per MoE layer"
                 f"{worst}: receive buffer {_gib(dsp['receive_buffer_bytes_per_layer'])} per "
                 f"layer; one forward allocates {_gib(dsp['allocated_bytes_per_layer'])} of row "
                 f"buffers per layer, {_gib(dsp['saved_bytes_per_layer'])} stay for its backward")
  lines.append("  traffic per device per step (GiB sent)")
  lines.append("    " + ", ".join(f"{k} {v / 2 ** 30:.2f}"
                                   for k, v in r["traffic_bytes_per_step"].items()))
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="moejax.planning", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True)
  p.add_argument("--mesh", default="data=1", help="e.g. data=2,fsdp=16,tensor=1,expert=8")
  p.add_argument("--vocab_size", type=int, default=32000)
  p.add_argument("--platform", default="tpu", choices=PLATFORMS,
                 help="what 'auto' dispatch backends and exchanges resolve to")
  a, rest = p.parse_known_args(argv)
  config = load_config(a.config, rest)
  sizes = {k: int(v) for k, v in (kv.split("=") for kv in a.mesh.split(",") if kv)}
  print(format_plan(config.name, plan(config, sizes, a.vocab_size, a.platform)))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
