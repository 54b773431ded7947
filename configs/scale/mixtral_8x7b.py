"""Mixtral-8x7B-like MoE (for the planning calculator and pod runs, not for this CPU):
32 layers, d_model 4096, 32 query / 8 KV heads of 128, 8 experts of SwiGLU 14336, top-2,
vocab 32000, 4096-token sequences, global batch 1024 sequences (4M tokens), bf16 compute,
full remat. python -m moejax.planning --config configs/scale/mixtral_8x7b.py \\
    --mesh data=1,fsdp=32,tensor=1,expert=8
"""

from moejax.config import base_config


def get_config(arg: str = ""):
  del arg
  c = base_config()
  c.name = "mixtral_8x7b"
  m = c.model
  m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = (
      32000, 4096, 32, 32, 8, 128)
  m.d_ff, m.tie_embeddings, m.rope_theta = 14336, False, 1e6
  m.compute_dtype, m.param_dtype, m.remat = "bfloat16", "float32", "full"
  e = m.moe
  e.num_experts, e.experts_per_token, e.router, e.capacity_factor = 8, 2, "topk", 1.25
  c.data.seq_len, c.data.batch_size = 4096, 1024
  c.mesh.data, c.mesh.fsdp, c.mesh.expert = 1, -1, 8
  return c
