"""End-to-end training: exact resume after SIGKILL / SIGTERM, checkpoint fallback,
NaN handling, metrics files and the generate CLI.

Runs that get killed are subprocesses on one CPU device (the real CLI); the rest run
in-process on the 8 simulated devices.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from moejax.config import ConfigError, load_config
from moejax.train import checkpoint as ckpt_lib
from moejax.train.loop import abstract_train_state, train
from moejax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, "configs/quickstart.py:runlocal")

# Slow enough to be killed mid-run, fast enough for the suite.
RESUME_OVERRIDES = [
    "--config.train.num_steps=240", "--config.train.checkpoint_every=20",
    "--config.train.log_every=1", "--config.train.eval_every=80", "--config.train.eval_batches=1",
    "--config.train.progress_bar=false", "--config.train.tensorboard=false",
    "--config.data.seq_len=64", "--config.data.batch_size=8", "--config.model.d_model=64",
    "--config.model.d_ff=128", "--config.optim.warmup_steps=10",
]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one device: the plain CLI a user runs
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _cmd(workdir, overrides=()):
  return [sys.executable, "-m", "moejax.train", "--config", CFG, "--workdir", str(workdir),
          *RESUME_OVERRIDES, *overrides]


def _ckpt_steps(workdir) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _run_until_checkpoint(workdir, min_step: int, sig: int, timeout: float = 120) -> int:
  """Start a run, send `sig` once a checkpoint >= min_step exists; return its exit code."""
  p = subprocess.Popen(_cmd(workdir), env=_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  t0 = time.time()
  while time.time() - t0 < timeout:
    if p.poll() is not None:
      break
    if any(s >= min_step for s in _ckpt_steps(workdir)):
      p.send_signal(sig)
      break
    time.sleep(0.01)
  out, _ = p.communicate(timeout=timeout)
  assert p.returncode is not None
  return p.returncode, out


def _final_params(workdir):
  config = load_config(CFG, RESUME_OVERRIDES)
  abstract = abstract_train_state(config, 257)
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  payload, _, meta = ck.restore_latest(abstract)
  ck.close()
  return payload, int(meta["step"])


def _train_rows(workdir):
  return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in read_metrics(workdir)
          if r["split"] == "train"]


def _eval_rows(workdir):
  return [(r["step"], r["loss"]) for r in read_metrics(workdir) if r["split"] == "eval"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("reference")
  r = subprocess.run(_cmd(wd), env=_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr
  return wd


def _assert_same_run(a, b):
  pa, sa = _final_params(a)
  pb, sb = _final_params(b)
  assert sa == sb == 240
  la, lb = jax.tree.leaves(pa), jax.tree.leaves(pb)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit-identical
  ra, rb = _train_rows(a), _train_rows(b)
  assert [r[0] for r in ra] == list(range(1, 241))
  assert ra == rb  # every step's loss, grad norm and lr, exactly
  assert _eval_rows(a) == _eval_rows(b)


def test_sigkill_then_resume_is_bit_identical(reference_run, tmp_path):
  rc, out = _run_until_checkpoint(tmp_path, 100, signal.SIGKILL)
  assert rc == -signal.SIGKILL, f"run was not killed mid-way (rc={rc}):\n{out}"
  killed_at = max(_ckpt_steps(tmp_path))
  assert killed_at < 240
  r = subprocess.run(_cmd(tmp_path), env=_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "resumed from checkpoint at step" in r.stdout
  _assert_same_run(reference_run, tmp_path)


def test_sigterm_saves_then_resumes_exactly(reference_run, tmp_path):
  rc, out = _run_until_checkpoint(tmp_path, 60, signal.SIGTERM)
  assert rc == 128 + signal.SIGTERM, out
  assert "SIGTERM: saved checkpoint at step" in out
  stopped = int(out.split("saved checkpoint at step ")[1].split(";")[0])
  assert max(_ckpt_steps(tmp_path)) == stopped < 240
  r = subprocess.run(_cmd(tmp_path), env=_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr
  assert f"resumed from checkpoint at step {stopped}" in r.stdout
  _assert_same_run(reference_run, tmp_path)


def _small_config(**train_over):
  ov = ["--config.data.batch_size=8", "--config.train.progress_bar=false",
        "--config.train.tensorboard=false", "--config.train.async_checkpoint=false",
        "--config.train.peak_flops=1e11"]
  ov += [f"--config.train.{k}={v}" for k, v in train_over.items()]
  return load_config(CFG, ov)


def test_truncated_latest_checkpoint_falls_back(tmp_path, caplog):
  config = _small_config(num_steps=20, checkpoint_every=10)
  train(config, str(tmp_path))
  assert _ckpt_steps(tmp_path) == [10, 20]
  # Truncate every data file of the newest checkpoint's state.
  latest = os.path.join(tmp_path, "checkpoints", "20", "state")
  hit = 0
  for root, _, files in os.walk(latest):
    for f in files:
      path = os.path.join(root, f)
      if os.path.getsize(path) > 64 and not f.endswith(".json"):
        with open(path, "r+b") as fh:
          fh.truncate(os.path.getsize(path) // 3)
        hit += 1
  assert hit > 0
  abstract = abstract_train_state(config, 257)
  ck = ckpt_lib.Checkpointer(os.path.join(tmp_path, "checkpoints"), async_save=False)
  with caplog.at_level("WARNING", logger="moejax"):
    payload, _, meta = ck.restore_latest(abstract)
  ck.close()
  assert int(meta["step"]) == 10
  assert int(payload["step"]) == 10
  assert "step 20" in caplog.text
  # A training run in that workdir resumes from step 10 and finishes.
  config.train.num_steps = 30
  s = train(config, str(tmp_path))
  assert s["status"] == "completed" and s["step"] == 30


def test_checksum_mismatch_is_rejected(tmp_path, caplog):
  config = _small_config(num_steps=10, checkpoint_every=5)
  train(config, str(tmp_path))
  meta_path = os.path.join(tmp_path, "checkpoints", "10", "meta", "metadata")
  with open(meta_path) as f:
    meta = json.load(f)
  meta["checksum"] = [meta["checksum"][0] * 1.5, meta["checksum"][1]]
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  abstract = abstract_train_state(config, 257)
  ck = ckpt_lib.Checkpointer(os.path.join(tmp_path, "checkpoints"), async_save=False)
  with caplog.at_level("WARNING", logger="moejax"):
    _, _, m = ck.restore_latest(abstract)
  ck.close()
  assert int(m["step"]) == 5 and "checksum" in caplog.text


def test_nan_stops_without_saving_bad_state(tmp_path, capsys):
  from moejax.train.loop import NonFiniteLoss
  config = _small_config(num_steps=20, checkpoint_every=4, debug_nan_step=7)
  with pytest.raises(NonFiniteLoss, match="step 7"):
    train(config, str(tmp_path))
  out = capsys.readouterr().out
  assert "non-finite loss/gradient at step 7" in out
  assert _ckpt_steps(tmp_path) == [4]
  summary = json.load(open(os.path.join(tmp_path, "summary.json")))
  assert summary["status"] == "nan" and summary["step"] == 7


def test_nan_skip_policy_drops_only_that_update(tmp_path):
  config = _small_config(num_steps=10, checkpoint_every=10, log_every=1, debug_nan_step=4,
                         nan_policy="skip")
  s = train(config, str(tmp_path))
  assert s["status"] == "completed" and s["step"] == 10
  rows = {r["step"]: r for r in read_metrics(str(tmp_path)) if r["split"] == "train"}
  assert rows[4]["loss"] == "nan"
  assert all(isinstance(rows[i]["loss"], float) for i in range(1, 11) if i != 4)
  abstract = abstract_train_state(config, 257)
  ck = ckpt_lib.Checkpointer(os.path.join(tmp_path, "checkpoints"), async_save=False)
  payload, _, _ = ck.restore_latest(abstract)
  ck.close()
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(payload["params"]))


def test_metrics_files_and_summary(tmp_path):
  config = _small_config(num_steps=12, eval_every=6, log_every=3, checkpoint_every=12)
  config.train.tensorboard = True
  s = train(config, str(tmp_path))
  rows = read_metrics(str(tmp_path))
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == [3, 6, 9, 12]
  for k in ("loss", "grad_norm", "lr", "tokens_per_s", "step_time_s", "mfu", "tokens_seen"):
    assert all(isinstance(r[k], float) for r in train_rows), k
  evals = [r for r in rows if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [0, 6, 12]
  assert evals[-1]["loss"] < evals[0]["loss"]  # it learns
  assert s["final_val_bpb"] == pytest.approx(evals[-1]["bpb"])
  run = json.load(open(os.path.join(tmp_path, "run.json")))
  assert run["accounting"]["total_params"] > 0
  assert len(run["data"]["fingerprint"]) >= 12
  assert os.listdir(os.path.join(tmp_path, "tb"))  # TensorBoard event file written


def test_batch_not_divisible_by_devices_is_rejected(tmp_path):
  config = _small_config(num_steps=5)
  config.data.batch_size = 4  # 8 simulated devices
  with pytest.raises(ConfigError, match="data.batch_size"):
    train(config, str(tmp_path))


def test_generate_cli(tmp_path):
  config = _small_config(num_steps=5, checkpoint_every=5)
  train(config, str(tmp_path))
  r = subprocess.run([sys.executable, "-m", "moejax.generate", "--workdir", str(tmp_path),
                      "--prompt", "def f(", "--max_new_tokens", "12", "--temperature", "0"],
                     env=_env(), capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith("def f(")
  bad = subprocess.run([sys.executable, "-m", "moejax.generate", "--workdir", str(tmp_path),
                        "--temperature", "-1"], env=_env(), capture_output=True, text=True)
  assert bad.returncode != 0 and "--temperature" in bad.stderr


def test_cli_rejects_bad_config_cleanly(tmp_path):
  r = subprocess.run([sys.executable, "-m", "moejax.train", "--config", CFG, "--workdir",
                      str(tmp_path), "--config.model.num_kv_heads=3"], env=_env(),
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 2
  assert "config.model.num_kv_heads = 3" in r.stderr
  assert "Traceback" not in r.stderr
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))
