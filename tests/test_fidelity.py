"""Issue 13: where the papers' text and the authors' code differ, both are named options, and
the presets say which one they take (hand-made inputs with known answers)."""

import numpy as np
import pytest
import torch
from tests.test_engine import make_engine

from falkit import config
from falkit.al.base import create
from falkit.cli import main
from falkit.client import local_mode
from falkit.fast import refinement_budgets
from falkit.fl.algorithms import client_weight


def _lrs_per_step(eng, monkeypatch):
    """Record the learning rate of every optimizer step the engine takes."""
    seen: list[float] = []
    make = eng._optimizer

    def spy(model, lr):
        opt = make(model, lr)
        step = opt.step

        def recording_step(*a, **k):
            seen.append(opt.param_groups[0]["lr"])
            return step(*a, **k)

        opt.step = recording_step
        return opt

    monkeypatch.setattr(eng, "_optimizer", spy)
    return seen


@pytest.mark.parametrize("lr_step, want", [
    # 40 samples, batch 8: 5 steps per epoch, 2 epochs; decay from 3 (epochs or steps)
    ("epoch", [0.1] * 10),  # decay_epoch 3 is never reached in 2 epochs
    ("batch", [0.1] * 3 + [0.01] * 7),  # the reference's per-batch scheduler
])
def test_scratch_lr_steps_per_epoch_or_per_batch(monkeypatch, lr_step, want):
    eng, _ = make_engine(hflip=False, **{"local_model.lr": "0.1", "local_model.epochs": "2",
                                         "local_model.decay_epoch": "3",
                                         "local_model.stop_accuracy": "1.0",
                                         "local_model.lr_step": lr_step})
    seen = _lrs_per_step(eng, monkeypatch)
    eng.train_scratch([(np.arange(40), (1, 0))], eng.train_y, seed=0)
    assert seen == pytest.approx(want)


def test_eval_stop_check_is_an_eval_mode_pass_over_the_samples():
    eng, _ = make_engine(hflip=False)
    model = eng.new_model(0)
    idx = np.arange(8)
    steps, acc = eng.local_sgd(model, idx, 300, 0.05, torch.Generator().manual_seed(0),
                               stop_accuracy=0.99, stop_on_eval=True)
    assert acc >= 0.99 and steps < 300
    # the accuracy it reports is the eval-mode accuracy of the returned model
    probs, _ = eng.predict({k: v.clone() for k, v in model.state_dict().items()}, idx)
    assert acc == pytest.approx(float((probs.argmax(1) == eng.train_y[idx]).float().mean()))


def test_eval_pass_draws_the_training_augmentation_like_the_reference():
    """The reference's early-stop pass iterates its training loader (random flips) with the
    model in eval mode: the pass sees the flips drawn from the same generator."""
    eng, _ = make_engine(hflip=True)
    model = eng.new_model(0)
    idx = torch.arange(40)
    acc = eng._accuracy(model, idx, eng.train_y, torch.Generator().manual_seed(3))
    assert model.training  # back in train mode
    x = eng._inputs(eng.train_x[idx])
    flipped = eng._augment(x, torch.Generator().manual_seed(3))
    assert not torch.equal(flipped, x)  # some samples are flipped
    model.eval()
    with torch.no_grad():
        want = float((model(flipped)[0].argmax(1) == eng.train_y[idx]).float().mean())
    assert acc == pytest.approx(want)


def test_local_steps_train_exactly_tau_steps():
    eng, _ = make_engine(hflip=False)
    steps, _ = eng.local_sgd(eng.new_model(0), np.arange(40), 5, 0.05,
                             torch.Generator().manual_seed(0), max_steps=7)
    assert steps == 7  # 5 batches per epoch: one epoch and two more steps
    eng.local_steps = 3
    client = eng.train_client(eng.model, eng.init_state(0), 0, np.arange(40), 0.05,
                              torch.Generator().manual_seed(0))
    assert client.steps == 3


def test_uniform_weighting_averages_clients_equally():
    eng, _ = make_engine(hflip=False, **{"fl.weighting": "uniform"})
    assert client_weight(eng.cfg, 30) == 1.0
    assert client_weight(config.load(None), 30) == 30.0
    pools = [np.arange(0, 8), np.arange(8, 40)]  # 8 and 32 labeled samples
    new, kept = eng.fl_round(eng.init_state(0), [0, 1], pools, 0.05, 0, (0, 0),
                             keep_states=True)
    name = next(n for n, p in eng.model.named_parameters() if p.requires_grad)
    assert torch.allclose(new[name], (kept[0][name] + kept[1][name]) / 2, atol=1e-6)


def test_fast_budget_split_even_or_proportional():
    assert refinement_budgets(0.05, [100, 300, 10], "proportional") == [5, 15, 1]
    # ceil(0.05 * 410) = 21 split evenly: 7 each
    assert refinement_budgets(0.05, [100, 300, 10], "even") == [7, 7, 7]
    # 22 = 7 + 1, 7 + 1, 6 ... each at most its pool
    assert refinement_budgets(0.05, [200, 220, 5], "even") == [8, 7, 5]


def test_logo_and_at_l_baselines_follow_local_model_mode():
    paper = config.load(None, overrides={"strategy": "entropy@L"})
    assert local_mode(paper, create("entropy@L")) == "last_round"  # the authors' code
    logo = config.load(None, overrides={"strategy": "logo", "local_model.mode": "scratch"})
    assert local_mode(logo, create("logo")) == "scratch"  # LoGo's own paper
    assert local_mode(paper, create("logo")) == "last_round"
    assert local_mode(paper, create("fairfal")) == "scratch"  # FairFAL's own rule


def test_reference_preset_turns_on_every_authors_code_choice():
    ref = config.load(None, preset="reference")
    assert (ref.fairfal.embedding_probs, ref.local_model.mode, ref.local_model.lr_step,
            ref.local_model.stop_check, ref.ifal.w1, ref.fast.scope, ref.fast.uncertainty,
            ref.fast.local_steps) == ("code", "last_round", "batch", "eval", "reference",
                                      "pooled", "norm", 0)
    paper = config.load(None)
    assert (paper.fairfal.embedding_probs, paper.local_model.lr_step,
            paper.local_model.stop_check, paper.fast.scope, paper.fast.local_steps,
            paper.fairfal.similarity) == ("paper", "epoch", "train", "client", 5, "cosine")
    both = config.load(None, preset="reference,quick")
    assert both.fl.rounds == 3 and both.local_model.lr_step == "batch"
    with pytest.raises(config.ConfigError, match="unknown preset 'fast'"):
        config.load(None, preset="quick,fast")


def test_config_command_prints_every_resolved_setting(capsys, tmp_path):
    assert main(["config", "configs/fmnist_lt.toml", "strategy=entropy@L"]) == 0
    text = capsys.readouterr().out
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    cfg = config.loads(body)  # every section, parseable as a config
    assert cfg.local_model.mode == "last_round" and cfg.strategy == "entropy@L"
    assert "[fairfal]" in text and "[fast]" in text and "[ifal]" in text
    assert main(["config", "--preset", "reference", f"out_dir={tmp_path / 'x'}"]) == 0
    assert 'lr_step = "batch"' in capsys.readouterr().out
    assert not (tmp_path / "x").exists()  # it runs nothing
    for bad in (["local_model.lr_step=weekly"], ["local_model.stop_check=never"],
                ["fairfal.similarity=l2"], ["fl.weighting=size"], ["fast.budget_split=x"],
                ["fast.local_steps=-1"], ["--preset", "paperish"]):
        assert main(["config", *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("falkit: error:"), bad
