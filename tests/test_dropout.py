"""`model.dropout` (issue 26): dropout on the backbone's classifier input while training, off
by default (runs do not change), its masks from the training's keyed generator (runs
reproduce), and the `mc_probs` model output MC-dropout strategies declare."""

import numpy as np
import pytest
import torch
from tests.test_engine import make_engine

from falkit import config
from falkit.client import PROVIDERS, mc_dropout_probs
from falkit.models.backbones import create as create_backbone
from falkit.testing import fake_context


def test_dropout_is_off_by_default_draws_nothing_and_renames_no_run():
    cfg = config.load(None)
    assert cfg.model.dropout == 0.0
    assert "model.dropout" not in config.identity(cfg)  # the same run names as before
    assert "model.dropout" in config.identity(config.load(None, overrides={
        "model.dropout": "0.5"}))
    with pytest.raises(Exception, match=r"model.dropout must be in \[0, 1\)"):
        config.load(None, overrides={"model.dropout": "1"})
    eng, _ = make_engine()
    state = eng.init_state(0)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    eng.fl_round(state, [0, 1], [np.arange(10), np.arange(10, 20)], 0.05, seed=1, key=(0, 0))
    assert torch.equal(torch.get_rng_state(), before)  # no global draw without dropout


def test_dropout_drops_while_training_only_and_keeps_the_state_dict():
    torch.manual_seed(0)
    m = create_backbone("cnn4", num_classes=4, in_channels=1, image_size=16)
    keys = list(m.state_dict())
    x = torch.randn(6, 1, 16, 16)
    m.eval()
    plain = m(x)[0]
    m.dropout = 0.5
    assert torch.equal(m(x)[0], plain)  # evaluation never drops
    assert list(m.state_dict()) == keys  # no new weights or buffers
    m.train()
    m.dropout_generator = torch.Generator().manual_seed(3)
    a, fa = m(x)
    m.dropout_generator = torch.Generator().manual_seed(3)
    b, fb = m(x)
    assert torch.equal(a, b) and torch.equal(fa, fb)  # the generator's masks
    m.dropout = 0.0
    assert not torch.allclose(a, m(x)[0])  # it did drop


def test_training_with_dropout_reproduces_and_differs_from_without():
    pools = [np.arange(10), np.arange(10, 20)]

    def train(**over):
        eng, _ = make_engine(**over)
        return eng.fl_round(eng.init_state(0), [0, 1], pools, 0.05, seed=1, key=(0, 0))[0]

    a, b = train(**{"model.dropout": "0.5"}), train(**{"model.dropout": "0.5"})
    c = train()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.allclose(a["classifier.weight"], c["classifier.weight"])
    eng, _ = make_engine(**{"model.dropout": "0.5", "runtime.batch_clients": "on"})
    assert not eng.batches_clients()  # vmap cannot draw the keyed masks: one at a time


def test_mc_probs_are_the_classifier_over_dropped_features_by_hand():
    ctx, calls = fake_context()
    mc = mc_dropout_probs(ctx, 0.25)
    out = mc("global", 3, torch.Generator().manual_seed(7))
    feats, (w, b) = ctx.features("global"), ctx.head("global")
    gen = torch.Generator().manual_seed(7)
    for t in range(3):
        mask = torch.empty(feats.shape).bernoulli_(0.75, generator=gen)
        want = torch.softmax((feats * mask / 0.75) @ w.T + b, dim=1)
        assert torch.allclose(out[t], want, atol=1e-6)
    assert out.shape == (3, len(ctx.unlabeled), 5)
    assert not torch.allclose(out[0], out[1])  # the passes differ
    assert [m for m, _ in calls] == ["global"]  # the features were inferred once
    with pytest.raises(RuntimeError, match="model.dropout > 0"):
        mc_dropout_probs(ctx, 0.0)("global", 2, torch.Generator())
    assert "mc_probs" in PROVIDERS
