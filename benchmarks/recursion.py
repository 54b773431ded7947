"""Recursive transformers and Mixture-of-Recursions: train-step cost and KV-cache size.

    python benchmarks/recursion.py [--reps 7] [--steps 2] [--quick] [--out PATH]

1. Step time of the jitted train step (fwd + bwd + AdamW update) at equal dims for
   vanilla (6 unique layers), recursive (cycle: 2 unique layers x 3 loops), and MoR
   (expert choice at capacities (1, 1, 1) and (1, 0.5, 0.25); token choice at
   (1, 0.5, 0.25)). The machine is shared and noisy: every variant runs `steps` steps per
   round, the variants interleaved in an order rotated every round; step times are
   medians over rounds and ratios are medians of per-round ratios. Each MoR variant's
   time fraction (its step time over the full-recursion step) is compared with its
   analytic FLOP fraction (step r carries ceil(cap_r * T) tokens through the shared block,
   attending among themselves; plus the router, embedding and unembedding). The goal:
   time fraction <= 1.2 x FLOP fraction.
2. Decode KV-cache bytes at one sequence length (from the cache that
   `moejax.generate.init_cache` builds) for vanilla, recursive, MoR with recursion-wise
   caching (`kv_cache_fractions`) and MoR with KV sharing; and a real `generate` run of a
   random-init MoR model, reporting how many entries each loop's cache filled.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moejax import flops as flops_lib  # noqa: E402
from moejax.bench import machine_info, write_json  # noqa: E402
from moejax.config import base_config, validate  # noqa: E402
from moejax.generate import generate, init_cache  # noqa: E402
from moejax.models.lm import LM, LMConfig  # noqa: E402
from moejax.train.loop import init_state  # noqa: E402
from moejax.train.optimizer import make_optimizer  # noqa: E402
from moejax.train.steps import make_train_step  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
FULL_DIMS = {"d_model": 256, "num_heads": 4, "num_kv_heads": 2, "head_dim": 64, "d_ff": 768,
             "num_layers": 6, "vocab_size": 264, "seq_len": 256, "batch": 4,
             "cache_len": 256, "prompt": 32, "new_tokens": 32}
QUICK_DIMS = {"d_model": 64, "num_heads": 2, "num_kv_heads": 1, "head_dim": 32, "d_ff": 128,
              "num_layers": 6, "vocab_size": 264, "seq_len": 32, "batch": 2,
              "cache_len": 32, "prompt": 8, "new_tokens": 8}
LOOPS = 3
HALVING = (1.0, 0.5, 0.25)
# label -> model.recursion overrides (None: no recursion)
TRAIN_VARIANTS: dict[str, dict | None] = {
    "vanilla": None,
    "recursive": {"strategy": "cycle", "num_loops": LOOPS},
    "mor_expert_1_1_1": {"strategy": "cycle", "num_loops": LOOPS, "router": "expert",
                         "capacities": (1.0, 1.0, 1.0)},
    "mor_expert_1_.5_.25": {"strategy": "cycle", "num_loops": LOOPS, "router": "expert",
                            "capacities": HALVING},
    "mor_token_1_.5_.25": {"strategy": "cycle", "num_loops": LOOPS, "router": "token",
                           "capacities": HALVING},
}
CACHE_VARIANTS: dict[str, dict | None] = {
    "vanilla": None,
    "recursive": {"strategy": "cycle", "num_loops": LOOPS},
    "mor_expert_full_slots": {"strategy": "cycle", "num_loops": LOOPS, "router": "expert",
                              "capacities": HALVING},
    "mor_expert_recursion_wise": {"strategy": "cycle", "num_loops": LOOPS, "router": "expert",
                                  "capacities": HALVING, "kv_cache_fractions": HALVING},
    "mor_expert_kv_sharing": {"strategy": "cycle", "num_loops": LOOPS, "router": "expert",
                              "capacities": HALVING, "kv_sharing": True},
}
GOAL = 1.2


def make_config(dims: dict, recursion: dict | None, max_seq_len: int = 0):
  """A validated base config at `dims` with `model.recursion` fields from `recursion`."""
  c = base_config()
  m = c.model
  for f in ("d_model", "num_heads", "num_kv_heads", "head_dim", "d_ff", "num_layers",
            "vocab_size"):
    m[f] = dims[f]
  m.max_seq_len = max_seq_len
  c.data.seq_len, c.data.batch_size = dims["seq_len"], dims["batch"]
  for k, v in (recursion or {}).items():
    m.recursion[k] = v
  r = m.recursion  # expert choice below capacity 1 trains with look-ahead (flagged)
  r.allow_noncausal_training = r.router == "expert" and any(x < 1.0 for x in r.capacities)
  validate(c)
  return c


def lm_config(config) -> LMConfig:
  return LMConfig.from_config(config.model, seq_len=config.data.seq_len,
                              vocab_size=config.model.vocab_size)


def mor_forward_flops(mc: LMConfig, seq_len: int) -> float:
  """Analytic forward matmul FLOPs per token of a cycle-recursive model (MoR or not).

  Step r runs C_r = ceil(cap_r * T) tokens (all T at capacity 1) through the shared
  block, attending over C_r keys (the C_r x C_r score matrix, as computed); the expert
  router scores all T tokens at every step, the token router once. Plus the unembedding.
  """
  rc = mc.recursion
  d, h, k, dh = mc.d_model, mc.num_heads, mc.num_kv_heads, mc.head_dim
  proj = 2 * d * dh * (2 * h + 2 * k)
  ffn = 2 * 3 * d * mc.d_ff
  fwd = 2.0 * d * mc.vocab_size
  for r in range(rc.num_loops):
    c_r = seq_len if rc.router == "none" or rc.capacities[r] >= 1.0 else (
        rc.capacity_tokens(r, seq_len))
    fwd += rc.num_core * (c_r / seq_len) * (proj + ffn + 2 * 2 * c_r * h * dh)
    if rc.router == "expert":
      fwd += 2 * d
  if rc.router == "token":
    fwd += 2 * d * rc.num_loops
  return fwd


def build_train(label: str, dims: dict) -> dict:
  config = make_config(dims, TRAIN_VARIANTS[label])
  mc = lm_config(config)
  tx, _ = make_optimizer(config.optim, config.train.num_steps)
  state = init_state(LM(mc), tx, 0, dims["seq_len"])
  step = jax.jit(make_train_step(LM(mc, deterministic=False)), donate_argnums=(0,))
  acct = flops_lib.account(mc, dims["seq_len"])
  info = {"recursion": TRAIN_VARIANTS[label] or {},
          "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
          "account_forward_flops_per_token": acct.forward_flops_per_token}
  if mc.recursion is not None:
    info["analytic_forward_flops_per_token"] = mor_forward_flops(mc, dims["seq_len"])
  return {"label": label, "mc": mc, "state": state, "step": step, "info": info}


def bench_train(dims: dict, reps: int, steps: int, labels: list[str]) -> dict:
  b, t = dims["batch"], dims["seq_len"]
  toks = jax.random.randint(jax.random.PRNGKey(0), (b, t + 1), 0, dims["vocab_size"], jnp.int32)
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
  runs = []
  for label in labels:
    r = build_train(label, dims)
    t0 = time.perf_counter()
    r["state"], m = r["step"](r["state"], batch)  # compile + first step
    jax.block_until_ready(m)
    r["info"]["compile_plus_first_step_s"] = time.perf_counter() - t0
    r["state"], m = r["step"](r["state"], batch)  # one warm step
    jax.block_until_ready(m)
    r["times"] = []
    print(f"  built {label:22s} params {r['info']['params'] / 1e6:5.2f}M  compile+1st "
          f"{r['info']['compile_plus_first_step_s']:5.1f} s", flush=True)
    runs.append(r)
  for rep in range(reps):
    # Rotate the order every round so no variant always follows the same one.
    for j in range(len(runs)):
      r = runs[(j + rep) % len(runs)]
      t0 = time.perf_counter()
      for _ in range(steps):
        r["state"], m = r["step"](r["state"], batch)
      jax.block_until_ready(m)
      r["times"].append((time.perf_counter() - t0) / steps)
      r["last_metrics"] = m
    print(f"  round {rep + 1}/{reps}: " + "  ".join(
        f"{r['label']} {r['times'][-1] * 1e3:.0f}ms" for r in runs), flush=True)

  by = {r["label"]: r for r in runs}
  out = {}
  for r in runs:
    row = dict(r["info"])
    row["step_time_s"] = statistics.median(r["times"])
    row["step_times_s"] = r["times"]
    row["tokens_per_s"] = b * t / row["step_time_s"]
    m = jax.device_get(r["last_metrics"])
    row["last_loss"] = float(m["loss"])
    if "mor_stats" in m:
      row["mor_active_fraction_per_step"] = [float(x) for x in m["mor_stats"]["active_fraction"]]
      row["mor_mean_depth"] = float(m["mor_stats"]["mean_depth"])
    out[r["label"]] = row

  for r in runs:
    if not r["label"].startswith("mor_"):
      continue
    row = out[r["label"]]
    for base in ("recursive", "mor_expert_1_1_1"):
      if base not in by or base == r["label"]:
        continue
      flop_frac = (row["analytic_forward_flops_per_token"]
                   / by[base]["info"]["analytic_forward_flops_per_token"])
      per_round = [a / c for a, c in zip(r["times"], by[base]["times"])]
      time_frac = statistics.median(per_round)
      ratio = time_frac / flop_frac
      row[f"vs_{base}"] = {
          "flop_fraction": flop_frac,
          "account_flop_fraction": (row["account_forward_flops_per_token"]
                                    / by[base]["info"]["account_forward_flops_per_token"]),
          "time_fraction": time_frac,
          "time_fraction_of_medians": row["step_time_s"] / out[base]["step_time_s"],
          "time_fraction_per_round": per_round,
          "ratio_time_over_flop_fraction": ratio,
          f"meets_goal_le_{GOAL}": bool(ratio <= GOAL),
      }
      print(f"  {r['label']:22s} vs {base:18s} flop frac {flop_frac:.3f}  time frac "
            f"{time_frac:.3f}  ratio {ratio:.2f} ({'ok' if ratio <= GOAL else 'over'} {GOAL})")
  return out


def cache_bytes(cache) -> dict:
  """K/V bytes (leaves named k, v, k_<n>, v_<n>) and total bytes of a decode cache."""
  flat = jax.tree_util.tree_flatten_with_path(cache)[0]
  kv, total, kv_arrays = 0, 0, 0
  for path, x in flat:
    name = str(getattr(path[-1], "key", path[-1]))
    total += x.nbytes
    if name.split("_")[0] in ("k", "v"):
      kv += x.nbytes
      kv_arrays += 1
  return {"kv_bytes": int(kv), "total_bytes": int(total), "kv_arrays": kv_arrays,
          "leaves": {"/".join(str(getattr(p, "key", p)) for p in path): list(x.shape)
                     for path, x in flat}}


def bench_cache(dims: dict) -> dict:
  s = dims["cache_len"]
  out = {}
  for label, rec in CACHE_VARIANTS.items():
    mc = lm_config(make_config(dims, rec, max_seq_len=s))
    row = {"recursion": rec or {}, "max_seq_len": s, "batch": 1}
    row.update(cache_bytes(init_cache(LM(mc, decode=True), 1)))
    out[label] = row
  base = out["vanilla"]
  for label, row in out.items():
    row["kv_ratio_to_vanilla"] = row["kv_bytes"] / base["kv_bytes"]
    row["total_ratio_to_vanilla"] = row["total_bytes"] / base["total_bytes"]
    print(f"  cache {label:26s} K/V {row['kv_bytes'] / 1024:8.1f} KiB  total "
          f"{row['total_bytes'] / 1024:8.1f} KiB  x{row['kv_ratio_to_vanilla']:.3f} vanilla")
  return out


def _counters(cache) -> dict:
  """{"<layer>/index_<slot>": per-batch count} of the compacted caches."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(cache)[0]:
    name = str(getattr(path[-1], "key", path[-1]))
    if name.startswith("index"):
      layer = str(getattr(path[-3], "key", path[-3]))
      out[f"{layer}/{name}"] = np.asarray(x).tolist()
  return out


def bench_generate(dims: dict) -> dict:
  """generate() with a random-init MoR model; then the same prefill + greedy decode by hand
  to read how many entries each loop's compacted cache received."""
  p, n = dims["prompt"], dims["new_tokens"]
  rec = dict(CACHE_VARIANTS["mor_expert_recursion_wise"])
  mc = lm_config(make_config(dict(dims, seq_len=p + n), rec))
  params = nn.unbox(LM(mc).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  prompt = jax.random.randint(jax.random.PRNGKey(1), (1, p), 0, dims["vocab_size"], jnp.int32)
  t0 = time.perf_counter()
  tokens = jax.block_until_ready(generate(mc, params, prompt, n))
  gen_s = time.perf_counter() - t0

  model = LM(mc, decode=True)
  cache = init_cache(model, 1)
  pos = jnp.arange(p, dtype=jnp.int32)[None]
  logits, mut = jax.jit(lambda c: model.apply({"params": params, "cache": c}, prompt, pos,
                                              mutable=["cache"]))(cache)
  after_prefill = _counters(mut["cache"])
  step = jax.jit(lambda c, tok, i: model.apply({"params": params, "cache": c}, tok[:, None],
                                               jnp.full((1, 1), i, jnp.int32), mutable=["cache"]))
  tok = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
  cache, mine = mut["cache"], [tok]
  for i in range(n - 1):
    logits, mut = step(cache, tok, p + i)
    cache = mut["cache"]
    tok = jnp.argmax(logits[:, 0], -1).astype(jnp.int32)
    mine.append(tok)
  mine = jnp.concatenate([prompt, jnp.stack(mine, axis=1)], axis=1)
  rc = mc.recursion
  slots = [max(1, math.ceil(f * mc.max_seq_len)) for f in rc.kv_cache_fractions]
  seen = p + n - 1  # the last sampled token is never fed back
  counts = _counters(cache)
  top = cache["recursion"]
  per_loop = {}
  for key, v in counts.items():
    loop = int(key.rsplit("_", 1)[1]) if key.rsplit("/", 1)[1] != "index" else 0
    over = int(np.asarray(top.get(f"overflow_{loop}", np.zeros(1)))[0])
    per_loop[key] = {"loop": loop, "stored": v[0], "slots": slots[loop], "tokens_fed": seen,
                     "stored_fraction": v[0] / seen,
                     "cache_fraction": rc.kv_cache_fractions[loop],
                     "overflow_exited": over, "routed": v[0] + over}
  print(f"  generate: {p} + {n} tokens in {gen_s:.1f} s (incl. compile); entries per loop: "
        + ", ".join(f"{k} {v['stored']}/{v['slots']} (+{v['overflow_exited']} exited)"
                   for k, v in per_loop.items()))
  return {"recursion": rec, "prompt_len": p, "new_tokens": n, "max_seq_len": mc.max_seq_len,
          "generate_s_incl_compile": gen_s, "output_shape": list(tokens.shape),
          "manual_replay_matches_generate": bool(jnp.array_equal(mine, tokens)),
          "router_threshold": rc.threshold, "counters_after_prefill": after_prefill,
          "entries_after_decode": per_loop}


INFER_DIMS = {"d_model": 256, "num_heads": 4, "num_kv_heads": 2, "head_dim": 64, "d_ff": 768,
              "num_layers": 6, "vocab_size": 264, "seq_len": 256, "prompt": 128,
              "new_tokens": 128, "batches": (8, 32)}
QUICK_INFER_DIMS = {"d_model": 64, "num_heads": 2, "num_kv_heads": 1, "head_dim": 32,
                    "d_ff": 128, "num_layers": 6, "vocab_size": 264, "seq_len": 32,
                    "prompt": 16, "new_tokens": 16, "batches": (8,)}
THIRDS = (1.0, 2 / 3, 1 / 3)
INFER_VARIANTS: dict[str, dict | None] = {
    "vanilla": None,
    "recursive": {"strategy": "cycle", "num_loops": LOOPS},
    "mor_expert": {"strategy": "cycle", "num_loops": LOOPS, "router": "expert",
                   "capacities": THIRDS},
    "mor_token": {"strategy": "cycle", "num_loops": LOOPS, "router": "token",
                  "capacities": THIRDS, "balance": "bias"},
}
DECODE_GOAL = 1.4  # MoR decode tokens/s over the recursive model's, at mean depth 2/3


def _stats_fn(model):
  return jax.jit(lambda v, x: model.apply(v, x, mutable=["mor_stats"])[1]["mor_stats"])


def calibrate_routers(mc: LMConfig, variables: dict, x_BT) -> dict:
  """Biases that make a random-init router send on about 2/3 of the tokens at loop 2 and
  1/3 at loop 3 (the capacities), so the capacity buffers are what routing needs.

  Expert choice: router_bias[r] (a token goes on while sigmoid(score) > threshold);
  token choice: the loss-free selection bias over depths (mor_bias), a third of the
  tokens at each depth. Bisection on one batch (each share is monotone in its bias);
  the fractions reached are reported, not assumed.
  """
  rc = mc.recursion
  stats = _stats_fn(LM(mc))

  def measure():
    return jax.device_get(stats(variables, x_BT)["recursion"])

  def bisect(setter, share, target, lo=-20.0, hi=20.0, steps=40):
    for _ in range(steps):  # share(bias) increases with the bias
      mid = (lo + hi) / 2
      setter(mid)
      lo, hi = (lo, mid) if share(measure()) > target else (mid, hi)
    setter((lo + hi) / 2)

  def set_bias(tree, key, i):
    def setter(value):
      b = np.array(tree[key])
      b[i] = value
      tree[key] = jnp.asarray(b, jnp.float32)
    return setter

  if rc.router == "expert":  # the share the router wants: kept + cut by the capacity rule
    tree = variables["params"]["recursion"]
    for r in (1, 2):
      bisect(set_bias(tree, "router_bias", r),
             lambda st, r=r: st["active_fraction"][r] + st["capacity_cut"][r], THIRDS[r])
  else:
    tree = variables["mor_bias"]["recursion"]
    for _ in range(3):
      bisect(set_bias(tree, "bias", 0), lambda st: st["depth_load"][0], 1 / 3)
      bisect(set_bias(tree, "bias", 2), lambda st: st["depth_load"][2], 1 / 3)
  st = measure()
  return {"active_fraction": [float(a) for a in st["active_fraction"]],
          "capacity_cut": [float(a) for a in st["capacity_cut"]],
          "mean_depth": float(st["mean_depth"])}


def _timed(fn, reps: int) -> list[float]:
  out = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return out


def build_inference(label: str, dims: dict, b: int) -> dict:
  """Prefill (eval forward over T tokens) and a jitted decode scan of new_tokens steps.

  Decoding is teacher-forced on the same random tokens (prompt + new_tokens = T): a
  step's cost does not depend on which token it feeds, and the routing then equals the
  calibrated full forward's (cached decoding equals the full forward), so the decode
  steps run at the measured depth, not at a random-init model's greedy loop.
  """
  t, p, n = dims["seq_len"], dims["prompt"], dims["new_tokens"]
  assert p + n == t, "prompt + new_tokens must equal seq_len"
  config = make_config(dict(dims, batch=b), INFER_VARIANTS[label])
  config.model.scan_layers = False  # XLA's cost analysis counts a scanned body once
  mc = lm_config(config)
  params = nn.unbox(LM(mc).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  variables = {"params": params}
  rc = mc.recursion
  if rc is not None and rc.router == "token":
    variables["mor_bias"] = {"recursion": {"bias": jnp.zeros((rc.num_loops,), jnp.float32)}}
  x_BT = jax.random.randint(jax.random.PRNGKey(1), (b, t), 0, dims["vocab_size"], jnp.int32)
  row = {"recursion": INFER_VARIANTS[label] or {}, "batch": b}
  if rc is not None and rc.router != "none":
    row["prefill_routing"] = calibrate_routers(mc, variables, x_BT)
  model = LM(mc)
  prefill = jax.jit(lambda v, x: model.apply(v, x))
  cost = prefill.lower(variables, x_BT).compile().cost_analysis()
  row["prefill_xla_flops"] = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
  jax.block_until_ready(prefill(variables, x_BT))

  dmc = dataclasses.replace(mc, max_seq_len=p + n)
  dmodel = LM(dmc, decode=True)
  prompt = x_BT[:, :p]

  @jax.jit
  def prefill_cache(v):
    cache = init_cache(dmodel, b)
    pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    logits, mut = dmodel.apply({**v, "cache": cache}, prompt, pos, mutable=["cache"])
    return mut["cache"], jnp.argmax(logits[:, -1], -1).astype(jnp.int32)

  def make_decode(with_stats: bool):
    cols = ["cache", "mor_stats"] if with_stats else ["cache"]

    @jax.jit
    def decode(v, cache, tok):
      del tok  # teacher-forced: step i feeds token p + i
      def step(cache, i):
        tok_B1 = jax.lax.dynamic_slice_in_dim(x_BT, p + i, 1, axis=1)
        logits, mut = dmodel.apply({**v, "cache": cache}, tok_B1,
                                   jnp.full((b, 1), p + i, jnp.int32), mutable=cols)
        depth = (mut["mor_stats"]["recursion"]["mean_depth"] if with_stats
                 else jnp.zeros((), jnp.float32))
        return mut["cache"], (jnp.argmax(logits[:, 0], -1), depth)
      _, (toks, depths) = jax.lax.scan(step, cache, jnp.arange(n))
      return toks, depths
    return decode

  cache, tok = prefill_cache(variables)
  if rc is not None and rc.router != "none":
    _, depths = make_decode(True)(variables, cache, tok)
    row["decode_mean_depth"] = float(jnp.mean(depths))
  decode = make_decode(False)
  t0 = time.perf_counter()
  jax.block_until_ready(decode(variables, cache, tok))
  row["decode_compile_plus_first_s"] = time.perf_counter() - t0
  return {"label": label, "row": row, "prefill": lambda: prefill(variables, x_BT),
          "decode": lambda: decode(variables, cache, tok), "prefill_times": [],
          "decode_times": []}


def bench_inference(dims: dict, reps: int) -> dict:
  """Prefill FLOPs (XLA) and time, decode tokens/s; variants interleaved per round."""
  out = {}
  for b in dims["batches"]:
    runs = []
    for label in INFER_VARIANTS:
      r = build_inference(label, dims, b)
      print(f"  built {label:12s} batch {b}: prefill {r['row']['prefill_xla_flops'] / 1e9:.2f} "
            f"GFLOP" + (f", routing {r['row']['prefill_routing']}" if "prefill_routing"
                        in r["row"] else ""), flush=True)
      runs.append(r)
    for rep in range(reps):
      for j in range(len(runs)):
        r = runs[(j + rep) % len(runs)]
        r["prefill_times"] += _timed(r["prefill"], 3)
        r["decode_times"] += _timed(r["decode"], 1)
    by = {r["label"]: r for r in runs}
    rows = {}
    n_tok = b * dims["new_tokens"]
    for r in runs:
      row = r["row"]
      row["prefill_time_s"] = statistics.median(r["prefill_times"])
      row["prefill_times_s"] = r["prefill_times"]
      row["decode_time_s"] = statistics.median(r["decode_times"])
      row["decode_times_s"] = r["decode_times"]
      row["decode_tokens_per_s"] = n_tok / row["decode_time_s"]
      rows[r["label"]] = row
    rec = rows["recursive"]
    for label in ("mor_expert", "mor_token"):
      row = rows[label]
      depth_frac = row["prefill_routing"]["mean_depth"] / LOOPS
      flop_frac = row["prefill_xla_flops"] / rec["prefill_xla_flops"]
      per_round_p = [statistics.median(a) / statistics.median(c) for a, c in zip(
          np.split(np.array(by[label]["prefill_times"]), reps),
          np.split(np.array(by["recursive"]["prefill_times"]), reps))]
      time_frac = statistics.median(per_round_p)
      speedup = statistics.median([c / a for a, c in zip(by[label]["decode_times"],
                                                         by["recursive"]["decode_times"])])
      row["vs_recursive"] = {
          "mean_depth_fraction": depth_frac, "prefill_flop_fraction": flop_frac,
          "flops_goal_met": bool(flop_frac <= depth_frac * 1.05),
          "prefill_time_fraction": time_frac,
          "prefill_time_fraction_spread": [min(per_round_p), max(per_round_p)],
          "prefill_time_goal_met": bool(time_frac <= 1.2 * depth_frac),
          "decode_speedup": speedup,
          "decode_speedup_per_round": [c / a for a, c in zip(
              by[label]["decode_times"], by["recursive"]["decode_times"])],
          "decode_goal_met": bool(speedup >= DECODE_GOAL),
      }
      v = row["vs_recursive"]
      print(f"  batch {b} {label:10s} depth {depth_frac:.3f}  flops {flop_frac:.3f}  prefill "
            f"time {time_frac:.3f}  decode x{speedup:.2f} (depth {row.get('decode_mean_depth', 0):.2f})",
            flush=True)
    for label, row in rows.items():
      print(f"  batch {b} {label:10s} prefill {row['prefill_time_s'] * 1e3:7.1f} ms  decode "
            f"{row['decode_tokens_per_s']:8.0f} tok/s", flush=True)
    out[f"batch_{b}"] = rows
  return out


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--reps", type=int, default=7, help="interleaved rounds")
  ap.add_argument("--steps", type=int, default=2, help="train steps per variant per round")
  ap.add_argument("--quick", action="store_true", help="tiny dims: a fast smoke run")
  ap.add_argument("--no_token", action="store_true", help="skip MoR token choice")
  ap.add_argument("--out", default="")
  ap.add_argument("--only", default="", help="comma list of sections: train,cache,inference")
  a = ap.parse_args()
  out_path = a.out or os.path.join(
      ROOT, "benchmarks/results", "recursion_quick.json" if a.quick else "recursion.json")
  dims = QUICK_DIMS if a.quick else FULL_DIMS
  labels = [k for k in TRAIN_VARIANTS if not (a.no_token and "token" in k)]
  only = set(a.only.split(",")) if a.only else {"train", "cache", "inference"}
  t_start = time.perf_counter()
  train = cache = gen = infer = None
  if "train" in only:
    print(f"train step ({a.reps} rounds x {a.steps} steps, interleaved)", flush=True)
    train = bench_train(dims, a.reps, a.steps, labels)
  if "cache" in only:
    print("decode KV cache", flush=True)
    cache = bench_cache(dims)
    gen = bench_generate(dims)
  if "inference" in only:
    print(f"inference: prefill and decode ({a.reps} rounds, interleaved)", flush=True)
    infer = bench_inference(QUICK_INFER_DIMS if a.quick else INFER_DIMS, a.reps)
  if os.path.exists(out_path) and only != {"train", "cache", "inference"}:
    with open(out_path) as f:  # a partial run keeps the other sections' last results
      old = json.load(f)
    train = train if train is not None else old.get("train_step")
    cache = cache if cache is not None else old.get("kv_cache")
    gen = gen if gen is not None else old.get("generate")
    infer = infer if infer is not None else old.get("inference")
  acct_counts = ((train or {}).get("mor_expert_1_.5_.25", {}).get(
      "account_forward_flops_per_token", 0) < (train or {}).get("recursive", {}).get(
      "account_forward_flops_per_token", 0))
  out = {
      "benchmark": "recursion", "quick": a.quick, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
      "machine": machine_info(), "dims": dims, "num_loops": LOOPS, "reps": a.reps,
      "steps_per_rep": a.steps, "goal_time_over_flop_fraction": GOAL,
      "account_counts_mor_capacities": bool(acct_counts),
      "train_step": train, "kv_cache": cache, "generate": gen, "inference": infer,
      "inference_dims": QUICK_INFER_DIMS if a.quick else INFER_DIMS,
      "inference_goals": {"prefill_flops": "<= mean depth fraction x recursive x 1.05",
                          "prefill_time": "<= 1.2 x mean depth fraction",
                          "decode_tokens_per_s": f">= {DECODE_GOAL} x recursive"},
      "total_runtime_s": time.perf_counter() - t_start,
      "notes": (
          "Train step = jitted make_train_step (AdamW via make_optimizer, clip 1.0), "
          "LM(deterministic=False), float32, synthetic tokens; step times are medians over "
          "interleaved rounds (order rotated per round), time fractions medians of per-round "
          "ratios. flop_fraction is analytic (mor_forward_flops in this script: step r runs "
          "ceil(cap_r*T) tokens through the 2 shared layers attending over that many keys, "
          "plus router, tied unembedding); account_flop_fraction is moejax.flops.account's. "
          "Only the forward is counted: train = 3x forward for both, so the fraction is the "
          "same; the AdamW update is the same size in both and not scaled by capacity. "
          "KV bytes: K/V arrays of the decode cache from init_cache (batch 1); total adds "
          "the index/pos counters. generate: random-init model, greedy; at inference the "
          "expert router keeps a token while sigmoid(score) > threshold 0.5, and a random-init "
          "router's scores sit near 0 (sigmoid ~0.5), so how many tokens each loop keeps is "
          "arbitrary, not a trained router's behaviour. 'stored' is the loop's cache counter; "
          "a token the router sends on when the loop's cache ('slots') is full exits at that "
          "loop instead (overflow_exited, the cache's overflow_r counter), so no token "
          "attends to keys that were not stored; 'routed' = stored + overflow_exited."),
  }
  write_json(out_path, out)
  print(f"wrote {out_path} in {out['total_runtime_s']:.0f} s")


if __name__ == "__main__":
  main()
