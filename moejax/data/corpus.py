"""Text corpora as TFDS datasets read without TensorFlow.

Two sources, one result (`TextSource`: random-access splits of documents):

* embedded: local text files (default: this Python's standard library sources), one
  document per file, written by the `MoejaxText` TFDS builder in array_record format
  and read back with `builder.as_data_source(split)`. Only needs tensorflow-datasets,
  array_record and numpy: `tfds.features.Text` encodes/decodes with numpy when
  TensorFlow is absent (verified with tfds 4.9.10), so the examples are
  `{"text": Text, "path": Text}` and read back as UTF-8 `bytes`.
* tfds: an already prepared TFDS dataset (e.g. "tiny_shakespeare", "lm1b") read with
  `tfds.data_source(..., download=False)`. It must have been prepared in array_record
  format (`tfds build NAME --data_dir DIR --file_format array_record`); TFRecord needs
  TensorFlow and downloading needs internet, neither of which moejax assumes.

Embedded corpus rules:
* Files are sorted by relative path. A file is a validation file iff
  `int(sha256(relpath)[:8], 16) / 2**32 < val_fraction`; if that picks none, the file
  with the smallest hash is used. Files that are empty or not valid UTF-8 are skipped.
* The fingerprint is sha256 over (relpath, sha256(content)) of every file in order plus
  val_fraction and extensions. The TFDS config is named `fp-<12 hex>`, so a changed
  corpus is prepared afresh under `<cache_dir>/moejax_text/fp-.../1.0.0` and an unchanged
  one is reused (reading and hashing 11 MB of files takes ~0.1 s).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import io
import json
import logging
import os
import sysconfig
import time
from typing import Any, Iterator, Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

# Folders of the standard library that are not library sources (or are huge test data).
STDLIB_SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
    "idlelib", "turtledemo",
})
# Never walked in user folders either.
ALWAYS_SKIP_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn"})
DEFAULT_CACHE = os.path.join("~", ".cache", "moejax", "tfds")


# ------------------------------------------------------------------ file listing

@dataclasses.dataclass(frozen=True)
class CorpusFile:
  """A file of the embedded corpus: `relpath` names it in splits and fingerprints."""

  relpath: str
  path: str


def _walk(root: str, extensions: Sequence[str], skip_dirs: frozenset[str]) -> list[str]:
  """Relative paths (with "/") of files under `root` matching `extensions` (() = all)."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
    for name in filenames:
      if extensions and not name.endswith(tuple(extensions)):
        continue
      rel = os.path.relpath(os.path.join(dirpath, name), root)
      out.append(rel.replace(os.sep, "/"))
  return out


def stdlib_root() -> str:
  """The standard library source folder of the running Python."""
  return sysconfig.get_paths()["stdlib"]


def list_corpus_files(paths: Sequence[str], extensions: Sequence[str]) -> list[CorpusFile]:
  """Files of the corpus sorted by relative path.

  Empty `paths`: the standard library (`extensions` filter; no tests, idlelib,
  site-packages). Otherwise each file is taken as is (relpath = its name) and each folder
  is walked recursively, filtered by `extensions` (relpath = folder name / path inside).
  """
  files: dict[str, str] = {}

  def add(rel: str, path: str):
    if rel in files and os.path.realpath(files[rel]) != os.path.realpath(path):
      raise ValueError(f"config.data.paths: two files share the corpus name {rel!r}: "
                       f"{files[rel]!r} and {path!r}; rename one of the folders")
    files[rel] = path

  if not paths:
    root = stdlib_root()
    for rel in _walk(root, extensions, STDLIB_SKIP_DIRS | ALWAYS_SKIP_DIRS):
      add(rel, os.path.join(root, rel))
  for p in paths:
    p = os.path.expanduser(p)
    if os.path.isfile(p):
      add(os.path.basename(p), p)
    elif os.path.isdir(p):
      base = os.path.basename(os.path.normpath(os.path.abspath(p)))
      for rel in _walk(p, extensions, ALWAYS_SKIP_DIRS):
        add(f"{base}/{rel}", os.path.join(p, rel))
    else:
      raise ValueError(f"config.data.paths = {p!r} is not allowed: every path must be an "
                       "existing file or folder")
  return [CorpusFile(rel, files[rel]) for rel in sorted(files)]


def path_hash_fraction(relpath: str) -> float:
  """A number in [0, 1) fixed by the relative path; it decides the split."""
  return int(hashlib.sha256(relpath.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def split_files(relpaths: Sequence[str], val_fraction: float) -> tuple[list[int], list[int]]:
  """Indices of (train, validation) files; validation is never empty."""
  fracs = [path_hash_fraction(r) for r in relpaths]
  val = [i for i, f in enumerate(fracs) if f < val_fraction]
  if not val and relpaths:
    val = [int(np.argmin(fracs))]
  val_set = set(val)
  train = [i for i in range(len(relpaths)) if i not in val_set]
  return train, val


@dataclasses.dataclass
class Corpus:
  """The embedded corpus read into memory."""

  relpaths: list[str]
  texts: list[str]
  train: list[int]
  val: list[int]
  fingerprint: str
  num_bytes: int
  skipped_not_utf8: int
  skipped_empty: int


def read_corpus(paths: Sequence[str], extensions: Sequence[str],
                val_fraction: float) -> Corpus:
  """Reads, filters, splits and fingerprints the embedded corpus."""
  files = list_corpus_files(paths, extensions)
  relpaths, texts = [], []
  digest = hashlib.sha256()
  bad = empty = num_bytes = 0
  for f in files:
    with open(f.path, "rb") as fh:
      raw = fh.read()
    if not raw:
      empty += 1
      continue
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      bad += 1
      continue
    relpaths.append(f.relpath)
    texts.append(text)
    num_bytes += len(raw)
    digest.update(f"{f.relpath}\0{hashlib.sha256(raw).hexdigest()}\n".encode("utf-8"))
  if bad:
    logging.warning("moejax.data: skipped %d files that are not valid UTF-8", bad)
  if not relpaths:
    raise ValueError(f"config.data.paths = {tuple(paths)!r} with extensions "
                     f"{tuple(extensions)!r} gives no non-empty UTF-8 text files")
  digest.update(f"val_fraction={float(val_fraction)!r};"
                f"extensions={sorted(extensions)!r}".encode("utf-8"))
  train, val = split_files(relpaths, val_fraction)
  if not train:
    raise ValueError(
        f"the embedded corpus has {len(relpaths)} file(s) and all went to validation "
        f"(data.val_fraction={val_fraction}); the split is by file, so give at least two "
        "files (e.g. split a single big text file into parts)")
  return Corpus(relpaths, texts, train, val, digest.hexdigest(), num_bytes, bad, empty)


# ------------------------------------------------------------------ TFDS builder

class MoejaxText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Local text files, one example per file, splits "train" and "validation"."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One example per file: text and relative path."}

  def __init__(self, *, corpus: Corpus | None = None, **kwargs: Any):
    self._corpus = corpus
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    """No code folder: it holds only download checksums, and TFDS's lookup of it needs
    the `importlib_resources` package for builders defined inside a package."""
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Local text files (default: the Python standard library sources).",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "path": tfds.features.Text(),
        }),
        disable_shuffling=True,  # keep the sorted-by-path order
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager
    if self._corpus is None:
      raise ValueError("MoejaxText needs corpus=... to be prepared")
    c = self._corpus
    return {"train": self._generate_examples(c.train), "validation": self._generate_examples(c.val)}

  def _generate_examples(self, indices: Sequence[int]) -> Iterator[tuple[str, dict[str, str]]]:
    c = self._corpus
    for i in indices:
      yield c.relpaths[i], {"text": c.texts[i], "path": c.relpaths[i]}


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
  """Silences TFDS progress bars, prints and info logs while preparing."""
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top

  was_active = getattr(tqdm_utils, "_active", True)
  absl_logger = logging.getLogger("absl")
  old_level = absl_logger.level
  tfds.display_progress_bar(False)
  absl_logger.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.display_progress_bar(was_active)
    absl_logger.setLevel(old_level)


# ------------------------------------------------------------------ sources

@dataclasses.dataclass
class TextSource:
  """Prepared splits of documents with random access (`len`, `__getitems__`)."""

  kind: str  # "embedded" | "tfds"
  name: str
  fingerprint: str
  splits: dict[str, Any]
  text_key: str
  cache_dir: str  # where derived files (token streams) are written
  prepare_seconds: float
  stats: dict[str, Any]

  def num_documents(self, split: str) -> int:
    return len(self.splits[split])

  def documents(self, split: str, max_documents: int = 0,
                chunk: int = 1024) -> Iterator[str]:
    """The documents of `split` in stored order (the first `max_documents` if > 0)."""
    source = self.splits[split]
    n = len(source) if max_documents <= 0 else min(len(source), max_documents)
    for start in range(0, n, chunk):
      for rec in source.__getitems__(list(range(start, min(n, start + chunk)))):
        text = rec[self.text_key]
        if isinstance(text, np.ndarray):
          text = text.item()
        yield text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


def resolve_cache_dir(data_cfg: ml_collections.ConfigDict) -> str:
  return os.path.abspath(os.path.expanduser(data_cfg.cache_dir or DEFAULT_CACHE))


def embedded_builder(data_cfg: ml_collections.ConfigDict,
                     corpus: Corpus | None = None) -> tuple[MoejaxText, Corpus]:
  """The builder of the embedded corpus (config `fp-<fingerprint[:12]>`), not prepared."""
  if corpus is None:
    corpus = read_corpus(tuple(data_cfg.paths), tuple(data_cfg.extensions),
                         data_cfg.val_fraction)
  config = tfds.core.BuilderConfig(
      name=f"fp-{corpus.fingerprint[:12]}",
      description=f"corpus fingerprint {corpus.fingerprint}")
  with _quiet_tfds():  # "Using custom data configuration" is expected
    builder = MoejaxText(corpus=corpus, config=config, data_dir=resolve_cache_dir(data_cfg),
                         file_format="array_record")
  return builder, corpus


def prepare_embedded(data_cfg: ml_collections.ConfigDict, verbose: bool = True) -> TextSource:
  """Reads the local files and prepares them once as a TFDS dataset (reused after)."""
  t0 = time.perf_counter()
  builder, corpus = embedded_builder(data_cfg)
  root = "stdlib " + stdlib_root() if not data_cfg.paths else ", ".join(data_cfg.paths)
  with _quiet_tfds():
    prepared = builder.is_prepared()
  if not prepared:
    if verbose:
      print(f"moejax.data: preparing embedded corpus ({len(corpus.relpaths)} files, "
            f"{corpus.num_bytes / 1e6:.1f} MB from {root}) -> {builder.data_dir}", flush=True)
    try:
      with _quiet_tfds():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except Exception:  # another process may have prepared it at the same time
      with _quiet_tfds():
        if not builder.is_prepared():
          raise
  with _quiet_tfds():
    splits = {s: builder.as_data_source(split=s) for s in ("train", "validation")}
  seconds = time.perf_counter() - t0
  stats = {"num_files": len(corpus.relpaths), "num_bytes": corpus.num_bytes,
           "skipped_not_utf8": corpus.skipped_not_utf8, "skipped_empty": corpus.skipped_empty,
           "root": root}
  return TextSource("embedded", f"moejax_text/{builder.builder_config.name}",
                    corpus.fingerprint, splits, "text", builder.data_dir, seconds, stats)


def tfds_data_dir(data_cfg: ml_collections.ConfigDict) -> str:
  """data.tfds_data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  d = data_cfg.tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return os.path.abspath(os.path.expanduser(d))


def _not_prepared_message(name: str, data_dir: str, why: str) -> str:
  base = name.partition(":")[0].split("/")[0]
  return (
      f"TFDS dataset {name!r} {why} in data_dir {data_dir!r} (config.data.tfds_data_dir). "
      "moejax reads TFDS datasets without TensorFlow and without downloading, so prepare "
      "it in array_record format on a machine with TensorFlow and internet:\n"
      "  pip install tensorflow tensorflow-datasets\n"
      f"  tfds build {name} --data_dir {data_dir} --file_format array_record\n"
      f"then copy the folder {os.path.join(data_dir, base)} to this machine (same place), "
      "or set config.data.tfds_data_dir to the data_dir that holds it.")


def find_prepared_tfds(name: str, data_dir: str) -> list[str]:
  """Folders `<data_dir>/<name>[/<config>]/<version>` holding a dataset_info.json."""
  base, _, version = name.partition(":")
  root = os.path.join(data_dir, *base.split("/"))
  found = []
  for depth in ("", "*", os.path.join("*", "*")):
    pattern = os.path.join(root, depth, "dataset_info.json")
    found += [os.path.dirname(p) for p in glob.glob(pattern)]
  if version:
    found = [d for d in found if os.path.basename(d) == version]
  return sorted(found)


def open_tfds(data_cfg: ml_collections.ConfigDict, splits: Sequence[str]) -> TextSource:
  """Opens a prepared TFDS dataset with `tfds.data_source` (array_record, no TF)."""
  t0 = time.perf_counter()
  name, data_dir = data_cfg.tfds_name, tfds_data_dir(data_cfg)
  prepared = find_prepared_tfds(name, data_dir)
  if not prepared:
    raise FileNotFoundError(_not_prepared_message(name, data_dir, "is not prepared"))
  formats = set()
  for d in prepared:
    with open(os.path.join(d, "dataset_info.json")) as f:
      formats.add(json.load(f).get("fileFormat", "tfrecord"))
  if "array_record" not in formats:
    raise ValueError(_not_prepared_message(
        name, data_dir, f"is prepared only as {sorted(formats)} (needs TensorFlow)"))
  sources = {}
  for split in splits:
    try:
      with _quiet_tfds():
        sources[split] = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(_not_prepared_message(
          name, data_dir, f"could not be opened for split {split!r} ({type(e).__name__}: "
          f"{(str(e).splitlines() or [''])[0][:300]})")) from e
  info = sources[splits[0]].dataset_info
  dataset_dir = os.fspath(info.data_dir)
  with open(os.path.join(dataset_dir, "dataset_info.json"), "rb") as f:
    info_json = f.read()
  fingerprint = hashlib.sha256(
      info.full_name.encode() + b"\0" + info_json + b"\0" + data_cfg.text_key.encode()
  ).hexdigest()
  for split, src in sources.items():
    rec = src[0] if len(src) else {}
    if len(src) and data_cfg.text_key not in rec:
      raise ValueError(f"config.data.text_key = {data_cfg.text_key!r} is not allowed: "
                       f"dataset {name!r} split {split!r} has fields {sorted(rec)}")
  stats = {"dataset_dir": dataset_dir}
  return TextSource("tfds", info.full_name, fingerprint, sources, data_cfg.text_key,
                    dataset_dir, time.perf_counter() - t0, stats)


def load_source(data_cfg: ml_collections.ConfigDict, verbose: bool = True) -> TextSource:
  """The prepared text source named by `data_cfg.source`."""
  if data_cfg.source == "embedded":
    if (data_cfg.train_split, data_cfg.val_split) != ("train", "validation"):
      raise ValueError("config.data.train_split/val_split must be 'train'/'validation' for "
                       f"the embedded corpus, got {data_cfg.train_split!r}/"
                       f"{data_cfg.val_split!r}")
    return prepare_embedded(data_cfg, verbose=verbose)
  if data_cfg.source == "tfds":
    if not data_cfg.tfds_name:
      raise ValueError("config.data.tfds_name = '' is not allowed: a TFDS dataset name is "
                       "required when data.source='tfds'")
    return open_tfds(data_cfg, (data_cfg.train_split, data_cfg.val_split))
  raise ValueError(f"config.data.source = {data_cfg.source!r} is not allowed: must be one of "
                   "['embedded', 'tfds']")
