"""Scaling-law fits recover known laws from noisy synthetic data (moejax/scaling/fit.py)."""

from __future__ import annotations

import numpy as np
import pytest

from moejax.scaling import fit

TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al.


def grid_points(rng, noise=0.005):
  n = np.repeat(np.logspace(6, 9, 7), 6)
  d = np.tile(np.logspace(8, 11, 6), 7)
  loss = fit.chinchilla_predict(TRUE, n, d) * np.exp(noise * rng.standard_normal(n.size))
  return n, d, loss


def test_chinchilla_fit_recovers_exponents_within_5_percent():
  rng = np.random.default_rng(0)
  n, d, loss = grid_points(rng)
  f = fit.fit_chinchilla(n, d, loss, bootstrap=8)
  for k in ("alpha", "beta", "E"):
    assert f.params[k] == pytest.approx(TRUE[k], rel=0.05), (k, f.params)
  lo, hi = f.intervals["alpha"]
  assert lo <= f.params["alpha"] <= hi and hi - lo < 0.1
  np.testing.assert_allclose(f.predict(n, d), fit.chinchilla_predict(TRUE, n, d), rtol=0.02)


def test_chinchilla_fit_rejects_too_few_points():
  with pytest.raises(ValueError, match=">= 5 matching rows"):
    fit.fit_chinchilla([1e6, 1e7], [1e9, 1e9], [3.0, 2.9])


def test_compute_optimal_matches_a_brute_force_search():
  c = 1e21
  n_opt, d_opt = fit.compute_optimal(TRUE, c)
  ns = np.logspace(8, 12, 20001)
  best = ns[np.argmin(fit.chinchilla_predict(TRUE, ns, c / (6 * ns)))]
  assert n_opt == pytest.approx(best, rel=1e-3) and d_opt == pytest.approx(c / (6 * n_opt))


def test_isoflop_recovers_the_allocation_exponents():
  rng = np.random.default_rng(1)
  rows = []
  for c in np.logspace(18, 22, 5):
    n_opt, _ = fit.compute_optimal(TRUE, c)
    for n in n_opt * np.logspace(-0.6, 0.6, 9):
      loss = fit.chinchilla_predict(TRUE, n, c / (6 * n)) * np.exp(0.002 * rng.standard_normal())
      rows.append((c, n, loss))
  c, n, loss = map(np.asarray, zip(*rows))
  f = fit.fit_isoflop(c, n, loss, bootstrap=20)
  a_true = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
  assert f.params["a"] == pytest.approx(a_true, rel=0.05)
  assert f.params["b"] == pytest.approx(1 - a_true, rel=0.05)
  assert len(f.params["optima"]) == 5


def test_routed_law_recovers_its_coefficients():
  rng = np.random.default_rng(2)
  true = {"a": -0.08, "b": -0.05, "c": 0.003, "d": 1.9}
  n = np.repeat(np.logspace(6, 10, 9), 7)
  e = np.tile([1, 2, 4, 8, 16, 32, 64], 9)
  le = np.log(fit.effective_experts(e))
  logl = true["a"] * np.log(n) + true["b"] * le + true["c"] * np.log(n) * le + true["d"]
  loss = np.exp(logl + 0.002 * rng.standard_normal(n.size))
  f = fit.fit_routed(n, e, loss, bootstrap=20)
  for k in ("a", "b"):
    assert f.params[k] == pytest.approx(true[k], rel=0.05), (k, f.params)
  e_hat = fit.effective_experts(np.array([1, 2, 8, 64, 1e6]))
  assert np.all(np.diff(e_hat) > 0)  # more experts help, with diminishing returns
  assert e_hat[2] == pytest.approx(8, rel=0.1) and 250 < e_hat[-1] < 256


def test_effective_experts_is_clark_et_al_saturating_transform():
  """1/E_hat = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max (Clark et al. 2022): E_hat(1)
  = E_start (not 1), E_hat -> E - 1 + E_start when E_max -> inf, E_hat -> E_max as E -> inf."""
  e_start, e_max = 1.85, 256.0
  e = np.array([1.0, 2.0, 8.0, 64.0, 512.0])
  want = 1.0 / (1.0 / (e - 1.0 + 1.0 / (1.0 / e_start - 1.0 / e_max)) + 1.0 / e_max)
  np.testing.assert_allclose(fit.effective_experts(e, e_start, e_max), want, rtol=1e-12)
  assert float(fit.effective_experts(1.0)) == pytest.approx(e_start, rel=1e-12)
  assert float(fit.effective_experts(1.0, 3.0, 100.0)) == pytest.approx(3.0, rel=1e-12)
  np.testing.assert_allclose(fit.effective_experts(e, e_start, 1e15), e - 1 + e_start, rtol=1e-9)
  assert float(fit.effective_experts(1e12, e_start, e_max)) == pytest.approx(e_max, rel=1e-6)


def test_granularity_law_recovers_exponents():
  rng = np.random.default_rng(3)
  true = {"E": 1.5, "A": 30.0, "B": 200.0, "g": 40.0, "alpha": 0.3, "beta": 0.3, "gamma": 0.6}
  n = np.repeat(np.logspace(6, 9, 5), 12)
  d = np.tile(np.repeat(np.logspace(8, 11, 4), 3), 5)
  g = np.tile([1, 4, 16], 20)
  loss = fit.granular_predict(true, n, d, g) * np.exp(0.002 * rng.standard_normal(n.size))
  f = fit.fit_granular(n, d, g, loss, bootstrap=0)
  for k in ("alpha", "beta", "gamma"):
    assert f.params[k] == pytest.approx(true[k], rel=0.05), (k, f.params)
