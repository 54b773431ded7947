"""Pallas grouped matmul vs ragged_dot vs a dense matmul of the same FLOPs, in TFLOP/s.

    python benchmarks/gmm.py [--quick] [--all-kn] [--reps 5] [--budget-s 300]
                             [--tiling 128,64,128] [--out benchmarks/results/gmm.json]

What is timed (bfloat16 inputs, float32 accumulation, bf16 outputs), per shape (M rows,
K, N) and number of groups G, for balanced and skewed group sizes:
  gmm         moejax.kernels.gmm.gmm(lhs[M,K], rhs[G,K,N], sizes) -> [M,N]
  tgmm        moejax.kernels.gmm.tgmm(lhs[M,K], grad[M,N], sizes) -> [G,K,N]
  ragged      jax.lax.ragged_dot(lhs, rhs, sizes)             (the XLA counterpart of gmm)
  ragged_t    d rhs of ragged_dot by jax.vjp                  (the XLA counterpart of tgmm)
  dense       lhs[M,K] @ w[K,N]: the same 2 M K N FLOPs as one matmul (the roofline)
Every variant does 2 M K N FLOPs. Group sizes are data (not shapes), so balanced and
skewed share a compilation: balanced = M / G each; skewed = Zipf, size_g proportional to
1 / (rank + 1) with ranks shuffled (the largest group holds ~1/H_G of the rows).
Timing: one call = jitted function + block_until_ready; each repetition runs every variant
once, in an order rotated every repetition (no variant always runs after the same one);
the value is the median over repetitions, and ratios to dense are medians of per-repetition
ratios. Compilation is excluded (first call). Each shape's gmm output is also compared with
ragged_dot's (max |diff| / max |ragged|, recorded, never asserted). A variant slower than
SLOW_S per call gets 2 repetitions only.

Full run (GPU/TPU): M in {16384, 65536}, G in {8, 64, 256}, K = N in {2048, 4096, 7168}
(--all-kn: every K, N pair); stops starting new shapes after --budget-s seconds and says
so ("truncated"). Goals from the issue (H100/H200-class GPU): balanced gmm >= 70% of
dense and >= 1.5x ragged_dot; tgmm >= 60% of dense; the summary reports them.
--quick: tiny shapes (M 64, K = N = 32, G 4, tiles 16) in interpret mode on CPU: proves the
script runs (under a minute); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moejax.bench import machine_info, write_json  # noqa: E402
from moejax.kernels import gmm as gmm_lib  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
VARIANTS = ("gmm", "tgmm", "ragged", "ragged_t", "dense")
GOALS = {"gmm_over_dense": 0.70, "gmm_over_ragged": 1.5, "tgmm_over_dense": 0.60}
SLOW_S = 1.0  # a variant slower than this per call gets only 2 repetitions


def group_sizes(m: int, g: int, kind: str) -> np.ndarray:
  """Balanced (as equal as integers allow) or Zipf-skewed sizes summing to m."""
  if kind == "balanced":
    w = np.ones(g)
  else:
    w = 1.0 / (1.0 + np.random.default_rng(g).permutation(g))
  sizes = np.floor(w / w.sum() * m).astype(np.int64)
  sizes[np.argsort(-w, kind="stable")[: m - sizes.sum()]] += 1
  assert sizes.sum() == m
  return sizes.astype(np.int32)


def make_fns(tiling, impl):
  kw = dict(tiling=tiling, impl=impl)
  return {
      "gmm": jax.jit(lambda lhs, rhs, sizes, grad, w: gmm_lib.gmm(lhs, rhs, sizes, **kw)),
      "tgmm": jax.jit(lambda lhs, rhs, sizes, grad, w: gmm_lib.tgmm(lhs, grad, sizes, **kw)),
      "ragged": jax.jit(lambda lhs, rhs, sizes, grad, w: jax.lax.ragged_dot(lhs, rhs, sizes)),
      "ragged_t": jax.jit(lambda lhs, rhs, sizes, grad, w: jax.vjp(
          lambda b: jax.lax.ragged_dot(lhs, b, sizes), rhs)[1](grad)[0]),
      "dense": jax.jit(lambda lhs, rhs, sizes, grad, w: lhs @ w),
  }


def _time(f, args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(f(*args))
  return time.perf_counter() - t0


def bench_shape(fns, m: int, k: int, n: int, g: int, reps: int) -> dict:
  bf16 = jnp.bfloat16
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)  # generated on the device
  lhs = jax.random.normal(k1, (m, k), bf16)
  grad = jax.random.normal(k2, (m, n), bf16)
  rhs = jax.random.normal(k3, (g, k, n), bf16) * jnp.asarray(1 / np.sqrt(k), bf16)  # no f32 copy
  w = rhs[0]
  flops = 2.0 * m * k * n
  out = {"M": m, "K": k, "N": n, "G": g, "flops": flops, "dists": {}}
  compile_s = {}
  for dist in ("balanced", "skewed"):
    sizes = jnp.asarray(group_sizes(m, g, dist))
    args = (lhs, rhs, sizes, grad, w)
    live = {}
    for name in VARIANTS:
      try:
        t = _time(fns[name], args)  # compile (first dist) + first run
        compile_s.setdefault(name, t)
        live[name] = fns[name]
      except Exception as e:  # e.g. out of memory: record, keep going
        out.setdefault("errors", {})[f"{dist}/{name}"] = f"{type(e).__name__}: {e}"[:300]
    got, want = fns["gmm"](*args), fns["ragged"](*args)
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
    scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    del got, want
    times = {v: [] for v in live}
    ratios = {v: [] for v in live if v != "dense"}
    order = list(live)
    for rep in range(reps):
      this = {}
      for j in range(len(order)):
        name = order[(j + rep) % len(order)]
        if rep >= 2 and min(times[name]) > SLOW_S:
          continue  # a very slow variant (e.g. XLA's ragged_dot at large G): 2 reps only
        this[name] = _time(live[name], args)
        times[name].append(this[name])
      for name in ratios:
        if "dense" in this:
          ratios[name].append(this["dense"] / this[name])  # rate relative to dense
    row = {"sizes_max_over_mean": float(np.max(sizes) / np.mean(sizes)),
           "gmm_max_rel_err_vs_ragged": err / max(scale, 1e-30), "variants": {}}
    for name, ts in times.items():
      med = statistics.median(ts)
      row["variants"][name] = {"median_s": med, "times_s": ts, "tflops": flops / med / 1e12}
      if name in ratios and ratios[name]:
        row["variants"][name]["rate_over_dense"] = statistics.median(ratios[name])
    v = row["variants"]
    if "gmm" in v and "ragged" in v:
      row["gmm_over_ragged"] = v["ragged"]["median_s"] / v["gmm"]["median_s"]
    if "tgmm" in v and "ragged_t" in v:
      row["tgmm_over_ragged_t"] = v["ragged_t"]["median_s"] / v["tgmm"]["median_s"]
    out["dists"][dist] = row
    print(f"M={m:6d} K={k:5d} N={n:5d} G={g:4d} {dist:8s} "
          + "  ".join(f"{name} {v[name]['tflops']:8.4g}" for name in v)
          + f"  TFLOP/s  (gmm err {row['gmm_max_rel_err_vs_ragged']:.1e})", flush=True)
  out["compile_plus_first_s"] = compile_s
  return out


def summarize(results: list[dict]) -> dict:
  """Medians over shapes of the balanced ratios the goals are stated in, and per-goal
  pass counts."""
  bal = [r["dists"]["balanced"] for r in results if "balanced" in r["dists"]]
  def ratios(key_fn):
    vals = [key_fn(b) for b in bal]
    return [x for x in vals if x is not None]
  get = lambda name: (lambda b: b["variants"].get(name, {}).get("rate_over_dense"))
  table = {"gmm_over_dense": ratios(get("gmm")), "tgmm_over_dense": ratios(get("tgmm")),
           "gmm_over_ragged": ratios(lambda b: b.get("gmm_over_ragged")),
           "ragged_over_dense": ratios(get("ragged"))}
  out = {}
  for key, vals in table.items():
    if not vals:
      continue
    out[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                "shapes": len(vals)}
    if key in GOALS:
      out[key].update(goal=GOALS[key], shapes_meeting_goal=sum(v >= GOALS[key] for v in vals))
  return out


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true", help="tiny shapes, interpret mode on CPU")
  p.add_argument("--all-kn", action="store_true", help="every (K, N) pair, not only K = N")
  p.add_argument("--reps", type=int, default=None, help="repetitions (default 5, quick 3)")
  p.add_argument("--budget-s", type=float, default=300.0,
                 help="start no new shape after this many seconds")
  p.add_argument("--tiling", default=None, help="tm,tk,tn (default: the platform's)")
  p.add_argument("--impl", default=None, choices=gmm_lib.IMPLS)
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/gmm.json"))
  a = p.parse_args()
  t_start = time.perf_counter()
  if a.quick:
    shapes, groups, reps = [(64, 32, 32)], [4], a.reps or 3
    tiling = (16, 16, 16)
  else:
    kn = [4096, 2048, 7168]  # the most representative first, in case the budget runs out
    kns = list(itertools.product(kn, kn)) if a.all_kn else [(x, x) for x in kn]
    shapes = [(m, k, n) for k, n in kns for m in (16384, 65536)]
    groups, reps, tiling = [8, 64, 256], a.reps or 5, None
  if a.tiling:
    tiling = tuple(int(t) for t in a.tiling.split(","))
  platform = jax.default_backend()
  impl = a.impl or ("mosaic" if platform == "tpu" else "triton")
  used_tiling = tiling or gmm_lib.DEFAULT_TILING.get(platform, gmm_lib.DEFAULT_TILING["cpu"])
  print(f"gmm benchmark on {platform} ({jax.devices()[0].device_kind}), impl {impl}, tiling "
        f"{used_tiling}, interpret {platform == 'cpu'}", flush=True)
  fns = make_fns(tiling, impl)
  out = {"benchmark": "gmm", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
         "machine": {**machine_info(), "device_kind": jax.devices()[0].device_kind},
         "settings": {"quick": a.quick, "reps": reps, "dtype": "bfloat16", "impl": impl,
                      "tiling": list(used_tiling), "interpret": platform == "cpu",
                      "budget_s": a.budget_s, "all_kn": a.all_kn},
         "goals": GOALS, "summary": {}, "complete": False, "truncated": False, "results": []}
  results = out["results"]
  for (m, k, n), g in itertools.product(shapes, groups):
    if time.perf_counter() - t_start > a.budget_s:
      out["truncated"] = True
      print(f"budget of {a.budget_s:.0f} s spent: stopping before M={m} K={k} N={n} G={g}")
      break
    try:
      results.append(bench_shape(fns, m, k, n, g, reps))
    except Exception as e:  # record and continue (e.g. out of memory for the largest)
      results.append({"M": m, "K": k, "N": n, "G": g, "error": f"{type(e).__name__}: {e}"[:500]})
      print(f"M={m} K={k} N={n} G={g}: {results[-1]['error']}", flush=True)
    jax.clear_caches()
    # Written after every shape: a run killed from outside still leaves its results.
    out["summary"] = summarize([r for r in results if "dists" in r])
    out["wall_s"] = time.perf_counter() - t_start
    write_json(a.out, out)
  out["complete"] = not out["truncated"]
  out["wall_s"] = time.perf_counter() - t_start
  write_json(a.out, out)
  for key, s in out["summary"].items():
    goal = f" (goal >= {s['goal']}: {s['shapes_meeting_goal']}/{s['shapes']} shapes)" \
        if "goal" in s else ""
    print(f"{key}: median {s['median']:.2f} [{s['min']:.2f}, {s['max']:.2f}]{goal}")
  print(f"wrote {a.out} ({out['wall_s']:.0f} s)")


if __name__ == "__main__":
  main()
