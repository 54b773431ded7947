"""Hugging Face families: config.json -> moejax config, and one tensor table per family.

A family says how its config.json maps onto `config.model` (plain fields of the layers)
and how its tensors are named. The table is written once, per layer, as
(moejax path inside a block, Hugging Face name, transform); `moejax.hf.checkpoint`
reads it both ways. The layers know nothing of these names.

Transforms (moejax layout <- Hugging Face layout):
  copy      the same array (norm scales, embeddings);
  linear    nn.Linear weight [out, in] -> [in..., out...] (transposed, then reshaped to the
            moejax shape; `linear2` for the attention output, whose input is [H, Dh]);
  bias      [H * Dh] -> [H, Dh];
  experts   per-expert nn.Linear weights `...experts.{e}...` stacked into [E, in, out];
  fused_gate / fused_up / fused_down   transformers 5's fused expert tensors
            gate_up_proj [E, 2F, D] (gate rows first) and down_proj [E, D, F].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from moejax.configlib import ConfigError


class UnsupportedModel(ConfigError):
  """A Hugging Face config this module cannot map exactly: names what and why."""


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  model_types: tuple[str, ...]
  architectures: tuple[str, ...]
  moe: str = ""  # "" dense | mixtral | qwen (mlp.experts, mlp.gate) 
  qk_norm: str = "none"
  qkv_bias: bool = False
  shared_gate: bool = False  # Qwen2-MoE's sigmoid-gated shared expert


FAMILIES = (
    Family("llama", ("llama",), ("LlamaForCausalLM",)),
    Family("mistral", ("mistral",), ("MistralForCausalLM",)),
    Family("qwen2", ("qwen2",), ("Qwen2ForCausalLM",), qkv_bias=True),
    Family("qwen3", ("qwen3",), ("Qwen3ForCausalLM",), qk_norm="head"),
    Family("mixtral", ("mixtral",), ("MixtralForCausalLM",), moe="mixtral"),
    Family("qwen2_moe", ("qwen2_moe",), ("Qwen2MoeForCausalLM",), moe="qwen", qkv_bias=True,
           shared_gate=True),
    Family("qwen3_moe", ("qwen3_moe",), ("Qwen3MoeForCausalLM",), moe="qwen", qk_norm="head"),
    Family("olmoe", ("olmoe",), ("OlmoeForCausalLM",), moe="qwen", qk_norm="full"),
)
SUPPORTED = tuple(f.model_types[0] for f in FAMILIES)
NOT_YET = {"deepseek_v2": "Multi-head Latent Attention is not implemented yet",
           "deepseek_v3": "Multi-head Latent Attention is not implemented yet"}


def family_of(hf: dict[str, Any], where: str = "config.json") -> Family:
  mt = hf.get("model_type")
  for f in FAMILIES:
    if mt in f.model_types:
      return f
  archs = hf.get("architectures") or []
  for f in FAMILIES:
    if any(a in f.architectures for a in archs):
      return f
  why = f" ({NOT_YET[mt]})" if mt in NOT_YET else ""
  raise UnsupportedModel(
      f"{where}: model_type {mt!r} / architectures {archs} is not supported{why}; supported "
      f"model types: {list(SUPPORTED)} (architectures "
      f"{[a for f in FAMILIES for a in f.architectures]})")


def _rope(hf: dict[str, Any], where: str) -> tuple[float, dict[str, Any]]:
  """(theta, model.rope_scaling fields) from rope_parameters (transformers 5) or
  rope_theta + rope_scaling (earlier files)."""
  params = dict(hf.get("rope_parameters") or {})
  if "rope_scaling" in hf and hf["rope_scaling"]:
    params = {**hf["rope_scaling"], **params}
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  kind = params.get("rope_type", params.get("type", "default"))
  if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    raise UnsupportedModel(f"{where}: partial_rotary_factor != 1 is not supported")
  if kind == "default":
    return float(theta), {"type": "none"}
  if kind not in ("linear", "llama3", "yarn"):
    raise UnsupportedModel(f"{where}: rope type {kind!r} is not supported; supported: "
                           "default, linear, llama3, yarn")
  out: dict[str, Any] = {"type": kind, "factor": float(params["factor"])}
  if kind in ("llama3", "yarn"):
    out["original_max_len"] = int(params.get("original_max_position_embeddings")
                                  or hf.get("max_position_embeddings"))
  if kind == "llama3":
    out["low_freq_factor"] = float(params["low_freq_factor"])
    out["high_freq_factor"] = float(params["high_freq_factor"])
  if kind == "yarn":
    for src, dst in (("beta_fast", "beta_fast"), ("beta_slow", "beta_slow"),
                     ("mscale", "mscale"), ("mscale_all_dim", "mscale_all_dim"),
                     ("attention_factor", "attention_factor")):
      if params.get(src) is not None:
        out[dst] = float(params[src])
    out["truncate"] = bool(params.get("truncate", True))
  return float(theta), out


def _require(hf: dict[str, Any], where: str, key: str, ok, allowed: str) -> None:
  if key in hf and not ok(hf[key]):
    raise UnsupportedModel(f"{where}: {key} = {hf[key]!r} is not supported ({allowed})")


def to_moejax(hf: dict[str, Any], base: ml_collections.ConfigDict,
              where: str = "config.json") -> tuple[Family, ml_collections.ConfigDict]:
  """The family and `base` with its model section set from a Hugging Face config."""
  fam = family_of(hf, where)
  _require(hf, where, "hidden_act", lambda v: v == "silu", "only silu (SwiGLU)")
  _require(hf, where, "mlp_bias", lambda v: not v, "FFN biases are not implemented")
  _require(hf, where, "clip_qkv", lambda v: v is None, "clip_qkv is not implemented")
  _require(hf, where, "use_sliding_window", lambda v: not v,
           "Qwen-style per-layer sliding windows are not implemented")
  c = base
  m = c.model
  heads = hf["num_attention_heads"]
  m.vocab_size = hf["vocab_size"]
  m.d_model = hf["hidden_size"]
  m.num_layers = hf["num_hidden_layers"]
  m.num_heads = heads
  m.num_kv_heads = hf.get("num_key_value_heads") or heads
  m.head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  m.d_ff = hf["intermediate_size"]
  m.max_seq_len = hf.get("max_position_embeddings", 2048)
  m.norm_eps = float(hf.get("rms_norm_eps", 1e-6))
  m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
  m.rope_theta, rope = _rope(hf, where)
  for k, v in rope.items():
    m.rope_scaling[k] = v
  m.qk_norm = fam.qk_norm
  bias = hf.get("attention_bias", False)
  m.qkv_bias = bool(hf.get("qkv_bias", fam.qkv_bias) or bias)
  m.out_bias = bool(bias)
  if fam.name == "mistral" and hf.get("sliding_window"):
    m.sliding_window = int(hf["sliding_window"])
  if fam.moe:
    e = m.moe
    e.router, e.backend, e.granularity, e.jitter = "topk", "dropless", 1, 0.0
    e.z_loss_coef = float(hf.get("router_z_loss_coef", 0.0) or 0.0)
    e.load_balance_coef = float(hf.get("router_aux_loss_coef", 0.01) or 0.0)
    k = hf["num_experts_per_tok"]
    e.num_experts = hf.get("num_local_experts") or hf.get("num_experts")
    if fam.moe == "mixtral":
      e.expert_d_ff, e.renormalize = hf["intermediate_size"], True
    else:
      e.expert_d_ff = hf.get("moe_intermediate_size") or hf["intermediate_size"]
      e.renormalize = bool(hf.get("norm_topk_prob", False))
      _require(hf, where, "decoder_sparse_step", lambda v: v == 1,
               "MoE in every layer after the dense ones (decoder_sparse_step 1)")
      dense = sorted(hf.get("mlp_only_layers") or [])
      if dense != list(range(len(dense))):
        raise UnsupportedModel(f"{where}: mlp_only_layers = {dense} is not supported: only a "
                               "prefix of dense layers [0, 1, ..., k-1]")
      e.first_dense = len(dense)
    e.num_shared_experts = 0
    if fam.shared_gate and hf.get("shared_expert_intermediate_size"):
      e.num_shared_experts = 1
      e.shared_expert_d_ff = hf["shared_expert_intermediate_size"]
      e.shared_expert_gate = True
    # moejax counts a shared expert inside experts_per_token (DeepSeekMoE convention)
    e.experts_per_token = k + e.num_shared_experts
  return fam, c


# ------------------------------------------------------------------ tensor tables

Entry = tuple[str, str, str]  # (moejax path in the block, HF name, transform)


def top_table(tie: bool) -> list[Entry]:
  t = [("embed/embedding", "model.embed_tokens.weight", "copy"),
       ("final_norm/scale", "model.norm.weight", "copy")]
  return t if tie else t + [("unembed", "lm_head.weight", "linear")]


def block_table(fam: Family, model: Any, kind: str, i: int, fused: bool) -> list[Entry]:
  """Entries of layer i (kind: dense | moe) of an LMConfig `model`. `fused`:
  transformers 5's fused expert tensors."""
  p = f"model.layers.{i}."
  a = p + "self_attn."
  t = [("attn_norm/scale", p + "input_layernorm.weight", "copy"),
       ("ffn_norm/scale", p + "post_attention_layernorm.weight", "copy"),
       ("attn/q", a + "q_proj.weight", "linear"), ("attn/k", a + "k_proj.weight", "linear"),
       ("attn/v", a + "v_proj.weight", "linear"), ("attn/o", a + "o_proj.weight", "linear2")]
  if model.qkv_bias:
    t += [(f"attn/{x}_bias", a + f"{x}_proj.bias", "bias") for x in "qkv"]
  if model.out_bias:
    t += [("attn/o_bias", a + "o_proj.bias", "copy")]
  if model.qk_norm != "none":
    t += [(f"attn/{x}_norm/scale", a + f"{x}_norm.weight", "copy") for x in "qk"]
  if kind == "dense":
    return t + [(f"ffn/{w}", p + f"mlp.{w}_proj.weight", "linear") for w in ("gate", "up", "down")]
  moe = p + ("block_sparse_moe." if fam.moe == "mixtral" and not fused else "mlp.")
  t.append(("moe/router", moe + "gate.weight", "linear"))
  if fused:
    t += [("moe/gate", moe + "experts.gate_up_proj", "fused_gate"),
          ("moe/up", moe + "experts.gate_up_proj", "fused_up"),
          ("moe/down", moe + "experts.down_proj", "fused_down")]
  elif fam.moe == "mixtral":
    t += [(f"moe/{w}", moe + "experts.{e}." + f"{n}.weight", "experts")
          for w, n in (("gate", "w1"), ("up", "w3"), ("down", "w2"))]
  else:
    t += [(f"moe/{w}", moe + "experts.{e}." + f"{w}_proj.weight", "experts")
          for w in ("gate", "up", "down")]
  if model.moe.num_shared:
    t += [(f"moe/shared/{w}", moe + f"shared_expert.{w}_proj.weight", "linear")
          for w in ("gate", "up", "down")]
    if model.moe.shared_gate:
      t.append(("moe/shared_gate", moe + "shared_expert_gate.weight", "linear"))
  return t


def infer_family(model: Any) -> Family:
  """The Hugging Face family a moejax LMConfig exports to, or a clear error."""
  why = []
  if model.recursion is not None:
    why.append("recursive (parameter-shared) models have no transformers class")
  if model.logits_soft_cap:
    why.append("model.logits_soft_cap")
  e = model.moe
  if e is not None and e.router != "topk":
    why.append(f"model.moe.router={e.router!r} (only topk softmax routing maps)")
  if e is not None and e.moe_every != 1:
    why.append("model.moe.moe_every > 1")
  if e is not None and e.num_shared and not e.shared_gate:
    why.append("ungated shared experts (only Qwen2-MoE's sigmoid-gated one maps)")
  if why:
    raise UnsupportedModel("this model cannot be exported to Hugging Face: " + "; ".join(why))
  by = {f.name: f for f in FAMILIES}
  if e is None:
    if model.qk_norm == "full":
      raise UnsupportedModel("model.qk_norm='full' exists only in an MoE family (OLMoE)")
    if model.qk_norm == "head":
      return by["qwen3"]
    if model.sliding_window:
      return by["mistral"]
    return by["qwen2"] if model.qkv_bias and not model.out_bias else by["llama"]
  if e.shared_gate:
    return by["qwen2_moe"]
  if model.qk_norm == "full":
    return by["olmoe"]
  if model.qk_norm == "head":
    return by["qwen3_moe"]
  if e.renormalize and not e.first_dense and not model.qkv_bias:
    return by["mixtral"]
  raise UnsupportedModel("no Hugging Face MoE family matches: without QK norm or a shared "
                         "expert only Mixtral maps (renormalised top-k, no dense layers, no "
                         "biases)")


def to_hf_config(fam: Family, m: Any) -> dict[str, Any]:
  """config.json for an LMConfig `m` of family `fam` (the inverse of to_moejax)."""
  hf: dict[str, Any] = {
      "architectures": [fam.architectures[0]], "model_type": fam.model_types[0],
      "vocab_size": m.vocab_size, "hidden_size": m.d_model,
      "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
      "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim,
      "intermediate_size": m.d_ff, "max_position_embeddings": m.max_seq_len,
      "rms_norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings,
      "hidden_act": "silu", "rope_theta": m.rope_theta, "torch_dtype": "float32",
      "initializer_range": m.init_std,
  }
  r = m.rope_scaling
  rope: dict[str, Any] = {"rope_type": "default"}
  if r is not None and r.type != "none":
    rope = {"rope_type": r.type, "factor": r.factor}
    if r.type in ("llama3", "yarn"):
      rope["original_max_position_embeddings"] = r.original_max_len
    if r.type == "llama3":
      rope |= {"low_freq_factor": r.low_freq_factor, "high_freq_factor": r.high_freq_factor}
    if r.type == "yarn":
      rope |= {"beta_fast": r.beta_fast, "beta_slow": r.beta_slow, "truncate": r.truncate}
      for f in ("mscale", "mscale_all_dim", "attention_factor"):
        if getattr(r, f):
          rope[f] = getattr(r, f)
    hf["rope_scaling"] = dict(rope)
  hf["rope_parameters"] = {"rope_theta": m.rope_theta, **rope}
  if fam.name in ("llama", "mistral", "qwen3", "qwen3_moe", "olmoe"):
    hf["attention_bias"] = bool(m.qkv_bias)
  if fam.name == "mistral":
    hf["sliding_window"] = m.sliding_window or None
  if fam.name in ("qwen2", "qwen2_moe"):
    hf["use_sliding_window"] = False
  if fam.name == "qwen2_moe":
    hf["qkv_bias"] = bool(m.qkv_bias)
  e = m.moe
  if fam.moe:
    hf["num_experts_per_tok"] = e.k
    if fam.moe == "mixtral":
      hf["num_local_experts"] = e.num_experts
      hf["intermediate_size"] = e.expert_d_ff
    else:
      hf |= {"num_experts": e.num_experts, "moe_intermediate_size": e.expert_d_ff,
             "norm_topk_prob": e.renormalize, "decoder_sparse_step": 1,
             "mlp_only_layers": list(range(e.first_dense))}
    if fam.shared_gate:
      hf["shared_expert_intermediate_size"] = e.shared_d_ff or e.num_shared * e.expert_d_ff
    hf["router_aux_loss_coef"] = e.load_balance_coef
  return hf
