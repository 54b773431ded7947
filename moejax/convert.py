"""Hugging Face <-> moejax checkpoints from the command line.

    python -m moejax.convert from-hf HF_DIR --workdir W [--dtype bfloat16]
    python -m moejax.convert to-hf --workdir W --out HF_DIR [--dtype bfloat16]

from-hf writes a moejax run directory: W/config.json (the full moejax config, also
loadable as `--config W/config.py`), an orbax checkpoint at step 0 (the parameters and a
fresh optimizer state) and, if the folder has one, the tokenizer. `moejax.generate
--workdir W` samples from it; fine-tune with

    python -m moejax.train --config W/config.py --workdir runs/ft \\
        --config.train.init_from=W [--config.data.source=... --config.data.paths=...]

to-hf writes config.json + safetensors (per-expert layout) of a run's newest checkpoint,
which transformers' from_pretrained loads, plus the tokenizer files if the run used one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import jax

from moejax import hf
from moejax.generate import load_run
from moejax.models.lm import LM
from moejax.train import checkpoint as ckpt_lib
from moejax.train.loop import abstract_train_state
from moejax.train.optimizer import make_optimizer
from moejax.train.steps import TrainState

CONFIG_PY = '''"""moejax config of {name}, converted from {src} (python -m moejax.convert)."""
import json
import os

import ml_collections


def get_config(arg=None):
  with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))
'''
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def from_hf(hf_dir: str, workdir: str, dtype: str = "float32") -> str:

  hf_dir = os.path.abspath(hf_dir)
  config = hf.config_from_hf(hf_dir, dtype)
  if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(
      os.path.join(workdir, "checkpoints")):
    raise FileExistsError(f"{workdir}/checkpoints is not empty: choose a new --workdir "
                          "(nothing is overwritten)")
  os.makedirs(workdir, exist_ok=True)
  tok_dir = os.path.join(workdir, "tokenizer")
  if config.data.tokenizer == "hf":
    os.makedirs(tok_dir, exist_ok=True)
    for f in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(hf_dir, f)):
        shutil.copy(os.path.join(hf_dir, f), tok_dir)
    config.data.hf_tokenizer = os.path.abspath(tok_dir)
  abstract = abstract_train_state(config, config.model.vocab_size)
  model = hf.model_from_config(config)
  params = hf.load_params(hf_dir, model.cfg, abstract.params,
                          jax.tree.map(lambda x: x.sharding, abstract.params), verbose=True)
  tx, _ = make_optimizer(config.optim, config.train.num_steps)
  state = TrainState.create(params, tx, jax.random.PRNGKey(config.seed), {})
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  ckpt.save(0, state, {}, {"config": config.name, "converted_from": hf_dir}, wait=True)
  ckpt.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, "config.py"), "w") as f:
    f.write(CONFIG_PY.format(name=config.name, src=hf_dir))
  return workdir


def to_hf(workdir: str, out: str, dtype: str | None = None) -> str:

  config, _, mc, params, step, _ = load_run(workdir)
  if os.path.exists(os.path.join(out, "config.json")):
    raise FileExistsError(f"{out}/config.json exists: choose a new --out (nothing is "
                          "overwritten)")
  hf.save(LM(mc), {"params": params}, out, dtype=dtype)
  if config.data.tokenizer == "hf":
    src = config.data.hf_tokenizer
    src = src if os.path.isdir(src) else os.path.dirname(src)
    for f in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(src, f)):
        shutil.copy(os.path.join(src, f), out)
  print(f"[moejax] {config.name} at step {step} -> {out}", file=sys.stderr)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="moejax.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  a = sub.add_parser("from-hf", help="a Hugging Face folder -> a moejax run directory")
  a.add_argument("hf_dir")
  a.add_argument("--workdir", required=True)
  a.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  b = sub.add_parser("to-hf", help="a moejax run's newest checkpoint -> a Hugging Face folder")
  b.add_argument("--workdir", required=True)
  b.add_argument("--out", required=True)
  b.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
  args = p.parse_args(argv)
  if args.cmd == "from-hf":
    w = from_hf(args.hf_dir, args.workdir, args.dtype)
    print(f"[moejax] wrote {w}: config.json / config.py, checkpoints/0; fine-tune with "
          f"--config {w}/config.py --config.train.init_from={w}", file=sys.stderr)
  else:
    to_hf(args.workdir, args.out, args.dtype)
  return 0


if __name__ == "__main__":
  sys.exit(main())
