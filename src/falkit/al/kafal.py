"""KAFAL's query rule, KSAS (Cao et al., "Knowledge-Aware Federated Active Learning with
Non-IID Data", ICCV 2023), as ALGORITHMS.md §4 **kafal** specifies.

Knowledge-Specialized Active Sampling scores an unlabeled sample by how much the client's
local model (`last_round`: the client's weights right after its last local update of the
cycle) and the global model disagree *on the client's own class distribution*: both models'
logits are shifted by the log class counts a_c = log n_c of the client's labeled set L_k,
restricted to the classes present in L_k, and the score is the symmetric KL divergence

    s(x) = ½ [KL(softmax z_g ‖ softmax z_l) + KL(softmax z_l ‖ softmax z_g)],
    z_m = logits_m(x) + a.

With `kafal.kcfu = true` the clients also train KAFAL's way (Knowledge-Compensatory
Federated Update, `kcfu_objectives`): logit-adjusted cross-entropy on the labeled batch plus a
distillation term from the global model on a Beta(2,2) mixup of unlabeled samples with one
shared partner (one λ per sample; `kafal.mix_partner = "permutation"`: a permutation),
weighted by the λ-mix of the inverse local frequencies of the pseudo-labels of the sample and
its partner (normalised to sum 1, 0 for absent classes; `kafal.mix_weights = "pseudo"`: the
sample's alone), the KL averaged over classes — the authors' code's form (KAFAL main.py);
the distillation is off in the first round of each cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from falkit.al.base import QueryContext, Strategy, register
from falkit.al.primitives import top_k
from falkit.errors import ConfigError
from falkit.options import Options, option

_EPS = 1e-12  # floor for log p: keeps exact zeros finite (log 0 = -inf would poison softmax)


def kafal_scores(p_global: torch.Tensor, p_local: torch.Tensor,
                 counts: np.ndarray | torch.Tensor) -> torch.Tensor:
    """KSAS score per row (KAFAL, Cao et al. 2023): the symmetric KL divergence between the
    global and the local model's predictions after a log-count prior of the client's labeled
    set, over the classes the client has labels for. Returns a float64 tensor of shape (N,).

    `p_global`, `p_local`: softmax probabilities (N × C); `counts`: labeled count per class.

    We only see probabilities, not logits. log p = logits − logsumexp(logits) differs from
    the logits by a per-sample constant, and softmax is invariant to such a constant, so
    log p (clamped at `_EPS`) stands in for the logits exactly (up to the clamp).

    Classes with count 0 have a_c = log 0 = −inf: rather than carry −inf through the
    arithmetic (−inf − (−inf) = NaN inside the KL), they are dropped from both softmaxes,
    which is what their zero prior mass means. With no labeled class at all the prior is
    undefined; then every class is kept with a flat prior (a = 0). With exactly one present
    class both distributions are the point mass on it, so every score is 0.
    """
    dev = p_global.device  # computed where the model outputs are
    counts_t = (counts.to(dev, torch.float64) if isinstance(counts, torch.Tensor)
                else torch.as_tensor(np.asarray(counts), dtype=torch.float64, device=dev))
    present = counts_t > 0
    if not bool(present.any()):
        present = torch.ones_like(present)
        prior = torch.zeros(int(present.sum()), dtype=torch.float64, device=dev)
    else:
        prior = torch.log(counts_t[present])
    z_g = torch.log(p_global.double().clamp_min(_EPS))[:, present] + prior
    z_l = torch.log(p_local.to(dev).double().clamp_min(_EPS))[:, present] + prior
    # log_softmax of finite inputs is finite, so both KL terms are finite (no 0·log 0 issue:
    # every adjusted probability is strictly positive)
    lq_g = torch.log_softmax(z_g, dim=1)
    lq_l = torch.log_softmax(z_l, dim=1)
    q_g, q_l = lq_g.exp(), lq_l.exp()
    kl_gl = (q_g * (lq_g - lq_l)).sum(1)
    kl_lg = (q_l * (lq_l - lq_g)).sum(1)
    # KL ≥ 0 mathematically; clamp away tiny negative rounding so scores sort cleanly
    return (0.5 * (kl_gl + kl_lg)).clamp_min(0.0)


@dataclass
class KAFALConfig(Options):
    """[kafal] (ALGORITHMS.md §4 kafal)."""

    kcfu: bool = False  # also train KAFAL's way (logit-adjusted CE + unlabeled-mixup KD)
    # its mixup partner: shared = one for the whole batch (KAFAL main.py's scalar
    # np.random.choice) | permutation = a permutation of the batch
    mix_partner: str = option("shared", choices=("shared", "permutation"))
    # its KD weights: mixed = lam w[y_i] + (1 - lam) w[y_j] (main.py) | pseudo = w[y_i]
    mix_weights: str = option("mixed", choices=("mixed", "pseudo"))


@register
class KAFAL(Strategy):
    """KAFAL's KSAS query (Cao et al., ICCV 2023): top-b symmetric KL between the global and
    the `last_round` local model under the client's log-count prior. Ties — including the
    all-zero scores of a client with a single labeled class — go to the smaller position."""

    name = "kafal"
    options = KAFALConfig  # its section [kafal]
    description = "KAFAL KSAS: top-b symmetric KL of global vs local model, log-count prior"
    uses_selector = False  # a fixed design: always compares the global and the local model
    local_model_mode = "last_round"

    def __init__(self, at: str | None = None, *, kcfu: bool = False,
                 mix_partner: str = "shared", mix_weights: str = "mixed", **options: object):
        super().__init__(at, **options)
        self.kcfu = bool(kcfu)  # KAFAL's own local training (the loop asks `local_objectives`)
        for key, value, valid in (("mix_partner", mix_partner, ("shared", "permutation")),
                                  ("mix_weights", mix_weights, ("mixed", "pseudo"))):
            if value not in valid:
                raise ConfigError(f"kafal.{key} = {value!r} is not one of {', '.join(valid)}")
        self.mix_partner, self.mix_weights = mix_partner, mix_weights

    def local_objectives(self, engine, global_state, labeled: Sequence[np.ndarray],
                         labels: np.ndarray, pools: Sequence[np.ndarray], round_index: int
                         ) -> Callable[[int], object] | None:
        """Per-client training objectives of FL round `round_index`, or None (plain CE)."""
        if not self.kcfu:
            return None
        return kcfu_objectives(engine, global_state, labeled, labels, pools,
                               distill=round_index > 0, partner=self.mix_partner,
                               mixed_weights=self.mix_weights == "mixed")

    @property
    def needs_local_model(self) -> bool:
        return True  # the score is a global/local disagreement

    def select(self, ctx: QueryContext, budget: int) -> np.ndarray:
        counts = np.bincount(np.asarray(ctx.labeled_y, dtype=np.int64),
                             minlength=ctx.num_classes)
        scores = kafal_scores(ctx.probs("global", "unlabeled"),
                              ctx.probs("local", "unlabeled"), counts)
        picks = top_k(scores, budget)
        self._diag = {
            "present_classes": int((counts > 0).sum()),
            "score_max": float(scores.max()) if len(scores) else 0.0,
            "score_mean": float(scores.mean()) if len(scores) else 0.0,
            "picked_score_min": float(scores[torch.as_tensor(picks)].min()) if len(picks)
            else 0.0,
        }
        return picks


# -- KCFU training (option kafal.kcfu) -----------------------------------------------------------
ABSENT_LOGIT = -1e4  # a class with no local label: finite "log 0" (exp underflows to exactly 0)


def log_count_prior(counts: np.ndarray) -> torch.Tensor:
    """a_c = log n_c for present classes, a large finite negative for absent ones (KAFAL's
    logit adjustment; −inf would turn a 0 · (−inf) into NaN in the backward pass)."""
    c = torch.as_tensor(np.asarray(counts), dtype=torch.float32)
    return torch.where(c > 0, torch.log(c.clamp_min(1.0)), torch.full_like(c, ABSENT_LOGIT))


def inverse_frequency_weights(counts: np.ndarray) -> torch.Tensor:
    """w_c = (1 / n_c) / Σ_{c' present} 1 / n_c' for the classes the client has labels of,
    w_c = 0 for the absent ones (KAFAL KCFU as the authors' code weights it: normalised to
    sum 1; the classes a client has few labels of weigh most)."""
    c = torch.as_tensor(np.asarray(counts), dtype=torch.float32)
    inv = torch.where(c > 0, 1.0 / c.clamp_min(1.0), torch.zeros_like(c))
    total = inv.sum()
    return inv / total if float(total) > 0 else inv


def beta22(gen: torch.Generator, n: int | None = None) -> float | torch.Tensor:
    """Beta(2, 2) draws: the median of three uniforms (the 2nd order statistic of 3 U(0,1) is
    Beta(2, 2)), from the client's own seeded generator; one float, or `n` of them."""
    if n is None:
        return float(torch.rand(3, generator=gen).median())
    return torch.rand(n, 3, generator=gen).median(dim=1).values


def kcfu_loss(logits: torch.Tensor, y: torch.Tensor, prior: torch.Tensor,
              student_mix: torch.Tensor | None = None, teacher_mix: torch.Tensor | None = None,
              weights: torch.Tensor | None = None, lam: torch.Tensor | None = None,
              partner: torch.Tensor | None = None) -> torch.Tensor:
    """KAFAL KCFU: CE(logits + a, y) + mean_i w_i · (1/C) Σ_c p_g,c log(p_g,c / p_l,c),
    where x̃_i = λ_i x_i + (1 − λ_i) x_{j(i)} is the unlabeled mixup, p_g the global
    (teacher) and p_l the local (student) softmax on it, ŷ the teacher's pseudo-labels and
    the KL averaged over the C classes (the authors' code: `kl_div(..., reduction="none")
    .mean(1)`). w_i = w[ŷ_i], or, with `lam` and `partner` (each row's λ_i and j(i)),
    λ_i w[ŷ_i] + (1 − λ_i) w[ŷ_{j(i)}] as KAFAL's main.py mixes them. Without mixup
    logits, just the logit-adjusted CE."""
    loss = F.cross_entropy(logits.float() + prior, y)  # logit-adjusted CE
    if student_mix is None or teacher_mix is None or weights is None:
        return loss
    log_pt = F.log_softmax(teacher_mix.float(), 1)
    log_ps = F.log_softmax(student_mix.float(), 1)
    kl = (log_pt.exp() * (log_pt - log_ps)).mean(1)  # KL(p_g ‖ p_l) / C per sample
    pseudo = log_pt.argmax(1)
    w = weights[pseudo]  # inverse local frequency of the global pseudo-label
    if lam is not None and partner is not None:  # KAFAL main.py: the weights mixed by λ
        lam = lam.reshape(-1).to(w.dtype)
        w = lam * w + (1.0 - lam) * weights[pseudo[partner]]
    return loss + (w * kl).mean()


def kcfu_objectives(engine, global_state, labeled: Sequence[np.ndarray], labels: np.ndarray,
                    pools: Sequence[np.ndarray], distill: bool, partner: str = "shared",
                    mixed_weights: bool = True) -> Callable[[int], object]:
    """Client k's KCFU objective for one FL round (the engine calls it in place of CE). The
    teacher is the round's global model, frozen; each step draws as many unlabeled samples
    as the labeled batch from U_k (augmented like it) and mixes each with a partner, one
    λ ~ Beta(2, 2) per sample. `partner`: shared = one partner j for the whole batch (KAFAL
    main.py: `np.random.choice(n, replace=False)` without a size is one scalar) |
    permutation = a permutation of the batch; `mixed_weights`: the KD weights mixed by λ
    (main.py) or w[ŷ_i] alone."""
    C = engine.num_classes
    teacher: nn.Module | None = None
    if distill:
        teacher = engine.new_model(0)
        teacher.load_state_dict(global_state)
        teacher.eval()

    def for_client(k: int):
        counts = np.bincount(np.asarray(labels[labeled[k]], dtype=np.int64), minlength=C)
        prior = log_count_prior(counts).to(engine.device)
        weights = inverse_frequency_weights(counts).to(engine.device)
        unl = torch.as_tensor(np.setdiff1d(pools[k], labeled[k]), dtype=torch.int64)

        def objective(model, xb, logits, yb, gen):
            if teacher is None or len(unl) < 2:
                return kcfu_loss(logits, yb, prior)
            pick = unl[torch.randint(len(unl), (len(yb),), generator=gen)].to(engine.device)
            xu = engine.train_batch(pick, gen)
            lam = beta22(gen, len(pick)).to(engine.device).view(-1, 1, 1, 1)  # one per sample
            if partner == "shared":  # one partner for the whole batch (KAFAL main.py)
                j = torch.randint(len(pick), (1,), generator=gen).expand(len(pick))
            else:
                j = torch.randperm(len(pick), generator=gen)
            j = j.to(engine.device)
            mix = lam * xu + (1.0 - lam) * xu[j]  # mixup of unlabeled pairs
            with torch.no_grad():
                t_logits, _ = teacher(mix)
            s_logits, _ = model(mix)
            return kcfu_loss(logits, yb, prior, s_logits, t_logits, weights,
                             *((lam, j) if mixed_weights else ()))

        return objective

    return for_client
