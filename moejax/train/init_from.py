"""`train.init_from`: start a run from pretrained parameters, with a fresh optimizer.

The source is a Hugging Face folder (config.json + safetensors; its architecture must be
the config's, checked field by field) or a moejax run directory (its newest good
checkpoint). Only the parameters are taken: the optimizer state, step, RNG and data
order start fresh. Every parameter is placed straight into the run's sharding. A source
whose parameters do not fit the config names each parameter and both shapes.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import ml_collections

from moejax.configlib import ConfigError
from moejax import hf
from moejax.train import checkpoint as ckpt_lib


def kind_of(path: str) -> str:
  """'hf' | 'moejax' for an init_from path, or a clear error."""
  cfg = os.path.join(path, "config.json")
  if not os.path.isdir(path) or not os.path.isfile(cfg):
    raise ConfigError(f"config.train.init_from = {path!r} is not allowed: it must be a "
                      "Hugging Face folder (config.json + safetensors) or a moejax run "
                      "directory (config.json + checkpoints/)")
  with open(cfg) as f:
    raw = json.load(f)
  if "model_type" in raw or "architectures" in raw:
    return "hf"
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return "moejax"
  raise ConfigError(f"config.train.init_from = {path!r}: its config.json is neither a Hugging "
                    "Face config (no model_type) nor a moejax run's (no checkpoints/ beside it)")


def compare_trees(target: Any, source: Any, where: str) -> None:
  """Raise naming every missing, unexpected or mis-shaped parameter."""
  def flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  t, s = flat(target), flat(source)
  problems = [f"missing parameter {k} {list(v)}" for k, v in t.items() if k not in s]
  problems += [f"unexpected parameter {k} {list(v)}" for k, v in s.items() if k not in t]
  problems += [f"parameter {k}: {where} has shape {list(s[k])}, the config needs "
               f"{list(v)}" for k, v in t.items() if k in s and s[k] != v]
  if problems:
    more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
    raise ConfigError(f"config.train.init_from: {where} does not fit the config:\n  "
                      + "\n  ".join(problems[:12]) + more)


def initial_params(config: ml_collections.ConfigDict, model_cfg: Any, abstract_params: Any,
                   abstract_state_fn: Callable[[ml_collections.ConfigDict], Any],
                   verbose: bool = True) -> Any:
  """The run's initial params from config.train.init_from, in the shardings of
  `abstract_params` (ShapeDtypeStructs with .sharding). `abstract_state_fn(config)`
  gives a source run's abstract TrainState (to restore its checkpoint)."""
  path = os.path.abspath(os.path.expanduser(config.train.init_from))
  kind = kind_of(path)
  if kind == "hf":
    diff = hf.architecture_diff(path, config.model)
    if diff:
      raise ConfigError(f"config.train.init_from = {path!r}: the config's architecture is not "
                        "the checkpoint's:\n  " + "\n  ".join(diff) + "\n(write the config "
                        "with `python -m moejax.convert from-hf`)")
    shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
    return hf.load_params(path, model_cfg, abstract_params, shardings, verbose=verbose)
  with open(os.path.join(path, "config.json")) as f:
    src_config = ml_collections.ConfigDict(json.load(f))
  src_abstract = abstract_state_fn(src_config)
  compare_trees(abstract_params, src_abstract.params, f"the run in {path}")
  src_abstract = src_abstract.replace(params=abstract_params)  # restore into our shardings
  ckpt = ckpt_lib.Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
  try:
    restored = ckpt.restore_latest(src_abstract)
  finally:
    ckpt.close()
  if restored is None:
    raise ConfigError(f"config.train.init_from = {path!r}: no usable checkpoint in "
                      f"{path}/checkpoints")
  payload, _, meta = restored
  if verbose:
    print(f"[moejax] init_from: parameters of {path} at step {int(meta['step'])}", flush=True)
  return payload["params"]
