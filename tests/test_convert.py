"""moejax.convert and train.init_from: a Hugging Face folder -> a moejax run -> fine-tuning
-> a Hugging Face folder again, with the parameters checked at every hop."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import moejax.hf as hf
from moejax import convert
from moejax.config import ConfigError, load_config
from moejax.generate import load_run
from moejax.train.loop import train
from moejax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, "configs/quickstart.py:runlocal")
TRAIN = ["train.num_steps=3", "train.eval_every=3", "train.eval_batches=1",
         "train.log_every=1", "train.checkpoint_every=3", "train.progress_bar=False",
         "train.tensorboard=False", "train.async_checkpoint=False", "optim.warmup_steps=1",
         "data.batch_size=8", "data.seq_len=32"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  """A byte-level Llama-family folder written by moejax.hf.save from a random model."""
  c = load_config(CFG, [f"--config.{o}" for o in ("model.vocab_size=264", "model.d_model=64",
                                                  "model.d_ff=128", "model.num_layers=2",
                                                  "model.max_seq_len=64")])
  model = hf.model_from_config(c)
  params = model.init(jax.random.PRNGKey(3), np.zeros((1, 8), np.int32))["params"]
  folder = str(tmp_path_factory.mktemp("hf") / "tiny-llama")
  hf.save(model, {"params": params}, folder)
  assert json.load(open(os.path.join(folder, "config.json")))["model_type"] == "llama"
  return folder


def _val0(workdir) -> float:
  return [r for r in read_metrics(workdir) if r.get("split") == "eval"][0]["loss"]


def _run(workdir, init_from="", config=CFG, extra=()):
  c = load_config(config, [f"--config.{o}" for o in TRAIN + list(extra)])
  c.train.init_from = init_from
  return train(c, str(workdir))


def test_from_hf_then_fine_tune_then_to_hf(hf_folder, tmp_path):
  w = str(tmp_path / "converted")
  convert.main(["from-hf", hf_folder, "--workdir", w])
  ref = hf.load(hf_folder)[1]["params"]
  _, _, _, params, step, _ = load_run(w)
  assert step == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(ref))
  # fine-tune from the converted run and from the folder itself: the same start
  _run(tmp_path / "ft_run", init_from=w, config=os.path.join(w, "config.py"))
  _run(tmp_path / "ft_hf", init_from=hf_folder, config=os.path.join(w, "config.py"))
  _run(tmp_path / "random", config=os.path.join(w, "config.py"))
  a, b, r = (_val0(tmp_path / n) for n in ("ft_run", "ft_hf", "random"))
  assert a == b and abs(a - r) > 1e-3  # the step-0 eval saw the pretrained parameters
  rows = [x for x in read_metrics(str(tmp_path / "ft_run")) if x.get("split") == "train"]
  assert len(rows) == 3 and all(np.isfinite(x["loss"]) for x in rows)
  # and back out: the fine-tuned run as a Hugging Face folder
  out = str(tmp_path / "back")
  convert.main(["to-hf", "--workdir", str(tmp_path / "ft_run"), "--out", out])
  _, v = hf.load(out)
  _, _, _, ft_params, ft_step, _ = load_run(str(tmp_path / "ft_run"))
  assert ft_step == 3
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(v["params"]),
               jax.device_get(ft_params))
  with pytest.raises(FileExistsError, match="nothing is overwritten"):
    convert.main(["to-hf", "--workdir", str(tmp_path / "ft_run"), "--out", out])


def test_init_from_refuses_what_does_not_fit(hf_folder, tmp_path):
  w = str(tmp_path / "converted")
  convert.from_hf(hf_folder, w)
  # a config whose architecture is not the checkpoint's: the fields are named
  with pytest.raises(ConfigError, match=r"model.d_ff: config 256, .*config.json 128"):
    _run(tmp_path / "x", init_from=hf_folder, config=os.path.join(w, "config.py"),
         extra=["model.d_ff=256"])
  # a moejax run whose parameters do not fit: each named with both shapes
  with pytest.raises(ConfigError, match=r"parameter layers/ffn/gate: .* has shape \[2, 64, "
                     r"128\], the config needs \[2, 64, 256\]"):
    _run(tmp_path / "y", init_from=w, config=os.path.join(w, "config.py"),
         extra=["model.d_ff=256"])
  with pytest.raises(ConfigError, match="must be a Hugging Face folder"):
    _run(tmp_path / "z", init_from=str(tmp_path / "nowhere"))
  assert not os.path.exists(tmp_path / "z" / "checkpoints")


def test_from_hf_carries_the_tokenizer_into_generation(tmp_path, capsys):
  """A folder with tokenizer.json: the converted config selects data.tokenizer='hf' and
  moejax.generate encodes the prompt and decodes with it."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 50, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  c = load_config(CFG, [f"--config.{o}" for o in ("model.vocab_size=304", "model.d_model=32",
                                                  "model.d_ff=64", "model.num_layers=1",
                                                  "model.max_seq_len=64")])
  model = hf.model_from_config(c)
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"]
  folder = tmp_path / "with-tok"
  hf.save(model, {"params": params}, str(folder))
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>"}))
  w = tmp_path / "w"
  convert.from_hf(str(folder), str(w))
  cfg = json.load(open(w / "config.json"))
  assert cfg["data"]["tokenizer"] == "hf"
  assert os.path.isfile(os.path.join(cfg["data"]["hf_tokenizer"], "tokenizer.json"))
  from moejax import generate
  capsys.readouterr()
  assert generate.main(["--workdir", str(w), "--prompt", "def f", "--max_new_tokens", "4",
                        "--temperature", "0"]) == 0
  assert capsys.readouterr().out.startswith("def f")
