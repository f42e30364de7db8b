"""FL algorithms: one aggregation step against a hand computation, and the reductions
FedProx(mu=0) = FedAvg, SCAFFOLD with zero control variates = FedAvg."""

import numpy as np
import pytest
import torch

from falkit import config
from falkit.data.sources import load
from falkit.fl.algorithms import Client, create, weighted_average
from falkit.fl.algorithms.fednova import FedNova
from falkit.fl.algorithms.scaffold import Scaffold
from falkit.fl.engine import Engine, ImageTensors
from falkit.loop import run


def _client(k, weight, **state):
    return Client(id=k, weight=weight, state={n: torch.tensor(v) for n, v in state.items()})


def test_fedavg_weighted_average_and_integer_buffers():
    like = {"w": torch.zeros(2), "n": torch.tensor(0)}
    out = weighted_average([_client(0, 1.0, w=[1.0, 2.0], n=3),
                            _client(1, 3.0, w=[3.0, 6.0], n=5)], like)
    assert out["w"].tolist() == [2.5, 5.0]
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 3  # the first client's, not averaged


def test_fednova_one_step_by_hand():
    g = {"w": torch.tensor([1.0])}
    c0 = _client(0, 1.0, w=[0.0])  # moved 1.0 in 2 steps
    c1 = _client(1, 1.0, w=[0.5])  # moved 0.5 in 4 steps
    algo = FedNova(momentum=0.0)
    for c, tau in ((c0, 2), (c1, 4)):
        algo.begin_client(torch.nn.Linear(1, 1), g, c)
        c.extras["params"] = ["w"]
        c.steps = tau
        algo.end_client(None, g, c)
    assert (c0.extras["a"], c1.extras["a"]) == (2.0, 4.0)
    # d = 0.5 * 1/2 + 0.5 * 0.5/4 = 0.3125 ; tau_eff = 0.5*2 + 0.5*4 = 3 ; w = 1 - 3 * 0.3125
    out = algo.aggregate(g, [c0, c1], num_clients=2)
    assert out["w"].item() == pytest.approx(1 - 3 * 0.3125)


def test_fednova_momentum_normaliser():
    algo = FedNova(momentum=0.9)
    c = Client(id=0, weight=1.0, state={})
    c.steps = 10
    algo.end_client(None, {}, c)
    rho = 0.9
    assert c.extras["a"] == pytest.approx((10 - rho * (1 - rho**10) / (1 - rho)) / (1 - rho))


def test_scaffold_control_variates_by_hand():
    g = {"w": torch.tensor([1.0])}
    algo = Scaffold()
    algo.begin_round(g, ["w"])
    clients = []
    for k, w_k in ((0, 0.8), (1, 0.6)):
        c = Client(id=k, weight=1.0, lr=0.1)
        algo.begin_client(None, g, c)
        c.state = {"w": torch.tensor([w_k])}
        c.steps = 2
        algo.end_client(None, g, c)
        clients.append(c)
    # c_k+ = 0 - 0 + (1 - w_k) / (2 * 0.1): 1.0 and 2.0 ; K = 4 clients, 2 participate
    assert clients[0].extras["c_k_new"]["w"].item() == pytest.approx(1.0)
    algo.aggregate(g, clients, num_clients=4)
    assert algo.c["w"].item() == pytest.approx((1.0 + 2.0) / 4)
    assert algo.c_k[1]["w"].item() == pytest.approx(2.0)
    # next round: client 1's gradient correction is c - c_1 = 0.75 - 2.0
    c = Client(id=1, weight=1.0)
    algo.begin_client(None, g, c)
    assert c.extras["delta"]["w"].item() == pytest.approx(0.75 - 2.0)


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def _engine(ds, algorithm, **extra):
    cfg = config.load(None, overrides={"fl.algorithm": algorithm, "fl.local_epochs": "1",
                                       "model.backbone": "resnet8_preact16", **extra})
    return Engine(cfg, ImageTensors(ds.x_train, torch.as_tensor(ds.y_train), ds.mean, ds.std),
                  ImageTensors(ds.x_test, torch.as_tensor(ds.y_test), ds.mean, ds.std), 10,
                  num_clients=3)


@pytest.mark.parametrize("algorithm, extra", [("fedprox", {"fl.mu": "0"}), ("scaffold", {})])
def test_reductions_to_fedavg(digits, algorithm, extra):
    pools = [np.arange(0, 120), np.arange(120, 200), np.arange(200, 330)]
    ref = _engine(digits, "fedavg")
    other = _engine(digits, algorithm, **extra)
    g0 = ref.init_state(0, 0)
    a, _ = ref.fl_round(g0, [0, 1, 2], pools, 0.05, 0, (0, 0))
    b, _ = other.fl_round(g0, [0, 1, 2], pools, 0.05, 0, (0, 0))
    assert all(torch.equal(a[k], b[k]) for k in a)  # first round: c = c_k = 0 exactly
    if algorithm == "scaffold":  # afterwards the control variates are no longer zero
        a2, _ = ref.fl_round(a, [0, 1, 2], pools, 0.05, 0, (0, 1))
        b2, _ = other.fl_round(b, [0, 1, 2], pools, 0.05, 0, (0, 1))
        assert not all(torch.equal(a2[k], b2[k]) for k in a2)


def test_fedprox_term_changes_the_update(digits):
    pools = [np.arange(0, 120), np.arange(120, 200)]
    g0 = _engine(digits, "fedavg").init_state(0, 0)
    a, _ = _engine(digits, "fedavg").fl_round(g0, [0, 1], pools, 0.05, 0, (0, 0))
    b, _ = _engine(digits, "fedprox", **{"fl.mu": "1.0"}).fl_round(g0, [0, 1], pools, 0.05, 0,
                                                                   (0, 0))
    # the proximal term pulls towards the global weights: a smaller step
    def dist(s):
        return sum(float(((s[k] - g0[k]) ** 2).sum()) for k in g0 if k.endswith("weight"))
    assert dist(b) < dist(a)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "scaffold", "fednova"])
def test_loop_runs_each_algorithm_with_partial_participation(tmp_path, algorithm):
    cfg = config.load(None, overrides={
        "data.dataset": "digits", "data.rho": "none", "partition.num_clients": "4",
        "partition.method": "iid", "budget.cycles": "2", "fl.rounds": "2",
        "fl.local_epochs": "1", "fl.fraction": "0.5", "fl.algorithm": algorithm,
        "model.backbone": "resnet8_preact16", "strategy": "entropy@G", "out_dir": str(tmp_path)})
    rows = run(cfg).metrics
    assert len(rows) == 2 and all(0 < r["accuracy"] <= 1 for r in rows)
    per_round = rows[0]["comm_bytes"] / 2  # 2 rounds
    full = run(config.load(None, overrides={**{k: str(v) for k, v in {
        "data.dataset": "digits", "data.rho": "none", "partition.num_clients": "4",
        "partition.method": "iid", "budget.cycles": "1", "fl.rounds": "1",
        "fl.local_epochs": "1", "fl.algorithm": algorithm, "model.backbone": "resnet8_preact16",
        "out_dir": str(tmp_path / "full")}.items()}})).metrics[0]["comm_bytes"]
    assert per_round * 2 == full  # half the clients participate: half the traffic


def test_unknown_algorithm():
    from falkit.errors import ConfigError

    with pytest.raises(ConfigError, match="fl.algorithm"):
        create("fedsgd")
