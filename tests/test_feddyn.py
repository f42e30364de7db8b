"""FedDyn (Acar et al., ICLR 2021; fl/algorithms/feddyn.py, one file): its client objective,
its gradient-state update and the server's h, by hand; a run in process equals the same run
on Flower. (Batched = one client at a time is tests/test_batched.py's, for every registered
algorithm; a Flower run resumed after a cycle, h and the clients' states carried over, is
tests/test_transports.py's.)"""

import pytest
import torch
from torch import nn

from falkit import config
from falkit.fl.algorithms import ALGORITHMS, Client, create


def test_feddyn_is_registered_with_its_own_options_section():
    assert "feddyn" in ALGORITHMS and ALGORITHMS["feddyn"].batchable()
    cfg = config.load(None, overrides={"fl.algorithm": "feddyn", "feddyn.alpha": "0.1"})
    assert cfg.feddyn.alpha == 0.1
    assert "[feddyn]" in config.dumps(cfg)
    assert "[feddyn]" not in config.dumps(config.load(None))  # only the run's own section
    with pytest.raises(Exception, match="feddyn.alpha must be > 0"):
        config.load(None, overrides={"fl.algorithm": "feddyn", "feddyn.alpha": "0"})


def test_client_objective_and_gradient_state_by_hand():
    alpha = 0.5
    algo = create("feddyn", alpha=alpha)
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    glob = {"weight": torch.tensor([[0.0, 1.0]])}
    algo.begin_round(glob, ["weight"])
    client = Client(id=3, weight=1.0)
    algo.begin_client(model, glob, client)
    algo.grads[3] = None  # not read again: begin_client took its state already
    client.extras["grad"] = {"weight": torch.tensor([[1.0, -1.0]])}
    loss = algo.extra_loss(model, client)
    # −⟨g, θ⟩ + α/2 ‖θ − θ_g‖² = −(1·1 + (−1)·2) + 0.25·(1 + 1) = 1 + 0.5
    assert float(loss) == pytest.approx(1.5)
    loss.backward()  # ∂/∂θ = −g + α(θ − θ_g) = [−1 + 0.5, 1 + 0.5]
    assert torch.allclose(model.weight.grad, torch.tensor([[-0.5, 1.5]]))
    client.state = {"weight": model.weight.detach().clone()}
    algo.end_client(model, glob, client)  # g − α(θ_k − θ_g) = [1 − 0.5, −1 − 0.5]
    assert torch.allclose(client.extras["grad_new"]["weight"], torch.tensor([[0.5, -1.5]]))


def test_server_h_and_the_new_global_model_by_hand():
    alpha = 0.5
    algo = create("feddyn", alpha=alpha)
    glob = {"w": torch.tensor([1.0]), "bn.num_batches_tracked": torch.tensor(3)}
    algo.begin_round(glob, ["w"])
    a = Client(id=0, weight=10.0, state={"w": torch.tensor([3.0]),
                                         "bn.num_batches_tracked": torch.tensor(5)})
    b = Client(id=1, weight=30.0, state={"w": torch.tensor([2.0]),
                                         "bn.num_batches_tracked": torch.tensor(5)})
    out = algo.aggregate(glob, [a, b], num_clients=4)
    # h = 0 − α/m Σ(θ_k − θ_g) = −0.5/4 · (2 + 1) = −0.375
    assert float(algo.h["w"]) == pytest.approx(-0.375)
    # θ = uniform mean (2.5) − h/α = 2.5 + 0.75; buffers as FedAvg (first client's ints)
    assert float(out["w"]) == pytest.approx(3.25)
    assert int(out["bn.num_batches_tracked"]) == 5
    out2 = algo.aggregate(out, [a], num_clients=4)  # h keeps accumulating
    assert float(algo.h["w"]) == pytest.approx(-0.375 - 0.5 / 4 * (3.0 - 3.25))
    assert float(out2["w"]) == pytest.approx(3.0 - float(algo.h["w"]) / alpha)
    algo.reset()
    assert algo.h == {} and algo.grads == {}


@pytest.mark.slow
def test_feddyn_in_process_equals_flower_and_differs_from_fedavg(tmp_path):
    pytest.importorskip("flwr")
    from tests.test_transports import SMALL, metrics, same_in_process_and_on_flower

    from falkit.loop import run

    extra = {"strategy": "entropy@G", "fl.algorithm": "feddyn", "feddyn.alpha": "0.1"}
    ref = same_in_process_and_on_flower(tmp_path, **extra)
    avg = run(config.load(None, overrides={**SMALL, **extra, "fl.algorithm": "fedavg",
                                           "out_dir": str(tmp_path / "avg")})).run_dir
    assert metrics(avg) != metrics(ref)
