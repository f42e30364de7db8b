"""FedBN (Li et al., ICLR 2021; fl/algorithms/fedbn.py, one file): BatchNorm layers stay with
each client, by hand; each client trains, queries and is evaluated with its own; in process =
Flower, and no BatchNorm entry is ever in an uplink. (Batched = one client at a time is
tests/test_batched.py's, for every registered algorithm.)"""

import numpy as np
import pytest
import torch
from torch import nn

from falkit import config
from falkit.fl.algorithms import ALGORITHMS, Client, create
from falkit.fl.algorithms.fedbn import batchnorm_keys


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.bn = nn.BatchNorm1d(2)


def test_the_batchnorm_entries_are_the_local_ones():
    keys = batchnorm_keys(Tiny())
    assert keys == {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                    "bn.num_batches_tracked"}
    assert "fedbn" in ALGORITHMS and ALGORITHMS["fedbn"].batchable()
    assert create("fedavg").local_keys(Tiny()) == frozenset()


def test_aggregate_keeps_the_servers_batchnorm_and_averages_the_rest():
    algo = create("fedbn")
    algo.local_keys(Tiny())
    glob = {"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2),
            "bn.weight": torch.ones(2), "bn.bias": torch.zeros(2),
            "bn.running_mean": torch.zeros(2), "bn.running_var": torch.ones(2),
            "bn.num_batches_tracked": torch.tensor(0)}

    def state(v):
        return {**{k: torch.full_like(t, v) for k, t in glob.items()},
                "bn.num_batches_tracked": torch.tensor(int(v))}

    a, b = Client(id=0, weight=1.0, state=state(4.0)), Client(id=2, weight=3.0, state=state(8.0))
    for c in (a, b):
        algo.end_client(None, glob, c)  # each client keeps its own BatchNorm entries
    out = algo.aggregate(glob, [a, b], num_clients=3)
    assert torch.equal(out["fc.weight"], torch.full((2, 2), 7.0))  # (1·4 + 3·8) / 4
    for k in ("bn.weight", "bn.running_mean", "bn.num_batches_tracked"):
        assert torch.equal(out[k], glob[k]), k  # never averaged, never a client's
    assert torch.equal(algo.personal(out, 2)["bn.running_var"], torch.full((2,), 8.0))
    assert torch.equal(algo.personal(out, 2)["fc.weight"], out["fc.weight"])
    assert algo.personal(out, 1) is out  # a client that has not trained: the global model
    saved = algo.state_dict()
    again = create("fedbn")
    again.load_state_dict(saved)
    assert torch.equal(again.personal(out, 0)["bn.bias"], torch.full((2,), 4.0))
    algo.reset()
    assert algo.personal(out, 2) is out


def _engine(digits, algorithm):
    from falkit.fl.engine import Engine, ImageTensors

    cfg = config.load(None, overrides={"fl.algorithm": algorithm, "fl.local_epochs": "1",
                                       "model.backbone": "resnet8_preact16",
                                       "runtime.threads": "1"})
    ds = digits
    return Engine(cfg, ImageTensors(ds.x_train, torch.as_tensor(ds.y_train), ds.mean, ds.std),
                  ImageTensors(ds.x_test, torch.as_tensor(ds.y_test), ds.mean, ds.std), 10,
                  num_clients=3)


def test_rounds_start_each_client_from_its_own_batchnorm():
    from falkit.data import sources

    digits = sources.load("digits")
    pools = [np.arange(0, 120), np.arange(120, 200), np.arange(200, 330)]
    avg, bn = _engine(digits, "fedavg"), _engine(digits, "fedbn")
    g0 = avg.init_state(0, 0)
    a1, _ = avg.fl_round(g0, [0, 1, 2], pools, 0.05, 0, (0, 0))
    b1, kept = bn.fl_round(g0, [0, 1, 2], pools, 0.05, 0, (0, 0), keep_states=True)
    local = bn.algorithm.keys
    assert local and all(torch.equal(b1[k], g0[k]) for k in local)
    # round 1 starts every client from the same weights: the shared entries are FedAvg's
    assert all(torch.equal(a1[k], b1[k]) for k in a1 if k not in local)
    own = bn.algorithm.personal(b1, 1)
    assert all(torch.equal(own[k], kept[1][k]) for k in local)  # client 1's BatchNorm
    a2, _ = avg.fl_round(a1, [0, 1, 2], pools, 0.05, 0, (0, 1))
    b2, _ = bn.fl_round(b1, [0, 1, 2], pools, 0.05, 0, (0, 1))
    assert not all(torch.equal(a2[k], b2[k]) for k in a2 if k not in local)


@pytest.mark.slow
def test_fedbn_in_process_equals_flower_and_keeps_batchnorm_at_the_sites(tmp_path,
                                                                         monkeypatch):
    pytest.importorskip("flwr")
    from tests.test_transports import same_in_process_and_on_flower

    from falkit.flower import client_app
    from falkit.flower.common import record_layout

    sent: list[str] = []
    real = client_app.app

    def spy(msg, context):
        reply = real(msg, context)
        if "model" in reply.content.array_records:
            sent.extend(k for k, _, _ in record_layout(reply.content["model"]))
        return reply

    monkeypatch.setattr(client_app, "app", spy)
    extra = {"strategy": "entropy@G", "fl.algorithm": "fedbn", "model.backbone": "resnet8_preact16",
             "fl.fraction": "0.67", "runtime.eval_every": "1"}
    same_in_process_and_on_flower(tmp_path, **extra)
    from falkit.models.backbones import create as create_backbone

    local = batchnorm_keys(create_backbone("resnet8_preact16", 10, 1, 8))
    assert local and sent and not local & set(sent)  # weights went up, BatchNorm never
