"""Deciding whether two models differ: paired differences over seeds with a Student-t
interval, Holm's correction across a sweep's declared comparisons, and a paired bootstrap
over held-out documents. numpy and scipy's t distribution only (scipy comes with JAX).

Seeds pair runs that share initialisation draws and data order, so the per-seed difference
A - B removes what every model shares (a seed whose data is harder raises every model's
loss); its spread, not the spread of each model's losses, measures how much A - B moves
from seed to seed. Documents pair the two models' losses on the same held-out text.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import special


def t_quantile(q: float, df: int) -> float:
  """The q-quantile of Student's t with df degrees of freedom (t_{0.975, 2} = 4.3027)."""
  if df < 1:
    raise ValueError(f"t quantile needs df >= 1, got {df}")
  return float(special.stdtrit(df, q))


def t_two_sided_p(t: float, df: int) -> float:
  """P(|T| >= |t|) for T ~ t(df)."""
  return float(2.0 * special.stdtr(df, -abs(t)))


@dataclasses.dataclass(frozen=True)
class PairedT:
  """A - B over paired runs: the differences, their mean and sample sd, the t statistic with
  n - 1 degrees of freedom, its two-sided p and the mean's interval at `level`. With one
  pair only the mean (sd, t, p and the interval are None)."""
  diffs: tuple[float, ...]
  mean: float
  sd: float | None
  t: float | None
  df: int
  p: float | None
  ci: tuple[float, float] | None
  level: float

  def interval(self, level: float) -> tuple[float, float] | None:
    """The mean's t interval at another level (Holm's step levels)."""
    if self.sd is None:
      return None
    half = t_quantile(0.5 + level / 2, self.df) * self.sd / math.sqrt(self.df + 1)
    return (self.mean - half, self.mean + half)


def paired_t(a, b, level: float = 0.95) -> PairedT:
  """Paired t of a - b (equal-length sequences, pair i = seed i)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or not len(a):
    raise ValueError(f"paired_t needs two equal-length non-empty sequences, got {a.shape} and {b.shape}")
  d = a - b
  n, mean = len(d), float(d.mean())
  if n < 2:
    return PairedT(tuple(d.tolist()), mean, None, None, 0, None, None, level)
  sd = float(d.std(ddof=1))
  se = sd / math.sqrt(n)
  if se == 0.0:  # every pair differs by the same amount: no spread to scale by
    t, p = (math.copysign(math.inf, mean), 0.0) if mean else (0.0, 1.0)
  else:
    t = mean / se
    p = t_two_sided_p(t, n - 1)
  out = PairedT(tuple(d.tolist()), mean, sd, t, n - 1, p, None, level)
  return dataclasses.replace(out, ci=out.interval(level))


def holm(pvalues, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Holm-Bonferroni over m tests -> (adjusted p-values, rejected, step level alpha_i).

  The test with the i-th smallest p (i = 1..m) is at level alpha / (m - i + 1); it is
  rejected when it and every test with a smaller p pass theirs. Adjusted p-values: the
  running maximum of (m - i + 1) p_(i), capped at 1; rejected = adjusted <= alpha. A None
  p-value (a comparison that could not be tested) counts in m and is never rejected."""
  p = np.array([1.0 if x is None else float(x) for x in pvalues], np.float64)
  m = len(p)
  if not m:
    return np.zeros(0), np.zeros(0, bool), np.zeros(0)
  order = np.argsort(p, kind="stable")
  factors = m - np.arange(m)  # m, m-1, ..., 1
  adjusted = np.empty(m)
  adjusted[order] = np.minimum(np.maximum.accumulate(factors * p[order]), 1.0)
  levels = np.empty(m)
  levels[order] = alpha / factors
  rejected = adjusted <= alpha
  for i, x in enumerate(pvalues):
    if x is None:
      rejected[i] = False
  return adjusted, rejected, levels


@dataclasses.dataclass(frozen=True)
class Bootstrap:
  """The token-weighted mean loss difference A - B over documents (mean over seeds), and
  its percentile interval from resampling documents with replacement."""
  estimate: float
  ci: tuple[float, float]
  p: float           # two-sided: 2 min(P*(stat <= 0), P*(stat >= 0)), at least 2 / (B + 1)
  documents: int     # documents with at least one scored token
  resamples: int
  level: float


def paired_bootstrap(loss_a, loss_b, tokens, resamples: int = 10_000, level: float = 0.95,
                     seed: int = 0) -> Bootstrap:
  """loss_a, loss_b: [D] or [seeds, D] summed NLL of each held-out document (the same
  documents, in the same order, for every run); tokens: [D] scored tokens of each document.

  The statistic is sum_d mean_s(a_sd - b_sd) / sum_d tokens_d: the mean over seeds of each
  seed's difference in validation loss (nats/token). Each resample draws D documents with
  replacement (numpy's default_rng(seed): the same draws for every comparison of a sweep)."""
  a, b = np.atleast_2d(np.asarray(loss_a, np.float64)), np.atleast_2d(np.asarray(loss_b, np.float64))
  w = np.asarray(tokens, np.float64)
  if a.shape != b.shape or a.shape[-1] != w.shape[-1] or w.ndim != 1:
    raise ValueError(f"paired_bootstrap: shapes {a.shape}, {b.shape} and tokens {w.shape} do not pair")
  keep = w > 0
  diff, w = (a - b).mean(axis=0)[keep], w[keep]
  n = len(w)
  if not n:
    raise ValueError("paired_bootstrap: no document has a scored token")
  rng = np.random.default_rng(seed)
  stats = np.empty(resamples)
  chunk = max(1, 4_000_000 // n)  # index arrays of at most ~32 MB
  for start in range(0, resamples, chunk):
    idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
    stats[start:start + len(idx)] = diff[idx].sum(axis=1) / w[idx].sum(axis=1)
  tail = (1.0 - level) / 2
  lo, hi = np.quantile(stats, [tail, 1.0 - tail])
  below, above = (np.sum(stats <= 0) + 1) / (resamples + 1), (np.sum(stats >= 0) + 1) / (resamples + 1)
  return Bootstrap(float(diff.sum() / w.sum()), (float(lo), float(hi)), float(min(1.0, 2 * min(below, above))),
                   n, resamples, level)
