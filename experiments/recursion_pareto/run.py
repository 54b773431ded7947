"""Vanilla vs recursive vs Mixture-of-Recursions at equal training FLOPs.

Every variant of configs/recursion/ (tiny preset: d_model 128, 6 effective layers) gets
the training FLOPs of the vanilla model's 600 steps x 16 x 128 tokens: its step count
is 600 x F_vanilla / F_variant (analytic train FLOPs per token, moejax/flops.py), so
cheaper models see more tokens. Same seed and data order. After training, each MoR run
is evaluated both ways: the causal threshold routing used at inference (the logged
validation loss) and the non-causal top-k routing it was trained with.

    python experiments/recursion_pareto/run.py [--variants vanilla,cycle,...] [--steps 600]

Results -> results.json, results.md and pareto.png beside this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

# name -> (config file, extra overrides)
VARIANTS = {
    "vanilla": ("vanilla", []),
    "vanilla_2layer": ("vanilla", ["model.num_layers=2"]),  # the recursive models' params
    "cycle": ("cycle", []),
    "middle_cycle": ("middle_cycle", []),
    # the other sharing strategies at the same unique-layer counts
    "sequence": ("cycle", ["model.recursion.strategy=sequence"]),
    "middle_sequence": ("middle_cycle", ["model.recursion.strategy=middle_sequence"]),
    "relaxed": ("relaxed", []),
    "mor_expert": ("mor_expert", []),
    "mor_token": ("mor_token", []),
}


def accounting(cfg_name: str, overrides: list[str]):
  from moejax import flops  # pylint: disable=g-import-not-at-top
  from moejax.config import load_config  # pylint: disable=g-import-not-at-top
  from moejax.models.lm import LMConfig  # pylint: disable=g-import-not-at-top
  c = load_config(os.path.join(ROOT, f"configs/recursion/{cfg_name}.py"),
                  [f"--config.{o}" for o in overrides])
  mc = LMConfig.from_config(c.model, seq_len=c.data.seq_len, vocab_size=257)
  return flops.account(mc, c.data.seq_len)


def eval_both_routings(workdir: str, batches: int = 16) -> dict:
  """Validation loss of a trained MoR run with threshold (causal) and top-k routing."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from moejax.data.pipeline import build_data  # pylint: disable=g-import-not-at-top
  from moejax.generate import load_run  # pylint: disable=g-import-not-at-top
  from moejax.models.lm import LM  # pylint: disable=g-import-not-at-top
  from moejax.train.steps import cross_entropy  # pylint: disable=g-import-not-at-top
  config, _, mc, params, _, state = load_run(workdir)
  data = build_data(config.data, seed=config.seed, process_index=0, process_count=1)
  val_sets = data.val_batches(batches)  # {source: (batches, UTF-8 bytes of their targets)}
  val = [b for bs, _ in val_sets.values() for b in bs]
  nbytes = sum(n for _, n in val_sets.values())
  out = {}
  for routing in ("threshold", "topk"):
    cfg = dataclasses.replace(mc, recursion=dataclasses.replace(mc.recursion,
                                                                eval_routing=routing))
    model = LM(cfg)

    @jax.jit
    def run(inputs, targets, model=model):
      logits, side = model.apply({"params": params, **state}, inputs, mutable=["mor_stats"])
      total, count = cross_entropy(logits, targets)
      return total, count, side["mor_stats"]["recursion"]["mean_depth"]

    total = count = 0.0
    depths = []
    for b in val:
      t, c, d = run(b["inputs"], b["targets"])
      total, count = total + float(t), count + float(c)
      depths.append(float(d))
    loss = total / count
    out[routing] = {"val_loss": loss, "val_bpb": total / np.log(2) / nbytes,
                    "mean_depth": float(np.mean(depths))}
  return out


def inference_throughput(names: list[str], workdir: str, batch: int = 16, seq_len: int = 128,
                         reps: int = 7) -> dict:
  """Eval-forward (prefill) tokens/s of each variant at the training shape, B x 128.

  MoR runs load their trained checkpoint (their routers decide how many tokens each loop
  runs, through the gathered inference path); the other variants' compute does not depend
  on the weights, so a run directory is used when present and a fresh init otherwise.
  Repetitions are interleaved across variants so machine noise hits all alike; the
  median per variant is reported.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from moejax.config import load_config  # pylint: disable=g-import-not-at-top
  from moejax.generate import load_run  # pylint: disable=g-import-not-at-top
  from moejax.models.lm import LM, LMConfig  # pylint: disable=g-import-not-at-top
  fns = {}
  x_BT = None
  for name in names:
    cfg_name, overrides = VARIANTS[name]
    wd = os.path.join(workdir, name)
    if os.path.exists(os.path.join(wd, "config.json")):
      _, _, mc, params, _, state = load_run(wd)
      variables = {"params": params, **state}
    else:
      assert not cfg_name.startswith("mor"), f"{name}: MoR throughput needs its trained run in {wd}"
      c = load_config(os.path.join(ROOT, f"configs/recursion/{cfg_name}.py"),
                      [f"--config.{o}" for o in overrides])
      mc = LMConfig.from_config(c.model, seq_len=c.data.seq_len, vocab_size=257)
      variables = {"params": nn.unbox(LM(mc).init(jax.random.PRNGKey(0),
                                                  jnp.zeros((1, 8), jnp.int32))["params"])}
    if x_BT is None:
      x_BT = jax.random.randint(jax.random.PRNGKey(1), (batch, seq_len), 0, 256, jnp.int32)
    model = LM(mc)
    f = jax.jit(lambda v, x, model=model: model.apply(v, x))
    jax.block_until_ready(f(variables, x_BT))
    fns[name] = (f, variables)
  times = {n: [] for n in names}
  for _ in range(reps):
    for n, (f, v) in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(v, x_BT))
      times[n].append(time.perf_counter() - t0)
  tokens = x_BT.size
  return {n: {"tokens_per_s": tokens / float(np.median(t)),
              "spread": float((max(t) - min(t)) / np.median(t)), "batch": batch, "reps": reps}
          for n, t in times.items()}


def plot(rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in rows:
    ax.scatter(r["total_params"] / 1e6, r["final_val_bpb"], s=40)
    ax.annotate(r["variant"], (r["total_params"] / 1e6, r["final_val_bpb"]),
                textcoords="offset points", xytext=(4, 4), fontsize=8)
  ax.set_xlabel("parameters (M, unique)")
  ax.set_ylabel("validation bits/byte (inference routing)")
  ax.set_title("Equal training FLOPs (vanilla 6L x 600 steps)")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def write_tables(a, rows):
  with open(os.path.join(HERE, "results.json"), "w") as f:
    json.dump({"base_steps": a.steps, "rows": rows}, f, indent=2)
  van = next((r for r in rows if r["variant"] == "vanilla"), None)
  lines = ["| variant | unique params | train MFLOP/token | steps | tokens | val bpb | vs vanilla "
           "| MoR train-mode routing bpb (gap) | mean depth (inference) | train time (noisy) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  if any("inference" in r for r in rows):
    lines[0] = lines[0].replace(" train time (noisy) |",
                                " train time (noisy) | prefill tok/s (vs vanilla) |")
    lines[1] += "---|"
  van_tps = van.get("inference", {}).get("tokens_per_s") if van else None
  for r in rows:
    rel = f"{r['final_val_bpb'] - van['final_val_bpb']:+.3f}" if van else ""
    mor = r.get("routing_eval")
    topk = (f"{mor['topk']['val_bpb']:.3f} "
            f"({mor['topk']['val_bpb'] - mor['threshold']['val_bpb']:+.3f})" if mor else "-")
    depth = f"{mor['threshold']['mean_depth']:.2f}" if mor else "-"
    lines.append(
        f"| {r['variant']} | {r['total_params'] / 1e6:.3f}M | "
        f"{r['train_flops_per_token'] / 1e6:.2f} | {r['steps']} | {r['tokens'] / 1e6:.2f}M | "
        f"{r['final_val_bpb']:.3f} | {rel} | {topk} | {depth} | {r['train_time_s']:.0f}s |"
        + (f" {r['inference']['tokens_per_s'] / 1e3:.1f}k"
           + (f" ({r['inference']['tokens_per_s'] / van_tps:.2f}x) |" if van_tps else " |")
           if "inference" in r else (" - |" if "inference" in lines[0] else "")))
  with open(os.path.join(HERE, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines), flush=True)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--steps", type=int, default=600, help="the vanilla model's steps")
  p.add_argument("--throughput", action="store_true",
                 help="after training, measure every row's prefill tokens/s (interleaved)")
  p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "recursion_pareto"))
  a = p.parse_args()
  path = os.path.join(HERE, "results.json")
  rows = json.load(open(path))["rows"] if os.path.exists(path) else []
  budget = accounting("vanilla", []).train_flops_per_token * a.steps
  for name in [v for v in a.variants.split(",") if v]:
    cfg_name, overrides = VARIANTS[name]
    acct = accounting(cfg_name, overrides)
    steps = round(budget / acct.train_flops_per_token)
    wd = os.path.join(a.workdir, name)
    cmd = [sys.executable, "-m", "moejax.train", "--config", f"configs/recursion/{cfg_name}.py",
           "--workdir", wd, f"--config.train.num_steps={steps}",
           f"--config.train.eval_every={max(1, steps // 4)}",
           f"--config.train.checkpoint_every={steps}",
           "--config.train.progress_bar=false"] + [f"--config.{o}" for o in overrides]
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    s = json.load(open(os.path.join(wd, "summary.json")))
    train_rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))
                  if '"train"' in l]
    prev, step_time = 0, 0.0
    for r in train_rows:
      step_time += r.get("step_time_s", 0.0) * (r["step"] - prev)
      prev = r["step"]
    row = {"variant": name, "config": cfg_name, "overrides": overrides, "steps": steps,
           "total_params": s["accounting"]["total_params"],
           "train_flops_per_token": s["accounting"]["train_flops_per_token"],
           "train_flops": s["accounting"]["train_flops_per_token"] * s["tokens_seen"],
           "tokens": s["tokens_seen"], "final_val_loss": s["final_val_loss"],
           "final_val_bpb": s["final_val_bpb"], "wall_s": time.time() - t0,
           "train_time_s": step_time,
           "curve_bpb": [(e["step"], e["bpb"]) for e in s["evals"]]}
    last = train_rows[-1]
    for k in ("mor/depth_hist", "mor/active_fraction", "mor/mean_depth", "mor/depth_load"):
      if k in last:
        row[k] = last[k]
    if cfg_name.startswith("mor"):
      row["routing_eval"] = eval_both_routings(wd)
    rows = [r for r in rows if r["variant"] != name] + [row]
    print(json.dumps(row), flush=True)
    write_tables(a, rows)
  if a.throughput:
    tput = inference_throughput([r["variant"] for r in rows], a.workdir)
    for r in rows:
      r["inference"] = tput[r["variant"]]
  order = list(VARIANTS)
  rows.sort(key=lambda r: order.index(r["variant"]) if r["variant"] in order else 99)
  write_tables(a, rows)
  plot(rows, os.path.join(HERE, "pareto.png"))


if __name__ == "__main__":
  main()
