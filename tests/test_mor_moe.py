"""MoE inside a tied Mixture-of-Recursions block: masked path == gathered path, in full.

The masked path (model.recursion.dispatch='mask') runs every token through each loop and
masks the ones the MoR router did not keep; the gathered path runs only the kept tokens
(plus padding of the static buffers). The MoE layer in the looped block sees a token mask
either way, and a masked-out (or padding) token must count for nothing: not in the loads,
the auxiliary losses, the router statistics, the loss-free bias update, nor the dispatch.
So the two paths must agree on the logits, on the losses, on every leaf of every mutable
collection the training and eval steps collect, on the bias the train step would write
and on the gradients. Tiny dims (d_model 32, T 16, 4 experts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.config import base_config, validate
from moejax.models.lm import LM, LMConfig
from moejax.moe.layer import MoEConfig, MoEFFN
from moejax.moe.side_outputs import update_bias
from test_recursion import T, V, draw_params, tokens, variables

COLS = ["moe_losses", "moe_stats", "mor_losses", "mor_stats"]
CAPS = (1.0, 0.5, 0.25)
MOR = {"expert": dict(router="expert", capacities=CAPS),
       "token": dict(router="token", capacities=CAPS, balance="bias")}
MOE = {"topk": dict(router="topk"),
       # DeepSeek-V3: sigmoid gate, selection bias (loss-free balancing), sequence-wise loss
       "deepseek": dict(router="deepseek", bias_update_rate=0.01, seq_balance_coef=0.01,
                        load_balance_coef=0.0),
       "hash": dict(router="hash", experts_per_token=1)}
CASES = [("expert", "topk"), ("token", "topk"), ("token", "deepseek"), ("expert", "deepseek"),
         ("expert", "hash")]
SLOW = {("expert", "deepseek"), ("expert", "hash")}  # same mechanism as the other three
PARAMS = [pytest.param(*c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES]


def mor_moe_cfg(mor: str, moe: str, dispatch: str = "gather") -> LMConfig:
  """Three loops of a one-layer MoE core (cycle): the MoE FFN is in the looped block."""
  c = base_config()
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.d_ff = 32, 3, 4, 2, 8, 64
  m.init_std = 0.25
  m.moe.num_experts, m.moe.experts_per_token = 4, 2
  for k, v in MOE[moe].items():
    m.moe[k] = v
  m.recursion.strategy, m.recursion.num_loops, m.recursion.dispatch = "cycle", 3, dispatch
  for k, v in MOR[mor].items():
    m.recursion[k] = v
  m.recursion.allow_noncausal_training = mor == "expert"  # top-k over the sequence
  c.data.seq_len = T
  validate(c)
  return LMConfig.from_config(m, seq_len=T, vocab_size=V)


def _variables(cfg: LMConfig, params) -> dict:
  """MoR state plus a non-zero DeepSeek selection bias (so it changes the routing)."""
  var = variables(cfg, params)
  if cfg.moe.router == "deepseek":
    bias = jnp.asarray(np.linspace(-0.05, 0.05, cfg.moe.num_experts), jnp.float32)
    var["moe_bias"] = {"recursion": {"shared_0": {"moe": {"bias": bias}}}}
  return var


def _assert_trees_close(a, b, **tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path),
                               **tol)


def _loss_fn(cfg: LMConfig, deterministic: bool, x):
  """params -> (cross-entropy + every weighted auxiliary loss, (logits, collections))."""
  model = LM(cfg, deterministic=deterministic)

  def loss(p):
    logits, side = model.apply(_variables(cfg, p), x, mutable=COLS)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, x).mean()
    aux = sum(jax.tree.leaves({k: side.get(k, {}) for k in ("moe_losses", "mor_losses")}))
    return ce + aux, (logits, side)
  return loss


@pytest.mark.parametrize("mor,moe", PARAMS)
def test_masked_and_gathered_paths_agree_on_everything(mor, moe):
  """Training (top-k for expert choice, gathered vs masked) and eval (the causal routers):
  logits, losses and every leaf of moe_losses / moe_stats / mor_losses / mor_stats."""
  cfgs = {d: mor_moe_cfg(mor, moe, d) for d in ("gather", "mask")}
  params = draw_params(LM(cfgs["gather"]), router_std=1.0)
  x = tokens(b=2)
  runs = jax.jit(lambda p: {(det, d): _loss_fn(c, det, x)(p) for det in (False, True)
                            for d, c in cfgs.items()})(params)  # one compilation
  for det in (False, True):
    (l1, (lg1, s1)), (l2, (lg2, s2)) = runs[det, "gather"], runs[det, "mask"]
    np.testing.assert_allclose(lg1, lg2, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    _assert_trees_close(s1, s2, atol=1e-6, rtol=1e-5)
    var = _variables(cfgs["gather"], params)
    if "moe_bias" in var:  # the loss-free bias the train step writes from these loads
      b1, b2 = (update_bias(var["moe_bias"], s["moe_stats"], 0.01) for s in (s1, s2))
      _assert_trees_close(b1, b2, atol=0)
    # only the tokens a loop keeps count: the loads sum to k per kept token and loop
    st = s1["moe_stats"]["recursion"]["shared_0"]["moe"]
    kept = float(np.sum(s1["mor_stats"]["recursion"]["active_fraction"])) * x.size
    assert float(np.sum(st["load"])) == pytest.approx(kept * cfgs["mask"].moe.k)
    if mor == "expert" and not det:  # training top-k: exactly the capacities
      assert kept == sum(np.ceil(np.asarray(CAPS) * T)) * x.shape[0]
    assert 0 < kept < len(CAPS) * x.size  # the MoR router really drops tokens


@pytest.mark.slow  # the masks enter through jnp.where / 0-1 weights: no gradient leaks
@pytest.mark.parametrize("mor", list(MOR))
def test_masked_and_gathered_paths_agree_on_gradients(mor):
  cfgs = [mor_moe_cfg(mor, "topk", d) for d in ("gather", "mask")]
  params = draw_params(LM(cfgs[0]), router_std=1.0)
  x = tokens(b=2)
  g1, g2 = jax.jit(lambda p: [jax.grad(_loss_fn(c, False, x), has_aux=True)(p)[0]
                              for c in cfgs])(params)
  _assert_trees_close(g1, g2, atol=3e-5, rtol=1e-4)


def test_masked_tokens_count_for_nothing_in_the_moe_layer():
  """The MoE layer alone: a masked token changes no statistic, loss or kept output, and
  gets zero output; the kept tokens alone, unmasked, give the same numbers."""
  c = MoEConfig(num_experts=4, k=2, expert_d_ff=16, num_shared=1)
  ffn = MoEFFN(c)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 16))
  mask = jnp.arange(8)[None, :] < jnp.array([[5], [3]])
  p = ffn.init(jax.random.PRNGKey(1), x)
  kept = jnp.concatenate([x[0, :5], x[1, :3]])[None]
  noise = jnp.where(mask[..., None], 0.0, 10.0)  # masked tokens: anything
  apply = lambda x, **kw: ffn.apply(p, x, mutable=["moe_losses", "moe_stats"], **kw)
  (y, side), (y2, side2), (y3, side3) = jax.jit(lambda: (
      apply(x, token_mask_BT=mask), apply(x + noise, token_mask_BT=mask), apply(kept)))()
  _assert_trees_close(side, side2, atol=0)
  np.testing.assert_allclose(y, y2, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(y)[~np.asarray(mask)], 0)
  assert float(side["moe_stats"]["load"].sum()) == 8 * c.k
  np.testing.assert_allclose(y3[0], jnp.concatenate([y[0, :5], y[1, :3]]), atol=1e-6)
  _assert_trees_close(side, side3, atol=1e-6, rtol=1e-6)
