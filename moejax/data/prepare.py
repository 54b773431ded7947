"""Tokenize a corpus once into array_record shards of token ids, with a manifest.

    python -m moejax.data.prepare --config configs/quickstart.py --out /shared/corpus \
        [--config.data.source=jsonl --config.data.paths="('/data/c4',)" ...] [--workers 8]

Training reads the result with `data.prepared=DIR` (or `data.mixture=("DIR:W", ...)`);
a config that names a raw `data.source` prepares it automatically on first use under
`data.cache_dir`. Layout of DIR:

    manifest.json                 written last: its presence means the folder is complete
    units/00007.json              one per finished unit of work (resume markers)
    train-00007.arrayrecord       token ids of unit 7's training documents
    validation-00007.arrayrecord

Each split is the stream `[BOS] doc [EOS if data.append_eos] [BOS] doc ...` over the units
in order. A shard's records are chunks of `CHUNK_TOKENS` little-endian token ids (uint16
when the vocabulary fits, else uint32; the last record of a shard may be shorter), written
uncompressed with group_size 1 so that a window is one or two record reads.

Units are tokenized in parallel (`--workers`, default one per core) with a progress bar.
Every shard is written to a temporary name and renamed, then its unit marker is written:
a crash keeps the finished units, and running the same command again does only the rest.
The manifest records per shard and split the token, document and byte counts, the
tokenizer's identity and the source's fingerprint; a folder prepared from another source
or with another tokenizer is never reused silently.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import sys
import time
from typing import Any

import ml_collections
import numpy as np
from tqdm.auto import tqdm
from array_record.python import array_record_module

from moejax import config as config_lib
from moejax.data import corpus
from moejax.data import tokenizers

FORMAT = "moejax-tokens-v1"
CHUNK_TOKENS = 2048
WRITER_OPTIONS = "group_size:1,uncompressed"


class PrepareError(ValueError):
  """A source or output folder that cannot be prepared (names the path and the field)."""


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_name(split: str, unit: int) -> str:
  return f"{split}-{unit:05d}.arrayrecord"


class _ShardWriter:
  """Token ids -> records of CHUNK_TOKENS in one array_record file (tmp name, renamed)."""

  def __init__(self, path: str, dtype: np.dtype):
    self.path, self.dtype = path, dtype
    self.tmp = f"{path}.tmp{os.getpid()}"
    self.buf: list[np.ndarray] = []
    self.buffered = self.tokens = self.docs = self.bytes = self.records = 0
    self._writer = None

  def add(self, ids: np.ndarray, num_bytes: int):
    self.buf.append(ids.astype(self.dtype))
    self.buffered += len(ids)
    self.tokens += len(ids)
    self.docs += 1
    self.bytes += num_bytes
    if self.buffered >= 64 * CHUNK_TOKENS:
      self._flush(final=False)

  def _flush(self, final: bool):
    if not self.buf:
      return
    flat = np.concatenate(self.buf)
    n_full = len(flat) // CHUNK_TOKENS * CHUNK_TOKENS
    cut = len(flat) if final else n_full
    if self._writer is None:
      self._writer = array_record_module.ArrayRecordWriter(self.tmp, WRITER_OPTIONS)
    for lo in range(0, cut, CHUNK_TOKENS):
      self._writer.write(flat[lo:min(cut, lo + CHUNK_TOKENS)].tobytes())
      self.records += 1
    rest = flat[cut:]
    self.buf, self.buffered = ([rest], len(rest)) if len(rest) else ([], 0)

  def close(self) -> dict[str, Any] | None:
    """Renames the finished file; None when the split got no document in this unit."""
    self._flush(final=True)
    if self._writer is None:
      return None
    self._writer.close()
    os.replace(self.tmp, self.path)
    return {"file": os.path.basename(self.path), "tokens": self.tokens, "docs": self.docs,
            "bytes": self.bytes, "records": self.records,
            "file_bytes": os.path.getsize(self.path)}


def _prepare_unit(unit: corpus.Unit, options: dict[str, Any], tok_spec: dict[str, Any],
                  out_dir: str) -> dict[str, Any]:
  """Worker: tokenizes one unit into its shards and writes its marker; returns the marker."""
  tok = tokenizers.make_tokenizer(ml_collections.ConfigDict(tok_spec))
  dtype = token_dtype(tok.vocab_size)
  append_eos = bool(tok_spec.get("append_eos"))
  if append_eos and tok.eos_id < 0:
    raise PrepareError(f"config.data.append_eos = True is not allowed: the tokenizer "
                       f"{tok!r} has no EOS token distinct from BOS")
  writers = {s: _ShardWriter(os.path.join(out_dir, shard_name(s, unit.index)), dtype)
             for s in corpus.SPLITS}
  stats: dict[str, int] = {}
  pending: list[tuple[str, str]] = []

  def flush():
    ids = tok.encode_batch([t for _, t in pending])
    for (split, text), doc in zip(pending, ids):
      parts = [np.asarray([tok.bos_id]), doc] + ([np.asarray([tok.eos_id])] if append_eos
                                                 else [])
      writers[split].add(np.concatenate(parts), len(text.encode("utf-8")))
    pending.clear()

  for split, text in corpus.read_unit(unit, options, stats):
    pending.append((split, text))
    if len(pending) >= 256:
      flush()
  flush()
  marker = {"unit": unit.index, "shards": {}, "stats": stats}
  for s, w in writers.items():
    info = w.close()
    if info is not None:
      marker["shards"][s] = info
  path = os.path.join(out_dir, "units", f"{unit.index:05d}.json")
  with open(f"{path}.tmp{os.getpid()}", "w") as f:
    json.dump(marker, f)
  os.replace(f"{path}.tmp{os.getpid()}", path)
  return marker


def _load_marker(out_dir: str, unit: int) -> dict[str, Any] | None:
  """A finished unit's marker if its shards are all there with the recorded sizes."""
  path = os.path.join(out_dir, "units", f"{unit:05d}.json")
  try:
    with open(path) as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  for info in marker["shards"].values():
    p = os.path.join(out_dir, info["file"])
    if not os.path.isfile(p) or os.path.getsize(p) != info["file_bytes"]:
      return None
  return marker


def read_manifest(out_dir: str) -> dict[str, Any] | None:
  try:
    with open(os.path.join(out_dir, "manifest.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def prepare(data_cfg: ml_collections.ConfigDict, out_dir: str, *, workers: int = 0,
            verbose: bool = True, plan: corpus.SourcePlan | None = None) -> dict[str, Any]:
  """Prepares `data_cfg`'s source into `out_dir` (finishing an interrupted run) and
  returns the manifest. A complete folder of the same source and tokenizer is returned
  as is; one of another source or tokenizer is an error (choose another --out)."""
  t0 = time.perf_counter()
  plan = plan or corpus.plan_source(data_cfg)
  tok_spec = tokenizers.tokenizer_spec(data_cfg) | {"append_eos": bool(data_cfg.append_eos)}
  tok = tokenizers.make_tokenizer(data_cfg)
  want = {"source_fingerprint": plan.fingerprint, "tokenizer": tok.identity,
          "append_eos": bool(data_cfg.append_eos)}
  os.makedirs(os.path.join(out_dir, "units"), exist_ok=True)
  lock_path = os.path.join(out_dir, "prepare.json")
  old = read_manifest(out_dir)
  if old is None and os.path.isfile(lock_path):
    with open(lock_path) as f:
      old = json.load(f)
  if old is not None:
    diff = [k for k, v in want.items() if old.get(k) != v]
    if diff:
      raise PrepareError(
          f"{out_dir} was prepared from another source or tokenizer ({', '.join(diff)}: "
          f"{[old.get(k) for k in diff]} there, {[want[k] for k in diff]} now); choose "
          "another --out (or delete the folder)")
    if os.path.isfile(os.path.join(out_dir, "manifest.json")):
      return old
  with open(f"{lock_path}.tmp{os.getpid()}", "w") as f:
    json.dump(want, f)
  os.replace(f"{lock_path}.tmp{os.getpid()}", lock_path)

  markers = {u.index: m for u in plan.units if (m := _load_marker(out_dir, u.index))}
  todo = [u for u in plan.units if u.index not in markers]
  n_workers = min(workers or os.cpu_count() or 1, max(1, len(todo)))
  if verbose:
    print(f"moejax.data.prepare: {plan.kind} {plan.name}: {len(plan.units)} units "
          f"({plan.stats.get('input_bytes', 0) / 1e6:.1f} MB), {len(markers)} already done; "
          f"tokenizer {tok.identity}, {n_workers} worker(s) -> {out_dir}", flush=True)
  bar = tqdm(total=sum(u.num_bytes for u in todo) or len(todo), unit="B", unit_scale=True,
             desc="prepare", disable=not verbose or not todo, file=sys.stderr)
  if n_workers <= 1:
    for u in todo:
      markers[u.index] = _prepare_unit(u, plan.options, tok_spec, out_dir)
      bar.update(u.num_bytes or 1)
  else:
    ctx = multiprocessing.get_context("spawn")  # safe with JAX threads in the parent
    with cf.ProcessPoolExecutor(n_workers, mp_context=ctx) as pool:
      futs = {pool.submit(_prepare_unit, u, plan.options, tok_spec, out_dir): u for u in todo}
      for fut in cf.as_completed(futs):
        u = futs[fut]
        markers[u.index] = fut.result()
        bar.update(u.num_bytes or 1)
  bar.close()

  splits: dict[str, Any] = {}
  skipped: dict[str, int] = {}
  for idx in sorted(markers):
    for k, v in markers[idx].get("stats", {}).items():
      skipped[k] = skipped.get(k, 0) + v
    for s, info in markers[idx]["shards"].items():
      sp = splits.setdefault(s, {"tokens": 0, "docs": 0, "bytes": 0, "shards": []})
      sp["shards"].append(info)
      for k in ("tokens", "docs", "bytes"):
        sp[k] += info[k]
  for s in corpus.SPLITS:
    if not splits.get(s, {}).get("docs"):
      raise PrepareError(
          f"source {plan.kind} {plan.name!r} gave no {s} documents (data.val_fraction="
          f"{data_cfg.val_fraction}, skipped {skipped or 'none'}): give more documents, or "
          "for the embedded corpus at least two files")
  manifest = {
      "format": FORMAT, **want, "tokenizer_spec": tok_spec, "vocab_size": tok.vocab_size,
      "bos_id": tok.bos_id, "eos_id": tok.eos_id,
      "dtype": token_dtype(tok.vocab_size).str, "chunk_tokens": CHUNK_TOKENS,
      "source": {"kind": plan.kind, "name": plan.name, "options": plan.options,
                 **plan.stats, **skipped},
      "splits": splits, "prepare_seconds": time.perf_counter() - t0,
  }
  with open(os.path.join(out_dir, f"manifest.json.tmp{os.getpid()}"), "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(os.path.join(out_dir, f"manifest.json.tmp{os.getpid()}"),
             os.path.join(out_dir, "manifest.json"))
  if verbose:
    tr, va = splits["train"], splits["validation"]
    print(f"moejax.data.prepare: {tr['docs']:,} train / {va['docs']:,} validation documents, "
          f"{tr['tokens']:,} / {va['tokens']:,} tokens in {time.perf_counter() - t0:.1f}s",
          flush=True)
  return manifest


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="path/to/config.py[:arg]")
  p.add_argument("--out", required=True, help="the folder to write (shared storage on a pod)")
  p.add_argument("--workers", type=int, default=0, help="worker processes; 0 = one per core")
  args = p.parse_args([a for a in argv if not a.startswith("--config.")])
  try:
    config = config_lib.load_config(args.config, overrides)
    config_lib.validate(config)
    prepare(config.data, os.path.abspath(os.path.expanduser(args.out)),
            workers=args.workers or config.data.prepare_workers)
  except (ValueError, FileNotFoundError) as e:
    print(f"moejax.data.prepare: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
