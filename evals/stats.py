"""Record-level (cluster) bootstrap for the evaluation report.

Held-out items come in groups: each corpus record has 2-3 phrasings of one problem, and an answer's
score depends mostly on the record (its device, its reference steps). Resampling items as if they
were independent makes the interval too narrow, so the unit resampled here is the record: a
resample draws records with replacement and takes every item of each drawn record. The statistic
is the item mean over the resample (the same estimator as the point estimate).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _clusters(values: Sequence[float], groups: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-record (sum of finite values, count of finite values); records with none are dropped."""
    v = np.asarray(values, np.float64)
    g = np.asarray(list(groups))
    if v.shape != g.shape:
        raise ValueError(f"{v.size} values but {g.size} group labels")
    keep = np.isfinite(v)
    if not keep.any():
        return np.zeros(0), np.zeros(0)
    _, inv = np.unique(g[keep], return_inverse=True)
    sums = np.bincount(inv, weights=v[keep])
    counts = np.bincount(inv).astype(np.float64)
    return sums, counts


def cluster_ratio_ci(sums: Sequence[float], counts: Sequence[float], *, n: int = 4000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """(sum(sums) / sum(counts), low, high) resampling the clusters (e.g. 32-token blocks of a
    perplexity text, each given as its NLL sum and token count)."""
    s, c = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    if s.size == 0 or c.sum() == 0:
        return float("nan"), float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, s.size, (n, s.size))
    means = s[idx].sum(axis=1) / c[idx].sum(axis=1)
    a = (1 - level) / 2
    return float(s.sum() / c.sum()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def record_bootstrap_means(values: Sequence[float], groups: Sequence[str], *, n: int = 4000,
                           seed: int = 0) -> np.ndarray:
    """[n] item means of ``n`` record-level resamples (NaN values are skipped)."""
    sums, counts = _clusters(values, groups)
    if sums.size == 0:
        return np.full(n, np.nan)
    idx = np.random.default_rng(seed).integers(0, sums.size, (n, sums.size))
    return sums[idx].sum(axis=1) / counts[idx].sum(axis=1)


def record_bootstrap_ci(values: Sequence[float], groups: Sequence[str], *, n: int = 4000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float, float]:
    """(item mean, low, high): percentile interval of the record-level bootstrap."""
    sums, counts = _clusters(values, groups)
    if sums.size == 0:
        return float("nan"), float("nan"), float("nan")
    means = record_bootstrap_means(values, groups, n=n, seed=seed)
    a = (1 - level) / 2
    return float(sums.sum() / counts.sum()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def paired_record_diff(a: Sequence[float], b: Sequence[float], groups: Sequence[str], *, n: int = 4000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float, float, int]:
    """(mean of b - a, low, high, items used) over items both scored, records resampled together."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = b - a
    keep = np.isfinite(d)
    g = np.asarray(list(groups))[keep]
    mean, lo, hi = record_bootstrap_ci(d[keep], g, n=n, seed=seed, level=level)
    return mean, lo, hi, int(keep.sum())


def bonferroni_level(level: float, comparisons: int) -> float:
    """Per-comparison confidence level keeping the family-wise error at ``1 - level``."""
    if comparisons < 1:
        raise ValueError(f"comparisons must be >= 1, got {comparisons}")
    return 1 - (1 - level) / comparisons


__all__ = ["cluster_ratio_ci", "record_bootstrap_means", "record_bootstrap_ci", "paired_record_diff", "bonferroni_level"]
