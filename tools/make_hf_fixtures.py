"""Dev-only: tiny random Hugging Face models and transformers' outputs, as test fixtures.

    python -m venv /tmp/hfref && /tmp/hfref/bin/pip install torch transformers safetensors
    /tmp/hfref/bin/python tools/make_hf_fixtures.py [--out tests/fixtures/hf]

Not a dependency of moejax or its tests: the suite reads only what this writes (per
family: config.json, model.safetensors in the layout transformers saves, or in the fused
expert layout where marked, and reference.npz with the input ids, float32 logits and 16
greedy tokens generated with the KV cache). Every norm weight and bias is randomised so
that a mapping that drops one shows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import safetensors.torch
import torch
import transformers as T

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (config class, overrides, save in the fused expert layout)
FAMILIES = {
    "llama": (T.LlamaConfig, dict(rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                  rope_scaling={"rope_type": "llama3", "factor": 4.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 16}), False),
    "llama_linear": (T.LlamaConfig, dict(head_dim=16, attention_bias=True,
                                         rope_scaling={"rope_type": "linear", "factor": 2.0}),
                     False),
    "mistral": (T.MistralConfig, dict(sliding_window=12, tie_word_embeddings=False), False),
    "qwen2": (T.Qwen2Config, dict(tie_word_embeddings=True, rope_theta=1e6,
                                  rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                "original_max_position_embeddings": 16}), False),
    "qwen3": (T.Qwen3Config, dict(head_dim=16, tie_word_embeddings=True), False),
    "mixtral": (T.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2), False),
    "mixtral_fused": (T.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2), True),
    "qwen2_moe": (T.Qwen2MoeConfig, dict(num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=16,
                                         shared_expert_intermediate_size=32,
                                         norm_topk_prob=False, mlp_only_layers=[0],
                                         tie_word_embeddings=False), False),
    "qwen3_moe": (T.Qwen3MoeConfig, dict(head_dim=16, num_experts=8, num_experts_per_tok=2,
                                         moe_intermediate_size=16, norm_topk_prob=True), True),
    "olmoe": (T.OlmoeConfig, dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                                  rms_norm_eps=1e-5), False),
}


def randomise_norms_and_biases(model: torch.nn.Module, gen: torch.Generator) -> None:
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif name.endswith(".bias") or "correction_bias" in name:
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def make(name: str, out: str, seed: int) -> None:
  cls, overrides, fused = FAMILIES[name]
  cfg = cls(**{**COMMON, **overrides})
  torch.manual_seed(seed)
  model = T.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32,
                                             attn_implementation="eager").eval()
  randomise_norms_and_biases(model, torch.Generator().manual_seed(seed + 1))
  folder = os.path.join(out, name)
  shutil.rmtree(folder, ignore_errors=True)
  model.save_pretrained(folder, safe_serialization=True)
  if fused:  # the in-memory (transformers 5) tensors: fused gate_up_proj [E, 2F, D]
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
      state.pop("lm_head.weight", None)
    os.remove(os.path.join(folder, "model.safetensors"))
    safetensors.torch.save_file(state, os.path.join(folder, "model.safetensors"),
                                metadata={"format": "pt"})
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, COMMON["vocab_size"], (2, 24))
  with torch.no_grad():
    logits = model(torch.tensor(ids)).logits.float().numpy()
    prompt = torch.tensor(ids[:, :8])
    gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                         max_new_tokens=16, min_new_tokens=16, use_cache=True,
                         eos_token_id=None, pad_token_id=0)[:, 8:].numpy()
  np.savez(os.path.join(folder, "reference.npz"), input_ids=ids.astype(np.int32),
           logits=logits.astype(np.float32), greedy=gen.astype(np.int32),
           prompt_len=np.int32(8))
  meta = {"transformers": T.__version__, "torch": torch.__version__, "fused_experts": fused,
          "model_class": type(model).__name__}
  with open(os.path.join(folder, "fixture.json"), "w") as f:
    json.dump(meta, f, indent=1)
  print(f"{name}: {type(model).__name__}, logits |max| {np.abs(logits).max():.3f}, "
        f"{sum(p.numel() for p in model.parameters())} params")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests",
                                               "fixtures", "hf"))
  p.add_argument("--only", nargs="*", default=None)
  a = p.parse_args()
  for i, name in enumerate(FAMILIES):
    if a.only and name not in a.only:
      continue
    make(name, a.out, seed=100 + i)


if __name__ == "__main__":
  main()
