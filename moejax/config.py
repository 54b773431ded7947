"""Config schema, defaults, loading with overrides, and validation.

Every experiment is a Python file with `get_config(arg) -> ml_collections.ConfigDict`
that starts from `base_config()` and changes what it needs. `validate(config)` runs
before anything is compiled and raises `ConfigError` (a ValueError) naming the field,
the value and what is allowed.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any, Sequence

import ml_collections

from moejax.configlib import ConfigError  # noqa: F401 (re-exported: moejax.config.ConfigError)
from moejax.configlib import choice as _choice
from moejax.configlib import fail as _fail
from moejax.configlib import float_range as _float_range
from moejax.configlib import nonneg_int as _nonneg_int
from moejax.configlib import pos_int as _pos_int
from moejax.data import config as data_config
from moejax.layers import config as layers_config
from moejax.moe import config as moe_config
from moejax.recursion import config as recursion_config


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "base"
  c.seed = 0

  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 0  # 0: take it from the tokenizer (rounded up to a multiple of 8)
  m.d_model = 256
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 4
  m.head_dim = 64
  m.d_ff = 1024
  m.max_seq_len = 0  # 0: data.seq_len; the RoPE/cache limit for generation
  m.rope_theta = 10000.0
  m.norm_eps = 1e-6
  m.tie_embeddings = True
  m.param_dtype = "float32"
  m.compute_dtype = "float32"
  m.remat = "none"  # none | full | dots | dots_no_batch
  m.scan_layers = True
  m.init_std = 0.02
  m.logits_soft_cap = 0.0  # 0 disables
  layers_config.add_defaults(m)  # attention options: biases, QK norm, window, RoPE scaling

  m.moe = moe_config.defaults()
  m.recursion = recursion_config.defaults()

  me = c.mesh = ml_collections.ConfigDict()
  # Device mesh axis sizes; one may be -1 (= the remaining devices). See moejax/parallel.py.
  me.data = -1  # data parallel
  me.fsdp = 1  # data parallel + parameters / optimizer state sharded (ZeRO-3)
  me.tensor = 1  # tensor parallel: heads, mlp, vocab
  me.expert = 1  # expert parallel (and data parallel for the non-expert layers)
  me.rules = ()  # overrides of parallel.RULES: "logical=axis", "logical=a+b", "logical="
  me.expert_dispatch = "auto"  # auto | gspmd | all_to_all: how MoE tokens reach experts
  # dropless backends with expert parallelism: auto (ragged on TPU/GPU, padded on CPU) |
  # ragged (jax.lax.ragged_all_to_all, exact row counts) | padded (all_to_all of padded blocks)
  me.ep_exchange = "auto"

  di = c.dist = ml_collections.ConfigDict()
  # Multi-host (moejax/distributed.py): explicit, from MOEJAX_* variables, or automatic.
  di.coordinator = ""  # "host:port" of process 0; "" = env MOEJAX_COORDINATOR or auto
  di.num_processes = 0
  di.process_id = -1
  di.auto = True  # let JAX detect Cloud TPU pods and SLURM jobs
  di.initialization_timeout_s = 300
  di.heartbeat_timeout_s = 100  # a process silent this long is declared dead

  c.data = data_config.defaults()

  o = c.optim = ml_collections.ConfigDict()
  o.lr = 3e-3
  o.schedule = "cosine"  # cosine | wsd | constant
  o.warmup_steps = 100
  o.min_lr_ratio = 0.1  # final lr = lr * min_lr_ratio
  o.decay_fraction = 0.2  # wsd: fraction of steps spent decaying
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.1
  o.grad_clip = 1.0  # 0 disables

  t = c.train = ml_collections.ConfigDict()
  t.num_steps = 1000
  t.eval_every = 200
  t.eval_batches = 8
  t.log_every = 20
  t.checkpoint_every = 500
  t.keep_checkpoints = 3
  t.async_checkpoint = True
  t.nan_policy = "stop"  # stop | skip
  t.progress_bar = True
  t.tensorboard = True
  t.debug_nan_step = -1  # testing aid: poison the loss at this step (>= 1)
  t.peak_flops = 0.0  # per device, for MFU; 0 -> measured matmul peak
  # start from pretrained parameters (fresh optimizer): a Hugging Face folder or a moejax
  # run directory; ignored once the run has its own checkpoint (moejax/train/init_from.py)
  t.init_from = ""
  c.lock()  # a misspelled field in a config file is an error, not a silent new field
  return c


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Load `path/to/file.py[:arg]` and apply `field.sub=value` overrides."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist")
  mod_spec = importlib.util.spec_from_file_location("_moejax_cfg", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config(arg)")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except (ValueError, AttributeError, KeyError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"{path}: get_config({arg!r}) failed: {type(e).__name__}: {e}") from None
  for ov in overrides:
    apply_override(config, ov)
  return config


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
  """Apply `a.b.c=value`; the value is parsed with the type of the existing field."""
  if override.startswith("--config."):
    override = override[len("--config."):]
  key, sep, raw = override.partition("=")
  if not sep:
    raise ConfigError(f"override {override!r} must look like field.sub=value")
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      raise ConfigError(f"override {key!r}: no config section {p!r}")
    node = node[p]
  if not isinstance(node, ml_collections.ConfigDict):
    raise ConfigError(f"override {key!r}: {'.'.join(parents)!r} is a value, not a section")
  if leaf not in node:
    raise ConfigError(f"override {key!r}: unknown field; known: {sorted(node.keys())}")
  if isinstance(node[leaf], ml_collections.ConfigDict):
    raise ConfigError(f"override {key!r}: is a whole section; override its fields "
                      f"({', '.join(sorted(node[leaf].keys())[:6])}, ...) one by one")
  value = _parse_like(node[leaf], raw, key)
  try:
    node[leaf] = value
  except TypeError as e:
    raise ConfigError(f"override {key}={raw!r}: {e}") from None


def _parse_like(old: Any, raw: str, key: str) -> Any:
  try:
    if isinstance(old, bool):
      if raw.lower() in ("true", "1", "yes"):
        return True
      if raw.lower() in ("false", "0", "no"):
        return False
      raise ValueError
    if isinstance(old, int):
      return int(raw)
    if isinstance(old, float):
      return float(raw)
    if isinstance(old, (tuple, list)):
      items = [s for s in raw.strip("()[]").split(",") if s.strip()]
      items = [s.strip().strip("'\"") for s in items]
      if old or key.endswith(("paths", "extensions")):
        return tuple(type(old[0] if old else "")(s) for s in items)
      try:  # an empty default: numbers if they all parse, else strings
        return tuple(float(s) for s in items)
      except ValueError:
        return tuple(items)
  except ValueError:
    raise ConfigError(f"override {key}={raw!r}: cannot parse as {type(old).__name__}") from None
  return raw


# ------------------------------------------------------------------ validation

DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots", "dots_no_batch")


def validate(config: ml_collections.ConfigDict) -> None:
  """Check every field before anything is built. Raises ConfigError."""
  o, t = config.optim, config.train
  _nonneg_int(config, "seed")
  validate_model(config)
  _validate_mesh(config)
  _validate_dist(config)

  data_config.validate(config)

  # optim
  _float_range(config, "optim.lr", 0, 10, lo_open=True)
  _choice(config, "optim.schedule", ("cosine", "wsd", "constant"))
  _nonneg_int(config, "optim.warmup_steps")
  _pos_int(config, "train.num_steps")
  if o.warmup_steps >= t.num_steps and o.schedule != "constant":
    _fail("optim.warmup_steps", o.warmup_steps, f"must be < train.num_steps={t.num_steps}")
  _float_range(config, "optim.min_lr_ratio", 0, 1)
  _float_range(config, "optim.decay_fraction", 0, 1, lo_open=True)
  _float_range(config, "optim.b1", 0, 1, hi_open=True)
  _float_range(config, "optim.b2", 0, 1, hi_open=True)
  _float_range(config, "optim.eps", 0, 1, lo_open=True)
  _float_range(config, "optim.weight_decay", 0, 10)
  _float_range(config, "optim.grad_clip", 0, 1e9)

  # train
  _pos_int(config, "train.num_steps")
  _pos_int(config, "train.eval_every")
  _nonneg_int(config, "train.eval_batches")
  _pos_int(config, "train.log_every")
  _pos_int(config, "train.checkpoint_every")
  _pos_int(config, "train.keep_checkpoints")
  _choice(config, "train.nan_policy", ("stop", "skip"))
  _float_range(config, "train.peak_flops", 0, 1e20)
  if (isinstance(t.debug_nan_step, bool) or not isinstance(t.debug_nan_step, int)
      or t.debug_nan_step < -1 or t.debug_nan_step == 0):
    _fail("train.debug_nan_step", t.debug_nan_step, "must be -1 (off) or a step >= 1")
  if not isinstance(t.init_from, str):
    _fail("train.init_from", t.init_from, "must be a path string ('' = random init)")
  for f in ("async_checkpoint", "progress_bar", "tensorboard"):
    if not isinstance(t[f], bool):
      _fail(f"train.{f}", t[f], "must be True or False")


def validate_model(config: ml_collections.ConfigDict) -> None:
  """The model section alone (what a model built without data needs, e.g. moejax.hf)."""
  m = config.model
  _nonneg_int(config, "model.vocab_size")
  for f in ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff"):
    _pos_int(config, f"model.{f}")
  if m.num_heads % m.num_kv_heads:
    _fail("model.num_kv_heads", m.num_kv_heads,
          f"must divide model.num_heads={m.num_heads} (grouped-query attention)")
  if m.head_dim % 2:
    _fail("model.head_dim", m.head_dim, "must be even (RoPE rotates pairs)")
  _nonneg_int(config, "model.max_seq_len")
  _float_range(config, "model.rope_theta", 0, 1e12, lo_open=True)
  _float_range(config, "model.norm_eps", 0, 1, lo_open=True)
  _float_range(config, "model.init_std", 0, 10, lo_open=True)
  _float_range(config, "model.logits_soft_cap", 0, 1e6)
  _choice(config, "model.param_dtype", DTYPES)
  _choice(config, "model.compute_dtype", DTYPES)
  _choice(config, "model.remat", REMAT)
  if not isinstance(m.tie_embeddings, bool):
    _fail("model.tie_embeddings", m.tie_embeddings, "must be True or False")
  if not isinstance(m.scan_layers, bool):
    _fail("model.scan_layers", m.scan_layers, "must be True or False")

  layers_config.validate(config)
  moe_config.validate(config)
  recursion_config.validate(config)


def _validate_mesh(config) -> None:
  """Static mesh checks (the device count is checked when the mesh is made)."""
  me, m = config.mesh, config.model
  sizes = {}
  for f in ("data", "fsdp", "tensor", "expert"):
    v = me[f]
    if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
      _fail(f"mesh.{f}", v, "must be a positive integer or -1 (the remaining devices)")
    sizes[f] = v
  if sum(v == -1 for v in sizes.values()) > 1:
    _fail("mesh", sizes, "at most one axis may be -1")
  _choice(config, "mesh.expert_dispatch", ("auto", "gspmd", "all_to_all"))
  _choice(config, "mesh.ep_exchange", ("auto", "ragged", "padded"))
  if me.ep_exchange == "ragged":
    import jax  # pylint: disable=g-import-not-at-top  (lazy: this module stays light)
    if jax.default_backend() == "cpu":
      _fail("mesh.ep_exchange", me.ep_exchange, "'auto' or 'padded' on CPU: XLA:CPU does not "
            "implement ragged_all_to_all")
  if isinstance(me.rules, str) or not all(isinstance(r, str) and "=" in r for r in me.rules):
    _fail("mesh.rules", me.rules, "must be a tuple of 'logical_name=mesh_axis' strings")
  from moejax import parallel  # pylint: disable=g-import-not-at-top  (lazy: stays light)
  try:
    parallel.rules_from_config(me)
  except parallel.MeshError as e:
    raise ConfigError(str(e)) from None
  t = sizes["tensor"]
  if t > 1:
    if m.num_heads % t:
      _fail("mesh.tensor", t, f"must divide model.num_heads={m.num_heads}")
    if m.num_kv_heads % t:
      _fail("mesh.tensor", t, f"must divide model.num_kv_heads={m.num_kv_heads}")
    if m.d_ff % t:
      _fail("mesh.tensor", t, f"must divide model.d_ff={m.d_ff}")
  ex = sizes["expert"]
  if ex > 1:
    e = m.moe
    n_exp = e.num_experts * e.granularity
    if not e.num_experts:
      _fail("mesh.expert", ex, "expert parallelism needs an MoE model (model.moe.num_experts > 0)"
            "; use mesh.data or mesh.fsdp for a dense model")
    if n_exp % ex:
      _fail("mesh.expert", ex, f"must divide the number of (segmented) experts {n_exp}")
    if me.expert_dispatch == "all_to_all" and e.router == "expert_choice":
      _fail("mesh.expert_dispatch", me.expert_dispatch,
            "the all_to_all path serves token-choice routers (topk, deepseek, hash); use "
            "'gspmd' (or 'auto', which picks it) for expert choice")
  dp = [v for f, v in sizes.items() if f in ("data", "fsdp", "expert") and v != -1]
  if math.prod(dp) and config.data.batch_size % math.prod(dp):
    _fail("data.batch_size", config.data.batch_size,
          f"must be divisible by mesh data x fsdp x expert = {math.prod(dp)} (the batch is "
          "split over those axes)")


def _validate_dist(config) -> None:
  di = config.dist
  if not isinstance(di.coordinator, str):
    _fail("dist.coordinator", di.coordinator, "must be a 'host:port' string or ''")
  if di.coordinator and ":" not in di.coordinator:
    _fail("dist.coordinator", di.coordinator, "must look like 'host:port'")
  _nonneg_int(config, "dist.num_processes")
  if isinstance(di.process_id, bool) or not isinstance(di.process_id, int) or di.process_id < -1:
    _fail("dist.process_id", di.process_id, "must be -1 (unset) or a process index >= 0")
  if di.num_processes and di.process_id >= di.num_processes:
    _fail("dist.process_id", di.process_id, f"must be < dist.num_processes={di.num_processes}")
  _pos_int(config, "dist.initialization_timeout_s")
  _pos_int(config, "dist.heartbeat_timeout_s")
  if not isinstance(di.auto, bool):
    _fail("dist.auto", di.auto, "must be True or False")
