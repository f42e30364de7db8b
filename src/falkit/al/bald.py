"""BALD with MC dropout: Bayesian Active Learning by Disagreement (Houlsby, Huszár,
Ghahramani, Lengyel 2011) with dropout as approximate Bayesian inference (Gal & Ghahramani,
ICML 2016), as Gal, Islam & Ghahramani apply it to images ("Deep Bayesian Active Learning
with Image Data", ICML 2017). A sample's score is the mutual information between its label
and the model's weights, estimated over T stochastic passes with dropout on:

    I[y; ω | x] ≈ H[(1/T) Σ_t p_t(y|x)] − (1/T) Σ_t H[p_t(y|x)]

(the predictive entropy minus the expected entropy); the top-b scores are queried. The
passes are falkit's declared model output `mc_probs` (falkit.client.PROVIDERS): dropout on
the backbone's classifier input at rate `model.dropout`, the masks drawn from this client's
keyed query RNG. The model must train with that dropout (`model.dropout > 0`). Unlike Gal et
al.'s CNN, which also drops after its convolutions, only the classifier input is dropped
(falkit's backbones have one dropout layer, there): the passes share the eval-mode
features and differ in the classifier's input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from falkit.al.base import QueryContext, Strategy, register
from falkit.al.primitives import as_numpy, entropy, top_k
from falkit.config import Config
from falkit.errors import ConfigError
from falkit.options import Options, option


@dataclass
class BALDOptions(Options):
    """[bald]"""

    passes: int = option(20, low=2)  # T stochastic forward passes (Gal et al. 2017: T = 20)


@register
class BALD(Strategy):
    name = "bald"
    description = "BALD: mutual information over T MC-dropout passes (needs model.dropout > 0)"
    uses_selector = True
    outputs = ("mc_probs",)  # T passes of the query model under dropout
    example_settings = {"model.dropout": "0.5"}  # the model must train with dropout
    options = BALDOptions

    def __init__(self, at: str | None = None, *, passes: int = 20, **options: object):
        super().__init__(at, **options)
        self.passes = int(passes)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.model.dropout <= 0:
            raise ConfigError("strategy bald samples MC dropout: set model.dropout > 0 (e.g. "
                              "model.dropout=0.5) so that the model trains with it")

    def select(self, ctx: QueryContext, budget: int) -> np.ndarray:
        gen = torch.Generator().manual_seed(int(ctx.rng.integers(2**62)))
        p = ctx.provided["mc_probs"](self.query_model, self.passes, gen).double()  # T×N×C
        score = entropy(p.mean(0)) - entropy(p.flatten(0, 1)).view(p.shape[:2]).mean(0)
        picks = top_k(score, budget)  # BALD: the top-b mutual information
        self._diag = {"mutual_information_mean_selected":
                      round(float(as_numpy(score)[picks].mean()), 6)}
        return picks
