"""Switch / GShard / DeepSeek-style MoE vs a dense model with equal active FLOPs.

Each tiny config trains for the quickstart budget (600 steps x 16 x 128 tokens, 1.2M
tokens) on the embedded corpus with the same data order and seed; the dense model's d_ff
equals the MoE active FFN width (accounting in each row). Results -> results.json and
results.md beside this file.

    python experiments/moe_vs_dense/run.py [--configs dense,switch,...] [--steps 600]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--configs", default="dense,switch,gshard_top2,deepseek",
                 help="config names in configs/moe/, each optionally NAME@field=value[@...] "
                      "for a variant, e.g. deepseek@model.moe.route_scale=1.0")
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "moe_vs_dense"))
  a = p.parse_args()
  path = os.path.join(HERE, "results.json")
  rows = json.load(open(path))["rows"] if os.path.exists(path) else []
  for spec in a.configs.split(","):
    name, *overrides = spec.split("@")
    wd = os.path.join(a.workdir, spec.replace("@", "_").replace("=", "").replace("model.moe.", ""))
    cmd = [sys.executable, "-m", "moejax.train", "--config", f"configs/moe/{name}.py",
           "--workdir", wd, f"--config.train.num_steps={a.steps}",
           "--config.train.progress_bar=false"] + [f"--config.{o}" for o in overrides]
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    with open(os.path.join(wd, "summary.json")) as f:
      s = json.load(f)
    train_rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))
                  if '"train"' in l]
    last = train_rows[-1]
    # step time summed over the logged windows (also right for a resumed/collected run)
    prev, step_time = 0, 0.0
    for r in train_rows:
      step_time += r.get("step_time_s", 0.0) * (r["step"] - prev)
      prev = r["step"]
    rows = [r for r in rows if r["config"] != spec]
    rows.append({
        "config": spec, "total_params": s["accounting"]["total_params"],
        "active_params": s["accounting"]["active_params"],
        "train_flops_per_token": s["accounting"]["train_flops_per_token"],
        "tokens": s["tokens_seen"], "final_val_loss": s["final_val_loss"],
        "final_val_bpb": s["final_val_bpb"], "wall_s": time.time() - t0,
        "train_time_s": step_time,
        "load_cv": last.get("moe/load_cv"), "dropped_fraction": last.get("moe/dropped_fraction"),
        "curve_bpb": [(e["step"], e["bpb"]) for e in s["evals"]],
    })
    print(json.dumps(rows[-1]), flush=True)
  with open(path, "w") as f:
    json.dump({"steps": a.steps, "rows": rows}, f, indent=2)
  dense = next((r for r in rows if r["config"] == "dense"), None)
  lines = ["| config | total params | active params | train MFLOP/token | val loss | val bpb | "
           "vs dense | load CV | train time (noisy) |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    rel = f"{r['final_val_loss'] - dense['final_val_loss']:+.4f}" if dense else ""
    cv = f"{r['load_cv']:.2f}" if r["load_cv"] is not None else "-"
    lines.append(f"| {r['config']} | {r['total_params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.3f}M | "
                 f"{r['train_flops_per_token'] / 1e6:.2f} | {r['final_val_loss']:.4f} | "
                 f"{r['final_val_bpb']:.3f} | {rel} | {cv} | {r['train_time_s']:.0f}s |")
  with open(os.path.join(HERE, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
