#!/usr/bin/env bash
# On a machine with a GPU (no network needed; installs nothing): runs the kernel and
# dispatch tests with the Pallas Triton kernels compiled for real, then benchmarks/gmm.py,
# within about 8 minutes, and writes JSON + logs to $OUT (default benchmarks/results).
#
#   PYTHON=.venv/bin/python OUT=/tmp/out bash benchmarks/gpu_check.sh
#
# PYTHON: an interpreter with jax[cuda] and moejax's dev dependencies (default: .venv's,
# else python3). BUDGET_S: total seconds (default 460). Writes to $OUT:
#   gpu_check.json        what was found, pytest status/counts/time, benchmark status
#   gpu_check_pytest.log  pytest output; gpu_check_pytest.xml  junit per test
#   gmm.json              benchmarks/gmm.py results (written after every shape)
#   gpu_check_bench.log   benchmark output
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET_S=${BUDGET_S:-460}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Several pytest workers share one GPU: allocate on demand, not 75% each.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# The tests compare float32 results to 2e-5; GPUs default to TF32 for float32 matmuls.
export JAX_DEFAULT_MATMUL_PRECISION=highest

echo "=== what is here ==="
echo "python: $PYTHON ($("$PYTHON" --version 2>&1))"
command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "nvidia-smi: not found"
"$PYTHON" - <<'PY' || { echo "jax is not importable with $PYTHON: nothing to run"; exit 2; }
import importlib.util, jax, jaxlib
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "backend", jax.default_backend())
print("devices", jax.devices())
for mod in ("jax_cuda12_plugin", "jax_cuda13_plugin", "pytest", "xdist", "hypothesis", "flax"):
  print(f"{mod}: {'yes' if importlib.util.find_spec(mod) else 'no'}")
PY
BACKEND=$("$PYTHON" -c "import jax; print(jax.default_backend())" 2>/dev/null)
QUICK=""
if [ "$BACKEND" != "gpu" ]; then
  echo "jax.default_backend() is '$BACKEND', not gpu: kernels run interpreted, benchmark --quick"
  QUICK="--quick"
fi

echo "=== pytest tests/test_kernels.py tests/test_dispatch.py (Triton compiled) ==="
PYTEST_S=$(( BUDGET_S * 55 / 100 ))
XDIST=""
"$PYTHON" -c "import xdist" 2>/dev/null && XDIST="-n 4"
T0=$(date +%s)
timeout "$PYTEST_S" "$PYTHON" -m pytest -q $XDIST -p no:cacheprovider --durations=10 \
  --junitxml="$OUT/gpu_check_pytest.xml" tests/test_kernels.py tests/test_dispatch.py \
  2>&1 | tee "$OUT/gpu_check_pytest.log"
PYTEST_RC=${PIPESTATUS[0]}
PYTEST_WALL=$(( $(date +%s) - T0 ))

echo "=== benchmarks/gmm.py ==="
LEFT=$(( BUDGET_S - ($(date +%s) - START) ))
BENCH_BUDGET=$(( LEFT - 90 ))  # starts no new shape after this; the last one may overrun
if [ "$BENCH_BUDGET" -lt 30 ]; then BENCH_BUDGET=30; fi
T0=$(date +%s)
# The benchmark runs as training would: default allocator and matmul precision.
timeout $(( LEFT > 40 ? LEFT - 10 : 30 )) env -u XLA_PYTHON_CLIENT_PREALLOCATE \
  -u JAX_DEFAULT_MATMUL_PRECISION "$PYTHON" benchmarks/gmm.py $QUICK \
  --budget-s "$BENCH_BUDGET" --out "$OUT/gmm.json" 2>&1 | tee "$OUT/gpu_check_bench.log"
BENCH_RC=${PIPESTATUS[0]}
BENCH_WALL=$(( $(date +%s) - T0 ))

"$PYTHON" - "$OUT" "$PYTEST_RC" "$PYTEST_WALL" "$BENCH_RC" "$BENCH_WALL" "$START" <<'PY'
import json, os, sys, time, xml.etree.ElementTree as ET
import jax
out, pytest_rc, pytest_wall, bench_rc, bench_wall, start = sys.argv[1:]
counts = {}
try:
  suite = ET.parse(os.path.join(out, "gpu_check_pytest.xml")).getroot()
  suite = suite if suite.tag == "testsuite" else suite[0]
  counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except Exception as e:
  counts = {"unreadable": str(e)}
summary = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "jax": jax.__version__,
           "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
           "pytest": {"rc": int(pytest_rc), "wall_s": int(pytest_wall), **counts},
           "benchmark": {"rc": int(bench_rc), "wall_s": int(bench_wall),
                         "json": os.path.join(out, "gmm.json")},
           "total_wall_s": int(time.time()) - int(start)}
with open(os.path.join(out, "gpu_check.json"), "w") as f:
  json.dump(summary, f, indent=2)
print(json.dumps(summary, indent=2))
PY
echo "=== done in $(( $(date +%s) - START )) s: pytest rc $PYTEST_RC, benchmark rc $BENCH_RC ==="
[ "$PYTEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
