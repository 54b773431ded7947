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
  norms = 2 * c.d_model
  if kind == "dense":
    n = attn + 3 * c.d_model * c.d_ff + norms
    return n, n
  m = c.moe
  expert = 3 * c.d_model * m.expert_d_ff
  router = 0 if m.router == "hash" else c.d_model * m.num_experts
  shared = m.num_shared * expert
  base = attn + norms + router + shared
  return base + m.num_experts * expert, base + m.k * expert


def account(c: LMConfig, seq_len: int) -> Accounting:
  """Parameters and FLOPs per token. For MoE layers, active = the k routed experts (what
  dropless dispatch computes) + shared experts + router; total counts every expert."""
  emb = c.vocab_size * c.d_model
  unembed = 0 if c.tie_embeddings else c.d_model * c.vocab_size
  d, h, k, dh = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
  proj = 2 * d * dh * (2 * h + 2 * k)
  scores = 2 * 2 * seq_len * h * dh  # QK^T and PV over the full score matrix
  total = active = emb + unembed + c.d_model
  fwd = 2 * d * c.vocab_size
  for kind in c.layer_kinds():
    t, a = layer_params(c, kind)
    total, active = total + t, active + a
    if kind == "dense":
      ffn = 2 * 3 * d * c.d_ff
    else:
      m = c.moe
      router = 0 if m.router == "hash" else 2 * d * m.num_experts
      ffn = router + 2 * 3 * d * m.expert_d_ff * (m.k + m.num_shared)
    fwd += proj + scores + ffn
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
