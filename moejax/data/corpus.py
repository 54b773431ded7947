"""Document sources: what `moejax.data.prepare` tokenizes, cut into units of work.

A source is listed once (`plan_source`) into units, each read by one worker
(`read_unit`) as (split, text) documents in a fixed order. Concatenating the units in
order gives each split's documents in order, so a prepared split does not depend on how
many workers prepared it.

* embedded: local files and folders, one document per file (default: this Python's
  standard library sources, without tests, idlelib and site-packages). Files are sorted
  by relative path; a file is a validation file iff `int(sha256(relpath)[:8], 16) / 2**32
  < val_fraction` (if that picks none, the file with the smallest hash). Files that are
  empty or not valid UTF-8 are skipped and counted. Units group consecutive files up to
  `data.shard_mb` megabytes.
* jsonl / parquet: files (or folders of *.jsonl / *.parquet, recursively) with one
  document per row in the field `data.text_key`; a row is a validation row by the same
  hash rule over "relpath:row". A unit per file.
* hf_disk: a folder written by Hugging Face `datasets` `save_to_disk` (a Dataset: state.json
  and data-*.arrow; a DatasetDict: dataset_dict.json and a folder per split), read with
  pyarrow without the `datasets` package. Splits are the dataset's own
  (data.train_split / data.val_split); a single Dataset is split by the hash rule. A unit
  per arrow file.
* tfds: a TFDS dataset prepared in array_record format (`tfds build NAME --data_dir DIR
  --file_format array_record`), read with `tfds.data_source(..., download=False)`, no
  TensorFlow. Splits are the dataset's own. Units of 20k documents.

Fingerprint (recorded in the manifest; a changed source is prepared afresh): sha256 over
every file's relpath, size and the sha256 of its first and last MiB, plus the options
that change the documents (kind, val_fraction, extensions, text_key, splits,
max_documents). For TFDS: the dataset's dataset_info.json.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from typing import Any, Iterator, Sequence

# Folders of the standard library that are not library sources (or are huge test data).
STDLIB_SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
    "idlelib", "turtledemo",
})
# Never walked in user folders either.
ALWAYS_SKIP_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn"})
TFDS_UNIT_DOCS = 20_000
SPLITS = ("train", "validation")


class SourceError(ValueError):
  """A source that cannot be read: the message names the path and the field."""


# ------------------------------------------------------------------ file listing

@dataclasses.dataclass(frozen=True)
class CorpusFile:
  """A file of a source: `relpath` names it in splits and fingerprints."""

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


def list_corpus_files(paths: Sequence[str], extensions: Sequence[str],
                      field: str = "data.paths") -> list[CorpusFile]:
  """Files sorted by relative path.

  Empty `paths`: the standard library (`extensions` filter; no tests, idlelib,
  site-packages). Otherwise each file is taken as is (relpath = its name) and each folder
  is walked recursively, filtered by `extensions` (relpath = folder name / path inside).
  """
  files: dict[str, str] = {}

  def add(rel: str, path: str):
    if rel in files and os.path.realpath(files[rel]) != os.path.realpath(path):
      raise SourceError(f"config.{field}: two files share the corpus name {rel!r}: "
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
      raise SourceError(f"config.{field} = {p!r} is not allowed: every path must be an "
                        "existing file or folder")
  return [CorpusFile(rel, files[rel]) for rel in sorted(files)]


def path_hash_fraction(key: str) -> float:
  """A number in [0, 1) fixed by a document's key; it decides the split."""
  return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def split_files(relpaths: Sequence[str], val_fraction: float) -> tuple[list[int], list[int]]:
  """Indices of (train, validation) files; validation is never empty."""
  fracs = [path_hash_fraction(r) for r in relpaths]
  val = [i for i, f in enumerate(fracs) if f < val_fraction]
  if not val and relpaths:
    val = [min(range(len(fracs)), key=fracs.__getitem__)]
  val_set = set(val)
  return [i for i in range(len(relpaths)) if i not in val_set], val


def file_fingerprint(path: str, relpath: str) -> str:
  """relpath, size and the sha256 of the first and last MiB (cheap for large corpora)."""
  size = os.path.getsize(path)
  h = hashlib.sha256(f"{relpath}\0{size}\0".encode("utf-8"))
  with open(path, "rb") as f:
    h.update(f.read(1 << 20))
    if size > 2 << 20:
      f.seek(size - (1 << 20))
      h.update(f.read())
    elif size > 1 << 20:
      h.update(f.read())
  return h.hexdigest()


# ------------------------------------------------------------------ plans

@dataclasses.dataclass
class Unit:
  """One worker's share of a source: `items` depend on the kind (see `read_unit`)."""

  index: int
  kind: str
  items: list[Any]
  num_bytes: int  # input bytes (progress bar)


@dataclasses.dataclass
class SourcePlan:
  kind: str
  name: str
  fingerprint: str
  units: list[Unit]
  options: dict[str, Any]  # what read_unit needs besides the unit
  stats: dict[str, Any]


def _options(data_cfg) -> dict[str, Any]:
  return {"kind": data_cfg.source, "val_fraction": float(data_cfg.val_fraction),
          "text_key": data_cfg.text_key, "train_split": data_cfg.train_split,
          "val_split": data_cfg.val_split, "max_documents": int(data_cfg.max_documents),
          "extensions": sorted(data_cfg.extensions) if data_cfg.source == "embedded" else []}


def _fingerprint(parts: Sequence[str], options: dict[str, Any]) -> str:
  h = hashlib.sha256()
  for p in parts:
    h.update(p.encode("utf-8") + b"\n")
  h.update(json.dumps(options, sort_keys=True).encode("utf-8"))
  return h.hexdigest()


def _plan_embedded(data_cfg) -> SourcePlan:
  files = list_corpus_files(tuple(data_cfg.paths), tuple(data_cfg.extensions))
  if not files:
    raise SourceError(f"config.data.paths = {tuple(data_cfg.paths)!r} with "
                      f"config.data.extensions = {tuple(data_cfg.extensions)!r} holds no files")
  opts = _options(data_cfg)
  train, val = split_files([f.relpath for f in files], data_cfg.val_fraction)
  split_of = {i: "train" for i in train} | {i: "validation" for i in val}
  if data_cfg.max_documents:  # the first N files of each split in sorted order
    keep = set(train[:data_cfg.max_documents]) | set(val[:data_cfg.max_documents])
    files_idx = [i for i in range(len(files)) if i in keep]
  else:
    files_idx = list(range(len(files)))
  units, cur, cur_bytes, total = [], [], 0, 0
  limit = data_cfg.shard_mb * 1e6
  prints = []
  for i in files_idx:
    f = files[i]
    size = os.path.getsize(f.path)
    prints.append(file_fingerprint(f.path, f.relpath))
    cur.append((f.relpath, f.path, split_of[i]))
    cur_bytes += size
    total += size
    if cur_bytes >= limit:
      units.append(Unit(len(units), "embedded", cur, cur_bytes))
      cur, cur_bytes = [], 0
  if cur:
    units.append(Unit(len(units), "embedded", cur, cur_bytes))
  root = "stdlib " + stdlib_root() if not data_cfg.paths else ", ".join(data_cfg.paths)
  return SourcePlan("embedded", root, _fingerprint(prints, opts), units, opts,
                    {"num_files": len(files_idx), "input_bytes": total})


def _rows_files(data_cfg, ext: str) -> list[CorpusFile]:
  files = list_corpus_files(tuple(data_cfg.paths), (ext,))
  if not files:
    raise SourceError(f"config.data.paths = {tuple(data_cfg.paths)!r} holds no {ext} files "
                      f"(data.source={data_cfg.source!r})")
  return files


def _plan_rows(data_cfg) -> SourcePlan:
  """jsonl / parquet: a unit per file; the text field is checked here, before any work."""
  kind = data_cfg.source
  files = _rows_files(data_cfg, ".jsonl" if kind == "jsonl" else ".parquet")
  opts = _options(data_cfg)
  for f in files:
    check_text_field(kind, f.path, data_cfg.text_key)
  units = [Unit(i, kind, [(f.relpath, f.path)], os.path.getsize(f.path))
           for i, f in enumerate(files)]
  prints = [file_fingerprint(f.path, f.relpath) for f in files]
  return SourcePlan(kind, ", ".join(data_cfg.paths), _fingerprint(prints, opts), units, opts,
                    {"num_files": len(files), "input_bytes": sum(u.num_bytes for u in units)})


def check_text_field(kind: str, path: str, text_key: str) -> None:
  """Raises SourceError unless the first row of `path` has the field `text_key`."""
  if kind == "jsonl":
    with open(path, "rb") as f:
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            row = json.loads(line)
          except ValueError as e:
            raise SourceError(f"{path}:{n} is not valid JSON ({e})") from None
          if not isinstance(row, dict) or text_key not in row:
            fields = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise SourceError(f"{path}:{n} has no field config.data.text_key = {text_key!r}; "
                              f"its fields: {fields}")
          return
    raise SourceError(f"{path} is empty: no JSON lines (data.source='jsonl')")
  names = _arrow_schema_names(kind, path)
  if text_key not in names:
    raise SourceError(f"{path} has no column config.data.text_key = {text_key!r}; its "
                      f"columns: {names}")


def _arrow_schema_names(kind: str, path: str) -> list[str]:
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  try:
    if kind == "parquet":
      return list(pq.ParquetFile(path).schema_arrow.names)
    with pa.memory_map(path) as src:
      return list(pa.ipc.open_stream(src).schema.names)
  except (pa.ArrowInvalid, OSError) as e:
    raise SourceError(f"{path} cannot be read as {kind} ({e})") from None


def _plan_hf_disk(data_cfg) -> SourcePlan:
  opts = _options(data_cfg)
  units, prints = [], []
  for root in data_cfg.paths:
    root = os.path.expanduser(root)
    if os.path.isfile(os.path.join(root, "dataset_dict.json")):
      with open(os.path.join(root, "dataset_dict.json")) as f:
        have = json.load(f).get("splits", [])
      wanted = {data_cfg.train_split: "train", data_cfg.val_split: "validation"}
      for s in wanted:
        if s not in have:
          raise SourceError(f"{root}: the dataset has splits {have}, not {s!r} "
                            "(config.data.train_split / config.data.val_split)")
      parts = [(os.path.join(root, s), wanted[s]) for s in wanted]
    elif os.path.isfile(os.path.join(root, "state.json")):
      parts = [(root, "")]  # one Dataset: split by the hash rule
    else:
      raise SourceError(f"config.data.paths = {root!r} is not a folder written by datasets' "
                        "save_to_disk (no dataset_dict.json or state.json)")
    for folder, split in parts:
      with open(os.path.join(folder, "state.json")) as f:
        names = [d["filename"] for d in json.load(f).get("_data_files", [])]
      if not names:
        raise SourceError(f"{folder}/state.json lists no arrow files")
      for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
          raise SourceError(f"{path} is listed in {folder}/state.json but does not exist")
        check_text_field("hf_disk", path, data_cfg.text_key)
        rel = os.path.relpath(path, os.path.dirname(os.path.normpath(root)))
        units.append(Unit(len(units), "hf_disk", [(rel, path, split)], os.path.getsize(path)))
        prints.append(file_fingerprint(path, rel))
  return SourcePlan("hf_disk", ", ".join(data_cfg.paths), _fingerprint(prints, opts), units,
                    opts, {"num_files": len(units),
                           "input_bytes": sum(u.num_bytes for u in units)})


def tfds_data_dir(data_cfg) -> str:
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
    found += [os.path.dirname(p) for p in glob.glob(os.path.join(root, depth,
                                                                 "dataset_info.json"))]
  if version:
    found = [d for d in found if os.path.basename(d) == version]
  return sorted(found)


def open_tfds_split(name: str, split: str, data_dir: str):
  """`tfds.data_source` of one split (array_record, no TensorFlow); clear errors."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except
    raise SourceError(_not_prepared_message(
        name, data_dir, f"could not be opened for split {split!r} ({type(e).__name__}: "
        f"{(str(e).splitlines() or [''])[0][:300]})")) from e


def _plan_tfds(data_cfg) -> SourcePlan:
  name, data_dir = data_cfg.tfds_name, tfds_data_dir(data_cfg)
  prepared = find_prepared_tfds(name, data_dir)
  if not prepared:
    raise SourceError(_not_prepared_message(name, data_dir, "is not prepared"))
  formats = set()
  for d in prepared:
    with open(os.path.join(d, "dataset_info.json")) as f:
      formats.add(json.load(f).get("fileFormat", "tfrecord"))
  if "array_record" not in formats:
    raise SourceError(_not_prepared_message(
        name, data_dir, f"is prepared only as {sorted(formats)} (needs TensorFlow)"))
  opts = _options(data_cfg) | {"tfds_name": name, "tfds_data_dir": data_dir}
  units, info_json = [], b""
  for split, label in ((data_cfg.train_split, "train"), (data_cfg.val_split, "validation")):
    src = open_tfds_split(name, split, data_dir)
    n = len(src)
    if n and data_cfg.text_key not in src[0]:
      raise SourceError(f"config.data.text_key = {data_cfg.text_key!r} is not allowed: "
                        f"dataset {name!r} split {split!r} has fields {sorted(src[0])}")
    if data_cfg.max_documents:
      n = min(n, data_cfg.max_documents)
    for lo in range(0, n, TFDS_UNIT_DOCS):
      units.append(Unit(len(units), "tfds", [(split, label, lo, min(n, lo + TFDS_UNIT_DOCS))],
                        0))
    if not info_json:
      with open(os.path.join(os.fspath(src.dataset_info.data_dir), "dataset_info.json"),
                "rb") as f:
        info_json = f.read()
  fp = _fingerprint([name, hashlib.sha256(info_json).hexdigest()], opts)
  return SourcePlan("tfds", name, fp, units, opts, {"tfds_data_dir": data_dir})


def plan_source(data_cfg) -> SourcePlan:
  """Lists `data.source` into units (cheap: no document is tokenized)."""
  kind = data_cfg.source
  if kind == "embedded":
    return _plan_embedded(data_cfg)
  if kind in ("jsonl", "parquet"):
    return _plan_rows(data_cfg)
  if kind == "hf_disk":
    return _plan_hf_disk(data_cfg)
  if kind == "tfds":
    if not data_cfg.tfds_name:
      raise SourceError("config.data.tfds_name = '' is not allowed: a TFDS dataset name is "
                        "required when data.source='tfds'")
    return _plan_tfds(data_cfg)
  raise SourceError(f"config.data.source = {kind!r} is not allowed: must be one of "
                    "['embedded', 'jsonl', 'parquet', 'tfds', 'hf_disk']")


# ------------------------------------------------------------------ reading a unit

def _hash_split(key: str, val_fraction: float) -> str:
  return "validation" if path_hash_fraction(key) < val_fraction else "train"


def _as_text(value: Any, where: str) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if hasattr(value, "item") and not isinstance(value, str):
    value = value.item()
    if isinstance(value, bytes):
      return value.decode("utf-8", errors="replace")
  if not isinstance(value, str):
    raise SourceError(f"{where}: the text field holds a {type(value).__name__}, not text")
  return value


def read_unit(unit: Unit, options: dict[str, Any], stats: dict[str, int]
              ) -> Iterator[tuple[str, str]]:
  """(split, text) of every document of the unit in order; counts skips in `stats`."""
  key, frac = options["text_key"], options["val_fraction"]
  if unit.kind == "embedded":
    for relpath, path, split in unit.items:
      with open(path, "rb") as f:
        raw = f.read()
      if not raw:
        stats["skipped_empty"] = stats.get("skipped_empty", 0) + 1
        continue
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError:
        stats["skipped_not_utf8"] = stats.get("skipped_not_utf8", 0) + 1
        continue
      yield split, text
  elif unit.kind == "jsonl":
    ((relpath, path),) = unit.items
    with open(path, "rb") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except ValueError as e:
          raise SourceError(f"{path}:{n} is not valid JSON ({e})") from None
        if not isinstance(row, dict) or key not in row:
          raise SourceError(f"{path}:{n} has no field config.data.text_key = {key!r}")
        yield _hash_split(f"{relpath}:{n}", frac), _as_text(row[key], f"{path}:{n}")
  elif unit.kind in ("parquet", "hf_disk"):
    relpath, path = unit.items[0][:2]
    split = unit.items[0][2] if unit.kind == "hf_disk" else ""
    for n, value in enumerate(_arrow_column(unit.kind, path, key)):
      if value is None:
        stats["skipped_empty"] = stats.get("skipped_empty", 0) + 1
        continue
      yield split or _hash_split(f"{relpath}:{n}", frac), _as_text(value, f"{path} row {n}")
  elif unit.kind == "tfds":
    ((split, label, lo, hi),) = unit.items
    src = open_tfds_split(options["tfds_name"], split, options["tfds_data_dir"])
    for start in range(lo, hi, 1024):
      for rec in src.__getitems__(list(range(start, min(hi, start + 1024)))):
        yield label, _as_text(rec[key], f"tfds {options['tfds_name']} {split}")
  else:
    raise SourceError(f"unknown unit kind {unit.kind!r}")


def _arrow_column(kind: str, path: str, key: str) -> Iterator[Any]:
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  try:
    if kind == "parquet":
      for batch in pq.ParquetFile(path).iter_batches(columns=[key], batch_size=4096):
        yield from batch.column(0).to_pylist()
    else:
      with pa.memory_map(path) as src:
        reader = pa.ipc.open_stream(src)
        for batch in reader:
          yield from batch.column(batch.schema.get_field_index(key)).to_pylist()
  except (pa.ArrowInvalid, OSError) as e:
    raise SourceError(f"{path} cannot be read as {kind} ({e})") from None
