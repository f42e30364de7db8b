"""Statistics for comparing FAL methods (ALGORITHMS.md §7): AULC, positive ratio, one-sided
exact Wilcoxon signed-rank test, Hodges–Lehmann estimate, paired comparisons over seeds, and the
majority / intermediate / minority query class balance. Pure functions on numbers (numpy, scipy).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

GROUPS = ("majority", "intermediate", "minority")
ALPHA = 0.05  # significance level used to flag a paired comparison


def aulc(labeled_pct: Sequence[float], accuracy_pct: Sequence[float]) -> float:
    """Trapezoidal area under accuracy (%) vs labeled fraction (%) over the cycles.

    Points are taken in the order given (cycle order, i.e. increasing labeled fraction).
    One point (or none) has no area: 0.0.
    """
    x = np.asarray(labeled_pct, dtype=float)
    y = np.asarray(accuracy_pct, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"aulc needs two 1-d sequences of equal length, got {x.shape}, {y.shape}")
    if x.size < 2:
        return 0.0
    # np.trapezoid is NumPy >= 2.0's name of np.trapz (pyproject allows numpy >= 1.24)
    trapezoid = getattr(np, "trapezoid", None) or np.trapz
    return float(trapezoid(y, x))


def positive_ratio(delta: Sequence[float]) -> float:
    """π⁺ = mean(Δ > 0): the fraction of seeds on which the first method wins; nan if empty."""
    d = np.asarray(delta, dtype=float)
    return float(np.mean(d > 0)) if d.size else math.nan


def _signed_rank_sf(delta: np.ndarray) -> float:
    """Exact P(T⁺ >= t⁺_observed) under H0 by the full sign-flip distribution on midranks.

    Doubled midranks are integers, so the distribution of T⁺ over the 2^n equally likely sign
    patterns is a product of polynomials (1 + x^r_i), computed by convolution: exact with ties.
    """
    ranks2 = np.rint(2 * sps.rankdata(np.abs(delta))).astype(np.int64)
    observed = int(ranks2[delta > 0].sum())
    dist = np.zeros(int(ranks2.sum()) + 1, dtype=float)
    dist[0] = 1.0
    for r in ranks2:
        shifted = np.zeros_like(dist)
        shifted[r:] = dist[:-r]
        dist = (dist + shifted) / 2.0
    return float(min(1.0, dist[observed:].sum()))


def wilcoxon_one_sided(delta: Sequence[float]) -> float:
    """One-sided exact Wilcoxon signed-rank p-value for H1: Δ > 0.

    Zeros are dropped before ranking (scipy's default ``zero_method="wilcox"``); if nothing is
    left (all Δ = 0, or no Δ at all) there is no evidence either way and p = 1.0. Without tied
    |Δ| this is ``scipy.stats.wilcoxon(Δ, alternative="greater", method="exact")``. With ties
    scipy's "exact" rounds the statistic onto the no-ties distribution (conservative, not exact),
    so then the exact conditional distribution over the 2^n sign patterns is used instead.
    """
    d = np.asarray(delta, dtype=float)
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    if np.unique(np.abs(d)).size == d.size:
        return float(sps.wilcoxon(d, alternative="greater", method="exact").pvalue)
    return _signed_rank_sf(d)


def hodges_lehmann(delta: Sequence[float]) -> float:
    """Median of the Walsh averages (Δ_s + Δ_t) / 2 over s <= t; nan if empty."""
    d = np.asarray(delta, dtype=float)
    if d.size == 0:
        return math.nan
    i, j = np.triu_indices(d.size)
    return float(np.median((d[i] + d[j]) / 2.0))


def paired_comparison(aulc_a: Mapping[Any, float], aulc_b: Mapping[Any, float]) -> dict[str, Any]:
    """Paired statistics of method A vs B over their common seeds, with Δ_s = AULC_A − AULC_B.

    Returns ``n``, ``seeds`` (sorted common seeds), ``mean_a``, ``mean_b``, ``mean_delta``,
    ``pi_pos`` (π⁺ of A over B), ``p`` (one-sided exact Wilcoxon, H1: A > B), ``p_rev``
    (H1: B > A), ``hl`` (Hodges–Lehmann of Δ), ``winner`` and ``significant``.

    ``winner`` is the method with the larger mean AULC over the common seeds ("A", "B", or
    "tie" when the means are equal or there is no common seed); ``significant`` says whether the
    one-sided test in the winner's direction rejects at level 0.05 (``p`` for A, ``p_rev`` for
    B). Winning and significance are deliberately separate: with 3 seeds no difference can be
    significant (the smallest exact p is 1/8), yet the better mean is still worth reporting.
    """
    seeds = sorted(set(aulc_a) & set(aulc_b), key=lambda s: (str(type(s)), s))
    a = np.array([aulc_a[s] for s in seeds], dtype=float)
    b = np.array([aulc_b[s] for s in seeds], dtype=float)
    delta = a - b
    n = len(seeds)
    mean_delta = float(delta.mean()) if n else math.nan
    if n == 0 or mean_delta == 0:
        winner = "tie"
    else:
        winner = "A" if mean_delta > 0 else "B"
    p = wilcoxon_one_sided(delta)
    p_rev = wilcoxon_one_sided(-delta)
    p_win = p if winner == "A" else p_rev if winner == "B" else 1.0
    return {
        "n": n,
        "seeds": seeds,
        "mean_a": float(a.mean()) if n else math.nan,
        "mean_b": float(b.mean()) if n else math.nan,
        "mean_delta": mean_delta,
        "pi_pos": positive_ratio(delta),
        "p": p,
        "p_rev": p_rev,
        "hl": hodges_lehmann(delta),
        "winner": winner,
        "significant": bool(winner != "tie" and p_win < ALPHA),
    }


# -- query class balance ----------------------------------------------------------------------
def class_groups(class_counts: Sequence[int], frac: float = 0.3) -> dict[str, list[int]]:
    """Split classes by global training count into majority / intermediate / minority.

    Classes are sorted by count, descending (ties: lower class index first); the top
    ``m = floor(frac·C + 0.5)`` classes are the majority, the bottom m the minority, the rest
    intermediate (3 / 4 / 3 for C = 10). Half rounds up, and m is capped at C // 2.
    """
    counts = np.asarray(class_counts)
    num = counts.size
    m = min(int(math.floor(frac * num + 0.5)), num // 2)
    order = sorted(range(num), key=lambda c: (-counts[c], c))
    return {
        "majority": sorted(order[:m]),
        "intermediate": sorted(order[m:num - m]),
        "minority": sorted(order[num - m:]),
    }


def group_shares(hist: Any, groups: Mapping[str, Sequence[int]],
                 include_initial: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative share of queried samples from each class group, cycle by cycle.

    ``hist`` is cycles × C: labels revealed per class in each cycle, row 0 being the initial
    random labels. By default row 0 is excluded (what a *strategy* queries, as in FairFAL
    Figure 2); ``include_initial=True`` counts it. Returns ``(cycles, shares)``: the cycle
    numbers covered and a len(cycles) × 3 array of shares in ``GROUPS`` order (rows sum to 1;
    nan while nothing has been queried yet).
    """
    h = np.asarray(hist, dtype=float)
    if h.ndim != 2:
        raise ValueError(f"hist must be cycles x classes, got shape {h.shape}")
    first = 0 if include_initial else 1
    cycles = np.arange(first, h.shape[0])
    cum = np.cumsum(h[first:], axis=0)
    per_group = np.stack([cum[:, list(groups[g])].sum(axis=1) for g in GROUPS], axis=1)
    total = cum.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(total > 0, per_group / np.where(total > 0, total, 1), np.nan)
    return cycles, shares
