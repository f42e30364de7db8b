"""falkit.stats on hand-computed values (ALGORITHMS.md §7)."""

import itertools
import math

import numpy as np
import pytest
from scipy.stats import rankdata

from falkit import stats


def enumerate_p(delta: list[float]) -> float:
    """One-sided signed-rank p by brute force over all 2^n sign patterns (zeros dropped)."""
    d = np.array([x for x in delta if x != 0], dtype=float)
    ranks = rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    hits = sum(ranks[np.array(signs, dtype=bool)].sum() >= observed - 1e-12
               for signs in itertools.product([0, 1], repeat=d.size))
    return hits / 2 ** d.size


def test_aulc_trapezoid():
    assert stats.aulc([5, 10], [80, 90]) == pytest.approx(425.0)
    # 3 points: 5*(80+90)/2 + 10*(90+95)/2
    assert stats.aulc([5, 10, 20], [80, 90, 95]) == pytest.approx(425 + 925)
    assert stats.aulc([5], [80]) == 0.0
    with pytest.raises(ValueError):
        stats.aulc([5, 10], [80])


def test_positive_ratio():
    assert stats.positive_ratio([1, -1, 0, 2]) == 0.5
    assert math.isnan(stats.positive_ratio([]))


def test_hodges_lehmann_walsh_averages():
    # Walsh averages of [1, 2, 4]: 1, 1.5, 2.5, 2, 3, 4 -> median (2 + 2.5) / 2
    assert stats.hodges_lehmann([1, 2, 4]) == pytest.approx(2.25)
    assert stats.hodges_lehmann([4, 1, 2]) == pytest.approx(2.25)
    assert stats.hodges_lehmann([-3]) == -3.0
    assert math.isnan(stats.hodges_lehmann([]))


def test_wilcoxon_exact_values():
    assert stats.wilcoxon_one_sided([1, 2, 3, 4, 5]) == pytest.approx(1 / 32)
    # [-1, 2, 3]: T+ = 2 + 3 = 5; sign patterns with T+ >= 5: {2,3}, {1,2,3} -> 2/8
    assert enumerate_p([-1, 2, 3]) == pytest.approx(2 / 8)
    assert stats.wilcoxon_one_sided([-1, 2, 3]) == pytest.approx(enumerate_p([-1, 2, 3]))
    assert stats.wilcoxon_one_sided([-1, -2, -3]) == pytest.approx(1.0)


def test_wilcoxon_zeros_and_ties():
    assert stats.wilcoxon_one_sided([0, 0, 0]) == 1.0
    assert stats.wilcoxon_one_sided([]) == 1.0
    # zeros are dropped (zero_method="wilcox"): same as [1, 2, 3]
    assert stats.wilcoxon_one_sided([0, 1, 2, 3]) == pytest.approx(1 / 8)
    # ties: exact conditional distribution on midranks (scipy's "exact" is only conservative)
    for d in ([1.5, -0.5, 0.5, 2, -2, 3, 0.5], [120, -20, 120], [-2, 1, 1, 3, 3, 4]):
        assert stats.wilcoxon_one_sided(d) == pytest.approx(enumerate_p(d)), d
    assert stats.wilcoxon_one_sided([120, -20, 120]) == pytest.approx(0.25)


def test_wilcoxon_matches_enumeration_random():
    rng = np.random.default_rng(0)
    for _ in range(20):
        d = rng.integers(-5, 6, size=int(rng.integers(1, 9))).astype(float)
        assert stats.wilcoxon_one_sided(d) == pytest.approx(enumerate_p(list(d)) if
                                                            np.any(d) else 1.0)


def test_paired_comparison():
    a = {0: 10.0, 1: 12.0, 2: 15.0, 7: 99.0}
    b = {0: 9.0, 1: 10.0, 2: 11.0, 5: 0.0}
    res = stats.paired_comparison(a, b)  # common seeds 0, 1, 2: delta = [1, 2, 4]
    assert res["n"] == 3 and res["seeds"] == [0, 1, 2]
    assert res["mean_delta"] == pytest.approx(7 / 3)
    assert res["pi_pos"] == 1.0
    assert res["p"] == pytest.approx(1 / 8)
    assert res["p_rev"] == pytest.approx(1.0)
    assert res["hl"] == pytest.approx(2.25)
    assert res["winner"] == "A" and res["significant"] is False
    rev = stats.paired_comparison(b, a)
    assert rev["winner"] == "B" and rev["hl"] == pytest.approx(-2.25)
    assert rev["p_rev"] == pytest.approx(1 / 8) and rev["pi_pos"] == 0.0


def test_paired_comparison_significance_and_tie():
    a = {s: 10.0 + s for s in range(5)}
    b = {s: 0.0 for s in range(5)}
    res = stats.paired_comparison(a, b)
    assert res["p"] == pytest.approx(1 / 32) and res["significant"] is True
    assert stats.paired_comparison(b, a)["significant"] is True
    tie = stats.paired_comparison({0: 1.0, 1: 2.0}, {0: 2.0, 1: 1.0})
    assert tie["winner"] == "tie" and tie["significant"] is False
    none = stats.paired_comparison({0: 1.0}, {1: 1.0})
    assert none["n"] == 0 and none["winner"] == "tie" and math.isnan(none["hl"])


def test_class_groups():
    counts = [500, 400, 300, 200, 100, 90, 80, 70, 60, 50]
    g = stats.class_groups(counts)
    assert g == {"majority": [0, 1, 2], "intermediate": [3, 4, 5, 6], "minority": [7, 8, 9]}
    g = stats.class_groups([5, 50, 20, 40, 10, 30, 1, 2, 3, 4])  # order by count, not index
    assert g == {"majority": [1, 3, 5], "intermediate": [0, 2, 4, 9], "minority": [6, 7, 8]}
    assert [len(v) for v in stats.class_groups(list(range(100, 0, -1))).values()] == [30, 40, 30]
    assert [len(v) for v in stats.class_groups([3, 2]).values()] == [1, 0, 1]
    assert [len(v) for v in stats.class_groups([3, 2, 1, 0, 5]).values()] == [2, 1, 2]


def test_group_shares_cumulative():
    groups = stats.class_groups([500, 400, 300, 200, 100, 90, 80, 70, 60, 50])
    hist = np.zeros((3, 10))
    hist[0] = 10  # initial random labels
    hist[1, 0], hist[1, 9] = 4, 1
    hist[2, 5] = 5
    cycles, shares = stats.group_shares(hist, groups)
    assert cycles.tolist() == [1, 2]
    np.testing.assert_allclose(shares, [[0.8, 0.0, 0.2], [0.4, 0.5, 0.1]])
    cycles, shares = stats.group_shares(hist, groups, include_initial=True)
    assert cycles.tolist() == [0, 1, 2]
    np.testing.assert_allclose(shares, [[0.3, 0.4, 0.3], [34 / 105, 40 / 105, 31 / 105],
                                        [34 / 110, 45 / 110, 31 / 110]])
    _, empty = stats.group_shares(np.zeros((2, 10)), groups)
    assert np.isnan(empty).all()
