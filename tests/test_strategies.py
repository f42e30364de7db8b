"""The strategy contract, run against every registered strategy (scikit-activeml style):
exact budget, distinct indices, only from the client's unlabeled pool, deterministic for a
seed — plus known answers for the classic scores."""

import pytest
import torch

from falkit.al.base import create, list_ids
from falkit.errors import ConfigError
from falkit.testing import check_strategy, fake_context, query_once

C, D = 5, 8


make_ctx = fake_context  # a client's pools, random model outputs (falkit.testing)
two_phase_query = query_once  # what the loop does: statistics -> reduce -> query


@pytest.mark.parametrize("sid", list_ids())
def test_contract(sid):
    """falkit.testing's contract (what a plug-in's own tests call): exact budget, distinct,
    only unlabeled indices, deterministic for a seed, each model inferred once, only the
    declared models."""
    check_strategy(sid, budgets=(1, 7, 59, 60, 200), seeds=(0,))


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
