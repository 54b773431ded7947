"""moejax.hf: Hugging Face checkpoints in and out, against transformers' own outputs.

The fixtures under tests/fixtures/hf were written by tools/make_hf_fixtures.py (torch +
transformers in a separate virtualenv): a tiny random model per family, with randomised
norm weights and biases, its float32 logits on a [2, 24] batch and 16 greedy tokens from
transformers' generate() with the KV cache. The suite needs neither torch nor network;
`test_transformers_reads_the_export` re-runs transformers when it is installed.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import moejax.hf as hf
from moejax import generate as gen_lib
from moejax import parallel
from moejax.hf import checkpoint as ckpt_lib

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "hf")
NAMES = sorted(os.listdir(FIXTURES))


def rel_err(a, b) -> float:
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def hf_tensors(folder: str) -> dict[str, np.ndarray]:
  return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.parametrize("name", NAMES)
def test_logits_greedy_and_export_match_transformers(name, tmp_path):
  folder = os.path.join(FIXTURES, name)
  ref = np.load(os.path.join(folder, "reference.npz"))
  model, variables = hf.load(folder)
  logits = model.apply(variables, jnp.asarray(ref["input_ids"]))
  assert logits.dtype == jnp.float32 and logits.shape == ref["logits"].shape
  assert rel_err(logits, ref["logits"]) < 1e-4
  # 16 greedy tokens through the KV cache, as transformers' generate() made them
  p = int(ref["prompt_len"])
  out = gen_lib.generate(model.cfg, variables["params"], jnp.asarray(ref["input_ids"][:, :p]),
                         16, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(out[:, p:]), ref["greedy"])
  # export: the same tensors under the same names as transformers saves (per-expert)
  hf.save(model, variables, str(tmp_path / "out"))
  saved = hf_tensors(str(tmp_path / "out"))
  meta = json.load(open(os.path.join(folder, "fixture.json")))
  if not meta["fused_experts"]:
    orig = hf_tensors(folder)
    assert sorted(saved) == sorted(orig)
    for k in orig:
      np.testing.assert_array_equal(saved[k], orig[k], err_msg=k)
  # and back: the export loads to the same logits
  model2, variables2 = hf.load(str(tmp_path / "out"))
  assert model2.cfg == model.cfg
  np.testing.assert_array_equal(np.asarray(model2.apply(variables2, ref["input_ids"])),
                                np.asarray(logits))


def test_unscanned_layers_and_sharded_export_load_the_same():
  """scan_layers=False maps each layer by name (dense + MoE segments of Qwen2-MoE)."""
  folder = os.path.join(FIXTURES, "qwen2_moe")
  ref = np.load(os.path.join(folder, "reference.npz"))
  model, variables = hf.load(folder, scan_layers=False)
  assert "layer_0" in variables["params"] and "moe_layers" not in variables["params"]
  assert rel_err(model.apply(variables, ref["input_ids"]), ref["logits"]) < 1e-4


def test_fused_and_per_expert_layouts_give_the_same_model(tmp_path):
  """transformers 5's fused gate_up_proj / down_proj against per-expert w1/w2/w3."""
  src = os.path.join(FIXTURES, "mixtral")
  t = hf_tensors(src)
  fused = {k: v for k, v in t.items() if ".experts." not in k and ".gate." not in k}
  for i in range(2):
    p = f"model.layers.{i}."
    e = [p + f"block_sparse_moe.experts.{j}." for j in range(4)]
    fused[p + "mlp.experts.gate_up_proj"] = np.stack(
        [np.concatenate([t[x + "w1.weight"], t[x + "w3.weight"]]) for x in e])
    fused[p + "mlp.experts.down_proj"] = np.stack([t[x + "w2.weight"] for x in e])
    fused[p + "mlp.gate.weight"] = t[p + "block_sparse_moe.gate.weight"]
  out = tmp_path / "fused"
  out.mkdir()
  shutil.copy(os.path.join(src, "config.json"), out / "config.json")
  save_file(fused, str(out / "model.safetensors"))
  a = hf.load(src)[1]["params"]
  b = hf.load(str(out))[1]["params"]
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_sharded_folder_loads_onto_a_mesh_equal_to_a_full_load(tmp_path):
  """Shards + index, placed on 8 devices (fsdp x tensor x expert), equal the single load."""
  folder = os.path.join(FIXTURES, "qwen3_moe")
  model, variables = hf.load(folder)
  hf.save(model, variables, str(tmp_path / "sharded"), max_shard_bytes=20_000)
  assert os.path.isfile(tmp_path / "sharded" / ckpt_lib.INDEX)
  assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 3
  import ml_collections
  mesh = parallel.make_mesh(ml_collections.ConfigDict(
      {"data": 1, "fsdp": 2, "tensor": 2, "expert": 2, "rules": ()}))
  model2, v2 = hf.load(str(tmp_path / "sharded"), mesh=mesh)
  experts = v2["params"]["moe_layers"]["moe"]["gate"]
  assert len(experts.sharding.device_set) == 8 and not experts.sharding.is_fully_replicated
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               variables["params"], v2["params"])


# ------------------------------------------------------------------ bad input

def _copy(name, tmp_path):
  dst = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), dst)
  return dst


def test_bad_folders_are_named(tmp_path):
  with pytest.raises(hf.CheckpointError, match="does not exist"):
    hf.load(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(hf.CheckpointError, match="no config.json"):
    hf.load(str(tmp_path / "empty"))
  # an unsupported family names itself and lists the supported ones
  d = _copy("llama", tmp_path)
  cfg = json.load(open(d / "config.json"))
  json.dump({**cfg, "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]},
            open(d / "config.json", "w"))
  with pytest.raises(hf.UnsupportedModel, match=r"deepseek_v3.*Latent Attention.*'llama'"):
    hf.load(str(d))
  # an unsupported option is named
  json.dump({**cfg, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
            open(d / "config.json", "w"))
  with pytest.raises(hf.UnsupportedModel, match="rope type 'longrope'"):
    hf.load(str(d))
  json.dump({**cfg, "hidden_act": "gelu"}, open(d / "config.json", "w"))
  with pytest.raises(hf.UnsupportedModel, match="hidden_act = 'gelu'"):
    hf.load(str(d))
  json.dump(cfg, open(d / "config.json", "w"))
  # missing, mis-shaped and unexpected tensors, each named (all reported at once)
  t = hf_tensors(str(d))
  t.pop("model.layers.1.mlp.up_proj.weight")
  t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
  t["model.layers.0.extra.weight"] = np.zeros((3,), np.float32)
  save_file(t, str(d / "model.safetensors"))
  with pytest.raises(hf.CheckpointError) as e:
    hf.load(str(d))
  msg = str(e.value)
  assert "missing tensor model.layers.1.mlp.up_proj.weight (expected shape [64, 32])" in msg
  assert ("tensor model.layers.0.self_attn.k_proj.weight has shape [8, 32], expected [16, 32]"
          in msg)
  assert "unexpected tensor model.layers.0.extra.weight [3]" in msg
  os.remove(d / "model.safetensors")
  with pytest.raises(hf.CheckpointError, match="neither model.safetensors"):
    hf.load(str(d))


def test_export_refuses_what_transformers_cannot_hold():
  from moejax import config as config_lib
  c = config_lib.load_config(os.path.join(HERE, "..", "configs", "recursion", "cycle.py"))
  model = hf.model_from_config(c)
  with pytest.raises(hf.UnsupportedModel, match="recursive"):
    hf.save(model, {"params": {}}, "/tmp/never-written")
  assert not os.path.exists("/tmp/never-written")


def test_transformers_reads_the_export(tmp_path):
  """Live: transformers loads what moejax.hf.save wrote, to the same logits (skipped
  unless torch and transformers are installed: pip install torch transformers)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  for name in ("qwen2_moe", "qwen3", "olmoe"):
    folder = os.path.join(FIXTURES, name)
    ref = np.load(os.path.join(folder, "reference.npz"))
    model, variables = hf.load(folder)
    hf.save(model, variables, str(tmp_path / name))
    tm = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / name)).eval()
    with torch.no_grad():
      got = tm(torch.tensor(ref["input_ids"], dtype=torch.long)).logits.float().numpy()
    assert rel_err(got, ref["logits"]) < 1e-4, name


RSS_SCRIPT = r"""
import json, sys
import jax, ml_collections, numpy as np
import moejax.hf as hf
from moejax import parallel
folder = sys.argv[1]
mesh = parallel.make_mesh(ml_collections.ConfigDict(
    {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1, "rules": ()}))
# everything but the load itself first: the model's tracing, the devices
model = hf.model_from_config(hf.config_from_hf(folder))
hf.abstract_params(model)
jax.block_until_ready(jax.device_put(np.zeros(8), jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec())))
def rss():
  return int(open("/proc/self/statm").read().split()[1]) * 4096
def hwm():  # peak RSS since the last reset (VmHWM), bytes
  return [int(l.split()[1]) * 1024 for l in open("/proc/self/status")
          if l.startswith("VmHWM")][0]
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
base = rss()
_, v = hf.load(folder, mesh=mesh)
jax.block_until_ready(v)
peak = hwm()
held = sum(s.data.nbytes for x in jax.tree.leaves(v) for s in x.addressable_shards)
_, full = hf.load(folder)
same = all(np.array_equal(np.asarray(a), np.asarray(b))
           for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(full)))
print(json.dumps({"growth": peak - base, "held": held, "same": same}))
"""


def test_large_sharded_checkpoint_streams_tensor_by_tensor(tmp_path):
  """A generated 4-shard checkpoint onto 8 devices: equal to a full load, and the peak RSS
  beyond the arrays the devices hold (host memory here) stays <= 3x the largest tensor."""
  import subprocess
  import sys
  from moejax import config as config_lib
  from moejax.hf import synthetic
  c = config_lib.base_config()
  for k, v in dict(vocab_size=8192, d_model=256, num_layers=6, num_heads=4, num_kv_heads=2,
                   head_dim=64, d_ff=1024, max_seq_len=128, tie_embeddings=False).items():
    c.model[k] = v
  info = synthetic.write_random(str(tmp_path / "ck"), c, dtype="float32",
                                max_shard_bytes=12 << 20)
  assert info["shards"] >= 4 and info["largest_bytes"] == 8192 * 256 * 4
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "ck")], env=env,
                       capture_output=True, text=True, check=True, timeout=300)
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["same"]
  assert r["held"] >= info["bytes"]
  assert r["growth"] - r["held"] <= 3 * info["largest_bytes"], (r, info)
