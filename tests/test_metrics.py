"""AUC as MedMNIST computes it (scikit-learn's roc_auc_score), here in NumPy alone."""

from __future__ import annotations

import numpy as np
import pytest

from falkit.metrics import evaluation, macro_auc, roc_auc


def test_roc_auc_by_hand() -> None:
    # positives 0.8, 0.4; negatives 0.6, 0.4, 0.1: pairs won 1+1+1 (0.8) + 0+0.5+1 (0.4)
    pos = np.array([1, 0, 1, 0, 0], bool)
    score = np.array([0.8, 0.6, 0.4, 0.4, 0.1])
    assert roc_auc(pos, score) == pytest.approx(4.5 / 6)
    assert roc_auc(pos, -score) == pytest.approx(1.5 / 6)
    assert np.isnan(roc_auc(np.ones(3, bool), np.arange(3.0)))


def test_macro_auc_matches_scikit_learn() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for classes in (2, 3, 7):
        y = rng.integers(0, classes, 300)
        logits = rng.normal(size=(300, classes)) + 1.5 * np.eye(classes)[y]
        logits = np.round(logits, 1)  # ties
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        if classes == 2:  # MedMNIST's binary AUC: the positive class's score
            want = roc_auc_score(y, probs[:, 1])
        else:  # MedMNIST's multi-class AUC: the mean one-vs-rest AUC
            want = np.mean([roc_auc_score(y == c, probs[:, c]) for c in range(classes)])
        assert macro_auc(y, probs) == pytest.approx(want, abs=1e-12)


def test_evaluation_counts_and_missing_classes() -> None:
    y = np.array([0, 0, 1, 1, 1])
    probs = np.array([[.9, .1, 0], [.2, .8, 0], [.3, .7, 0], [.6, .4, 0], [.1, .9, 0]])
    ev = evaluation(y, probs, 3)
    assert ev.accuracy == pytest.approx(3 / 5)
    assert ev.per_class[:2].tolist() == [0.5, pytest.approx(2 / 3)] and np.isnan(ev.per_class[2])
    # class 2 has no positives: left out of the mean. Class 0: .9 beats the 3 negatives
    # (.3 .6 .1), .2 beats 1 -> 4/6; class 1: .7 and .4 beat .1, .9 beats .1 and .8 -> 4/6
    assert ev.auc == pytest.approx(4 / 6)
    probs[:, 2] = [.0, .0, .0, .0, 1.0]  # now class 2 has a top score, still no positives
    assert evaluation(y, probs, 3).auc == pytest.approx(4 / 6)
