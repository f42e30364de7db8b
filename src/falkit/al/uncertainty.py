"""Random sampling and the classic uncertainty strategies (ALGORITHMS.md §4)."""

from __future__ import annotations

import numpy as np

from falkit.al.base import QueryContext, Strategy, register
from falkit.al.primitives import entropy, margin, top_k


@register
class Random(Strategy):
    name = "random"
    description = "uniform random sample of the unlabeled pool"

    def select(self, ctx: QueryContext, budget: int) -> np.ndarray:
        return ctx.rng.choice(len(ctx.unlabeled), size=budget, replace=False)


@register
class Entropy(Strategy):
    name = "entropy"
    description = "top-b predictive entropy H(p) of the query model"
    uses_selector = True

    def select(self, ctx: QueryContext, budget: int) -> np.ndarray:
        return top_k(entropy(ctx.probs(self.query_model)), budget)


@register
class Margin(Strategy):
    name = "margin"
    description = "smallest gap p(1) - p(2) between the two most probable classes"
    uses_selector = True

    def select(self, ctx: QueryContext, budget: int) -> np.ndarray:
        return top_k(-margin(ctx.probs(self.query_model)), budget)


@register
class LeastConfidence(Strategy):
    name = "least_confidence"
    description = "smallest max_c p_c"
    uses_selector = True

    def select(self, ctx: QueryContext, budget: int) -> np.ndarray:
        return top_k(-ctx.probs(self.query_model).max(1).values, budget)
