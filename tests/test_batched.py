"""Issue 14: clients trained as one batched computation (runtime.batch_clients) equal the
one-client-at-a-time engine. In float64, so that equal means equal: in float32 the batched
(grouped) convolutions round differently and a ReLU or max-pool that flips amplifies it."""

import numpy as np
import pytest
import torch
from tests.test_engine import make_engine

from falkit.fl.algorithms import ALGORITHMS, FedAvg
from falkit.fl.engine import _equal_pools


def double_engine(batch: str, crop_pad: int = 0, **over):
    eng, _ = make_engine(crop_pad, **{"runtime.batch_clients": batch,
                                      "runtime.channels_last": "false", **over})
    eng._scale, eng._shift = eng._scale.double(), eng._shift.double()
    make = eng.new_model
    eng.new_model = lambda init_seed: make(init_seed).double()
    eng.model = eng.model.double()
    return eng


def assert_states_equal(a, b, tol=1e-9):
    assert list(a) == list(b)
    for n in a:
        assert a[n].dtype == b[n].dtype, n
        assert torch.allclose(a[n].double(), b[n].double(), atol=tol, rtol=0), n


def rounds(eng, pools, clients, n_rounds=2):
    state = eng.init_state(0)
    kept = {}
    for r in range(n_rounds):
        state, kept = eng.fl_round(state, clients, pools, 0.05, seed=1, key=(0, r),
                                   keep_states=True)
    return state, kept


EVEN = [np.arange(0, 10), np.arange(10, 20), np.arange(20, 30), np.arange(30, 40)]
# two pools of 12, one of 9 (a trailing 1-sample batch is dropped), one of 7
UNEVEN = [np.arange(0, 12), np.arange(12, 24), np.arange(24, 33), np.arange(33, 40)]


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))  # every registered one
@pytest.mark.parametrize("pools, clients", [
    (EVEN, [0, 1, 2, 3]),  # FairFAL: every client as many labels
    (UNEVEN, [0, 1, 2, 3]),  # grouped by pool size
    (EVEN, [0, 2, 3]),  # partial participation
    (UNEVEN, [1, 0, 3]),  # both, clients not in id order
])
def test_batched_round_equals_one_client_at_a_time(algorithm, pools, clients):
    over = {"fl.algorithm": algorithm, "fl.mu": "0.5", "fl.batch_size": "4"}
    one = double_engine("off", **over)
    many = double_engine("on", **over)
    assert not one.batches_clients()
    assert many.batches_clients() == ALGORITHMS[algorithm].batchable()
    calls = []
    group = many.sgd_group
    many.sgd_group = lambda *a, **k: calls.append(len(a[0])) or group(*a, **k)
    s1, k1 = rounds(one, pools, clients)
    s2, k2 = rounds(many, pools, clients)
    if many.batches_clients():
        assert calls and max(calls) >= 2  # some clients really trained as a group
    assert_states_equal(s1, s2)
    assert sorted(k1) == sorted(k2) == sorted(clients)
    for k in clients:  # each client's last-round weights (the last_round local model)
        assert_states_equal(k1[k], k2[k])
    if algorithm == "scaffold":  # the control variates the next round starts from
        assert_states_equal(one.algorithm.c, many.algorithm.c)
        for k in clients:
            assert_states_equal(one.algorithm.c_k[k], many.algorithm.c_k[k])


@pytest.mark.parametrize("over", [
    {},  # per-epoch decay, running training accuracy
    {"local_model.lr_step": "batch", "local_model.stop_check": "eval"},  # the reference's
])
def test_batched_scratch_models_equal_one_at_a_time_with_early_stops(over):
    over = {"local_model.epochs": "12", "local_model.decay_epoch": "4",
            "local_model.stop_accuracy": "0.9", "local_model.lr": "0.05", **over}
    jobs = [(p, (1, k)) for k, p in enumerate(UNEVEN + [np.arange(28, 40)])]
    one = double_engine("off", **over)
    many = double_engine("on", **over)
    stops = []
    group = many.sgd_group

    def spy(*a, **k):
        out = group(*a, **k)
        stops.extend(out[1])
        return out

    many.sgd_group = spy
    a = one.train_scratch(jobs, one.train_y, seed=3)
    b = many.train_scratch(jobs, many.train_y, seed=3)
    for x, y in zip(a, b, strict=True):
        assert_states_equal(x, y)
    # the three 12-sample models trained together and left the group at different epochs
    assert len(set(stops[:3])) > 1, stops


def test_equal_pools_groups_by_size_in_first_seen_order():
    pools = [np.arange(3), np.arange(5), np.arange(3), np.arange(0), np.arange(5)]
    assert _equal_pools([4, 0, 1, 2], pools) == [[4, 1], [0, 2]]


def test_auto_batches_on_a_gpu_only_and_never_a_custom_loss():
    eng, _ = make_engine()
    assert eng.cfg.runtime.batch_clients == "auto" and not eng.batches_clients()
    eng.cfg.runtime.batch_clients = "on"
    assert eng.batches_clients() and not eng.batches_clients(custom_loss=True)
    eng.cfg.runtime.precision = "bf16"  # CPU autocast leaves vmapped convolutions in fp32
    assert not eng.batches_clients()
    eng.cfg.runtime.precision = "fp32"
    eng.model.extra_loss = lambda *a: 0.0  # ll4al's loss-prediction module
    assert not eng.batches_clients()


def test_batched_round_with_crops_and_channels_last():
    """Each client's crop offsets and flips come from its own stream, gathered for the whole
    group in one go; channels-last batches split into clients."""
    over = {"fl.batch_size": "4", "runtime.channels_last": "true"}
    one, many = double_engine("off", 2, **over), double_engine("on", 2, **over)
    s1, k1 = rounds(one, EVEN, [0, 1, 2, 3], n_rounds=1)
    s2, k2 = rounds(many, EVEN, [0, 1, 2, 3], n_rounds=1)
    assert_states_equal(s1, s2)
    for k in range(4):
        assert_states_equal(k1[k], k2[k])


def test_batched_weights_give_identical_picks():
    """The weights a batched round produces query exactly as one client at a time's do."""
    from falkit.al.primitives import entropy, top_k

    one, many = double_engine("off"), double_engine("on")
    s1, k1 = rounds(one, UNEVEN, [0, 1, 2, 3])
    s2, k2 = rounds(many, UNEVEN, [0, 1, 2, 3])
    pool = np.arange(40)
    for a, b in [(s1, s2), *((k1[k], k2[k]) for k in range(4))]:
        pa, _ = one.predict(a, pool)
        pb, _ = many.predict(b, pool)
        assert top_k(entropy(pa), 10).tolist() == top_k(entropy(pb), 10).tolist()


def test_an_algorithm_with_a_per_client_hook_and_no_batched_form_never_batches():
    """Forgetting `extra_loss_batched` must not drop the algorithm's term in batched
    training (issue 26): such an algorithm trains one client at a time, and equals it."""

    class Pull(FedAvg):
        name = "pull-test"

        def extra_loss(self, model, client):
            return 0.5 * sum((p ** 2).sum() for p in model.parameters())

    assert not Pull.batchable() and FedAvg.batchable()
    assert all(cls.batchable() for cls in ALGORITHMS.values())  # falkit's own all batch
    one = double_engine("off", **{"fl.batch_size": "4"})
    many = double_engine("on", **{"fl.batch_size": "4"})
    one.algorithm, many.algorithm = Pull(), Pull()
    assert not many.batches_clients()
    s1, _ = rounds(one, EVEN, [0, 1, 2, 3])
    s2, _ = rounds(many, EVEN, [0, 1, 2, 3])
    assert_states_equal(s1, s2)
    plain = double_engine("off", **{"fl.batch_size": "4"})
    s3, _ = rounds(plain, EVEN, [0, 1, 2, 3])
    assert not torch.allclose(s1["classifier.weight"], s3["classifier.weight"])
