"""DeepSeek-V3-like MoE (for the planning calculator and pod runs): 61 layers (first 3
dense, FFN 18432), d_model 7168, 256 routed experts of 2048 + 1 shared, 8 active, sigmoid
router with group-limited routing (8 groups, keep 4) and aux-loss-free bias; 128 heads of
128 (moejax has grouped-query attention, not MLA: attention parameters differ from the
paper's); vocab 129280; 4096-token sequences, global batch 1024 sequences.
    python -m moejax.planning --config configs/scale/deepseek_v3.py \\
        --mesh data=1,fsdp=8,tensor=1,expert=32
"""

from moejax.config import base_config


def get_config(arg: str = ""):
  del arg
  c = base_config()
  c.name = "deepseek_v3"
  m = c.model
  m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = (
      129280, 7168, 61, 128, 128, 128)
  m.d_ff, m.tie_embeddings = 18432, False
  m.compute_dtype, m.param_dtype, m.remat = "bfloat16", "float32", "full"
  e = m.moe
  # 9 segments per token of which one is the shared expert: 8 routed + 1 shared of 2048
  e.num_experts, e.experts_per_token, e.expert_d_ff = 256, 9, 2048
  e.num_shared_experts = 1
  e.router, e.route_scale, e.n_groups, e.topk_groups = "deepseek", 2.5, 8, 4
  e.bias_update_rate, e.first_dense = 1e-3, 3
  e.load_balance_coef, e.z_loss_coef, e.seq_balance_coef = 0.0, 0.0, 1e-4
  c.data.seq_len, c.data.batch_size = 4096, 1024
  c.mesh.data, c.mesh.fsdp, c.mesh.expert = 1, -1, 32
  return c
