"""Train-step speed: step time, tokens/s and MFU against a matmul peak measured here.

    python benchmarks/train_step.py [--reps 5] [--steps 10] [--out benchmarks/results/train_step.json]

Both configs and the peak are measured in the same run (this machine is shared and
noisy). Step times are medians over `reps` repetitions of `steps` steps each, after a
compile + warm-up step. Synthetic tokens: this times the step, not the data pipeline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moejax import flops as flops_lib  # noqa: E402
from moejax.bench import machine_info, write_json  # noqa: E402
from moejax.config import load_config  # noqa: E402
from moejax.train.loop import build_model, init_state  # noqa: E402
from moejax.train.optimizer import make_optimizer  # noqa: E402
from moejax.train.steps import make_train_step  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")

CONFIGS = {
    "quickstart": [],
    "d512": ["model.d_model=512", "model.num_heads=8", "model.num_kv_heads=4",
             "model.head_dim=64", "model.d_ff=1536", "model.num_layers=4",
             "data.seq_len=256", "data.batch_size=8"],
}


def peak_flops(reps: int) -> dict:
  vals = [flops_lib.measure_matmul_peak(1024, reps=5) for _ in range(reps)]
  return {"median": statistics.median(vals), "all": vals}


def bench_config(name: str, overrides: list[str], reps: int, steps: int, peak: float) -> dict:
  config = load_config(os.path.join(ROOT, "configs/quickstart.py"), overrides)
  model, mc = build_model(config, 257)
  acct = flops_lib.account(mc, config.data.seq_len)
  tx, _ = make_optimizer(config.optim, config.train.num_steps)
  state = init_state(model, tx, 0, config.data.seq_len)
  b, t = config.data.batch_size, config.data.seq_len
  toks = jax.random.randint(jax.random.PRNGKey(0), (b, t + 1), 0, 256, jnp.int32)
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
  step = jax.jit(make_train_step(type(model)(mc, deterministic=False)), donate_argnums=(0,))
  t0 = time.perf_counter()
  state, m = step(state, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, batch)
    jax.block_until_ready(m)
    times.append((time.perf_counter() - t0) / steps)
  st = statistics.median(times)
  tps = b * t / st
  return {
      "config": name, "overrides": overrides, "batch": b, "seq_len": t,
      "total_params": acct.total_params, "train_flops_per_token": acct.train_flops_per_token,
      "compile_plus_first_step_s": compile_s, "step_time_s": st, "step_times_s": times,
      "tokens_per_s": tps, "achieved_gflops": acct.train_flops_per_token * tps / 1e9,
      "mfu": acct.train_flops_per_token * tps / peak,
  }


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/train_step.json"))
  a = p.parse_args()
  peak = peak_flops(a.reps)
  print(f"matmul peak (f32, 1024^3): {peak['median'] / 1e9:.1f} GFLOP/s")
  rows = []
  for name, ov in CONFIGS.items():
    r = bench_config(name, ov, a.reps, a.steps, peak["median"])
    rows.append(r)
    print(f"{name:12s} params {r['total_params'] / 1e6:6.2f}M  step {r['step_time_s'] * 1e3:7.1f} ms"
          f"  {r['tokens_per_s'] / 1e3:6.1f}k tok/s  {r['achieved_gflops']:6.1f} GFLOP/s"
          f"  MFU {r['mfu']:.1%}")
  out = {"benchmark": "train_step", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
         "machine": machine_info(),
         "matmul_peak_flops": peak, "results": rows}
  write_json(a.out, out)
  print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
