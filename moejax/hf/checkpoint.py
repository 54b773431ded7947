"""Safetensors folders <-> moejax parameter trees, one tensor at a time.

Loading plans every moejax parameter from the family's table (moejax.hf.families) and
checks every Hugging Face tensor's name and shape before reading any (a missing,
unexpected or mis-shaped tensor is named with both shapes). Each parameter is then built
with `jax.make_array_from_callback` in its target sharding: the callback for a device's
slice reads only the layers and experts of that slice, one Hugging Face tensor at a time
(fused expert tensors through safetensors slicing), so host memory stays near the largest
tensor, not the model, and each process reads only its own devices' slices.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Any, Callable

import jax
import ml_dtypes
import numpy as np

from moejax.hf import families as fam_lib

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
  """A Hugging Face folder whose tensors do not match its config: names them."""


_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}


class TensorFolder:
  """The safetensors files of a Hugging Face folder (one file, or shards + index).

  Tensors are read with positioned reads (os.pread) from the files' headers, not memory
  maps, so a read costs exactly the bytes asked for and nothing stays resident after."""

  def __init__(self, folder: str):
    self.folder = folder
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, SINGLE)):
      files = [SINGLE]
    else:
      present = sorted(os.listdir(folder))[:20]
      raise CheckpointError(f"{folder} holds neither {SINGLE} nor {INDEX} (found {present}); "
                            "a PyTorch .bin checkpoint must be converted to safetensors first")
    self._fds: dict[str, int] = {}
    self.entries: dict[str, tuple[str, np.dtype, tuple[int, ...], int]] = {}
    for file in files:
      path = os.path.join(folder, file)
      if not os.path.isfile(path):
        raise CheckpointError(f"{path} is named in {INDEX} but missing")
      self._read_header(file, path)

  def _read_header(self, file: str, path: str) -> None:
    size = os.path.getsize(path)
    try:
      fd = self._fds[file] = os.open(path, os.O_RDONLY)
      (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
      if n > min(size - 8, 100 << 20):
        raise ValueError(f"header length {n} exceeds the file")
      header = json.loads(os.pread(fd, n, 8))
    except (OSError, ValueError, struct.error) as e:
      raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e
    base = 8 + n
    for name, info in header.items():
      if name == "__metadata__":
        continue
      if info["dtype"] not in _DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}; supported: "
                              f"{sorted(_DTYPES)}")
      lo, hi = info["data_offsets"]
      dt, shape = np.dtype(_DTYPES[info["dtype"]]), tuple(info["shape"])
      if hi - lo != math.prod(shape) * dt.itemsize or base + hi > size:
        raise CheckpointError(f"{path}: tensor {name} ({info['dtype']} {list(shape)}) does "
                              "not fit its byte range: the file is truncated or corrupt")
      self.entries[name] = (file, dt, shape, base + lo)

  def names(self) -> set[str]:
    return set(self.entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.entries[name][2]

  def get(self, name: str, rows: slice | None = None) -> np.ndarray:
    """The tensor (or rows of its first axis), as stored (bf16 via ml_dtypes)."""
    file, dt, shape, offset = self.entries[name]
    lo, hi, _ = (rows or slice(None)).indices(shape[0] if shape else 1)
    row = math.prod(shape[1:]) * dt.itemsize
    n = (hi - lo) * row if shape else dt.itemsize
    buf = bytearray(n)
    got = os.preadv(self._fds[file], [buf], offset + lo * row) if n else 0
    if got != n:
      raise CheckpointError(f"{os.path.join(self.folder, file)}: short read of {name}")
    arr = np.frombuffer(buf, dt)
    return arr.reshape(((hi - lo),) + shape[1:]) if shape else arr.reshape(())

  def close(self) -> None:
    for fd in self._fds.values():
      os.close(fd)
    self._fds = {}


# ------------------------------------------------------------------ sources of one leaf

@dataclasses.dataclass
class Tensor:
  """One moejax array (or one layer / expert of it) from one Hugging Face tensor."""
  name: str
  transform: str
  shape: tuple[int, ...]  # the moejax shape
  hf_shape: tuple[int, ...]  # as it must be stored

  def read(self, folder: TensorFolder, index: tuple) -> np.ndarray:
    if self.transform.startswith("fused_"):  # [E, ...]: read only the experts of index[0]
      e = index[0] if index else slice(None)
      x = folder.get(self.name, e)
      f = self.shape[-1] if self.transform != "fused_down" else self.shape[1]
      if self.transform == "fused_gate":
        x = x[:, :f, :].transpose(0, 2, 1)
      elif self.transform == "fused_up":
        x = x[:, f:, :].transpose(0, 2, 1)
      else:
        x = x.transpose(0, 2, 1)
      return np.ascontiguousarray(x[(slice(None),) + tuple(index[1:])])
    x = folder.get(self.name)
    if self.transform in ("linear", "linear2"):
      x = x.T.reshape(self.shape)
    elif self.transform == "bias":
      x = x.reshape(self.shape)
    return np.ascontiguousarray(x[tuple(index)])


@dataclasses.dataclass
class Stacked:
  """A leading axis (layers of a scan, experts) built from one source per entry."""
  parts: list[Any]
  shape: tuple[int, ...]

  def read(self, folder: TensorFolder, index: tuple) -> np.ndarray:
    first = index[0] if index else slice(None)
    rest = tuple(index[1:])
    picked = range(len(self.parts))[first]
    out = None
    for j, i in enumerate(picked):  # filled in place: one part in memory besides `out`
      x = self.parts[i].read(folder, rest)
      if out is None:
        out = aligned_empty((len(picked),) + x.shape, x.dtype)
      out[j] = x
      del x
    return out


def aligned_empty(shape: tuple[int, ...], dtype: Any, align: int = 64) -> np.ndarray:
  """An uninitialised array whose data starts on an `align`-byte boundary, so the CPU
  client can take it as a device buffer without another copy."""
  dtype = np.dtype(dtype)
  n = math.prod(shape) * dtype.itemsize
  raw = np.empty(n + align, np.uint8)
  off = (-raw.ctypes.data) % align
  return raw[off:off + n].view(dtype).reshape(shape)


def expected_hf_shape(transform: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The stored shape a moejax array of `shape` needs under `transform`."""
  if transform == "copy":
    return shape
  if transform == "linear":
    return (math.prod(shape[1:]), shape[0])
  if transform == "linear2":
    return (shape[-1], math.prod(shape[:-1]))
  if transform == "bias":
    return (math.prod(shape),)
  e = shape[0]
  if transform in ("fused_gate", "fused_up"):
    return (e, 2 * shape[2], shape[1])
  if transform == "fused_down":
    return (e, shape[2], shape[1])
  raise ValueError(transform)


# ------------------------------------------------------------------ the plan

def layer_slots(cfg: Any) -> dict[tuple[str, ...], list[tuple[int, str]]]:
  """moejax path prefix -> [(layer index, kind)] in stacking order; a prefix holding one
  unstacked layer (scan_layers=False) maps to a list of one and has no leading axis."""
  out: dict[tuple[str, ...], list[tuple[int, str]]] = {}
  layer = 0
  for name, kinds, repeats in cfg.segments():
    for r in range(repeats):
      for j, kind in enumerate(kinds):
        if cfg.scan_layers:
          key = (name,) if len(kinds) == 1 else (name, f"block_{j}")
        else:
          key = (f"layer_{layer - j}",) if len(kinds) == 1 else (f"layer_{layer - j}",
                                                                   f"block_{j}")
        out.setdefault(key, []).append((layer, kind))
        layer += 1
  return out


def _path_names(path) -> tuple[str, ...]:
  return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def plan(cfg: Any, fam: fam_lib.Family, shapes: Any, folder: TensorFolder | None,
         fused: bool | None = None) -> tuple[dict[tuple[str, ...], Any], bool]:
  """{moejax param path: source} for the abstract param tree `shapes`; checks names and
  shapes of every tensor of `folder` first (folder=None: no checks, the plan of what a
  folder must hold). `fused=None` detects the expert layout."""
  names = folder.names() if folder is not None else set()
  if fused is None:
    fused = any(n.endswith("experts.gate_up_proj") for n in names)
  slots = layer_slots(cfg)
  tables = {}
  for prefix, layers in slots.items():
    for i, kind in layers:
      tables[i] = {p: (n, t) for p, n, t in fam_lib.block_table(fam, cfg, kind, i, fused)}
  top = {p: (n, t) for p, n, t in fam_lib.top_table(cfg.tie_embeddings)}
  used, problems, sources = set(), [], {}

  def leaf(name: str, transform: str, shape: tuple[int, ...]) -> Any:
    if transform == "experts":  # [E, in, out] from E nn.Linear weights [out, in]
      parts = [leaf(name.format(e=e), "linear", shape[1:]) for e in range(shape[0])]
      return Stacked(parts, shape)
    want = expected_hf_shape(transform, shape)
    used.add(name)
    if folder is None:
      pass
    elif name not in names:
      problems.append(f"missing tensor {name} (expected shape {list(want)})")
    elif folder.shape(name) != want:
      problems.append(f"tensor {name} has shape {list(folder.shape(name))}, expected "
                      f"{list(want)} for this config")
    return Tensor(name, transform, shape, want)

  for path, sds in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    keys = _path_names(path)
    shape = tuple(sds.shape)
    inner = "/".join(keys)
    if inner in top:
      sources[keys] = leaf(top[inner][0], top[inner][1], shape)
      continue
    prefix = next((keys[:n] for n in (2, 1) if keys[:n] in slots), None)
    if prefix is None:
      problems.append(f"moejax parameter {'/'.join(keys)} has no Hugging Face source")
      continue
    within, layers = "/".join(keys[len(prefix):]), slots[prefix]
    stacked = cfg.scan_layers
    parts = []
    for i, _ in layers:
      if within not in tables[i]:
        problems.append(f"moejax parameter {'/'.join(keys)} (layer {i}) has no entry in "
                        f"the {fam.name} table")
        break
      name, transform = tables[i][within]
      parts.append(leaf(name, transform, shape[1:] if stacked else shape))
    sources[keys] = Stacked(parts, shape) if stacked else parts[0] if parts else None
  extra = sorted(n for n in names - used if not n.endswith(IGNORED_SUFFIXES)
                 and not (cfg.tie_embeddings and n == "lm_head.weight"))
  problems += [f"unexpected tensor {n} {list(folder.shape(n))} (not used by the {fam.name} "
               "mapping)" for n in extra]
  if problems:
    where = folder.folder if folder is not None else "the plan"
    head = "\n  ".join(problems[:12])
    more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
    raise CheckpointError(f"{where}: the tensors do not match config.json "
                          f"({fam.name}):\n  {head}{more}")
  return sources, fused


def tensors_of(sources: dict) -> list[Tensor]:
  """Every Hugging Face tensor a plan reads, once each, in plan order."""
  out, seen = [], set()

  def walk(src):
    if isinstance(src, Stacked):
      for p in src.parts:
        walk(p)
    elif src.name not in seen:
      seen.add(src.name)
      out.append(src)

  for src in sources.values():
    walk(src)
  return out


def place(sources: dict, shapes: Any, shardings: Any, folder: TensorFolder,
          progress: Callable[[], None] | None = None) -> Any:
  """The param tree, each leaf made in its sharding from its source."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  shard_leaves = jax.tree_util.tree_leaves(shardings)
  out = []
  for (path, sds), sharding in zip(flat, shard_leaves):
    src = sources[_path_names(path)]

    def cb(index, src=src, leaf_dtype=sds.dtype):
      return src.read(folder, tuple(index)).astype(leaf_dtype, copy=False)

    out.append(_make_array(tuple(sds.shape), sharding, cb))
    if progress:
      progress()
  return jax.tree_util.tree_unflatten(treedef, out)


def _make_array(shape: tuple[int, ...], sharding: Any, cb: Callable) -> jax.Array:
  """`jax.make_array_from_callback`, one distinct slice at a time: each slice this process's
  devices hold is read once, put on its devices and dropped before the next is read."""
  groups: dict[tuple, tuple[tuple, list]] = {}
  for dev, index in sharding.addressable_devices_indices_map(shape).items():
    key = tuple((s.start, s.stop, s.step) for s in index)
    groups.setdefault(key, (index, []))[1].append(dev)
  arrays = []
  for index, devs in groups.values():
    x = cb(index)
    arrays += [jax.device_put(x, d) for d in devs]
    del x
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)
