"""Token streams, packing and the grain pipeline (checkpointable, per-process shards).

A split becomes one token stream `[BOS] doc1 [BOS] doc2 ...` held in memory (uint16 when
the vocabulary fits) and cached as .npy beside the prepared dataset, keyed by the corpus
fingerprint and the tokenizer identity, so later runs load it in milliseconds. The whole
split must fit in RAM; very large datasets (full lm1b, C4) need a streaming packer, which
is not implemented yet: use `data.max_documents` to take the first documents of each split.

Packing: window i is `stream[i*T : i*T + T + 1]` (T = seq_len, windows do not overlap and
share one boundary token); the example is `inputs = w[:-1]`, `targets = w[1:]`.

Train order: window indices -> shuffle(seed) -> repeat (grain reshuffles every epoch with
a new seed) -> global batches of `batch_size` -> process p keeps rows
`[p*b, (p+1)*b)` with `b = batch_size // process_count` -> gather tokens. Concatenating
the per-process batches in process order gives the global batch. The grain iterator has
`get_state()` / `set_state()` with a small JSON-serialisable dict; restoring it
reproduces the following batches exactly. Reading is in-process (ReadOptions(num_threads=0):
the stream is in memory); for multiprocessing workers call
`absl.flags.FLAGS.mark_as_parsed()` first.

Validation: the first windows of the validation stream in order, cut into the same
global/per-process batches.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import grain
import ml_collections
import numpy as np

from moejax.data import corpus as corpus_lib
from moejax.data import tokenizers

Batch = dict[str, np.ndarray]


# ------------------------------------------------------------------ token streams

@dataclasses.dataclass
class TokenStream:
  """One split as a single token stream."""

  tokens: np.ndarray  # [N] uint16 or int32
  num_docs: int
  num_bytes: int  # UTF-8 bytes of the documents (without separators)


def stream_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def tokenize_documents(tokenizer: tokenizers.Tokenizer, docs: Sequence[str],
                       chunk: int = 1024) -> TokenStream:
  """`[BOS] doc1 [BOS] doc2 ...` as one array."""
  pieces, num_bytes = [], 0
  for start in range(0, len(docs), chunk):
    batch = list(docs[start:start + chunk])
    num_bytes += sum(len(d.encode("utf-8")) for d in batch)
    pieces += tokenizer.encode_batch(batch)
  total = sum(len(p) for p in pieces) + len(pieces)
  tokens = np.empty(total, stream_dtype(tokenizer.vocab_size))
  pos = 0
  for p in pieces:
    tokens[pos] = tokenizer.bos_id
    tokens[pos + 1:pos + 1 + len(p)] = p
    pos += 1 + len(p)
  return TokenStream(tokens, len(pieces), num_bytes)


def _cache_paths(source: corpus_lib.TextSource, split: str, tokenizer: tokenizers.Tokenizer,
                 max_documents: int, cache_root: str) -> list[str]:
  """Candidate .npy paths: beside the dataset, then under cache_root (read-only data)."""
  name = f"tokens-{split}-{tokenizer.identity}-max{max_documents}.npy"
  return [os.path.join(source.cache_dir, name),
          os.path.join(cache_root, "tokens", source.fingerprint[:16], name)]


def _load_cached(path: str, fingerprint: str) -> TokenStream | None:
  try:
    with open(path[:-4] + ".json") as f:
      meta = json.load(f)
    if meta.get("fingerprint") != fingerprint:
      return None
    tokens = np.load(path, allow_pickle=False)
  except (OSError, ValueError):
    return None
  if len(tokens) != meta["num_tokens"]:
    return None
  return TokenStream(tokens, meta["num_docs"], meta["num_bytes"])


def _save_cached(path: str, stream: TokenStream, fingerprint: str) -> bool:
  """Atomic write (tmp file + rename); False if the folder is not writable."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
      np.save(f, stream.tokens, allow_pickle=False)
    os.replace(tmp, path)
    meta = {"fingerprint": fingerprint, "num_docs": stream.num_docs,
            "num_bytes": stream.num_bytes, "num_tokens": int(len(stream.tokens))}
    with open(f"{path[:-4]}.json.tmp{os.getpid()}", "w") as f:
      json.dump(meta, f)
    os.replace(f"{path[:-4]}.json.tmp{os.getpid()}", path[:-4] + ".json")
    return True
  except OSError:
    return False


def load_token_stream(source: corpus_lib.TextSource, split: str,
                      tokenizer: tokenizers.Tokenizer, *, max_documents: int = 0,
                      cache_root: str = "", verbose: bool = True) -> TokenStream:
  """The tokenized split, from the cache or tokenized now (and cached)."""
  paths = _cache_paths(source, split, tokenizer, max_documents, cache_root)
  for path in paths:
    if os.path.exists(path) and (stream := _load_cached(path, source.fingerprint)):
      return stream
  t0 = time.perf_counter()
  docs = list(source.documents(split, max_documents))
  stream = tokenize_documents(tokenizer, docs)
  for path in paths:
    if _save_cached(path, stream, source.fingerprint):
      break
  if verbose:
    print(f"moejax.data: tokenized {source.name} {split}: {stream.num_docs} docs, "
          f"{len(stream.tokens):,} tokens ({tokenizer.identity}) in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
  return stream


# ------------------------------------------------------------------ packing

def num_windows(num_tokens: int, seq_len: int) -> int:
  """How many non-overlapping windows of seq_len + 1 tokens the stream holds."""
  return max(0, (num_tokens - 1) // seq_len)


def gather_windows(tokens: np.ndarray, window_ids_B: np.ndarray, seq_len: int) -> Batch:
  """Windows `window_ids_B` as {"inputs", "targets"}: int32 [B, seq_len]."""
  starts_B = np.asarray(window_ids_B, np.int64) * seq_len
  w_BT1 = tokens[starts_B[:, None] + np.arange(seq_len + 1)].astype(np.int32)
  return {"inputs": np.ascontiguousarray(w_BT1[:, :-1]),
          "targets": np.ascontiguousarray(w_BT1[:, 1:])}


def mix_seeds(shuffle_seed: int, seed: int) -> int:
  """One shuffle seed from data.shuffle_seed and the run seed."""
  return int(np.random.SeedSequence([shuffle_seed, seed]).generate_state(1)[0] >> 1)


def train_dataset(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Infinite shuffled batches for one process: dicts of int32 [batch_size/pc, seq_len]."""
  n = num_windows(len(tokens), seq_len)
  if n == 0:
    raise ValueError(f"the training split has {len(tokens)} tokens: not one window of "
                     f"config.data.seq_len + 1 = {seq_len + 1} tokens")
  per = batch_size // process_count
  lo = process_index * per

  def to_batch(ids_B: np.ndarray) -> Batch:
    return gather_windows(tokens, np.asarray(ids_B)[lo:lo + per], seq_len)

  ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat(None)
  ds = ds.batch(batch_size, drop_remainder=True).map(to_batch)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def val_batch_fn(tokens: np.ndarray, seq_len: int, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Callable[[int], list[Batch]]:
  """`f(n)`: the first n validation batches (this process's rows), in order."""
  n_windows = num_windows(len(tokens), seq_len)
  per = batch_size // process_count

  def val_batches(n: int) -> list[Batch]:
    available = n_windows // batch_size
    if available == 0:
      raise ValueError(
          f"the validation split has {len(tokens):,} tokens = {n_windows} windows of "
          f"seq_len + 1 = {seq_len + 1}, fewer than one batch of config.data.batch_size="
          f"{batch_size}; raise config.data.val_fraction or use more data, or lower "
          "config.data.seq_len / config.data.batch_size")
    out = []
    for k in range(min(max(n, 0), available)):
      lo = k * batch_size + process_index * per
      out.append(gather_windows(tokens, np.arange(lo, lo + per), seq_len))
    return out

  return val_batches


# ------------------------------------------------------------------ the bundle

@dataclasses.dataclass
class DataBundle:
  """Everything the training loop needs from the data."""

  tokenizer: tokenizers.Tokenizer
  train_iter: Any  # grain DatasetIterator: next() -> Batch; get_state() / set_state()
  val_batches: Callable[[int], list[Batch]]
  fingerprint: str  # of the text source (files / prepared TFDS dataset), not the tokenizer
  info: dict[str, Any]
  train_dataset: grain.IterDataset  # iter() it again for a fresh iterator


def build_data(data_cfg: ml_collections.ConfigDict, *, seed: int = 0, process_index: int = 0,
               process_count: int = 1, verbose: bool = True) -> DataBundle:
  """Prepares (once) and opens the corpus, tokenizes (once) and builds the iterators.

  Batches are per process: int32 [batch_size // process_count, seq_len]. The shuffle
  order depends on both `data_cfg.shuffle_seed` and `seed`.

  `info["val_bytes_per_token"]` = UTF-8 bytes of the validation documents / predicted
  validation tokens (the stream length - 1; BOS separators count as tokens). Multiply a
  validation loss in nats/token by 1 / (ln 2 * val_bytes_per_token) for bits per byte.
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
  source = corpus_lib.load_source(data_cfg, verbose=verbose)
  cache_root = corpus_lib.resolve_cache_dir(data_cfg)
  streams = {
      split: load_token_stream(source, split, tokenizer, max_documents=data_cfg.max_documents,
                               cache_root=cache_root, verbose=verbose)
      for split in (data_cfg.train_split, data_cfg.val_split)}
  train, val = streams[data_cfg.train_split], streams[data_cfg.val_split]
  seq_len, batch_size = data_cfg.seq_len, data_cfg.batch_size
  ds = train_dataset(train.tokens, seq_len, batch_size, mix_seeds(data_cfg.shuffle_seed, seed),
                     process_index, process_count)
  info = {
      "source": f"{source.kind}:{source.name}",
      "tokenizer": tokenizer.identity,
      "vocab_size": tokenizer.vocab_size,
      "num_train_docs": train.num_docs,
      "num_val_docs": val.num_docs,
      "num_train_tokens": int(len(train.tokens)),
      "num_val_tokens": int(len(val.tokens)),
      "num_train_windows": num_windows(len(train.tokens), seq_len),
      "num_val_windows": num_windows(len(val.tokens), seq_len),
      "val_bytes": val.num_bytes,
      "val_bytes_per_token": val.num_bytes / max(1, len(val.tokens) - 1),
      "prepare_seconds": time.perf_counter() - t0,
      "cache_dir": source.cache_dir,
      **{f"source_{k}": v for k, v in source.stats.items()},
  }
  return DataBundle(
      tokenizer=tokenizer, train_iter=iter(ds),
      val_batches=val_batch_fn(val.tokens, seq_len, batch_size, process_index, process_count),
      fingerprint=source.fingerprint, info=info, train_dataset=ds)
