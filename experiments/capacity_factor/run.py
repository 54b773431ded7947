"""Capacity factor vs dropped tokens and loss; see config.py. Writes results.{json,md} and
capacity_factor.png here.  python experiments/capacity_factor/run.py [--workdir DIR]"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import study  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  rows = study.run(HERE)
  base = next(r for r in rows if r["name"] == "dropless")
  lines = ["| dispatch | capacity factor | dropped (mean over training) | dropped (2nd half) | "
           "val loss | val bpb | vs dropless | train wall |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    cf = r["overrides"].get("model.moe.capacity_factor", "-")
    lines.append(f"| {r['overrides']['model.moe.backend']} | {cf} | "
                 f"{r.get('dropped_fraction_mean', 0):.2%} | {r.get('dropped_fraction_late', 0):.2%} | "
                 f"{r['final_val_loss']:.4f} | {r['final_val_bpb']:.3f} | "
                 f"{r['final_val_loss'] - base['final_val_loss']:+.4f} | {r['wall_s']:.0f}s |")
  study.save(HERE, rows, lines)
  plt = study.pyplot()
  cap = sorted((r for r in rows if r["name"] != "dropless"),
               key=lambda r: r["overrides"]["model.moe.capacity_factor"])
  cfs = [r["overrides"]["model.moe.capacity_factor"] for r in cap]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(cfs, [r["final_val_loss"] for r in cap], "o-", label="val loss (capacity)")
  ax.axhline(base["final_val_loss"], color="k", ls="--", label="val loss (dropless)")
  ax.set_xlabel("capacity factor")
  ax.set_ylabel("validation loss (nats/byte)")
  ax2 = ax.twinx()
  ax2.plot(cfs, [100 * r["dropped_fraction_mean"] for r in cap], "s:", color="C3",
           label="dropped %")
  ax2.set_ylabel("assignments dropped in training (%)", color="C3")
  ax.legend(loc="upper center", fontsize=8)
  ax.set_title("GShard top-2, 8 experts, 1.2M tokens")
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, "capacity_factor.png"), dpi=120)


if __name__ == "__main__":
  main()
