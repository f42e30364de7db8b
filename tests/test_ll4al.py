"""ll4al (Learning Loss for Active Learning, Yoo & Kweon 2019; ALGORITHMS.md §4): the margin
ranking loss, the stop-gradient schedule, federation of the loss module, the query, and that
runs of every other strategy keep their models untouched."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from falkit import cli, config
from falkit.al.base import STRATEGIES, QueryContext, create, list_ids
from falkit.client import loss_predictor
from falkit.errors import ConfigError
from falkit.fl.algorithms import state_bytes
from falkit.fl.engine import Engine, ImageTensors
from falkit.loop import run
from falkit.models.backbones import BACKBONES, Backbone
from falkit.models.backbones import create as create_backbone
from falkit.models.lossnet import LossNet, WithLossModule, loss_pred_loss


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- the margin ranking loss ------------------------------------------------------------------


def test_loss_pred_loss_known_value():
    # pairs (0, 3) and (1, 2): the batch against its flip (reference LossPredLoss)
    pred = torch.tensor([3.5, 1.0, 0.5, 2.0], requires_grad=True)
    true = torch.tensor([2.0, 0.1, 0.3, 1.0])
    # (0,3): l0 > l3 -> +1, max(0, 1 - 1.5) = 0;  (1,2): l1 < l2 -> -1, max(0, 1 + 0.5) = 1.5
    loss = loss_pred_loss(pred, true, margin=1.0)
    assert loss.item() == pytest.approx(0.75)  # mean over the B/2 = 2 pairs
    # the same as torch's margin ranking loss on those pairs
    ref = F.margin_ranking_loss(pred[:2], pred.flip(0)[:2], torch.tensor([1.0, -1.0]), margin=1.0)
    assert loss.item() == pytest.approx(ref.item())
    loss.backward()
    # only the violating pair (1, 2) pushes: d/dpred1 = +1/2, d/dpred2 = -1/2
    assert pred.grad.tolist() == pytest.approx([0.0, 0.5, -0.5, 0.0])


def test_loss_pred_loss_ties_odd_batches_and_detached_targets():
    # equal true losses count as -1 (reference: 2·sign(clamp(0, min=0)) − 1 = −1)
    assert loss_pred_loss(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])).item() == 1.0
    # odd B: pairs (0,4), (1,3); the middle sample pairs with itself and is left out
    pred = torch.tensor([0.0, 5.0, 100.0, 4.0, 2.0])
    true = torch.tensor([1.0, 2.0, -7.0, 0.0, 0.5])
    # (0,4): +1, max(0, 1 - (0 - 2)) = 3;  (1,3): +1, max(0, 1 - 1) = 0  -> mean 1.5
    assert loss_pred_loss(pred, true).item() == pytest.approx(1.5)
    true_req = true.clone().requires_grad_(True)
    loss_pred_loss(pred.clone().requires_grad_(True), true_req).backward()
    assert true_req.grad is None  # the true losses are targets, not trained through


# --- the module on every backbone -------------------------------------------------------------


def _input(name: str, n: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if name == "linear":
        return torch.randn(n, 16, 1, 1, generator=gen)
    return torch.randn(n, 1, 28, 28, generator=gen)


# falkit's own backbones (a plug-in's may expose no block outputs: Backbone.block_taps says so)
@pytest.mark.parametrize("name", [n for n, (c, _) in BACKBONES.items()
                                  if c.__module__ == "falkit.models.backbones"])
def test_every_backbone_takes_the_module_and_keeps_its_keys(name):
    torch.manual_seed(0)
    backbone = create_backbone(name, 10, 16 if name == "linear" else 1, 28)
    plain_keys = list(backbone.state_dict())
    taps = backbone.block_taps()
    assert taps and all(c > 0 for _, c in taps)
    x = _input(name)
    backbone.eval()
    with torch.no_grad():
        ref_logits, ref_feats = backbone(x)
    model = WithLossModule(backbone)
    keys = list(model.state_dict())
    assert keys[:len(plain_keys)] == plain_keys  # the backbone's keys, unchanged, first
    assert all(k.startswith("loss_net.") for k in keys[len(plain_keys):])
    assert len(model.loss_net.fcs) == len(taps)
    assert model.classifier is backbone.classifier and model.feature_dim == backbone.feature_dim
    model.eval()
    with torch.no_grad():  # classification is the backbone's own forward
        logits, feats = model(x)
        assert torch.equal(logits, ref_logits) and torch.equal(feats, ref_feats)
        assert model.predicted_loss(x).shape == (4,)
    model.train()
    logits, _ = model(x)
    y = torch.arange(4) % 10
    (F.cross_entropy(logits, y) + model.extra_loss(logits, y, (0, 4))).backward()
    assert all(p.grad is not None for p in model.loss_net.parameters())


def test_a_backbone_without_blocks_is_a_config_error():
    class NoBlocks(Backbone):
        pass

    with pytest.raises(ConfigError, match="exposes no block outputs"):
        WithLossModule(NoBlocks())


def test_lossnet_layout():
    net = LossNet([64, 64, 64, 64])  # cnn4: four blocks of 64 channels
    assert [(fc.in_features, fc.out_features) for fc in net.fcs] == [(64, 128)] * 4
    assert (net.linear.in_features, net.linear.out_features) == (512, 1)


# --- the stop-gradient ------------------------------------------------------------------------


def _module_grads(progress):
    torch.manual_seed(0)
    model = WithLossModule(create_backbone("cnn4", 4, 1, 16))
    model.train()
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 4
    logits, _ = model(x)
    model.extra_loss(logits, y, progress).backward()  # the module's term alone
    backbone = [p.grad for n, p in model.named_parameters()
                if n.startswith("features.") and n.endswith("weight")]
    module = [p.grad for p in model.loss_net.parameters()]
    return backbone, module


def _norm(grads):
    return sum(0.0 if g is None else float(g.abs().sum()) for g in grads)


def test_module_gradient_reaches_the_backbone_before_three_quarters_of_the_rounds():
    for progress in [(0, 4), (2, 4), (74, 100), (1, 3), None]:
        backbone, module = _module_grads(progress)
        assert _norm(backbone) > 0, progress
        assert _norm(module) > 0


def test_module_gradient_is_stopped_in_the_last_quarter_of_the_rounds():
    for progress in [(3, 4), (75, 100), (99, 100), (2, 3)]:
        backbone, module = _module_grads(progress)
        assert _norm(backbone) == 0, progress  # nothing flows into the backbone ...
        assert _norm(module) > 0  # ... while the module keeps learning
    # 0-based round r of R is detached iff r + 1 > int(0.75 R): the last of 4 rounds
    model = WithLossModule(create_backbone("cnn4", 4, 1, 16))
    assert [model.stops_gradient((r, 4)) for r in range(4)] == [False, False, False, True]


# --- the engine: hook, federation, query inference --------------------------------------------


def _data(n=48, size=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % 4
    return ImageTensors(x, y, (0.5,), (0.25,)), ImageTensors(x[:8], y[:8], (0.5,), (0.25,))


def _engine(wrap=True, **over):
    cfg = config.load(None, overrides={"model.backbone": "cnn4", "fl.batch_size": "8",
                                       "fl.local_epochs": "1", **over})
    train, test = _data()
    kw = {"wrap_model": create("ll4al").wrap_model} if wrap else {}
    return Engine(cfg, train, test, 4, num_clients=2, **kw)


def test_fl_round_hands_the_round_to_the_model_hook(monkeypatch):
    seen = []
    original = WithLossModule.extra_loss

    def spy(self, logits, targets, progress=None):
        seen.append(progress)
        return original(self, logits, targets, progress)

    monkeypatch.setattr(WithLossModule, "extra_loss", spy)
    eng = _engine()
    g0 = eng.init_state(0, 0)
    eng.fl_round(g0, [0, 1], [np.arange(0, 16), np.arange(16, 40)], 0.05, 0, (0, 3),
                 progress=(3, 4))
    assert len(seen) == 2 + 3 and set(seen) == {(3, 4)}  # every step of both clients


def test_fedavg_aggregates_the_loss_module():
    eng = _engine()
    g0 = eng.init_state(0, 0)
    module_keys = [k for k in g0 if k.startswith("loss_net.")]
    assert module_keys  # part of the global state, hence communicated
    pools = [np.arange(0, 16), np.arange(16, 40)]
    new, kept = eng.fl_round(g0, [0, 1], pools, 0.05, 0, (0, 0), keep_states=True,
                             progress=(0, 4))
    for k in module_keys:
        expected = (16 * kept[0][k] + 24 * kept[1][k]) / 40  # labeled-count weights
        assert torch.allclose(new[k], expected, atol=1e-6), k
        assert not torch.equal(new[k], g0[k])  # trained locally
    assert state_bytes(new) > state_bytes({k: v for k, v in new.items()
                                           if not k.startswith("loss_net.")})


def test_backbone_init_does_not_depend_on_the_module():
    wrapped, plain = _engine().init_state(0, 5), _engine(wrap=False).init_state(0, 5)
    assert list(plain) == [k for k in wrapped if not k.startswith("loss_net.")]
    assert all(torch.equal(plain[k], wrapped[k]) for k in plain)


def test_query_is_top_b_predicted_loss_batched(monkeypatch):
    # the module's "prediction": the mean normalised pixel of each image, known per sample
    monkeypatch.setattr(WithLossModule, "predicted_loss",
                        lambda self, x: x.float().flatten(1).mean(1))
    eng = _engine(**{"runtime.eval_batch": "5"})  # several batches
    state = eng.init_state(0, 0)
    unlabeled = np.arange(3, 48, 2)
    x = eng.train_x[torch.as_tensor(unlabeled)].float() / 255
    expected = ((x - 0.5) / 0.25).flatten(1).mean(1)
    got = eng.predict_loss(state, unlabeled)
    assert torch.allclose(got, expected, atol=1e-5)
    ctx = QueryContext(client_id=0, cycle=1, labeled=np.array([0, 2]), labeled_y=np.zeros(2),
                       unlabeled=unlabeled, num_classes=4, rng=np.random.default_rng(0),
                       infer=None, weights={"global": state}.__getitem__)
    ctx.predicted_loss = loss_predictor(eng, ctx.weights)
    picks = create("ll4al").query(ctx, 4)
    order = np.lexsort((np.arange(len(unlabeled)), -expected.double().numpy()))
    assert picks.tolist() == unlabeled[order[:4]].tolist()


def test_query_ties_go_to_the_smaller_index():
    unlabeled = np.array([10, 20, 30, 40, 50])
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2])
    ctx = QueryContext(client_id=0, cycle=1, labeled=np.array([1]), labeled_y=np.zeros(1),
                       unlabeled=unlabeled, num_classes=4, rng=np.random.default_rng(0),
                       infer=None)
    calls = []
    ctx.predicted_loss = lambda model, idx: calls.append(model) or scores
    assert create("ll4al").query(ctx, 1).tolist() == [20]
    assert create("ll4al").query(ctx, 3).tolist() == [20, 40, 30]
    assert calls == ["global", "global"]  # the global model's module


def test_query_without_predictions_says_so():
    ctx = QueryContext(client_id=0, cycle=1, labeled=np.array([1]), labeled_y=np.zeros(1),
                       unlabeled=np.arange(5), num_classes=4, rng=np.random.default_rng(0),
                       infer=None)
    with pytest.raises(RuntimeError, match="predicted_loss"):
        create("ll4al").query(ctx, 2)


# --- other runs are untouched; registration -------------------------------------------------


CNN4_KEYS = [k for i in (0, 4, 8, 12) for k in (
    f"features.{i}.weight", f"features.{i}.bias", f"features.{i + 1}.weight",
    f"features.{i + 1}.bias", f"features.{i + 1}.running_mean", f"features.{i + 1}.running_var",
    f"features.{i + 1}.num_batches_tracked")] + ["classifier.weight", "classifier.bias"]


def test_other_strategies_keep_the_plain_backbone():
    from falkit.models.backbones import create as create_backbone

    for name, cls in STRATEGIES.items():
        if name != "ll4al":
            backbone = create_backbone("cnn4", num_classes=10, in_channels=1, image_size=28)
            strategy = cls("G") if cls.uses_selector else cls()
            assert strategy.wrap_model(backbone) is backbone, name
            assert "predicted_loss" not in cls.outputs, name
    eng = _engine(wrap=False)
    assert list(eng.init_state(0, 0)) == CNN4_KEYS
    assert not hasattr(eng.model, "extra_loss") and not hasattr(eng.model, "predicted_loss")
    assert list(_engine().init_state(0, 0))[:len(CNN4_KEYS)] == CNN4_KEYS


def test_registered_and_listed(capsys):
    assert "ll4al" in list_ids()
    assert cli.main(["list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("ll4al"))
    assert "Learning Loss" in line


# --- through the loop -------------------------------------------------------------------------


def test_loop_trains_federates_and_queries_with_the_module(tmp_path, monkeypatch):
    decisions = []
    original = WithLossModule.stops_gradient

    def spy(self, progress):
        decisions.append((progress, original(self, progress)))
        return decisions[-1][1]

    monkeypatch.setattr(WithLossModule, "stops_gradient", spy)
    cfg = config.load(None, overrides={
        "data.dataset": "digits", "data.rho": "5", "partition.num_clients": "2",
        "partition.alpha": "1.0", "budget.cycles": "2", "fl.rounds": "4",
        "fl.local_epochs": "1", "fl.lr": "0.05", "model.backbone": "resnet8_preact16",
        "strategy": "ll4al", "out_dir": str(tmp_path)})
    res = run(cfg)
    assert [r["cycle"] for r in res.metrics] == [0, 1]
    by_round = {p: stop for p, stop in decisions}
    assert by_round == {(0, 4): False, (1, 4): False, (2, 4): False, (3, 4): True}
    ck = torch.load(res.run_dir / "checkpoint" / "latest.pt", weights_only=False)
    state = ck["global_state"]
    assert any(k.startswith("loss_net.") for k in state)
    # communication counts the module: 2 x state bytes x 2 clients x 4 rounds
    assert res.metrics[1]["comm_bytes"] == 2 * state_bytes(state) * 2 * 4
    recs = [json.loads(x) for x in (res.run_dir / "queries.jsonl").read_text().splitlines()]
    queried = [r for r in recs if r["cycle"] == 1]
    assert len(queried) == 2 and all(r["strategy"] == "ll4al" for r in queried)
    assert all("predicted_loss_mean_selected" in r for r in queried)
