"""Document masking (`data.document_mask`): a packed window equals its documents run alone.

A window of several BOS-separated documents, with segment ids and per-document positions
from moejax.data.pipeline.document_fields, must give every document exactly the logits it
gets as a window of its own: attention never crosses a document and RoPE restarts. Checked
for a dense model, a dropless top-k MoE (per-token routing: no cross-document coupling)
and a parameter-shared recursive stack; MoR routers are refused by the config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import config as config_lib
from moejax.data.pipeline import document_fields
from moejax.models.lm import LM, LMConfig
from moejax.moe.layer import MoEConfig
from moejax.recursion.sharing import RecursionConfig

V, BOS, T = 40, 39, 24
LENGTHS = (7, 11, 6)  # three documents fill one window of T tokens


def _cfg(**kw) -> LMConfig:
  base = dict(vocab_size=V, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
              d_ff=64, max_seq_len=T, init_std=0.3)
  base.update(kw)
  return LMConfig(**base)


CFGS = {
    "dense": _cfg(),
    "moe_dropless_top2_shared": _cfg(moe=MoEConfig(num_experts=4, k=2, expert_d_ff=16,
                                                   num_shared=1)),
    "recursive_cycle_3_loops": _cfg(num_layers=3, recursion=RecursionConfig(
        strategy="cycle", num_loops=3, num_layers=3)),
}


def _documents(seed: int) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [np.r_[BOS, rng.integers(0, BOS, n - 1)] for n in LENGTHS]


@pytest.mark.parametrize("name", list(CFGS))
def test_packed_window_equals_each_document_alone(name):
  cfg = CFGS[name]
  model = LM(cfg)
  docs = _documents(0)
  packed_T = np.concatenate(docs)
  assert packed_T.shape == (T,)
  fields = document_fields(packed_T[None], BOS)
  np.testing.assert_array_equal(fields["segment_ids"][0],
                                np.repeat(np.arange(1, len(docs) + 1), LENGTHS))
  np.testing.assert_array_equal(fields["positions"][0],
                                np.concatenate([np.arange(n) for n in LENGTHS]))

  # one forward of 2 + len(docs) rows (a compilation per config): row 0 packed with the
  # document fields; row 1 packed, one segment, positions 0..T-1 (= no masking); row 2 + i
  # document i alone at the front of the window. Causality makes what follows a document
  # irrelevant to its own positions; routing is per token (dropless), rows independent.
  starts = np.cumsum((0,) + LENGTHS[:-1])
  rows = [packed_T, packed_T] + [np.roll(packed_T, -st) for st in starts]
  arange = np.arange(T)
  pos = np.stack([fields["positions"][0], arange] + [arange] * len(docs))
  seg = np.stack([fields["segment_ids"][0]] + [np.ones(T, np.int32)] * (1 + len(docs)))
  x_BT = jnp.asarray(np.stack(rows), jnp.int32)
  params = model.init(jax.random.PRNGKey(1), x_BT[:1])["params"]
  logits = jax.jit(lambda x, p, s: model.apply(
      {"params": params}, x, p, s, mutable=["moe_losses", "moe_stats", "intermediates"])[0])(
          x_BT, jnp.asarray(pos), jnp.asarray(seg))
  masked, unmasked, alone = logits[0], logits[1], logits[2:]
  assert float(jnp.abs(masked).max()) > 0.5  # the comparisons are between O(1) logits
  for i, (st, n) in enumerate(zip(starts, LENGTHS)):
    np.testing.assert_allclose(masked[st:st + n], alone[i, :n], atol=2e-5, rtol=1e-5,
                               err_msg=f"{name}: document {i} differs when packed")
  # and the mask does something: without it the later documents see the earlier ones
  assert float(jnp.abs(unmasked[LENGTHS[0]:] - masked[LENGTHS[0]:]).max()) > 1e-2
  np.testing.assert_allclose(unmasked[:LENGTHS[0]], masked[:LENGTHS[0]], atol=2e-5)


def test_document_mask_is_refused_with_a_mor_router():
  with pytest.raises(ValueError, match="data.document_mask"):
    c = config_lib.load_config("configs/recursion/mor_expert.py",
                               ["--config.data.document_mask=True"])
    config_lib.validate(c)


def test_document_mask_is_refused_while_decoding():
  model = LM(CFGS["dense"], decode=True)
  x = jnp.zeros((1, 1), jnp.int32)
  with pytest.raises(ValueError, match="segment_ids_BT"):
    model.init(jax.random.PRNGKey(0), x, None, x)
