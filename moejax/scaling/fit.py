"""Scaling-law fits: Chinchilla parametric, isoFLOP parabolas, routed (MoE) and
granularity laws, with bootstrap confidence intervals.

All fits work in log space on (size, data, loss) tables from a sweep:
  chinchilla  L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, approach 3):
              Huber loss on log L, L-BFGS from a grid of starts, the best kept;
  isoflop     for each compute budget C, a parabola of L in log N gives N_opt(C); then
              N_opt = k_N C^a and D_opt = k_D C^b by log-log regression (approach 2);
  routed      log L = a log N + b log E_hat + c log N log E_hat + d with the saturating
              effective expert count E_hat (Clark et al. 2022);
  granular    L(N, D, G) = E + (g / G^gamma + A) / N^alpha + B / D^beta (Krajewski et al.
              2024: granularity G as an extra variable).
Intervals: the fit repeated on bootstrap resamples of the rows (percentile 5-95%).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Sequence

import numpy as np
from scipy import optimize


@dataclasses.dataclass
class Fit:
  params: dict[str, float]
  intervals: dict[str, tuple[float, float]]  # 90% bootstrap percentile intervals
  loss: float  # objective at the optimum
  n_points: int
  predict_fn: Callable[..., np.ndarray] | None = None  # the fitted law, if it predicts loss

  def predict(self, *args) -> np.ndarray:
    """The fitted law's loss at the given (N, D[, E or G]); isoFLOP fits have none."""
    if self.predict_fn is None:
      raise ValueError("this fit gives optimal allocations, not a loss law; use its params")
    return self.predict_fn(*args)

  def as_dict(self) -> dict:
    return {"params": self.params, "intervals": {k: list(v) for k, v in self.intervals.items()},
            "loss": self.loss, "n_points": self.n_points}


def huber(r: np.ndarray, delta: float) -> np.ndarray:
  a = np.abs(r)
  return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _bootstrap(fit_once: Callable[[np.ndarray], dict[str, float]], n: int, reps: int,
               seed: int) -> dict[str, tuple[float, float]]:
  rng = np.random.default_rng(seed)
  samples: dict[str, list[float]] = {}
  for _ in range(reps):
    idx = rng.integers(0, n, n)
    try:
      p = fit_once(idx)
    except (ValueError, np.linalg.LinAlgError, FloatingPointError):
      continue
    for k, v in p.items():
      samples.setdefault(k, []).append(v)
  return {k: (float(np.percentile(v, 5)), float(np.percentile(v, 95)))
          for k, v in samples.items()}


# ------------------------------------------------------------------ Chinchilla

def chinchilla_predict(params: dict[str, float], n, d) -> np.ndarray:
  n, d = np.asarray(n, float), np.asarray(d, float)
  return params["E"] + params["A"] / n ** params["alpha"] + params["B"] / d ** params["beta"]


def _chinchilla_once(n, d, loss, delta, starts):
  logn, logd, logl = np.log(n), np.log(d), np.log(loss)

  def objective(x):
    e, a, b, alpha, beta = x
    pred = np.logaddexp(np.logaddexp(e, a - alpha * logn), b - beta * logd)
    return np.sum(huber(pred - logl, delta))

  best = None
  for x0 in starts:
    res = optimize.minimize(objective, np.asarray(x0, float), method="L-BFGS-B")
    if best is None or res.fun < best.fun:
      best = res
  e, a, b, alpha, beta = best.x
  return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)),
          "alpha": float(alpha), "beta": float(beta)}, float(best.fun)


def fit_chinchilla(n: Sequence[float], d: Sequence[float], loss: Sequence[float], *,
                   delta: float = 1e-3, bootstrap: int = 100, seed: int = 0,
                   grid: dict[str, Sequence[float]] | None = None) -> Fit:
  """Fit L(N, D) = E + A/N^alpha + B/D^beta. n: parameters, d: tokens, loss: nats."""
  n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
  if not (n.shape == d.shape == loss.shape) or n.ndim != 1 or n.size < 5:
    raise ValueError(f"fit_chinchilla needs >= 5 matching rows; got shapes {n.shape}, "
                     f"{d.shape}, {loss.shape}")
  g = grid or {"e": (-1.0, 0.0, 0.5), "a": (0.0, 5.0, 10.0), "b": (0.0, 5.0, 10.0),
               "alpha": (0.2, 0.5), "beta": (0.2, 0.5)}
  starts = list(itertools.product(g["e"], g["a"], g["b"], g["alpha"], g["beta"]))
  params, obj = _chinchilla_once(n, d, loss, delta, starts)
  x_best = (np.log(params["E"]), np.log(params["A"]), np.log(params["B"]), params["alpha"],
            params["beta"])
  # bootstrap refits start from the best fit (and a few grid points) to stay cheap
  boot_starts = [x_best] + starts[:: max(1, len(starts) // 4)]
  intervals = _bootstrap(lambda idx: _chinchilla_once(n[idx], d[idx], loss[idx], delta,
                                                      boot_starts)[0],
                         n.size, bootstrap, seed) if bootstrap else {}
  return Fit(params, intervals, obj, int(n.size),
             lambda nn, dd: chinchilla_predict(params, nn, dd))


def compute_optimal(params: dict[str, float], compute: float) -> tuple[float, float]:
  """N_opt, D_opt for C = 6 N D under a fitted Chinchilla law (closed form)."""
  a, b, alpha, beta = params["A"], params["B"], params["alpha"], params["beta"]
  g = (alpha * a / (beta * b)) ** (1 / (alpha + beta))
  n_opt = g * (compute / 6) ** (beta / (alpha + beta))
  return float(n_opt), float(compute / (6 * n_opt))


# ------------------------------------------------------------------ isoFLOP

def fit_isoflop(compute: Sequence[float], n: Sequence[float], loss: Sequence[float], *,
                bootstrap: int = 100, seed: int = 0) -> Fit:
  """Per budget a parabola of loss in log N -> N_opt(C); then power laws in C.

  Returns params a (N_opt ~ C^a), b (D_opt ~ C^b, D = C / 6N), log_kN, log_kD, and
  `optima`: [(C, N_opt, D_opt, L_min)] per budget (in Fit.params["optima"] as a list).
  """
  c, n, loss = (np.asarray(v, float) for v in (compute, n, loss))
  budgets = np.unique(c)
  if budgets.size < 2:
    raise ValueError("fit_isoflop needs at least two compute budgets")

  def once(idx):
    cc, nn, ll = c[idx], n[idx], loss[idx]
    optima = []
    for b_ in np.unique(cc):
      m = cc == b_
      if np.unique(nn[m]).size < 3:
        continue
      x = np.log(nn[m])
      q2, q1, q0 = np.polyfit(x, ll[m], 2)
      if q2 <= 0:
        continue  # no minimum inside the sampled sizes
      xo = -q1 / (2 * q2)
      optima.append((b_, float(np.exp(xo)), b_ / (6 * np.exp(xo)), q0 - q1 * q1 / (4 * q2)))
    if len(optima) < 2:
      raise ValueError("fewer than two budgets with a minimum")
    arr = np.asarray(optima)
    a_, kn = np.polyfit(np.log(arr[:, 0]), np.log(arr[:, 1]), 1)
    b_, kd = np.polyfit(np.log(arr[:, 0]), np.log(arr[:, 2]), 1)
    return {"a": float(a_), "b": float(b_), "log_kN": float(kn), "log_kD": float(kd)}, optima

  params, optima = once(np.arange(c.size))
  intervals = _bootstrap(lambda idx: once(idx)[0], c.size, bootstrap, seed) if bootstrap else {}
  fit = Fit(dict(params), intervals, 0.0, int(c.size))
  fit.params["optima"] = optima  # type: ignore[assignment]
  return fit


# ------------------------------------------------------------------ routed (MoE)

def effective_experts(e, e_start: float = 1.85, e_max: float = 256.0) -> np.ndarray:
  """Clark et al. (2022)'s saturating transform of the expert count E:

    1 / E_hat = 1 / (E - 1 + (1/e_start - 1/e_max)^-1) + 1 / e_max.

  E_hat(1) = e_start, not 1: at E = 1 the first term is 1/e_start - 1/e_max, so
  1/E_hat = 1/e_start. For E << e_max, E_hat ~ E - 1 + e_start (E shifted by
  e_start - 1), and E_hat -> e_max as E -> inf (diminishing returns). So a dense model
  (E = 1) sits at log E_hat = log e_start, not 0: in routed_predict its law is
  (a + c log e_start) log N + d + b log e_start. (Before issue 12 this function used
  1/(e_start - 1) in place of 1/e_start, giving E_hat(1) = e_start - 1 = 0.85.)
  """
  e = np.asarray(e, float)
  inner = 1.0 / (e - 1.0 + 1.0 / (1.0 / e_start - 1.0 / e_max)) + 1.0 / e_max
  return 1.0 / inner


def routed_predict(p: dict[str, float], n, e, e_start: float = 1.85,
                   e_max: float = 256.0) -> np.ndarray:
  ln, le = np.log(np.asarray(n, float)), np.log(effective_experts(e, e_start, e_max))
  return np.exp(p["a"] * ln + p["b"] * le + p["c"] * ln * le + p["d"])


def fit_routed(n: Sequence[float], experts: Sequence[float], loss: Sequence[float], *,
               e_start: float = 1.85, e_max: float = 256.0, bootstrap: int = 100,
               seed: int = 0) -> Fit:
  """log L = a log N + b log E_hat + c log N log E_hat + d (least squares)."""
  n, e, loss = (np.asarray(v, float) for v in (n, experts, loss))

  def once(idx):
    ln, le = np.log(n[idx]), np.log(effective_experts(e[idx], e_start, e_max))
    x = np.stack([ln, le, ln * le, np.ones_like(ln)], 1)
    coef, *_ = np.linalg.lstsq(x, np.log(loss[idx]), rcond=None)
    return dict(zip(("a", "b", "c", "d"), map(float, coef)))

  params = once(np.arange(n.size))
  pred = np.log(routed_predict(params, n, e, e_start, e_max))
  obj = float(np.mean((pred - np.log(loss)) ** 2))
  intervals = _bootstrap(once, n.size, bootstrap, seed) if bootstrap else {}
  return Fit(params, intervals, obj, int(n.size),
             lambda nn, ee: routed_predict(params, nn, ee, e_start, e_max))


# ------------------------------------------------------------------ granularity

def granular_predict(p: dict[str, float], n, d, g) -> np.ndarray:
  n, d, g = (np.asarray(v, float) for v in (n, d, g))
  return p["E"] + (p["g"] / g ** p["gamma"] + p["A"]) / n ** p["alpha"] + p["B"] / d ** p["beta"]


def fit_granular(n, d, g, loss, *, delta: float = 1e-3, bootstrap: int = 50,
                 seed: int = 0) -> Fit:
  """L = E + (g / G^gamma + A) / N^alpha + B / D^beta, Huber on log L."""
  n, d, g, loss = (np.asarray(v, float) for v in (n, d, g, loss))
  names = ("E", "A", "B", "g", "alpha", "beta", "gamma")

  def once(idx):
    ln, ld, lg, ll = np.log(n[idx]), np.log(d[idx]), np.log(g[idx]), np.log(loss[idx])

    def objective(x):
      e, a, b, gg, alpha, beta, gamma = x
      first = np.logaddexp(gg - gamma * lg, a) - alpha * ln
      pred = np.logaddexp(np.logaddexp(e, first), b - beta * ld)
      return np.sum(huber(pred - ll, delta))

    best = None
    for x0 in itertools.product((0.0, 0.5), (2.0, 6.0), (2.0, 6.0), (2.0, 6.0), (0.3,), (0.3,),
                                (0.3, 0.8)):
      res = optimize.minimize(objective, np.asarray(x0, float), method="L-BFGS-B")
      if best is None or res.fun < best.fun:
        best = res
    e, a, b, gg, alpha, beta, gamma = best.x
    return dict(zip(names, map(float, (np.exp(e), np.exp(a), np.exp(b), np.exp(gg), alpha,
                                       beta, gamma)))), float(best.fun)

  params, obj = once(np.arange(n.size))
  intervals = _bootstrap(lambda idx: once(idx)[0], n.size, bootstrap, seed) if bootstrap else {}
  return Fit(params, intervals, obj, int(n.size),
             lambda nn, dd, gg: granular_predict(params, nn, dd, gg))
