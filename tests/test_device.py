"""Device-agnostic code, tested without a GPU: `tests/fake_device.py` runs a computation with
its inputs "on cuda" (CPU data that claim to live there) and checks every torch call against
CUDA's device rules. Every strategy must query with the model outputs and weights on another
device than the CPU and pick exactly what it picks on the CPU."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tests.fake_device import DeviceMixError, Elsewhere, FakeCuda, on_device
from tests.test_strategies import make_ctx, two_phase_query

from falkit.al import primitives
from falkit.al.base import QueryContext, create, list_ids
from falkit.fl.algorithms import Client
from falkit.fl.algorithms import create as create_algorithm

FAIRFAL_ABLATIONS = [{"selector": s} for s in ("complement", "global", "local")] + [
    {"classwise": False}, {"prototypes": "local"}, {"kappa": 0.0},
    {"uncertainty": "margin"}, {"uncertainty": "least_confidence"},
    {"embedding_probs": "code"}, {"similarity": "dot"}]


def moved(ctx: QueryContext, outputs: bool, weights: bool) -> QueryContext:
    """ctx with the model outputs (inference results, predicted losses) and/or the model
    weights "on cuda"."""
    infer, state_of, loss = ctx.infer, ctx.weights, ctx.predicted_loss

    def infer_there(model, idx):
        p, f = infer(model, idx)
        return (on_device(p), on_device(f)) if outputs else (p, f)

    def weights_there(model):
        s = state_of(model)
        return {k: on_device(v) for k, v in s.items()} if weights else s

    ctx.infer, ctx.weights = infer_there, weights_there
    if loss is not None:
        ctx.predicted_loss = (
            (lambda model, idx: on_device(loss(model, idx))) if outputs else loss)
    return ctx


def cases():
    for sid in list_ids():
        yield sid, {}
    for options in FAIRFAL_ABLATIONS:
        yield "fairfal", options


@pytest.mark.parametrize("sid,options", list(cases()),
                         ids=[f"{s}{'-' + str(o) if o else ''}" for s, o in cases()])
@pytest.mark.parametrize("outputs", [True, False], ids=["outputs-on-gpu", "outputs-on-cpu"])
def test_every_strategy_queries_with_its_models_on_another_device(sid, options, outputs):
    budget = 9
    ref = two_phase_query(create(sid, **options), make_ctx()[0], budget)
    mode = FakeCuda()
    with mode:
        picks = two_phase_query(create(sid, **options),
                                moved(make_ctx()[0], outputs=outputs, weights=True), budget)
    assert not isinstance(picks, torch.Tensor)
    assert np.array_equal(picks, ref)  # the same arithmetic, so the same picks
    if outputs and sid not in ("random",):
        assert mode.calls > 0  # the strategy did compute on the "device"


def test_the_fake_device_catches_what_cuda_refuses():
    """The checker itself: it must fail where CUDA fails (else the test above proves
    nothing)."""
    with FakeCuda():
        x = on_device(torch.arange(6.0).view(2, 3))
        assert x.device.type == "cuda"
        assert isinstance(torch.zeros(3, device=x.device), Elsewhere)
        with pytest.raises(DeviceMixError):
            x + torch.ones(3)  # noqa: B018
        with pytest.raises(DeviceMixError):
            x.numpy()
        with pytest.raises(DeviceMixError):
            np.asarray(x)
        with pytest.raises(DeviceMixError):
            torch.ones(5)[on_device(torch.tensor([1]))]  # noqa: B018
        with pytest.raises(DeviceMixError):
            torch.rand(3, generator=torch.Generator(), device=x.device)
        with pytest.raises(DeviceMixError):
            torch.cat([x, torch.ones(2, 3)])
        assert isinstance(x + torch.tensor(2.0), Elsewhere)  # a CPU scalar is fine
        assert isinstance(x[torch.tensor([1, 0])], Elsewhere)  # so are CPU indices
        assert not isinstance(x.cpu(), Elsewhere)
        assert x.cpu().numpy().sum() == 15


def test_primitives_on_another_device():
    g = torch.Generator().manual_seed(0)
    x, centers = torch.randn(40, 6, generator=g), torch.randn(5, 6, generator=g)
    probs = torch.softmax(torch.randn(40, 4, generator=g), 1)
    ref = (primitives.kcenter_greedy(x, 7, centers=centers), primitives.kcenter_greedy(x, 7),
           primitives.kmeanspp_seeding(x, 6, np.random.default_rng(1)),
           primitives.kmeanspp_seeding(primitives.RankOneRows(
               *primitives.grad_embedding_factors(x, probs)), 6, np.random.default_rng(1)),
           primitives.top_k(probs[:, 0], 5))
    with FakeCuda():
        xd, cd, pd = on_device(x), on_device(centers), on_device(probs)
        got = (primitives.kcenter_greedy(xd, 7, centers=cd), primitives.kcenter_greedy(xd, 7),
               primitives.kmeanspp_seeding(xd, 6, np.random.default_rng(1)),
               primitives.kmeanspp_seeding(primitives.RankOneRows(
                   *primitives.grad_embedding_factors(xd, pd)), 6, np.random.default_rng(1)),
               primitives.top_k(pd[:, 0], 5))
        emb = primitives.grad_embeddings(xd, pd, hot=torch.zeros(40, dtype=torch.int64))
        assert isinstance(emb, Elsewhere)
    for a, b in zip(ref, got, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "scaffold", "fednova"])
def test_fl_algorithms_keep_their_state_on_the_weights_device(name):
    """Every tensor an FL algorithm creates (control variates, averages, FedProx's copy of
    the global weights) lives where the weights live."""
    def run(there):
        put = on_device if there else (lambda t: t)
        g = torch.Generator().manual_seed(0)
        model = torch.nn.Linear(3, 2)
        model.weight = torch.nn.Parameter(put(torch.randn(2, 3, generator=g)))
        model.bias = torch.nn.Parameter(put(torch.randn(2, generator=g)))
        glob = {k: v.detach().clone() for k, v in model.state_dict().items()}
        algo = create_algorithm(name, mu=0.1, momentum=0.9)
        algo.begin_round(glob, ["weight", "bias"])
        done = []
        for k in range(2):
            c = Client(id=k, weight=1.0 + k, lr=0.1)
            model.load_state_dict(glob)
            algo.begin_client(model, glob, c)
            loss = model(put(torch.ones(4, 3))).sum()
            extra = algo.extra_loss(model, c)
            if extra is not None:
                loss = loss + extra
            model.zero_grad()
            loss.backward()
            algo.correct_grads(model, c)
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
            c.steps = 1
            c.state = {n: v.detach().clone() for n, v in model.state_dict().items()}
            algo.end_client(model, glob, c)
            done.append(c)
        return algo.aggregate(glob, done, num_clients=2)

    ref = run(False)
    with FakeCuda():
        got = run(True)
        assert all(isinstance(v, Elsewhere) for v in got.values())
        got = {k: v.cpu() for k, v in got.items()}
    for k in ref:
        assert torch.equal(ref[k], got[k])


def test_a_resumed_run_moves_its_checkpoint_to_the_engine_device(tmp_path):
    """runtime.device is not part of a run's identity: a run saved on one device resumes on
    another, its weights, last-round models and FL-algorithm state moved to the new one."""
    from tests.test_loop import small_cfg

    from falkit.al.base import create as create_strategy
    from falkit.driver import _resume
    from falkit.inprocess import InProcessFederation
    from falkit.loop import run
    from falkit.oracle import SimulatedOracle
    from falkit.rundir import RunDir
    from falkit.site import ClientSite

    cfg = small_cfg(tmp_path, strategy="entropy@L", **{"fl.algorithm": "scaffold",
                                                        "budget.cycles": "3"})
    res = run(cfg, stop_after=0)
    assert len(res.metrics) == 1
    fed = InProcessFederation.__new__(InProcessFederation)  # only what resuming touches
    fed.device, fed.algorithm = torch.device("cuda", 0), create_algorithm("scaffold")
    fed.oracle = SimulatedOracle(np.zeros(100_000, dtype=np.int64))
    with FakeCuda():
        fed.known = np.full(100_000, -1, dtype=np.int64)
        fed.engine = SimpleNamespace(device=fed.device, train_y=torch.zeros(
            100_000, dtype=torch.int64, device=fed.device))
        fed.sites = [ClientSite(cfg, k, np.arange(100_000), 10, fed.oracle, fed.known,
                                fed.engine) for k in range(cfg.partition.num_clients)]
        st, first = _resume(RunDir.of(cfg), 3, create_strategy("entropy@L"), fed)
    assert first == 1
    tensors = [*st.global_state.values(), *fed.algorithm.c.values()]
    tensors += [v for s in fed.last_round.values() for v in s.values()]
    tensors += [v for c_k in fed.algorithm.c_k.values() for v in c_k.values()]
    assert fed.last_round and fed.algorithm.c_k and len(tensors) > 30
    assert all(isinstance(t, Elsewhere) for t in tensors)


@pytest.mark.parametrize("spec", ["pixels", "pca:5"])
def test_encoders_run_on_their_device_and_return_cpu_numpy(spec):
    from falkit.models import encoders

    x = torch.randint(0, 256, (50, 1, 8, 8), generator=torch.Generator().manual_seed(0),
                      dtype=torch.uint8)
    ref_enc = encoders.create(spec, batch_size=16)
    ref_enc.fit(x)
    ref = ref_enc.encode(x)
    enc = encoders.create(spec, batch_size=16, device="cuda")
    assert enc.device == torch.device("cuda")
    enc.fit(x)
    mode = FakeCuda()
    with mode:
        z = enc.encode(x)
        batch = enc.encode_batch(x[:4])
    assert isinstance(batch, Elsewhere)  # computed on the device
    assert isinstance(z, np.ndarray) and z.dtype == np.float32
    assert np.array_equal(z, ref)


def test_flower_simulation_gives_each_client_a_gpu_share(monkeypatch):
    pytest.importorskip("flwr")
    from falkit.flower import simulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu_only = {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}}
    assert simulation.backend_config(2, 1) == cpu_only  # unchanged without a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for gpus, (cpus, per_client), share in [(1, (2, 1), 0.5), (1, (4, 1), 0.25),
                                             (1, (4, 4), 1.0), (2, (3, 1), 0.5),
                                             (4, (2, 1), 1.0)]:
        monkeypatch.setattr(torch.cuda, "device_count", lambda g=gpus: g)
        cfg = simulation.backend_config(cpus, per_client)
        assert cfg["client_resources"] == {"num_cpus": per_client, "num_gpus": share}
        assert cfg["init_args"] == {"num_cpus": cpus, "num_gpus": gpus}
    assert simulation.backend_config(2, 1, client_gpus=0.0)["client_resources"] == {
        "num_cpus": 1}  # asked for none


def test_flower_records_arrive_on_the_receiving_engine_device():
    pytest.importorskip("flwr")
    from falkit.flower.common import record_state, state_record

    state = {"w": torch.randn(3, 2), "n": torch.tensor(4)}
    with FakeCuda():
        rec = state_record({k: on_device(v) for k, v in state.items()})  # sent: to NumPy
        back = record_state(rec, torch.device("cuda", 0))
        assert all(isinstance(v, Elsewhere) for v in back.values())
    assert all(torch.equal(back[k].cpu(), state[k]) for k in state)
    assert not any(isinstance(v, Elsewhere) for v in record_state(rec).values())
