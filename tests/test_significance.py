"""The statistics of comparisons (recbole_iisan/evaluator/significance.py) on synthetic per-user
vectors with known answers, checked against hand computations and independent implementations."""
from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from recbole_iisan.evaluator.significance import (PairedResult, bootstrap_ci, compare_to_baseline, holm, mean_std,
                                                  paired_pvalue)


@pytest.mark.parametrize("test", ["ttest", "wilcoxon"])
def test_identical_vectors_give_an_interval_holding_zero_and_p_one(test: str) -> None:
    a = (np.random.default_rng(0).random(500) < 0.1).astype(float)
    lo, hi = bootstrap_ci(a - a)
    assert lo <= 0.0 <= hi
    assert paired_pvalue(a, a.copy(), test) == 1.0


@pytest.mark.parametrize("test", ["ttest", "wilcoxon"])
def test_a_constant_shift_over_1000_users_is_the_interval_and_p_below_1e_6(test: str) -> None:
    a = np.random.default_rng(1).random(1000)
    lo, hi = bootstrap_ci((a + 0.02) - a)
    assert lo == pytest.approx(0.02, abs=1e-12) and hi == pytest.approx(0.02, abs=1e-12)
    assert paired_pvalue(a, a + 0.02, test) < 1e-6


def test_paired_t_p_value_equals_the_textbook_formula() -> None:
    from scipy.stats import t as student_t

    rng = np.random.default_rng(2)
    a = (rng.random(2000) < 0.07).astype(float)
    b = (rng.random(2000) < 0.09).astype(float)
    d = b - a
    t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))  # by hand
    p = 2 * student_t.sf(abs(t), d.size - 1)
    assert paired_pvalue(a, b, "ttest") == pytest.approx(p, rel=1e-9)


def test_bootstrap_interval_agrees_with_a_plain_percentile_bootstrap() -> None:
    rng = np.random.default_rng(3)
    d = rng.normal(0.01, 0.3, 3000)
    lo, hi = bootstrap_ci(d, confidence=0.95, n_resamples=10000, seed=0)
    # an independent percentile bootstrap written with numpy
    idx = np.random.default_rng(123).integers(0, d.size, size=(4000, d.size))
    means = d[idx].mean(axis=1)
    plo, phi = np.percentile(means, [2.5, 97.5])
    width = phi - plo
    assert abs(lo - plo) < 0.1 * width and abs(hi - phi) < 0.1 * width
    # and with the normal approximation of the mean's standard error
    se = d.std(ddof=1) / math.sqrt(d.size)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert bootstrap_ci(d, seed=0) == (lo, hi)  # fixed resampling seed: the same interval every time


def _ratio_of_medians(a, b, axis=-1):
    return np.median(a, axis=axis) / np.median(b, axis=axis)


def test_paired_samples_are_resampled_together() -> None:
    # b is exactly twice a round by round: resampled in pairs, every resample's ratio is 0.5;
    # resampled independently, the ratio would spread.
    a = np.random.default_rng(4).lognormal(-2.0, 0.3, 30)
    assert bootstrap_ci(a, 2 * a, statistic=_ratio_of_medians, method="percentile") == (0.5, 0.5)


def test_paired_ratio_interval_agrees_with_a_plain_paired_percentile_bootstrap() -> None:
    rng = np.random.default_rng(5)
    base = rng.normal(0.23, 0.01, 30)
    times = 0.47 * base + rng.normal(0.0, 0.004, 30)  # a round's two times move together
    lo, hi = bootstrap_ci(times, base, statistic=_ratio_of_medians, method="percentile", n_resamples=9999)
    idx = np.random.default_rng(321).integers(0, base.size, size=(20000, base.size))  # rounds drawn in pairs
    plo, phi = np.percentile(_ratio_of_medians(times[idx], base[idx]), [2.5, 97.5])
    width = phi - plo
    assert abs(lo - plo) < 0.1 * width and abs(hi - phi) < 0.1 * width
    assert lo < _ratio_of_medians(times, base) < hi


def test_holm_by_hand() -> None:
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []


def test_mean_and_std_over_seeds() -> None:
    vals = [0.0706, 0.0712, 0.0689]
    m, s = mean_std(vals)
    assert m == pytest.approx(sum(vals) / 3)
    assert s == pytest.approx(math.sqrt(sum((v - m) ** 2 for v in vals) / 2))  # n - 1
    assert s == pytest.approx(statistics.stdev(vals))
    assert mean_std([0.5]) == (0.5, None)
    with pytest.raises(ValueError):
        mean_std([])


def test_compare_to_baseline_holm_corrects_over_the_models() -> None:
    rng = np.random.default_rng(4)
    base = (rng.random(4000) < 0.05).astype(float)
    per_user = {"A": base, "B": np.clip(base + (rng.random(4000) < 0.03), 0, 1), "C": base.copy()}
    res = {r.model: r for r in compare_to_baseline(per_user, "A", "hit@10", n_resamples=2000)}
    assert set(res) == {"B", "C"}
    assert res["B"].mean_diff == pytest.approx(float((per_user["B"] - base).mean()))
    assert res["B"].significant() and not res["C"].significant()
    assert res["C"].p_value == 1.0 and res["C"].p_holm == 1.0
    assert res["B"].p_holm == pytest.approx(min(1.0, 2 * res["B"].p_value))  # the smaller of two p's, times 2


def test_significance_needs_both_the_interval_and_the_adjusted_p() -> None:
    r = PairedResult("B", "A", "hit@10", 100, 0.01, 0.001, 0.02, 0.03, p_holm=0.09)
    assert not r.significant(0.05)  # the interval excludes 0 but the Holm-adjusted p does not pass
    r.p_holm = 0.01
    assert r.significant(0.05)
    with pytest.raises(ValueError):
        paired_pvalue(np.zeros(3), np.ones(3), "sign")
