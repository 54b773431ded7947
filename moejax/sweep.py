"""Sweeps declared in config files, run one point after another or printed for a scheduler.

A config file that defines, beside `get_config(arg)`, a function `get_sweep(arg)` returning
an iterable of override dicts ({"model.d_model": 64, "train.num_steps": 300, ...}) is a
sweep (big_vision style). The helpers below build such iterables:

    from moejax import sweep
    def get_sweep(arg=""):
      return sweep.product(sweep.axis("model.d_model", [32, 64]),
                           sweep.zipped(sweep.axis("model.moe.num_experts", [0, 8]),
                                        sweep.axis("name", ["dense", "moe8"])))

A point's dict may hold "name" (a label, not an override). Commands:

    python -m moejax.sweep --config FILE[:arg] --workdir DIR     # run every point here
    python -m moejax.sweep --config FILE --workdir DIR --print_commands   # one per point
    python -m moejax.sweep --config FILE --workdir DIR --only 3,7         # some points
    python -m moejax.sweep --config FILE --workdir DIR --collect          # rebuild table

Each point trains in its own process in DIR/points/<NNN_label>/ (a crash cannot take the
sweep down; the retry resumes from the point's last checkpoint; a
config the trainer rejects (exit status 2) is not retried). A point whose result.json
says it completed with the same overrides is skipped, so re-running the command resumes
the sweep. A failed point is retried once, then recorded as failed and the sweep goes on
(the exit status is non-zero at the end). After every point DIR/results.csv is rebuilt from
all points' result.json files (atomic rename), so concurrent cluster jobs can share DIR.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Iterable, Sequence

from moejax import config as config_lib

Point = dict[str, Any]
EXIT_INVALID_CONFIG = 2  # moejax.train's exit status for a config it rejects

COLUMNS = ("point", "name", "status", "overrides", "d_model", "num_layers", "num_experts",
           "experts_per_token", "granularity", "total_params", "active_params",
           "flops_per_token", "tokens", "compute", "final_val_loss", "best_val_loss",
           "final_val_bpb", "steps", "wall_s")


# ----------------------------------------------------------------------- declaring sweeps


def axis(field: str, values: Sequence[Any]) -> list[Point]:
  """One swept field: [{field: v} for v in values]."""
  return [{field: v} for v in values]


def product(*axes: Iterable[Point]) -> list[Point]:
  """Every combination of the axes' points (later axes vary fastest), dicts merged."""
  out = []
  for combo in itertools.product(*[list(a) for a in axes]):
    out.append(_merge(combo))
  return out


def zipped(*axes: Iterable[Point]) -> list[Point]:
  """The axes' points side by side; all axes must have the same length."""
  axes = [list(a) for a in axes]
  lengths = {len(a) for a in axes}
  if len(lengths) > 1:
    raise ValueError(f"sweep.zipped: axes have different lengths {sorted(lengths)}")
  return [_merge(combo) for combo in zip(*axes)]


def _merge(points: Sequence[Point]) -> Point:
  out: Point = {}
  for p in points:
    for k, v in p.items():
      if k == "name" and "name" in out:
        out["name"] = f"{out['name']}_{v}"
      elif k in out and out[k] != v:
        raise ValueError(f"sweep: field {k!r} set twice in one point ({out[k]!r}, {v!r})")
      else:
        out[k] = v
  return out


# -------------------------------------------------------------------------- loading


def _split_spec(spec: str) -> tuple[str, str]:
  path, _, arg = spec.partition(":")
  return path, arg


def load_sweep(spec: str) -> list[Point]:
  """The points of `FILE[:arg]`, each checked against the config (unknown fields, bad
  values) before anything runs."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, arg = _split_spec(spec)
  if not os.path.exists(path):
    raise config_lib.ConfigError(f"sweep config file {path!r} does not exist")
  mod_spec = importlib.util.spec_from_file_location("_moejax_sweep_cfg", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise config_lib.ConfigError(
        f"config file {path!r} has no get_sweep(arg): a sweep file defines get_config(arg) "
        f"and get_sweep(arg) returning override dicts (see moejax/sweep.py)")
  points = list(module.get_sweep(arg) if arg else module.get_sweep())
  if not points:
    raise config_lib.ConfigError(f"{path}: get_sweep({arg!r}) returned no points")
  for i, p in enumerate(points):
    if not isinstance(p, dict):
      raise config_lib.ConfigError(f"{path}: sweep point {i} is {type(p).__name__}, not a dict")
    try:
      c = config_lib.load_config(spec, _override_args(p))
      config_lib.validate(c)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"{path}: sweep point {i} ({label(i, p)}): {e}") from None
  return points


def _override_args(p: Point) -> list[str]:
  return [f"{k}={_fmt(v)}" for k, v in p.items() if k != "name"]


def _fmt(v: Any) -> str:
  if isinstance(v, (tuple, list)):
    return ",".join(str(x) for x in v)
  return str(v)


def label(i: int, p: Point) -> str:
  """Directory name of point i: index, its name (or a slug of its values) and a hash of
  its overrides, so a changed sweep definition never reuses a stale result."""
  overrides = {k: v for k, v in p.items() if k != "name"}
  h = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:6]
  text = p.get("name") or "_".join(f"{k.split('.')[-1]}{_fmt(v)}" for k, v in overrides.items())
  slug = re.sub(r"[^A-Za-z0-9.=-]+", "_", str(text))[:48]
  return f"{i:03d}_{slug}_{h}"


# -------------------------------------------------------------------------- running


def train_command(spec: str, workdir: str, p: Point, progress: bool = False) -> list[str]:
  cmd = [sys.executable, "-m", "moejax.train", "--config", spec, "--workdir", workdir]
  cmd += [f"--config.{o}" for o in _override_args(p)]
  if not progress:
    cmd.append("--config.train.progress_bar=false")
  return cmd


def _result_path(sweep_dir: str, i: int, p: Point) -> str:
  return os.path.join(sweep_dir, "points", label(i, p), "result.json")


def is_done(sweep_dir: str, i: int, p: Point) -> bool:
  path = _result_path(sweep_dir, i, p)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    r = json.load(f)
  return r.get("status") == "completed" and r.get("overrides") == _jsonable(p)


def _jsonable(p: Point) -> dict:
  return json.loads(json.dumps({k: v for k, v in p.items() if k != "name"}, default=str))


def run_point(spec: str, sweep_dir: str, i: int, p: Point, *, retries: int = 1,
              progress: bool = False, log=print) -> dict:
  """Train point i (retrying a crash `retries` times; the retry resumes from the point's
  checkpoint) and write its result.json. Returns the result row."""
  wd = os.path.dirname(_result_path(sweep_dir, i, p))
  os.makedirs(wd, exist_ok=True)
  cmd = train_command(spec, wd, p, progress)
  t0 = time.time()
  rc, tail = -1, ""
  for attempt in range(retries + 1):
    with open(os.path.join(wd, f"train_attempt{attempt}.log"), "w") as logf:
      proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, check=False)
    rc = proc.returncode
    if rc == 0:
      break
    with open(os.path.join(wd, f"train_attempt{attempt}.log")) as f:
      tail = f.read()[-2000:]
    if rc == EXIT_INVALID_CONFIG:  # deterministic: a retry cannot help
      log(f"[sweep] point {i} ({label(i, p)}): invalid config: {tail.strip()[-500:]}")
      break
    log(f"[sweep] point {i} ({label(i, p)}) attempt {attempt + 1} exited {rc}"
        + ("; retrying (resumes from its last checkpoint)" if attempt < retries else ""))
  row = _row(i, p, wd, rc, time.time() - t0, tail)
  tmp = os.path.join(wd, "result.json.tmp")
  with open(tmp, "w") as f:
    json.dump(row, f, indent=1)
  os.replace(tmp, os.path.join(wd, "result.json"))
  return row


def _row(i: int, p: Point, wd: str, rc: int, wall: float, tail: str) -> dict:
  row = {"point": i, "name": p.get("name", ""), "overrides": _jsonable(p), "wall_s": wall,
         "workdir": wd}
  summary_path = os.path.join(wd, "summary.json")
  if rc != 0 or not os.path.exists(summary_path):
    row.update(status="failed", returncode=rc, error_tail=tail)
    return row
  with open(summary_path) as f:
    s = json.load(f)
  with open(os.path.join(wd, "config.json")) as f:
    cfg = json.load(f)
  acct, model = s["accounting"], cfg["model"]
  moe = model["moe"]
  sparse = moe["num_experts"] > 0
  evals = [e["loss"] for e in s.get("evals", [])]
  row.update(
      status=s.get("status", "completed"), d_model=model["d_model"],
      num_layers=model["num_layers"], num_experts=moe["num_experts"] if sparse else 1,
      experts_per_token=moe["experts_per_token"] if sparse else 1,
      granularity=moe["granularity"] if sparse else 1,
      total_params=acct["total_params"], active_params=acct["active_params"],
      flops_per_token=acct["train_flops_per_token"], tokens=s["tokens_seen"],
      compute=acct["train_flops_per_token"] * s["tokens_seen"],
      final_val_loss=s.get("final_val_loss"), best_val_loss=min(evals) if evals else None,
      final_val_bpb=s.get("final_val_bpb"), steps=s.get("step"),
      curve=[(e["step"], e["loss"]) for e in s.get("evals", [])])
  return row


def collect(sweep_dir: str) -> list[dict]:
  """Every point's result.json -> DIR/results.csv (and results.json); returns the rows."""
  rows = []
  pdir = os.path.join(sweep_dir, "points")
  for name in sorted(os.listdir(pdir)) if os.path.isdir(pdir) else []:
    path = os.path.join(pdir, name, "result.json")
    if os.path.exists(path):
      with open(path) as f:
        rows.append(json.load(f))
  rows.sort(key=lambda r: r["point"])
  write_table(rows, os.path.join(sweep_dir, "results.csv"))
  tmp = os.path.join(sweep_dir, "results.json.tmp")
  with open(tmp, "w") as f:
    json.dump(rows, f, indent=1)
  os.replace(tmp, os.path.join(sweep_dir, "results.json"))
  return rows


def write_table(rows: list[dict], path: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({**r, "overrides": json.dumps(r["overrides"], sort_keys=True)})
  os.replace(tmp, path)


def read_table(path: str) -> list[dict]:
  """results.csv -> rows with numbers parsed (the format `collect` writes)."""
  out = []
  with open(path, newline="") as f:
    for r in csv.DictReader(f):
      row: dict[str, Any] = {}
      for k, v in r.items():
        if k == "overrides":
          row[k] = json.loads(v)
          continue
        try:
          row[k] = int(v)
        except ValueError:
          try:
            row[k] = float(v)
          except ValueError:
            row[k] = v
      out.append(row)
  return out


def _select(points: list[Point], only: str) -> list[int]:
  if not only:
    return list(range(len(points)))
  idx = []
  for part in only.split(","):
    a, _, b = part.partition("-")
    rng = range(int(a), int(b) + 1) if b else [int(a)]
    for i in rng:
      if not 0 <= i < len(points):
        raise SystemExit(f"--only: point {i} does not exist (the sweep has {len(points)})")
      idx.append(i)
  return idx


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m moejax.sweep", description=__doc__.split("\n")[0])
  ap.add_argument("--config", required=True, help="FILE[:arg] defining get_config and get_sweep")
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--only", default="", help="point indices, e.g. 0,3,5-7")
  ap.add_argument("--print_commands", action="store_true",
                  help="print one command per point (for a cluster scheduler) and exit")
  ap.add_argument("--collect", action="store_true", help="only rebuild results.csv")
  ap.add_argument("--retries", type=int, default=1)
  ap.add_argument("--progress", action="store_true", help="show each point's progress bar")
  a = ap.parse_args(argv)
  if a.collect:
    rows = collect(a.workdir)
    print(f"[sweep] {len(rows)} rows -> {os.path.join(a.workdir, 'results.csv')}")
    return 0
  try:
    points = load_sweep(a.config)
  except config_lib.ConfigError as e:
    print(f"[sweep] error: {e}", file=sys.stderr)
    return 2
  chosen = _select(points, a.only)
  if a.print_commands:
    for i in chosen:
      print(f"{sys.executable} -m moejax.sweep --config {a.config} --workdir {a.workdir} "
            f"--only {i}")
    return 0
  os.makedirs(a.workdir, exist_ok=True)
  with open(os.path.join(a.workdir, "sweep.json"), "w") as f:
    json.dump({"config": a.config, "points": [_jsonable(p) | {"name": p.get("name", "")}
                                              for p in points]}, f, indent=1)
  failed, t_sweep, ran = [], time.time(), 0
  todo = [i for i in chosen if not is_done(a.workdir, i, points[i])]
  print(f"[sweep] {len(points)} points, {len(chosen) - len(todo)} already done, "
        f"{len(todo)} to run -> {a.workdir}", flush=True)
  for n, i in enumerate(todo):
    p = points[i]
    print(f"[sweep] {n + 1}/{len(todo)} point {i} {label(i, p)}: {_override_args(p)}",
          flush=True)
    row = run_point(a.config, a.workdir, i, p, retries=a.retries, progress=a.progress)
    ran += 1
    collect(a.workdir)
    elapsed = time.time() - t_sweep
    eta = elapsed / ran * (len(todo) - ran)
    if row["status"] != "completed":
      failed.append(i)
      print(f"[sweep]   FAILED after {row['wall_s']:.0f}s (see {row['workdir']})", flush=True)
    else:
      print(f"[sweep]   done in {row['wall_s']:.0f}s: val loss {row['final_val_loss']:.4f}, "
            f"{row['active_params'] / 1e6:.3f}M active params, compute {row['compute']:.3g} "
            f"FLOPs; elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min", flush=True)
  rows = collect(a.workdir)
  print(f"[sweep] finished: {sum(r['status'] == 'completed' for r in rows)} completed, "
        f"{len(failed)} failed this run; table {os.path.join(a.workdir, 'results.csv')}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
