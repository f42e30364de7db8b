"""The strategy contract, run against every registered strategy (scikit-activeml style):
exact budget, distinct indices, only from the client's unlabeled pool, deterministic for a
seed — plus known answers for the classic scores."""

import numpy as np
import pytest
import torch

from falkit.al.base import QueryContext, create, list_ids
from falkit.errors import ConfigError

C, D = 5, 8


def make_ctx(seed=0, n_unlabeled=60, n_labeled=12, probs=None, feats=None):
    g = np.random.default_rng(100 + seed)
    pool = np.sort(g.choice(10_000, n_unlabeled + n_labeled, replace=False))
    labeled = np.sort(g.choice(pool, n_labeled, replace=False))
    unlabeled = np.setdiff1d(pool, labeled)
    gen = torch.Generator().manual_seed(seed)
    table_p = {m: torch.softmax(3 * torch.randn(10_000, C, generator=gen), 1)
               for m in ("global", "local")}
    table_f = {m: torch.randn(10_000, D, generator=gen) for m in ("global", "local")}
    calls = []

    def infer(model, idx):
        calls.append((model, len(idx)))
        idx_t = torch.as_tensor(idx)
        p = table_p[model][idx_t] if probs is None else probs[model][idx_t]
        f = table_f[model][idx_t] if feats is None else feats[model][idx_t]
        return p, f

    heads = {m: {"classifier.weight": torch.randn(C, D, generator=gen),
                 "classifier.bias": torch.randn(C, generator=gen)} for m in ("global", "local")}
    # IFAL's third model, drawn last so the tables above stay what they were
    table_p["distilled"] = torch.softmax(3 * torch.randn(10_000, C, generator=gen), 1)
    table_f["distilled"] = torch.randn(10_000, D, generator=gen)
    # ll4al's predicted losses (what the loop serves from the loss module), drawn last too
    table_l = torch.randn(10_000, generator=gen)

    def predicted_loss(model, idx):
        calls.append((f"{model}:predicted_loss", len(idx)))
        return table_l[torch.as_tensor(idx)]

    ctx = QueryContext(client_id=0, cycle=1, labeled=labeled,
                       labeled_y=g.integers(0, C, n_labeled), unlabeled=unlabeled,
                       num_classes=C, rng=np.random.default_rng(seed), infer=infer,
                       weights=heads.__getitem__)
    ctx.predicted_loss = predicted_loss
    return ctx, calls


def two_phase_query(strategy, ctx, budget):
    """What the loop does: client statistics -> server reduce -> broadcast -> query."""
    ctx.phase_a = strategy.client_stats(ctx)
    if ctx.phase_a is not None:
        ctx.server = strategy.server_reduce([ctx.phase_a.stats])
    return strategy.query(ctx, budget)


@pytest.mark.parametrize("sid", list_ids())
@pytest.mark.parametrize("budget", [1, 7, 59, 60, 200])
def test_contract(sid, budget):
    ctx, _ = make_ctx()
    picks = two_phase_query(create(sid), ctx, budget)
    assert len(picks) == min(budget, len(ctx.unlabeled))
    assert len(np.unique(picks)) == len(picks)
    assert np.isin(picks, ctx.unlabeled).all()
    again = two_phase_query(create(sid), make_ctx()[0], budget)
    assert np.array_equal(picks, again)  # deterministic for a seed


@pytest.mark.parametrize("sid", list_ids())
def test_outputs_inferred_once_per_model(sid):
    ctx, calls = make_ctx()
    two_phase_query(create(sid), ctx, 10)
    models = [m for m, _ in calls]
    assert len(models) == len(set(models))  # each model's outputs computed once, batched


def test_selector_decides_the_query_model():
    ctx, calls = make_ctx()
    create("entropy@L").query(ctx, 5)
    assert [m for m, _ in calls] == ["local"]
    assert create("entropy").id == "entropy@G"


def test_entropy_margin_least_confidence_pick_known_points():
    n = 10_000
    probs = torch.full((n, C), 0.0)
    probs[:, 0] = 1.0  # confident everywhere ...
    ctx, _ = make_ctx()
    u = torch.as_tensor(ctx.unlabeled)
    probs[u[3]] = torch.full((C,), 1.0 / C)  # ... except two uncertain points
    probs[u[17]] = torch.tensor([0.5, 0.5, 0, 0, 0])
    tables = {"global": probs, "local": probs}
    for sid in ("entropy@G", "margin@G", "least_confidence@G"):
        ctx, _ = make_ctx(probs=tables)
        picks = create(sid).query(ctx, 2)
        assert set(picks.tolist()) == {int(u[3]), int(u[17])}, sid
    ctx, _ = make_ctx(probs=tables)
    assert create("entropy@G").query(ctx, 1).tolist() == [int(u[3])]  # log 5 > log 2


def test_coreset_starts_from_labeled_centers():
    n = 10_000
    feats = torch.zeros(n, D)
    ctx, _ = make_ctx()
    far = ctx.unlabeled[9]
    feats[torch.as_tensor(far)] = 100.0
    ctx, _ = make_ctx(feats={"global": feats, "local": feats})
    assert create("coreset@G").query(ctx, 1).tolist() == [int(far)]


def test_unknown_strategy_and_bad_selector():
    with pytest.raises(ConfigError, match="unknown strategy 'nope'"):
        create("nope")
    with pytest.raises(ConfigError, match="@X"):
        create("entropy@X")
    with pytest.raises(ConfigError, match="takes no @G"):
        create("random@G")
