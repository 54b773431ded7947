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


class ConfigError(ValueError):
  """A config value that is not allowed. The message names field, value, allowed."""


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

  e = m.moe = ml_collections.ConfigDict()
  e.num_experts = 0  # routed experts before fine-grained segmentation; 0 = dense model
  e.experts_per_token = 2  # k before segmentation
  e.granularity = 1  # m: m*N experts of width expert_d_ff/m, m*k active (DeepSeekMoE)
  e.expert_d_ff = 0  # width of one unsegmented expert; 0 -> model.d_ff
  e.num_shared_experts = 0  # K_s shared experts (segmented width), see every token
  e.router = "topk"  # topk | deepseek | expert_choice | hash
  e.renormalize = True  # topk: renormalise the k chosen probabilities
  e.jitter = 0.0  # topk: multiplicative input noise in training (Switch)
  e.route_scale = 1.0  # deepseek
  e.n_groups = 1  # deepseek group-limited routing
  e.topk_groups = 1
  e.bias_update_rate = 0.0  # deepseek aux-loss-free balancing (gamma); 0 = off
  e.load_balance_coef = 0.01  # Switch loss alpha
  e.z_loss_coef = 1e-3  # ST-MoE router z-loss beta
  e.seq_balance_coef = 0.0  # DeepSeek sequence-wise balance loss
  e.backend = "dropless"  # reference | capacity | dropless | dropless_* variants
  e.capacity_factor = 1.25  # capacity backend (training) / expert choice
  e.eval_capacity_factor = 2.0  # capacity backend at evaluation
  e.min_capacity = 4
  e.moe_every = 1  # MoE FFN every n-th layer (after the first dense ones)
  e.first_dense = 0  # the first k layers keep a dense FFN
  e.allow_noncausal = False  # must be True to use expert_choice in a causal LM

  r = m.recursion = ml_collections.ConfigDict()
  # L = model.num_layers effective layers from U unique layers looped R = num_loops times.
  r.strategy = "none"  # none | cycle | sequence | middle_cycle | middle_sequence
  r.num_loops = 1  # R; >= 2 with a strategy
  r.unshared_norms = False  # WideNet: each loop keeps its own RMSNorm scales
  r.lora_rank = 0  # relaxed recursion: per-loop LoRA on attention and dense FFN; 0 = off
  r.lora_alpha = 0.0  # LoRA scale alpha / rank; 0 -> alpha = rank (scale 1)
  r.router = "none"  # Mixture-of-Recursions: none | expert | token
  r.capacities = ()  # per-step kept fraction, e.g. (1.0, 0.67, 0.33); () = all 1.0
  r.gate = "sigmoid"  # sigmoid | tanh | none: the router weight on a step's update
  r.gate_alpha = 1.0
  r.aux = "bce"  # expert: bce (router learns top-k membership) | causal_router
  r.aux_coef = 0.1
  r.threshold = 0.5  # expert, inference: a token goes on while its router prob > threshold
  r.eval_routing = "threshold"  # expert, eval: threshold (causal) | topk (non-causal)
  r.balance = "loss"  # token: loss | bias (loss-free) | none
  r.balance_coef = 0.01
  r.bias_update_rate = 1e-3
  r.z_loss_coef = 1e-3  # token router z-loss
  r.dispatch = "gather"  # gather (kept tokens only: saves compute) | mask (reference)
  r.kv_sharing = False  # every step attends to the first recursion's K/V
  r.eval_loops = 0  # inference depth: run only this many loops (0 = num_loops)
  r.kv_cache_fractions = ()  # decoding: slots per step as a fraction of max_seq_len; () = 1.0

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

  d = c.data = ml_collections.ConfigDict()
  d.source = "embedded"  # embedded | tfds
  d.paths = ()  # embedded: files/folders; empty -> standard library of this Python
  d.extensions = (".py",)  # embedded: file suffixes to read from folders; () = all
  d.val_fraction = 0.05  # embedded: fraction of files held out (hash of path)
  d.tfds_name = ""  # tfds: e.g. "tiny_shakespeare", "lm1b"
  d.tfds_data_dir = ""  # tfds: where the prepared dataset lives
  d.text_key = "text"
  d.train_split = "train"
  d.val_split = "validation"
  d.tokenizer = "byte"  # byte | sentencepiece
  d.spm_model = ""
  d.seq_len = 256
  d.batch_size = 16
  d.shuffle_seed = 0
  d.cache_dir = ""  # prepared embedded dataset; "" -> ~/.cache/moejax
  d.max_documents = 0  # 0: all

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


def _fail(field: str, value: Any, allowed: str):
  raise ConfigError(f"config.{field} = {value!r} is not allowed: {allowed}")


def _pos_int(c, field):
  v = _get(c, field)
  if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
    _fail(field, v, "must be a positive integer")


def _nonneg_int(c, field):
  v = _get(c, field)
  if not isinstance(v, int) or isinstance(v, bool) or v < 0:
    _fail(field, v, "must be an integer >= 0")


def _get(c, field):
  node = c
  for p in field.split("."):
    node = node[p]
  return node


def _choice(c, field, allowed):
  v = _get(c, field)
  if v not in allowed:
    _fail(field, v, f"must be one of {list(allowed)}")


def _float_range(c, field, lo, hi, lo_open=False, hi_open=False):
  v = _get(c, field)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    _fail(field, v, "must be a finite number")
  bad = (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi)
  if bad:
    lb = "(" if lo_open else "["
    rb = ")" if hi_open else "]"
    _fail(field, v, f"must lie in {lb}{lo}, {hi}{rb}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Check every field before anything is built. Raises ConfigError."""
  m, d, o, t = config.model, config.data, config.optim, config.train
  _nonneg_int(config, "seed")

  # model
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

  _validate_moe(config)
  _validate_recursion(config)
  _validate_mesh(config)
  _validate_dist(config)

  # data
  _choice(config, "data.source", ("embedded", "tfds"))
  for f in ("paths", "extensions"):
    if isinstance(d[f], str) or not all(isinstance(x, str) for x in d[f]):
      _fail(f"data.{f}", d[f], "must be a tuple of strings")
  for f in ("spm_model", "tfds_name", "tfds_data_dir", "cache_dir", "text_key"):
    if not isinstance(d[f], str):
      _fail(f"data.{f}", d[f], "must be a string")
  _choice(config, "data.tokenizer", ("byte", "sentencepiece"))
  if d.tokenizer == "sentencepiece" and not d.spm_model:
    _fail("data.spm_model", d.spm_model, "a path to a sentencepiece .model file is required "
          "when data.tokenizer='sentencepiece'")
  if d.tokenizer == "sentencepiece" and not os.path.exists(d.spm_model):
    _fail("data.spm_model", d.spm_model, "file does not exist")
  if d.source == "tfds" and not d.tfds_name:
    _fail("data.tfds_name", d.tfds_name, "a TFDS dataset name is required when data.source='tfds'")
  if d.source == "embedded":
    for p in d.paths:
      if not os.path.exists(p):
        _fail("data.paths", p, "every path must be an existing file or folder")
  _float_range(config, "data.val_fraction", 0, 1, lo_open=True, hi_open=True)
  _pos_int(config, "data.seq_len")
  if m.max_seq_len and m.max_seq_len < d.seq_len:
    _fail("model.max_seq_len", m.max_seq_len, f"must be 0 or >= data.seq_len={d.seq_len}")
  _pos_int(config, "data.batch_size")
  _nonneg_int(config, "data.shuffle_seed")
  _nonneg_int(config, "data.max_documents")
  if m.vocab_size and d.tokenizer == "byte" and m.vocab_size < 257:
    _fail("model.vocab_size", m.vocab_size, "must be 0 or >= 257 for the byte tokenizer")

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
  for f in ("async_checkpoint", "progress_bar", "tensorboard"):
    if not isinstance(t[f], bool):
      _fail(f"train.{f}", t[f], "must be True or False")


MOE_ROUTERS = ("topk", "deepseek", "expert_choice", "hash")


def _validate_moe(config) -> None:
  m, e = config.model, config.model.moe
  _nonneg_int(config, "model.moe.num_experts")
  if not e.num_experts:
    return
  from moejax.moe.dispatch import BACKENDS  # light module, no compilation
  for f in ("experts_per_token", "granularity", "moe_every", "min_capacity"):
    _pos_int(config, f"model.moe.{f}")
  for f in ("expert_d_ff", "num_shared_experts", "first_dense", "n_groups", "topk_groups"):
    _nonneg_int(config, f"model.moe.{f}")
  _choice(config, "model.moe.router", MOE_ROUTERS)
  _choice(config, "model.moe.backend", BACKENDS)
  if e.experts_per_token > e.num_experts:
    _fail("model.moe.experts_per_token", e.experts_per_token,
          f"must be <= model.moe.num_experts={e.num_experts}")
  if e.experts_per_token * e.granularity - e.num_shared_experts < 1:
    _fail("model.moe.num_shared_experts", e.num_shared_experts,
          "must be < experts_per_token * granularity (each shared expert replaces one "
          "routed segment, DeepSeekMoE-style)")
  width = e.expert_d_ff or m.d_ff
  if width % e.granularity:
    _fail("model.moe.granularity", e.granularity,
          f"must divide the expert width {width} (model.moe.expert_d_ff or model.d_ff)")
  if e.first_dense >= m.num_layers:
    _fail("model.moe.first_dense", e.first_dense, f"must be < model.num_layers={m.num_layers}")
  if (m.num_layers - e.first_dense) % e.moe_every:
    _fail("model.moe.moe_every", e.moe_every,
          f"must divide model.num_layers - model.moe.first_dense = "
          f"{m.num_layers - e.first_dense}")
  n_exp = e.num_experts * e.granularity
  if e.router == "deepseek" and e.n_groups > 1:
    if n_exp % e.n_groups:
      _fail("model.moe.n_groups", e.n_groups,
            f"must divide the number of (segmented) experts {n_exp}")
    if not 1 <= e.topk_groups <= e.n_groups:
      _fail("model.moe.topk_groups", e.topk_groups, f"must lie in [1, n_groups={e.n_groups}]")
    if e.topk_groups * (n_exp // e.n_groups) < e.experts_per_token * e.granularity - e.num_shared_experts:
      _fail("model.moe.topk_groups", e.topk_groups,
            "the kept groups must hold at least k (segmented) experts")
  if e.router == "expert_choice" and not e.allow_noncausal:
    _fail("model.moe.router", e.router,
          "expert choice looks at every token of a sequence, so it leaks the future in a "
          "causal LM; set model.moe.allow_noncausal=True to use it for encoder-style analysis")
  if e.router == "hash" and e.experts_per_token != 1:
    _fail("model.moe.experts_per_token", e.experts_per_token, "hash routing uses exactly 1")
  if e.bias_update_rate and e.router != "deepseek":
    _fail("model.moe.bias_update_rate", e.bias_update_rate,
          "aux-loss-free bias balancing needs model.moe.router='deepseek'")
  for f in ("jitter",):
    _float_range(config, f"model.moe.{f}", 0, 1, hi_open=True)
  for f in ("route_scale", "capacity_factor", "eval_capacity_factor"):
    _float_range(config, f"model.moe.{f}", 0, 1e6, lo_open=True)
  for f in ("bias_update_rate", "load_balance_coef", "z_loss_coef", "seq_balance_coef"):
    _float_range(config, f"model.moe.{f}", 0, 1e3)
  for f in ("renormalize", "allow_noncausal"):
    if not isinstance(e[f], bool):
      _fail(f"model.moe.{f}", e[f], "must be True or False")


RECURSION_STRATEGIES = ("none", "cycle", "sequence", "middle_cycle", "middle_sequence")


def _floats(c, field, lo, hi, length):
  v = _get(c, field)
  if isinstance(v, str) or not isinstance(v, (tuple, list)) or (v and len(v) != length):
    _fail(field, v, f"must be () or a tuple of {length} numbers (one per loop)")
  for x in v:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not lo < x <= hi:
      _fail(field, v, f"every entry must lie in ({lo}, {hi}]")


def _validate_recursion(config) -> None:
  m, r = config.model, config.model.recursion
  _choice(config, "model.recursion.strategy", RECURSION_STRATEGIES)
  _pos_int(config, "model.recursion.num_loops")
  _choice(config, "model.recursion.router", ("none", "expert", "token"))
  if r.strategy == "none":
    for f, default in (("num_loops", 1), ("router", "none"), ("lora_rank", 0),
                       ("unshared_norms", False), ("kv_sharing", False)):
      if r[f] != default:
        _fail(f"model.recursion.{f}", r[f],
              "needs a sharing strategy: set model.recursion.strategy to one of "
              f"{list(RECURSION_STRATEGIES[1:])}")
    return
  big_r, layers = r.num_loops, m.num_layers
  if big_r < 2:
    _fail("model.recursion.num_loops", big_r, "must be >= 2 with a sharing strategy")
  if r.strategy.startswith("middle"):
    if layers < 2 + big_r or (layers - 2) % big_r:
      _fail("model.num_layers", layers,
            f"{r.strategy} keeps the first and last layers unique, so model.num_layers - 2 "
            f"must be a positive multiple of model.recursion.num_loops={big_r}")
  elif layers % big_r:
    _fail("model.num_layers", layers,
          f"must be a multiple of model.recursion.num_loops={big_r} for {r.strategy}")
  _nonneg_int(config, "model.recursion.lora_rank")
  _float_range(config, "model.recursion.lora_alpha", 0, 1e6)
  for f in ("unshared_norms", "kv_sharing"):
    if not isinstance(r[f], bool):
      _fail(f"model.recursion.{f}", r[f], "must be True or False")
  _choice(config, "model.recursion.gate", ("sigmoid", "tanh", "none"))
  _choice(config, "model.recursion.aux", ("bce", "causal_router"))
  _choice(config, "model.recursion.eval_routing", ("threshold", "topk"))
  _choice(config, "model.recursion.balance", ("loss", "bias", "none"))
  _choice(config, "model.recursion.dispatch", ("gather", "mask"))
  _float_range(config, "model.recursion.gate_alpha", 0, 1e3, lo_open=True)
  _float_range(config, "model.recursion.threshold", 0, 1, lo_open=True, hi_open=True)
  for f in ("aux_coef", "balance_coef", "bias_update_rate", "z_loss_coef"):
    _float_range(config, f"model.recursion.{f}", 0, 1e3)
  _nonneg_int(config, "model.recursion.eval_loops")
  if r.eval_loops > big_r:
    _fail("model.recursion.eval_loops", r.eval_loops, f"must lie in [0, num_loops={big_r}]")
  _floats(config, "model.recursion.capacities", 0.0, 1.0, big_r)
  _floats(config, "model.recursion.kv_cache_fractions", 0.0, 1.0, big_r)
  looped = r.strategy in ("cycle", "middle_cycle")
  if r.router != "none" and not looped:
    _fail("model.recursion.router", r.router,
          "Mixture-of-Recursions routes tokens between loops of the whole shared block, so "
          "it needs model.recursion.strategy = 'cycle' or 'middle_cycle'")
  if r.kv_sharing and not looped:
    _fail("model.recursion.kv_sharing", r.kv_sharing,
          "needs model.recursion.strategy = 'cycle' or 'middle_cycle'")
  if r.capacities and r.router == "none":
    _fail("model.recursion.capacities", r.capacities,
          "capacities need a recursion router (model.recursion.router = 'expert' or 'token')")
  if r.router == "expert" and r.capacities and any(
      a < b for a, b in zip(r.capacities, r.capacities[1:])):
    _fail("model.recursion.capacities", r.capacities,
          "expert-choice routing is hierarchical (only a step's survivors go on), so the "
          "capacities must not increase")
  if r.bias_update_rate and r.balance == "bias" and r.router != "token":
    _fail("model.recursion.balance", r.balance, "loss-free bias balancing is for router='token'")


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
    import jax  # pylint: disable=g-import-not-at-top
    if jax.default_backend() == "cpu":
      _fail("mesh.ep_exchange", me.ep_exchange, "'auto' or 'padded' on CPU: XLA:CPU does not "
            "implement ragged_all_to_all")
  if isinstance(me.rules, str) or not all(isinstance(r, str) and "=" in r for r in me.rules):
    _fail("mesh.rules", me.rules, "must be a tuple of 'logical_name=mesh_axis' strings")
  from moejax import parallel  # pylint: disable=g-import-not-at-top
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
