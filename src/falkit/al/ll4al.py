"""Learning Loss for Active Learning (LL4AL; Yoo & Kweon, CVPR 2019) in the federated
setting, as ALGORITHMS.md §4 **ll4al** specifies.

Training side: the strategy wraps every backbone of the run in `WithLossModule`
(`falkit.models.lossnet`): a loss-prediction module on the backbone's block outputs, trained
jointly with it (loss = CE + λ · margin ranking loss, λ = 1, margin ξ = 1.0) and federated like
every other parameter — its weights are part of the global state that FedAvg (or any FL
algorithm) aggregates and that the communication accounting counts. From round
r + 1 > int(0.75 · R) of each cycle on (the rounds with the decayed learning rate), the
module's gradient into the backbone is stopped.
The loop reads the wrapper from `wrap_model` and hands it to the engine, which calls the
model's generic `extra_loss` hook in local SGD.

Query side: every unlabeled sample of the client is scored by the predicted loss of the
*global* model's module (batched inference by the engine, provided by the loop as
`ctx.predicted_loss`), and the top-b are taken, ties to the smaller index (LL4AL §3.1:
"the data points with the top-K predicted losses").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from falkit.al.base import QueryContext, Strategy, register
from falkit.al.primitives import as_numpy, top_k
from falkit.models.lossnet import WithLossModule
from falkit.options import Options, option


@dataclass
class LL4ALConfig(Options):
    """[ll4al] Learning Loss (ALGORITHMS.md §4 ll4al): defaults are LL4AL's §4.1 and
    Fig. 2."""

    margin: float = option(1.0, low=0)  # xi of the margin ranking loss
    weight: float = option(1.0, low=0)  # lambda: loss = CE + lambda x ranking loss
    # the module's input is detached in rounds r + 1 > int(this x R)
    detach_from: float = option(0.75, low=0, high=1)
    hidden: int = option(128, low=1)  # width of each block of the loss-prediction module


@register
class LL4AL(Strategy):
    """LL4AL (Yoo & Kweon 2019): top-b predicted loss of the global model's jointly trained,
    federated loss-prediction module. Defaults are the paper's (§4.1: ξ = 1.0, λ = 1,
    128-d per-block features) and ALGORITHMS.md's stop-gradient point (last quarter of rounds).
    """

    name = "ll4al"
    options = LL4ALConfig  # its section [ll4al]
    description = "Learning Loss: top-b loss predicted by a federated loss-prediction module"
    uses_selector = False  # always the global model: only it is trained with the module
    outputs = ("predicted_loss",)  # the module's l̂(x) (falkit.client.PROVIDERS)

    def __init__(self, at: str | None = None, *, margin: float = 1.0, weight: float = 1.0,
                 detach_from: float = 0.75, hidden: int = 128, **options: object):
        super().__init__(at, **options)
        self.margin = float(margin)  # ξ (LL4AL §4.1: 1.0)
        self.weight = float(weight)  # λ (LL4AL §4.1: 1)
        self.detach_from = float(detach_from)  # ALGORITHMS.md §4: rounds r + 1 > int(0.75 R)
        self.hidden = int(hidden)  # LL4AL Fig. 2: 128 per block

    def wrap_model(self, backbone: nn.Module) -> nn.Module:
        """The run's model: the backbone plus the loss-prediction module (state-dict keys of
        the backbone unchanged, the module's under `loss_net.*`)."""
        return WithLossModule(backbone, hidden=self.hidden, margin=self.margin,
                              weight=self.weight, detach_from=self.detach_from)

    def select(self, ctx: QueryContext, budget: int) -> np.ndarray:
        predict = ctx.predicted_loss
        if predict is None:
            raise RuntimeError("ll4al needs the global model's predicted losses: the query "
                               "context has no predicted_loss (falkit.client provides it "
                               "when the run's model carries a loss-prediction module)")
        # l̂(x) for the whole unlabeled pool, one batched pass of the global model
        scores = predict("global", ctx.unlabeled)
        if isinstance(scores, torch.Tensor):  # from whichever device it was computed on
            scores = as_numpy(scores)
        scores = np.asarray(scores, dtype=np.float64)
        picks = top_k(scores, budget)  # top-b predicted loss (LL4AL §3.1); ties: smaller index
        self._diag = {"predicted_loss_mean_selected": round(float(scores[picks].mean()), 6)}
        return picks
