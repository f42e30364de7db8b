"""Who answers label requests. SimulatedOracle reveals ground truth and audits every label
it reveals, so the annotation budget is checked, not trusted (DESIGN.md §2)."""

from __future__ import annotations

import numpy as np


class BudgetViolation(RuntimeError):
    """A query asked for more (or other) labels than the budget allows."""


class SimulatedOracle:
    def __init__(self, labels: np.ndarray):
        self._labels = np.asarray(labels)
        self._revealed = np.zeros(len(labels), dtype=bool)
        self.count = 0

    def label(self, client: int, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        if len(np.unique(idx)) != len(idx):
            raise BudgetViolation(f"client {client} asked for the same sample twice")
        if self._revealed[idx].any():
            raise BudgetViolation(f"client {client} asked for labels it already has")
        self._revealed[idx] = True
        self.count += len(idx)
        return self._labels[idx].copy()

    def restore(self, revealed: np.ndarray) -> None:
        """Resume: mark labels revealed before the checkpoint."""
        self._revealed[:] = False
        self._revealed[np.asarray(revealed, dtype=np.int64)] = True
        self.count = int(self._revealed.sum())

    def audit(self, expected: int) -> None:
        if self.count != expected:
            raise BudgetViolation(f"the oracle revealed {self.count} labels, the budget "
                                  f"allows {expected}")
