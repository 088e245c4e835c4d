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


def newcombe_paired_interval(a: int, b: int, c: int, d: int, z: float = 1.959963984540054) -> tuple[float, float, float]:
    """Difference p1 - p2 of two proportions measured on the same n = a + b + c + d units, with a 95% interval.

    The 2x2 table of paired outcomes: ``a`` units succeed under both conditions, ``b``
    under the first only, ``c`` under the second only, ``d`` under neither; so
    p1 = (a + b) / n, p2 = (a + c) / n and the difference is (b - c) / n. The interval is
    Newcombe's hybrid score interval for paired data (Newcombe 1998, method 10; the form
    worked through in Altman et al., *Statistics with Confidence*, 2000): Wilson
    intervals (l1, u1) and (l2, u2) of p1 and p2 combined with the estimated correlation
    phi of the two outcomes,

        L = D - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
        U = D + sqrt((p2 - l2)^2 - 2 phi (p2 - l2)(u1 - p1) + (u1 - p1)^2)

    with phi = (ad - bc - n/2) / sqrt((a+b)(c+d)(a+c)(b+d)) when ad - bc > n/2, 0 when
    0 <= ad - bc <= n/2, (ad - bc) / sqrt(...) when ad - bc < 0, and 0 when a margin is
    empty. Unlike a Wald interval it stays inside [-1, 1] and is not degenerate when
    b = c = 0.

    Returns:
        ``(difference, lower, upper)``.
    """
    if min(a, b, c, d) < 0:
        raise ValueError(f"paired counts must be >= 0, got {(a, b, c, d)}")
    n = a + b + c + d
    if n == 0:
        return (0.0, -1.0, 1.0)
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, z)
    l2, u2 = wilson_interval(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    det = a * d - b * c
    if margins == 0:
        phi = 0.0
    elif det > n / 2:
        phi = (det - n / 2) / math.sqrt(margins)
    elif det >= 0:
        phi = 0.0
    else:
        phi = det / math.sqrt(margins)
    diff = p1 - p2
    lower = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = diff + math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return (diff, max(-1.0, lower), min(1.0, upper))


def paired_change(after: list[bool], before: list[bool]) -> tuple[float, float, float, int]:
    """Change ``mean(after) - mean(before)`` of per-example outcomes on the same examples, with its
    95% Newcombe paired interval (:func:`newcombe_paired_interval`); returns (change, lower, upper, n).
    """
    if len(after) != len(before):
        raise ValueError(f"paired outcomes need the same examples: {len(after)} vs {len(before)}")
    a = sum(1 for x, y in zip(after, before) if x and y)
    b = sum(1 for x, y in zip(after, before) if x and not y)
    c = sum(1 for x, y in zip(after, before) if y and not x)
    d = len(after) - a - b - c
    diff, lo, hi = newcombe_paired_interval(a, b, c, d)
    return (diff, lo, hi, len(after))


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


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant pairs of a paired 2x2 table.

    ``b`` units succeed under the first condition only, ``c`` under the second only.
    Under the null hypothesis of equal accuracies each discordant unit is a fair coin, so
    the p-value is the two-sided binomial test of min(b, c) in b + c trials at 1/2:
    min(1, 2 P(X <= min(b, c))), X ~ Bin(b + c, 1/2) (1 when there are no discordant
    pairs). Computed in exact integer arithmetic (what ``scipy.stats.binomtest`` returns).
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b}, {c}")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_table(first: list[bool], second: list[bool]) -> dict[str, int]:
    """The paired 2x2 table of two outcome lists on the same units: ``both``, ``first_only``, ``second_only``, ``neither``."""
    if len(first) != len(second):
        raise ValueError(f"paired outcomes need the same examples: {len(first)} vs {len(second)}")
    both = sum(1 for x, y in zip(first, second) if x and y)
    first_only = sum(1 for x, y in zip(first, second) if x and not y)
    second_only = sum(1 for x, y in zip(first, second) if y and not x)
    return {"both": both, "first_only": first_only, "second_only": second_only,
            "neither": len(first) - both - first_only - second_only}


def paired_comparison(first: list[bool], second: list[bool]) -> dict:
    """Both accuracies on the same units, their 2x2 table, the difference second - first with its 95%
    Newcombe interval, and the exact McNemar p-value (:func:`mcnemar_exact`).
    """
    t = paired_table(first, second)
    n = len(first)
    diff, lo, hi = newcombe_paired_interval(t["both"], t["second_only"], t["first_only"], t["neither"]) if n else (0.0, -1.0, 1.0)
    return {
        "n": n, "table": t,
        "accuracy_first": (t["both"] + t["first_only"]) / n if n else None,
        "accuracy_second": (t["both"] + t["second_only"]) / n if n else None,
        "difference": diff, "difference_ci95": [lo, hi],
        "p_value": mcnemar_exact(t["first_only"], t["second_only"]),
    }


def paired_jobs(first: dict[int, tuple[bool, bool]], second: dict[int, tuple[bool, bool]]) -> dict:
    """Two jobs compared on the examples they share: ``first`` and ``second`` map a dataset index to that
    example's (clean, robust) outcome under the job's headline rule. Returns ``n_shared`` and, when it is not 0,
    :func:`paired_comparison` of the ``clean`` and of the ``robust`` outcomes in dataset-index order.

    The one implementation behind ``harness compare`` and the leaderboard's drill-down.
    """
    shared = sorted(set(first) & set(second))
    out: dict = {"n_shared": len(shared)}
    if shared:
        for kind, k in (("robust", 1), ("clean", 0)):
            out[kind] = paired_comparison([first[i][k] for i in shared], [second[i][k] for i in shared])
    return out


#: The columns that make jobs one setting measured over several seeds (attack seed and data seed differ);
#: ``setting`` is :func:`setting_key` of the job's defense configuration and threat spec.
SEED_GROUP = ("defense", "classifier", "dataset", "threat", "norm", "eps", "n_examples", "shift", "trained_on", "setting")


def setting_key(defense_config, threat_spec) -> str:
    """A short hash of what a job ran apart from its seeds: its defense configuration and resolved threat spec."""
    import hashlib
    import json

    text = json.dumps([defense_config, threat_spec], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def over_seeds(jobs, value: str = "robust", key: tuple[str, ...] = SEED_GROUP):
    """Per finished job, the mean, sample standard deviation (ddof 1) and number of the finished jobs of its
    setting (``key``: the same cell measured with other attack or data seeds), as DiffPure reports
    ``mean ± std`` over seeds.

    ``jobs``: a pandas frame with ``status``, ``value`` and the ``key`` columns it has (a missing one does not
    split). Returns a frame on the finished rows' index (``jobs``'s own) with ``seeds_mean``, ``seeds_sd``
    (NaN for one job) and ``seeds_n``, used by ``harness results``, ``harness report`` and the dashboard alike.
    """
    import pandas as pd

    done = jobs[(jobs["status"] == "done") & jobs[value].notna()] if len(jobs) else jobs
    cols = ["seeds_mean", "seeds_sd", "seeds_n"]
    if done.empty:
        return pd.DataFrame(columns=cols, index=done.index[:0])
    by = [k for k in key if k in done.columns]
    keyed = done[by].astype(str)  # NaN / None / numbers alike: one spelling per value
    g = done[value].astype("float64").groupby([keyed[k] for k in by], dropna=False)
    return pd.DataFrame({"seeds_mean": g.transform("mean"), "seeds_sd": g.transform("std"), "seeds_n": g.transform("size")},
                        index=done.index)
