"""Uncertainty for eval scores: a number on a few hundred questions means little without it.

- ``wilson``: the 95% Wilson score interval of an accuracy (k right of n). Unlike the normal
  approximation it stays inside [0, 1] and is honest at 0/n and n/n, which small medical
  sets hit.
- ``bootstrap_ci``: percentile bootstrap of a mean, for the metrics that are not 0/1
  (recall, F1, BLEU, ROUGE).
- ``mcnemar``: exact McNemar test of two systems' paired right/wrong answers on the same
  questions: a two-sided binomial test on the discordant pairs (only they carry evidence).
- ``paired_bootstrap``: the same question for continuous metrics: resample questions, keep
  the pairs together, and read the difference's interval and a two-sided p-value.

Written with the standard library and numpy (neither scipy nor statsmodels is a dependency);
the tests check each against hand-computed values.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # standard normal quantile at 0.975
RESAMPLES = 2000
SEED = 0  # fixed: the same rows always give the same interval
ALPHA = 0.05  # a paired difference with p below this is called significant


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for ``k`` successes in ``n`` trials ((0, 1) when n is 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ci(values: list[float] | np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``values``."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return 0.0, 1.0
    means = x[np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` fair coin flips (what
    ``scipy.stats.binomtest(k, n, 0.5).pvalue`` gives: the distribution is symmetric)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n
    return min(1.0, 2 * tail)


def mcnemar(a: list[bool], b: list[bool]) -> dict:
    """Exact McNemar test of paired right/wrong answers ``a`` and ``b`` on the same questions;
    the accuracy difference ``b - a`` gets its paired-bootstrap interval."""
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    boot = paired_bootstrap([float(x) for x in a], [float(y) for y in b])  # the difference's interval
    return {**boot, "test": "exact McNemar", "only_a_right": only_a, "only_b_right": only_b,
            "p": binom_two_sided(only_a, only_a + only_b)}


def paired_bootstrap(a: list[float], b: list[float], resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Mean difference ``b - a`` over paired scores with its 95% bootstrap interval and a
    two-sided p-value (twice the share of resampled differences on the far side of zero)."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if len(d) == 0:
        return {"test": "paired bootstrap", "n": 0, "a": 0.0, "b": 0.0, "diff": 0.0, "ci": [0.0, 0.0], "p": 1.0}
    means = d[np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    far = min(np.mean(means <= 0), np.mean(means >= 0))
    return {"test": "paired bootstrap", "n": len(d), "a": float(np.mean(a)), "b": float(np.mean(b)),
            "diff": float(d.mean()), "ci": [float(lo), float(hi)], "p": float(min(1.0, 2 * far))}
