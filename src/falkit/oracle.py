"""Who answers label requests (DESIGN.md §2). Every oracle audits what it answers, so the
annotation budget is checked, not trusted.

* `SimulatedOracle` reveals the ground truth at once.
* `HumanOracle` asks people: it writes each client's queue (the queried sample ids and
  their images) under `runs/<name>/labeling/client_<k>/cycle_<c>/`, and answers only once
  every queued sample of that client has an answer from the labeling page
  (`falkit label`, falkit.labeling); until then `label` raises `LabelsPending`. An
  "unsure" answer returns the sample to the pool (label −1) and still counts as spent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from falkit.errors import FalkitError

UNSURE = -1  # the label an "unsure" answer gives: the sample stays unlabeled


class BudgetViolation(RuntimeError):
    """A query asked for more (or other) labels than the budget allows."""


class LabelsPending(FalkitError):
    """A client's queue is not fully answered yet."""

    def __init__(self, client: int, answered: int, total: int, folder: Path | str):
        super().__init__(f"client {client}: {answered} of {total} labels answered ({folder})")
        self.client, self.answered, self.total, self.folder = client, answered, total, folder


class WaitingForLabels(FalkitError):
    """The run stopped to wait for people to label the queued samples."""

    def __init__(self, pending: list[LabelsPending]):
        self.pending = pending
        clients = ", ".join(str(p.client) for p in pending)
        super().__init__(f"waiting for {self.left} labels (clients {clients})")

    @property
    def left(self) -> int:
        return sum(p.total - p.answered for p in self.pending)


class SimulatedOracle:
    def __init__(self, labels: np.ndarray):
        self._labels = np.asarray(labels)
        self._revealed = np.zeros(len(labels), dtype=bool)
        self.count = 0

    def label(self, client: int, indices: np.ndarray, cycle: int = 0) -> np.ndarray:
        idx = self._check(client, indices)
        self._revealed[idx] = True
        self.count += len(idx)
        return self._labels[idx].copy()

    def _check(self, client: int, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        if len(np.unique(idx)) != len(idx):
            raise BudgetViolation(f"client {client} asked for the same sample twice")
        if self._revealed[idx].any():
            raise BudgetViolation(f"client {client} asked for labels it already has")
        return idx

    def restore(self, revealed: np.ndarray, spent: int = 0,
                labels: np.ndarray | None = None) -> None:
        """Resume: mark labels revealed before the checkpoint (`spent`: answers that gave
        no label, "unsure", also counted against the budget; `labels`: what they were —
        the simulated oracle knows them anyway)."""
        self._revealed[:] = False
        self._revealed[np.asarray(revealed, dtype=np.int64)] = True
        self.count = int(self._revealed.sum()) + spent

    def unsure_before(self, cycle: int) -> int:
        """"unsure" answers up to `cycle` (none: the simulated oracle always knows)."""
        return 0

    def answers(self, indices: np.ndarray) -> np.ndarray:
        """The labels this oracle gave for `indices` (revealed ones only are meaningful)."""
        return self._labels[np.asarray(indices, dtype=np.int64)].copy()

    def audit(self, expected: int) -> None:
        if self.count != expected:
            raise BudgetViolation(f"the oracle revealed {self.count} labels, the budget "
                                  f"allows {expected}")


class HumanOracle(SimulatedOracle):
    """Labels from people, through per-client queues on disk (falkit.labeling)."""

    def __init__(self, root: Path, images, classes: list[str], num_samples: int):
        super().__init__(np.full(num_samples, UNSURE, dtype=np.int64))
        self.root, self.images, self.classes = Path(root), images, list(classes)

    def label(self, client: int, indices: np.ndarray, cycle: int = 0) -> np.ndarray:
        from falkit import labeling

        idx = self._check(client, indices)
        folder = labeling.queue_folder(self.root, client, cycle)
        # read and closed in one step: the labels used are the labels on disk
        answers = labeling.take(folder, client, cycle, idx, self.images, self.classes)
        if len(answers) < len(idx):
            raise LabelsPending(client, len(answers), len(idx), folder)
        labels = np.array([answers[int(i)] for i in idx], dtype=np.int64)
        self._revealed[idx[labels != UNSURE]] = True
        self._labels[idx] = labels
        self.count += len(idx)
        return labels

    def restore(self, revealed: np.ndarray, spent: int = 0,
                labels: np.ndarray | None = None) -> None:
        """Resume: the labels of the revealed samples as the checkpoint saved them (older
        checkpoints: as the answers on disk give them)."""
        from falkit import labeling

        if labels is not None:
            self._labels[np.asarray(revealed, dtype=np.int64)] = labels
        else:
            for i, label in labeling.all_answers(self.root).items():
                if 0 <= i < len(self._labels):
                    self._labels[i] = label
        super().restore(revealed, spent, labels)

    def unsure_before(self, cycle: int) -> int:
        """"unsure" answers of the cycles up to `cycle` (they count as spent on resume)."""
        from falkit import labeling

        return labeling.count_unsure(self.root, cycle)
