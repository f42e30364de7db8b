"""IFAL (Zong & Huang, inter-model label-distribution shifts for federated active learning;
reference: chenchenzong/IFAL), as ALGORITHMS.md §4 **ifal** specifies.

For a model M, every unlabeled point u gets a class distribution from its *reverse* k nearest
neighbours: how many points of each class (true labels on L_k, M's predictions on U_k) list
u among their top-k most similar unlabeled points in M's L2-normalised feature space. Three
feature spaces are compared — the global model, the client's `last_round` local model, and a
local model distilled from the global one (trained by the loop, see `distillation`) — and a
point is informative when these distributions disagree (U1) and when the local model's own
prediction disagrees with its rkNN distribution (U2). Candidates are the points above the
Otsu threshold of U = U1 · U2; k-means on their local features picks the point nearest each
centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from falkit.al.base import QueryContext, Strategy, register
from falkit.al.primitives import as_numpy, nearest_to_centres, top_k
from falkit.errors import ConfigError
from falkit.options import Options, option

W1_MODES = ("reference", "histogram")
_EPS = 1e-5  # IFAL: U1's ratio guard, ALGORITHMS.md §4 (the reference's 1e-5)


def rknn_neighbours(feats_l: torch.Tensor, feats_u: torch.Tensor, k: int = 250,
                    chunk: int = 2048) -> torch.Tensor:
    """For every row of [L; U], the positions (into U) of its top-k most similar unlabeled
    points, cosine similarity on L2-normalised features, self-matches removed (IFAL: rkNN,
    ALGORITHMS.md §4). Shape (n_L + n_U) × min(k, n_U); -1 marks "no neighbour" (an
    unlabeled row has only n_U − 1 candidates). Rows are processed in chunks, so memory is
    O(chunk · n_U), not O(n²)."""
    fl = F.normalize(feats_l.float(), dim=1)
    fu = F.normalize(feats_u.float(), dim=1)
    rows = torch.cat([fl, fu])
    nl, nu = len(fl), len(fu)
    kk = min(int(k), nu)
    out = torch.empty((len(rows), kk), dtype=torch.int64, device=rows.device)
    for s in range(0, len(rows), chunk):
        sim = rows[s:s + chunk] @ fu.T  # IFAL: S = [f(L); f(U)] f(U)ᵀ, ALGORITHMS.md §4
        r = torch.arange(s, s + len(sim), device=rows.device)
        own = r >= nl  # unlabeled rows: row nl + i is the point i itself
        sim[(r[own] - s), r[own] - nl] = float("-inf")  # IFAL: self-matches removed
        vals, idx = sim.topk(kk, dim=1)  # IFAL: top-250 columns per row (all if fewer)
        idx[vals == float("-inf")] = -1
        out[s:s + len(sim)] = idx
    return out


def rknn_distribution(neighbours: torch.Tensor, row_labels: torch.Tensor,
                      num_unlabeled: int, num_classes: int) -> torch.Tensor:
    """rkNN(u, c) = 1 + #rows with label c that list u, normalised over c (IFAL: rkNN,
    ALGORITHMS.md §4), as float64 n_U × C. One bincount over (column, row label) pairs."""
    labels = torch.as_tensor(row_labels, dtype=torch.int64, device=neighbours.device)
    labels = labels.view(-1, 1).expand_as(neighbours)
    valid = neighbours >= 0
    flat = neighbours[valid] * num_classes + labels[valid]
    counts = torch.bincount(flat, minlength=num_unlabeled * num_classes)
    counts = 1.0 + counts.view(num_unlabeled, num_classes).double()  # IFAL: 1 + #rows
    return counts / counts.sum(1, keepdim=True)  # IFAL: normalise over c


def wasserstein1(p: torch.Tensor, q: torch.Tensor, mode: str = "reference") -> torch.Tensor:
    """Row-wise W1 between two N × C probability tables (IFAL, ALGORITHMS.md §4).

    "reference": what the reference computes, `scipy.stats.wasserstein_distance(p, q)`,
    which treats the C probabilities as *sample values* with equal weights: for two samples
    of the same size that is the mean absolute difference of the sorted values.
    "histogram": the class-ordered W1 between the two distributions over classes 0..C−1
    (unit spacing): the L1 distance of their CDFs."""
    p, q = p.double(), q.double()
    if mode == "reference":  # IFAL (reference code): W1 = mean |sort(p) − sort(q)|
        return (p.sort(1).values - q.sort(1).values).abs().mean(1)
    if mode == "histogram":  # IFAL (option): W1 = Σ_c |CDF_p(c) − CDF_q(c)|
        return (p.cumsum(1) - q.cumsum(1)).abs().sum(1)
    raise ValueError(f"unknown W1 mode {mode!r} (valid: {', '.join(W1_MODES)})")


def otsu_threshold(values: np.ndarray, nbins: int = 256) -> float:
    """Otsu's threshold (IFAL's candidate cut, ALGORITHMS.md §4; the reference used
    skimage.filters.threshold_otsu): over a `nbins` histogram spanning [min, max], the bin
    centre that maximises the between-class variance w₀ w₁ (μ₀ − μ₁)² of the split "at or
    below the centre" / "above". A constant array returns its value."""
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return lo
    counts, edges = np.histogram(v, bins=nbins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    # the first and the last bin hold min and max, so both cumulative weights stay > 0
    w0 = np.cumsum(counts)
    w1 = np.cumsum(counts[::-1])[::-1]
    mu0 = np.cumsum(counts * centres) / w0
    mu1 = (np.cumsum((counts * centres)[::-1]) / w1[::-1])[::-1]
    between = w0[:-1] * w1[1:] * (mu0[:-1] - mu1[1:]) ** 2  # Otsu: between-class variance
    return float(centres[int(np.argmax(between))])


@dataclass
class IFALConfig(Options):
    """[ifal] (ALGORITHMS.md §4 ifal): defaults are the reference code's."""

    # reference: W1 of the sorted probability values | histogram: CDFs
    w1: str = option("reference", choices=("reference", "histogram"))
    # rkNN: each row lists its top_k most similar unlabeled points
    top_k: int = option(250, low=1)
    n_init: int = option(10, low=1)  # k-means restarts on the candidates
    kd_lr: float = option(1e-3, low=0, low_in=False)  # the distilled local model: SGD lr
    kd_epochs: int = option(500, low=1)  # at most this many epochs ...
    # ... stopping after this many without a lower training loss
    kd_patience: int = option(5, low=1)
    kd_temperature: float = option(4.0, low=0, low_in=False)  # softmax temperature of KD
    kd_ce_weight: float = option(0.1, low=0, high=1)  # loss = w * CE + (1 - w) * KD
    # the weights it ends with: best = a copy of the lowest-loss epoch's (what early stopping
    # means) | last = the last epoch's (the IFAL code's EarlyStopping keeps a live
    # state_dict() reference, so its "best" is the last)
    kd_keep: str = option("best", choices=("best", "last"))


@register
class IFAL(Strategy):
    """IFAL: rkNN class distributions in three feature spaces (global, `last_round` local,
    local distilled from global); U = U1 · U2; Otsu threshold, then k-means (k = min(b,
    #candidates)) on the candidates' local features, nearest to each centre; if short, the
    same with U1 alone; if still short, top-b by U."""

    name = "ifal"
    options = IFALConfig  # its section [ifal]
    description = "IFAL: rkNN label shifts of global/local/distilled models, Otsu + k-means"
    uses_selector = False  # a fixed design: three models
    local_model_mode = "last_round"

    def __init__(self, at: str | None = None, *, w1: str = "reference", top_k: int = 250,
                 n_init: int = 10, kd_lr: float = 1e-3, kd_epochs: int = 500,
                 kd_patience: int = 5, kd_temperature: float = 4.0, kd_ce_weight: float = 0.1,
                 kd_keep: str = "best", **options: object):
        super().__init__(at, **options)
        if w1 not in W1_MODES:
            raise ConfigError(f"ifal.w1 = {w1!r} is not one of {', '.join(W1_MODES)}")
        self.w1, self.top_k, self.n_init = w1, int(top_k), int(n_init)
        if kd_keep not in ("best", "last"):
            raise ConfigError(f"ifal.kd_keep = {kd_keep!r} is not one of best, last")
        self.kd = {"lr": float(kd_lr), "epochs": int(kd_epochs), "keep": kd_keep,
                   "patience": int(kd_patience), "temperature": float(kd_temperature),
                   "ce_weight": float(kd_ce_weight)}

    @property
    def needs_local_model(self) -> bool:
        return True  # the `last_round` local model is one of the three feature spaces

    @property
    def distillation(self) -> dict[str, object]:
        """The loop trains, per client, a local model distilled from the global one with
        these settings (Engine.train_distilled keywords) and serves it as model
        "distilled" (IFAL: 0.1 CE + 0.9 KD, T = 4, lr 1e-3, ≤ 500 epochs, patience 5; the
        best or, `kd_keep = "last"`, the last epoch's weights)."""
        return dict(self.kd)

    def _rknn(self, ctx: QueryContext, model: str, *row_labels: torch.Tensor
              ) -> list[torch.Tensor]:
        """rkNN distributions in `model`'s feature space, one per labelling of the rows."""
        nb = rknn_neighbours(ctx.features(model, "labeled"), ctx.features(model, "unlabeled"),
                             self.top_k)
        nu = len(ctx.unlabeled)
        return [rknn_distribution(nb, y, nu, ctx.num_classes) for y in row_labels]

    def scores(self, ctx: QueryContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(U1, U2) per unlabeled point (float64)."""
        p_local = ctx.probs("local", "unlabeled")
        y_l = torch.as_tensor(np.asarray(ctx.labeled_y), dtype=torch.int64, device=p_local.device)
        # IFAL: labels_M = true labels on L, argmax p_M on U
        lab_g = torch.cat([y_l, ctx.probs("global", "unlabeled").argmax(1).to(y_l.device)])
        lab_l = torch.cat([y_l, p_local.argmax(1)])
        (g1,) = self._rknn(ctx, "global", lab_g)  # IFAL: g1 = rkNN(global feats, global labels)
        l1, l2 = self._rknn(ctx, "local", lab_g, lab_l)  # IFAL: l1, l2 (local feats)
        (k1,) = self._rknn(ctx, "distilled", lab_g)  # IFAL: k1 = rkNN(KD feats, global labels)
        d_ll = wasserstein1(l1, k1, self.w1)  # IFAL: D_ll = W1(l1, k1)
        d_gl = wasserstein1(g1, k1, self.w1)  # IFAL: D_gl = W1(g1, k1)
        # IFAL: U1 = max(D_gl/(D_ll+1e-5), D_ll/(D_gl+1e-5)) · (D_ll + D_gl)
        u1 = torch.maximum(d_gl / (d_ll + _EPS), d_ll / (d_gl + _EPS)) * (d_ll + d_gl)
        u2 = wasserstein1(l2, p_local, self.w1)  # IFAL: U2 = W1(l2, p_local)
        return u1, u2

    def select(self, ctx: QueryContext, budget: int) -> np.ndarray:
        u1, u2 = self.scores(ctx)
        u = as_numpy(u1 * u2)  # IFAL: U = U1 · U2
        # IFAL: k-means on the candidates' local features (L2-normalised, as the reference)
        feats = as_numpy(F.normalize(ctx.features("local", "unlabeled").float(), dim=1))
        seed = int(ctx.rng.integers(0, 2**31 - 1))  # sklearn's seed drawn from ctx.rng only
        picks = np.zeros(0, dtype=np.int64)
        diag: dict[str, object] = {"kmeans_seed": seed}
        for stage, score in (("U", u), ("U1", as_numpy(u1))):  # IFAL: if short, U1 alone
            th = otsu_threshold(score)  # IFAL: Otsu threshold on U
            cand = np.flatnonzero(score > th)
            diag[f"threshold_{stage}"] = th
            diag[f"candidates_{stage}"] = int(len(cand))
            if len(cand):
                k = min(budget, len(cand))  # IFAL: k = min(b, #candidates)
                picks = cand[nearest_to_centres(feats[cand], k, seed, self.n_init)]
            diag["stage"] = stage
            if len(picks) >= budget:
                break
        if len(picks) < budget:  # IFAL: if still short, top-b by U
            picks = top_k(u, budget)
            diag["stage"] = "top_U"
        diag.update(u_mean=float(u.mean()), u1_mean=float(u1.mean()),
                    u2_mean=float(u2.mean()))
        for key in ("distill_epochs", "distill_loss"):  # reported if it trained one
            if key in ctx.model_info:
                diag[key] = ctx.model_info[key]
        self._diag = diag
        return picks
