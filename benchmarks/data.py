"""Data pipeline at scale: prepare a corpus larger than a few GB, then stream it as training does.

    python benchmarks/data.py [--gb 2.0] [--reps 3] [--workdir /tmp/moejax-data-bench]
                              [--out benchmarks/results/data.json] [--keep]

1. Makes a corpus locally (no network): JSONL files of documents, each a Python
   standard-library file with its lines shuffled (so no two documents are identical),
   until the text reaches --gb gigabytes.
2. Prepares it `reps` times with `moejax.data.prepare` (byte tokenizer, the default
   worker count: one per core), each into a fresh folder; reports input MB/s.
3. Streams the prepared folder `reps` times, each in a fresh process, with the quickstart
   config's data settings (`data.prepared` = the folder): build_data + next(train_iter)
   as the training loop calls it; reports tokens/s and the process's peak RSS.
4. Times the quickstart train step (synthetic batches, as benchmarks/train_step.py) in
   the same run, so the loader/trainer ratio compares figures from one machine state.

Medians over the repetitions, with every value listed. The corpus and the prepared
folders are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def make_corpus(folder: str, gb: float, file_mb: int = 128, seed: int = 0) -> dict:
  """JSONL files {"text": ...} of line-shuffled stdlib files, totalling >= gb GB of text."""
  os.makedirs(folder, exist_ok=True)
  stdlib = sysconfig.get_paths()["stdlib"]
  docs = []
  for dirpath, _, files in os.walk(stdlib):
    for f in sorted(files):
      if f.endswith(".py"):
        try:
          with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
            lines = fh.read().splitlines(keepends=True)
        except (UnicodeDecodeError, OSError):
          continue
        if lines:
          docs.append(lines)
  rng = random.Random(seed)
  target, text_bytes, n_docs, n_files = int(gb * 1e9), 0, 0, 0
  while text_bytes < target:
    path = os.path.join(folder, f"part-{n_files:04d}.jsonl")
    with open(path, "w", encoding="utf-8") as out:
      file_bytes = 0
      while file_bytes < file_mb * 1e6 and text_bytes < target:
        lines = list(rng.choice(docs))
        rng.shuffle(lines)
        text = "".join(lines)
        out.write(json.dumps({"text": text}) + "\n")
        n = len(text.encode("utf-8"))
        file_bytes, text_bytes, n_docs = file_bytes + n, text_bytes + n, n_docs + 1
    n_files += 1
  disk = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
  return {"text_bytes": text_bytes, "jsonl_bytes_on_disk": disk, "documents": n_docs,
          "files": n_files, "stdlib_files_sampled": len(docs)}


def folder_bytes(folder: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def data_config(overrides: list[str]):
  from moejax.config import load_config  # pylint: disable=g-import-not-at-top
  return load_config(os.path.join(ROOT, "configs/quickstart.py"),
                     [f"--config.{o}" for o in overrides])


def stream(prepared: str, batches: int, warmup: int) -> dict:
  """Runs in a fresh process: open the folder, draw batches as the training loop does."""
  from moejax.data.pipeline import build_data  # pylint: disable=g-import-not-at-top
  config = data_config([f"data.prepared={prepared}"])
  t0 = time.perf_counter()
  data = build_data(config.data, seed=config.seed, verbose=False)
  open_s = time.perf_counter() - t0
  it = data.train_iter
  for _ in range(warmup):
    next(it)
  t0 = time.perf_counter()
  tokens = 0
  for _ in range(batches):
    b = next(it)
    tokens += int(b["inputs"].size)
  wall = time.perf_counter() - t0
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
  return {"open_s": open_s, "batches": batches, "tokens": tokens, "wall_s": wall,
          "tokens_per_s": tokens / wall, "peak_rss_bytes": rss,
          "batch_shape": list(b["inputs"].shape), "jax_imported": "jax" in sys.modules,
          "train_windows": data.info["num_train_windows"]}


def trainer_tokens_per_s(reps: int, steps: int) -> dict:
  sys.path.insert(0, HERE)
  from train_step import bench_config  # pylint: disable=g-import-not-at-top
  r = bench_config("quickstart", [], reps, steps, peak=1.0)
  return {"tokens_per_s": r["tokens_per_s"], "step_time_s": r["step_time_s"],
          "step_times_s": r["step_times_s"], "batch": r["batch"], "seq_len": r["seq_len"]}


def summary(values: list[float]) -> dict:
  return {"median": statistics.median(values), "min": min(values), "max": max(values),
          "all": values}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--gb", type=float, default=2.0)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--batches", type=int, default=3000)
  p.add_argument("--workdir", default="/tmp/moejax-data-bench")
  p.add_argument("--out", default=os.path.join(HERE, "results", "data.json"))
  p.add_argument("--keep", action="store_true")
  p.add_argument("--_stream", default="", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a._stream:  # pylint: disable=protected-access
    print(json.dumps(stream(a._stream, a.batches, warmup=50)))  # pylint: disable=protected-access
    return

  from moejax.bench import machine_info, write_json  # pylint: disable=g-import-not-at-top
  from moejax.data import prepare as prepare_lib  # pylint: disable=g-import-not-at-top
  shutil.rmtree(a.workdir, ignore_errors=True)
  corpus_dir = os.path.join(a.workdir, "corpus")
  t0 = time.perf_counter()
  corpus = make_corpus(corpus_dir, a.gb)
  corpus["make_s"] = time.perf_counter() - t0
  print(f"corpus: {corpus['text_bytes'] / 1e9:.2f} GB of text, {corpus['documents']} documents"
        f" in {corpus['files']} files ({corpus['make_s']:.0f} s)", flush=True)

  prep_cfg = data_config(["data.source=jsonl", f"data.paths=('{corpus_dir}',)"]).data
  workers = prep_cfg.prepare_workers or os.cpu_count()
  prepare_s, prepared = [], ""
  for r in range(a.reps):
    if prepared:
      shutil.rmtree(prepared)
    prepared = os.path.join(a.workdir, f"prepared-{r}")
    t0 = time.perf_counter()
    manifest = prepare_lib.prepare(prep_cfg, prepared, workers=workers, verbose=False)
    prepare_s.append(time.perf_counter() - t0)
    print(f"prepare {r}: {prepare_s[-1]:.1f} s = "
          f"{corpus['text_bytes'] / 1e6 / prepare_s[-1]:.1f} MB/s", flush=True)
  shards_bytes = folder_bytes(prepared)

  streams = []
  for r in range(a.reps):
    out = subprocess.run([sys.executable, __file__, "--_stream", prepared,
                          "--batches", str(a.batches)], check=True, capture_output=True,
                         text=True, cwd=ROOT)
    streams.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"stream {r}: {streams[-1]['tokens_per_s']:.0f} tokens/s, peak RSS "
          f"{streams[-1]['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)

  trainer = trainer_tokens_per_s(reps=a.reps, steps=10)
  print(f"quickstart train step: {trainer['tokens_per_s']:.0f} tokens/s", flush=True)
  loader = summary([s["tokens_per_s"] for s in streams])
  rss = summary([s["peak_rss_bytes"] for s in streams])
  result = {
      "benchmark": "data",
      "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
      "machine": machine_info(),
      "corpus": corpus,
      "prepare": {"workers": workers, "tokenizer": "byte", "source": "jsonl",
                  "seconds": summary(prepare_s),
                  "input_mb_per_s": summary([corpus["text_bytes"] / 1e6 / s for s in prepare_s]),
                  "prepared_bytes_on_disk": shards_bytes,
                  "splits": {k: {f: v[f] for f in ("tokens", "docs", "bytes")} | {
                      "shards": len(v["shards"])} for k, v in manifest["splits"].items()}},
      "stream": {"config": "configs/quickstart.py with data.prepared", "runs": streams,
                 "tokens_per_s": loader, "peak_rss_bytes": rss},
      "quickstart_train_step": trainer,
      "loader_over_trainer": loader["median"] / trainer["tokens_per_s"],
      "targets": {"peak_rss_below_bytes": 2**30, "corpus_at_least_bytes": 2 * 10**9,
                  "loader_over_trainer_at_least": 20.0},
      "met": {"rss": rss["max"] < 2**30, "corpus": corpus["text_bytes"] >= 2 * 10**9,
              "throughput": loader["min"] / trainer["tokens_per_s"] >= 20.0},
  }
  write_json(a.out, result)
  print(json.dumps({k: result[k] for k in ("loader_over_trainer", "met")}), flush=True)
  if not a.keep:
    shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
