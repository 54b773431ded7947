"""Analytic parameter and FLOP accounting.

FLOPs count multiply-adds as 2 and include only matmuls (projections, FFN, attention
scores and values over the full T x T score matrix, as computed, and the unembedding).
Training FLOPs = 3 x forward (backward is two matmuls per forward matmul); remat's
recomputation is not counted, so MFU stays comparable across remat policies.
"""

from __future__ import annotations

import dataclasses

from moejax.models.lm import LMConfig


@dataclasses.dataclass(frozen=True)
class Accounting:
  total_params: int
  active_params: int  # parameters touched per token (== total for dense models)
  embedding_params: int
  forward_flops_per_token: float
  train_flops_per_token: float

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)

  def summary(self) -> str:
    return (f"params: total {self.total_params / 1e6:.3f}M, active {self.active_params / 1e6:.3f}M "
            f"(embedding {self.embedding_params / 1e6:.3f}M); FLOPs/token: forward "
            f"{self.forward_flops_per_token / 1e6:.2f}M, train {self.train_flops_per_token / 1e6:.2f}M")


def layer_params(c: LMConfig, kind: str = "dense") -> tuple[int, int]:
  """(total, active-per-token) parameters of one block."""
  attn = c.d_model * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  attn += c.head_dim * (c.num_heads + 2 * c.num_kv_heads) * c.qkv_bias + c.d_model * c.out_bias
  attn += {"none": 0, "head": 2 * c.head_dim,
           "full": c.head_dim * (c.num_heads + c.num_kv_heads)}[c.qk_norm]
  norms = 2 * c.d_model
  if kind == "dense":
    n = attn + 3 * c.d_model * c.d_ff + norms
    return n, n
  m = c.moe
  expert = 3 * c.d_model * m.expert_d_ff
  router = 0 if m.router == "hash" else c.d_model * m.num_experts
  shared = (3 * c.d_model * m.shared_d_ff if m.shared_d_ff else m.num_shared * expert)
  shared += c.d_model * m.shared_gate
  base = attn + norms + router + shared
  return base + m.num_experts * expert, base + m.k * expert


def _block_flops(c: LMConfig, kind: str, keys: float, kv: bool = True) -> float:
  """Forward FLOPs of one block for one token attending over `keys` keys."""
  d, h, k, dh = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
  proj = 2 * d * dh * (2 * h + (2 * k if kv else 0))
  scores = 2 * 2 * keys * h * dh  # QK^T and PV over the score row, as computed
  if kind == "dense":
    ffn = 2 * 3 * d * c.d_ff
  else:
    m = c.moe
    router = 0 if m.router == "hash" else 2 * d * m.num_experts
    shared_f = m.shared_d_ff or m.num_shared * m.expert_d_ff
    ffn = router + 2 * 3 * d * (m.expert_d_ff * m.k + shared_f) + 2 * d * m.shared_gate
  return proj + scores + ffn


def _lora_params(c: LMConfig, kind: str) -> int:
  """Per-loop LoRA parameters of one shared block (attention; dense FFN)."""
  r = c.recursion.lora_rank
  d, h, k, dh = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
  n = r * ((d + h * dh) * 2 + (d + k * dh) * 2)
  if kind == "dense":
    n += r * 3 * (d + c.d_ff)
  return n


def _account_recursive(c: LMConfig, seq_len: int) -> Accounting:
  """Unique parameters (+ per-loop LoRA and norms, routers); FLOPs of the effective depth
  with each MoR step r carrying ceil(capacity_r * T) tokens that attend among themselves
  (or to the first step's keys with KV sharing). Expected cost for training/top-k routing."""
  rc = c.recursion
  emb = c.vocab_size * c.d_model
  unembed = 0 if c.tie_embeddings else c.d_model * c.vocab_size
  total = active = emb + unembed + c.d_model
  fwd = 2.0 * c.d_model * c.vocab_size
  names = [f"shared_{u}" for u in range(rc.num_core)]
  ends = ["first_layer", "last_layer"] if rc.middle else []
  for name in names + ends:
    kind = c.unique_kind(name)
    t, a = layer_params(c, kind)
    extra = 0
    if name.startswith("shared_"):
      extra = rc.num_loops * _lora_params(c, kind) if rc.lora_rank else 0
      if rc.unshared_norms:
        extra += (rc.num_loops - 1) * 2 * c.d_model
    total, active = total + t + extra, active + a + extra
  if rc.router == "expert":
    n = rc.num_loops * (c.d_model + 1) * (2 if rc.aux == "causal_router" else 1)
    total, active = total + n, active + n
  elif rc.router == "token":
    total, active = total + c.d_model * rc.num_loops, active + c.d_model * rc.num_loops
  for name in ends:
    fwd += _block_flops(c, c.unique_kind(name), seq_len)
  cycled = rc.strategy in ("cycle", "middle_cycle")
  first_keys = rc.capacity_tokens(0, seq_len) if rc.router != "none" else seq_len
  for r in range(rc.num_loops):
    n_r = rc.capacity_tokens(r, seq_len) if rc.router != "none" else seq_len
    shared_kv = cycled and rc.kv_sharing and r > 0
    keys = first_keys if shared_kv else n_r
    frac = n_r / seq_len
    for name in names:
      kind = c.unique_kind(name)
      fwd += frac * _block_flops(c, kind, keys, kv=not shared_kv)
      if rc.lora_rank:
        fwd += frac * 2 * _lora_params(c, kind)
    if rc.router == "expert":
      fwd += 2 * c.d_model * (2 if rc.aux == "causal_router" else 1)
  if rc.router == "token":
    fwd += 2 * c.d_model * rc.num_loops
  return Accounting(total_params=total, active_params=active, embedding_params=emb + unembed,
                    forward_flops_per_token=float(fwd), train_flops_per_token=float(3 * fwd))


def account(c: LMConfig, seq_len: int) -> Accounting:
  """Parameters and FLOPs per token. For MoE layers, active = the k routed experts (what
  dropless dispatch computes) + shared experts + router; total counts every expert.
  Recursive models: see `_account_recursive`."""
  if c.recursion is not None:
    return _account_recursive(c, seq_len)
  emb = c.vocab_size * c.d_model
  unembed = 0 if c.tie_embeddings else c.d_model * c.vocab_size
  total = active = emb + unembed + c.d_model
  fwd = 2 * c.d_model * c.vocab_size  # attention over the full T x T score matrix
  for kind in c.layer_kinds():
    t, a = layer_params(c, kind)
    total, active = total + t, active + a
    fwd += _block_flops(c, kind, seq_len)
  return Accounting(total_params=total, active_params=active, embedding_params=emb + unembed,
                    forward_flops_per_token=float(fwd), train_flops_per_token=float(3 * fwd))


def measure_matmul_peak(n: int = 1024, reps: int = 7, dtype: str = "float32") -> float:
  """Median FLOP/s of an n x n x n matmul on the default device (the MFU denominator)."""
  import statistics
  import time

  import jax

  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype=dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype=dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / statistics.median(times)
