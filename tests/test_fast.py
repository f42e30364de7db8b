"""FAST (ALGORITHMS.md §6, §7): the selection primitives on hand-made inputs with known
answers, both scopes' budgets, the refinement arithmetic, the communication accounting, and
end-to-end runs with the offline `pca` encoder."""

import csv
import math

import numpy as np
import pytest
import torch

from falkit import config as config_mod
from falkit import fast
from falkit.cli import main
from falkit.data.federation import FederatedData
from falkit.data.sources import ImageDataset, find
from falkit.errors import ConfigError
from falkit.oracle import SimulatedOracle

DIGITS = ["strategy=fast", "data.dataset=digits", "data.rho=none", "partition.num_clients=3",
          "partition.method=iid", "fl.rounds=2", "fl.local_epochs=1", "fast.initial=0.05",
          "fast.budget=0.1", "model.backbone=linear"]


# -- kNN weak labels ----------------------------------------------------------------------------
def test_knn_weak_labels_on_a_2d_example():
    bank = np.array([[0, 0], [1, 0], [0, 1], [10, 0], [11, 0], [10, 1]], dtype=float)
    bank_y = np.array([0, 0, 0, 1, 1, 1])
    z = np.array([[0.2, 0.2], [10.5, 0.2], [4, 0], [6, 0]])
    # k = 3: the three nearest are all of one class for the first two points; x = 4 is
    # nearer the class-0 cluster (1,0),(0,0),(0,1), x = 6 nearer class 1
    assert fast.knn_weak_labels(z, bank, bank_y, k=3, num_classes=2).tolist() == [0, 1, 0, 1]
    # k = 5 at x = 4: (1,0),(0,0),(0,1) of class 0 and (10,0),(10,1) → 0 wins 3 : 2;
    # at x = 6: (10,0),(10,1),(11,0) and (1,0),(0,0) → 1 wins 3 : 2
    assert fast.knn_weak_labels(z, bank, bank_y, k=5, num_classes=2).tolist() == [0, 1, 0, 1]


def test_knn_ties_go_to_the_smallest_class_and_k_caps_at_the_bank():
    bank = np.array([[-1.0, 0.0], [1.0, 0.0]])
    # one neighbour of classes 1 and 2 each at the same distance: a 1 : 1 vote → class 1
    # (the smaller), whichever order the bank lists them in
    assert fast.knn_weak_labels(np.zeros((1, 2)), bank, np.array([2, 1]), 2, 3).tolist() == [1]
    assert fast.knn_weak_labels(np.zeros((1, 2)), bank, np.array([1, 2]), 2, 3).tolist() == [1]
    # k = 10 with a bank of 3: all three vote
    bank3 = np.array([[0.0, 0.0], [5.0, 0.0], [6.0, 0.0]])
    assert fast.knn_weak_labels(np.zeros((1, 2)), bank3, np.array([0, 2, 2]), 10,
                                3).tolist() == [2]


def test_knn_equal_distances_take_the_smaller_bank_index():
    bank = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 5.0]])
    # k = 1 with the two nearest at equal distance: bank index 0 (class 1) wins
    assert fast.knn_weak_labels(np.zeros((1, 2)), bank, np.array([1, 0, 0]), 1,
                                2).tolist() == [1]


# -- class similarity and uncertainty -------------------------------------------------------------
def test_class_similarity_is_the_mean_cosine_per_present_class():
    bank = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    bank_y = np.array([0, 2, 2])  # class 1 absent → excluded
    z = np.array([[2.0, 0.0], [1.0, 1.0]])
    s, present = fast.class_similarity(z, bank, bank_y, num_classes=3)
    assert present.tolist() == [0, 2]
    r = 1 / math.sqrt(2)
    # FAST Eq. 7 by hand: z0 = (1,0): cos with (1,0) = 1; with (0,1) = 0 and (r,r) = r
    expected = np.array([[1.0, (0 + r) / 2], [r, (r + 1) / 2]])
    np.testing.assert_allclose(s, expected, atol=1e-12)


def test_each_uncertainty_variant_by_hand():
    s = np.array([[0.9, 0.1, 0.0], [0.4, 0.35, 0.25], [0.5, 0.5, 0.0]])
    p = np.exp(s) / np.exp(s).sum(1, keepdims=True)
    ent = -(p * np.log(p)).sum(1)
    np.testing.assert_allclose(fast.uncertainty(s, "entropy"), ent)
    # norm: ‖s − onehot(argmax)‖: row 0 → sqrt(0.1² + 0.01 + 0) ; row 2 argmax = first 0.5
    np.testing.assert_allclose(fast.uncertainty(s, "norm"),
                               [math.sqrt(0.01 + 0.01), math.sqrt(0.36 + 0.35**2 + 0.25**2),
                                math.sqrt(0.25 + 0.25)])
    ps = np.sort(p, 1)[:, ::-1]
    np.testing.assert_allclose(fast.uncertainty(s, "least_confidence"), 1 - ps[:, 0])
    np.testing.assert_allclose(fast.uncertainty(s, "smallest_margin"), -(ps[:, 0] - ps[:, 1]))
    np.testing.assert_allclose(fast.uncertainty(s, "largest_margin"), -(ps[:, 0] - ps[:, 2]))
    # row 2 has a zero top-2 margin: the most uncertain by smallest margin
    assert fast.uncertainty(s, "smallest_margin").argmax() == 2
    # row 1 is the flattest: most uncertain by entropy, least confidence and largest margin
    for m in ("entropy", "least_confidence", "largest_margin"):
        assert fast.uncertainty(s, m).argmax() == 1, m
    r1 = fast.uncertainty(s, "random", np.random.default_rng(3))
    r2 = fast.uncertainty(s, "random", np.random.default_rng(3))
    assert r1.tolist() == r2.tolist() and len(r1) == 3
    with pytest.raises(ValueError):
        fast.uncertainty(s, "random")


def test_top_uncertain_breaks_ties_by_position():
    assert fast.top_uncertain(np.array([0.5, 0.9, 0.5, 0.5, 0.1]), 3).tolist() == [0, 1, 2]
    assert fast.top_uncertain(np.array([0.5, 0.9]), 5).tolist() == [0, 1]
    assert fast.top_uncertain(np.array([0.5, 0.9]), 0).tolist() == []


# -- budgets: per client vs pooled -------------------------------------------------------------
def _toy_data(pool_sizes=(10, 30), num_classes=2, seed=0):
    n = sum(pool_sizes)
    g = np.random.default_rng(seed)
    y = np.arange(n) % num_classes
    x = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    ds = ImageDataset("toy", x, y, x[:4], y[:4], [str(c) for c in range(num_classes)], (0.5,),
                      (0.5,), False, 0, "test")
    clients, start = [], 0
    for size in pool_sizes:
        clients.append(np.arange(start, start + size))
        start += size
    # embeddings: class c around 5·(cos θ_c, sin θ_c), θ_c = c · 60°, plus noise: kNN and
    # cosine similarity are mostly right, wrong near the boundary
    theta = y * np.pi / 3
    z = 5.0 * np.stack([np.cos(theta), np.sin(theta)], 1) + g.normal(0, 1.5, (n, 2))
    return FederatedData(ds, clients, np.arange(n)), z


def _cfg(**over):
    flat = {"strategy": "fast", "fast.initial": 0.1, "fast.budget": 0.2}
    flat.update(over)
    return config_mod.load(overrides=flat)


def test_per_client_budget_is_a_fraction_of_each_pool():
    data, z = _toy_data()
    oracle = SimulatedOracle(data.dataset.y_train)
    p = fast.two_passes(_cfg(**{"fast.budget_split": "proportional"}), data, z, oracle)
    # FAST Alg. 1: r0 is a fraction of the client's own pool (ceil); b_k too, proportional
    assert [len(g) for g in p.initial] == [1, 3]
    assert [len(q) for q in p.queried] == [2, 6]
    # the default (FAST's text, "evenly shared among clients"): ceil(0.2 * 40) = 8, 4 each
    even = fast.two_passes(_cfg(), data, z, SimulatedOracle(data.dataset.y_train))
    assert [len(q) for q in even.queried] == [4, 4]
    for k, pool in enumerate(data.clients):
        assert set(p.initial[k]) <= set(pool) and set(p.queried[k]) <= set(pool)
        assert not set(p.initial[k]) & set(p.queried[k])
    assert oracle.count == 1 + 3 + 2 + 6
    assert (p.weak[np.concatenate(p.initial)] == -1).all()  # human-labeled: no weak label
    assert p.bank_sizes == [1, 3]
    assert fast.two_passes(_cfg(**{"fast.bank": "local"}), data, z,
                           SimulatedOracle(data.dataset.y_train)).bank_sizes == [0, 0]


def test_pooled_budget_is_global_with_a_class_balanced_initial_set():
    data, z = _toy_data(pool_sizes=(10, 30))
    oracle = SimulatedOracle(data.dataset.y_train)
    p = fast.two_passes(_cfg(**{"fast.scope": "pooled"}), data, z, oracle)
    g0 = np.concatenate(p.initial)
    # ceil(0.1 · 40) = 4 initial labels, 2 per class; ceil(0.2 · 40) = 8 queries in all,
    # given to the clients that own them
    assert len(g0) == 4 and np.bincount(data.dataset.y_train[g0]).tolist() == [2, 2]
    assert sum(len(q) for q in p.queried) == 8
    for k, pool in enumerate(data.clients):
        assert set(p.queried[k]) <= set(pool) and set(p.initial[k]) <= set(pool)
    assert oracle.count == 12


def test_refine_off_and_budget_zero_query_nothing():
    data, z = _toy_data()
    for over in ({"fast.refine": False}, {"fast.budget": 0.0}):
        p = fast.two_passes(_cfg(**over), data, z, SimulatedOracle(data.dataset.y_train))
        assert all(len(q) == 0 for q in p.queried)


def test_refinement_raises_weak_label_accuracy_by_exactly_the_corrected_count():
    data, z = _toy_data(pool_sizes=(40, 60), seed=1)
    p = fast.two_passes(_cfg(**{"fast.budget": 0.3}), data, z,
                        SimulatedOracle(data.dataset.y_train))
    rows = fast.weak_label_report(data, p)
    y = data.dataset.y_train
    total_corrected = 0
    for k, r in enumerate(rows[:-1]):
        q = p.queried[k]
        corrected = int((p.weak[q] != y[q]).sum())
        assert r["corrected"] == corrected
        assert r["weak_n"] == len(data.clients[k]) - len(p.initial[k])
        n = r["weak_n"]
        assert r["weak_acc_after"] == pytest.approx(r["weak_acc_before"] + corrected / n,
                                                    abs=2e-6)
        total_corrected += corrected
    assert total_corrected > 0  # the example has something to correct
    assert rows[-1]["client"] == "all" and rows[-1]["corrected"] == total_corrected
    assert rows[-1]["weak_acc_after"] == pytest.approx(
        rows[-1]["weak_acc_before"] + total_corrected / rows[-1]["weak_n"], abs=2e-6)


def test_uncertainty_refinement_corrects_more_than_random_here():
    """On a two-cluster example the weak labels are wrong near the boundary, where the
    similarity vector is flattest: uncertainty refinement finds more of them than random."""
    data, z = _toy_data(pool_sizes=(200, 200), seed=2)
    y = data.dataset.y_train
    out = {}
    for m in ("entropy", "random"):
        p = fast.two_passes(_cfg(**{"fast.uncertainty": m, "fast.budget": 0.1}), data, z,
                            SimulatedOracle(y))
        out[m] = fast.weak_label_report(data, p)[-1]["corrected"]
    assert out["entropy"] > out["random"]


# -- communication ------------------------------------------------------------------------------
def test_model_traffic_and_bank_payloads_by_hand():
    t = fast.model_traffic(model_bytes=1000, clients=10, rounds=100)
    assert t["round_bytes"] == 2 * 1000 * 10 and t["total_bytes"] == 2_000_000
    assert t["total_mib"] == 2_000_000 / 2**20
    up, down = fast.bank_payloads([3, 5], dim=4, clients=2)
    entry = 4 * 4 + 8  # float32 embedding + int64 label
    assert up["bytes"] == 8 * entry and down["bytes"] == 2 * 8 * entry


def test_config_fast_section_is_saved_only_for_fast_runs():
    assert "[fast]" in config_mod.dumps(_cfg())
    assert "[fast]" not in config_mod.dumps(config_mod.load(overrides={"strategy": "random"}))
    with pytest.raises(ConfigError, match="fast.scope"):
        _cfg(**{"fast.scope": "per_client"})
    with pytest.raises(ConfigError, match="fast.budget"):
        _cfg(**{"fast.budget": 1.0})
    with pytest.raises(ConfigError, match="fast.initial"):
        _cfg(**{"fast.initial": 0.5, "fast.budget": 0.6})
    with pytest.raises(ConfigError, match="strategy = fast"):
        fast.run(config_mod.load(overrides={"strategy": "random"}))


# -- end to end ---------------------------------------------------------------------------------
def test_fast_run_on_digits_writes_results_and_accounts_bytes(tmp_path, capsys):
    args = ["fast", *DIGITS, f"out_dir={tmp_path}", "name=f",
            f"fast.cache_dir={tmp_path / 'cache'}", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "weak-label accuracy before -> after" in out and "all" in out
    run = tmp_path / "f"
    for name in ("config.toml", "metrics.csv", "clients.csv", "comm.csv", "queries.jsonl",
                 "partition.csv", "status.json"):
        assert (run / name).is_file(), name
    row = next(csv.DictReader((run / "metrics.csv").open()))
    cfg = config_mod.loads((run / "config.toml").read_text())
    assert cfg.strategy == "fast" and cfg.model.backbone == "linear"
    d, C, K, R = int(row["embedding_dim"]), 10, 3, 2
    model = (d * C + C) * 4  # Linear(d → C): float32 weight and bias
    assert int(row["comm_bytes"]) == R * 2 * K * model  # ALGORITHMS.md §7
    assert int(row["comm_down_bytes"]) == int(row["comm_up_bytes"]) == R * K * model
    clients = list(csv.DictReader((run / "clients.csv").open()))
    n0 = int(clients[-1]["initial"])
    assert int(row["oneoff_bytes"]) == n0 * (4 * d + 8) * (1 + K)  # bank up + down to all
    comm = list(csv.DictReader((run / "comm.csv").open()))
    assert sum(int(r["bytes"]) for r in comm if r["payload"] == "model") == int(row["comm_bytes"])
    assert int(row["labeled"]) == sum(int(c["initial"]) + int(c["queried"])
                                      for c in clients[:-1])
    assert 0 <= float(row["accuracy"]) <= 1
    # finished: a second call skips; `falkit show` reads it like any run
    assert main(args) == 0
    assert "already complete" in capsys.readouterr().err
    assert main(["show", str(run)]) == 0


def test_comm_command_prints_the_hand_computed_figure(capsys):
    assert main(["comm", "--model", "linear", "--dataset", "digits", "--clients", "10",
                 "--rounds", "100", "--dim", "512"]) == 0
    out = capsys.readouterr().out
    b = (512 * 10 + 10) * 4
    assert f"{b:,} bytes per state dict" in out
    assert f"{100 * 2 * 10 * b:,} B" in out
    assert main(["comm", "--model", "linear", "--dataset", "digits"]) == 2
    assert "--dim" in capsys.readouterr().err


def test_fast_compare_lays_out_table_iii(tmp_path, capsys):
    args = ["fast-compare", *[a for a in DIGITS if not a.startswith(("strategy", "model."))],
            "model.backbone=resnet8_preact16", "budget.cycles=2", "fl.rounds=1",
            f"out_dir={tmp_path}", f"fast.cache_dir={tmp_path / 'cache'}",
            "--baselines", "random", "--fast", "model.backbone=linear", "--quiet"]
    assert main(args) == 0
    text = (tmp_path / "fast_compare" / "comparison.md").read_text()
    assert "| random |" in text and "| FAST (pca, linear) |" in text
    rows = list(csv.DictReader((tmp_path / "fast_compare" / "comparison.csv").open()))
    assert [r["al_rounds"] for r in rows] == ["2", "1"]
    capsys.readouterr()


def test_fast_on_fmnist_lt_quick_with_pca_linear_probe(tmp_path):
    """Done-when: FAST runs on FMNIST-LT (quick preset) end to end with the pca encoder."""
    if find("fmnist") is None:
        pytest.skip("Fashion-MNIST is not on this machine")
    cfg = config_mod.load("configs/fmnist_lt.toml", preset="quick", overrides={
        "strategy": "fast", "model.backbone": "linear", "out_dir": str(tmp_path),
        "fast.cache_dir": str(tmp_path / "cache")})
    row = fast.run(cfg).metrics[0]
    assert row["weak_acc_after"] > row["weak_acc_before"] > 0.5
    assert row["accuracy"] > 0.2  # far above chance (0.1) with 6 % human labels
    # ceil(1 % · 2043) per client, and ceil(5 % · 20 428) = 1 022 shared evenly
    assert row["labeled"] == 10 * 21 + 1022


@pytest.mark.slow
def test_fast_on_fmnist_lt_quick_trains_cnn4_on_images(tmp_path):
    if find("fmnist") is None:
        pytest.skip("Fashion-MNIST is not on this machine")
    cfg = config_mod.load("configs/fmnist_lt.toml", preset="quick", overrides={
        "strategy": "fast", "out_dir": str(tmp_path), "fast.cache_dir": str(tmp_path / "c")})
    row = fast.run(cfg).metrics[0]
    assert row["accuracy"] > 0.2 and row["comm_bytes"] == 3 * 2 * 10 * 452_424
