"""FedAdagrad, FedYogi, FedAdam (Reddi et al., ICLR 2021, Algorithm 2; fl/algorithms/fedopt.py,
one file): the server step by hand for each, buffers averaged as FedAvg, the state reset and
checkpointed; a run in process equals the same run on Flower. (Batched = one client at a time
is tests/test_batched.py's, for every registered algorithm.)"""

import math

import pytest
import torch

from falkit import config
from falkit.fl.algorithms import ALGORITHMS, Client, create

NAMES = ("fedadagrad", "fedyogi", "fedadam")


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_its_own_options_section(name):
    assert name in ALGORITHMS and ALGORITHMS[name].batchable()
    cfg = config.load(None, overrides={"fl.algorithm": name, f"{name}.eta": "0.5",
                                       f"{name}.v_init": "zero"})
    assert cfg.section(name).eta == 0.5 and cfg.section(name).v_init == "zero"
    assert f"[{name}]" in config.dumps(cfg)
    algo = ALGORITHMS[name](**ALGORITHMS[name].config_options(cfg))
    assert algo.eta == 0.5 and algo.v_init == "zero"
    with pytest.raises(Exception, match=f"{name}.tau must be > 0"):
        config.load(None, overrides={"fl.algorithm": name, f"{name}.tau": "0"})
    with pytest.raises(Exception, match=f"{name}.beta1"):
        config.load(None, overrides={"fl.algorithm": name, f"{name}.beta1": "1"})


def _round(algo, glob, states_weights):
    algo.begin_round(glob, ["w"])
    clients = [Client(id=i, weight=wt, state=s) for i, (s, wt) in enumerate(states_weights)]
    return algo.aggregate(glob, clients, num_clients=4)


def test_the_three_server_steps_by_hand():
    eta, b1, b2, tau = 0.5, 0.9, 0.99, 0.1
    glob = {"w": torch.tensor([1.0, 1.0]), "bn.running_mean": torch.tensor([0.0]),
            "bn.num_batches_tracked": torch.tensor(3)}
    # two clients, weights 1 and 3: Δ = (1·[2, 0] + 3·[0, 1]) / 4 − [1, 1] = [−0.5, −0.25]
    a = {"w": torch.tensor([2.0, 0.0]), "bn.running_mean": torch.tensor([4.0]),
         "bn.num_batches_tracked": torch.tensor(7)}
    b = {"w": torch.tensor([0.0, 1.0]), "bn.running_mean": torch.tensor([0.0]),
         "bn.num_batches_tracked": torch.tensor(7)}
    delta = [-0.5, -0.25]
    m = [(1 - b1) * d for d in delta]  # m_0 = 0.1 Δ
    v0 = tau ** 2
    v = {"fedadagrad": [v0 + d * d for d in delta],
         # Yogi: v0 − (1−β2) Δ² sign(v0 − Δ²); v0 = 0.01 < Δ² for both: + (1−β2) Δ²
         "fedyogi": [v0 + (1 - b2) * d * d for d in delta],
         "fedadam": [b2 * v0 + (1 - b2) * d * d for d in delta]}
    for name in NAMES:
        algo = create(name, eta=eta, beta1=b1, beta2=b2, tau=tau)
        out = _round(algo, glob, [(a, 1.0), (b, 3.0)])
        want = [1.0 + eta * mi / (math.sqrt(vi) + tau) for mi, vi in zip(m, v[name], strict=True)]
        assert out["w"].tolist() == pytest.approx(want, rel=1e-6), name
        assert algo.v["w"].tolist() == pytest.approx(v[name], rel=1e-6), name
        assert float(out["bn.running_mean"]) == pytest.approx(1.0)  # FedAvg: (4 + 0)/4
        assert int(out["bn.num_batches_tracked"]) == 7  # integers: the first client's


def test_yogi_shrinks_v_where_it_is_larger_than_the_update():
    algo = create("fedyogi", eta=1.0, beta1=0.0, beta2=0.5, tau=1e-3)
    glob = {"w": torch.tensor([0.0])}
    algo.begin_round(glob, ["w"])
    algo.m["w"], algo.v["w"] = torch.zeros(1), torch.tensor([1.0])  # v > Δ² = 0.04
    out = algo.aggregate(glob, [Client(id=0, weight=1.0, state={"w": torch.tensor([0.2])})], 4)
    assert float(algo.v["w"]) == pytest.approx(1.0 - 0.5 * 0.04)  # v − (1−β2)Δ²·sign(+)
    assert float(out["w"]) == pytest.approx(0.2 / (math.sqrt(0.98) + 1e-3))


def test_second_round_uses_the_moments_and_reset_forgets_them():
    algo = create("fedadam", eta=1.0, beta1=0.5, beta2=0.5, tau=1.0, v_init="zero")
    glob = {"w": torch.tensor([0.0])}
    one = _round(algo, glob, [({"w": torch.tensor([2.0])}, 1.0)])
    # Δ = 2: m = 1, v = 2, x = 0 + 1/(√2 + 1)
    assert float(one["w"]) == pytest.approx(1 / (math.sqrt(2) + 1))
    x1 = float(one["w"])
    two = _round(algo, one, [({"w": torch.tensor([x1])}, 1.0)])  # Δ = 0
    # m = 0.5, v = 1: x = x1 + 0.5 / (1 + 1)
    assert float(two["w"]) == pytest.approx(x1 + 0.25)
    saved = algo.state_dict()
    again = create("fedadam", eta=1.0, beta1=0.5, beta2=0.5, tau=1.0, v_init="zero")
    again.load_state_dict(saved)
    assert float(again.m["w"]) == pytest.approx(0.5) and float(again.v["w"]) == 1.0
    algo.reset()
    assert algo.m == {} and algo.v == {}


def test_a_run_differs_from_fedavg_and_trains(tmp_path):
    from tests.test_transports import SMALL

    from falkit.loop import run

    over = {**SMALL, "strategy": "random", "budget.cycles": "1"}
    avg = run(config.load(None, overrides={**over, "out_dir": str(tmp_path / "a")})).metrics
    adam = run(config.load(None, overrides={**over, "fl.algorithm": "fedadam",
                                            "fedadam.eta": "0.01",
                                            "out_dir": str(tmp_path / "b")})).metrics
    # another global model: another AUC (two rounds on digits stay near chance accuracy)
    assert adam[0]["auc"] != avg[0]["auc"] and 0 < adam[0]["accuracy"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_in_process_equals_flower(tmp_path, name):
    pytest.importorskip("flwr")
    from tests.test_transports import same_in_process_and_on_flower

    same_in_process_and_on_flower(tmp_path, strategy="entropy@G", **{
        "fl.algorithm": name, f"{name}.eta": "0.03", "fl.reset": "continue"})
