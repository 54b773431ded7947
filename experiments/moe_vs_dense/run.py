"""Switch / GShard / DeepSeek-style MoE vs a dense model with equal active FLOPs.

Each tiny config trains for the quickstart budget (600 steps x 16 x 128 tokens, 1.2M
tokens) on the embedded corpus with the same data order and seed; the dense model's d_ff
equals the MoE active FFN width (accounting in each row). Results -> results.json and
results.md beside this file; a row is keyed by (config, steps, seed), so longer runs and
other seeds add rows beside the 600-step seed-0 ones. The seed sets both the init and the
data order (moejax/data/pipeline.py mix_seeds); at one seed every config sees the same
batches. The LR schedule follows --steps: warmup stays optim.warmup_steps (50 for tiny),
the cosine decays over the remaining steps to min_lr_ratio.

    python experiments/moe_vs_dense/run.py [--configs dense,switch,...] [--steps 600]
        [--seeds 0,1]
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


def write(path: str, rows: list[dict]) -> None:
  """results.json, and results.md: every row, then the mean and spread over seeds."""
  with open(path, "w") as f:
    json.dump({"rows": rows}, f, indent=2)
  dense = {(r["steps"], r["seed"]): r for r in rows if r["config"] == "dense"}
  lines = ["| config | steps | seed | init | total params | active params | train MFLOP/token | "
           "val loss | val bpb | vs dense (same steps, seed) | load CV | train time (noisy) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    d = dense.get((r["steps"], r["seed"]))
    rel = f"{r['final_val_loss'] - d['final_val_loss']:+.4f}" if d else ""
    cv = f"{r['load_cv']:.2f}" if r["load_cv"] is not None else "-"
    lines.append(f"| {r['config']} | {r['steps']} | {r['seed']} | {r['init']} | "
                 f"{r['total_params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.3f}M | "
                 f"{r['train_flops_per_token'] / 1e6:.2f} | {r['final_val_loss']:.4f} | "
                 f"{r['final_val_bpb']:.3f} | {rel} | {cv} | {r['train_time_s']:.0f}s |")
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["config"], r["steps"]), []).append(r)
  multi = {k: v for k, v in groups.items() if len(v) > 1}
  if multi:
    lines += ["", "Over seeds (spread = max - min; vs dense = mean of the per-seed differences "
              "to the dense run with the same steps and seed):", "",
              "| config | steps | seeds | mean val loss | spread | mean vs dense | "
              "per-seed vs dense |", "|---|---|---|---|---|---|---|"]
    for (cfg, steps), rs in multi.items():
      losses = [r["final_val_loss"] for r in rs]
      diffs = [r["final_val_loss"] - dense[(steps, r["seed"])]["final_val_loss"]
               for r in rs if (steps, r["seed"]) in dense]
      mean_d = f"{sum(diffs) / len(diffs):+.4f}" if diffs else ""
      lines.append(f"| {cfg} | {steps} | {','.join(str(r['seed']) for r in rs)} | "
                   f"{sum(losses) / len(losses):.4f} | {max(losses) - min(losses):.4f} | "
                   f"{mean_d} | {' / '.join(f'{x:+.4f}' for x in diffs)} |")
  with open(os.path.join(os.path.dirname(path), "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines), flush=True)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--configs", default="dense,switch,gshard_top2,deepseek",
                 help="config names in configs/moe/, each optionally NAME@field=value[@...] "
                      "for a variant, e.g. deepseek@model.moe.route_scale=1.0")
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--seeds", default="0", help="comma-separated config.seed values")
  p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "moe_vs_dense"))
  a = p.parse_args()
  path = os.path.join(HERE, "results.json")
  rows = json.load(open(path))["rows"] if os.path.exists(path) else []
  for r in rows:  # the original rows predate the steps / seed / init fields
    r.setdefault("steps", 600), r.setdefault("seed", 0), r.setdefault("init", "default")
  for seed, spec in [(int(s), c) for s in a.seeds.split(",") for c in a.configs.split(",")]:
    name, *overrides = spec.split("@")
    wd = os.path.join(a.workdir, spec.replace("@", "_").replace("=", "").replace("model.moe.", ""))
    if (a.steps, seed) != (600, 0):  # the original runs keep their directory names
      wd += f"_s{a.steps}_seed{seed}"
    cmd = [sys.executable, "-m", "moejax.train", "--config", f"configs/moe/{name}.py",
           "--workdir", wd, f"--config.train.num_steps={a.steps}", f"--config.seed={seed}",
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
    rows = [r for r in rows if (r["config"], r["steps"], r["seed"]) != (spec, a.steps, seed)]
    init = [o for o in overrides if "init_s" in o]
    rows.append({
        "config": spec, "steps": a.steps, "seed": seed, "init": ", ".join(init) or "default",
        "total_params": s["accounting"]["total_params"],
        "active_params": s["accounting"]["active_params"],
        "train_flops_per_token": s["accounting"]["train_flops_per_token"],
        "tokens": s["tokens_seen"], "final_val_loss": s["final_val_loss"],
        "final_val_bpb": s["final_val_bpb"], "wall_s": time.time() - t0,
        "train_time_s": step_time,
        "load_cv": last.get("moe/load_cv"), "dropped_fraction": last.get("moe/dropped_fraction"),
        "curve_bpb": [(e["step"], e["bpb"]) for e in s["evals"]],
    })
    print(json.dumps(rows[-1]), flush=True)
    write(path, rows)  # after every run: a long sequence keeps what it has finished


if __name__ == "__main__":
  main()
