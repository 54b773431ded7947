"""Multi-host through jax.distributed: 2 processes x 4 CPU devices on localhost.

The processes run the real CLI (`python -m moejax.train`), each feeding its half of every
batch; the result must match one process with 8 devices, and a process that dies must
take the other down (non-zero exit) quickly instead of leaving it hanging.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from moejax.config import load_config
from moejax.train import checkpoint as ckpt_lib
from moejax.train.loop import abstract_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = "configs/moe/gshard_top2.py:runlocal"
OVERRIDES = ["--config.train.checkpoint_every=5", "--config.train.eval_batches=0",
             "--config.train.progress_bar=false", "--config.train.tensorboard=false",
             "--config.train.async_checkpoint=false", "--config.train.peak_flops=1e11",
             "--config.mesh.data=2", "--config.mesh.expert=4"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(devices: int) -> dict:
  e = dict(os.environ)
  e["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                    "--xla_backend_optimization_level=0")
  e["JAX_PLATFORMS"] = "cpu"
  e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
  return e


def launch(workdir, steps: int, process_id: int | None = None, port: int = 0, extra=()):
  cmd = [sys.executable, "-m", "moejax.train", "--config", CFG, "--workdir", str(workdir),
         f"--config.train.num_steps={steps}", f"--config.train.eval_every={steps}",
         *OVERRIDES, *extra]
  devices = 8
  if process_id is not None:
    devices = 4
    cmd += [f"--config.dist.coordinator=127.0.0.1:{port}", "--config.dist.num_processes=2",
            f"--config.dist.process_id={process_id}"]
  return subprocess.Popen(cmd, cwd=ROOT, env=env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def final_state(workdir, steps):
  config = load_config(os.path.join(ROOT, CFG), OVERRIDES + [f"--config.train.num_steps={steps}"])
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  payload, _, meta = ck.restore_latest(abstract_train_state(config, 257))
  ck.close()
  return payload, int(meta["step"])


def test_two_processes_match_one_process_across_a_resume(tmp_path):
  """The 2-process run stops at step 4 (a NaN, identical on both processes, so both stop
  with the step-2 checkpoint), restarts and resumes (parameters, optimizer, per-process
  data-iterator state) to step 5: it must still match one uninterrupted process."""
  single = launch(tmp_path / "single", 5)
  out, _ = single.communicate(timeout=300)
  assert single.returncode == 0, out[-2000:]
  port = free_port()
  crash = ["--config.train.checkpoint_every=2", "--config.train.debug_nan_step=4"]
  procs = [launch(tmp_path / "multi", 5, i, port, crash) for i in (0, 1)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode != 0 for p in procs), outs[0][-2000:]
  assert "step 4" in outs[0], outs[0][-2000:]
  port = free_port()
  procs = [launch(tmp_path / "multi", 5, i, port) for i in (0, 1)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert "resumed from checkpoint at step 2" in outs[0], outs[0][-2000:]
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-3000:]
  assert "completed at step 5/5" in outs[0]
  assert "completed at step 5" not in outs[1]  # logs come from process 0 only
  ref, step_a = final_state(tmp_path / "single", 5)
  got, step_b = final_state(tmp_path / "multi", 5)
  assert step_a == step_b == 5
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("victim", [1, pytest.param(0, marks=pytest.mark.slow)],
                         ids=["worker_dies", "coordinator_dies"])
def test_a_dead_process_stops_the_other(tmp_path, victim):
  port = free_port()
  extra = ["--config.dist.heartbeat_timeout_s=10"]
  procs = [launch(tmp_path, 400, i, port, extra) for i in (0, 1)]
  t0 = time.time()
  while not (tmp_path / "checkpoints" / "5").exists():
    assert time.time() - t0 < 240 and all(p.poll() is None for p in procs), "no checkpoint"
    time.sleep(0.2)
  time.sleep(1.0)
  procs[victim].send_signal(signal.SIGKILL)
  t_kill = time.time()
  survivor = procs[1 - victim]
  out, _ = survivor.communicate(timeout=90)
  waited = time.time() - t_kill
  procs[victim].communicate(timeout=30)
  assert survivor.returncode != 0, out[-2000:]
  assert waited < 60, waited
  # JAX's coordination service (coordinator gone) or gloo (peer gone) says why
  assert ("another task died" in out or "gloo" in out.lower()), out[-3000:]
  print(f"\n[multihost] process {1 - victim} exited {survivor.returncode} "
        f"{waited:.1f} s after process {victim} was killed")
