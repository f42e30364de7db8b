"""KAFAL's query rule, KSAS (Cao et al., "Knowledge-Aware Federated Active Learning with
Non-IID Data", ICCV 2023), as ALGORITHMS.md §4 **kafal** specifies.

Knowledge-Specialized Active Sampling scores an unlabeled sample by how much the client's
local model (`last_round`: the client's weights right after its last local update of the
cycle) and the global model disagree *on the client's own class distribution*: both models'
logits are shifted by the log class counts a_c = log n_c of the client's labeled set L_k,
restricted to the classes present in L_k, and the score is the symmetric KL divergence

    s(x) = ½ [KL(softmax z_g ‖ softmax z_l) + KL(softmax z_l ‖ softmax z_g)],
    z_m = logits_m(x) + a.

The optional KCFU training (`kafal.kcfu`) is not part of this module.
"""

from __future__ import annotations

import numpy as np
import torch

from falkit.al.base import QueryContext, Strategy, register
from falkit.al.primitives import top_k

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
    counts_t = torch.as_tensor(np.asarray(counts), dtype=torch.float64)
    present = counts_t > 0
    if not bool(present.any()):
        present = torch.ones_like(present)
        prior = torch.zeros(int(present.sum()), dtype=torch.float64)
    else:
        prior = torch.log(counts_t[present])
    z_g = torch.log(p_global.double().clamp_min(_EPS))[:, present] + prior
    z_l = torch.log(p_local.double().clamp_min(_EPS))[:, present] + prior
    # log_softmax of finite inputs is finite, so both KL terms are finite (no 0·log 0 issue:
    # every adjusted probability is strictly positive)
    lq_g = torch.log_softmax(z_g, dim=1)
    lq_l = torch.log_softmax(z_l, dim=1)
    q_g, q_l = lq_g.exp(), lq_l.exp()
    kl_gl = (q_g * (lq_g - lq_l)).sum(1)
    kl_lg = (q_l * (lq_l - lq_g)).sum(1)
    # KL ≥ 0 mathematically; clamp away tiny negative rounding so scores sort cleanly
    return (0.5 * (kl_gl + kl_lg)).clamp_min(0.0)


@register
class KAFAL(Strategy):
    """KAFAL's KSAS query (Cao et al., ICCV 2023): top-b symmetric KL between the global and
    the `last_round` local model under the client's log-count prior. Ties — including the
    all-zero scores of a client with a single labeled class — go to the smaller position."""

    name = "kafal"
    description = "KAFAL KSAS: top-b symmetric KL of global vs local model, log-count prior"
    uses_selector = False  # a fixed design: always compares the global and the local model
    local_model_mode = "last_round"

    def __init__(self, at: str | None = None, *, kcfu: bool = False, **options: object):
        super().__init__(at, **options)
        self.kcfu = bool(kcfu)  # KCFU training is handled by the trainer, not by the query

    @property
    def needs_local_model(self) -> bool:
        return True  # the score is a global/local disagreement

    def select(self, ctx: QueryContext, budget: int) -> np.ndarray:
        counts = np.bincount(np.asarray(ctx.labeled_y, dtype=np.int64),
                             minlength=ctx.num_classes)
        scores = kafal_scores(ctx.probs("global", "unlabeled"),
                              ctx.probs("local", "unlabeled"), counts)
        picks = top_k(scores.numpy(), budget)
        self._diag = {
            "present_classes": int((counts > 0).sum()),
            "score_max": float(scores.max()) if len(scores) else 0.0,
            "score_mean": float(scores.mean()) if len(scores) else 0.0,
            "picked_score_min": float(scores[torch.as_tensor(picks)].min()) if len(picks)
            else 0.0,
        }
        return picks
