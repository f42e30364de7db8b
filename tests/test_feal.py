"""FEAL (Chen et al., CVPR 2024; al/feal.py, one file): the evidential quantities and the
loss by hand (worked values: a 3-class Dirichlet), the calibration over a candidate pool,
the diversity relaxation and its shortfall fill; a run trains with the evidential loss.
The strategy contract, in process = Flower and the device rules are the suites' own tests
over every registered strategy."""

import numpy as np
import pytest
import torch

from falkit import config
from falkit.al import feal
from falkit.errors import ConfigError


def a(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_aleatoric_and_epistemic_of_known_dirichlets():
    # U_ale = Σ (α/S)(ψ(S+1) − ψ(α+1)); H[Dir] = ln B(α) + (S−C)ψ(S) − Σ(α−1)ψ(α)
    assert feal.aleatoric(a([2, 1, 1], [5, 1, 1], [1, 1, 1])).tolist() == pytest.approx(
        [0.833333, 0.676190, 0.833333], abs=1e-6)
    # Dir(1, 1, 1) is uniform on the simplex of area 1/2: its entropy is ln(1/2)
    assert feal.epistemic(a([2, 1, 1], [5, 1, 1], [1, 1, 1], [8, 1, 1])).tolist() == \
        pytest.approx([-0.958426, -1.934531, np.log(0.5), -2.623888], abs=1e-6)
    assert float(feal.kl_to_uniform(a([1, 1, 1]))[0]) == pytest.approx(0.0, abs=1e-12)


def test_calibration_over_a_pool():
    # logits f = α − 1: A global [2,1,1] local [5,1,1], B [1,1,1] both, C [8,1,1]/[9,1,1]
    g = a([1, 0, 0], [0, 0, 0], [7, 0, 0])
    loc = a([4, 0, 0], [0, 0, 0], [8, 0, 0])
    # Ũ_epi^g = [0.862603, 1, 0]; U = Ũ · (U_ale^g + U_ale^l)
    assert feal.calibrated(g, loc).tolist() == pytest.approx([1.302119, 1.666667, 0.0],
                                                             abs=1e-6)
    same = feal.calibrated(a([0, 0, 0], [0, 0, 0]), a([4, 0, 0], [0, 0, 0]))
    assert same.tolist() == pytest.approx([0.833333 + 0.676190, 2 * 0.833333], abs=1e-6)


def test_evidential_loss_by_hand_and_its_annealing():
    logits = torch.tensor([[1.0, 0.5, -0.5]], dtype=torch.float64)
    y = torch.tensor([0])
    prior = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    # α = [2, 1.5, 1], S = 4.5: (2 − 0.5)(ψ(4.5) − ψ(2)) = 1.449130; KL(Dir(1, 1.5, 1)) =
    # 0.095275; −(3/4.5)·1 = −0.666667; L = ce + 0.01 (λ kl + cor)
    got = [float(feal.edl_loss(logits, y, prior, t)) for t in (0, 5, 10, 40)]
    assert got == pytest.approx([1.442463, 1.442940, 1.443416, 1.443416], abs=1e-6)
    logits.requires_grad_(True)
    feal.edl_loss(logits, y, prior, 0).backward()
    assert logits.grad[0, 2] == 0  # a negative logit gives no evidence: no gradient


def test_relaxation_skips_a_neighbour_of_a_pick_and_fills_the_shortfall():
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])
    order = np.array([0, 1, 2, 3])
    assert feal.relaxation(order, feats, 2, 1, 0.85, "code").tolist() == [0, 2]
    # fewer than `neighbors` close candidates: always taken (the authors' rule)
    assert feal.relaxation(order, feats, 2, 5, 0.85, "code").tolist() == [0, 1]
    # a shortfall: the last not taken in candidate order (code) or the most uncertain
    assert feal.relaxation(order, feats, 3, 1, 0.85, "code").tolist() == [0, 2, 3]
    assert feal.relaxation(order, feats, 3, 1, 0.85, "uncertainty").tolist() == [0, 2, 1]


def test_options_and_a_run_with_the_evidential_loss(tmp_path):
    from tests.test_transports import SMALL

    from falkit.loop import run

    with pytest.raises(ConfigError, match="feal.fill"):
        config.load(None, overrides={"strategy": "feal", "feal.fill": "random"})
    cfg = config.load(None, overrides={**SMALL, "strategy": "feal", "feal.neighbors": "3",
                                       "out_dir": str(tmp_path)})
    assert cfg.feal.neighbors == 3
    res = run(cfg)
    assert len(res.metrics) == 2 and 0 < res.metrics[-1]["accuracy"] <= 1
    rand = run(config.load(None, overrides={**SMALL, "strategy": "random",
                                            "out_dir": str(tmp_path)}))
    # the same cycle-0 labels; the evidential loss trains another model than CE
    assert res.metrics[0]["auc"] != rand.metrics[0]["auc"]
