"""The statistics of a comparison: mean +- std over seeds, and paired tests over test users.

What the IISAN-Versa paper does for its own gains (TKDE, arXiv 2411.02992, Sec. V: "significant at
the level of 0.05 with paired T-test"), on the plugin's per-user test metrics
(:mod:`recbole_iisan.evaluator.per_user`):

- each model's per-user values are first averaged over its seeds (a user's value is the mean of
  the runs), then, for every model against the baseline (the first model named):
- the mean difference of the metric over users, with a paired bootstrap confidence interval
  (users resampled with a fixed seed; :func:`scipy.stats.bootstrap`, BCa);
- a paired test over users: :func:`scipy.stats.ttest_rel` (the paper's paired t-test) or
  :func:`scipy.stats.wilcoxon` (signed-rank), two-sided;
- the p-values of one comparison Holm-corrected over its models
  (:func:`statsmodels.stats.multitest.multipletests`, ``method="holm"``).

scipy and statsmodels are the libraries the Python ecosystem checks these procedures against;
nothing here re-implements them. Degenerate inputs get their exact answer instead of a NaN: when
every paired difference is zero the interval is [0, 0] and p = 1; when every difference is the
same non-zero value c the interval is [c, c] and the t-test's p is 0 (its statistic is infinite).
"""
from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

TESTS = ("ttest", "wilcoxon")


def mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (n - 1) over seeds; the std is None for one seed."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std of no values")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def bootstrap_ci(*samples: np.ndarray, statistic=np.mean, confidence: float = 0.95, n_resamples: int = 10000,
                 seed: int = 0, method: str = "BCa") -> tuple[float, float]:
    """Confidence interval of ``statistic`` over paired ``samples`` (one value per user, or per
    benchmark round, in each; the pairs resampled together), by :func:`scipy.stats.bootstrap`
    (``method``, ``seed`` fixed). ``statistic(*samples, axis)`` is vectorised over ``axis``; the
    default is the mean of one sample, e.g. the per-user differences of two models."""
    from scipy import stats

    samples = tuple(np.asarray(x, dtype=np.float64) for x in samples)
    if not samples or samples[0].size == 0:
        raise ValueError("bootstrap_ci of no users")
    if all(np.ptp(x) == 0 for x in samples):  # every resample is the data itself
        value = float(statistic(*samples, axis=-1))
        return value, value
    res = stats.bootstrap(samples, statistic, paired=len(samples) > 1, confidence_level=confidence,
                          n_resamples=n_resamples, method=method, random_state=np.random.default_rng(seed),
                          batch=500, vectorized=True)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_pvalue(a: np.ndarray, b: np.ndarray, test: str = "ttest") -> float:
    """Two-sided p-value of a paired test between per-user values ``a`` and ``b``."""
    from scipy import stats

    if test not in TESTS:
        raise ValueError(f"significance_test: expected one of {list(TESTS)}, got {test!r}")
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    diff = b - a
    if not np.any(diff):
        return 1.0
    if np.ptp(diff) == 0 and test == "ttest":
        return 0.0  # a constant non-zero difference: t is infinite
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if test == "ttest":
            p = stats.ttest_rel(b, a).pvalue
        else:
            p = stats.wilcoxon(b, a, zero_method="wilcox").pvalue
    return float(p)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (statsmodels' ``multipletests(method="holm")``), in input order."""
    from statsmodels.stats.multitest import multipletests

    if not pvalues:
        return []
    return [float(p) for p in multipletests(list(pvalues), method="holm")[1]]


@dataclass
class PairedResult:
    """One model against the baseline on one metric, over the users both were tested on."""

    model: str
    baseline: str
    metric: str
    n_users: int
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float
    p_holm: float = math.nan

    def significant(self, alpha: float = 0.05) -> bool:
        """Both the interval excludes zero and the Holm-adjusted p-value is below ``alpha``;
        anything else is reported as no significant difference."""
        return (self.ci_low > 0 or self.ci_high < 0) and self.p_holm < alpha


def compare_to_baseline(per_user: dict[str, np.ndarray], baseline: str, metric: str, test: str = "ttest",
                        confidence: float = 0.95, n_resamples: int = 10000, seed: int = 0) -> list[PairedResult]:
    """Every model of ``per_user`` ({model: per-user values averaged over seeds, users aligned})
    against ``baseline``: mean difference, bootstrap interval, p-value and Holm-adjusted p-value."""
    base = np.asarray(per_user[baseline], dtype=np.float64)
    out = []
    for model, values in per_user.items():
        if model == baseline:
            continue
        values = np.asarray(values, dtype=np.float64)
        if values.shape != base.shape:
            raise ValueError(f"{model}: {values.shape[0]} users, {baseline}: {base.shape[0]}: not paired")
        diff = values - base
        lo, hi = bootstrap_ci(diff, confidence=confidence, n_resamples=n_resamples, seed=seed)
        out.append(PairedResult(model, baseline, metric, int(diff.size), float(diff.mean()), lo, hi,
                                paired_pvalue(base, values, test)))
    for r, p in zip(out, holm([r.p_value for r in out])):
        r.p_holm = p
    return out
