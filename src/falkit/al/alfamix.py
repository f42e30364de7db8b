"""ALFA-Mix (Parvaneh et al., "Active Learning by Feature Mixing", CVPR 2022), ALGORITHMS.md §4
**alfamix**, with the paper's closed-form α (reference `alpha_closed_form_approx`).

An unlabeled point is a candidate when interpolating its features a little towards some class
anchor (the mean labeled feature of that class) flips the query model's prediction; k-means
on the normalized candidate features then picks a diverse batch among them.

The head (`alfamix.head`): `query` takes g and the mixed predictions through the query
model's own classifier head (@G: the global head, @L: the local one), ALFA-Mix's one-model
form; `global` (the `reference` preset) through the global model's head whatever the query
model, as the LoGo / IFAL baseline code does. k-means restarts `alfamix.n_init` times (10,
the code's sklearn default). The random fill draws distinct samples (the code drew with
replacement, so its batch could hold duplicates: fewer labels than the budget; falkit's
strategy contract asks for `budget` distinct picks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from falkit.al.base import QueryContext, Strategy, register
from falkit.al.primitives import as_numpy, nearest_to_centres
from falkit.errors import ConfigError
from falkit.options import Options, option

ALPHA_CAPS = (0.2, 0.4, 0.6, 0.8, 1.0)  # reference: alpha_cap += 0.2 while alpha_cap < 1
_CHUNK = 8192  # rows of the pool per batched step (bounds memory at 8192 × D per tensor)


def class_anchors(z_l: torch.Tensor, y_l: np.ndarray | torch.Tensor,
                  num_classes: int) -> torch.Tensor:
    """ALFA-Mix anchors (C × D): μ_i = mean labeled feature of class i, or the mean of all
    labeled features when class i has no labeled point (reference `find_candidate_set`).
    On the device of `z_l`."""
    z = z_l.float()
    y = (y_l.to(z.device, torch.long) if isinstance(y_l, torch.Tensor)
         else torch.as_tensor(np.asarray(y_l), dtype=torch.long, device=z.device))
    overall = z.mean(0)
    counts = torch.bincount(y, minlength=num_classes)[:num_classes].float()
    sums = torch.zeros(num_classes, z.shape[1], device=z.device).index_add_(0, y, z)
    means = sums / counts.clamp_min(1.0).unsqueeze(1)
    return torch.where((counts > 0).unsqueeze(1), means, overall)


def ce_feature_grad(z: torch.Tensor, pred: torch.Tensor, w: torch.Tensor,
                    b: torch.Tensor) -> torch.Tensor:
    """∂CE(softmax(z Wᵀ + b), ŷ)/∂z per row = (softmax(z Wᵀ + b) − onehot(ŷ)) W, the closed
    form of what the reference gets from autograd. (The reference differentiates the batch
    *mean*, scaling g by 1/N; α only depends on g / ‖g‖, so the scale is irrelevant.)"""
    coef = torch.softmax(z @ w.T + b, dim=1)
    coef[torch.arange(len(z), device=z.device), pred] -= 1.0
    return coef @ w


def alfamix_candidates(z_u: torch.Tensor, pred: torch.Tensor, anchors: torch.Tensor,
                       w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """Boolean mask over the rows of `z_u`: does mixing towards any anchor flip the prediction?

    ALFA-Mix Eq. 5 (closed form, reference `calculate_optimum_alpha`), for every anchor μ_i:
    α = (ε ‖μ_i − z‖ / ‖g‖) · g / (μ_i − z + 1e-8) elementwise, no clamping;
    mix = (1 − α) z + α μ_i; candidate iff argmax(mix Wᵀ + b) ≠ ŷ for some i.
    `pred` is ŷ (the query model's argmax), `eps` = cap / √D. Batched over the pool.
    A row with g = 0 (a saturated softmax) gets α = 0 instead of 0/0, so it never flips.
    Computed on the device of `z_u` (the other inputs are brought there)."""
    z_u = z_u.float()
    dev = z_u.device
    anchors, w, b = anchors.to(dev).float(), w.to(dev).float(), b.to(dev).float()
    pred = torch.as_tensor(pred, dtype=torch.long, device=dev)
    mask = torch.zeros(len(z_u), dtype=torch.bool, device=dev)
    for lo in range(0, len(z_u), _CHUNK):
        z, y = z_u[lo:lo + _CHUNK], pred[lo:lo + _CHUNK]
        g = ce_feature_grad(z, y, w, b)
        g_norm = g.norm(dim=1, keepdim=True)
        g_unit = torch.where(g_norm > 0, g / g_norm.clamp_min(1e-30), torch.zeros_like(g))
        flip = torch.zeros(len(z), dtype=torch.bool, device=dev)
        for mu in anchors:  # C iterations; each one batched over every row of the chunk
            diff = mu - z
            alpha = eps * diff.norm(dim=1, keepdim=True) * g_unit / (diff + 1e-8)
            mix = (1.0 - alpha) * z + alpha * mu
            flip |= (mix @ w.T + b).argmax(1) != y
        mask[lo:lo + _CHUNK] = flip
    return mask


@dataclass
class AlfaMixConfig(Options):
    """[alfamix] ALFA-Mix (ALGORITHMS.md §4 alfamix)."""

    # the classifier head the mixing and the mixed predictions go through: query = the
    # query model's own (@L: the local head; ALFA-Mix's one-model form) | global = the
    # global model's, whatever the query model (the LoGo / IFAL baseline code)
    head: str = option("query", choices=("query", "global"))
    # k-means restarts on the candidates (the code's sklearn default)
    n_init: int = option(10, low=1)


@register
class AlfaMix(Strategy):
    name = "alfamix"
    options = AlfaMixConfig  # its section [alfamix]
    description = "ALFA-Mix: k-means over points whose prediction flips under anchor mixing"
    uses_selector = True

    def __init__(self, at: str | None = None, *, head: str = "query", n_init: int = 10,
                 **options: object):
        super().__init__(at, **options)
        if head not in ("query", "global"):
            raise ConfigError(f"alfamix.head = {head!r} is not one of query, global")
        self.head, self.n_init = head, int(n_init)

    def select(self, ctx: QueryContext, budget: int) -> np.ndarray:
        model = self.query_model
        z_u = ctx.features(model, "unlabeled").float()
        pred = ctx.probs(model, "unlabeled").argmax(1)
        # the query computes where the model outputs are; the head's weights (from the state
        # dict, on the training device) are brought there
        w, b = (t.to(z_u.device) for t in ctx.head("global" if self.head == "global"
                                                    else model))
        anchors = class_anchors(ctx.features(model, "labeled"), ctx.labeled_y, ctx.num_classes)
        d = z_u.shape[1]
        candidate = torch.zeros(len(z_u), dtype=torch.bool, device=z_u.device)
        cap = 0.0
        # without labeled points there are no anchors: every pick is the random fill
        for cap in ALPHA_CAPS if len(ctx.labeled) else ():
            # the reference accumulates candidates over caps and stops once it has more than b
            candidate |= alfamix_candidates(z_u, pred, anchors, w, b, cap / math.sqrt(d))
            if int(candidate.sum()) > budget:
                break
        cand = np.flatnonzero(as_numpy(candidate))
        picks = np.zeros(0, dtype=np.int64)
        if len(cand):
            feats = torch.nn.functional.normalize(z_u[torch.as_tensor(cand)], dim=1)
            seed = int(ctx.rng.integers(2**31 - 1))
            picks = cand[nearest_to_centres(as_numpy(feats.double()), min(budget, len(cand)),
                                            seed, n_init=self.n_init)]
        short = budget - len(picks)
        if short > 0:
            # uniform, distinct (the reference drew with replacement: duplicates)
            rest = np.setdiff1d(np.arange(len(z_u)), picks)
            picks = np.concatenate([picks, ctx.rng.choice(rest, size=short, replace=False)])
        self._diag = {"candidates": len(cand), "alpha_cap": cap, "random_fill": max(short, 0)}
        return picks
