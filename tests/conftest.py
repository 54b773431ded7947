"""Test setup: 8 simulated CPU devices (before JAX initialises its backends)."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# The tests' programs are tiny: compiling them dominates, and LLVM's optimisations buy
# nothing at these sizes (measured: a sharded MoR step test 29 s -> 19 s). Numerics are
# unchanged up to reduction order; benchmarks never run with this flag.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import jax  # noqa: E402

try:
  jax.config.update("jax_num_cpu_devices", 8)
except Exception:  # older/newer jax without the option: XLA_FLAGS above does it
  pass


import pytest  # noqa: E402


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False,
                   help="also run tests marked slow (redundant variants of covered features)")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: a redundant variant; run with --runslow")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow") or os.environ.get("MOEJAX_SLOW"):
    return
  skip = pytest.mark.skip(reason="slow variant: run with --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
