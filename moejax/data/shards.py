"""Random access into a prepared folder (moejax.data.prepare): a split as one long token
stream read from its array_record shards, never held in memory.

`open_prepared(dir, tokenizer)` checks the manifest against the tokenizer and every shard
file against its recorded size before training starts; `TokenSplit.read(start, n)` reads
tokens [start, start + n) of the split's stream (it may cross records and shards) as one
range read of array_record records per shard it touches.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from array_record.python import array_record_module
import numpy as np

from moejax.data import prepare as prepare_lib


# The record index is held in memory (8 bytes per record of 2048 tokens: 4 MB per billion
# tokens per split), and windows are read as record ranges: 4 us per record here, where
# grain's ArrayRecordDataSource (offloaded index, a thread pool per __getitems__) took
# 130-2200 us (benchmarks/data.py).
READER_OPTIONS = "readahead_buffer_size:0,index_storage_option:in_memory,max_parallelism:0"
READER_BUFFER_BYTES = 8192
MAX_OPEN_SHARDS = 256


class ShardError(ValueError):
  """A prepared folder that cannot be read as it claims: names the path."""


@dataclasses.dataclass
class TokenSplit:
  """One split of a prepared folder."""

  folder: str
  split: str
  num_tokens: int
  num_docs: int
  num_bytes: int
  dtype: np.dtype
  chunk: int
  paths: list[str]
  token_starts: np.ndarray  # [S + 1] first token of each shard in the stream
  record_starts: np.ndarray  # [S + 1] first global record index of each shard
  _readers: dict[int, Any] = dataclasses.field(default_factory=dict, repr=False)

  def _reader(self, s: int) -> Any:
    """Shard s's reader (opened on first use; at most MAX_OPEN_SHARDS stay open)."""
    reader = self._readers.pop(s, None)
    if reader is None:
      if len(self._readers) >= MAX_OPEN_SHARDS:  # least recently used goes
        self._readers.pop(next(iter(self._readers))).close()
      want = int(self.record_starts[s + 1] - self.record_starts[s])
      try:
        reader = array_record_module.ArrayRecordReader(
            self.paths[s], READER_OPTIONS, file_reader_buffer_size=READER_BUFFER_BYTES)
        got = reader.num_records()
      except Exception as e:  # pylint: disable=broad-except
        raise ShardError(f"cannot open {self.paths[s]} ({type(e).__name__}: {e}): the shard "
                         "is corrupt; prepare the folder again") from e
      if got != want:
        raise ShardError(f"{self.paths[s]} is corrupt: it holds {got} records, the manifest "
                         f"says {want}; prepare the folder again")
    self._readers[s] = reader  # most recently used last
    return reader

  def read(self, start: int, n: int) -> np.ndarray:
    """Tokens [start, start + n) of the stream (as stored: uint16 or uint32)."""
    return self.read_many(np.asarray([start]), n)[0]

  def read_many(self, starts_R: np.ndarray, n: int) -> np.ndarray:
    """[R, n] tokens: row r holds [starts_R[r], starts_R[r] + n)."""
    starts_R = np.asarray(starts_R, np.int64)
    if len(starts_R) and (starts_R.min() < 0 or starts_R.max() + n > self.num_tokens):
      raise IndexError(f"tokens [{starts_R.min()}, {starts_R.max() + n}) outside the "
                       f"{self.split} split of {self.folder} ({self.num_tokens} tokens)")
    out = np.empty((len(starts_R), n), self.dtype)
    for row, start in enumerate(starts_R.tolist()):
      pos, end = start, start + n
      while pos < end:  # one range read per shard the row touches (usually one)
        s = int(np.searchsorted(self.token_starts, pos, side="right")) - 1
        stop = min(end, int(self.token_starts[s + 1]))
        first = (pos - int(self.token_starts[s])) // self.chunk
        last = (stop - 1 - int(self.token_starts[s])) // self.chunk
        try:
          raws = self._reader(s).read(first, last + 1)
        except ShardError:
          raise
        except Exception as e:  # pylint: disable=broad-except
          raise ShardError(f"cannot read records {first}..{last} of {self.paths[s]} "
                           f"({type(e).__name__}: {e}); the shard may be corrupt: prepare "
                           "the folder again") from e
        arr = np.frombuffer(b"".join(raws), self.dtype)
        off = pos - int(self.token_starts[s]) - first * self.chunk
        if len(arr) < off + stop - pos:
          raise ShardError(f"{self.paths[s]}: records {first}..{last} hold {len(arr)} tokens, "
                           "fewer than the manifest implies: the shard is corrupt; prepare "
                           "the folder again")
        out[row, pos - start:stop - start] = arr[off:off + stop - pos]
        pos = stop
    return out


@dataclasses.dataclass
class Prepared:
  """A prepared folder: its manifest and its splits."""

  folder: str
  manifest: dict[str, Any]
  splits: dict[str, TokenSplit]

  @property
  def name(self) -> str:
    return os.path.basename(os.path.normpath(self.folder))


def open_prepared(folder: str, tokenizer: Any) -> Prepared:
  """Opens and checks a prepared folder for reading with `tokenizer`."""
  folder = os.path.abspath(os.path.expanduser(folder))
  if not os.path.isdir(folder):
    raise ShardError(f"prepared folder {folder!r} does not exist")
  manifest = prepare_lib.read_manifest(folder)
  if manifest is None:
    raise ShardError(f"{folder!r} has no readable manifest.json: it is not a prepared folder, "
                     "or its preparation did not finish; run `python -m moejax.data.prepare "
                     f"--config ... --out {folder}` (it resumes)")
  if manifest.get("format") != prepare_lib.FORMAT:
    raise ShardError(f"{folder}/manifest.json has format {manifest.get('format')!r}, not "
                     f"{prepare_lib.FORMAT!r}")
  if manifest["tokenizer"] != tokenizer.identity:
    raise ShardError(
        f"{folder} was prepared with tokenizer {manifest['tokenizer']!r} "
        f"({manifest.get('tokenizer_spec')}), but config.data names {tokenizer.identity!r}: "
        "set config.data.tokenizer (and spm_model / hf_tokenizer) to the folder's, or "
        "prepare the corpus again with this tokenizer")
  dtype, chunk = np.dtype(manifest["dtype"]), int(manifest["chunk_tokens"])
  splits = {}
  for split, sp in manifest["splits"].items():
    paths, tok_starts, rec_starts, t, r = [], [0], [], 0, 0
    for info in sp["shards"]:
      path = os.path.join(folder, info["file"])
      if not os.path.isfile(path):
        raise ShardError(f"shard {path} named in {folder}/manifest.json is missing")
      size = os.path.getsize(path)
      if size != info["file_bytes"]:
        raise ShardError(f"shard {path} has {size} bytes, the manifest says "
                         f"{info['file_bytes']}: it is truncated or was changed; prepare "
                         "the folder again")
      if info["records"] != -(-info["tokens"] // chunk):
        raise ShardError(f"{folder}/manifest.json: shard {info['file']} lists "
                         f"{info['records']} records for {info['tokens']} tokens")
      paths.append(path)
      rec_starts.append(r)
      t += info["tokens"]
      r += info["records"]
      tok_starts.append(t)
    rec_starts.append(r)
    splits[split] = TokenSplit(folder, split, t, sp["docs"], sp["bytes"], dtype, chunk, paths,
                               np.asarray(tok_starts, np.int64),
                               np.asarray(rec_starts, np.int64))
  return Prepared(folder, manifest, splits)
