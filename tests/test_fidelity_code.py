"""Issue 25: the protocol, FAST and the baselines as the papers and the authors' code do them;
each choice a named option, `paper` and `reference` set as the README's fidelity table says
(hand-made inputs with known answers)."""

import numpy as np
import pytest
import torch

from falkit import config
from falkit.driver import lr_at


def test_lr_decay_paper_75_25_and_code_76_24():
    """FairFAL: lr x 0.1 after 75 % of 100 rounds; the authors' util/misc.py decays for
    `r > 75` with r from 0, so round 75 (the 76th) still trains at 0.01."""
    paper = config.load(None).fl
    code = config.load(None, overrides={"fl.lr_decay_rule": "code"}).fl
    lrs_paper = [lr_at(paper, r) for r in range(100)]
    lrs_code = [lr_at(code, r) for r in range(100)]
    assert lrs_paper == pytest.approx([0.01] * 75 + [0.001] * 25)
    assert lrs_code == pytest.approx([0.01] * 76 + [0.001] * 24)
    assert config.load(None, preset="reference").fl.lr_decay_rule == "code"
    # quick's 3 rounds: int(0.75 * 3) = 2; paper decays the last round, code none
    q = config.load(None, preset="quick").fl
    qc = config.load(None, preset="reference,quick").fl
    assert [lr_at(q, r) for r in range(3)] == pytest.approx([0.05, 0.05, 0.005])
    assert [lr_at(qc, r) for r in range(3)] == pytest.approx([0.05, 0.05, 0.05])
