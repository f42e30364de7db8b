"""LoGo (Kim et al., "Re-thinking Federated Active Learning based on Inter-class Diversity",
CVPR 2023), as ALGORITHMS.md §4 **logo** specifies.

Macro step (local-only model, `scratch`: trained on L_k alone): cluster the unlabeled pool
into b groups with k-means on e(x) = f_l(x) · (1 − max_c p_l(x)) — the ŷ-block of the BADGE
gradient embedding (the reference's `get_grad_embedding_maxInd`), i.e. local features scaled
by local uncertainty. Micro step (global model): from each cluster take the member with the
highest predictive entropy under the global model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from falkit.al.base import QueryContext, Strategy, register
from falkit.al.primitives import as_numpy, entropy
from falkit.options import Options, option


def logo_embedding(feats_local: torch.Tensor, probs_local: torch.Tensor) -> np.ndarray:
    """e(x) = f_l(x) · (1 − max p_l(x)) (LoGo macro step), as float32 for KMeans (sklearn
    keeps float32 input in float32, half the cost of float64)."""
    scale = 1.0 - probs_local.float().max(1).values
    return as_numpy(feats_local.float() * scale.unsqueeze(1)).astype(np.float32, copy=False)


def cluster_round_robin(labels: np.ndarray, uncertainty: np.ndarray, budget: int) -> np.ndarray:
    """LoGo micro step plus shortfall fill. Round r takes the r-th most uncertain member of
    every cluster (round 0 = one pick per cluster: its most uncertain member); within a round
    the more uncertain pick comes first, ties by position; the first `budget` picks are kept.

    When k-means yields as many clusters as the budget this is exactly "the most uncertain
    member of each cluster". With fewer clusters (duplicate points), the next-most-uncertain
    members are added round-robin. (The reference code filled in chunks per cluster and then
    truncated an unordered set; here the order, and so the truncation, is deterministic.)
    Vectorised: one lexsort, no loop over the pool."""
    n = len(labels)
    pos = np.arange(n)
    unc = np.asarray(uncertainty, dtype=np.float64)
    # sort by cluster, then uncertainty descending, then position
    order = np.lexsort((pos, -unc, labels))
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, n]))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - group_start  # rank of each point within its cluster
    final = np.lexsort((pos, -unc, rank))  # round first, then uncertainty, then position
    return final[:budget]


@dataclass
class LoGoConfig(Options):
    """[logo] LoGo (ALGORITHMS.md §4 logo)."""

    n_init: int = option(10, low=1)  # k-means restarts of the macro step


@register
class LoGo(Strategy):
    """LoGo (Kim et al., CVPR 2023): k-means (b clusters) on the local-only model's
    uncertainty-scaled features, then the globally most uncertain (entropy) member of each
    cluster; a shortfall (fewer distinct clusters than b) is filled round-robin."""

    name = "logo"
    options = LoGoConfig  # its section [logo]
    description = "LoGo: k-means on local-model embeddings, top global entropy per cluster"
    uses_selector = False  # a fixed design: local model clusters, global model picks
    # local_model.mode: scratch in LoGo's own paper, last_round in the FairFAL authors'
    # comparison code (the default; docs/guide/running.md "Fidelity")
    local_model_mode = None

    def __init__(self, at: str | None = None, *, n_init: int = 10, **options: object):
        super().__init__(at, **options)
        self.n_init = int(n_init)

    @property
    def needs_local_model(self) -> bool:
        return True  # the macro step clusters with the local-only model

    def select(self, ctx: QueryContext, budget: int) -> np.ndarray:
        emb = logo_embedding(ctx.features("local", "unlabeled"), ctx.probs("local", "unlabeled"))
        unc = as_numpy(entropy(ctx.probs("global", "unlabeled")))
        k = min(budget, len(emb))
        seed = int(ctx.rng.integers(0, 2**31 - 1))  # sklearn's seed drawn from ctx.rng only
        # lazily: scikit-learn takes seconds to import, and every strategy module is
        # imported by each Flower ClientApp message's process
        from sklearn.cluster import KMeans
        from sklearn.exceptions import ConvergenceWarning

        km = KMeans(n_clusters=k, init="k-means++", n_init=self.n_init, random_state=seed)
        with warnings.catch_warnings():
            # duplicate points: sklearn warns that it found fewer distinct clusters than
            # n_clusters; that case is expected and handled by the round-robin fill
            warnings.simplefilter("ignore", ConvergenceWarning)
            labels = km.fit_predict(emb)
        picks = cluster_round_robin(labels, unc, budget)
        self._diag = {"clusters": int(len(np.unique(labels))), "kmeans_seed": seed,
                      "kmeans_inertia": float(km.inertia_)}
        return picks
