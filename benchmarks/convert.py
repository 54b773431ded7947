"""Importing a ~1B-parameter Hugging Face checkpoint: time and host memory.

    python benchmarks/convert.py [--reps 3] [--workdir /tmp/moejax-convert-bench] [--keep]

1. Writes a random Llama-family checkpoint of 1.14B parameters in bfloat16 (d_model 2048,
   16 layers, 16 query / 8 KV heads of 128, SwiGLU 8192, vocabulary 32000, untied; 2 GB
   shards) with moejax.hf.synthetic, in its own process.
2. Loads it `reps` times with `moejax.hf.load(..., dtype="bfloat16")`, each in a fresh
   process, on one CPU device and on 8 simulated devices (mesh fsdp 4 x tensor 2):
   wall time, peak RSS growth over the process before the load, the bytes the devices
   hold (on CPU that is host memory too) and the rest, against the largest tensor.
3. Decode KV-cache bytes per token of the same width: GQA (8 KV heads) and full MHA.
   Multi-head Latent Attention is not implemented yet, so it has no row.

Writes benchmarks/results/convert.json (medians, every value listed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

MODEL = dict(vocab_size=32000, d_model=2048, num_layers=16, num_heads=16, num_kv_heads=8,
             head_dim=128, d_ff=8192, max_seq_len=4096, tie_embeddings=False)

LOAD = r"""
import json, sys, time
import jax, ml_collections, numpy as np
import moejax.hf as hf
from moejax import parallel
folder, devices = sys.argv[1], int(sys.argv[2])
mesh = None
if devices > 1:
  mesh = parallel.make_mesh(ml_collections.ConfigDict(
      {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1, "rules": ()}))
model = hf.model_from_config(hf.config_from_hf(folder, "bfloat16"))
hf.abstract_params(model)
jax.block_until_ready(jax.device_put(np.zeros(8)))
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
hwm = lambda: [int(l.split()[1]) * 1024 for l in open("/proc/self/status")
               if l.startswith("VmHWM")][0]
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = rss()
t0 = time.perf_counter()
_, v = hf.load(folder, dtype="bfloat16", mesh=mesh)
jax.block_until_ready(v)
wall = time.perf_counter() - t0
peak = hwm()
held = sum(s.data.nbytes for x in jax.tree.leaves(v) for s in x.addressable_shards)
print(json.dumps({"seconds": wall, "rss_growth_bytes": peak - base, "held_bytes": held,
                  "devices": jax.device_count()}))
"""


def summary(values):
  return {"median": statistics.median(values), "min": min(values), "max": max(values),
          "all": values}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--workdir", default="/tmp/moejax-convert-bench")
  p.add_argument("--out", default=os.path.join(HERE, "results", "convert.json"))
  p.add_argument("--keep", action="store_true")
  p.add_argument("--_write", default="", help=argparse.SUPPRESS)
  a = p.parse_args()
  from moejax import config as config_lib  # pylint: disable=g-import-not-at-top
  if a._write:  # pylint: disable=protected-access
    from moejax.hf import synthetic  # pylint: disable=g-import-not-at-top
    c = config_lib.base_config()
    for k, v in MODEL.items():
      c.model[k] = v
    t0 = time.perf_counter()
    info = synthetic.write_random(a._write, c, dtype="bfloat16", max_shard_bytes=2 << 30)  # pylint: disable=protected-access
    info["write_s"] = time.perf_counter() - t0
    print(json.dumps(info))
    return

  from moejax.bench import machine_info, write_json  # pylint: disable=g-import-not-at-top
  shutil.rmtree(a.workdir, ignore_errors=True)
  folder = os.path.join(a.workdir, "llama-1b")
  out = subprocess.run([sys.executable, __file__, "--_write", folder], check=True,
                       capture_output=True, text=True, cwd=ROOT)
  ck = json.loads(out.stdout.strip().splitlines()[-1])
  print(f"checkpoint: {ck['params'] / 1e9:.2f}B params, {ck['bytes'] / 2**30:.2f} GiB in "
        f"{ck['shards']} shards, largest tensor {ck['largest_bytes'] / 2**20:.0f} MiB "
        f"({ck['write_s']:.0f} s)", flush=True)
  loads = {}
  for devices in (1, 8):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    if devices > 1:
      env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    runs = []
    for r in range(a.reps):
      o = subprocess.run([sys.executable, "-c", LOAD, folder, str(devices)], env=env,
                         check=True, capture_output=True, text=True, cwd=ROOT)
      runs.append(json.loads(o.stdout.strip().splitlines()[-1]))
      x = runs[-1]
      print(f"load on {devices} device(s) {r}: {x['seconds']:.1f} s, RSS growth "
            f"{x['rss_growth_bytes'] / 2**30:.2f} GiB, held {x['held_bytes'] / 2**30:.2f} GiB",
            flush=True)
    over = [(x["rss_growth_bytes"] - x["held_bytes"]) / ck["largest_bytes"] for x in runs]
    loads[f"{devices}_devices"] = {
        "runs": runs, "seconds": summary([x["seconds"] for x in runs]),
        "gb_per_s": summary([ck["bytes"] / 1e9 / x["seconds"] for x in runs]),
        "rss_beyond_held_over_largest_tensor": summary(over)}
  m = MODEL
  kv = {"gqa_8_kv_heads": 2 * m["num_layers"] * m["num_kv_heads"] * m["head_dim"] * 2,
        "mha_16_heads": 2 * m["num_layers"] * m["num_heads"] * m["head_dim"] * 2,
        "mla": None, "note": "bf16 bytes per token over all layers; MLA is not implemented"}
  result = {"benchmark": "convert", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "machine": machine_info(), "model": MODEL, "checkpoint": ck, "load": loads,
            "kv_cache_bytes_per_token": kv,
            "target": "RSS growth beyond the arrays the devices hold <= 3x the largest tensor",
            "met": all(v["rss_beyond_held_over_largest_tensor"]["max"] <= 3
                       for v in loads.values())}
  write_json(a.out, result)
  print(json.dumps({k: {kk: vv["median"] for kk, vv in v.items() if isinstance(vv, dict)
                        and "median" in vv} for k, v in loads.items()}), flush=True)
  if not a.keep:
    shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
