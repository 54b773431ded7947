"""The Colab notebooks run headless on their tiniest settings and produce what they show.

Each notebook is executed top to bottom in a fresh Jupyter kernel (nbclient + ipykernel,
the interpreter running pytest) with MOEJAX_NOTEBOOK_TINY=1, its runs and plots under
tmp_path, one CPU device. Where no kernel can be started the code cells run as one script
in a subprocess instead (the notebooks use no IPython magics, so they are plain Python).
Each test then checks the notebook's numbers against the run files or known values.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import nbformat
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = ("quickstart", "routing", "recursion", "scaling")
CELL_TIMEOUT_S = 300


def _env(work) -> dict:
  env = dict(os.environ)
  # One CPU device, as a user has (conftest simulates 8 for the other tests); keep the
  # suite's -O0 compile setting (tiny programs: compiling dominates).
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  env.update(JAX_PLATFORMS="cpu", MOEJAX_NOTEBOOK_TINY="1", MOEJAX_NOTEBOOK_WORKDIR=str(work),
             MOEJAX_ROOT=ROOT, PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
  return env


def _kernel_available() -> bool:
  return all(importlib.util.find_spec(m) for m in ("nbclient", "ipykernel", "jupyter_client"))


def _run_in_kernel(nb, env: dict, cwd, kernel_dir) -> bool:
  """Execute `nb` in place; False if the kernel could not be started."""
  from nbclient import NotebookClient
  from nbclient.exceptions import CellExecutionError

  # A kernelspec of this interpreter, found first through JUPYTER_PATH, so a user's own
  # "python3" kernelspec cannot send the notebook to another Python.
  spec = kernel_dir / "kernels" / "moejax-test"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "moejax test", "language": "python"}))
  old = os.environ.get("JUPYTER_PATH")
  os.environ["JUPYTER_PATH"] = str(kernel_dir)
  started = []
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="moejax-test",
                          resources={"metadata": {"path": str(cwd)}},
                          on_notebook_start=lambda **_: started.append(True))
  try:
    client.execute(env=env)
  except CellExecutionError:
    raise
  except Exception:  # pylint: disable=broad-except
    if started:
      raise
    return False
  finally:
    if old is None:
      os.environ.pop("JUPYTER_PATH", None)
    else:
      os.environ["JUPYTER_PATH"] = old
  return True


def _run_as_script(nb, env: dict, cwd) -> str:
  src = "\n\n".join(c.source for c in nb.cells if c.cell_type == "code")
  path = cwd / "notebook_as_script.py"
  path.write_text(src)
  r = subprocess.run([sys.executable, str(path)], env=dict(env, MPLBACKEND="Agg"), cwd=cwd,
                     capture_output=True, text=True, timeout=4 * CELL_TIMEOUT_S)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return r.stdout


def run_notebook(name: str, tmp_path, **env_extra) -> tuple[str, str]:
  """Execute notebooks/<name>.ipynb; returns (its workdir, its printed output)."""
  work = tmp_path / "work"
  work.mkdir()
  env = dict(_env(work), **env_extra)
  nb = nbformat.read(os.path.join(NB_DIR, f"{name}.ipynb"), as_version=4)
  if _kernel_available() and _run_in_kernel(nb, env, tmp_path, tmp_path / "jupyter"):
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []) if o.get("output_type") == "stream")
  else:
    text = _run_as_script(nb, env, tmp_path)
  return str(work), text


def _results(workdir: str, run: str) -> dict:
  with open(os.path.join(workdir, run, "notebook_results.json")) as f:
    return json.load(f)


def _assert_plots(folder: str, names) -> None:
  assert names
  for n in names:
    path = os.path.join(folder, n)
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
    assert os.path.getsize(path) > 5000, path  # a drawn figure, not an empty canvas


# ------------------------------------------------------------------ static checks


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean_and_colab_ready(name):
  nb = nbformat.read(os.path.join(NB_DIR, f"{name}.ipynb"), as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  code = [c for c in nb.cells if c.cell_type == "code"]
  for c in code:
    assert c.outputs == [] and c.execution_count is None, "commit notebooks without outputs"
    assert not any(l.lstrip().startswith(("%", "!")) for l in c.source.splitlines()), (
        "no IPython magics: the cells must also run as plain Python")
  first = code[0].source
  for needle in ('"google.colab" in sys.modules', "pip", "install", "jax.default_backend()",
                 "MOEJAX_NOTEBOOK_TINY", "MOEJAX_REPO_URL"):
    assert needle in first, needle


# ------------------------------------------------------------------ executed


def test_quickstart_notebook(tmp_path):
  work, text = run_notebook("quickstart", tmp_path)
  run = "quickstart_runlocal_12"
  res = _results(work, run)
  assert res["status"] == "completed" and res["steps"] == 12
  with open(os.path.join(work, run, "summary.json")) as f:
    summary = json.load(f)
  with open(os.path.join(work, run, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
  assert res["final_val_loss"] == summary["final_val_loss"] == evals[-1]["loss"]
  assert math.isfinite(res["final_val_loss"])
  assert res["final_val_loss"] < res["first_val_loss"] - 0.1  # it trained
  assert res["new_tokens"] == 32 - len("def ") - 1  # runlocal seq_len 32, BOS + prompt
  assert len(res["samples"]) == 2 and all(len(s) > 0 for s in res["samples"])
  assert "new tokens per sample" in text  # the notebook printed them
  _assert_plots(os.path.join(work, run), res["plots"])


def test_routing_notebook(tmp_path):
  work, _ = run_notebook("routing", tmp_path)
  run = "routing_switch_runlocal_16"
  res = _results(work, run)
  layers, e, k = res["num_moe_layers"], res["num_experts"], res["experts_per_token_k"]
  assert (layers, e, k) == (2, 8, 1)  # configs/moe/switch.py:runlocal: 2 layers, top-1 of 8
  assert res["load_logged_steps"] == list(range(1, 17))
  np.testing.assert_allclose(np.sum(res["load_share_last_step"], axis=-1), 1.0, rtol=1e-6)
  # the token -> expert map: every byte of the snippet at exactly k experts in every layer
  assert res["snippet_tokens"] > 50
  assert res["snippet_experts_per_token"] == [[k]] * layers
  # specialisation counted every held-out token's k assignments, per layer
  assert res["specialisation_tokens"] == 2 * 8 * 32  # 2 val batches of 8 x 32
  assert res["specialisation_assignments_per_layer"] == [res["specialisation_tokens"] * k] * layers
  for mi in res["mutual_information_bits"]:
    assert 0.0 <= mi <= math.log2(e) + 1e-9
  _assert_plots(os.path.join(work, run), res["plots"])


def test_recursion_notebook(tmp_path):
  work, _ = run_notebook("recursion", tmp_path)
  run = "recursion_mor_expert_runlocal_16"
  res = _results(work, run)
  r, t = res["num_loops"], res["snippet_tokens"]
  assert r == 3 and res["capacities"] == [1.0, 0.67, 0.33]
  depths = np.array(res["token_depths"])
  assert depths.shape == (t,) and depths.min() >= 1 and depths.max() <= r  # loop 1 keeps all
  stored = res["stored_per_loop"]
  assert stored[0] == t and all(a >= b for a, b in zip(stored, stored[1:]))  # hierarchical
  assert [int((depths >= i + 1).sum()) for i in range(r)] == stored
  # per-token depths read from the caches agree with the model's own mor_stats histogram
  # (up to one token at the router's threshold: the two paths differ in float rounding)
  diff = np.abs(np.array(res["depth_hist_from_cache"]) - np.array(res["depth_hist_from_mor_stats"]))
  assert diff.sum() <= 2.0 / t + 1e-6, (res["depth_hist_from_cache"], res["depth_hist_from_mor_stats"])
  assert abs(sum(res["train_depth_hist"]) - 1.0) < 1e-5
  ratio, s = res["kv_ratio_to_vanilla"], res["cache_len"]
  assert ratio["recursive"] == ratio["MoR, full slots"] == 1.0  # 2 shared layers x 3 loops
  assert ratio["MoR, KV sharing"] == pytest.approx(1 / 3)  # only the first loop's caches
  assert ratio["MoR, recursion-wise"] == pytest.approx(
      sum(math.ceil(c * s) for c in res["capacities"]) / (r * s))
  _assert_plots(os.path.join(work, run), res["plots"])


def _scaling_results(work: str) -> dict:
  with open(os.path.join(work, "scaling_results.json")) as f:
    return json.load(f)


def test_scaling_notebook_recovers_the_synthetic_law(tmp_path):
  work, text = run_notebook("scaling", tmp_path,
                            MOEJAX_SWEEP_TABLE=str(tmp_path / "no_such_table.csv"))
  res = _scaling_results(work)
  assert res["synthetic"] and "SYNTHETIC" in text  # and it says so
  assert res["table"] == os.path.join(work, "synthetic_sweep.csv")
  assert (res["dense_rows"], res["moe_rows"]) == (20, 10)
  true, fitted = res["true_law"], res["chinchilla"]["params"]
  for name in ("alpha", "beta"):
    assert fitted[name] == pytest.approx(true[name], rel=0.05), name
  a_true = true["beta"] / (true["alpha"] + true["beta"])  # Chinchilla: N_opt ~ C^a
  assert res["isoflop"]["a"] == pytest.approx(a_true, rel=0.05)
  assert res["isoflop"]["a"] + res["isoflop"]["b"] == pytest.approx(1.0, abs=1e-6)  # C = 6ND
  routed = res["routed"]["params"]
  assert routed["b"] == pytest.approx(res["true_routed"]["b"], abs=0.02)
  assert routed["c"] == pytest.approx(res["true_routed"]["c"], abs=0.002)
  assert len(res["plots"]) == 3
  _assert_plots(work, res["plots"])


REAL_TABLE = os.path.join(ROOT, "experiments", "scaling_laptop", "results.csv")


@pytest.mark.skipif(not os.path.exists(REAL_TABLE), reason="no committed laptop sweep table")
def test_scaling_notebook_fits_the_committed_sweep(tmp_path):
  work, _ = run_notebook("scaling", tmp_path)
  res = _scaling_results(work)
  assert not res["synthetic"] and res["table"] == REAL_TABLE
  assert res["dense_rows"] >= 5
  assert all(math.isfinite(v) for v in res["chinchilla"]["params"].values())
  _assert_plots(work, res["plots"])
