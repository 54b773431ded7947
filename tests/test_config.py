"""Config loading, overrides and validation (moejax/config.py).

Every invalid config must be rejected by `validate` with a ConfigError that names the
field and the value, and `train()` must reject it before anything is compiled.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from moejax.config import ConfigError, apply_override, base_config, load_config, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")
MISSING = os.path.join(REPO, "no", "such", "path_for_moejax_tests")


def _runlocal():
  return load_config(f"{QUICKSTART}:runlocal")


def _untyped(config):
  """A copy without ml_collections' type safety, so wrong types can be planted."""
  return ml_collections.ConfigDict(config.to_dict(), type_safe=False)


def _set(**fields):
  """Mutator setting dotted fields: _set(**{"model.d_model": 0})."""
  def mutate(c):
    for dotted, value in fields.items():
      *parents, leaf = dotted.split(".")
      node = c
      for p in parents:
        node = node[p]
      node[leaf] = value
  return mutate


# (id, mutation of the runlocal config, field the error must name, offending value)
# runlocal: d_model 32, 2 layers, 4 heads, 2 kv heads, head_dim 8, seq_len 32, 20 steps.
INVALID = [
    ("kv_heads_not_dividing", _set(**{"model.num_kv_heads": 3}), "model.num_kv_heads", 3),
    ("odd_head_dim", _set(**{"model.head_dim": 7}), "model.head_dim", 7),
    ("zero_d_model", _set(**{"model.d_model": 0}), "model.d_model", 0),
    ("negative_num_layers", _set(**{"model.num_layers": -2}), "model.num_layers", -2),
    ("zero_d_ff", _set(**{"model.d_ff": 0}), "model.d_ff", 0),
    ("float_num_heads", _set(**{"model.num_heads": 4.0}), "model.num_heads", 4.0),
    ("bool_d_model", _set(**{"model.d_model": True}), "model.d_model", True),
    ("negative_vocab", _set(**{"model.vocab_size": -1}), "model.vocab_size", -1),
    ("byte_vocab_100", _set(**{"model.vocab_size": 100}), "model.vocab_size", 100),
    ("max_seq_len_below_seq_len", _set(**{"model.max_seq_len": 16}), "model.max_seq_len", 16),
    ("zero_rope_theta", _set(**{"model.rope_theta": 0.0}), "model.rope_theta", 0.0),
    ("negative_norm_eps", _set(**{"model.norm_eps": -1e-6}), "model.norm_eps", -1e-6),
    ("zero_init_std", _set(**{"model.init_std": 0.0}), "model.init_std", 0.0),
    ("negative_soft_cap", _set(**{"model.logits_soft_cap": -1.0}), "model.logits_soft_cap", -1.0),
    ("unknown_compute_dtype", _set(**{"model.compute_dtype": "float64"}),
     "model.compute_dtype", "float64"),
    ("unknown_param_dtype", _set(**{"model.param_dtype": "fp32"}), "model.param_dtype", "fp32"),
    ("unknown_remat", _set(**{"model.remat": "selective"}), "model.remat", "selective"),
    ("tie_embeddings_string", _set(**{"model.tie_embeddings": "true"}),
     "model.tie_embeddings", "true"),
    ("scan_layers_string", _set(**{"model.scan_layers": "False"}), "model.scan_layers", "False"),
    ("unknown_source", _set(**{"data.source": "huggingface"}), "data.source", "huggingface"),
    ("unknown_tokenizer", _set(**{"data.tokenizer": "bpe"}), "data.tokenizer", "bpe"),
    ("spm_without_model", _set(**{"data.tokenizer": "sentencepiece", "data.spm_model": ""}),
     "data.spm_model", ""),
    ("spm_model_missing_file",
     _set(**{"data.tokenizer": "sentencepiece", "data.spm_model": MISSING + ".model"}),
     "data.spm_model", MISSING + ".model"),
    ("tfds_without_name", _set(**{"data.source": "tfds", "data.tfds_name": ""}),
     "data.tfds_name", ""),
    ("data_path_missing", _set(**{"data.paths": (REPO, MISSING)}), "data.paths", MISSING),
    ("val_fraction_zero", _set(**{"data.val_fraction": 0.0}), "data.val_fraction", 0.0),
    ("val_fraction_one", _set(**{"data.val_fraction": 1.0}), "data.val_fraction", 1.0),
    ("zero_seq_len", _set(**{"data.seq_len": 0}), "data.seq_len", 0),
    ("negative_batch_size", _set(**{"data.batch_size": -4}), "data.batch_size", -4),
    ("negative_seed", _set(**{"seed": -1}), "seed", -1),
    ("lr_zero", _set(**{"optim.lr": 0.0}), "optim.lr", 0.0),
    ("lr_negative", _set(**{"optim.lr": -1e-3}), "optim.lr", -1e-3),
    ("lr_nan", _set(**{"optim.lr": float("nan")}), "optim.lr", float("nan")),
    ("lr_string", _set(**{"optim.lr": "3e-3"}), "optim.lr", "3e-3"),
    ("unknown_schedule", _set(**{"optim.schedule": "linear"}), "optim.schedule", "linear"),
    ("warmup_equals_num_steps", _set(**{"optim.warmup_steps": 20}), "optim.warmup_steps", 20),
    ("warmup_above_num_steps", _set(**{"optim.schedule": "wsd", "optim.warmup_steps": 50}),
     "optim.warmup_steps", 50),
    ("b2_one", _set(**{"optim.b2": 1.0}), "optim.b2", 1.0),
    ("b1_negative", _set(**{"optim.b1": -0.1}), "optim.b1", -0.1),
    ("eps_zero", _set(**{"optim.eps": 0.0}), "optim.eps", 0.0),
    ("weight_decay_inf", _set(**{"optim.weight_decay": float("inf")}),
     "optim.weight_decay", float("inf")),
    ("grad_clip_negative", _set(**{"optim.grad_clip": -1.0}), "optim.grad_clip", -1.0),
    ("decay_fraction_zero", _set(**{"optim.decay_fraction": 0.0}), "optim.decay_fraction", 0.0),
    ("min_lr_ratio_above_one", _set(**{"optim.min_lr_ratio": 1.5}), "optim.min_lr_ratio", 1.5),
    ("zero_num_steps", _set(**{"train.num_steps": 0}), "train.num_steps", 0),
    ("zero_eval_every", _set(**{"train.eval_every": 0}), "train.eval_every", 0),
    ("zero_keep_checkpoints", _set(**{"train.keep_checkpoints": 0}), "train.keep_checkpoints", 0),
    ("unknown_nan_policy", _set(**{"train.nan_policy": "ignore"}), "train.nan_policy", "ignore"),
    ("negative_peak_flops", _set(**{"train.peak_flops": -1.0}), "train.peak_flops", -1.0),
    ("debug_nan_step_zero", _set(**{"train.debug_nan_step": 0}), "train.debug_nan_step", 0),
    ("debug_nan_step_below_minus_one", _set(**{"train.debug_nan_step": -5}),
     "train.debug_nan_step", -5),
    ("debug_nan_step_bool", _set(**{"train.debug_nan_step": True}), "train.debug_nan_step", True),
    ("tensorboard_string", _set(**{"train.tensorboard": "no"}), "train.tensorboard", "no"),
    ("async_checkpoint_int", _set(**{"train.async_checkpoint": 1}), "train.async_checkpoint", 1),
    ("progress_bar_none", _set(**{"train.progress_bar": None}), "train.progress_bar", None),
]


def test_enough_distinct_invalid_cases():
  assert len({case[0] for case in INVALID}) == len(INVALID) >= 22
  assert len({case[2] for case in INVALID}) >= 22  # distinct fields, not one field 22 ways


def test_runlocal_config_is_valid_and_the_cases_start_from_it():
  c = _runlocal()
  validate(c)
  validate(_untyped(c))  # the untyped copy alone is not what makes the cases fail
  m = c.model
  assert (m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim) == (32, 2, 4, 2, 8)
  assert (c.data.seq_len, c.train.num_steps, c.optim.schedule) == (32, 20, "cosine")


@pytest.mark.parametrize("mutate,field,value", [c[1:] for c in INVALID],
                         ids=[c[0] for c in INVALID])
def test_validate_rejects(mutate, field, value):
  c = _untyped(_runlocal())
  mutate(c)
  with pytest.raises(ConfigError) as err:
    validate(c)
  msg = str(err.value)
  assert isinstance(err.value, ValueError)
  # field, value and what is allowed, e.g. "config.model.num_kv_heads = 3 is not allowed: ..."
  assert msg.startswith(f"config.{field} = {value!r} is not allowed: "), msg
  assert len(msg.split("is not allowed: ", 1)[1]) > 8, msg


@pytest.mark.parametrize("field,value,allowed_fragment", [
    ("model.remat", "selective", "dots_no_batch"),
    ("model.compute_dtype", "float64", "bfloat16"),
    ("optim.schedule", "linear", "wsd"),
    ("train.nan_policy", "ignore", "skip"),
    ("data.tokenizer", "bpe", "sentencepiece"),
])
def test_choice_errors_list_the_allowed_values(field, value, allowed_fragment):
  c = _untyped(_runlocal())
  _set(**{field: value})(c)
  with pytest.raises(ConfigError, match=allowed_fragment):
    validate(c)


def test_constant_schedule_allows_long_warmup_and_boundaries_are_valid():
  c = _runlocal()
  c.optim.schedule, c.optim.warmup_steps = "constant", 50  # warmup unused by 'constant'
  validate(c)
  c = _runlocal()
  c.optim.warmup_steps = 19  # < num_steps=20
  c.model.max_seq_len = c.data.seq_len
  c.model.vocab_size = 257  # the byte tokenizer's own size
  c.optim.b1, c.optim.min_lr_ratio, c.optim.grad_clip = 0.0, 1.0, 0.0
  c.train.debug_nan_step = 1
  c.data.paths = (QUICKSTART,)
  validate(c)


@pytest.mark.parametrize("preset", ["", "runlocal"])
def test_quickstart_presets_validate(preset):
  c = load_config(f"{QUICKSTART}:{preset}" if preset else QUICKSTART)
  validate(c)
  assert c.name == "quickstart"
  if preset == "runlocal":
    assert c.train.num_steps == 20 and c.model.d_model == 32
  else:
    assert c.train.num_steps == 600 and c.model.d_model == 128


def test_quickstart_parameter_count_matches_its_docstring():
  from moejax import flops
  from moejax.data.tokenizers import ByteTokenizer
  from moejax.models.lm import LMConfig
  c = load_config(QUICKSTART)
  mc = LMConfig.from_config(c.model, seq_len=c.data.seq_len, vocab_size=ByteTokenizer.vocab_size)
  assert mc.vocab_size == 264  # 257 rounded up to a multiple of 8
  assert mc.max_seq_len == c.data.seq_len == 128
  total = flops.account(mc, c.data.seq_len).total_params
  assert 0.80e6 < total < 0.84e6, total  # "a ~0.82M-parameter byte-level decoder LM"


def test_base_config_has_the_documented_sections():
  c = base_config()
  assert set(c.keys()) == {"name", "seed", "model", "mesh", "dist", "data", "optim", "train"}
  assert set(c.model.keys()) >= {"moe", "recursion"}
  assert c.model.vocab_size == 0 and c.model.max_seq_len == 0  # taken from tokenizer / data


# ------------------------------------------------------------------ overrides

def test_overrides_parse_with_the_field_type():
  c = load_config(f"{QUICKSTART}:runlocal", [
      "--config.model.num_layers=3", "--config.optim.lr=0.01", "--config.train.tensorboard=false",
      "--config.model.scan_layers=False", "--config.data.extensions=.py,.txt",
      "--config.model.remat=dots", "name=renamed"])
  assert c.model.num_layers == 3 and type(c.model.num_layers) is int
  assert c.optim.lr == 0.01 and type(c.optim.lr) is float
  assert c.train.tensorboard is False
  assert c.model.scan_layers is False
  assert c.data.extensions == (".py", ".txt")
  assert c.model.remat == "dots"
  assert c.name == "renamed"
  assert c.model.d_model == 32  # the preset itself is untouched
  validate(c)


@pytest.mark.parametrize("raw,expected", [("true", True), ("1", True), ("yes", True),
                                          ("False", False), ("0", False), ("no", False)])
def test_bool_override_spellings(raw, expected):
  c = base_config()
  apply_override(c, f"train.progress_bar={raw}")
  assert c.train.progress_bar is expected


def test_float_override_accepts_an_integer_literal():
  c = base_config()
  apply_override(c, "optim.lr=1")
  assert c.optim.lr == 1.0 and type(c.optim.lr) is float


def test_nan_override_parses_but_validate_rejects_it():
  c = base_config()
  apply_override(c, "--config.optim.lr=nan")
  assert math.isnan(c.optim.lr)
  with pytest.raises(ConfigError, match=r"config\.optim\.lr = nan"):
    validate(c)


@pytest.mark.parametrize("override,pattern", [
    ("--config.model.num_layerz=3", r"model\.num_layerz.*unknown field.*num_layers"),
    ("--config.modle.d_model=3", r"no config section 'modle'"),
    ("--config.model.num_layers=3.5", r"model\.num_layers='3\.5'.*cannot parse as int"),
    ("--config.model.num_layers=three", r"cannot parse as int"),
    ("--config.optim.lr=fast", r"optim\.lr='fast'.*cannot parse as float"),
    ("--config.train.tensorboard=maybe", r"train\.tensorboard='maybe'.*cannot parse as bool"),
    ("--config.model.d_model", r"must look like field\.sub=value"),
])
def test_bad_overrides_raise_helpful_config_errors(override, pattern):
  with pytest.raises(ConfigError, match=pattern):
    load_config(f"{QUICKSTART}:runlocal", [override])


def test_unknown_preset_arg_raises_naming_the_allowed_ones():
  with pytest.raises(ValueError, match=r"unknown arg 'tiny'.*runlocal"):
    load_config(f"{QUICKSTART}:tiny")


def test_missing_config_file_and_file_without_get_config(tmp_path):
  with pytest.raises(ConfigError, match="does not exist"):
    load_config(str(tmp_path / "nope.py"))
  p = tmp_path / "empty_cfg.py"
  p.write_text("X = 1\n")
  with pytest.raises(ConfigError, match="no get_config"):
    load_config(str(p))


def test_config_file_without_arg_calls_get_config_with_no_args(tmp_path):
  p = tmp_path / "cfg.py"
  p.write_text("from moejax.config import base_config\n"
               "def get_config(arg='default'):\n"
               "  c = base_config()\n  c.name = arg\n  return c\n")
  assert load_config(str(p)).name == "default"
  assert load_config(f"{p}:other", ["model.d_model=64"]).name == "other"
  assert load_config(f"{p}:other", ["model.d_model=64"]).model.d_model == 64


# ------------------------------------------------------------- before compiling

def test_config_module_imports_nothing_heavy():
  code = ("import sys, moejax.config; "
          "heavy = [m for m in ('jax', 'flax', 'optax', 'orbax', 'tensorflow', 'grain') "
          "if m in sys.modules]; print(heavy); assert not heavy, heavy")
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 0, r.stdout + r.stderr


class _CompileCounter:
  """Counts XLA backend compilations through jax.monitoring."""

  def __init__(self):
    self.count = 0

  def _listener(self, event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)


def test_compile_counter_sees_compilations():
  with _CompileCounter() as counter:
    jax.jit(lambda x: jnp.sin(x) * 3.25 + 0.5)(jnp.arange(7.0)).block_until_ready()
  assert counter.count >= 1


@pytest.mark.parametrize("case", ["kv_heads_not_dividing", "unknown_remat", "lr_nan",
                                  "data_path_missing"])
def test_train_rejects_bad_config_before_compiling_or_writing(case, tmp_path):
  from moejax.train import loop
  _, mutate, field, _ = next(c for c in INVALID if c[0] == case)
  config = _untyped(_runlocal())
  mutate(config)
  workdir = tmp_path / "run"
  with _CompileCounter() as counter:
    with pytest.raises(ConfigError, match=rf"config\.{field} = "):
      loop.train(config, str(workdir))
  assert counter.count == 0
  assert not workdir.exists()
  assert not (workdir / "checkpoints").exists()


def test_cli_reports_bad_config_as_usage_error(tmp_path, capsys):
  from moejax.train import loop
  with _CompileCounter() as counter:
    rc = loop.main(["--config", f"{QUICKSTART}:runlocal", "--workdir", str(tmp_path / "run"),
                    "--config.model.num_kv_heads=3"])
  assert rc == 2
  assert counter.count == 0
  assert "config.model.num_kv_heads = 3" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()


# ------------------------------------------------------ known gaps (library bugs)

@pytest.mark.parametrize("fields", [{"train.num_steps": "20"},
                                    {"model.max_seq_len": 64, "data.seq_len": "32"}],
                         ids=["num_steps_string", "seq_len_string"])
def test_wrong_types_give_config_error_not_type_error(fields):
  c = _untyped(_runlocal())
  _set(**fields)(c)
  with pytest.raises(ConfigError):
    validate(c)


@pytest.mark.parametrize("override", ["--config.model=3", "--config.model.d_model.x=2"])
def test_override_of_a_section_or_through_a_leaf_is_a_config_error(override):
  with pytest.raises(ConfigError):
    apply_override(base_config(), override)


def test_misspelled_field_in_config_file_is_rejected(tmp_path):
  path = tmp_path / "typo.py"
  path.write_text("from moejax.config import base_config\n"
                  "def get_config(arg=''):\n"
                  "  c = base_config()\n"
                  "  c.model.d_fff = 3\n"
                  "  return c\n")
  with pytest.raises(ConfigError, match="d_fff"):
    load_config(str(path))
