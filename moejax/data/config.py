"""The `config.data` section: defaults and validation (moejax/config.py composes them).

Where the tokens come from, one of:
* `data.mixture = ("DIR:WEIGHT", ...)`: several prepared folders (moejax.data.prepare)
  mixed by weight;
* `data.prepared = DIR`: one prepared folder (e.g. on shared storage for a pod);
* else `data.source`, prepared automatically on first use into `data.cache_dir` (and
  reused): embedded (local files and folders, one document per file; default the Python
  standard library), jsonl / parquet (files or folders of them, one document per row,
  text in `data.text_key`), tfds (a TFDS dataset prepared in array_record format, read
  with `tfds.data_source`), hf_disk (a Hugging Face `datasets` folder from
  `save_to_disk`, read with pyarrow).
"""

from __future__ import annotations

import os

import ml_collections

from moejax.configlib import boolean, choice, fail, float_range, nonneg_int, pos_int

SOURCES = ("embedded", "jsonl", "parquet", "tfds", "hf_disk")
TOKENIZERS = ("byte", "sentencepiece", "hf")


def defaults() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.source = "embedded"  # embedded | jsonl | parquet | tfds | hf_disk (see module doc)
  d.paths = ()  # embedded / jsonl / parquet / hf_disk: files or folders; embedded () = stdlib
  d.extensions = (".py",)  # embedded: file suffixes to read from folders; () = all
  d.val_fraction = 0.05  # embedded / jsonl / parquet: documents held out (hash of their key)
  d.tfds_name = ""  # tfds: e.g. "tiny_shakespeare", "lm1b"
  d.tfds_data_dir = ""  # tfds: where the prepared dataset lives
  d.text_key = "text"  # jsonl / parquet / tfds / hf_disk: the field holding the text
  d.train_split = "train"  # tfds / hf_disk: the splits to read
  d.val_split = "validation"
  d.prepared = ""  # a folder written by moejax.data.prepare: read it, ignore data.source
  d.mixture = ()  # ("DIR:WEIGHT", ...): prepared folders mixed by weight
  d.tokenizer = "byte"  # byte | sentencepiece | hf
  d.spm_model = ""  # sentencepiece: the .model file
  d.hf_tokenizer = ""  # hf: a tokenizer.json file or a model folder holding one
  d.bos_token = ""  # hf: the document separator token; "" = the tokenizer's bos, else eos
  d.eos_token = ""  # hf: "" = tokenizer_config.json's eos_token
  d.append_eos = False  # write EOS after every document too (needs a tokenizer with one)
  d.seq_len = 256
  d.batch_size = 16
  d.shuffle_seed = 0
  d.document_mask = False  # attention stays inside each packed document; RoPE restarts
  d.cache_dir = ""  # automatic preparation goes here; "" -> ~/.cache/moejax
  d.max_documents = 0  # embedded / tfds: only the first N documents of each split; 0: all
  d.prepare_workers = 0  # worker processes for preparing; 0 = one per CPU core
  d.shard_mb = 64  # embedded: input megabytes per shard (a shard per file otherwise)
  return d


def parse_mixture(entries) -> list[tuple[str, float]]:
  """("DIR:WEIGHT", ...) -> [(dir, weight)]; raises ConfigError naming the bad entry."""
  out = []
  for e in entries:
    path, sep, w = str(e).rpartition(":")
    try:
      weight = float(w)
    except ValueError:
      weight = -1.0
    if not sep or not path or not weight > 0:
      fail("data.mixture", e, "every entry must be 'PREPARED_DIR:WEIGHT' with a weight > 0")
    out.append((path, weight))
  return out


def validate(config: ml_collections.ConfigDict) -> None:
  d, m = config.data, config.model
  choice(config, "data.source", SOURCES)
  for f in ("paths", "extensions", "mixture"):
    if isinstance(d[f], str) or not all(isinstance(x, str) for x in d[f]):
      fail(f"data.{f}", d[f], "must be a tuple of strings")
  for f in ("spm_model", "hf_tokenizer", "bos_token", "eos_token", "tfds_name",
            "tfds_data_dir", "cache_dir", "text_key", "prepared"):
    if not isinstance(d[f], str):
      fail(f"data.{f}", d[f], "must be a string")
  choice(config, "data.tokenizer", TOKENIZERS)
  if d.tokenizer == "sentencepiece" and not d.spm_model:
    fail("data.spm_model", d.spm_model, "a path to a sentencepiece .model file is required "
         "when data.tokenizer='sentencepiece'")
  if d.tokenizer == "sentencepiece" and not os.path.exists(d.spm_model):
    fail("data.spm_model", d.spm_model, "file does not exist")
  if d.tokenizer == "hf" and not d.hf_tokenizer:
    fail("data.hf_tokenizer", d.hf_tokenizer, "a tokenizer.json file or a folder holding one "
         "is required when data.tokenizer='hf'")
  if d.tokenizer == "hf" and not os.path.exists(d.hf_tokenizer):
    fail("data.hf_tokenizer", d.hf_tokenizer, "file or folder does not exist")
  if d.tokenizer != "hf" and (d.bos_token or d.eos_token):
    fail("data.bos_token" if d.bos_token else "data.eos_token", d.bos_token or d.eos_token,
         "token names apply to data.tokenizer='hf' only")
  boolean(config, "data.append_eos")
  boolean(config, "data.document_mask")
  reading_prepared = bool(d.prepared or d.mixture)
  if d.prepared and d.mixture:
    fail("data.prepared", d.prepared, "set data.prepared or data.mixture, not both")
  for path, _ in parse_mixture(d.mixture):
    if not os.path.isdir(path):
      fail("data.mixture", path, "every entry must name an existing prepared folder")
  if d.prepared and not os.path.isdir(d.prepared):
    fail("data.prepared", d.prepared, "must be an existing folder written by "
         "`python -m moejax.data.prepare`")
  if not reading_prepared:
    if d.source == "tfds" and not d.tfds_name:
      fail("data.tfds_name", d.tfds_name, "a TFDS dataset name is required when "
           "data.source='tfds'")
    if d.source in ("jsonl", "parquet", "hf_disk") and not d.paths:
      fail("data.paths", d.paths, f"at least one file or folder is required when "
           f"data.source={d.source!r}")
    if d.source != "tfds":
      for p in d.paths:
        if not os.path.exists(os.path.expanduser(p)):
          fail("data.paths", p, "every path must be an existing file or folder")
    if d.source == "embedded" and (d.train_split, d.val_split) != ("train", "validation"):
      fail("data.train_split", d.train_split, "the embedded corpus has splits 'train' and "
           "'validation' (set data.val_fraction to change the split)")
    if d.source in ("jsonl", "parquet", "hf_disk") and d.max_documents:
      fail("data.max_documents", d.max_documents, f"must be 0 for data.source={d.source!r} "
           "(documents are read file by file in parallel); prepare a smaller file instead")
  if not d.text_key:
    fail("data.text_key", d.text_key, "must name the field holding the text")
  float_range(config, "data.val_fraction", 0, 1, lo_open=True, hi_open=True)
  pos_int(config, "data.seq_len")
  if m.max_seq_len and m.max_seq_len < d.seq_len:
    fail("model.max_seq_len", m.max_seq_len, f"must be 0 or >= data.seq_len={d.seq_len}")
  pos_int(config, "data.batch_size")
  nonneg_int(config, "data.shuffle_seed")
  nonneg_int(config, "data.max_documents")
  nonneg_int(config, "data.prepare_workers")
  pos_int(config, "data.shard_mb")
  if m.vocab_size and d.tokenizer == "byte" and m.vocab_size < 257:
    fail("model.vocab_size", m.vocab_size, "must be 0 or >= 257 for the byte tokenizer")
  if d.document_mask and m.recursion.router != "none":
    fail("data.document_mask", True, "is not supported with Mixture-of-Recursions "
         f"(model.recursion.router={m.recursion.router!r}): its routers gather tokens across "
         "documents; use a plain recursive model or turn document masking off")
