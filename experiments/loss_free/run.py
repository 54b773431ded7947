"""Loss-free bias balancing vs an auxiliary loss; see config.py. Writes results.{json,md}
and loss_free.png here.  python experiments/loss_free/run.py [--workdir DIR]"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import study  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  rows = study.run(HERE)
  base = next(r for r in rows if r["name"] == "aux_loss")
  lines = ["| balancing | val loss | val bpb | vs aux loss | MaxVio (mean over training) | "
           "MaxVio (2nd half) | load CV (2nd half) |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['final_val_loss']:.4f} | {r['final_val_bpb']:.3f} | "
                 f"{r['final_val_loss'] - base['final_val_loss']:+.4f} | "
                 f"{r['max_over_mean_load_mean'] - 1:.3f} | {r['max_over_mean_load_late'] - 1:.3f} | "
                 f"{r['load_cv_late']:.3f} |")
  lines += ["", "MaxVio = max over experts of load / mean load - 1, per training batch, averaged "
            "over the 4 MoE layers and the logged steps."]
  study.save(HERE, rows, lines)
  plt = study.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, r in enumerate(rows):
    train = [json.loads(l) for l in open(os.path.join(r["workdir"], "metrics.jsonl"))
             if '"train"' in l]
    ax.plot([t["step"] for t in train], [t["moe/max_over_mean_load"] - 1 for t in train],
            color=f"C{i}", label=f"{r['name']} (val {r['final_val_loss']:.3f})")
  ax.set_xlabel("step")
  ax.set_ylabel("MaxVio (batch)")
  ax.set_yscale("log")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, "loss_free.png"), dpi=120)


if __name__ == "__main__":
  main()
