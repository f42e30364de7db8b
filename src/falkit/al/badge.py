"""BADGE (Ash et al. 2020): k-means++ seeding on gradient embeddings (ALGORITHMS.md §4)."""

from __future__ import annotations

import numpy as np

from falkit.al.base import QueryContext, Strategy, register
from falkit.al.primitives import RankOneRows, grad_embedding_factors, kmeanspp_seeding


@register
class Badge(Strategy):
    name = "badge"
    description = "k-means++ seeding on last-layer gradient embeddings"
    uses_selector = True

    def select(self, ctx: QueryContext, budget: int) -> np.ndarray:
        # the gradient embeddings as their rank-one factors: O(N·(C + D)) per draw, not C·D
        probs, feats = ctx.outputs(self.query_model, "unlabeled")
        emb = RankOneRows(*grad_embedding_factors(feats, probs))
        return kmeanspp_seeding(emb, budget, ctx.rng)
