"""moe.research.stats against hand-computed numbers: the paired t interval over seeds,
Holm's correction and the paired bootstrap over documents, each with a case that passes
and one that does not."""

import math

import numpy as np
import pytest

from moe.research import stats


def test_t_quantiles_are_the_tables():
  assert stats.t_quantile(0.975, 1) == pytest.approx(12.706205, abs=1e-6)
  assert stats.t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-6)
  assert stats.t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-6)
  assert stats.t_quantile(0.975, 10_000) == pytest.approx(1.959964, abs=1e-3)  # the normal's
  with pytest.raises(ValueError, match="df >= 1"):
    stats.t_quantile(0.975, 0)


def test_paired_t_of_the_issue_example():
  """DeepSeekMoE - GShard per seed +.047 / +.018 / +.039 (docs/results.md): mean +.0347,
  sd .01498, t = 4.01 with 2 df. With 2 df the t CDF is 1/2 + t / (2 sqrt(2 + t^2)), so the
  two-sided p is 1 - t / sqrt(2 + t^2) = 0.0570: the 95% interval just includes zero."""
  gshard = np.array([2.372, 2.357, 2.446])
  r = stats.paired_t(gshard + [0.047, 0.018, 0.039], gshard)
  assert r.diffs == pytest.approx((0.047, 0.018, 0.039))
  assert r.mean == pytest.approx(0.104 / 3)
  sd = math.sqrt(((0.047 - 0.104 / 3) ** 2 + (0.018 - 0.104 / 3) ** 2 + (0.039 - 0.104 / 3) ** 2) / 2)
  assert r.sd == pytest.approx(sd) and sd == pytest.approx(0.014978, abs=1e-6)
  assert r.df == 2 and r.t == pytest.approx(4.00897, abs=1e-4)
  assert r.p == pytest.approx(1 - r.t / math.sqrt(2 + r.t ** 2)) and r.p == pytest.approx(0.05696, abs=1e-4)
  half = 4.302653 * sd / math.sqrt(3)
  assert r.ci == pytest.approx((r.mean - half, r.mean + half), abs=1e-6)
  assert r.ci[0] < 0 < r.ci[1]  # includes zero
  # DeepSeekMoE - Hash, +.083 / +.055 / +.081: t = 8.09, p = 0.0149: excludes zero.
  hashed = stats.paired_t([0.083, 0.055, 0.081], [0, 0, 0])
  assert hashed.t == pytest.approx(8.0948, abs=1e-3) and hashed.p == pytest.approx(0.01492, abs=1e-4)
  assert hashed.ci[0] > 0
  assert hashed.interval(0.99)[0] < 0 < hashed.ci[0]  # a stricter level widens it past zero


def test_paired_t_edge_cases():
  one = stats.paired_t([2.5], [2.4])
  assert one.mean == pytest.approx(0.1) and one.sd is None and one.ci is None and one.p is None
  same = stats.paired_t([3.0, 3.1], [2.0, 2.1])  # the same difference twice: no spread
  assert same.p == 0.0 and same.ci == pytest.approx((1.0, 1.0))
  assert stats.paired_t([1.0, 2.0], [1.0, 2.0]).p == 1.0
  with pytest.raises(ValueError, match="equal-length"):
    stats.paired_t([1.0, 2.0], [1.0])


def test_holm_by_hand():
  # sorted .01, .03, .04 -> x3, x2, x1 = .03, .06, .04 -> running max .03, .06, .06
  adjusted, rejected, levels = stats.holm([0.01, 0.04, 0.03])
  assert adjusted == pytest.approx([0.03, 0.06, 0.06])
  assert rejected.tolist() == [True, False, False]
  assert levels == pytest.approx([0.05 / 3, 0.05, 0.05 / 2])
  adjusted, rejected, _ = stats.holm([0.01, 0.02])  # .02, .02: both pass
  assert adjusted == pytest.approx([0.02, 0.02]) and rejected.tolist() == [True, True]
  # Untestable comparisons count in m and never pass; p-values cap at 1.
  adjusted, rejected, _ = stats.holm([0.01, None, 0.6])
  assert adjusted == pytest.approx([0.03, 1.0, 1.0]) and rejected.tolist() == [True, False, False]
  # Uncorrected, .04 would pass on its own: Holm is stricter than testing each at .05.
  assert stats.holm([0.04, 0.04])[1].tolist() == [False, False]


def test_bootstrap_of_two_documents_by_hand():
  """Documents d1 (A - B: +1 nat over 10 tokens) and d2 (-3 over 10): the estimate is -2 / 20;
  a resample is d1 d1 (+0.1, prob 1/4), d1 d2 (-0.1, 1/2) or d2 d2 (-0.3, 1/4), so the
  2.5% and 97.5% percentiles are -0.3 and +0.1."""
  r = stats.paired_bootstrap([11.0, 17.0], [10.0, 20.0], [10, 10], resamples=4000)
  assert r.estimate == pytest.approx(-0.1) and r.documents == 2 and r.resamples == 4000
  assert r.ci == pytest.approx((-0.3, 0.1))
  assert 0.3 < r.p <= 1.0  # about 2 x 1/4
  assert stats.paired_bootstrap([11.0, 17.0], [10.0, 20.0], [10, 10], resamples=4000) == r  # fixed seed


def test_bootstrap_excludes_zero_when_every_document_agrees():
  rng = np.random.default_rng(1)
  tokens = rng.integers(50, 500, 40).astype(float)
  base = tokens * rng.uniform(2.0, 3.0, 40)
  a = base + 0.05 * tokens + rng.normal(0, 0.01, 40) * tokens  # 0.05 nats/token worse, a little noise
  r = stats.paired_bootstrap(a, base, tokens, resamples=2000)
  assert r.ci[0] > 0.04 and r.ci[1] < 0.06 and r.p == pytest.approx(2 / 2001)
  noise = stats.paired_bootstrap(base + rng.normal(0, 0.2, 40) * tokens, base, tokens, resamples=2000)
  assert noise.ci[0] < 0 < noise.ci[1] and noise.p > 0.05


def test_bootstrap_averages_seeds_and_skips_empty_documents():
  tokens = np.array([10.0, 30.0, 0.0])
  b = np.array([[20.0, 60.0, 0.0], [25.0, 50.0, 0.0]])  # 2 seeds x 3 documents
  a = b + np.array([[4.0, 0.0, 9.0], [0.0, 8.0, 9.0]])
  r = stats.paired_bootstrap(a, b, tokens, resamples=500)
  assert r.documents == 2  # the third has no scored token
  assert r.estimate == pytest.approx(((4 / 40) + (8 / 40)) / 2)  # mean of the seeds' differences
  with pytest.raises(ValueError, match="do not pair"):
    stats.paired_bootstrap(a, b[:, :2], tokens)
  with pytest.raises(ValueError, match="no document"):
    stats.paired_bootstrap([1.0], [1.0], [0.0])
