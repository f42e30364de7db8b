"""Tests of falkit.data.imbalance (global long tail) and falkit.data.partition (client splits)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from falkit.data.imbalance import class_counts_long_tail, long_tail
from falkit.data.partition import (
    PARTITIONERS,
    dirichlet,
    dirichlet_balanced,
    dirichlet_balanced_counts,
    dirichlet_flwr,
    format_partition_table,
    from_json,
    iid,
    largest_remainder,
    make_partition,
    partition_counts,
    pathological,
    rebalance_counts,
    shards,
    write_partition_csv,
)
from falkit.errors import ConfigError


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def fmnist_lt() -> np.ndarray:
    """Labels shaped like FMNIST-LT: 6000 per class, then an exp long tail with rho = 20."""
    y = np.repeat(np.arange(10), 6000)
    return y[long_tail(y, 10, 20, rng=rng(0))]


def assert_partition(parts: list[np.ndarray], n: int, cover: bool = True) -> None:
    """Sorted int64 arrays, pairwise disjoint, and (if ``cover``) their union is range(n)."""
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)
    allidx = np.concatenate(parts)
    assert np.unique(allidx).size == allidx.size
    if cover:
        assert np.array_equal(np.sort(allidx), np.arange(n))


# --------------------------------------------------------------------------- long tail


def test_long_tail_counts_hand_checked() -> None:
    assert class_counts_long_tail(100, 3, 4) == [100, 50, 25]
    assert class_counts_long_tail(100, 4, 4, "step") == [100, 100, 25, 25]
    assert class_counts_long_tail(100, 3, 1) == [100, 100, 100]
    assert class_counts_long_tail(100, 3, None, "step") == [100, 100, 100]


@pytest.mark.parametrize(
    ("c", "rho", "profile"), [(10, 20, "exp"), (10, 100, "exp"), (7, 10, "step"), (5, 3, "exp")]
)
def test_long_tail_counts_formula(c: int, rho: float, profile: str) -> None:
    n_max = 600
    y = np.repeat(np.arange(c), n_max)
    if profile == "exp":
        want = [int(n_max * (1 / rho) ** (k / (c - 1))) for k in range(c)]
    else:
        want = [n_max if k < c // 2 else int(n_max / rho) for k in range(c)]
    assert class_counts_long_tail(n_max, c, rho, profile) == want
    kept = long_tail(y, c, rho, profile, rng(1))
    assert np.bincount(y[kept], minlength=c).tolist() == want
    assert want[0] == n_max and want[-1] == int(n_max / rho)


def test_long_tail_indices_and_seed() -> None:
    y = np.random.default_rng(5).permutation(np.repeat(np.arange(4), 50))
    a = long_tail(y, 4, 5, rng=rng(0))
    assert a.dtype == np.int64
    assert np.all(np.diff(a) > 0)  # sorted and unique
    assert np.array_equal(a, long_tail(y, 4, 5, rng=rng(0)))
    assert not np.array_equal(a, long_tail(y, 4, 5, rng=rng(1)))
    counts = class_counts_long_tail(50, 4, 5)
    for c in range(4):
        assert (y[a] == c).sum() == counts[c]


def test_long_tail_small_class_and_identity() -> None:
    y = np.array([0] * 10 + [1] * 10 + [2] * 1)  # n_max = 7; class 2 has 1 < int(7 / 2)
    kept = long_tail(y, 3, 2, rng=rng(0))
    assert np.bincount(y[kept], minlength=3).tolist() == [7, 4, 1]
    assert np.array_equal(long_tail(y, 3, None, rng=rng(0)), np.arange(y.size))
    assert np.array_equal(long_tail(y, 3, 1, rng=rng(0)), np.arange(y.size))


def test_long_tail_errors() -> None:
    y = np.repeat(np.arange(3), 10)
    with pytest.raises(ConfigError, match="rho"):
        long_tail(y, 3, 0.5, rng=rng())
    with pytest.raises(ConfigError, match="profile"):
        long_tail(y, 3, 2, "linear", rng())
    with pytest.raises(ConfigError, match="labels"):
        long_tail(y, 2, 2, rng=rng())
    with pytest.raises(TypeError, match="rng"):
        long_tail(y, 3, 2)


# --------------------------------------------------------------------------- dirichlet_balanced


def test_largest_remainder_known_answer() -> None:
    assert largest_remainder(7, np.array([0.5, 0.3, 0.2])).tolist() == [4, 2, 1]
    # Equal fractions: the lower index wins the spare unit (stable sort).
    assert largest_remainder(4, np.array([1.0, 1.0, 1.0])).tolist() == [2, 1, 1]
    assert largest_remainder(5, np.zeros(2)).tolist() == [3, 2]


def test_rebalance_counts_rule() -> None:
    m = np.array([[5, 1], [0, 0], [1, 1]])
    out = rebalance_counts(m, np.array([3, 3, 2]))
    # Client 0 (surplus 3) gives class 0, the first class it holds, to client 1 (deficit 3).
    assert out.tolist() == [[2, 1], [3, 0], [1, 1]]
    assert np.array_equal(out.sum(axis=0), m.sum(axis=0))


def test_rebalance_counts_moves_classes_in_index_order_like_the_reference() -> None:
    """Worked by hand with the authors' dir_balance repair. Targets 4, 4, 4; client 0 has a
    surplus of 4, clients 1 and 2 a deficit of 2 each. Class 0: client 0 offers min(2, 4) = 2,
    client 1 (first receiver) takes both. Class 1: client 0 offers min(5, 2) = 2, client 2
    takes them. (Moving the donor's most abundant class first would have given
    [[2, 1, 1], [1, 2, 1], [0, 4, 0]].)"""
    m = np.array([[2, 5, 1], [1, 0, 1], [0, 2, 0]])
    out = rebalance_counts(m, np.array([4, 4, 4]))
    assert out.tolist() == [[0, 3, 1], [3, 0, 1], [0, 4, 0]]


def test_rebalance_counts_passes_until_every_target_is_met() -> None:
    """Two donors, two receivers; the larger offer is taken first. Targets 3 each.
    Pass 1, class 0: donors 0 (surplus 3) and 1 (surplus 1) offer min(1, 3) = 1 and
    min(2, 1) = 1; receiver 2 (deficit 2) takes 1 from donor 0 (equal offers: donor order),
    then 1 from donor 1. Class 1: donor 0 offers min(5, 2) = 2; receiver 3 (deficit 2) takes
    both."""
    m = np.array([[1, 5], [2, 2], [1, 0], [0, 1]])
    out = rebalance_counts(m, np.array([3, 3, 3, 3]))
    assert out.tolist() == [[0, 3], [1, 2], [3, 0], [0, 3]]


def test_dirichlet_balanced_counts_follows_steps_1_to_4() -> None:
    """An independent transcription of FairFAL steps 1-4 gives the same matrix."""
    n_j = np.array([50, 30, 12, 7, 1])
    k, alpha = 4, 0.7
    p = rng(11).dirichlet(np.full(n_j.size, alpha), size=k)
    for _ in range(5):
        p /= p.sum(axis=1, keepdims=True)
        p /= p.sum(axis=0, keepdims=True)
    m = np.zeros((k, n_j.size), dtype=np.int64)
    for j, n in enumerate(n_j):
        exact = n * p[:, j]
        m[:, j] = np.floor(exact)
        spare = n - m[:, j].sum()
        m[np.argsort(-(exact - np.floor(exact)), kind="stable")[:spare], j] += 1
    want = rebalance_counts(m, np.array([25, 25, 25, 25]))
    got = dirichlet_balanced_counts(n_j, k, alpha, rng(11))
    assert np.array_equal(got, want)


def test_dirichlet_balanced_sizes_and_cover(fmnist_lt: np.ndarray) -> None:
    y = fmnist_lt
    parts = dirichlet_balanced(y, 10, 0.5, rng(3))
    assert_partition(parts, y.size)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    m = partition_counts(y, parts, 10)
    assert np.array_equal(m.sum(axis=0), np.bincount(y, minlength=10))
    counts = dirichlet_balanced_counts(np.bincount(y, minlength=10), 10, 0.5, rng(3))
    assert np.array_equal(m, counts)  # the main function uses the helper's matrix
    again = dirichlet_balanced(y, 10, 0.5, rng(3))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = dirichlet_balanced(y, 10, 0.5, rng(4))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_balanced_alpha_controls_skew(fmnist_lt: np.ndarray) -> None:
    y = fmnist_lt
    global_frac = np.bincount(y, minlength=10) / y.size
    skew = partition_counts(y, dirichlet_balanced(y, 10, 0.1, rng(0)), 10)
    frac = skew / skew.sum(axis=1, keepdims=True)
    assert np.median((frac >= 0.05).sum(axis=1)) <= 8
    assert np.abs(frac - global_frac).max() > 0.3
    flat = partition_counts(y, dirichlet_balanced(y, 10, 100, rng(0)), 10)
    frac = flat / flat.sum(axis=1, keepdims=True)
    assert np.abs(frac - global_frac).max() < 0.06


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=80),
    k=st.integers(1, 12),
    alpha=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_balanced_property(labels: list[int], k: int, alpha: float, seed: int) -> None:
    y = np.array(labels)
    k = min(k, y.size)
    parts = dirichlet_balanced(y, k, alpha, rng(seed), num_classes=5)
    assert len(parts) == k
    assert_partition(parts, y.size)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1


# --------------------------------------------------------------------------- baselines


def test_dirichlet_min_size_and_error() -> None:
    y = np.repeat(np.arange(10), 100)
    parts = dirichlet(y, 10, 1.0, rng(0), min_partition_size=20)
    assert_partition(parts, y.size)
    assert min(p.size for p in parts) >= 20
    sb = dirichlet(y, 10, 0.5, rng(0), min_partition_size=0, self_balancing=True)
    assert_partition(sb, y.size)
    with pytest.raises(ConfigError, match="larger partition.alpha"):
        dirichlet(y, 10, 0.001, rng(0), min_partition_size=90)
    with pytest.raises(ConfigError, match="exceeds"):
        dirichlet(y, 10, 1.0, rng(0), min_partition_size=101)


def test_iid() -> None:
    y = np.arange(103) % 3
    parts = iid(y, 10, rng(0))
    assert_partition(parts, y.size)
    assert {p.size for p in parts} == {10, 11}


def test_shards_per_client() -> None:
    y = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 100))
    parts = shards(y, 5, rng(0), shards_per_client=2)
    assert_partition(parts, y.size)
    for p in parts:
        assert p.size == 200
        assert np.unique(y[p]).size <= 2
    with pytest.raises(ConfigError, match="shards_per_client"):
        shards(y, 5, rng(0), shards_per_client=0)


def _long_tailed_labels(seed: int = 0) -> np.ndarray:
    counts = [400, 200, 110, 60, 40, 30, 25, 20, 16, 12]  # shards straddle classes here
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(10), counts))


def test_pathological_gives_exactly_k_classes_per_client() -> None:
    """Where `shards` (2 shards per client) gives clients 1..4 classes on long-tailed
    labels, `pathological` gives each exactly k (issue 18)."""
    y = _long_tailed_labels()
    sh = shards(y, 10, rng(0), shards_per_client=2)
    assert max(np.unique(y[p]).size for p in sh) > 2  # what the issue saw
    for k in (1, 2, 3):
        parts = pathological(y, 10, rng(0), classes_per_client=k, seed=3)
        assert all(np.unique(y[p]).size == k for p in parts), k
        assert len(np.concatenate(parts)) == len(np.unique(np.concatenate(parts)))
    with pytest.raises(ConfigError, match="classes_per_client"):
        pathological(y, 10, rng(0), classes_per_client=11, seed=0)
    few = np.repeat(np.arange(3), [50, 50, 2])  # class 2: 2 samples, wanted by more clients
    with pytest.raises(ConfigError, match="class 2 was drawn by"):
        pathological(few, 6, rng(0), classes_per_client=3, seed=0)


def _flwr_partitions(partitioner, y: np.ndarray) -> list[list[int]]:
    datasets = pytest.importorskip("datasets")
    partitioner.dataset = datasets.Dataset.from_dict({"label": y.tolist(),
                                                      "idx": list(range(len(y)))})
    return [sorted(partitioner.load_partition(i)["idx"])
            for i in range(partitioner.num_partitions)]


@pytest.mark.parametrize("alpha,self_balancing,seed", [(0.3, False, 42), (1.0, True, 7),
                                                       (100.0, False, 0)])
def test_dirichlet_flwr_equals_flwr_datasets(alpha, self_balancing, seed) -> None:
    """The same labels and seed give flwr-datasets' DirichletPartitioner's index sets
    (skipped where flwr-datasets is not installed)."""
    fds = pytest.importorskip("flwr_datasets.partitioner")
    y = _long_tailed_labels(seed)
    ref = _flwr_partitions(fds.DirichletPartitioner(
        num_partitions=6, partition_by="label", alpha=alpha, min_partition_size=5,
        self_balancing=self_balancing, seed=seed), y)
    ours = dirichlet_flwr(y, 6, rng(99), alpha=alpha, seed=seed, min_partition_size=5,
                          self_balancing=self_balancing)
    assert [p.tolist() for p in ours] == ref


@pytest.mark.parametrize("k,seed", [(2, 42), (3, 1)])
def test_pathological_equals_flwr_datasets(k, seed) -> None:
    fds = pytest.importorskip("flwr_datasets.partitioner")
    y = _long_tailed_labels(seed)
    ref = _flwr_partitions(fds.PathologicalPartitioner(
        num_partitions=8, partition_by="label", num_classes_per_partition=k,
        class_assignment_mode="random", seed=seed), y)
    ours = pathological(y, 8, rng(99), classes_per_client=k, seed=seed)
    assert [p.tolist() for p in ours] == ref


def test_json_round_trip_and_validation(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    f.write_text(json.dumps([[3, 0], [1], []]))
    parts = from_json(f, 5)
    assert [p.tolist() for p in parts] == [[0, 3], [1], []]
    labels = np.zeros(5, dtype=int)
    out = make_partition("json", labels, 3, rng(), path=f)
    assert [p.tolist() for p in out] == [[0, 3], [1], []]
    bad = {
        "non-integer": [[0, 1.5]],
        "outside": [[0, 5]],
        "more than once": [[0, 1], [1]],
        "index lists": {"a": [0]},
    }
    for msg, data in bad.items():
        f.write_text(json.dumps(data))
        with pytest.raises(ConfigError, match=msg):
            from_json(f, 5)
    f.write_text(json.dumps([[0, 0]]))
    with pytest.raises(ConfigError, match="more than once"):
        from_json(f, 5)
    f.write_text("[[0,")
    with pytest.raises(ConfigError, match="JSON"):
        from_json(f, 5)
    with pytest.raises(ConfigError, match="does not exist"):
        from_json(tmp_path / "missing.json", 5)
    f.write_text(json.dumps([[0], [1]]))
    with pytest.raises(ConfigError, match="num_clients"):
        make_partition("json", labels, 3, rng(), path=f)


# --------------------------------------------------------------------------- dispatch


def test_make_partition_dispatch_and_errors() -> None:
    y = np.repeat(np.arange(4), 25)
    assert set(PARTITIONERS) == {"dirichlet_balanced", "dirichlet", "dirichlet_flwr", "iid",
                                 "shards", "pathological", "json"}
    assert all(isinstance(desc, str) and desc for _, desc in PARTITIONERS.values())
    direct = dirichlet_balanced(y, 4, 0.3, rng(2))
    via = make_partition("dirichlet_balanced", y, 4, rng(2), alpha=0.3)
    assert all(np.array_equal(a, b) for a, b in zip(direct, via, strict=True))
    assert len(make_partition("iid", y, 7, rng())) == 7
    with pytest.raises(ConfigError, match="dirichlet_balanced, dirichlet, iid, "
                       "dirichlet_flwr, shards, pathological, json"):
        make_partition("natural", y, 4, rng())
    for alpha in (0, -1.0):
        with pytest.raises(ConfigError, match=r"partition\.alpha must be > 0"):
            make_partition("dirichlet_balanced", y, 4, rng(), alpha=alpha)
        with pytest.raises(ConfigError, match=r"partition\.alpha must be > 0"):
            make_partition("dirichlet", y, 4, rng(), alpha=alpha)
    for k in (0, 101):
        with pytest.raises(ConfigError, match="num_clients"):
            make_partition("iid", y, k, rng())
    with pytest.raises(ConfigError, match="beta"):
        make_partition("iid", y, 4, rng(), beta=1)
    with pytest.raises(ConfigError, match="alpha"):
        make_partition("dirichlet", y, 4, rng())


# --------------------------------------------------------------------------- reporting


def test_partition_counts_csv_and_table(tmp_path: Path) -> None:
    y = np.array([0, 0, 1, 2, 2, 2])
    clients = [np.array([0, 3]), np.array([1, 2, 4, 5])]
    m = partition_counts(y, clients, 3)
    assert m.tolist() == [[1, 0, 1], [1, 1, 2]]
    f = tmp_path / "out" / "partition.csv"
    write_partition_csv(f, m, ["cat", "dog", "emu"])
    with f.open() as fh:
        rows = list(csv.reader(fh))
    assert rows == [
        ["client", "cat", "dog", "emu", "total"],
        ["0", "1", "0", "1", "2"],
        ["1", "1", "1", "2", "4"],
        ["total", "2", "1", "3", "6"],
    ]
    table = format_partition_table(m, ["cat", "dog", "emu"])
    lines = table.splitlines()
    assert lines[0].split() == ["client", "cat", "dog", "emu", "total"]
    assert lines[-1].split() == ["total", "2", "1", "3", "6"]
    assert len({len(line) for line in lines}) == 1  # fixed width
    with pytest.raises(ConfigError, match="class names"):
        format_partition_table(m, ["cat", "dog"])
