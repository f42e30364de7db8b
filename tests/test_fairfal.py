"""FairFAL on hand-made inputs with known answers, and end to end with every ablation."""

import json
import math

import numpy as np
import pytest
import torch

from falkit import config
from falkit.al.base import QueryContext, create
from falkit.al.fairfal import (
    balanced_rows,
    discrepancy,
    imbalance_ratio,
    prototype_pseudo_labels,
    uncertainty,
)
from falkit.al.primitives import class_quotas
from falkit.loop import run


def test_quotas_leftover_case_from_the_spec():
    sizes = np.zeros(10, dtype=int)
    sizes[[0, 1, 4, 9]] = [900, 300, 5, 2]
    q = class_quotas(85, sizes)
    assert q[[0, 1, 4, 9]].tolist() == [39, 39, 5, 2] and q.sum() == 85
    assert q[[2, 3, 5, 6, 7, 8]].tolist() == [0] * 6


def test_quotas_even_and_remainder_to_largest_buckets():
    assert class_quotas(10, np.array([50, 50, 50, 50, 50])).tolist() == [2] * 5
    # 7 // 3 = 2 each, 1 left for the largest bucket (class 2), stable on ties
    assert class_quotas(7, np.array([10, 10, 30])).tolist() == [2, 2, 3]
    assert class_quotas(8, np.array([10, 30, 30])).tolist() == [2, 3, 3]
    # fewer candidates than budget: every candidate
    assert class_quotas(9, np.array([1, 2, 3])).tolist() == [1, 2, 3]


def test_gamma_on_fixed_probabilities():
    pi = torch.tensor([0.5, 0.25, 0.2, 0.05])
    assert imbalance_ratio(pi, np.array([0, 1, 2])) == pytest.approx(0.2 / 0.5)
    assert imbalance_ratio(pi, np.array([1, 3])) == pytest.approx(0.05 / 0.25)
    assert imbalance_ratio(pi, np.array([2])) == 1.0  # one class present


def test_discrepancy_over_all_classes_with_zero_terms():
    g = torch.tensor([0.5, 0.5, 0.0, 0.0])
    l = torch.tensor([0.25, 0.5, 0.25, 0.0])
    # terms: .25/.75, 0, .25/.25, 0/0 -> 0 ; mean over C = 4
    assert discrepancy(g, l) == pytest.approx((1 / 3 + 0 + 1 + 0) / 4)
    assert discrepancy(g, g) == 0.0


def test_balanced_set_upsamples_to_largest_class():
    labels = np.array([0, 0, 0, 0, 2, 5, 5])
    rows = balanced_rows(labels, np.random.default_rng(0)).numpy()
    assert np.bincount(labels[rows], minlength=6).tolist() == [4, 0, 4, 0, 0, 4]


def test_pseudo_labels_only_locally_labeled_classes():
    feat_l = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    labels_l = np.array([3, 3, 7])
    feat_u = torch.tensor([[5.0, 0.1], [0.2, 3.0], [-1.0, -1.0]])
    assert prototype_pseudo_labels(feat_l, labels_l, feat_u).tolist() == [3, 7, 3]


def test_pseudo_labels_cosine_normalises_the_prototypes_dot_does_not():
    """Class 0's labels at ±60° average to (0.5, 0): a prototype of norm 0.5; class 1's one
    label at 90° is a unit prototype. A sample at 30°: cos to class 0 = 0.866 > 0.5, but the
    un-normalised dot product gives class 0 only 0.433 < 0.5: it favours the class with
    fewer (more concentrated) labels."""
    s3 = math.sqrt(3) / 2
    feat_l = torch.tensor([[0.5, s3], [0.5, -s3], [0.0, 1.0]])
    labels_l = np.array([0, 0, 1])
    feat_u = torch.tensor([[s3, 0.5]])
    assert prototype_pseudo_labels(feat_l, labels_l, feat_u, "cosine").tolist() == [0]
    assert prototype_pseudo_labels(feat_l, labels_l, feat_u).tolist() == [0]  # the default
    assert prototype_pseudo_labels(feat_l, labels_l, feat_u, "dot").tolist() == [1]


def test_normalized_entropy_and_options():
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    assert uncertainty(p, "entropy").tolist() == pytest.approx([1.0, 0.0])
    assert uncertainty(p, "margin").tolist() == pytest.approx([1.0, 0.0])
    assert uncertainty(p, "least_confidence").tolist() == pytest.approx([0.75, 0.0])


def _ctx(probs_g, probs_l, feats, labeled, labeled_y, unlabeled, C, seed=0):
    tables = {"global": (probs_g, feats), "local": (probs_l, feats)}

    def infer(model, idx):
        p, f = tables[model]
        i = torch.as_tensor(idx)
        return p[i], f[i]

    return QueryContext(client_id=0, cycle=1, labeled=labeled, labeled_y=labeled_y,
                        unlabeled=unlabeled, num_classes=C, rng=np.random.default_rng(seed),
                        infer=infer)


def test_adaptive_model_choice_and_quota_per_bucket():
    """Two well-separated classes in feature space, labels for both; the budget splits by
    quota and stage 1 keeps only the most uncertain candidates of each bucket."""
    C = 3
    n = 40
    feats = torch.zeros(n, 4)
    feats[:20, 0] = 1.0
    feats[20:, 1] = 1.0
    feats += 0.01 * torch.arange(n).unsqueeze(1).float()  # distinct points
    probs_g = torch.full((n, C), 1 / C)
    conf = torch.linspace(0.34, 0.98, n)  # increasing confidence -> decreasing uncertainty
    probs_g[:, 0] = conf
    probs_g[:, 1] = (1 - conf) / 2
    probs_g[:, 2] = (1 - conf) / 2
    labeled = np.array([0, 1, 20, 21])
    labeled_y = np.array([0, 0, 1, 1])
    unlabeled = np.setdiff1d(np.arange(n), labeled)
    s = create("fairfal", selector="adaptive", kappa=1.0)
    ctx = _ctx(probs_g, probs_g, feats, labeled, labeled_y, unlabeled, C)
    ctx.phase_a = s.client_stats(ctx)
    ctx.server = s.server_reduce([ctx.phase_a.stats])
    assert ctx.phase_a.kept["d"] == 0.0  # identical models
    picks = s.query(ctx, 4)
    diag = s.diagnostics()
    assert diag["model"] == ("global" if diag["s_k"] > 0.75 else "local")
    assert diag["buckets"] == [18, 18, 0]  # class 2 has no labels: never a pseudo-label
    # base 4 // 3 = 1 each, the remainder to the largest bucket (class 0, stable), class 2's
    # capped quota handed round-robin to the largest bucket with spare candidates
    assert diag["quotas"] == [3, 1, 0]
    # kappa = 1: stage 1 keeps q_c candidates = the q_c most uncertain of each bucket
    assert sorted(picks.tolist()) == [2, 3, 4, 22]


def test_complement_and_fixed_selectors():
    s = create("fairfal", selector="complement")
    assert s.choose_model(0.9) == "local" and s.choose_model(0.5) == "global"
    assert create("fairfal").choose_model(0.9) == "global"
    assert create("fairfal").choose_model(0.75) == "local"  # global iff s_k > delta
    assert create("fairfal", selector="local").choose_model(0.99) == "local"


SMALL = {
    "data.dataset": "digits", "data.rho": "5", "partition.num_clients": "3",
    "partition.alpha": "0.5", "budget.fraction": "0.05", "budget.cycles": "3",
    "fl.rounds": "1", "fl.local_epochs": "1", "fl.lr": "0.05", "local_model.epochs": "2",
    "model.backbone": "resnet8_preact16", "strategy": "fairfal",
}


def test_gamma_bar_frozen_diagnostics_and_resume(tmp_path):
    cfg = config.load(None, overrides={**SMALL, "out_dir": str(tmp_path / "a"),
                                       "budget.cycles": "4"})
    full = run(cfg)
    recs = [json.loads(x) for x in (full.run_dir / "queries.jsonl").read_text().splitlines()]
    q = [r for r in recs if r["cycle"] > 0]
    assert len(q) == 3 * 3
    for r in q:
        for key in ("gamma_k", "gamma_bar", "d_k", "s_k", "model", "buckets", "quotas"):
            assert key in r
        assert r["s_k"] == pytest.approx(1 - (r["d_k"] + r["gamma_bar"]) / 2)
        assert sum(r["quotas"]) == len(r["indices"])
    first = [r["gamma_k"] for r in q if r["cycle"] == 1]
    assert q[0]["gamma_bar"] == pytest.approx(np.mean(first))
    assert len({r["gamma_bar"] for r in q}) == 1  # frozen after the first query cycle
    cfg_b = config.load(None, overrides={**SMALL, "out_dir": str(tmp_path / "b"),
                                         "budget.cycles": "4"})
    run(cfg_b, stop_after=1)
    resumed = run(cfg_b)
    assert (resumed.run_dir / "queries.jsonl").read_text() == \
        (full.run_dir / "queries.jsonl").read_text()


# Paper Table 2 ablations (and appendix switches): every combination runs end to end.
ABLATIONS = [
    {"fairfal.selector": sel, "fairfal.classwise": cw, "fairfal.prototypes": pr,
     "fairfal.kappa": k}
    for sel in ("adaptive", "complement", "global", "local")
    for cw in ("true", "false")
    for pr in ("global", "local")
    for k in ("4", "0")
    if cw == "true" or (pr == "global" and k == "4")  # prototypes/kappa need classwise
] + [{"fairfal.uncertainty": "margin"}, {"fairfal.uncertainty": "least_confidence"},
     {"fairfal.embedding_probs": "code"}, {"fairfal.delta": "0.5"}]


@pytest.mark.parametrize("ablation", ABLATIONS, ids=lambda a: ",".join(
    f"{k.split('.')[1]}={v}" for k, v in a.items()))
def test_every_ablation_runs(tmp_path, ablation):
    cfg = config.load(None, overrides={**SMALL, **ablation, "out_dir": str(tmp_path)})
    res = run(cfg)
    assert [r["labeled"] for r in res.metrics] == [res.metrics[0]["labeled"] * (c + 1)
                                                    for c in range(3)]
    assert all(math.isfinite(r["accuracy"]) for r in res.metrics)
