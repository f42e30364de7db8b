"""BALD with MC dropout (al/bald.py, one file): the mutual information by hand, falkit's
contract, its config rule, and a run in process equal to the same run on Flower."""

import math

import numpy as np
import pytest
import torch

from falkit import config
from falkit.al.base import create, list_ids
from falkit.errors import ConfigError
from falkit.testing import check_options, check_strategy, fake_context


def test_bald_scores_disagreement_not_uncertainty():
    """Three samples, two passes: 0 = confident passes that disagree (MI = ln 2), 1 = both
    passes uniform (entropy ln 2, MI 0), 2 = both confident alike (MI 0). Entropy of the
    mean ties 0 and 1; BALD takes 0, then 1 and 2 (MI 0 each, smaller position first)."""
    ctx, _ = fake_context(n_unlabeled=3, n_labeled=2)
    passes = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.9, 0.1]],
                           [[0.0, 1.0], [0.5, 0.5], [0.9, 0.1]]])
    seen = []

    def mc_probs(model, t, gen, subset="unlabeled"):
        seen.append((model, t))
        return passes

    ctx.provided["mc_probs"] = mc_probs
    s = create("bald@G", passes=2)
    assert list(s.query(ctx, 1)) == [ctx.unlabeled[0]]
    assert s.diagnostics()["mutual_information_mean_selected"] == pytest.approx(math.log(2),
                                                                                 abs=1e-6)
    assert seen == [("global", 2)]
    assert list(create("bald@L", passes=2).query(ctx, 3)) == list(ctx.unlabeled)
    assert seen[-1] == ("local", 2)


def test_bald_meets_the_contract_and_its_options_are_checked():
    assert {"bald@G", "bald@L"} <= set(list_ids())
    check_strategy("bald@G", budgets=(1, 7, 60), seeds=(0,))
    check_strategy("bald@L", budgets=(7,), seeds=(0,), passes=3)
    from falkit.al.bald import BALD

    check_options(BALD)
    with pytest.raises(ConfigError, match="set model.dropout > 0"):
        config.load(None, overrides={"strategy": "bald@G"})
    cfg = config.load(None, overrides={"strategy": "bald@G", "model.dropout": "0.5",
                                       "bald.passes": "10"})
    assert cfg.bald.passes == 10 and "[bald]" in config.dumps(cfg)
    with pytest.raises(ConfigError, match="bald.passes must be >= 2"):
        config.load(None, overrides={"strategy": "bald@G", "model.dropout": "0.5",
                                     "bald.passes": "1"})


def test_bald_picks_are_keyed_by_the_query_rng():
    a, _ = fake_context(seed=3)
    b, _ = fake_context(seed=3)
    c, _ = fake_context(seed=3)
    c.rng = np.random.default_rng(99)  # another client / cycle: other masks
    s = create("bald@G", passes=4)
    pa, pb, pc = s.query(a, 20), s.query(b, 20), s.query(c, 20)
    assert np.array_equal(pa, pb) and not np.array_equal(pa, pc)


@pytest.mark.slow
def test_bald_in_process_equals_flower(tmp_path):
    pytest.importorskip("flwr")
    from tests.test_transports import same_in_process_and_on_flower

    ref = same_in_process_and_on_flower(tmp_path, **{
        "strategy": "bald@G", "model.dropout": "0.5", "bald.passes": "8"})
    assert "mutual_information_mean_selected" in (ref / "queries.jsonl").read_text()
