"""Core-Set (Sener & Savarese 2018): greedy k-center on the query model's features with the
client's labeled points as the initial centers (ALGORITHMS.md §4)."""

from __future__ import annotations

import numpy as np

from falkit.al.base import QueryContext, Strategy, register
from falkit.al.primitives import kcenter_greedy


@register
class Coreset(Strategy):
    name = "coreset"
    description = "greedy k-center on features, labeled points as initial centers"
    uses_selector = True

    def select(self, ctx: QueryContext, budget: int) -> np.ndarray:
        fu = ctx.features(self.query_model, "unlabeled")
        fl = ctx.features(self.query_model, "labeled")
        return kcenter_greedy(fu, budget, centers=fl)
