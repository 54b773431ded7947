"""Fine-grained and shared experts vs top-2; see config.py. Writes results.{json,md} and
fine_grained.png here.  python experiments/fine_grained/run.py [--workdir DIR]"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import study  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  rows = study.run(HERE)
  base = next(r for r in rows if r["name"] == "top2")
  lines = ["| variant | experts x width | routed k + shared | total params | active params | "
           "val loss | val bpb | vs top-2 | max/mean load (2nd half) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    m = r["overrides"]["model.moe.granularity"]
    shared = r["overrides"]["model.moe.num_shared_experts"]
    lines.append(f"| {r['name']} | {8 * m} x {192 // m} | {2 * m - shared} + {shared} | "
                 f"{r['total_params'] / 1e6:.3f}M | {r['active_params'] / 1e6:.3f}M | "
                 f"{r['final_val_loss']:.4f} | {r['final_val_bpb']:.3f} | "
                 f"{r['final_val_loss'] - base['final_val_loss']:+.4f} | "
                 f"{r.get('max_over_mean_load_late', float('nan')):.2f} |")
  study.save(HERE, rows, lines)
  plt = study.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, r in enumerate(rows):
    steps, loss = zip(*r["curve"])
    ax.plot(steps, loss, "o-", color=f"C{i}", label=r["name"])
  ax.set_xlabel("step")
  ax.set_ylabel("validation loss (nats/byte)")
  ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
  ax.legend()
  ax.grid(alpha=0.3)
  ax.set_title("Equal active and total parameters")
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, "fine_grained.png"), dpi=120)


if __name__ == "__main__":
  main()
