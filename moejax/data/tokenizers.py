"""Tokenizers: UTF-8 bytes (no files needed) and SentencePiece.

Both share one small interface: `vocab_size`, `bos_id`, `encode(text) -> int32[n]`
(no BOS added), `encode_batch(texts)`, `decode(ids) -> str`, and `identity`, a short
string that changes whenever the mapping text -> ids could change (it keys the
cache of tokenized streams).
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Protocol, Sequence

import ml_collections
import numpy as np


class Tokenizer(Protocol):
  """What the data pipeline needs from a tokenizer."""

  vocab_size: int
  bos_id: int
  identity: str

  def encode(self, text: str) -> np.ndarray: ...

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

  def decode(self, ids: Iterable[int]) -> str: ...


def _as_ids(ids: Iterable[int]) -> np.ndarray:
  """Any ids (list, numpy or jax array, generator) as a flat int64 numpy array."""
  if not hasattr(ids, "__len__") and not hasattr(ids, "__array__"):
    ids = list(ids)
  return np.asarray(ids, dtype=np.int64).reshape(-1)


class ByteTokenizer:
  """Ids 0..255 are the UTF-8 bytes; 256 is BOS, the document separator."""

  vocab_size: int = 257
  bos_id: int = 256
  identity: str = "byte"

  def encode(self, text: str) -> np.ndarray:
    """UTF-8 bytes of `text` as int32 ids (no BOS)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    """Bytes back to text; ids >= 256 (BOS) are skipped, bad UTF-8 is replaced."""
    ids_N = _as_ids(ids)
    ids_N = ids_N[(ids_N >= 0) & (ids_N < 256)].astype(np.uint8)
    return ids_N.tobytes().decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer(vocab_size=257, bos_id=256)"


class SentencePieceTokenizer:
  """A trained SentencePiece model; BOS is the model's bos, else eos, else 0."""

  def __init__(self, model_path: str):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    if not os.path.isfile(model_path):
      raise FileNotFoundError(f"sentencepiece model {model_path!r} does not exist")
    with open(model_path, "rb") as f:
      proto = f.read()
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_proto=proto)
    self.vocab_size: int = int(self._sp.get_piece_size())
    bos, eos = int(self._sp.bos_id()), int(self._sp.eos_id())
    self.bos_id: int = bos if bos >= 0 else (eos if eos >= 0 else 0)
    self.identity: str = "spm-" + hashlib.sha256(proto).hexdigest()[:12]

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Encodes many texts at once (SentencePiece uses several threads)."""
    return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(list(texts))]

  def decode(self, ids: Iterable[int]) -> str:
    ids_N = _as_ids(ids)
    ids_N = ids_N[(ids_N >= 0) & (ids_N < self.vocab_size) & (ids_N != self.bos_id)]
    return self._sp.decode([int(i) for i in ids_N])

  def __repr__(self) -> str:
    return (f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id})")


def make_tokenizer(data_cfg: ml_collections.ConfigDict) -> Tokenizer:
  """The tokenizer named by `data_cfg.tokenizer` ("byte" | "sentencepiece")."""
  kind = data_cfg.tokenizer
  if kind == "byte":
    return ByteTokenizer()
  if kind == "sentencepiece":
    if not data_cfg.spm_model:
      raise ValueError("config.data.spm_model = '' is not allowed: a path to a sentencepiece "
                       ".model file is required when data.tokenizer='sentencepiece'")
    return SentencePieceTokenizer(data_cfg.spm_model)
  raise ValueError(f"config.data.tokenizer = {kind!r} is not allowed: must be one of "
                   "['byte', 'sentencepiece']")
