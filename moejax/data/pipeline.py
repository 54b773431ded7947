"""The training input pipeline: windows read by random access from prepared shards.

Sources: `data.mixture` (prepared folders with weights), else `data.prepared`, else
`data.source` prepared automatically into `<cache_dir>/prepared/` on first use (then
reused). No split is ever materialised in memory: every batch reads its windows from the
array_record shards (moejax.data.shards).

Windows: window i of a split is `stream[i*T : i*T + T + 1]` (T = seq_len; windows do not
overlap and share one boundary token); the example is `inputs = w[:-1]`, `targets =
w[1:]`. With `data.document_mask` the batch also carries `segment_ids` (the documents of
the window, counted from each BOS) and `positions` (restarting at each BOS), so attention
stays inside documents and RoPE restarts.

Train order: global row k of the infinite stream of rows -> (source s, index j) by the
mixture schedule -> window `perm_s[j]`, where perm_s is a grain MapDataset
`range(n_s).shuffle(seed_s).repeat()` (reshuffled every epoch). The schedule deals each
block of 1000 rows exactly round(w_s * 1000) rows of source s (largest remainder), in a
seeded order per block, so proportions hold within 0.1% of every block and any row's
source is computed directly (random access: resume needs only the row counter). Rows are
cut into global batches of `batch_size`; process p reads only rows [p*b, (p+1)*b) of
each, b = batch_size / process_count (like grain's ShardByJaxProcess): the processes'
slices are disjoint and together are the global batch. The grain iterator's
`get_state()` / `set_state()` (a small dict) restore the exact following batches.

Validation: per source, the first windows of its validation split in order, cut into the
same global / per-process batches; bits per byte divide the summed loss by the UTF-8
bytes of exactly the evaluated target tokens (the tokenizer's `token_bytes`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
from typing import Any, Callable

import grain
import ml_collections
import numpy as np

from moejax.configlib import ConfigError
from moejax.data import config as data_config
from moejax.data import corpus
from moejax.data import prepare as prepare_lib
from moejax.data import shards
from moejax.data import tokenizers

Batch = dict[str, np.ndarray]
DEFAULT_CACHE = os.path.join("~", ".cache", "moejax")
BLOCK = 1000  # rows per mixture block
_ROWS = sys.maxsize // 4  # the row stream is endless; grain wants a length


def mix_seeds(shuffle_seed: int, seed: int, source: int = 0) -> int:
  """One shuffle seed from data.shuffle_seed, the run seed and the source's index."""
  entropy = [shuffle_seed, seed] + ([source] if source else [])
  return int(np.random.SeedSequence(entropy).generate_state(1)[0] >> 1)


def num_windows(num_tokens: int, seq_len: int) -> int:
  """How many non-overlapping windows of seq_len + 1 tokens a stream holds."""
  return max(0, (num_tokens - 1) // seq_len)


def document_fields(inputs_BT: np.ndarray, bos_id: int) -> dict[str, np.ndarray]:
  """segment_ids (documents counted from each BOS) and positions (restarting at BOS)."""
  is_bos = inputs_BT == bos_id
  t = np.arange(inputs_BT.shape[1], dtype=np.int32)
  last_bos = np.maximum.accumulate(np.where(is_bos, t, 0), axis=1)
  return {"segment_ids": np.cumsum(is_bos, axis=1, dtype=np.int32),
          "positions": (t - last_bos).astype(np.int32)}


def windows_to_batch(w_BT1: np.ndarray, bos_id: int, document_mask: bool) -> Batch:
  w_BT1 = w_BT1.astype(np.int32)
  batch = {"inputs": np.ascontiguousarray(w_BT1[:, :-1]),
           "targets": np.ascontiguousarray(w_BT1[:, 1:])}
  if document_mask:
    batch |= document_fields(batch["inputs"], bos_id)
  return batch


# ------------------------------------------------------------------ mixture schedule

class MixtureSchedule:
  """Row k of the train stream -> (source, index within the source's stream)."""

  def __init__(self, weights: list[float], seed: int):
    w = np.asarray(weights, np.float64) / np.sum(weights)
    counts = np.floor(w * BLOCK).astype(np.int64)
    order = np.argsort(-(w * BLOCK - counts), kind="stable")
    counts[order[:BLOCK - counts.sum()]] += 1
    if (counts == 0).any():
      raise ConfigError(
          f"config.data.mixture weights {list(weights)} are not allowed: every weight must be "
          f">= 1/{BLOCK} of the total")
    self.counts, self.seed = counts, seed
    self._labels = np.repeat(np.arange(len(counts)), counts)
    self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
    if b not in self._cache:
      if len(self.counts) == 1:
        labels = self._labels
      else:
        rng = np.random.default_rng([self.seed, b])
        labels = self._labels[rng.permutation(BLOCK)]
      rank = np.empty(BLOCK, np.int64)
      for s in range(len(self.counts)):
        pos = np.flatnonzero(labels == s)
        rank[pos] = np.arange(len(pos))
      if len(self._cache) > 4:
        self._cache.clear()
      self._cache[b] = (labels, rank)
    return self._cache[b]

  def lookup(self, rows_R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    src, idx = np.empty(len(rows_R), np.int64), np.empty(len(rows_R), np.int64)
    for i, k in enumerate(np.asarray(rows_R, np.int64).tolist()):
      b, p = divmod(k, BLOCK)
      labels, rank = self._block(b)
      src[i] = labels[p]
      idx[i] = b * self.counts[labels[p]] + rank[p]
    return src, idx

  def rows_per_source(self, rows: int) -> np.ndarray:
    """How many of the first `rows` rows each source got."""
    b, p = divmod(rows, BLOCK)
    labels, _ = self._block(b)
    return self.counts * b + np.bincount(labels[:p], minlength=len(self.counts))


# ------------------------------------------------------------------ sources

@dataclasses.dataclass
class Source:
  name: str
  weight: float
  prepared: shards.Prepared
  train_windows: int
  val_windows: int

  @property
  def train(self) -> shards.TokenSplit:
    return self.prepared.splits["train"]

  @property
  def val(self) -> shards.TokenSplit:
    return self.prepared.splits["validation"]


def resolve_cache_dir(data_cfg: ml_collections.ConfigDict) -> str:
  return os.path.abspath(os.path.expanduser(data_cfg.cache_dir or DEFAULT_CACHE))


def auto_prepared_dir(data_cfg: ml_collections.ConfigDict, plan: corpus.SourcePlan,
                      tokenizer: tokenizers.Tokenizer) -> str:
  """`<cache_dir>/prepared/<kind>-<source fp>-<tokenizer>[-eos]`."""
  eos = "-eos" if data_cfg.append_eos else ""
  return os.path.join(resolve_cache_dir(data_cfg), "prepared",
                      f"{plan.kind}-{plan.fingerprint[:16]}-{tokenizer.identity}{eos}")


def open_sources(data_cfg: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer,
                 verbose: bool = True) -> list[Source]:
  """The prepared folders to read (preparing data.source first if that is what's named)."""
  if data_cfg.mixture:
    entries = data_config.parse_mixture(data_cfg.mixture)
  elif data_cfg.prepared:
    entries = [(data_cfg.prepared, 1.0)]
  else:
    plan = corpus.plan_source(data_cfg)
    folder = auto_prepared_dir(data_cfg, plan, tokenizer)
    prepare_lib.prepare(data_cfg, folder, workers=data_cfg.prepare_workers,
                        verbose=verbose, plan=plan)
    entries = [(folder, 1.0)]
  out, seq_len = [], data_cfg.seq_len
  for i, (folder, weight) in enumerate(entries):
    p = shards.open_prepared(folder, tokenizer)
    name = p.name if len(entries) == 1 or p.name not in [o.name for o in out] else f"{p.name}_{i}"
    for split in ("train", "validation"):
      if split not in p.splits:
        raise shards.ShardError(f"{p.folder} has no {split} split")
    src = Source(name, weight, p, num_windows(p.splits["train"].num_tokens, seq_len),
                 num_windows(p.splits["validation"].num_tokens, seq_len))
    if src.train_windows == 0:
      raise shards.ShardError(
          f"{p.folder}: the train split has {src.train.num_tokens} tokens: not one window of "
          f"config.data.seq_len + 1 = {seq_len + 1} tokens")
    out.append(src)
  return out


# ------------------------------------------------------------------ datasets

def train_dataset(sources: list[Source], seq_len: int, batch_size: int, seed_parts: tuple,
                  bos_id: int, document_mask: bool, process_index: int = 0,
                  process_count: int = 1) -> tuple[grain.IterDataset, MixtureSchedule]:
  """Endless batches for one process: dicts of int32 [batch_size / process_count, T]."""
  shuffle_seed, seed = seed_parts
  schedule = MixtureSchedule([s.weight for s in sources], mix_seeds(shuffle_seed, seed, 99))
  perms = [grain.MapDataset.range(s.train_windows).shuffle(seed=mix_seeds(shuffle_seed, seed, i))
           .repeat(None) for i, s in enumerate(sources)]
  per = batch_size // process_count
  lo = process_index * per

  def to_batch(rows_B: np.ndarray) -> Batch:
    rows = np.asarray(rows_B)[lo:lo + per]
    src, idx = schedule.lookup(rows)
    w_BT1 = np.empty((len(rows), seq_len + 1), sources[0].train.dtype)
    for s in np.unique(src):
      sel = np.flatnonzero(src == s)
      wins = np.asarray([perms[s][int(j)] for j in idx[sel]], np.int64)
      w_BT1[sel] = sources[s].train.read_many(wins * seq_len, seq_len + 1)
    return windows_to_batch(w_BT1, bos_id, document_mask)

  ds = grain.MapDataset.range(_ROWS).batch(batch_size, drop_remainder=True).map(to_batch)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)), schedule


def val_batch_fn(sources: list[Source], seq_len: int, batch_size: int, bos_id: int,
                 token_bytes: np.ndarray, document_mask: bool, process_index: int = 0,
                 process_count: int = 1) -> Callable[[int], dict[str, tuple[list[Batch], int]]]:
  """`f(n)`: per source, its first n validation batches (this process's rows, in order)
  and the UTF-8 bytes of all their target tokens (the global batches')."""
  per = batch_size // process_count

  def val_batches(n: int) -> dict[str, tuple[list[Batch], int]]:
    out = {}
    for s in sources:
      available = s.val_windows // batch_size
      if available == 0:
        raise shards.ShardError(
            f"{s.prepared.folder}: the validation split has {s.val.num_tokens:,} tokens = "
            f"{s.val_windows} windows of seq_len + 1 = {seq_len + 1}, fewer than one batch of "
            f"config.data.batch_size={batch_size}; raise config.data.val_fraction or use more "
            "data, or lower config.data.seq_len / config.data.batch_size")
      k = min(max(n, 0), available)
      w = s.val.read_many(np.arange(k * batch_size, dtype=np.int64) * seq_len, seq_len + 1)
      nbytes = int(token_bytes[w[:, 1:].astype(np.int64)].sum())
      batches = [windows_to_batch(w[b * batch_size + process_index * per:
                                    b * batch_size + (process_index + 1) * per],
                                  bos_id, document_mask) for b in range(k)]
      out[s.name] = (batches, nbytes)
    return out

  return val_batches


# ------------------------------------------------------------------ the bundle

@dataclasses.dataclass
class DataBundle:
  """Everything the training loop needs from the data."""

  tokenizer: tokenizers.Tokenizer
  train_iter: Any  # grain DatasetIterator: next() -> Batch; get_state() / set_state()
  val_batches: Callable[[int], dict[str, tuple[list[Batch], int]]]
  fingerprint: str  # of the sources (their fingerprints and weights), not the tokenizer
  info: dict[str, Any]
  train_dataset: grain.IterDataset  # iter() it again for a fresh iterator
  progress: Callable[[int], dict[str, float]]  # rows consumed -> epochs, tokens per source


def build_data(data_cfg: ml_collections.ConfigDict, *, seed: int = 0, process_index: int = 0,
               process_count: int = 1, verbose: bool = True) -> DataBundle:
  """Opens (preparing once if needed) the sources and builds the iterators.

  Batches are per process: int32 [batch_size // process_count, seq_len]. The order
  depends on `data_cfg.shuffle_seed` and `seed`.
  """
  t0 = time.perf_counter()
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, process_count="
                     f"{process_count})")
  if data_cfg.batch_size % process_count:
    raise ValueError(f"config.data.batch_size = {data_cfg.batch_size} is not allowed: must "
                     f"be divisible by the number of processes ({process_count})")
  if data_cfg.seq_len < 1 or data_cfg.batch_size < 1:
    raise ValueError(f"config.data.seq_len = {data_cfg.seq_len}, config.data.batch_size = "
                     f"{data_cfg.batch_size}: both must be positive integers")
  tokenizer = tokenizers.make_tokenizer(data_cfg)
  sources = open_sources(data_cfg, tokenizer, verbose=verbose)
  seq_len, batch_size = data_cfg.seq_len, data_cfg.batch_size
  ds, schedule = train_dataset(sources, seq_len, batch_size, (data_cfg.shuffle_seed, seed),
                               tokenizer.bos_id, data_cfg.document_mask, process_index,
                               process_count)
  val = val_batch_fn(sources, seq_len, batch_size, tokenizer.bos_id, tokenizer.token_bytes(),
                     data_cfg.document_mask, process_index, process_count)
  fp = hashlib.sha256(";".join(f"{s.prepared.manifest['source_fingerprint']}:{s.weight}"
                               for s in sources).encode()).hexdigest()

  def progress(rows: int) -> dict[str, float]:
    got = schedule.rows_per_source(rows)
    out = {}
    for s, n in zip(sources, got.tolist()):
      key = "" if len(sources) == 1 else f"{s.name}/"
      out[f"{key}epoch"] = n / s.train_windows
      if key:
        out[f"{key}tokens_seen"] = float(n * seq_len)
    return out

  info = {
      "source": ", ".join(f"{s.prepared.manifest['source']['kind']}:{s.name}" for s in sources),
      "tokenizer": tokenizer.identity,
      "vocab_size": tokenizer.vocab_size,
      "bytes_exact": tokenizer.bytes_exact,
      "prepared": [s.prepared.folder for s in sources],
      "weights": [s.weight for s in sources],
      "num_train_docs": sum(s.train.num_docs for s in sources),
      "num_val_docs": sum(s.val.num_docs for s in sources),
      "num_train_tokens": sum(s.train.num_tokens for s in sources),
      "num_val_tokens": sum(s.val.num_tokens for s in sources),
      "num_train_windows": sum(s.train_windows for s in sources),
      "num_val_windows": sum(s.val_windows for s in sources),
      "open_seconds": time.perf_counter() - t0,
  }
  return DataBundle(tokenizer=tokenizer, train_iter=iter(ds), val_batches=val,
                    fingerprint=fp, info=info, train_dataset=ds, progress=progress)
