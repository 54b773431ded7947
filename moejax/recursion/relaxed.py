"""Convert an untied (vanilla) dense LM into a recursive one (Relaxed Recursive Transformers).

Bae et al., "Relaxed Recursive Transformers" (2024): a pretrained L-layer model becomes
a model of U = L / R unique layers looped R times. Each shared layer starts from a
choice of the original layers, and each loop r gets a LoRA correction initialised from
the truncated SVD of (original weight of the layer that loop replaces - shared weight),
so at full LoRA rank the recursive model computes exactly the original function.

Layer choice for the shared slot `shared_{u}` (offset = 1 for middle_* strategies, whose
first and last layers stay unique and are copied as they are; R = num_loops):
  stepwise  untied layer offset + u * R: every R-th layer of the looped region (for
            sequence strategies that is the first layer of u's tied group; for cycle
            strategies it is generally not one of u's tied layers).
  average   the mean of the layers tied to u (`RecursionConfig.tied_layers()`).
  lower     untied layer offset + u: the lowest U layers of the region.

Norms cannot be LoRA'd: with `unshared_norms` each loop's norm scale is copied from the
original layer it replaces; otherwise the shared scale follows the same rule as the
weights. Exact reproduction of the untied model therefore needs unshared_norms and a
LoRA rank >= min(fan_in, fan_out) of every projection (and the same rope_theta,
norm_eps and logits_soft_cap, which are not checked here).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from moejax.models.lm import LM, LMConfig, init_params
from moejax.recursion.sharing import RecursionConfig

INITS = ("stepwise", "average", "lower")
# Projections of a dense block -> how many leading dims are inputs (the rest are outputs).
PROJECTIONS = {("attn", "q"): 1, ("attn", "k"): 1, ("attn", "v"): 1, ("attn", "o"): 2,
               ("ffn", "gate"): 1, ("ffn", "up"): 1, ("ffn", "down"): 1}
NORMS = (("attn_norm", "scale"), ("ffn_norm", "scale"))
MATCHED_FIELDS = ("d_model", "num_heads", "num_kv_heads", "head_dim", "d_ff", "vocab_size",
                  "tie_embeddings", "num_layers")

Path = tuple[str, ...]
Layer = dict[Path, np.ndarray]  # one block's leaves, keyed by path inside the block


def check_compatible(untied_cfg: LMConfig, rec_cfg: LMConfig) -> RecursionConfig:
  """Raise ValueError unless `untied_cfg` can be converted to `rec_cfg`; returns its rc."""
  if untied_cfg.recursion is not None:
    raise ValueError(f"untied_cfg must have recursion=None, got strategy "
                     f"{untied_cfg.recursion.strategy!r}")
  rc = rec_cfg.recursion
  if rc is None:
    raise ValueError("rec_cfg.recursion is None: set model.recursion.strategy")
  for f in MATCHED_FIELDS:
    a, b = getattr(untied_cfg, f), getattr(rec_cfg, f)
    if a != b:
      raise ValueError(f"{f} differs: untied_cfg.{f} = {a!r}, rec_cfg.{f} = {b!r}")
  if rc.num_layers != untied_cfg.num_layers:
    raise ValueError(f"num_layers differs: untied_cfg.num_layers = {untied_cfg.num_layers}, "
                     f"rec_cfg.recursion.num_layers = {rc.num_layers}")
  if untied_cfg.moe is not None:
    raise ValueError("conversion supports dense FFNs: untied_cfg.moe is set")
  moe_slots = [u for u in range(rc.num_core) if rec_cfg.unique_kind(f"shared_{u}") == "moe"]
  if moe_slots:
    raise ValueError(f"conversion supports dense FFNs: rec_cfg makes shared slots "
                     f"{moe_slots} MoE layers")
  return rc


def source_layers(rc: RecursionConfig, init: str) -> dict[str, list[int]]:
  """shared slot name -> the untied layers whose weights (mean) initialise it."""
  if init not in INITS:
    raise ValueError(f"init = {init!r}; allowed: {INITS}")
  offset, loops = int(rc.middle), rc.num_loops
  tied = rc.tied_layers()
  out = {}
  for u in range(rc.num_core):
    name = f"shared_{u}"
    if init == "stepwise":
      out[name] = [offset + u * loops]
    elif init == "lower":
      out[name] = [offset + u]
    else:
      out[name] = list(tied[name])
  return out


def loop_layers(rc: RecursionConfig) -> dict[str, list[int]]:
  """shared slot name -> the effective (= untied) layer each loop r replaces."""
  out: dict[str, list[int]] = {f"shared_{u}": [-1] * rc.num_loops for u in range(rc.num_core)}
  for i, (name, r) in enumerate(rc.schedule()):
    if name in out:
      out[name][r] = i
  return out


def untied_layers(params: Any, cfg: LMConfig) -> list[Layer]:
  """The L blocks of an untied LM's (unboxed) params, scanned or unrolled, as host arrays."""
  flat = traverse_util.flatten_dict(nn.unbox(params))
  layers: list[Layer] = [{} for _ in range(cfg.num_layers)]
  for path, leaf in flat.items():
    arr = np.asarray(leaf)
    if cfg.scan_layers and path[0] == "layers":
      for i in range(cfg.num_layers):
        layers[i][path[1:]] = arr[i]
    elif not cfg.scan_layers and path[0].startswith("layer_"):
      layers[int(path[0].split("_")[1])][path[1:]] = arr
  return layers


def svd_lora(delta_MN: np.ndarray, rank: int,
             scale: float) -> tuple[np.ndarray, np.ndarray, float]:
  """Rank-`rank` factors A [M, rank], B [rank, N] with scale * A @ B = best approximation.

  Returns (A, B, residual) where residual = ||delta - scale * A @ B||_F. Factors beyond
  min(M, N) are zero.
  """
  m, n = delta_MN.shape
  a_MK, b_KN = np.zeros((m, rank)), np.zeros((rank, n))
  u_MS, s_S, vt_SN = np.linalg.svd(delta_MN, full_matrices=False)
  k = min(rank, s_S.shape[0])
  root_K = np.sqrt(s_S[:k])
  a_MK[:, :k] = u_MS[:, :k] * root_K / scale
  b_KN[:k] = root_K[:, None] * vt_SN[:k]
  residual = float(np.sqrt(np.sum(s_S[k:] ** 2)))
  return a_MK, b_KN, residual


def _shared_slot(layers: list[Layer], src: list[int], per_loop: list[int],
                 rc: RecursionConfig, rank: int,
                 residuals: bool) -> tuple[Layer, dict[Path, list[float]]]:
  """One shared block's leaves (float64) and, if `residuals`, per projection the relative
  LoRA residual ||delta - approx|| / ||W_orig|| of each loop."""
  get = lambda i, path: layers[i][path].astype(np.float64)
  out: Layer = {}
  rel_err: dict[Path, list[float]] = {}
  for path in NORMS + tuple(PROJECTIONS):
    if path not in layers[src[0]]:
      raise ValueError(f"untied block has no leaf {'/'.join(path)}")
    if path in NORMS and rc.unshared_norms:
      out[path] = np.stack([get(i, path) for i in per_loop])
      continue
    shared = np.mean([get(i, path) for i in src], axis=0)
    out[path] = shared
    if path in NORMS or not (rank or residuals):
      continue
    n_in = PROJECTIONS[path]
    in_shape, out_shape = shared.shape[:n_in], shared.shape[n_in:]
    m, n = math.prod(in_shape), math.prod(out_shape)
    a_list, b_list = [], []
    for i in per_loop:
      w_orig = get(i, path)
      a_MK, b_KN, residual = svd_lora((w_orig - shared).reshape(m, n), rank, rc.lora_scale)
      a_list.append(a_MK.reshape(*in_shape, rank))
      b_list.append(b_KN.reshape(rank, *out_shape))
      rel_err.setdefault(path, []).append(residual / max(float(np.linalg.norm(w_orig)), 1e-30))
    if rank:
      out[path[:-1] + (path[-1] + "_lora_a",)] = np.stack(a_list)
      out[path[:-1] + (path[-1] + "_lora_b",)] = np.stack(b_list)
  return out, rel_err


def _hashable(cfg: LMConfig) -> bool:
  try:
    hash(cfg)
    return True
  except TypeError:  # e.g. a hand-built config holding a list: no caching
    return False


def _expected_tree(cfg: LMConfig) -> dict[Path, jax.ShapeDtypeStruct]:
  """Flat path -> shape/dtype of `nn.unbox(init_params(LM(cfg)))`, without computing it."""
  return (_expected_tree_cached if _hashable(cfg) else _expected_tree_uncached)(cfg)


def _expected_tree_uncached(cfg: LMConfig) -> dict[Path, jax.ShapeDtypeStruct]:
  shapes = jax.eval_shape(lambda: nn.unbox(init_params(LM(cfg), jax.random.PRNGKey(0))))
  return traverse_util.flatten_dict(shapes)


def _init_fn_uncached(cfg: LMConfig):
  """Compiled rng -> unboxed init params of LM(cfg) (an eager init is slow)."""
  return jax.jit(lambda rng: nn.unbox(init_params(LM(cfg), rng)))


_expected_tree_cached = functools.lru_cache(maxsize=16)(_expected_tree_uncached)
_init_fn_cached = functools.lru_cache(maxsize=4)(_init_fn_uncached)


def _init(cfg: LMConfig, rng: jax.Array) -> Any:
  return (_init_fn_cached if _hashable(cfg) else _init_fn_uncached)(cfg)(rng)


def _check_untied(params: Any, cfg: LMConfig) -> None:
  expected = _expected_tree(cfg)
  given = traverse_util.flatten_dict(nn.unbox(params))
  for path, spec in expected.items():
    if path not in given:
      raise ValueError(f"untied_params lack {'/'.join(path)} that untied_cfg implies")
    if tuple(np.shape(given[path])) != spec.shape:
      raise ValueError(f"untied_params {'/'.join(path)} has shape {np.shape(given[path])}, "
                       f"untied_cfg implies {spec.shape}")
  extra = sorted(set(given) - set(expected))
  if extra:
    raise ValueError(f"untied_params have leaves untied_cfg does not: {'/'.join(extra[0])}")


def _convert_flat(untied_params: Any, untied_cfg: LMConfig, rec_cfg: LMConfig, init: str,
                  rank: int | None = None, residuals: bool = False):
  """Converted leaves (host arrays, flat paths) and the per-projection relative residuals."""
  rc = check_compatible(untied_cfg, rec_cfg)
  src = source_layers(rc, init)
  _check_untied(untied_params, untied_cfg)
  flat = traverse_util.flatten_dict(nn.unbox(untied_params))
  layers = untied_layers(untied_params, untied_cfg)
  out: dict[Path, np.ndarray] = {}
  for path in (("embed", "embedding"), ("final_norm", "scale"), ("unembed",)):
    if path in flat:
      out[path] = np.asarray(flat[path])
  if rc.middle:
    for name, i in (("first_layer", 0), ("last_layer", rc.num_layers - 1)):
      out.update({("recursion", name) + p: np.asarray(w) for p, w in layers[i].items()})
  per_loop = loop_layers(rc)
  rank = rc.lora_rank if rank is None else rank
  errors: dict[Path, list[float]] = {}
  for name in src:
    slot, rel_err = _shared_slot(layers, src[name], per_loop[name], rc, rank, residuals)
    out.update({("recursion", name) + p: w for p, w in slot.items()})
    for p, errs in rel_err.items():
      errors.setdefault(p, []).extend(errs)
  return out, errors


def convert(untied_params: Any, untied_cfg: LMConfig, rec_cfg: LMConfig,
            init: str = "stepwise", *, template: Any = None,
            rng: jax.Array | None = None) -> dict:
  """Recursive-model params (plain nested dict) from an untied dense model's params.

  The result matches `nn.unbox(LM(rec_cfg).init(...)["params"])` in tree structure,
  shapes and dtypes (rec_cfg.param_dtype). Shared slots follow `init` (module
  docstring), per-loop LoRA factors come from the truncated SVD of the difference to
  the replaced layer (in float64), embeddings / final norm / unembedding and the
  middle_* end layers are copied. Leaves the conversion does not produce (MoR routers)
  come from `template` (init'ed recursive params, boxed or not) or, without one, from
  `LM(rec_cfg).init` with `rng` (default PRNGKey(0)).
  """
  out, _ = _convert_flat(untied_params, untied_cfg, rec_cfg, init)
  expected = _expected_tree(rec_cfg)
  extra = sorted(set(out) - set(expected))
  if extra:
    raise ValueError(f"converted leaf {'/'.join(extra[0])} is not in rec_cfg's params")
  missing = [p for p in expected if p not in out]
  fill = {}
  if missing:
    if template is None:
      template = _init(rec_cfg, jax.random.PRNGKey(0) if rng is None else rng)
    fill = traverse_util.flatten_dict(nn.unbox(template))
  result = {}
  for path, spec in expected.items():
    if path in out:
      leaf = out[path]
      if leaf.shape != spec.shape:
        raise ValueError(f"converted {'/'.join(path)} has shape {leaf.shape}, rec_cfg "
                         f"implies {spec.shape}")
      result[path] = jnp.asarray(leaf, dtype=spec.dtype)
    else:
      if path not in fill or tuple(np.shape(fill[path])) != spec.shape:
        raise ValueError(f"template lacks {'/'.join(path)} with shape {spec.shape}")
      result[path] = jnp.asarray(fill[path], dtype=spec.dtype)
  return traverse_util.unflatten_dict(result)


def lora_residual(untied_params: Any, untied_cfg: LMConfig, rec_cfg: LMConfig,
                  init: str = "stepwise", rank: int | None = None) -> dict[str, float]:
  """Per projection ("attn/q", ..., "ffn/down"): ||delta - rank-k approx||_F / ||W_orig||_F,
  averaged over shared slots and loops. rank=None uses rec_cfg.recursion.lora_rank
  (0: the error of plain sharing, without LoRA)."""
  _, errors = _convert_flat(untied_params, untied_cfg, rec_cfg, init, rank, True)
  return {"/".join(p): float(np.mean(e)) for p, e in errors.items()}
