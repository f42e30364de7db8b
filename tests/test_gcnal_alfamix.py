"""CoreGCN (gcnal) and ALFA-Mix (alfamix): the shared strategy contract plus known answers for
their pure parts (the GCN adjacency, the ALFA-Mix candidate test)."""

import math

import numpy as np
import pytest
import torch

from falkit.al.base import QueryContext, create
from falkit.errors import ConfigError

C, D = 5, 8


# fixtures giving the tests the modules under test
@pytest.fixture(autouse=True)
def gcnal():
    import falkit.al.gcnal

    return falkit.al.gcnal


@pytest.fixture(autouse=True)
def alfamix():
    import falkit.al.alfamix

    return falkit.al.alfamix


# the shared contract (tests/test_strategies.py) runs over gcnal and alfamix as over every
# registered strategy; its contexts carry head weights for alfamix
from tests.test_strategies import make_ctx  # noqa: E402


@pytest.mark.parametrize("sid", ["gcnal@G", "alfamix@G"])
def test_global_torch_rng_untouched(sid):
    # training runs in threads: randomness must come from ctx.rng, not torch's global state
    torch.manual_seed(123)
    before = torch.get_rng_state()
    create(sid).query(make_ctx()[0], 10)
    assert torch.equal(before, torch.get_rng_state())


# --------------------------------------------------------------------------------- gcnal


def test_gcn_adjacency_by_hand(gcnal):
    r = 1 / math.sqrt(2)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [r, r]])
    # XXᵀ − I = [[0,0,r],[0,0,r],[r,r,0]]; column sums r, r, 2r; divide, then + I
    expected = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [1.0, 1.0, 1.0]],
                            dtype=torch.float64)
    assert torch.allclose(gcnal.gcn_adjacency(x), expected, atol=1e-12)


def test_implicit_adjacency_matches_dense(gcnal):
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.rand(30, 6, generator=g), dim=1)
    m = torch.randn(30, 4, generator=g, dtype=torch.float64)
    assert torch.allclose(gcnal._Adjacency(x) @ m, gcnal.gcn_adjacency(x) @ m, atol=1e-9)


def test_gcn_training_is_seeded_and_reduces_the_loss(gcnal):
    # two well-separated clusters: unlabeled nodes in one, labeled in the other
    g = torch.Generator().manual_seed(1)
    a = torch.tensor([1.0, 0.0, 0.0]) + 0.05 * torch.randn(20, 3, generator=g)
    b = torch.tensor([0.0, 1.0, 0.0]) + 0.05 * torch.randn(10, 3, generator=g)
    x = torch.nn.functional.normalize(torch.cat([a, b]), dim=1)
    h1, loss = gcnal.train_gcn_hidden(x, 20, torch.Generator().manual_seed(5))
    h2, _ = gcnal.train_gcn_hidden(x, 20, torch.Generator().manual_seed(5))
    assert torch.equal(h1, h2) and h1.shape == (30, gcnal.HIDDEN) and math.isfinite(loss)
    _, loss0 = gcnal.train_gcn_hidden(x, 20, torch.Generator().manual_seed(5), steps=1)
    assert loss < loss0  # Adam steps reduce the labeled-vs-unlabeled loss


@pytest.mark.parametrize("budget", [7, 30])
def test_gcnal_subsample_cap(monkeypatch, budget, gcnal):
    seen = []
    real = gcnal.kcenter_greedy

    def spy(x, k, centers=None, first=None):
        seen.append((len(x), len(centers)))
        return real(x, k, centers=centers, first=first)

    monkeypatch.setattr(gcnal, "kcenter_greedy", spy)
    ctx, _ = make_ctx()
    s = create("gcnal@G", subsample=20, steps=5)  # the [gcnal] section's options
    picks = s.query(ctx, budget)
    assert len(picks) == budget and len(np.unique(picks)) == budget
    size = max(20, budget)  # the graph holds the cap, raised to the budget when it is larger
    assert seen == [(size, len(ctx.labeled))]
    assert s.diagnostics()["subsample"] == size


# ------------------------------------------------------------------------------- alfamix

W2 = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])  # logits (−x, x): class 1 iff x > 0
B2 = torch.zeros(2)
ANCHORS = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])


def _pred(z):
    return (z @ W2.T + B2).argmax(1)


def test_alfamix_candidates_known_answer(alfamix):
    z = torch.tensor([[0.05, 0.0], [-0.05, 0.1], [3.0, 0.0], [-3.0, 0.5], [0.04, 0.3]])
    for cap in alfamix.ALPHA_CAPS:
        mask = alfamix.alfamix_candidates(z, _pred(z), ANCHORS, W2, B2, cap / math.sqrt(2))
        assert mask.tolist() == [True, True, False, False, True], cap


def test_alfamix_closed_form_threshold(alfamix):
    # z = (0.05, 0), ŷ = 1; g ∥ −x, so for both anchors α_x = ±ε‖μ − z‖/|μ_x − z_x| and the
    # mix lands at x = 0.05 − ε‖μ − z‖: it flips iff ε > 0.05 / 1.05 (anchor 0, the nearer flip)
    z = torch.tensor([[0.05, 0.0]])
    flips = [bool(alfamix.alfamix_candidates(z, _pred(z), ANCHORS, W2, B2, eps)[0])
             for eps in (0.0, 0.04, 0.047, 0.048, 0.06)]
    assert flips == [False, False, False, True, True]


def test_class_anchors_fall_back_to_the_labeled_mean(alfamix):
    z_l = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 6.0]])
    anchors = alfamix.class_anchors(z_l, np.array([0, 0, 2]), 3)
    assert torch.allclose(anchors, torch.tensor([[1.0, 0.0], [2.0, 2.0], [4.0, 6.0]]))


def test_ce_feature_grad_matches_autograd(alfamix):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, D, generator=g, requires_grad=True)
    w, b = torch.randn(C, D, generator=g), torch.randn(C, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    torch.nn.functional.cross_entropy(z @ w.T + b, y, reduction="sum").backward()
    assert torch.allclose(alfamix.ce_feature_grad(z.detach(), y, w, b), z.grad, atol=1e-6)


BOUNDARY = [[0.05, 0.0], [0.04, 0.3], [-0.05, -0.2], [-0.03, 0.5]]  # distinct directions
FAR = [[3.0, 0.1], [3.5, -0.2], [4.0, 0.3], [3.2, 0.0],
       [-3.0, 0.2], [-3.5, -0.1], [-4.0, 0.0], [-3.3, 0.4]]


def hand_ctx(seed=0):
    """Unlabeled positions 0..3 sit on the class boundary, 4..11 deep inside a class."""
    table = torch.zeros(200, 2)
    table[:12] = torch.tensor(BOUNDARY + FAR)
    table[100:104] = torch.tensor([[-1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    probs = torch.softmax(table @ W2.T + B2, 1)

    def infer(model, idx):
        return probs[torch.as_tensor(idx)], table[torch.as_tensor(idx)]

    head = {"classifier.weight": W2, "classifier.bias": B2}
    return QueryContext(client_id=0, cycle=1, labeled=np.arange(100, 104),
                        labeled_y=np.array([0, 0, 1, 1]), unlabeled=np.arange(12),
                        num_classes=2, rng=np.random.default_rng(seed), infer=infer,
                        weights=lambda model: head)


def test_alfamix_selects_candidates_before_random_fill():
    s = create("alfamix@G")
    assert sorted(s.select(hand_ctx(), 4).tolist()) == [0, 1, 2, 3]  # b = #candidates
    assert s.diagnostics()["random_fill"] == 0
    for seed in range(3):
        picks = s.select(hand_ctx(seed), 7)  # b > #candidates: all of them, then 3 random
        assert set(range(4)) <= set(picks.tolist()) and len(set(picks.tolist())) == 7
        assert s.diagnostics() == {"candidates": 4, "alpha_cap": 1.0, "random_fill": 3}
    picks = s.select(hand_ctx(), 2)  # b < #candidates: stop at the first cap, k-means picks
    assert set(picks.tolist()) <= {0, 1, 2, 3} and len(set(picks.tolist())) == 2
    assert s.diagnostics()["alpha_cap"] == 0.2


def test_strategy_sections_reach_the_strategies():
    """ll4al's, logo's and gcnal's options are config keys (issue 15), validated, and each
    reaches its strategy's constructor."""
    from falkit import config as config_mod

    cfg = config_mod.load(overrides={"strategy": "gcnal@G", "gcnal.steps": "7",
                                     "gcnal.eta": "0.5", "gcnal.subsample": "99"})
    s = create(cfg.strategy, **config_mod.strategy_options(cfg))
    assert (s.steps, s.eta, s.subsample) == (7, 0.5, 99)
    cfg = config_mod.load(overrides={"strategy": "ll4al", "ll4al.hidden": "16",
                                     "ll4al.margin": "0.5", "ll4al.weight": "2"})
    s = create(cfg.strategy, **config_mod.strategy_options(cfg))
    assert (s.hidden, s.margin, s.weight) == (16, 0.5, 2.0)
    cfg = config_mod.load(overrides={"strategy": "logo", "logo.n_init": "3"})
    assert create(cfg.strategy, **config_mod.strategy_options(cfg)).n_init == 3
    for bad in ("gcnal.steps=0", "ll4al.detach_from=1.5", "logo.n_init=0", "gcnal.eta=nan"):
        k, v = bad.split("=")
        with pytest.raises(ConfigError, match=k.replace(".", r"\.")):
            config_mod.load(overrides={k: v})


def test_alfamix_head_query_or_global_as_the_baseline_code():
    """alfamix.head = global (reference): @L mixes through the global model's head (the
    LoGo / IFAL code), query (default) through the local one: the picks are k-means over
    the candidates that head finds in the local model's features (known answer rebuilt
    from the primitives, with the same k-means seed)."""
    import falkit.al.alfamix as am
    from falkit import config as config_mod
    from falkit.al.primitives import nearest_to_centres

    b = 20
    want = {}
    for m in ("local", "global"):
        ctx, _ = make_ctx(seed=4)
        z_u = ctx.features("local", "unlabeled")
        pred = ctx.probs("local", "unlabeled").argmax(1)
        anchors = am.class_anchors(ctx.features("local", "labeled"), ctx.labeled_y,
                                   ctx.num_classes)
        cand = np.flatnonzero(am.alfamix_candidates(z_u, pred, anchors, *ctx.head(m),
                                                    0.2 / math.sqrt(z_u.shape[1])).numpy())
        assert len(cand) > b  # the first cap already finds enough
        seed = int(np.random.default_rng(4).integers(2**31 - 1))  # ctx.rng's first draw
        feats = torch.nn.functional.normalize(z_u[torch.as_tensor(cand)], dim=1)
        want[m] = sorted(cand[nearest_to_centres(feats.double().numpy(), b, seed,
                                                 n_init=10)].tolist())
    assert want["local"] != want["global"]  # the two heads choose differently here
    for head, m in (("query", "local"), ("global", "global")):
        ctx, _ = make_ctx(seed=4)
        assert sorted(create("alfamix@L", head=head).select(ctx, b).tolist()) == want[m]
    cfg = config_mod.load(overrides={"strategy": "alfamix@L"}, preset="reference")
    s = create(cfg.strategy, **config_mod.strategy_options(cfg))
    assert (s.head, s.n_init) == ("global", 10)
    assert create("alfamix@G").head == "query"
    with pytest.raises(ConfigError, match="alfamix.head"):
        config_mod.load(overrides={"alfamix.head": "local"})
