"""Information density (Settles & Craven, "An Analysis of Active Learning Strategies for
Sequence Labeling Tasks", EMNLP 2008, Eq. 1 there for sequences; the same form for
classification): a sample's uncertainty weighted by how representative it is of the
unlabeled pool,

    score(x) = H(p(y|x)) · ( (1/|U|) Σ_{u∈U} cos(z_x, z_u) )^β,

with H the predictive entropy of the query model and z its penultimate features. The
top-b scores are queried."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from falkit.al.base import QueryContext, Strategy
from falkit.al.primitives import as_numpy, entropy, top_k
from falkit.options import Options, option


@dataclass
class DensityOptions(Options):
    """[density]"""

    beta: float = option(1.0, low=0)  # β: the weight of density against uncertainty


class InformationDensity(Strategy):
    """Entropy × mean cosine similarity to the unlabeled pool, to the power β."""

    name = "density"
    description = "information density: entropy x (mean cosine similarity to the pool)^beta"
    uses_selector = True
    options = DensityOptions

    def __init__(self, at: str | None = None, *, beta: float = 1.0, **options: object):
        super().__init__(at, **options)
        self.beta = float(beta)

    def select(self, ctx: QueryContext, budget: int) -> np.ndarray:
        probs, feats = ctx.outputs(self.query_model, "unlabeled")
        z = torch.nn.functional.normalize(feats.double(), dim=1)
        # mean cosine similarity to the pool: z · mean(z), one matrix-vector product
        density = (z @ z.mean(0)).clamp_min(0.0)
        score = entropy(probs.double()) * density ** self.beta
        picks = top_k(score, budget)
        self._diag = {"density_mean_selected": round(float(as_numpy(density)[picks].mean()),
                                                     6)}
        return picks
