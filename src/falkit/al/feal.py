"""FEAL: Federated Evidential Active Learning (Chen, Ma, Li, Zhang, Zhang, Xia, Tang, Yuan,
"Think Twice Before Selection: Federated Evidential Active Learning for Medical Image
Analysis with Domain Shifts", CVPR 2024). falkit's own implementation, from the paper's
description and the behaviour of the authors' code (JiayiChen815/FEAL, classification),
which decides where the description is silent.

**Evidential outputs.** The model's logits f give evidence e = ReLU(f), a Dirichlet
α = e + 1 over the C classes, S = Σ_c α_c.

**Training** (every client, every FL round; `local_objectives`), the authors' EDL_Loss with
the client's labeled class prior π (its labeled set's class frequencies) and one-hot y:

    L = (1/B) Σ_i (2 − π_{y_i}) (ψ(S_i) − ψ(α_{i,y_i}))                  (digamma EDL term)
      + w · (λ_t · (1/B) Σ_i KL(Dir(α̃_i) ‖ Dir(1))                        (α̃ = (α−1)(1−y)+1)
             + (1/B) Σ_i −(C / S_i) · f_{i,y_i})                           (evidence term, C/S
                                                                            detached)

with w = `kl_weight` (0.01), λ_t = min(1, t / `annealing_step`) (10), t the FL round within
the cycle (0-based), and KL(Dir(a) ‖ Dir(1)) = lnΓ(Σa) − Σ lnΓ(a_c) − lnΓ(C)
+ Σ (a_c − 1)(ψ(a_c) − ψ(Σa)).

**Query** (calibrated uncertainty, then diversity relaxation), on the unlabeled pool in a
keyed random order, its first `candidates` (10,000) scored:

* aleatoric uncertainty, the expected entropy under the Dirichlet, of the global (g) and the
  local (l) model: U_ale(α) = Σ_c (α_c/S)(ψ(S+1) − ψ(α_c+1));
* epistemic uncertainty of the global model, the Dirichlet's differential entropy
  H[Dir(α)] = ln B(α) + (S − C) ψ(S) − Σ_c (α_c − 1) ψ(α_c), min-max normalised over the
  candidates (Ũ);
* U = Ũ^g · (U_ale^g + U_ale^l), ranked from the highest;
* relaxation: walking the ranking, a candidate is taken unless among its `neighbors` (5)
  most similar candidates with cosine similarity > `cosine` (0.85) in the local model's
  features, one is already taken — a candidate with fewer such neighbours is always taken
  (as the authors' code has it) — until the budget is met; a shortfall is filled with the
  last not-taken candidates in subset order (`fill = "code"`, the authors': about random)
  or the most uncertain not taken (`fill = "uncertainty"`).

The "local model" is the client's model after its last local update of the cycle
(`local_model.mode = last_round`, as in the authors' code: the local models right before
the cycle's last aggregation).

Where falkit differs from the authors' code: the features for the relaxation are the
backbone's penultimate features (the authors': EfficientNet-B0 `blocks[4]`, 3×3 average
pooled); where every candidate has the same epistemic uncertainty, the min-max
normalisation gives NaN there and 1 here (no calibration); the candidate subset is drawn
from the client's keyed query stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from falkit.al.base import QueryContext, Strategy, register
from falkit.al.primitives import as_numpy
from falkit.options import Options, option


@dataclass
class FEALOptions(Options):
    """[feal]"""

    kl_weight: float = option(0.01, low=0)  # w of the KL and evidence terms
    annealing_step: int = option(10, low=1)  # λ_t = min(1, t / annealing_step)
    neighbors: int = option(5, low=1)  # n_neighbor of the relaxation
    cosine: float = option(0.85, low=-1, high=1)  # similarity above which a neighbour counts
    candidates: int = option(10_000, low=1)  # the scored subset of the unlabeled pool
    fill: str = option("code", choices=("code", "uncertainty"))  # a shortfall's samples


# -- the evidential quantities (FEAL §3; the authors' utils/loss_func.py and
# utils/cls/selection_methods.py) ------------------------------------------------------------

def dirichlet(logits: torch.Tensor) -> torch.Tensor:
    """α = ReLU(f) + 1."""
    return torch.relu(logits) + 1.0


def aleatoric(alpha: torch.Tensor) -> torch.Tensor:
    """Expected entropy under Dir(α): Σ_c (α_c/S)(ψ(S+1) − ψ(α_c+1)), per row."""
    s = alpha.sum(1, keepdim=True)
    return ((alpha / s) * (torch.digamma(s + 1) - torch.digamma(alpha + 1))).sum(1)


def epistemic(alpha: torch.Tensor) -> torch.Tensor:
    """Differential entropy of Dir(α): ln B(α) + (S − C)ψ(S) − Σ_c (α_c − 1)ψ(α_c)."""
    s = alpha.sum(1)
    c = alpha.shape[1]
    log_b = torch.lgamma(alpha).sum(1) - torch.lgamma(s)
    return log_b + (s - c) * torch.digamma(s) - ((alpha - 1) * torch.digamma(alpha)).sum(1)


def kl_to_uniform(alpha: torch.Tensor) -> torch.Tensor:
    """KL(Dir(α) ‖ Dir(1)) per row."""
    s = alpha.sum(1)
    c = alpha.shape[1]
    return (torch.lgamma(s) - torch.lgamma(alpha).sum(1) - math.lgamma(c)
            + ((alpha - 1) * (torch.digamma(alpha) - torch.digamma(s)[:, None])).sum(1))


def edl_loss(logits: torch.Tensor, y: torch.Tensor, prior: torch.Tensor, round_index: int,
             kl_weight: float = 0.01, annealing_step: int = 10) -> torch.Tensor:
    """FEAL's training loss (module docstring) of one batch."""
    logits = logits.float()  # digamma / lgamma in fp32 (bf16 autocast hands bf16)
    c = logits.shape[1]
    alpha = dirichlet(logits)
    s = alpha.sum(1)
    onehot = torch.nn.functional.one_hot(y, c).to(logits.dtype)
    a_y = alpha.gather(1, y[:, None]).squeeze(1)
    ce = ((2 - prior[y]) * (torch.digamma(s) - torch.digamma(a_y))).mean()
    lam = min(1.0, round_index / annealing_step)
    kl = kl_to_uniform((alpha - 1) * (1 - onehot) + 1).mean()
    cor = (-(c / s).detach() * logits.gather(1, y[:, None]).squeeze(1)).mean()
    return ce + kl_weight * (lam * kl + cor)


def calibrated(global_logits: torch.Tensor, local_logits: torch.Tensor) -> torch.Tensor:
    """U = Ũ_epi^g · (U_ale^g + U_ale^l), Ũ min-max normalised over the rows (1 where they
    are all equal)."""
    ag, al = dirichlet(global_logits.double()), dirichlet(local_logits.double())
    epi = epistemic(ag)
    span = epi.max() - epi.min()
    norm = (epi - epi.min()) / span if float(span) > 0 else torch.ones_like(epi)
    return norm * (aleatoric(ag) + aleatoric(al))


def relaxation(order: np.ndarray, feats: torch.Tensor, budget: int, neighbors: int,
               cosine: float, fill: str) -> np.ndarray:
    """Positions (into the candidates) of the relaxation's picks; `order`: the candidates
    from the most uncertain."""
    n = len(order)
    f = torch.nn.functional.normalize(feats.double(), dim=1)
    taken: list[int] = []
    is_taken = np.zeros(n, dtype=bool)
    for i in order:
        if len(taken) >= budget:
            break
        sim = as_numpy(f @ f[i])
        close = np.argsort(-sim, kind="stable")
        close = close[sim[close] > cosine]
        # the authors drop the first of the ranking (itself, but for an exact duplicate)
        close = close[close != i][:neighbors]
        if len(close) < neighbors or not is_taken[close].any():
            taken.append(int(i))
            is_taken[i] = True
    short = budget - len(taken)
    if short > 0:
        rest = (np.flatnonzero(~is_taken)[-short:] if fill == "code"
                else np.array([i for i in order if not is_taken[i]][:short], dtype=np.int64))
        taken += [int(i) for i in rest]
    return np.asarray(taken, dtype=np.int64)


@register
class FEAL(Strategy):
    name = "feal"
    description = ("FEAL: evidential training; global epistemic x (global + local) aleatoric "
                   "uncertainty, diversity relaxation")
    local_model_mode = "last_round"  # the clients' models after the cycle's last update
    options = FEALOptions

    def __init__(self, at: str | None = None, *, kl_weight: float = 0.01,
                 annealing_step: int = 10, neighbors: int = 5, cosine: float = 0.85,
                 candidates: int = 10_000, fill: str = "code", **options: object):
        super().__init__(at, **options)
        self.kl_weight, self.annealing_step = float(kl_weight), int(annealing_step)
        self.neighbors, self.cosine = int(neighbors), float(cosine)
        self.candidates, self.fill = int(candidates), fill

    @property
    def needs_local_model(self) -> bool:
        return True

    def local_objectives(self, engine, global_state, labeled: Sequence[np.ndarray],
                         labels: np.ndarray, pools: Sequence[np.ndarray], round_index: int
                         ) -> Callable[[int], object]:
        """Every client trains with FEAL's evidential loss under its labeled class prior."""
        C = engine.num_classes

        def for_client(k: int):
            counts = np.bincount(np.asarray(labels[labeled[k]], dtype=np.int64), minlength=C)
            prior = torch.as_tensor(counts / max(1, counts.sum()), dtype=torch.float32,
                                    device=engine.device)

            def objective(model, xb, logits, yb, gen):
                return edl_loss(logits, yb, prior, round_index, self.kl_weight,
                                self.annealing_step)

            return objective

        return for_client

    def select(self, ctx: QueryContext, budget: int) -> np.ndarray:
        # the authors: the unlabeled pool shuffled, its first 10,000 scored (the order
        # breaks ties and, with fill = code, picks the shortfall); never fewer than b
        sub = ctx.rng.permutation(len(ctx.unlabeled))[:max(self.candidates, budget)]
        logits = {}
        for m in ("global", "local"):
            w, b = ctx.head(m)
            f = ctx.features(m)[torch.as_tensor(sub)].float()
            logits[m] = f @ w.to(f.device).T + b.to(f.device)
        u = as_numpy(calibrated(logits["global"], logits["local"]))
        order = np.argsort(-u, kind="stable")
        feats = ctx.features("local")[torch.as_tensor(sub)]
        picks = relaxation(order, feats.cpu(), budget, self.neighbors, self.cosine, self.fill)
        self._diag = {"uncertainty_mean_selected": round(float(u[picks].mean()), 6)}
        return sub[picks]
