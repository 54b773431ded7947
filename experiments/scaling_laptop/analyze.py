"""Fit scaling laws to the laptop sweep (configs/scaling/laptop.py) and plot them.

    python -m moejax.sweep --config configs/scaling/laptop.py --workdir runs/scaling_laptop
    python experiments/scaling_laptop/analyze.py [runs/scaling_laptop]

Reads the sweep's results (the table and each point's validation curve), copies the table
here as results.csv, and writes fits.json, fits.md and chinchilla.png / isoflop.png /
routed.png / curves.png beside this file. With no sweep directory it refits the committed
results.csv (plots without curves).

Fits (moejax/scaling/fit.py), losses in nats per byte-token:
  chinchilla  dense points: L(N, D), N = parameters, D = training tokens;
  isoflop     dense points grouped by their nominal budget (the sweep's c0/c1/c2);
  routed      the middle budget's dense (E = 1) and MoE (E = 4, 16) points, N = active
              parameters (the dense-equivalent size), E = experts.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from moejax import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position
from moejax.scaling import fit as fit_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from moejax.scaling import plots  # pylint: disable=g-import-not-at-top,wrong-import-position


def _budget(name: str) -> int:
  return int(name.rsplit("_c", 1)[1])


def _fmt_interval(fit, k):
  lo, hi = fit.intervals.get(k, (float("nan"), float("nan")))
  return f"{fit.params[k]:.3g} [{lo:.3g}, {hi:.3g}]"


def main() -> None:
  sweep_dir = sys.argv[1] if len(sys.argv) > 1 else ""
  table = os.path.join(HERE, "results.csv")
  rows_full = []
  if sweep_dir:
    sweep.collect(sweep_dir)
    shutil.copy(os.path.join(sweep_dir, "results.csv"), table)
    with open(os.path.join(sweep_dir, "results.json")) as f:
      rows_full = json.load(f)
  rows = [r for r in sweep.read_table(table) if r["status"] == "completed"]
  sys.path.insert(0, os.path.join(ROOT, "configs", "scaling"))
  import laptop  # pylint: disable=g-import-not-at-top
  dense = [r for r in rows if r["num_experts"] == 1]
  out: dict = {"n_points": len(rows)}
  md = [f"Fitted on {len(rows)} completed sweep points ({len(dense)} dense). Intervals: "
        "5-95% bootstrap percentiles.", ""]

  n = np.array([r["total_params"] for r in dense], float)
  d = np.array([r["tokens"] for r in dense], float)
  loss = np.array([r["final_val_loss"] for r in dense], float)
  chin = fit_lib.fit_chinchilla(n, d, loss, bootstrap=200)
  out["chinchilla"] = chin.as_dict()
  resid = np.log(chin.predict(n, d)) - np.log(loss)
  out["chinchilla"]["rms_log_residual"] = float(np.sqrt(np.mean(resid ** 2)))
  plots.chinchilla(n, d, loss, chin, os.path.join(HERE, "chinchilla.png"))
  md += ["**Chinchilla** L(N, D) = E + A/N^alpha + B/D^beta (dense points):", "",
         "| parameter | fit [90% interval] |", "|---|---|"]
  md += [f"| {k} | {_fmt_interval(chin, k)} |" for k in ("E", "A", "alpha", "B", "beta")]
  md += ["", f"RMS residual in log L: {out['chinchilla']['rms_log_residual']:.4f}.", ""]
  budgets = np.array([laptop.BUDGETS[_budget(r["name"])] for r in dense], float)
  for c in laptop.BUDGETS:
    n_opt, d_opt = fit_lib.compute_optimal(chin.params, c)
    md.append(f"- Chinchilla-optimal at C = {c:.0e} FLOPs: N = {n_opt / 1e6:.3f}M params, "
              f"D = {d_opt / 1e6:.2f}M tokens (D/N = {d_opt / n_opt:.1f}).")

  try:
    iso = fit_lib.fit_isoflop(budgets, n, loss, bootstrap=200)
    out["isoflop"] = {**iso.as_dict(), "optima": iso.params["optima"]}
    plots.isoflop(budgets, n, loss, iso, os.path.join(HERE, "isoflop.png"))
    md += ["", "**isoFLOP** (parabola of L in log N per budget):", "",
           "| budget (FLOPs) | N_opt | D_opt | L at optimum |", "|---|---|---|---|"]
    md += [f"| {c:.0e} | {no / 1e6:.3f}M | {do / 1e6:.2f}M | {lo:.4f} |"
           for c, no, do, lo in iso.params["optima"]]
    md += ["", f"N_opt ~ C^a with a = {_fmt_interval(iso, 'a')}; D_opt ~ C^b with b = "
           f"{_fmt_interval(iso, 'b')}."]
  except ValueError as e:  # a budget whose parabola has no minimum inside the sizes
    out["isoflop"] = {"error": str(e)}
    md += ["", f"**isoFLOP**: no fit ({e})."]

  mid = [r for r in rows if _budget(r["name"]) == 1]
  if len({r["num_experts"] for r in mid}) >= 2:
    er = np.array([r["num_experts"] for r in mid], float)
    lr = np.array([r["final_val_loss"] for r in mid], float)
    # group by the dense width so N is identical across expert counts of one width
    width_n = {r["d_model"]: r["active_params"] for r in mid if r["num_experts"] == 1}
    nr = np.array([width_n.get(r["d_model"], r["active_params"]) for r in mid], float)
    routed = fit_lib.fit_routed(nr, er, lr, bootstrap=200)
    out["routed"] = routed.as_dict()
    plots.routed(nr, er, lr, routed, os.path.join(HERE, "routed.png"))
    md += ["", "**Routed law** log L = a log N + b log E^ + c log N log E^ + d (budget c1, "
           "N = the dense model's parameters):", "", "| parameter | fit [90% interval] |",
           "|---|---|"]
    md += [f"| {k} | {_fmt_interval(routed, k)} |" for k in ("a", "b", "c", "d")]
    md += ["", "| width | E | total params | active params | val loss | vs dense |",
           "|---|---|---|---|---|---|"]
    base = {r["d_model"]: r["final_val_loss"] for r in mid if r["num_experts"] == 1}
    for r in sorted(mid, key=lambda r: (r["d_model"], r["num_experts"])):
      md.append(f"| {r['d_model']} | {r['num_experts']} | {r['total_params'] / 1e6:.3f}M | "
                f"{r['active_params'] / 1e6:.3f}M | {r['final_val_loss']:.4f} | "
                f"{r['final_val_loss'] - base.get(r['d_model'], np.nan):+.4f} |")

  md += ["", "| point | params (total / active) | tokens | compute | final val loss | "
         "best | wall |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    md.append(f"| {r['name']} | {r['total_params'] / 1e6:.3f}M / {r['active_params'] / 1e6:.3f}M"
              f" | {r['tokens'] / 1e6:.2f}M | {r['compute']:.2e} | {r['final_val_loss']:.4f} | "
              f"{r['best_val_loss']:.4f} | {r['wall_s']:.0f}s |")
  total_wall = sum(r["wall_s"] for r in rows)
  md += ["", f"Sweep wall time (sum over points, including start-up and compilation): "
         f"{total_wall / 60:.1f} min."]
  out["sweep_wall_s"] = total_wall
  if rows_full:
    plots.curves(rows_full, os.path.join(HERE, "curves.png"))
  with open(os.path.join(HERE, "fits.json"), "w") as f:
    json.dump(out, f, indent=1, default=float)
  with open(os.path.join(HERE, "fits.md"), "w") as f:
    f.write("\n".join(md) + "\n")
  print("\n".join(md))


if __name__ == "__main__":
  main()
