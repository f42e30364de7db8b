"""KAFAL's KCFU training (option kafal.kcfu): hand-computed losses, finite gradients with absent
classes, the Beta(2,2) draw, no distillation in a cycle's first round, and a run that uses it."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.test_engine import make_engine

from falkit import config
from falkit.al.kafal import (
    ABSENT_LOGIT,
    beta22,
    inverse_frequency_weights,
    kcfu_loss,
    kcfu_objectives,
    log_count_prior,
)
from falkit.loop import run


def test_log_count_prior_is_finite_for_absent_classes():
    prior = log_count_prior(np.array([3, 0, 1]))
    assert prior.tolist() == pytest.approx([math.log(3), ABSENT_LOGIT, 0.0])


def test_logit_adjusted_ce_by_hand():
    # zero logits + log counts (3, absent, 1): softmax = (3/4, 0, 1/4)
    logits = torch.zeros(2, 3, requires_grad=True)
    y = torch.tensor([0, 2])
    loss = kcfu_loss(logits, y, log_count_prior(np.array([3, 0, 1])))
    assert loss.item() == pytest.approx(-(math.log(0.75) + math.log(0.25)) / 2, rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[:, 1].abs().max() < 1e-6  # an absent class gets no gradient


def test_inverse_frequency_weights_sum_one_absent_zero():
    w = inverse_frequency_weights(np.array([0, 1, 3]))
    # 1/1 and 1/3, normalised to sum 1: 3/4 and 1/4; the absent class weighs 0
    assert w.tolist() == pytest.approx([0.0, 0.75, 0.25])
    assert inverse_frequency_weights(np.array([0, 0])).tolist() == [0.0, 0.0]


def test_distillation_term_by_hand():
    logits = torch.zeros(1, 2)
    y = torch.tensor([0])
    prior = torch.zeros(2)
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # p_g = (3/4, 1/4), pseudo-label 0
    student = torch.zeros(1, 2)  # p_l = (1/2, 1/2)
    weights = torch.tensor([0.8, 0.2])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    got = kcfu_loss(logits, y, prior, student, teacher, weights)
    assert got.item() == pytest.approx(math.log(2) + 0.8 * kl / 2, rel=1e-6)  # KL / C
    # the same model as teacher and student: no distillation loss
    same = kcfu_loss(logits, y, prior, teacher, teacher, weights)
    assert same.item() == pytest.approx(math.log(2), rel=1e-6)


def test_beta22_moments():
    g = torch.Generator().manual_seed(0)
    draws = np.array([beta22(g) for _ in range(20000)])
    assert 0 < draws.min() and draws.max() < 1
    assert draws.mean() == pytest.approx(0.5, abs=0.01)
    assert draws.var() == pytest.approx(0.05, abs=0.003)  # Beta(2,2): 4 / (16 * 5)
    many = beta22(g, 20000).numpy()  # one λ per sample, as KCFU mixes
    assert many.shape == (20000,) and many.var() == pytest.approx(0.05, abs=0.003)


def test_first_round_is_logit_adjusted_ce_only_later_rounds_distill():
    eng, _ = make_engine()
    labels = eng.train_y.numpy()
    labeled = [np.arange(0, 8)]
    pools = [np.arange(0, 40)]
    state = {k: v.clone() for k, v in eng.model.state_dict().items()}
    xb = eng._inputs(eng.train_x[:8])
    yb = eng.train_y[:8]
    logits, _ = eng.model(xb)
    prior = log_count_prior(np.bincount(labels[:8], minlength=4))

    first = kcfu_objectives(eng, state, labeled, labels, pools, distill=False)(0)
    gen = torch.Generator().manual_seed(1)
    before = gen.get_state().clone()
    assert first(eng.model, xb, logits, yb, gen).item() == pytest.approx(
        F.cross_entropy(logits + prior, yb).item(), rel=1e-6)
    assert torch.equal(gen.get_state(), before)  # no unlabeled batch was drawn

    later = kcfu_objectives(eng, state, labeled, labels, pools, distill=True)(0)
    loss = later(eng.model, xb, logits, yb, gen)
    assert not torch.equal(gen.get_state(), before)  # it drew the unlabeled mixup
    assert torch.isfinite(loss) and loss.item() >= F.cross_entropy(logits + prior, yb).item() - 1e-6


def test_kafal_with_kcfu_runs_and_trains_differently(tmp_path):
    base = {"data.dataset": "digits", "model.backbone": "resnet8_preact16", "strategy": "kafal",
            "partition.num_clients": "3", "budget.cycles": "2", "fl.rounds": "2",
            "out_dir": str(tmp_path)}
    plain = run(config.load(None, preset="quick", overrides=base))
    kcfu = run(config.load(None, preset="quick", overrides={**base, "kafal.kcfu": "true"}))
    assert plain.run_dir != kcfu.run_dir
    assert [m["cycle"] for m in kcfu.metrics] == [0, 1]
    assert "kcfu = true" in (kcfu.run_dir / "config.toml").read_text()
    # the clients trained with logit-adjusted CE (+ KD from round 2): another global model
    a, b = (torch.load(r.run_dir / "checkpoint" / "latest.pt", weights_only=False)
            ["global_state"] for r in (plain, kcfu))
    assert not torch.equal(a["classifier.weight"], b["classifier.weight"])
    assert all(torch.isfinite(v.float()).all() for v in b.values())


def test_kcfu_weights_mixed_by_lambda_as_kafal_main_py():
    """KAFAL main.py: w_i = β_i w[ŷ_i] + (1 − β_i) w[ŷ_j], j the batch's one shared partner
    (a scalar np.random.choice); `pseudo` keeps w[ŷ_i] alone."""
    logits, y, prior = torch.zeros(2, 2), torch.tensor([0, 1]), torch.zeros(2)
    teacher = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]])  # ŷ = 0, 1
    student = torch.zeros(2, 2)
    weights = torch.tensor([0.8, 0.2])
    kl = (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)) / 2  # both rows
    lam = torch.tensor([0.6, 0.3])
    partner = torch.tensor([1, 1])  # the shared partner: row 1 (ŷ = 1)
    ce = math.log(2)
    mixed = kcfu_loss(logits, y, prior, student, teacher, weights, lam, partner)
    w0, w1 = 0.6 * 0.8 + 0.4 * 0.2, 0.3 * 0.2 + 0.7 * 0.2
    assert mixed.item() == pytest.approx(ce + (w0 + w1) / 2 * kl, rel=1e-6)
    alone = kcfu_loss(logits, y, prior, student, teacher, weights)
    assert alone.item() == pytest.approx(ce + (0.8 + 0.2) / 2 * kl, rel=1e-6)
    from falkit import config
    from falkit.al.base import create

    for preset in (None, "reference"):
        cfg = config.load(None, preset=preset, overrides={"strategy": "kafal"})
        s = create(cfg.strategy, **config.strategy_options(cfg))
        assert (s.mix_partner, s.mix_weights) == ("shared", "mixed")
    with pytest.raises(config.ConfigError, match="kafal.mix_partner"):
        config.load(None, overrides={"kafal.mix_partner": "random"})
