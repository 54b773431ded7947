"""moejax.sweep: declaring sweeps, running them resumably, the results table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from moejax import sweep
from moejax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWEEP_FILE = textwrap.dedent("""
    from moejax import sweep
    from moejax.config import base_config
    from moejax.presets import apply_size

    def get_config(arg=""):
      c = base_config()
      apply_size(c, "runlocal")
      c.model.d_model, c.model.d_ff = 16, 32
      c.data.seq_len, c.data.batch_size = 16, 4
      c.data.max_documents = 200
      c.train.num_steps, c.train.eval_every, c.train.eval_batches = 3, 3, 1
      c.train.checkpoint_every, c.train.log_every = 1, 1
      c.optim.warmup_steps = 1
      c.train.tensorboard = False
      return c

    def get_sweep(arg=""):
      if arg == "bad":
        return [{"model.d_model": 16}, {"model.moe.num_experts": -3}]
      return sweep.zipped(sweep.axis("name", ["dense", "moe"]),
                          sweep.axis("model.moe.num_experts", [0, 4]),
                          sweep.axis("train.num_steps", [3, 2]))
    """)


def test_product_and_zip():
  pts = sweep.product(sweep.axis("a", [1, 2]), sweep.zipped(sweep.axis("b", [3, 4]),
                                                            sweep.axis("name", ["x", "y"])))
  assert pts == [{"a": 1, "b": 3, "name": "x"}, {"a": 1, "b": 4, "name": "y"},
                 {"a": 2, "b": 3, "name": "x"}, {"a": 2, "b": 4, "name": "y"}]
  assert sweep.product(sweep.axis("name", ["a"]), sweep.axis("name", ["b"])) == [{"name": "a_b"}]
  with pytest.raises(ValueError, match="different lengths"):
    sweep.zipped(sweep.axis("a", [1, 2]), sweep.axis("b", [1]))
  with pytest.raises(ValueError, match="'a' set twice"):
    sweep.product(sweep.axis("a", [1]), sweep.axis("a", [2]))
  # labels: stable, distinct for distinct overrides, changed when the overrides change
  assert sweep.label(3, {"a": 1, "name": "x"}) == sweep.label(3, {"a": 1, "name": "x"})
  assert sweep.label(3, {"a": 1, "name": "x"}) != sweep.label(3, {"a": 2, "name": "x"})
  assert sweep.label(3, {"a": 1, "name": "x"}).startswith("003_x_")


def test_bad_point_is_named_before_anything_runs(tmp_path):
  cfg = tmp_path / "s.py"
  cfg.write_text(SWEEP_FILE)
  with pytest.raises(ConfigError, match=r"sweep point 1 .*model\.moe\.num_experts = -3"):
    sweep.load_sweep(f"{cfg}:bad")
  plain = tmp_path / "plain.py"
  plain.write_text("def get_config(arg=''):\n  return None\n")
  with pytest.raises(ConfigError, match="has no get_sweep"):
    sweep.load_sweep(str(plain))
  assert sweep.main(["--config", f"{cfg}:bad", "--workdir", str(tmp_path / "w")]) == 2
  assert not (tmp_path / "w").exists()


def test_sweep_runs_retries_resumes_and_tables(tmp_path, monkeypatch, capsys):
  cfg = tmp_path / "s.py"
  cfg.write_text(SWEEP_FILE)
  wd = tmp_path / "sweep"
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")  # one device
  real_run = subprocess.run
  calls = []

  def run(cmd, **kw):  # the first attempt of point 0 crashes
    calls.append(cmd)
    if len(calls) == 1:
      cmd = [sys.executable, "-c", "import os; os.abort()"]
    return real_run(cmd, **kw)

  monkeypatch.setattr(sweep.subprocess, "run", run)
  assert sweep.main(["--config", str(cfg), "--workdir", str(wd)]) == 0
  assert len(calls) == 3  # point 0 twice (crash, then retry), point 1 once
  out = capsys.readouterr().out
  assert "attempt 1 exited" in out and "retrying" in out
  rows = sweep.read_table(str(wd / "results.csv"))
  assert [r["name"] for r in rows] == ["dense", "moe"]
  assert all(r["status"] == "completed" for r in rows)
  dense, moe = rows
  assert dense["overrides"] == {"model.moe.num_experts": 0, "train.num_steps": 3}
  assert (dense["num_experts"], moe["num_experts"], moe["experts_per_token"]) == (1, 4, 2)
  assert dense["steps"] == 3 and moe["steps"] == 2
  assert dense["tokens"] == 3 * 4 * 16 and moe["tokens"] == 2 * 4 * 16
  for r in rows:
    assert r["compute"] == pytest.approx(r["flops_per_token"] * r["tokens"])
    assert r["best_val_loss"] <= r["final_val_loss"] < 10
  assert moe["total_params"] > moe["active_params"] and dense["total_params"] == dense[
      "active_params"]
  summary = json.load(open(wd / "points" / sweep.label(0, {"name": "dense",
                                                           **dense["overrides"]}) /
                           "summary.json"))
  assert summary["final_val_loss"] == pytest.approx(dense["final_val_loss"])

  # Re-running skips finished points; a changed point runs again in a new directory.
  calls.clear()
  assert sweep.main(["--config", str(cfg), "--workdir", str(wd)]) == 0
  assert calls == []

  # A point that keeps failing is recorded as failed and the sweep exits non-zero.
  def always_fail(spec, workdir, p, progress=False):
    return [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]

  monkeypatch.setattr(sweep, "train_command", always_fail)
  monkeypatch.setattr(sweep.subprocess, "run", real_run)
  os.remove(wd / "points" / sweep.label(1, {"name": "moe", **moe["overrides"]}) / "result.json")
  assert sweep.main(["--config", str(cfg), "--workdir", str(wd)]) == 1
  rows = sweep.read_table(str(wd / "results.csv"))
  assert [r["status"] for r in rows] == ["completed", "failed"]
  res = json.load(open(wd / "points" / sweep.label(1, {"name": "moe", **moe["overrides"]}) /
                       "result.json"))
  assert res["returncode"] == 3 and "boom" in res["error_tail"]


def test_print_commands(tmp_path, capsys):
  cfg = tmp_path / "s.py"
  cfg.write_text(SWEEP_FILE)
  assert sweep.main(["--config", str(cfg), "--workdir", "W", "--print_commands"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 and lines[1].endswith("--only 1") and "-m moejax.sweep" in lines[0]
  with pytest.raises(SystemExit, match="point 5 does not exist"):
    sweep.main(["--config", str(cfg), "--workdir", "W", "--only", "5"])


def test_laptop_sweep_declares_the_issue_grid():
  pts = sweep.load_sweep(os.path.join(ROOT, "configs/scaling/laptop.py"))
  assert len(pts) >= 12
  widths = {p["model.d_model"] for p in pts}
  experts = {p.get("model.moe.num_experts", 0) for p in pts}
  steps_by_width = {}
  for p in pts:
    if "model.moe.num_experts" not in p:
      steps_by_width.setdefault(p["model.d_model"], set()).add(p["train.num_steps"])
  assert len(widths) >= 3 and {0, 4, 16} <= experts
  assert all(len(s) >= 2 for s in steps_by_width.values())  # 2+ token budgets per size


@pytest.mark.parametrize("study", ["capacity_factor", "fine_grained", "loss_free"])
def test_reproduction_sweeps_are_valid(study):
  """The reproduction studies' sweeps load and every point validates (nothing runs)."""
  pts = sweep.load_sweep(os.path.join(ROOT, "experiments", study, "config.py"))
  assert len(pts) >= 3 and len({sweep.label(i, p) for i, p in enumerate(pts)}) == len(pts)
