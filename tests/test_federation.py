"""FMNIST-LT exactly as ALGORITHMS.md §1 (the FairFAL protocol) on the real Fashion-MNIST."""

import numpy as np
import pytest

from falkit import config
from falkit.data.federation import build, client_budgets
from falkit.data.imbalance import class_counts_long_tail
from falkit.errors import ConfigError


@pytest.fixture(scope="module")
def fmnist_lt():
    cfg = config.load("configs/fmnist_lt.toml")
    return cfg, build(cfg)


def test_class_counts_follow_the_formula(fmnist_lt):
    cfg, data = fmnist_lt
    n_max = 60000 // 10
    expected = [int(n_max * (1 / 20) ** (c / 9)) for c in range(10)]
    assert data.class_counts().tolist() == expected
    assert expected == class_counts_long_tail(n_max, 10, 20.0, "exp")
    assert expected[0] == 6000 and expected[-1] == 300  # rho = n_max / n_min = 20
    assert len(data.dataset.x_test) == 10000  # the test set is never subsampled


def test_equal_client_sizes_and_disjoint_cover(fmnist_lt):
    _, data = fmnist_lt
    sizes = [len(c) for c in data.clients]
    assert len(sizes) == 10 and max(sizes) - min(sizes) <= 1
    allidx = np.concatenate(data.clients)
    assert len(np.unique(allidx)) == len(allidx) == data.num_train


def test_budget_rule(fmnist_lt):
    cfg, data = fmnist_lt
    n = data.num_train
    assert client_budgets(cfg, data) == [int(round(n, -2) * 0.05 / 10)] * 10
    assert client_budgets(cfg, data)[0] == 102  # N = 20428 -> 20400 * 0.05 / 10


def test_alpha_controls_skew(fmnist_lt):
    _, skewed = fmnist_lt
    mixed = build(config.load("configs/fmnist_lt.toml", overrides={"partition.alpha": "100"}))
    def classes_seen(data):
        counts = data.partition_counts()
        return np.median((counts >= 0.05 * counts.sum(1, keepdims=True)).sum(1))
    assert classes_seen(skewed) < classes_seen(mixed)
    glob = mixed.class_counts() / mixed.num_train
    share = mixed.partition_counts() / mixed.partition_counts().sum(1, keepdims=True)
    assert np.abs(share - glob).max() < 0.08  # alpha = 100 mirrors the global tail


def test_seed_changes_partition_but_is_deterministic(fmnist_lt):
    cfg, data = fmnist_lt
    again = build(config.load("configs/fmnist_lt.toml"))
    assert all(np.array_equal(a, b) for a, b in zip(data.clients, again.clients, strict=True))
    other = build(config.load("configs/fmnist_lt.toml", overrides={"seed": "1"}))
    assert not np.array_equal(data.partition_counts(), other.partition_counts())


def test_impossible_budget_is_a_config_error(fmnist_lt):
    cfg, data = fmnist_lt
    cfg = config.load("configs/fmnist_lt.toml", overrides={"budget.fraction": "0.2"})
    with pytest.raises(ConfigError, match="impossible budget"):
        client_budgets(cfg, data)
