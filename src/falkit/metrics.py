"""Test-set metrics beyond accuracy, in NumPy alone (the engine imports this; scikit-learn
and SciPy would cost every run their import time).

AUC is MedMNIST's (Yang et al., MedMNIST v2, Sci. Data 2023; ``medmnist/evaluator.py``,
``getAUC``): for a binary task the ROC AUC of the positive class's score, for a multi-class
(and ordinal) task the mean over classes of the one-vs-rest ROC AUC of that class's score.
(With softmax scores the two agree up to rounding on binary tasks, as AUC(y=0, 1-s) =
AUC(y=1, s); :func:`macro_auc` still takes the binary formula for two classes.)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def roc_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of `score` for the boolean labels `positive` (Mann–Whitney U / (n₊·n₋), ties
    counted half, as scikit-learn's ``roc_auc_score``); NaN when one side is empty."""
    positive = np.asarray(positive, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # average ranks (1-based) with ties sharing the mean of their positions
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mean_rank = ends - (counts - 1) / 2.0
    ranks = mean_rank[inverse]
    u = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """MedMNIST's AUC: for two classes the ROC AUC of class 1's score; otherwise the mean
    one-vs-rest ROC AUC over the classes (columns of `probs`) that have both positive and
    negative test samples (MedMNIST's own code fails on a class without). NaN if none has."""
    labels = np.asarray(labels)
    probs = np.asarray(probs)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probs must be N×C for {len(labels)} labels, got {probs.shape}")
    if probs.shape[1] == 2:  # binary-class: the positive (last) class's score
        return roc_auc(labels == 1, probs[:, 1])
    aucs = [roc_auc(labels == c, probs[:, c]) for c in range(probs.shape[1])]
    aucs = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


class Evaluation(NamedTuple):
    """A model's test-set result: what metrics.csv records of it."""

    accuracy: float
    per_class: np.ndarray  # accuracy per class; NaN for a class without test samples
    auc: float  # macro_auc; NaN if no class has both positive and negative test samples
    samples: int = 0  # test samples evaluated on (on Flower: the live sites' test data)


def evaluation(labels: np.ndarray, probs: np.ndarray, num_classes: int) -> Evaluation:
    """Accuracy, per-class accuracy and AUC of softmax `probs` (N×C) against `labels`."""
    labels = np.asarray(labels, dtype=np.int64)
    correct = np.asarray(probs).argmax(1) == labels if len(labels) else np.zeros(0, bool)
    hits = np.bincount(labels[correct], minlength=num_classes)
    total = np.bincount(labels, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(total > 0, hits / np.maximum(total, 1), np.nan)
    acc = float(correct.mean()) if len(labels) else float("nan")
    return Evaluation(acc, per_class, macro_auc(labels, probs), len(labels))
