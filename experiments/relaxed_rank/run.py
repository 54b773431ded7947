"""Relaxed recursion: LoRA rank vs the gap to the untied model (Bae et al., Relaxed
Recursive Transformers).

The trained 6-layer vanilla model of experiments/recursion_pareto (tiny preset, 600 steps;
trained first if runs/recursion_pareto/vanilla is missing) is converted with
moejax.recursion.relaxed.convert into 2 unique layers looped 3 times (cycle) with per-loop
norms and per-loop LoRA of rank r in {0, 8, 32, 64, 128} (128 = d_model: full rank), for
the shared-layer inits stepwise and average. For each: validation loss right after
conversion, the relative Frobenius error of the LoRA approximation, and (for one init) the
loss after a short uptraining of every parameter; the untied model gets the same
uptraining, so the gap is measured at equal extra training.

    python experiments/relaxed_rank/run.py [--uptrain_steps 150] [--val_batches 16]

Results -> results.json, results.md and relaxed_rank.png beside this file.
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

RANKS = (0, 8, 32, 64, 128)
INITS = ("stepwise", "average")


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--vanilla", default=os.path.join(ROOT, "runs", "recursion_pareto", "vanilla"))
  p.add_argument("--uptrain_steps", type=int, default=150)
  p.add_argument("--uptrain_init", default="stepwise", choices=INITS)
  p.add_argument("--val_batches", type=int, default=16)
  a = p.parse_args()
  if not os.path.exists(os.path.join(a.vanilla, "summary.json")):
    subprocess.run([sys.executable, os.path.join(ROOT, "experiments/recursion_pareto/run.py"),
                    "--variants", "vanilla"], cwd=ROOT, check=True)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from moejax.data.pipeline import build_data  # pylint: disable=g-import-not-at-top
  from moejax.generate import load_run  # pylint: disable=g-import-not-at-top
  from moejax.models.lm import LM, param_count  # pylint: disable=g-import-not-at-top
  from moejax.recursion import relaxed  # pylint: disable=g-import-not-at-top
  from moejax.recursion.sharing import RecursionConfig  # pylint: disable=g-import-not-at-top
  from moejax.train.loop import evaluate as run_eval  # pylint: disable=g-import-not-at-top
  from moejax.train.steps import TrainState, make_eval_step, make_train_step  # pylint: disable=g-import-not-at-top

  config, _, mc, params, step, _ = load_run(a.vanilla)
  data = build_data(config.data, seed=config.seed, verbose=False)
  val = data.val_batches(a.val_batches)

  def evaluate(cfg, prm) -> float:
    return run_eval(jax.jit(make_eval_step(LM(cfg))), prm, {}, val)["loss"]

  def bits_per_byte(cfg, prm) -> float:
    return run_eval(jax.jit(make_eval_step(LM(cfg))), prm, {}, val)["bpb"]

  def uptrain(cfg, prm):
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(
        0.0, 1e-3, min(10, a.uptrain_steps // 2), a.uptrain_steps, 1e-4),
                     b1=0.9, b2=0.95, weight_decay=0.0)
    state = TrainState.create(prm, tx, jax.random.PRNGKey(1))
    step_fn = jax.jit(make_train_step(LM(cfg, deterministic=False)))
    it = iter(data.train_dataset)
    for _ in range(a.uptrain_steps):
      b = next(it)
      state, _ = step_fn(state, {"inputs": jnp.asarray(b["inputs"]),
                                 "targets": jnp.asarray(b["targets"])})
    return state.params

  def rec_cfg(rank):
    rc = RecursionConfig(strategy="cycle", num_loops=3, num_layers=mc.num_layers,
                         unshared_norms=True, lora_rank=rank)
    return dataclasses.replace(mc, recursion=rc)

  t0 = time.time()
  untied_loss = evaluate(mc, params)
  untied_bpb = bits_per_byte(mc, params)
  untied_up = evaluate(mc, uptrain(mc, params)) if a.uptrain_steps else None
  rows = [{"variant": "untied", "rank": None, "init": None, "params": param_count(params),
           "val_loss": untied_loss, "val_loss_uptrained": untied_up}]
  print(f"untied ({step} steps): val loss {untied_loss:.4f}, after uptraining {untied_up}",
        flush=True)
  for init in INITS:
    for rank in RANKS:
      cfg = rec_cfg(rank)
      rp = relaxed.convert(params, mc, cfg, init)
      err = relaxed.lora_residual(params, mc, cfg, init, rank)
      row = {"variant": f"{init}_r{rank}", "rank": rank, "init": init,
             "params": param_count(rp), "val_loss": evaluate(cfg, rp),
             "lora_rel_error": float(np.mean(list(err.values())))}
      if a.uptrain_steps and init == a.uptrain_init:
        row["val_loss_uptrained"] = evaluate(cfg, uptrain(cfg, rp))
      row["gap"] = row["val_loss"] - untied_loss
      if "val_loss_uptrained" in row:
        row["gap_uptrained"] = row["val_loss_uptrained"] - untied_up
      rows.append(row)
      print(json.dumps(row), flush=True)

  with open(os.path.join(HERE, "results.json"), "w") as f:
    json.dump({"vanilla_run": os.path.relpath(a.vanilla, ROOT), "vanilla_steps": step,
               "uptrain_steps": a.uptrain_steps, "val_batches": a.val_batches,
               "wall_s": time.time() - t0, "rows": rows}, f, indent=1)
  after = f"; after {a.uptrain_steps} more steps {untied_up:.4f}" if untied_up else ""
  lines = [f"Untied 6-layer model: val loss {untied_loss:.4f} nats/byte-token "
           f"({untied_bpb:.3f} bits/byte){after}.", "",
           "| init | LoRA rank | params | LoRA rel. error | val loss at conversion | gap | "
           f"after {a.uptrain_steps} steps | gap |", "|---|---|---|---|---|---|---|---|"]
  for r in rows[1:]:
    up = r.get("val_loss_uptrained")
    lines.append(f"| {r['init']} | {r['rank']} | {r['params'] / 1e6:.3f}M | "
                 f"{r['lora_rel_error']:.3f} | {r['val_loss']:.4f} | {r['gap']:+.4f} | "
                 + (f"{up:.4f} | {r['gap_uptrained']:+.4f} |" if up is not None else "- | - |"))
  with open(os.path.join(HERE, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, init in enumerate(INITS):
    rr = [r for r in rows[1:] if r["init"] == init]
    ax.plot([max(r["rank"], 1) for r in rr], [r["gap"] for r in rr], "o-", color=f"C{i}",
            label=f"{init}: at conversion")
    if any("gap_uptrained" in r for r in rr):
      ax.plot([max(r["rank"], 1) for r in rr], [r["gap_uptrained"] for r in rr], "s--",
              color=f"C{i}", label=f"{init}: after {a.uptrain_steps} steps")
  ax.set_xscale("log", base=2)
  ax.set_yscale("symlog", linthresh=1e-2)
  ax.set_xlabel("LoRA rank (1 = no LoRA)")
  ax.set_ylabel("val loss - untied val loss (nats)")
  ax.axhline(0, color="k", lw=0.5)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title("6 layers -> 2 shared x 3 loops (cycle)")
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, "relaxed_rank.png"), dpi=120)


if __name__ == "__main__":
  main()
