"""Intervals and tests for the accuracies the harness reports."""

from __future__ import annotations

import math


def wilson_interval(k: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for k successes in n trials (fractions)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k <= 0 else max(0.0, center - half)
    hi = 1.0 if k >= n else min(1.0, center + half)
    return (lo, hi)


def roc_auc(negatives: list[float], positives: list[float]) -> float:
    """Area under the ROC curve of a score that should rank positives above negatives.

    The Mann-Whitney form P(pos > neg) + P(pos == neg) / 2, which is what
    scikit-learn's ``roc_auc_score`` computes (ties count one half).
    """
    import numpy as np

    neg, pos = np.asarray(negatives, dtype=float), np.asarray(positives, dtype=float)
    if len(neg) == 0 or len(pos) == 0:
        raise ValueError("roc_auc needs at least one negative and one positive score")
    allv = np.concatenate([neg, pos])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(sorted_v):  # average ranks over ties
        j = i
        while j + 1 < len(sorted_v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = ranks[len(neg):].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
