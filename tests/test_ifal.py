"""IFAL (ALGORITHMS.md §4 ifal): hand-made inputs with known answers for rkNN, both W1
variants, Otsu, the selection fallbacks, and the distilled local model's early stopping."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance
from tests.test_strategies import make_ctx

from falkit import config
from falkit.al.base import QueryContext, create
from falkit.al.ifal import (
    IFAL,
    otsu_threshold,
    rknn_distribution,
    rknn_neighbours,
    wasserstein1,
)
from falkit.al.primitives import nearest_to_centres
from falkit.errors import ConfigError
from falkit.fl.engine import Engine, ImageTensors, distillation_loss


def unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# Unlabeled points at 0°, 10°, 90°, 100°; labeled points at 3° and 93° (cosine similarity
# falls with the angle between two unit vectors, so "most similar" = smallest angle).
F_U = torch.tensor([unit(0), unit(10), unit(90), unit(100)])
F_L = torch.tensor([unit(3), unit(93)]) * 7.0  # the scale is removed by the normalisation
ROW_LABELS = torch.tensor([0, 1, 0, 1, 1, 0])  # rows [l0, l1, u0, u1, u2, u3]


# -- rkNN ----------------------------------------------------------------------------------

def test_rknn_neighbours_and_counts_top1():
    nb = rknn_neighbours(F_L, F_U, k=1)
    # l0 (3°) -> u0 (3° away); l1 (93°) -> u2; u0 -> u1 (its own 0° is removed); u1 -> u0;
    # u2 -> u3; u3 -> u2
    assert nb.squeeze(1).tolist() == [0, 2, 1, 0, 3, 2]
    p = rknn_distribution(nb, ROW_LABELS, 4, 2)
    # 1 + listings per class: u0 <- l0 (0), u1 (1); u1 <- u0 (0); u2 <- l1 (1), u3 (0);
    # u3 <- u2 (1)
    counts = np.array([[2, 2], [2, 1], [2, 2], [1, 2]], dtype=float)
    np.testing.assert_allclose(p.numpy(), counts / counts.sum(1, keepdims=True))


def test_rknn_counts_top2_by_hand():
    nb = rknn_neighbours(F_L, F_U, k=2)
    # angles: l0 -> u0 (3°), u1 (7°); l1 -> u2 (3°), u3 (7°); u0 -> u1 (10°), u2 (90°);
    # u1 -> u0 (10°), u2 (80°); u2 -> u3 (10°), u1 (80°); u3 -> u2 (10°), u1 (90°)
    assert nb.tolist() == [[0, 1], [2, 3], [1, 2], [0, 2], [3, 1], [2, 1]]
    p = rknn_distribution(nb, ROW_LABELS, 4, 2)
    # u0 <- l0 (0), u1 (1); u1 <- l0 (0), u0 (0), u2 (1), u3 (0);
    # u2 <- l1 (1), u0 (0), u1 (1), u3 (0); u3 <- l1 (1), u2 (1)
    counts = np.array([[2, 2], [4, 2], [3, 3], [1, 3]], dtype=float)
    np.testing.assert_allclose(p.numpy(), counts / counts.sum(1, keepdims=True))


def test_rknn_with_k_beyond_the_pool_lists_everyone_but_itself():
    nb = rknn_neighbours(F_L, F_U, k=250)  # "all if fewer": 4 columns
    assert nb.shape == (6, 4)
    assert (nb[:2] >= 0).all()  # labeled rows list all four
    for i in range(4):  # an unlabeled row lists the three others and one "none"
        row = nb[2 + i].tolist()
        assert row.count(-1) == 1 and sorted(x for x in row if x >= 0) == \
            sorted(set(range(4)) - {i})
    p = rknn_distribution(nb, ROW_LABELS, 4, 2)
    # every point is listed by every other row: 3 rows of each class in total, minus itself
    counts = np.array([[1 + 2, 1 + 3], [1 + 3, 1 + 2], [1 + 3, 1 + 2], [1 + 2, 1 + 3]], float)
    np.testing.assert_allclose(p.numpy(), counts / 7.0)


def test_rknn_chunking_does_not_change_the_answer():
    gen = torch.Generator().manual_seed(0)
    fl, fu = torch.randn(13, 5, generator=gen), torch.randn(40, 5, generator=gen)
    np.testing.assert_array_equal(rknn_neighbours(fl, fu, 7), rknn_neighbours(fl, fu, 7, chunk=5))


# -- W1 ------------------------------------------------------------------------------------

def test_w1_reference_is_scipy_on_the_probability_values():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1]])
    q = torch.tensor([[0.1, 0.3, 0.6], [0.1, 0.7, 0.2]])
    w = wasserstein1(p, q, "reference").numpy()
    # sorted values [.1 .2 .7] vs [.1 .3 .6]: mean |diff| = (0 + .1 + .1) / 3
    assert w[0] == pytest.approx(0.2 / 3)
    assert w[1] == pytest.approx(0.0)  # a permutation of the same values: blind to classes
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(30, 6, generator=gen), 1)
    q = torch.softmax(torch.randn(30, 6, generator=gen), 1)
    want = [wasserstein_distance(p[i].numpy(), q[i].numpy()) for i in range(30)]
    np.testing.assert_allclose(wasserstein1(p, q, "reference").numpy(), want, rtol=1e-6)


def test_w1_histogram_is_the_l1_distance_of_the_cdfs():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1]])
    q = torch.tensor([[0.1, 0.3, 0.6], [0.1, 0.7, 0.2]])
    w = wasserstein1(p, q, "histogram").numpy()
    # CDFs [.7 .9 1] vs [.1 .4 1]: .6 + .5 + 0; and [.7 .9 1] vs [.1 .8 1]: .6 + .1
    np.testing.assert_allclose(w, [1.1, 0.7])
    gen = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(30, 6, generator=gen), 1)
    q = torch.softmax(torch.randn(30, 6, generator=gen), 1)
    c = np.arange(6)
    want = [wasserstein_distance(c, c, p[i].numpy(), q[i].numpy()) for i in range(30)]
    np.testing.assert_allclose(wasserstein1(p, q, "histogram").numpy(), want, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown W1"):
        wasserstein1(p, q, "nope")


# -- Otsu ----------------------------------------------------------------------------------

def test_otsu_by_hand_with_three_bins():
    # bins over [0, 2]: centres 1/3, 1, 5/3 with counts 3, 2, 1. Split after bin 0:
    # 3·3·(1/3 − 11/9)² = 64/9; after bin 1: 5·1·(3/5 − 5/3)² = 256/45 < 64/9 -> 1/3
    assert otsu_threshold(np.array([0, 0, 0, 1, 1, 2.0]), nbins=3) == pytest.approx(1 / 3)


def test_otsu_separates_a_bimodal_array():
    g = np.random.default_rng(0)
    low, high = g.normal(1.0, 0.1, 200), g.normal(5.0, 0.3, 50)
    v = np.r_[low, high]
    th = otsu_threshold(v)
    assert th < high.min()
    # the split falls after the bin holding the low mode's largest value; the threshold is
    # that bin's centre (skimage's convention, which the reference used)
    assert abs(th - low.max()) <= (v.max() - v.min()) / 256 / 2
    assert otsu_threshold(np.full(7, 0.25)) == 0.25  # constant: no split, its value


# -- selection and its fallbacks -------------------------------------------------------------

def blob_ctx(n=24, seed=0):
    """A context whose unlabeled pool is train indices 0..n-1 (position = index); the local
    features put the points in three well-separated blobs (i % 3)."""
    g = np.random.default_rng(seed)
    centres = np.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    feats = torch.tensor(centres[np.arange(n) % 3] + g.normal(0, 0.1, (n, 3)),
                         dtype=torch.float32)
    probs = torch.full((n + 2, 3), 1 / 3)
    f_all = torch.cat([feats, torch.zeros(2, 3)])

    def infer(model, idx):
        idx_t = torch.as_tensor(idx)
        return probs[idx_t], f_all[idx_t]

    return QueryContext(client_id=0, cycle=1, labeled=np.array([n, n + 1]),
                        labeled_y=np.array([0, 1]), unlabeled=np.arange(n), num_classes=3,
                        rng=np.random.default_rng(seed), infer=infer)


def with_scores(u1, u2):
    s = create("ifal")
    s.scores = lambda ctx: (torch.as_tensor(u1, dtype=torch.float64),
                            torch.as_tensor(u2, dtype=torch.float64))
    return s


def test_otsu_candidates_then_one_pick_per_blob():
    u1, u2 = np.full(24, 0.1), np.ones(24)
    high = [3, 4, 5, 9, 13, 20]  # blobs 0, 1, 2, 0, 1, 2
    u1[high] = 1.0
    s = with_scores(u1, u2)
    picks = s.query(blob_ctx(), 3)
    assert set(picks.tolist()) <= set(high)
    assert sorted(p % 3 for p in picks) == [0, 1, 2]  # k-means: one per blob
    d = s.diagnostics()
    assert d["stage"] == "U" and d["candidates_U"] == 6
    json.dumps(d)


def test_too_few_candidates_falls_back_to_u1_alone():
    u1, u2 = np.full(24, 0.1), np.full(24, 0.01)
    u1[[1, 2, 6, 7, 8, 10]] = 1.0  # six U1 candidates ...
    u2[[1, 2]] = 1.0  # ... but U = U1 · U2 singles out only two
    s = with_scores(u1, u2)
    picks = s.query(blob_ctx(), 4)
    assert set(picks.tolist()) <= {1, 2, 6, 7, 8, 10}
    d = s.diagnostics()
    assert d["stage"] == "U1" and d["candidates_U"] == 2 and d["candidates_U1"] == 6


def test_still_short_takes_top_b_by_u_ties_by_position():
    u1, u2 = np.full(24, 0.5), np.full(24, 0.5)
    u1[7] = 1.0  # one U1 candidate; U also has one
    u2[11] = 0.8  # U: 7 -> .5, 11 -> .4, every other point .25
    s = with_scores(u1, u2)
    assert s.query(blob_ctx(), 5).tolist() == [7, 11, 0, 1, 2]
    assert s.diagnostics()["stage"] == "top_U"
    s = with_scores(np.zeros(24), np.zeros(24))  # constant: Otsu finds no candidate at all
    assert s.query(blob_ctx(), 3).tolist() == [0, 1, 2]
    assert s.diagnostics()["candidates_U"] == 0


def test_duplicate_points_leave_clusters_empty():
    x = np.array([[0, 0], [0, 0], [1, 1], [1, 1]], dtype=float)
    assert sorted(nearest_to_centres(x, 3, seed=0, n_init=10).tolist()) == [0, 2]  # 2 points
    x = np.array([[0, 0], [0.1, 0], [5, 5], [5.2, 5], [10, 0], [10, 0.3]])
    # centres (0.05, 0), (5.1, 5), (10, 0.15): each pair ties, the smaller position wins
    assert sorted(nearest_to_centres(x, 3, seed=0, n_init=10).tolist()) == [0, 2, 4]
    assert sorted(nearest_to_centres(x, 3, seed=0).tolist()) == [0, 2, 4]  # ALFA-Mix's n_init


# -- the scores against a slow, literal reading of the spec ---------------------------------

def slow_rknn(fl, fu, labels, k, C):
    rows = torch.cat([fl, fu])
    rows = rows / rows.norm(dim=1, keepdim=True)
    fu_n = fu / fu.norm(dim=1, keepdim=True)
    nl, nu = len(fl), len(fu)
    counts = np.ones((nu, C))
    for r in range(len(rows)):
        sims = [(float(rows[r] @ fu_n[j]), j) for j in range(nu) if r != nl + j]
        for _, j in sorted(sims, key=lambda t: -t[0])[:k]:
            counts[j, int(labels[r])] += 1
    return counts / counts.sum(1, keepdims=True)


@pytest.mark.parametrize("w1", ["reference", "histogram"])
def test_scores_match_a_per_sample_reading_of_the_spec(w1):
    ctx, _ = make_ctx(n_unlabeled=40, n_labeled=8)
    s = create("ifal", w1=w1, top_k=6)
    u1, u2 = s.scores(ctx)
    C = ctx.num_classes
    y = list(ctx.labeled_y)
    lab_g = y + ctx.probs("global").argmax(1).tolist()
    lab_l = y + ctx.probs("local").argmax(1).tolist()
    f = {m: (ctx.features(m, "labeled"), ctx.features(m, "unlabeled"))
         for m in ("global", "local", "distilled")}
    g1 = slow_rknn(*f["global"], lab_g, 6, C)
    l1 = slow_rknn(*f["local"], lab_g, 6, C)
    l2 = slow_rknn(*f["local"], lab_l, 6, C)
    k1 = slow_rknn(*f["distilled"], lab_g, 6, C)
    p_l = ctx.probs("local").double().numpy()
    if w1 == "reference":
        def w(a, b):
            return wasserstein_distance(a, b)
    else:
        def w(a, b):
            return wasserstein_distance(np.arange(C), np.arange(C), a, b)
    for i in range(40):
        d_ll, d_gl = w(l1[i], k1[i]), w(g1[i], k1[i])
        want_u1 = max(d_gl / (d_ll + 1e-5), d_ll / (d_gl + 1e-5)) * (d_ll + d_gl)
        assert float(u1[i]) == pytest.approx(want_u1, rel=1e-5, abs=1e-9)
        assert float(u2[i]) == pytest.approx(w(l2[i], p_l[i]), rel=1e-5, abs=1e-9)


def test_identical_models_give_zero_u1():
    ctx, _ = make_ctx()
    same = {"global": ctx.infer("global", np.arange(10_000))}
    same["local"] = same["distilled"] = same["global"]
    ctx = QueryContext(client_id=0, cycle=1, labeled=ctx.labeled, labeled_y=ctx.labeled_y,
                       unlabeled=ctx.unlabeled, num_classes=ctx.num_classes,
                       rng=np.random.default_rng(0),
                       infer=lambda m, idx: (same[m][0][idx], same[m][1][idx]))
    u1, u2 = create("ifal").scores(ctx)
    assert float(u1.abs().max()) == 0.0 and float(u2.min()) > 0


# -- configuration ---------------------------------------------------------------------------

def test_config_section_reaches_the_strategy_and_is_validated():
    cfg = config.load(None, overrides={"strategy": "ifal", "ifal.w1": "histogram",
                                       "ifal.kd_epochs": "7"})
    s = create(cfg.strategy, **config.strategy_options(cfg))
    assert isinstance(s, IFAL) and s.w1 == "histogram" and s.distillation["epochs"] == 7
    assert s.local_model_mode == "last_round" and s.needs_local_model
    assert s.distillation == {"lr": 1e-3, "epochs": 7, "patience": 5, "temperature": 4.0,
                              "ce_weight": 0.1, "keep": "best"}
    with pytest.raises(ConfigError, match="ifal.w1"):
        config.load(None, overrides={"ifal.w1": "sorted"})
    with pytest.raises(ConfigError, match="kd_ce_weight"):
        config.load(None, overrides={"ifal.kd_ce_weight": "1.5"})
    with pytest.raises(ConfigError, match="takes no @G"):
        create("ifal@G")


# -- the distilled local model ---------------------------------------------------------------

def test_distillation_loss_known_values():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    ce = torch.nn.functional.cross_entropy(s, y)
    # the student is its own teacher: no KD term left
    assert float(distillation_loss(s, s, y, 4.0, 0.1)) == pytest.approx(0.1 * float(ce),
                                                                        rel=1e-5)
    pt, ps = torch.softmax(t / 4, 1), torch.softmax(s / 4, 1)
    kl = float((pt * (pt.log() - ps.log())).sum(1).mean())
    assert float(distillation_loss(s, t, y, 4.0, 0.1)) == pytest.approx(
        0.1 * float(ce) + 0.9 * 16 * kl, rel=1e-5)


@pytest.fixture(scope="module")
def digits_engine():
    from falkit.data.sources import load

    ds = load("digits")
    cfg = config.load(None, overrides={"model.backbone": "resnet8_preact16",
                                       "fl.batch_size": "32"})
    return Engine(cfg, ImageTensors(ds.x_train, torch.as_tensor(ds.y_train), ds.mean, ds.std),
                  ImageTensors(ds.x_test, torch.as_tensor(ds.y_test), ds.mean, ds.std), 10)


def test_distilled_model_stops_with_patience_and_returns_the_best_weights(digits_engine):
    eng = digits_engine
    teacher = eng.init_state(0, "teacher")
    labels = eng.train_y.cpu()
    idx = np.arange(96)  # three batches of 32
    # a large learning rate makes the training loss bounce, so patience runs out early
    kw = {"lr": 0.3, "epochs": 200, "patience": 3, "temperature": 4.0, "ce_weight": 0.1}
    (best, losses), = eng.train_distilled([(idx, (1, 0))], teacher, labels, 0, **kw)
    n, b = len(losses), int(np.argmin(losses))
    assert n < 200  # stopped early ...
    assert n == b + 1 + 3  # ... exactly `patience` epochs after the best one
    assert all(x >= losses[b] for x in losses[b + 1:])
    # the same training cut right after the best epoch ends on the best weights: the long
    # run returned a copy of them, not its last weights
    (cut, cut_losses), = eng.train_distilled([(idx, (1, 0))], teacher, labels, 0,
                                             **{**kw, "epochs": b + 1})
    assert cut_losses == losses[:b + 1]
    assert all(torch.equal(best[k], cut[k]) for k in best)
    # ... and the working model, which ends on the last epoch's weights, moved on since
    (best, _), = eng.train_distilled([(idx, (1, 0))], teacher, labels, 0, **kw)
    last = eng.model.state_dict()
    assert not all(torch.equal(best[k], last[k]) for k in best)


def test_distilled_model_keep_last_is_the_last_epoch_as_the_ifal_code(digits_engine):
    """ifal.kd_keep = last (reference): the IFAL code's EarlyStopping kept a live
    state_dict() reference, so the weights it used are the last epoch's; the same run as
    `best` with the same stop, ending on the working model's final weights."""
    eng = digits_engine
    teacher = eng.init_state(0, "teacher")
    labels = eng.train_y.cpu()
    idx = np.arange(96)
    kw = {"lr": 0.3, "epochs": 200, "patience": 3, "temperature": 4.0, "ce_weight": 0.1}
    (best, losses), = eng.train_distilled([(idx, (1, 0))], teacher, labels, 0, **kw)
    (last, last_losses), = eng.train_distilled([(idx, (1, 0))], teacher, labels, 0, **kw,
                                               keep="last")
    assert last_losses == losses  # the same training and stop
    final = eng.model.state_dict()
    assert all(torch.equal(last[k], final[k]) for k in last)
    assert int(np.argmin(losses)) < len(losses) - 1  # the best epoch was not the last ...
    assert not all(torch.equal(best[k], last[k]) for k in best)  # ... so they differ
    assert config.load(None, preset="reference").ifal.kd_keep == "last"
    assert config.load(None).ifal.kd_keep == "best"
    assert create("ifal", kd_keep="last").distillation["keep"] == "last"
    with pytest.raises(config.ConfigError, match="kd_keep"):
        create("ifal", kd_keep="first")


def test_loop_trains_and_serves_the_distilled_model(tmp_path):
    from falkit.loop import run

    cfg = config.load(None, overrides={
        "strategy": "ifal", "data.dataset": "digits", "data.rho": "none",
        "partition.num_clients": "2", "partition.alpha": "1.0", "budget.cycles": "2",
        "fl.rounds": "1", "fl.local_epochs": "1", "model.backbone": "resnet8_preact16",
        "ifal.kd_epochs": "3", "out_dir": str(tmp_path)})
    res = run(cfg)
    recs = [json.loads(x) for x in (res.run_dir / "queries.jsonl").read_text().splitlines()]
    queried = [r for r in recs if r["cycle"] == 1]
    assert len(queried) == 2
    for r in queried:
        assert 1 <= r["distill_epochs"] <= 3 and r["stage"] in ("U", "U1", "top_U")
        assert len(set(r["indices"])) == len(r["indices"]) > 0
    assert res.metrics[1]["time_local_model"] > 0
