"""Tokenizers: UTF-8 bytes (no files needed), SentencePiece and Hugging Face `tokenizers`.

All share one small interface: `vocab_size`, `bos_id` (the document separator written
before every document), `eos_id` (-1 when there is none; written after every document
when `data.append_eos`), `encode(text) -> int32[n]` (no special tokens added),
`encode_batch(texts)`, `decode(ids) -> str`, `token_bytes() -> int32[vocab]` (UTF-8
bytes each id stands for: bits per byte sums it over the evaluated targets) and
`identity`, a short string that changes whenever the mapping text -> ids could change
(prepared shards record it; reading them with another tokenizer is an error).

Bytes per token: exact for the byte tokenizer and byte-level BPE (GPT-2, Llama 3, Qwen
tokenizer.json files). SentencePiece and other HF tokenizers count each piece's decoded
text ("▁" = one space), which over-counts the dummy-prefix space at a document start by
one byte; `bytes_exact` says which holds.
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
  eos_id: int
  identity: str
  bytes_exact: bool

  def encode(self, text: str) -> np.ndarray: ...

  def token_bytes(self) -> np.ndarray: ...

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
  eos_id: int = -1
  identity: str = "byte"
  bytes_exact: bool = True

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

  def token_bytes(self) -> np.ndarray:
    return np.asarray([1] * 256 + [0], np.int32)

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
    self.eos_id: int = eos if eos >= 0 and eos != self.bos_id else -1
    self.identity: str = "spm-" + hashlib.sha256(proto).hexdigest()[:12]
    self.bytes_exact = False

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Encodes many texts at once (SentencePiece uses several threads)."""
    return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(list(texts))]

  def decode(self, ids: Iterable[int]) -> str:
    ids_N = _as_ids(ids)
    ids_N = ids_N[(ids_N >= 0) & (ids_N < self.vocab_size) & (ids_N != self.bos_id)]
    return self._sp.decode([int(i) for i in ids_N])

  def token_bytes(self) -> np.ndarray:
    out = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if self._sp.is_control(i) or self._sp.is_unknown(i):
        continue
      piece = self._sp.id_to_piece(i)
      if self._sp.is_byte(i):
        out[i] = 1
      else:
        out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return out

  def __repr__(self) -> str:
    return (f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id})")


def _byte_level_decoder() -> dict[str, int]:
  """GPT-2's byte-level alphabet: printable stand-in character -> the byte it encodes."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(
      range(0xAE, 0x100))
  chars, n = {}, 0
  for b in range(256):
    if b in keep:
      chars[chr(b)] = b
    else:
      chars[chr(256 + n)] = b
      n += 1
  return chars


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer.json (any model's), without `transformers`.

  `path` is the tokenizer.json file or the model folder holding it. BOS, the document
  separator: `bos_token` if given, else tokenizer_config.json's bos_token beside the file,
  else its eos_token (GPT-2 / Qwen style "<|endoftext|>" between documents); EOS likewise
  from `eos_token` or tokenizer_config.json.
  """

  def __init__(self, path: str, bos_token: str = "", eos_token: str = ""):
    import json  # pylint: disable=g-import-not-at-top

    import tokenizers as hf_tokenizers  # pylint: disable=g-import-not-at-top

    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"config.data.hf_tokenizer = {path!r}: no tokenizer.json there")
    with open(path, "rb") as f:
      raw = f.read()
    self.path = path
    self._tok = hf_tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    self.vocab_size: int = int(self._tok.get_vocab_size(with_added_tokens=True))
    spec = json.loads(raw)
    side = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    side_cfg = {}
    if os.path.isfile(side):
      with open(side) as f:
        side_cfg = json.load(f)

    def token_name(v):
      return v.get("content", "") if isinstance(v, dict) else (v or "")

    def token_id(name: str, what: str) -> int:
      if not name:
        return -1
      i = self._tok.token_to_id(name)
      if i is None:
        raise ValueError(f"{what} = {name!r} is not a token of {path!r}")
      return int(i)

    eos = token_id(eos_token or token_name(side_cfg.get("eos_token")),
                   "config.data.eos_token" if eos_token else f"eos_token of {side}")
    bos = token_id(bos_token or token_name(side_cfg.get("bos_token")),
                   "config.data.bos_token" if bos_token else f"bos_token of {side}")
    if bos < 0:
      bos = eos
    if bos < 0:
      raise ValueError(
          f"the tokenizer {path!r} names no BOS or EOS token (no tokenizer_config.json beside "
          "it with bos_token/eos_token): set config.data.bos_token to the document separator")
    self.bos_id: int = bos
    self.eos_id: int = eos if eos != bos else -1
    self._special = {int(t["id"]) for t in spec.get("added_tokens", []) if t.get("special")}
    decoder = spec.get("decoder") or {}
    kinds = [d.get("type") for d in decoder.get("decoders", [decoder])]
    self._byte_level = "ByteLevel" in kinds
    self.bytes_exact = self._byte_level
    self.identity: str = "hf-" + hashlib.sha256(
        raw + f"\0bos={self.bos_id};eos={self.eos_id}".encode()).hexdigest()[:12]

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Encodes many texts at once (the Rust library uses several threads)."""
    return [np.asarray(e.ids, dtype=np.int32)
            for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    ids_N = _as_ids(ids)
    ids_N = ids_N[(ids_N >= 0) & (ids_N < self.vocab_size)]
    return self._tok.decode([int(i) for i in ids_N], skip_special_tokens=True)

  def token_bytes(self) -> np.ndarray:
    out = np.zeros(self.vocab_size, np.int32)
    table = _byte_level_decoder() if self._byte_level else None
    for i in range(self.vocab_size):
      if i in self._special:
        continue
      if table is not None:
        piece = self._tok.id_to_token(i) or ""
        out[i] = sum(1 if c in table else len(c.encode("utf-8")) for c in piece)
      else:
        out[i] = len(self._tok.decode([i]).encode("utf-8"))
    return out

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id})"


TOKENIZERS = ("byte", "sentencepiece", "hf")


def make_tokenizer(data_cfg: ml_collections.ConfigDict) -> Tokenizer:
  """The tokenizer named by `data_cfg.tokenizer` ("byte" | "sentencepiece" | "hf")."""
  kind = data_cfg.tokenizer
  if kind == "byte":
    return ByteTokenizer()
  if kind == "sentencepiece":
    if not data_cfg.spm_model:
      raise ValueError("config.data.spm_model = '' is not allowed: a path to a sentencepiece "
                       ".model file is required when data.tokenizer='sentencepiece'")
    return SentencePieceTokenizer(data_cfg.spm_model)
  if kind == "hf":
    if not data_cfg.get("hf_tokenizer", ""):
      raise ValueError("config.data.hf_tokenizer = '' is not allowed: a tokenizer.json file "
                       "(or a folder holding one) is required when data.tokenizer='hf'")
    return HFTokenizer(data_cfg.hf_tokenizer, data_cfg.get("bos_token", ""),
                       data_cfg.get("eos_token", ""))
  raise ValueError(f"config.data.tokenizer = {kind!r} is not allowed: must be one of "
                   f"{list(TOKENIZERS)}")


def tokenizer_spec(data_cfg: ml_collections.ConfigDict) -> dict:
  """The plain fields that rebuild the tokenizer in a worker process."""
  return {k: data_cfg.get(k, "") for k in
          ("tokenizer", "spm_model", "hf_tokenizer", "bos_token", "eos_token")}
