"""BADGE (Ash et al. 2020): k-means++ seeding on gradient embeddings (ALGORITHMS.md §4)."""

from __future__ import annotations

import numpy as np

from falkit.al.base import QueryContext, Strategy, register
from falkit.al.primitives import kmeanspp_seeding


@register
class Badge(Strategy):
    name = "badge"
    description = "k-means++ seeding on last-layer gradient embeddings"
    uses_selector = True

    def select(self, ctx: QueryContext, budget: int) -> np.ndarray:
        return kmeanspp_seeding(ctx.grad_embeddings(self.query_model), budget, ctx.rng)
