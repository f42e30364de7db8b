"""FairFAL (Zong & Huang, "Federated Active Learning Under Extreme Non-IID and Global Class
Imbalance"), exactly as ALGORITHMS.md §5 specifies; equation numbers refer to the paper
(γ_k Eq. 4, d_k Eq. 5, s_k with γ̄ Eq. 6, the model rule Eq. 7).

Phase A (every client, `client_stats`): the class-balanced labeled set B_k, the global
model's imbalance γ_k (the only value that leaves the client) and the global/local
discrepancy d_k. The server averages γ̄ once, in the first query cycle, and freezes it.
Phase B (`select`): adaptive query-model choice, prototype pseudo-labels, class quotas,
stage-1 uncertainty filter, stage-2 k-center on global gradient embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from falkit.al.base import PhaseA, QueryContext, Strategy, register
from falkit.al.primitives import (
    as_numpy,
    class_quotas,
    entropy,
    grad_embeddings,
    kcenter_greedy,
    margin,
    top_k,
)
from falkit.errors import ConfigError
from falkit.options import Options, option


def balanced_rows(labels: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Positions forming B_k: every class present in `labels` upsampled with replacement to
    the largest class count (ALGORITHMS.md §5 phase A)."""
    classes, counts = np.unique(labels, return_counts=True)
    m = counts.max()
    rows = []
    for c, n in zip(classes, counts, strict=True):
        idx = np.flatnonzero(labels == c)
        extra = rng.choice(idx, size=m - n, replace=True) if m > n else idx[:0]
        rows.append(np.concatenate([idx, extra]))
    return torch.as_tensor(np.concatenate(rows))


def imbalance_ratio(pi_g: torch.Tensor, present: np.ndarray) -> float:
    """γ_k = min_{c ∈ C_k⁺} π̂_g,c / max_{c ∈ C_k⁺} π̂_g,c; 1.0 with one class (FairFAL Eq. 4)."""
    if len(present) <= 1:
        return 1.0
    v = pi_g[torch.as_tensor(present)]
    return float(v.min() / v.max()) if float(v.max()) > 0 else 1.0


def discrepancy(pi_g: torch.Tensor, pi_l: torch.Tensor) -> float:
    """d_k = (1/C) Σ_c |π̂_g,c − π̂_l,c| / (π̂_g,c + π̂_l,c) over all C classes, a term with a
    zero denominator counting 0 (FairFAL Eq. 5)."""
    num = (pi_g - pi_l).abs().double()
    den = (pi_g + pi_l).double()
    terms = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return float(terms.mean())


def uncertainty(probs: torch.Tensor, kind: str) -> torch.Tensor:
    """Higher = more uncertain. entropy: H(p)/log C (FairFAL's normalised entropy of stage 1)."""
    if kind == "entropy":
        return entropy(probs) / math.log(probs.shape[1])
    if kind == "margin":
        return 1.0 - margin(probs)
    return 1.0 - probs.max(1).values  # least_confidence


def prototype_pseudo_labels(feat_l: torch.Tensor, labels_l: np.ndarray,
                            feat_u: torch.Tensor, similarity: str = "cosine") -> np.ndarray:
    """ŷ(x) = argmax_{c ∈ C_k⁺} cos(z(x), μ_c) with z = f/‖f‖ and μ_c the mean z of the
    labeled samples of class c, re-normalised (the paper calls the score cosine similarity
    and the authors' code normalises the prototypes); `similarity = "dot"` keeps the plain
    mean, ⟨z, μ_c⟩, which favours classes with few labels. Classes without local labels
    cannot be pseudo-labels (FairFAL's prototype-guided pseudo-labeling)."""
    z_l = torch.nn.functional.normalize(feat_l.double(), dim=1)
    z_u = torch.nn.functional.normalize(feat_u.double(), dim=1)
    present = np.unique(labels_l)
    protos = torch.stack([z_l[torch.as_tensor(labels_l == c)].mean(0) for c in present])
    if similarity == "cosine":
        protos = torch.nn.functional.normalize(protos, dim=1)
    return present[as_numpy((z_u @ protos.T).argmax(1))]


@dataclass
class FairFALConfig(Options):
    """[fairfal] (ALGORITHMS.md §5): defaults are the paper's; the ablation switches of its
    Table 2 and appendix, and the reference code's choice as `embedding_probs = "code"`."""

    # which model scores a client: adaptive (FairFAL Eq. 6) | complement | global | local
    selector: str = option("adaptive", choices=("adaptive", "complement", "global", "local"))
    # off = plain top-b uncertainty of the chosen model
    classwise: bool = True
    # global | local features for the prototype pseudo-labels
    prototypes: str = option("global", choices=("global", "local"))
    # stage-1 pool = floor(kappa * q_c) most uncertain; 0 = one stage
    kappa: float = 4.0
    delta: float = option(0.75, low=0, high=1)  # global model iff s_k > delta
    # the uncertainty score of stage 1
    uncertainty: str = option("entropy", choices=("entropy", "margin", "least_confidence"))
    # paper: global probs | code: global iff gamma_bar < 0.5
    embedding_probs: str = option("paper", choices=("paper", "code"))
    # prototype pseudo-labels: cosine = cos(z, mu_c) with normalised prototypes (the paper's
    # text and the authors' code) | dot = <z, mu_c> with mu_c the plain mean of unit vectors
    similarity: str = option("cosine", choices=("cosine", "dot"))

    def check(self, cfg: Any) -> None:
        if self.kappa != 0 and self.kappa < 1:
            # stage 1 keeps floor(kappa * q_c) candidates: fewer than q_c when kappa < 1
            raise ConfigError(f"fairfal.kappa must be 0 (one stage) or >= 1, got "
                              f"{self.kappa:g}")


@register
class FairFAL(Strategy):
    name = "fairfal"
    options = FairFALConfig  # its section [fairfal]
    description = "FairFAL: adaptive global/local model, prototype quotas, 2-stage sampling"
    local_model_mode = "scratch"
    server_stats = ("gamma",)  # γ_k, the only value that leaves a client

    def __init__(self, at: str | None = None, *, selector: str = "adaptive",
                 classwise: bool = True, prototypes: str = "global", kappa: float = 4.0,
                 delta: float = 0.75, uncertainty: str = "entropy",
                 embedding_probs: str = "paper", similarity: str = "cosine",
                 **options: object):
        super().__init__(at, **options)
        self.mode = selector  # the model-choice rule (config fairfal.selector)
        self.classwise, self.prototypes = classwise, prototypes
        self.kappa, self.delta = float(kappa), float(delta)
        self.uncertainty_kind, self.embedding_probs = uncertainty, embedding_probs
        self.similarity = similarity
        self.gamma_bar: float | None = None

    @property
    def needs_local_model(self) -> bool:
        return True  # d_k compares the global and the local model every cycle

    # -- phase A: client statistics, server reduce ------------------------------------------
    def client_stats(self, ctx: QueryContext) -> PhaseA:
        # one draw of B_k serves both models, so d_k compares them on the same samples
        rows = balanced_rows(ctx.labeled_y, ctx.rng)
        pi_g = ctx.probs("global", "labeled")[rows].mean(0)
        pi_l = ctx.probs("local", "labeled")[rows].mean(0)
        present = np.unique(ctx.labeled_y)
        kept = {"gamma": imbalance_ratio(pi_g, present), "d": discrepancy(pi_g, pi_l)}
        if self.gamma_bar is not None:
            # γ̄ is frozen after the first query cycle: nothing leaves the client
            return PhaseA(stats={}, kept=kept)
        return PhaseA(stats={"gamma": kept["gamma"]}, kept=kept)

    def server_reduce(self, stats: list[dict[str, float]]) -> dict[str, float]:
        if self.gamma_bar is None:
            self.gamma_bar = float(np.mean([s["gamma"] for s in stats]))  # γ̄ of FairFAL Eq. 6
        return {"gamma_bar": self.gamma_bar}

    def state_dict(self) -> dict[str, object]:
        return {"gamma_bar": self.gamma_bar}

    def load_state_dict(self, state: dict[str, object]) -> None:
        g = state.get("gamma_bar")
        self.gamma_bar = None if g is None else float(g)

    # -- phase B: query ---------------------------------------------------------------------
    def choose_model(self, s_k: float) -> str:
        adaptive = "global" if s_k > self.delta else "local"  # FairFAL Eq. 7
        if self.mode == "adaptive":
            return adaptive
        if self.mode == "complement":
            return "local" if adaptive == "global" else "global"
        return self.mode

    def select(self, ctx: QueryContext, budget: int) -> np.ndarray:
        if ctx.phase_a is None or "gamma_bar" not in ctx.server:
            raise RuntimeError("fairfal queries in two phases: client_stats, server_reduce, "
                               "then query with ctx.phase_a and ctx.server set")
        gamma_bar = float(ctx.server["gamma_bar"])
        d_k = float(ctx.phase_a.kept["d"])
        s_k = 1.0 - (d_k + gamma_bar) / 2.0  # FairFAL Eq. 6
        model = self.choose_model(s_k)
        unc = uncertainty(ctx.probs(model, "unlabeled"), self.uncertainty_kind)
        diag: dict[str, object] = {"gamma_k": ctx.phase_a.kept["gamma"], "gamma_bar": gamma_bar,
                                   "d_k": d_k, "s_k": s_k, "model": model}
        self._diag = diag
        if not self.classwise:  # ablation: plain top-b uncertainty of the chosen model
            return top_k(unc, budget)

        C = ctx.num_classes
        pseudo = prototype_pseudo_labels(ctx.features(self.prototypes, "labeled"),
                                         ctx.labeled_y,
                                         ctx.features(self.prototypes, "unlabeled"),
                                         self.similarity)
        sizes = np.bincount(pseudo, minlength=C)
        quotas = class_quotas(budget, sizes)
        diag["buckets"] = sizes.tolist()
        diag["quotas"] = quotas.tolist()

        # stage 2 embeddings: global features, global probabilities (the paper's text), or
        # the reference code's choice of probabilities
        emb_model = "global"
        if self.embedding_probs == "code":
            emb_model = "global" if gamma_bar < 0.5 else "local"
        feats_u = ctx.features("global", "unlabeled")
        feats_l = ctx.features("global", "labeled")
        probs_u = ctx.probs(emb_model, "unlabeled")
        probs_l = ctx.probs(emb_model, "labeled")
        labels_l = torch.as_tensor(ctx.labeled_y)
        unc_np = as_numpy(unc)
        picks: list[np.ndarray] = []
        for c in range(C):
            q = int(quotas[c])
            if q == 0:
                continue
            bucket = np.flatnonzero(pseudo == c)
            if self.kappa == 0:  # one stage: top-q_c uncertainty within the class
                picks.append(bucket[top_k(unc_np[bucket], q)])
                continue
            m = min(len(bucket), max(1, math.floor(self.kappa * q)))  # stage 1
            cand = bucket[top_k(unc_np[bucket], m)]
            if m == q:
                picks.append(cand)
                continue
            cand_t = torch.as_tensor(cand)
            g_cand = grad_embeddings(feats_u[cand_t], probs_u[cand_t])  # hot = argmax p
            anchors = torch.as_tensor(np.flatnonzero(ctx.labeled_y == c))
            g_anchor = grad_embeddings(feats_l[anchors], probs_l[anchors],
                                       hot=labels_l[anchors])  # hot = the true label
            # cand is sorted by uncertainty, so position 0 is the most uncertain candidate
            chosen = kcenter_greedy(g_cand, q, centers=g_anchor if len(anchors) else None,
                                    first=0)
            picks.append(cand[chosen])
        return np.concatenate(picks)
