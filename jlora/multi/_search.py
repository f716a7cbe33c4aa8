"""Seeded, bounded gradient-free minimisers with an ask/tell interface (NumPy).

``ask()`` returns a candidate (a float64 vector inside the box), ``tell(x, value)``
reports its objective value, ``recommend()`` is the best candidate told so far.
LoRAHub (``jlora.multi.lorahub``) accepts these or any object with the same
``ask``/``tell`` methods.
"""

from __future__ import annotations

import math

import numpy as np


class _Box:
  def __init__(self, dim: int, lower: float, upper: float, x0, seed: int, what: str):
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
      raise ValueError(f"{what}: dim must be a positive integer, got {dim!r}.")
    if not lower < upper:
      raise ValueError(f"{what}: lower ({lower}) must be below upper ({upper}).")
    self.dim, self.lower, self.upper = int(dim), float(lower), float(upper)
    x0 = np.zeros(self.dim) if x0 is None else np.asarray(x0, np.float64).reshape(-1)
    if x0.shape != (self.dim,):
      raise ValueError(f"{what}: x0 has {x0.size} entries; expected {self.dim}.")
    self.x0 = np.clip(x0, self.lower, self.upper)
    self.rng = np.random.default_rng(seed)
    self.best_x, self.best_f = self.x0.copy(), math.inf

  def clip(self, x):
    return np.clip(x, self.lower, self.upper)

  def record(self, x, f: float) -> None:
    if f < self.best_f:
      self.best_x, self.best_f = np.array(x, np.float64), float(f)

  def recommend(self) -> np.ndarray:
    """The best candidate told so far."""
    return self.best_x.copy()


class OnePlusOneES(_Box):
  """(1+1) evolution strategy with the 1/5 success rule, in the box ``[lower, upper]^dim``.

  The first candidate is ``x0``; each next one is the current parent plus
  Gaussian noise of step ``sigma`` (clipped to the box). A candidate at least as
  good becomes the parent and multiplies ``sigma`` by ``e^(1/3)``; a worse one
  multiplies it by ``e^(-1/12)``, so the step settles where one candidate in
  five succeeds.

  Example:
    >>> import numpy as np
    >>> from jlora.multi import OnePlusOneES
    >>> es = OnePlusOneES(2, seed=0)
    >>> for _ in range(60):
    ...   x = es.ask()
    ...   es.tell(x, float(np.sum((x - 0.5) ** 2)))
    >>> bool(np.allclose(es.recommend(), 0.5, atol=0.1))
    True
  """

  def __init__(self, dim: int, *, lower: float = -1.5, upper: float = 1.5, sigma: float = 0.3,
               x0=None, seed: int = 0):
    super().__init__(dim, lower, upper, x0, seed, "OnePlusOneES")
    if not sigma > 0:
      raise ValueError(f"OnePlusOneES: sigma must be > 0, got {sigma!r}.")
    self.sigma = float(sigma)
    self.parent, self.parent_f = self.x0.copy(), None

  def ask(self) -> np.ndarray:
    if self.parent_f is None:
      return self.parent.copy()
    return self.clip(self.parent + self.sigma * self.rng.standard_normal(self.dim))

  def tell(self, x, value: float) -> None:
    x, value = np.asarray(x, np.float64), float(value)
    self.record(x, value)
    if self.parent_f is None:
      self.parent_f = value
      return
    span = self.upper - self.lower
    if value <= self.parent_f:
      self.parent, self.parent_f = x, value
      self.sigma = min(self.sigma * math.exp(1 / 3), span)
    else:
      self.sigma = max(self.sigma * math.exp(-1 / 12), 1e-6 * span)


class CMAES(_Box):
  """CMA-ES (Hansen's (μ/μ_w, λ) with rank-one and rank-μ updates), in the box ``[lower, upper]^dim``.

  Candidates outside the box are clipped, and the update uses the clipped
  points. ``tell`` may come in any order; a generation updates the
  distribution once all its ``popsize`` candidates are told.

  Example:
    >>> import numpy as np
    >>> from jlora.multi import CMAES
    >>> es = CMAES(3, sigma=0.3, seed=0)
    >>> for _ in range(150):
    ...   x = es.ask()
    ...   es.tell(x, float(np.sum((x - 0.2) ** 2)))
    >>> bool(np.allclose(es.recommend(), 0.2, atol=0.05))
    True
  """

  def __init__(self, dim: int, *, lower: float = -1.5, upper: float = 1.5, sigma: float = 0.2,
               x0=None, popsize: int | None = None, seed: int = 0):
    super().__init__(dim, lower, upper, x0, seed, "CMAES")
    if not sigma > 0:
      raise ValueError(f"CMAES: sigma must be > 0, got {sigma!r}.")
    n = self.dim
    self.lam = popsize or 4 + int(3 * math.log(n))
    if self.lam < 2:
      raise ValueError(f"CMAES: popsize must be >= 2, got {popsize!r}.")
    self.mu = self.lam // 2
    w = math.log(self.mu + 0.5) - np.log(np.arange(1, self.mu + 1))
    self.weights = w / w.sum()
    self.mueff = 1.0 / np.sum(self.weights ** 2)
    self.cc = (4 + self.mueff / n) / (n + 4 + 2 * self.mueff / n)
    self.cs = (self.mueff + 2) / (n + self.mueff + 5)
    self.c1 = 2 / ((n + 1.3) ** 2 + self.mueff)
    self.cmu = min(1 - self.c1, 2 * (self.mueff - 2 + 1 / self.mueff) / ((n + 2) ** 2 + self.mueff))
    self.damps = 1 + 2 * max(0.0, math.sqrt((self.mueff - 1) / (n + 1)) - 1) + self.cs
    self.chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
    self.mean, self.sigma = self.x0.copy(), float(sigma)
    self.cov, self.pc, self.ps = np.eye(n), np.zeros(n), np.zeros(n)
    self.basis, self.scales = np.eye(n), np.ones(n)
    self.generation = 0
    self.pending: list[np.ndarray] = []
    self.told: list[tuple[float, np.ndarray]] = []

  def ask(self) -> np.ndarray:
    z = self.rng.standard_normal(self.dim)
    x = self.clip(self.mean + self.sigma * (self.basis @ (self.scales * z)))
    self.pending.append(x)
    return x.copy()

  def tell(self, x, value: float) -> None:
    x, value = np.asarray(x, np.float64), float(value)
    self.record(x, value)
    for i, p in enumerate(self.pending):
      if np.array_equal(p, x):
        del self.pending[i]
        break
    else:
      raise ValueError("CMAES.tell: this candidate was not asked (or was already told).")
    self.told.append((value, x))
    if len(self.told) >= self.lam:
      self._update()

  def _update(self) -> None:
    n = self.dim
    self.told.sort(key=lambda t: t[0])
    ys = np.stack([(x - self.mean) / self.sigma for _, x in self.told[:self.mu]])
    self.told = []
    self.generation += 1
    y_w = self.weights @ ys
    self.mean = self.mean + self.sigma * y_w
    inv_sqrt = self.basis @ np.diag(1 / self.scales) @ self.basis.T
    self.ps = (1 - self.cs) * self.ps + math.sqrt(self.cs * (2 - self.cs) * self.mueff) * (inv_sqrt @ y_w)
    norm_ps = np.linalg.norm(self.ps)
    hsig = norm_ps / math.sqrt(1 - (1 - self.cs) ** (2 * self.generation)) / self.chi_n < 1.4 + 2 / (n + 1)
    self.pc = (1 - self.cc) * self.pc + hsig * math.sqrt(self.cc * (2 - self.cc) * self.mueff) * y_w
    rank_mu = (ys.T * self.weights) @ ys
    self.cov = ((1 - self.c1 - self.cmu) * self.cov
                + self.c1 * (np.outer(self.pc, self.pc) + (1 - hsig) * self.cc * (2 - self.cc) * self.cov)
                + self.cmu * rank_mu)
    self.sigma *= math.exp((self.cs / self.damps) * (norm_ps / self.chi_n - 1))
    self.sigma = min(self.sigma, self.upper - self.lower)
    self.cov = (self.cov + self.cov.T) / 2
    vals, self.basis = np.linalg.eigh(self.cov)
    self.scales = np.sqrt(np.maximum(vals, 1e-20))
