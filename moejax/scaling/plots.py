"""Plots of sweep data and fitted laws (matplotlib, Agg backend, PNG files).

Each function takes plain arrays (as read from a sweep's results.csv) and a `Fit` from
moejax.scaling.fit, draws the measured points and the fitted law, and saves `path`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from moejax.scaling.fit import Fit


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  _plt().close(fig)
  return path


def chinchilla(n: Sequence[float], d: Sequence[float], loss: Sequence[float], fit: Fit,
               path: str, title: str = "L(N, D) = E + A/N^alpha + B/D^beta") -> str:
  """Loss against tokens, one colour per model size, with the fitted law's curves."""
  plt = _plt()
  n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
  fig, ax = plt.subplots(figsize=(6, 4))
  dd = np.geomspace(d.min() / 1.5, d.max() * 1.5, 100)
  for i, size in enumerate(np.unique(n)):
    m = n == size
    color = f"C{i}"
    ax.scatter(d[m], loss[m], color=color, label=f"N = {size / 1e6:.3g}M")
    ax.plot(dd, fit.predict(np.full_like(dd, size), dd), color=color, lw=1)
  p = fit.params
  ax.set_xscale("log")
  ax.set_xlabel("training tokens D")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title(f"{title}\nalpha={p['alpha']:.2f} beta={p['beta']:.2f} E={p['E']:.2f}",
               fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def isoflop(compute: Sequence[float], n: Sequence[float], loss: Sequence[float], fit: Fit,
            path: str) -> str:
  """Left: loss against N per compute budget with each budget's parabola and minimum.
  Right: the minima's N_opt against C with the fitted power law."""
  plt = _plt()
  c, n, loss = (np.asarray(v, float) for v in (compute, n, loss))
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  for i, b in enumerate(np.unique(c)):
    m = c == b
    color = f"C{i}"
    ax.scatter(n[m], loss[m], color=color, label=f"C = {b:.2g}")
    if np.unique(n[m]).size >= 3:
      q = np.polyfit(np.log(n[m]), loss[m], 2)
      xx = np.linspace(np.log(n[m].min()) - 0.3, np.log(n[m].max()) + 0.3, 100)
      ax.plot(np.exp(xx), np.polyval(q, xx), color=color, lw=1)
  optima = np.asarray(fit.params["optima"])
  ax.scatter(optima[:, 1], optima[:, 3], marker="*", s=150, color="k", label="N_opt(C)")
  ax.set_xscale("log")
  ax.set_xlabel("parameters N")
  ax.set_ylabel("validation loss")
  ax.set_title("isoFLOP profiles")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  cc = np.geomspace(optima[:, 0].min() / 2, optima[:, 0].max() * 2, 50)
  ax2.scatter(optima[:, 0], optima[:, 1], color="k")
  ax2.plot(cc, np.exp(fit.params["log_kN"]) * cc ** fit.params["a"], "k-", lw=1,
           label=f"N_opt ~ C^{fit.params['a']:.2f}")
  ax2.scatter(optima[:, 0], optima[:, 2], color="C3")
  ax2.plot(cc, np.exp(fit.params["log_kD"]) * cc ** fit.params["b"], "C3-", lw=1,
           label=f"D_opt ~ C^{fit.params['b']:.2f}")
  ax2.set_xscale("log")
  ax2.set_yscale("log")
  ax2.set_xlabel("compute C (FLOPs)")
  ax2.set_title("compute-optimal allocation")
  ax2.grid(alpha=0.3)
  ax2.legend(fontsize=8)
  return _save(fig, path)


def routed(n: Sequence[float], experts: Sequence[float], loss: Sequence[float], fit: Fit,
           path: str) -> str:
  """Loss against expert count (log), one colour per dense-equivalent size, with the
  fitted routed law."""
  plt = _plt()
  n, e, loss = (np.asarray(v, float) for v in (n, experts, loss))
  fig, ax = plt.subplots(figsize=(6, 4))
  ee = np.geomspace(1, e.max() * 2, 100)
  for i, size in enumerate(np.unique(n)):
    m = n == size
    color = f"C{i}"
    ax.scatter(e[m], loss[m], color=color, label=f"N = {size / 1e6:.3g}M")
    ax.plot(ee, fit.predict(np.full_like(ee, size), ee), color=color, lw=1)
  p = fit.params
  ax.set_xscale("log", base=2)
  ax.set_xlabel("experts E (1 = dense)")
  ax.set_ylabel("validation loss")
  ax.set_title(f"log L = a log N + b log E^ + c log N log E^ + d\n"
               f"a={p['a']:.3f} b={p['b']:.3f} c={p['c']:.4f}", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def curves(rows: Sequence[dict], path: str, key: str = "name") -> str:
  """Validation loss against tokens for every sweep row that has a `curve` [(step, loss)]
  and `tokens` / `steps` (tokens per step = tokens / steps)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, r in enumerate(rows):
    curve = np.asarray(r.get("curve") or [], float)
    if curve.size == 0 or not r.get("steps"):
      continue
    per_step = r["tokens"] / r["steps"]
    ax.plot(np.maximum(curve[:, 0], 1) * per_step, curve[:, 1], color=f"C{i % 10}", lw=1,
            label=str(r.get(key, i)))
  ax.set_xscale("log")
  ax.set_xlabel("tokens")
  ax.set_ylabel("validation loss")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6, ncol=2)
  return _save(fig, path)
