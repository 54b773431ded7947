"""Helpers shared by the benchmark scripts: machine description and JSON output."""

from __future__ import annotations

import json
import os
import platform


def machine_info() -> dict:
  import jax
  return {"platform": platform.platform(), "cpus": os.cpu_count(),
          "backend": jax.default_backend(), "devices": jax.device_count(),
          "python": platform.python_version(), "jax": jax.__version__}


def write_json(path: str, obj: dict) -> None:
  """Write `obj` to `path` (atomically, creating the folder)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)
