"""Meshes, sharding rules and sharded training on 8 simulated CPU devices.

A sharded train step must equal the single-device step (loss and updated parameters);
parameter shards must have the shapes the rules promise; a checkpoint must move between
meshes exactly; bad meshes are rejected before anything compiles.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import parallel
from moejax.config import ConfigError, base_config, load_config, validate
from moejax.models.lm import LM, LMConfig
from moejax.train.loop import Sharded, build_model, init_state, state_shardings
from moejax.train.optimizer import make_optimizer
from moejax.train.steps import make_train_step


def mesh_cfg(**sizes):
  c = base_config().mesh
  c.unlock()
  for a in parallel.AXES:
    c[a] = sizes.get(a, 1)
  return c


# ------------------------------------------------------------------ mesh and rules

def test_mesh_shape_fills_the_free_axis_and_checks_the_product():
  assert parallel.mesh_shape(None, 8) == {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}
  assert parallel.mesh_shape(mesh_cfg(data=-1, tensor=2), 8)["data"] == 4
  with pytest.raises(parallel.MeshError, match="multiply to 4 but there are 8"):
    parallel.mesh_shape(mesh_cfg(data=2, fsdp=2), 8)
  with pytest.raises(parallel.MeshError, match="must divide the 8 devices"):
    parallel.mesh_shape(mesh_cfg(data=-1, tensor=3), 8)
  mesh = parallel.make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
  assert parallel.batch_axes(mesh) == ("data", "fsdp")
  assert parallel.data_parallel_size(mesh) == 4


def test_rules_overrides():
  c = mesh_cfg()
  c.rules = ("vocab=", "embed=fsdp+tensor")
  rules = dict(parallel.rules_from_config(c))
  assert rules["vocab"] is None and rules["embed"] == ("fsdp", "tensor")
  c.rules = ("vocab=model",)
  with pytest.raises(parallel.MeshError, match="'model' is not one of"):
    parallel.rules_from_config(c)


@pytest.mark.parametrize("fields,bad", [
    (dict(tensor=3), "mesh.tensor"),  # does not divide 4 heads
    (dict(tensor=0), "mesh.tensor"),
    (dict(data=-1, fsdp=-1), "mesh"),
    (dict(expert=2), "mesh.expert"),  # dense model
    (dict(data=3), "data.batch_size"),  # 16 % 3
    (dict(expert_dispatch="magic"), "mesh.expert_dispatch"),
    (dict(rules=("embed",)), "mesh.rules"),
    (dict(rules=("embed=model",)), "mesh.rules"),
])
def test_bad_mesh_configs_name_the_field(fields, bad):
  c = base_config()
  for k, v in fields.items():
    c.mesh[k] = v
  with pytest.raises(ConfigError, match=bad.replace(".", r"\.")):
    validate(c)


def test_experts_must_split_over_the_expert_axis():
  c = base_config()
  c.model.moe.num_experts = 6
  c.mesh.expert = 4
  with pytest.raises(ConfigError, match=r"mesh\.expert.*experts 6"):
    validate(c)


def test_indivisible_parameter_is_named_before_compiling():
  c = base_config()
  c.model.d_model = 36  # fsdp 8 cannot split 36
  c.mesh.data, c.mesh.fsdp = 1, 8
  validate(c)
  model, _ = build_model(c, 257)
  tx, _ = make_optimizer(c.optim, 10)
  mesh = parallel.make_mesh(c.mesh)
  with pytest.raises(parallel.MeshError, match=r"\['embed'\]\['embedding'\].*36.*fsdp"):
    state_shardings(model, tx, 0, 16, mesh, parallel.RULES)


# ------------------------------------------------------------------ sharded == single device

def small(config_file: str, overrides=()):
  c = load_config(config_file, overrides)
  c.data.seq_len, c.data.batch_size = 16, 8
  return c


# MoE cases use the all_to_all expert-parallel dispatch with room for every assignment
# (capacity factor 8), so they must equal single-device dropless dispatch exactly.
NO_DROP = ["model.moe.capacity_factor=8.0"]
CASES = {
    "dense_dp2_fsdp2_tp2": ("configs/quickstart.py:runlocal", [], dict(data=2, fsdp=2, tensor=2)),
    "moe_dp2_ep4": ("configs/moe/gshard_top2.py:runlocal", NO_DROP, dict(data=2, expert=4)),
    "moe_fsdp2_tp2_ep2": pytest.param(("configs/moe/deepseek.py:runlocal", NO_DROP,
                                       dict(fsdp=2, tensor=2, expert=2)), marks=pytest.mark.slow),
    "moe_gspmd_dp2_ep4": pytest.param(  # also compiled in test_expert_parallel's HLO check
        ("configs/moe/gshard_top2.py:runlocal", ["mesh.expert_dispatch=gspmd"],
         dict(data=2, expert=4)), marks=pytest.mark.slow),
    "mor_fsdp4_tp2": ("configs/recursion/mor_expert.py:runlocal", [], dict(fsdp=4, tensor=2)),
}


def run_step(config, mesh, state=None):
  """One train step on `mesh`; `state` (else a fresh init) is moved onto its shardings."""
  rules = parallel.rules_from_config(config.mesh)
  model, mc = build_model(config, 257)
  tx, _ = make_optimizer(config.optim, 10)
  sh = state_shardings(model, tx, config.seed, config.data.seq_len, mesh, rules)
  if state is None:
    state = Sharded(lambda: init_state(model, tx, config.seed, config.data.seq_len), mesh,
                    rules, out_shardings=sh)()
  else:
    state = jax.device_put(state.replace(tx=tx), sh)  # this run's optimizer object
  rng = np.random.default_rng(0)
  batch = {k: jnp.asarray(rng.integers(0, 257, (8, 16)), jnp.int32)
           for k in ("inputs", "targets")}
  bsh = parallel.batch_sharding(mesh, rules)
  batch = jax.device_put(batch, bsh)
  step = Sharded(make_train_step(LM(mc, deterministic=False),
                                 bias_update_rate=mc.moe.bias_update_rate if mc.moe else 0.0),
                 mesh, rules, in_shardings=(sh, bsh), out_shardings=(sh, None))
  new, metrics = step(state, batch)
  return new, metrics, step, (state, batch)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_sharded_step_equals_single_device(case):
  path, overrides, sizes = case
  config = small(path, overrides)
  single = parallel.make_mesh(None, jax.devices()[:1])
  ref, ref_m, _, (start, _) = run_step(config, single)
  for k, v in sizes.items():
    config.mesh[k] = v
  config.mesh.data = sizes.get("data", 1)
  validate(config)
  mesh = parallel.make_mesh(config.mesh)
  got, got_m, _, _ = run_step(config, mesh, state=start)
  np.testing.assert_allclose(got_m["loss"], ref_m["loss"], rtol=1e-5)
  np.testing.assert_allclose(got_m["grad_norm"], ref_m["grad_norm"], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       atol=2e-6, rtol=1e-4),
               got.params, ref.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       atol=1e-6, rtol=1e-4),
               got.model_state, ref.model_state)
  # the parameters really are sharded as the rules say
  emb = got.params["embed"]["embedding"]
  fsdp = mesh.shape["fsdp"]
  tp = mesh.shape["tensor"]
  assert emb.sharding.shard_shape(emb.shape) == (emb.shape[0] // tp, emb.shape[1] // fsdp)


def test_expert_weights_are_split_over_the_expert_axis():
  config = small("configs/moe/gshard_top2.py:runlocal")
  config.mesh.data, config.mesh.expert, config.mesh.tensor = 1, 4, 2
  validate(config)
  mesh = parallel.make_mesh(config.mesh)
  model, mc = build_model(config, 257)
  tx, _ = make_optimizer(config.optim, 10)
  sh = state_shardings(model, tx, 0, 16, mesh, parallel.rules_from_config(config.mesh))
  shapes = jax.eval_shape(lambda: init_state(model, tx, 0, 16))
  seg = "moe_layers" if "moe_layers" in shapes.params else "layers"
  w = shapes.params[seg]["moe"]["gate"] if "moe" in shapes.params[seg] else \
      shapes.params[seg]["block_0"]["moe"]["gate"]
  w_sh = sh.params[seg]["moe"]["gate"] if "moe" in sh.params[seg] else \
      sh.params[seg]["block_0"]["moe"]["gate"]
  layers, e, d, f = w.shape
  assert w_sh.shard_shape(w.shape) == (layers, e // 4, d, f // 2)
  # Adam moments follow their parameters
  mu = jax.tree.leaves(sh.opt_state, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  assert any(s.spec == w_sh.spec for s in mu)


def test_checkpoint_moves_from_data_parallel_to_fsdp_expert_mesh(tmp_path, capsys):
  """Saved on mesh (data=8), restored onto (fsdp=4, expert=2) exactly; training goes on."""
  from moejax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from moejax.train.loop import abstract_train_state, train  # pylint: disable=g-import-not-at-top
  base = ["train.num_steps=2", "train.checkpoint_every=2", "train.eval_every=2",
          "optim.warmup_steps=1",
          "train.eval_batches=0", "train.progress_bar=false", "train.tensorboard=false",
          "train.async_checkpoint=false", "train.peak_flops=1e11"]
  cfg_a = load_config("configs/moe/gshard_top2.py:runlocal", base + ["mesh.data=8"])
  train(cfg_a, str(tmp_path))
  cfg_b = load_config("configs/moe/gshard_top2.py:runlocal",
                      base + ["mesh.data=1", "mesh.fsdp=4", "mesh.expert=2",
                              "train.num_steps=3"])
  ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  saved, _, _ = ck.restore_latest(abstract_train_state(cfg_a, 257))
  moved, _, meta = ck.restore_latest(abstract_train_state(cfg_b, 257))
  ck.close()
  assert int(meta["step"]) == 2
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(moved)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  w = moved["params"]["moe_layers"]["moe"]["gate"]
  assert w.sharding.mesh.shape["expert"] == 2
  assert w.sharding.shard_shape(w.shape)[1] == w.shape[1] // 2  # experts split in two
  summary = train(cfg_b, str(tmp_path))  # resumes at 2 on the new mesh, runs to 3
  assert summary["step"] == 3 and summary["status"] == "completed"
  assert "resumed from checkpoint at step 2" in capsys.readouterr().out
