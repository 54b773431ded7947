"""Sampling with a KV cache from a trained run.

    python -m moejax.generate --workdir runs/quickstart --prompt "def main(" \
        --max_new_tokens 200 --temperature 0.8 --top_k 40

temperature 0 is greedy decoding. The prompt is run once (prefill) to fill the cache,
then one token per step inside a jitted `lax.scan`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import parallel
from moejax.data.tokenizers import make_tokenizer
from moejax.models.lm import LM, LMConfig


def sample_logits(logits_BV: jax.Array, rng: jax.Array, temperature: float, top_k: int) -> jax.Array:
  """Greedy when temperature == 0; else temperature + optional top-k sampling."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits = logits_BV / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def init_cache(model: LM, batch: int):
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((batch, 1), jnp.int32))["cache"])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def generate(cfg: LMConfig, params, prompt_BP: jax.Array, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, rng: jax.Array | None = None,
             return_logits: bool = False, model_state: dict | None = None):
  """Tokens [B, P + max_new_tokens] (and the logits of every generated position).

  `model_state`: the non-param collections of the run (e.g. {"moe_bias": ...}).
  """
  if cfg.moe is not None and cfg.moe.router == "expert_choice":
    raise ValueError("model.moe.router = 'expert_choice' cannot generate: each expert picks "
                     "its top tokens of a whole sequence, and at decode a step holds one "
                     "token per sequence, so every token would go to every expert (not the "
                     "model that was trained); generate with a token-choice router (topk, "
                     "deepseek, hash)")
  model_state = dict(model_state or {})
  rc = cfg.recursion
  if rc is not None and rc.router == "expert" and rc.eval_routing == "topk":
    raise ValueError("model.recursion.eval_routing = 'topk' picks tokens by looking at the "
                     "whole sequence, which decoding cannot; use 'threshold' (the causal "
                     "per-token decision the router is trained for) to generate")
  b, p = prompt_BP.shape
  cfg = dataclasses.replace(cfg, max_seq_len=p + max_new_tokens)
  model = LM(cfg, decode=True)
  rng = jax.random.PRNGKey(0) if rng is None else rng

  @jax.jit
  def run(params, model_state, prompt_BP, rng):
    cache = init_cache(model, b)
    pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    logits, mut = model.apply({"params": params, "cache": cache, **model_state}, prompt_BP, pos,
                              mutable=["cache"])
    first_logits = logits[:, -1]
    tok = sample_logits(first_logits, jax.random.fold_in(rng, 0), temperature, top_k)

    def step(carry, i):
      cache, tok = carry
      logits, mut = model.apply({"params": params, "cache": cache, **model_state}, tok[:, None],
                                jnp.full((b, 1), p + i, jnp.int32), mutable=["cache"])
      nxt = sample_logits(logits[:, 0], jax.random.fold_in(rng, i + 1), temperature, top_k)
      return (mut["cache"], nxt), (nxt, logits[:, 0])

    (_, _), (toks, step_logits) = jax.lax.scan(step, (mut["cache"], tok),
                                               jnp.arange(max_new_tokens - 1))
    new = jnp.concatenate([tok[:, None], toks.T], axis=1)
    all_logits = jnp.concatenate([first_logits[:, None], step_logits.transpose(1, 0, 2)], axis=1)
    return jnp.concatenate([prompt_BP, new], axis=1), all_logits

  out, logits = run(params, model_state, prompt_BP, rng)
  return (out, logits) if return_logits else out


def load_run(workdir: str):
  """(config, tokenizer, LMConfig, params, step, model_state) of the newest good
  checkpoint in workdir."""
  # lazy: generate() itself needs neither tensorflow_datasets nor orbax
  from moejax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from moejax.train.loop import abstract_train_state, build_model  # pylint: disable=g-import-not-at-top

  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a moejax run directory?")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  tok = make_tokenizer(config.data)
  model, mc = build_model(config, tok.vocab_size)
  # restore replicated on this process's devices, whatever mesh the run trained on
  abstract = abstract_train_state(config, tok.vocab_size, mesh=parallel.make_mesh())
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  restored = ckpt.restore_latest(abstract)
  ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"no usable checkpoint in {workdir}/checkpoints")
  payload, _, meta = restored
  return config, tok, mc, payload["params"], int(meta["step"]), payload.get("model_state", {})


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="moejax.generate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--prompt", default="def ")
  p.add_argument("--max_new_tokens", type=int, default=200)
  p.add_argument("--temperature", type=float, default=0.8)
  p.add_argument("--top_k", type=int, default=40)
  p.add_argument("--num_samples", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  if a.max_new_tokens < 1:
    p.error(f"--max_new_tokens={a.max_new_tokens}: must be >= 1")
  if a.temperature < 0:
    p.error(f"--temperature={a.temperature}: must be >= 0 (0 = greedy)")
  if a.top_k < 0:
    p.error(f"--top_k={a.top_k}: must be >= 0 (0 = no top-k)")
  config, tok, mc, params, step, model_state = load_run(a.workdir)
  ids = np.asarray(tok.encode(a.prompt), np.int32)
  prompt = jnp.asarray(np.tile(np.concatenate([[tok.bos_id], ids])[None], (a.num_samples, 1)))
  if prompt.shape[1] + a.max_new_tokens > mc.max_seq_len:
    print(f"[moejax] note: generating past the trained length {mc.max_seq_len}", file=sys.stderr)
  out = generate(mc, params, prompt, a.max_new_tokens, temperature=a.temperature,
                 top_k=a.top_k, rng=jax.random.PRNGKey(a.seed), model_state=model_state)
  print(f"[moejax] {config.name} at step {step}", file=sys.stderr)
  for row in np.asarray(out):
    print(tok.decode(row[1:].tolist()))
    print("-" * 40)
  return 0


if __name__ == "__main__":
  sys.exit(main())
