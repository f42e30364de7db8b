"""KAFAL (KSAS, Cao et al. ICCV 2023) and LoGo (Kim et al. CVPR 2023): the shared strategy
contract plus hand-made inputs with known answers (ALGORITHMS.md §4)."""

import json
import math

import numpy as np
import pytest
import torch
from tests.test_strategies import make_ctx

import falkit.al.kafal  # noqa: F401  (registers "kafal")
import falkit.al.logo  # noqa: F401  (registers "logo")
from falkit.al.base import QueryContext, create
from falkit.al.kafal import kafal_scores
from falkit.al.logo import cluster_round_robin, logo_embedding
from falkit.errors import ConfigError


def tiny_ctx(p_global, p_local, f_local, labeled_y, num_classes, seed=0):
    """A context whose unlabeled pool is train indices 0..N-1 (position = index) and whose
    labeled set follows it; model outputs on the labeled rows are irrelevant here."""
    p_global = torch.as_tensor(p_global, dtype=torch.float32)
    p_local = torch.as_tensor(p_local, dtype=torch.float32)
    f_local = torch.as_tensor(f_local, dtype=torch.float32)
    n, m = len(p_global), len(labeled_y)
    pad_p = torch.full((m, num_classes), 1.0 / num_classes)
    pad_f = torch.zeros(m, f_local.shape[1])
    tables = {"global": (torch.cat([p_global, pad_p]), torch.cat([f_local, pad_f])),
              "local": (torch.cat([p_local, pad_p]), torch.cat([f_local, pad_f]))}

    def infer(model, idx):
        p, f = tables[model]
        idx_t = torch.as_tensor(idx)
        return p[idx_t], f[idx_t]

    return QueryContext(client_id=0, cycle=1, labeled=np.arange(n, n + m),
                        labeled_y=np.asarray(labeled_y), unlabeled=np.arange(n),
                        num_classes=num_classes, rng=np.random.default_rng(seed), infer=infer)


# -- the shared contract -------------------------------------------------------------------

@pytest.mark.parametrize("sid,mode", [("kafal", "last_round"), ("logo", None)])
def test_class_attributes_and_local_model(sid, mode):
    s = create(sid)
    assert s.id == sid and not s.uses_selector and s.needs_local_model
    assert s.local_model_mode == mode  # None: LoGo follows local_model.mode
    with pytest.raises(ConfigError, match="takes no @G"):
        create(f"{sid}@G")
    ctx, calls = make_ctx()
    s.query(ctx, 10)
    assert sorted(m for m, _ in calls) == ["global", "local"]  # each model inferred once
    json.dumps(s.diagnostics())  # diagnostics are JSON-serialisable


# -- KAFAL ---------------------------------------------------------------------------------

COUNTS = np.array([4, 2, 0])  # labeled counts per class; class 2 absent from L_k
LABELED_Y = [0, 0, 0, 0, 1, 1]


def sym_kl_by_hand(pg, pl, counts):
    """½[KL(q_g‖q_l) + KL(q_l‖q_g)] with q ∝ p · n_c over the present classes (the log-count
    prior added to log p is a multiplication by the counts after exponentiation)."""
    keep = [c for c in range(len(counts)) if counts[c] > 0]
    qg = [pg[c] * counts[c] for c in keep]
    ql = [pl[c] * counts[c] for c in keep]
    qg = [v / sum(qg) for v in qg]
    ql = [v / sum(ql) for v in ql]
    return 0.5 * sum((a - b) * (math.log(a) - math.log(b)) for a, b in zip(qg, ql, strict=True))


P_GLOBAL = [[0.5, 0.3, 0.2],
            [0.4, 0.2, 0.4],   # vs local: same 2:1 ratio on classes 0,1 -> 0 once 2 is masked
            [0.6, 0.3, 0.1],
            [0.7, 0.2, 0.1],   # strong disagreement on the present classes -> largest score
            [0.3, 0.3, 0.4]]
P_LOCAL = [[0.5, 0.3, 0.2],    # identical -> 0
           [0.2, 0.1, 0.7],
           [0.5, 0.4, 0.1],    # mild disagreement
           [0.2, 0.7, 0.1],
           [0.35, 0.25, 0.4]]


def test_kafal_score_matches_hand_computation():
    s = kafal_scores(torch.tensor(P_GLOBAL), torch.tensor(P_LOCAL), COUNTS).numpy()
    # sample 3: q_g ∝ [0.7·4, 0.2·2] = [2.8, 0.4] -> [0.875, 0.125];
    #           q_l ∝ [0.2·4, 0.7·2] = [0.8, 1.4] -> [4/11, 7/11]
    qg, ql = np.array([0.875, 0.125]), np.array([4 / 11, 7 / 11])
    expected = 0.5 * float(((qg - ql) * (np.log(qg) - np.log(ql))).sum())
    assert s[3] == pytest.approx(expected, rel=1e-5)
    for i in range(len(P_GLOBAL)):
        assert s[i] == pytest.approx(sym_kl_by_hand(P_GLOBAL[i], P_LOCAL[i], COUNTS),
                                     rel=1e-5, abs=1e-7)
    assert s[0] == pytest.approx(0.0, abs=1e-7)
    assert s[1] == pytest.approx(0.0, abs=1e-7)  # class 2 is masked out: no disagreement left


def test_kafal_query_picks_largest_symmetric_kl_first():
    ctx = tiny_ctx(P_GLOBAL, P_LOCAL, np.zeros((5, 2)), LABELED_Y, 3)
    s = create("kafal")
    assert s.query(ctx, 1).tolist() == [3]
    ctx = tiny_ctx(P_GLOBAL, P_LOCAL, np.zeros((5, 2)), LABELED_Y, 3)
    order = s.query(ctx, 4).tolist()
    assert order[:3] == [3, 2, 4]  # by hand: 0.641 > 0.020 > 0.012
    assert order[3] == 0  # then the exact-zero scores of samples 0 and 1, ties by position


def test_kafal_log_probs_stand_in_for_logits():
    # log p differs from the logits by a per-sample constant, which softmax ignores
    gen = torch.Generator().manual_seed(0)
    lg, ll = 3 * torch.randn(50, 4, generator=gen), 3 * torch.randn(50, 4, generator=gen)
    counts = np.array([7, 0, 1, 3])
    keep = torch.tensor([0, 2, 3])
    prior = torch.log(torch.tensor([7.0, 1.0, 3.0]).double())
    qg = torch.softmax(lg.double()[:, keep] + prior, 1)
    ql = torch.softmax(ll.double()[:, keep] + prior, 1)
    want = 0.5 * ((qg - ql) * (qg.log() - ql.log())).sum(1)
    got = kafal_scores(torch.softmax(lg, 1), torch.softmax(ll, 1), counts)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_kafal_absent_classes_and_exact_zeros_stay_finite():
    pg = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1 / 3] * 3])
    pl = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    for counts in ([4, 2, 0], [0, 0, 0], [1, 1, 1], [0, 3, 0]):
        s = kafal_scores(pg, pl, np.array(counts))
        assert torch.isfinite(s).all() and (s >= 0).all(), counts
    s = kafal_scores(pg, pl, COUNTS)
    assert int(s.argmax()) == 0  # certain on class 0 vs certain on class 1: the largest


def test_kafal_single_labeled_class_gives_zero_scores_and_position_ties():
    gen = torch.Generator().manual_seed(1)
    pg = torch.softmax(torch.randn(20, 3, generator=gen), 1)
    pl = torch.softmax(torch.randn(20, 3, generator=gen), 1)
    s = kafal_scores(pg, pl, np.array([0, 5, 0]))
    assert torch.isfinite(s).all() and float(s.abs().max()) == 0.0
    ctx = tiny_ctx(pg, pl, np.zeros((20, 2)), [1] * 5, 3)
    assert create("kafal").query(ctx, 4).tolist() == [0, 1, 2, 3]  # ties by position


# -- LoGo ----------------------------------------------------------------------------------

def test_logo_embedding_scales_local_features_by_local_uncertainty():
    f = torch.tensor([[2.0, -4.0], [2.0, -4.0]])
    p = torch.tensor([[0.75, 0.25], [1.0, 0.0]])
    np.testing.assert_allclose(logo_embedding(f, p), [[0.5, -1.0], [0.0, 0.0]])


def test_logo_one_pick_per_blob_the_most_uncertain_globally():
    g = np.random.default_rng(3)
    n = 30
    blob = np.r_[np.zeros(15, dtype=int), np.ones(15, dtype=int)]
    g.shuffle(blob)
    feats = g.normal(0, 0.1, (n, 4)) + np.where(blob[:, None] == 0, 10.0, -10.0)
    p_local = np.tile([0.6, 0.3, 0.1], (n, 1))  # equal local uncertainty: pure blob geometry
    # global entropy rises with t; blob 0 holds the two most uncertain points overall, so
    # plain top-2 entropy would take both from blob 0
    t = g.uniform(0.01, 0.2, n)
    b0, b1 = np.flatnonzero(blob == 0), np.flatnonzero(blob == 1)
    t[b0[:2]] = [0.45, 0.4]
    t[b1[5]] = 0.3
    p_global = np.stack([1 - t, t, np.zeros(n)], 1)
    ctx = tiny_ctx(p_global, p_local, feats, [0, 1, 2], 3)
    strategy = create("logo")
    picks = strategy.query(ctx, 2)
    assert sorted(picks.tolist()) == sorted([int(b0[0]), int(b1[5])])
    assert strategy.diagnostics()["clusters"] == 2


def test_logo_round_robin_fill_with_duplicate_points():
    # 3 distinct embeddings, 4 copies each: k-means can form at most 3 clusters for b = 7
    n = 12
    group = np.arange(n) % 3
    feats = np.eye(3)[group] * 5.0
    p_local = np.tile([0.5, 0.5], (n, 1))
    t = np.array([.10, .20, .30, .15, .25, .35, .05, .40, .01, .02, .03, .04])
    # entropy order per group (t ↑ = entropy ↑): group 0 = [3, 0, 6, 9];
    # group 1 = [7, 4, 1, 10]; group 2 = [5, 2, 11, 8]
    p_global = np.stack([1 - t, t], 1)
    ctx = tiny_ctx(p_global, p_local, feats, [0, 1], 2)
    strategy = create("logo")
    picks = strategy.query(ctx, 7).tolist()
    # round 0: 7 (.40), 5 (.35), 3 (.15); round 1: 2 (.30), 4 (.25), 0 (.10);
    # round 2 = {6 (.05), 1 (.20), 11 (.03)}, truncated to its most uncertain: 1
    assert picks == [7, 5, 3, 2, 4, 0, 1]
    assert strategy.diagnostics()["clusters"] == 3


def test_cluster_round_robin_known_answer_and_ties():
    labels = np.array([2, 0, 2, 0, 1, 2, 0])
    unc = np.array([0.5, 0.9, 0.5, 0.1, 0.3, 0.7, 0.9])
    # ranks: cluster 0 -> [1 (.9), 6 (.9, later position), 3]; cluster 1 -> [4];
    #        cluster 2 -> [5 (.7), 0 (.5), 2 (.5, later position)];
    # round 0: 1, 5, 4; round 1: 6 (.9), 0 (.5); round 2: 2 (.5), 3 (.1)
    assert cluster_round_robin(labels, unc, 7).tolist() == [1, 5, 4, 6, 0, 2, 3]
    assert cluster_round_robin(labels, unc, 3).tolist() == [1, 5, 4]
    assert cluster_round_robin(np.zeros(4, dtype=int), np.zeros(4), 2).tolist() == [0, 1]
