"""Shared runner for the reproduction studies: each study is a sweep (its config.py defines
get_config and get_sweep, see moejax/sweep.py) trained with `python -m moejax.sweep`, then
summarised from every point's summary.json and metrics.jsonl.

    python experiments/<study>/run.py [--workdir runs/<study>]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from moejax import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position


def run(study_dir: str, argv: list[str] | None = None) -> list[dict]:
  """Run (or resume) the study's sweep; returns its result rows with training telemetry."""
  name = os.path.basename(study_dir)
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", default=os.path.join(ROOT, "runs", name))
  a = p.parse_args(argv)
  rc = sweep.main(["--config", os.path.join(study_dir, "config.py"), "--workdir", a.workdir])
  if rc:
    raise SystemExit(f"{name}: some sweep points failed (see {a.workdir}/points/*/train_*.log)")
  with open(os.path.join(a.workdir, "results.json")) as f:
    rows = json.load(f)
  for r in rows:
    r.update(telemetry(r["workdir"]))
  return rows


def telemetry(workdir: str) -> dict:
  """Means over training (all logged steps and the second half) of the MoE routing stats."""
  train = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if '"train"' in l]
  out = {}
  for key in ("moe/dropped_fraction", "moe/max_over_mean_load", "moe/load_cv",
              "moe/router_entropy"):
    vals = np.array([r[key] for r in train if key in r], float)
    if vals.size:
      short = key.split("/")[1]
      out[f"{short}_mean"] = float(vals.mean())
      out[f"{short}_late"] = float(vals[len(vals) // 2:].mean())
      out[f"{short}_last"] = float(vals[-1])
  return out


def save(study_dir: str, rows: list[dict], lines: list[str]) -> None:
  keep = [{k: v for k, v in r.items() if k not in ("workdir", "error_tail")} for r in rows]
  with open(os.path.join(study_dir, "results.json"), "w") as f:
    json.dump(keep, f, indent=1)
  with open(os.path.join(study_dir, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines), flush=True)


def pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt
