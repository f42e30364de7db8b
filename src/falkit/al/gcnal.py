"""CoreGCN (Caramalau, Bhattarai & Kim, "Sequential Graph Convolutional Network for Active
Learning", CVPR 2021), ALGORITHMS.md §4 **gcnal**.

A 2-layer GCN is trained on the graph of [U_sub; L] (cosine affinities of the query model's
features) to tell labeled from unlabeled nodes; greedy k-center on its 128-d hidden features,
with the labeled nodes as the initial centers, then picks the batch.

Only a seeded random subsample of at most `SUBSAMPLE_CAP` unlabeled points enters the graph
(the paper's "SUBSET"); points outside it are never selected. If the budget exceeds the cap the
subsample is enlarged to the budget, so the contract (exactly b picks) always holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from falkit.al.base import QueryContext, Strategy, register
from falkit.al.primitives import kcenter_greedy
from falkit.options import Options, option

SUBSAMPLE_CAP = 10_000  # unlabeled nodes in the graph (CoreGCN's SUBSET)
HIDDEN = 128  # GCN hidden width
DROPOUT = 0.3
STEPS = 200  # full-batch Adam steps
LR = 1e-3
WEIGHT_DECAY = 5e-4
ETA = 1.2  # weight of the unlabeled term of the loss (CoreGCN's lambda_loss)
_FUSED_ADAM = torch.__version__ >= "2.4"  # fused CPU Adam exists from torch 2.4
_ZERO_SUM = 1e-12  # |column sum| below this counts as zero


def _safe_inverse(s: torch.Tensor) -> torch.Tensor:
    """1 / s, but 1 where s is (numerically) zero: such a column is left unscaled rather than
    turned into inf/NaN as the reference would (e.g. a one-node graph, where XXᵀ − I = 0)."""
    return torch.where(s.abs() < _ZERO_SUM, torch.ones_like(s), 1.0 / s)


def gcn_adjacency(x: torch.Tensor) -> torch.Tensor:
    """CoreGCN's dense adjacency (reference `aff_to_adj`): A = XXᵀ − I, each column divided
    by its sum, + I. `x` holds one L2-normalized feature row per node. O(N²) memory: for tests
    and small graphs; the strategy applies the same operator implicitly (`_Adjacency`)."""
    x64 = x.to(torch.float64)
    eye = torch.eye(len(x64), dtype=torch.float64, device=x64.device)
    a = x64 @ x64.T - eye
    return a * _safe_inverse(a.sum(0)) + eye  # broadcasting scales column j by 1/s_j


class _Adjacency:
    """`gcn_adjacency(x) @ m` without forming the N×N matrix. The column sums of XXᵀ − I are
    s_j = x_j · Σ_i x_i − 1, so A m = X (Xᵀ (m / s)) − m / s + m: O(N·D) per column of m,
    which keeps a 10 000-node graph cheap in time and memory. Computed in float64 because a
    small s_j amplifies rounding error."""

    def __init__(self, x: torch.Tensor):
        self.x = x.to(torch.float64)
        self.inv = _safe_inverse(self.x @ self.x.sum(0) - 1.0).unsqueeze(1)

    def __matmul__(self, m: torch.Tensor) -> torch.Tensor:
        dtype = m.dtype
        ms = m.to(torch.float64) * self.inv
        return (self.x @ (self.x.T @ ms) - ms + m.to(torch.float64)).to(dtype)


def _uniform(shape: tuple[int, ...], bound: float, gen: torch.Generator,
             device: torch.device) -> torch.Tensor:
    """U(−bound, bound), drawn from `gen` (a CPU generator) and moved to `device`."""
    return ((torch.rand(shape, generator=gen) * 2.0 - 1.0) * bound).to(device).requires_grad_()


def train_gcn_hidden(x: torch.Tensor, n_unlabeled: int, gen: torch.Generator,
                     steps: int = STEPS, eta: float = ETA) -> tuple[torch.Tensor, float]:
    """Train CoreGCN's GCN on nodes `x` (rows 0..n_unlabeled-1 unlabeled, the rest labeled;
    rows L2-normalized) and return its hidden features in eval mode (N × 128) and the final
    training loss.

    GCN (reference `GCN` with gc1 and gc3): h = ReLU(A X W1 + b1), s = σ(A drop(h) W2 + b2);
    loss = −mean log s[L] − η · mean log(1 − s[U]) (reference `BCEAdjLoss`), Adam with weight
    decay on every parameter. All randomness (init, dropout masks) comes from `gen`, so the
    result is deterministic for a seed and independent of the global torch RNG (thread-safe).
    The GCN trains on the device of `x`; the random numbers are drawn on the CPU (`gen`) and
    moved there, so they are the same on every device.
    """
    n, d = x.shape
    dev = x.device
    adj = _Adjacency(x)
    with torch.no_grad():
        ax = adj @ x.float()  # A X is fixed: (A X) W1 = A (X W1), computed once
    # reference GraphConvolution.reset_parameters: U(−1/√out, 1/√out) for weight and bias
    w1 = _uniform((d, HIDDEN), HIDDEN ** -0.5, gen, dev)
    b1 = _uniform((HIDDEN,), HIDDEN ** -0.5, gen, dev)
    w2 = _uniform((HIDDEN, 1), 1.0, gen, dev)
    b2 = _uniform((1,), 1.0, gen, dev)
    params = [w1, b1, w2, b2]
    # fused: one kernel per step instead of ~10 per parameter (the graphs are small; per-op
    # overhead, not arithmetic, dominates)
    opt = torch.optim.Adam(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=_FUSED_ADAM)
    loss = torch.zeros((), device=dev)
    with torch.enable_grad():
        for _ in range(steps):
            h = F.relu(ax @ w1 + b1)
            # dropout as an explicit mask drawn from `gen` (F.dropout would use global RNG)
            keep = (torch.rand(h.shape, generator=gen) >= DROPOUT).to(dev)
            h = h * keep / (1.0 - DROPOUT)
            o = (adj @ (h @ w2) + b2).squeeze(1)
            # log σ(o) and log(1 − σ(o)) = log σ(−o), stable where σ saturates
            loss = torch.zeros((), device=dev)
            if n > n_unlabeled:
                loss = loss - F.logsigmoid(o[n_unlabeled:]).mean()
            if n_unlabeled > 0:
                loss = loss - eta * F.logsigmoid(-o[:n_unlabeled]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        hidden = F.relu(ax @ w1 + b1)  # eval mode: no dropout
    return hidden, float(loss.detach())


@dataclass
class GCNALConfig(Options):
    """[gcnal] CoreGCN (ALGORITHMS.md §4 gcnal): defaults are the reference code's."""

    steps: int = option(200, low=1)  # full-batch Adam steps of the GCN
    # weight of the unlabeled term of its loss (CoreGCN's lambda_loss)
    eta: float = option(1.2, low=0)
    subsample: int = option(10_000, low=1)  # unlabeled nodes in the graph (CoreGCN's SUBSET)


@register
class GCNAL(Strategy):
    name = "gcnal"
    options = GCNALConfig  # its section [gcnal]
    description = "CoreGCN: k-center on hidden features of a labeled-vs-unlabeled GCN"
    uses_selector = True

    def __init__(self, at: str | None = None, *, steps: int = STEPS, eta: float = ETA,
                 subsample: int = SUBSAMPLE_CAP, **options: object):
        super().__init__(at, **options)
        self.steps, self.eta, self.subsample = int(steps), float(eta), int(subsample)

    def select(self, ctx: QueryContext, budget: int) -> np.ndarray:
        fu = ctx.features(self.query_model, "unlabeled")
        fl = ctx.features(self.query_model, "labeled")
        n_u = len(fu)
        # the cap never drops below the budget: selection happens only inside the subsample
        size = min(n_u, max(self.subsample, budget))
        if size < n_u:
            sub = np.sort(ctx.rng.choice(n_u, size=size, replace=False))
        else:
            sub = np.arange(n_u)
        gen = torch.Generator().manual_seed(int(ctx.rng.integers(2**63 - 1)))
        x = F.normalize(torch.cat([fu[torch.as_tensor(sub)], fl]).float(), dim=1)
        hidden, loss = train_gcn_hidden(x, size, gen, self.steps, self.eta)
        picks = kcenter_greedy(hidden[:size], budget, centers=hidden[size:])
        self._diag = {"subsample": int(size), "gcn_loss": loss}
        return sub[picks]
