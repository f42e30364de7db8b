"""FedProx (Li et al., MLSys 2020): a proximal term in every client's local loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from falkit.fl.algorithms.base import (
    Client,
    FedAvg,
    State,
    _param_names,
    register,
)


@register
class FedProx(FedAvg):
    """FedProx (Li et al. 2020): local loss += (mu/2) Σ_params ‖w − w_global‖²."""

    name = "fedprox"
    description = "FedProx: proximal term (fl.mu/2)·‖w − w_global‖² in the local loss"

    @classmethod
    def config_options(cls, cfg: Any) -> dict[str, Any]:
        return {"mu": cfg.fl.mu}

    def __init__(self, mu: float = 0.01, **options: Any):
        super().__init__(**options)
        self.mu = float(mu)

    def begin_client(self, model: nn.Module, global_state: State, client: Client) -> None:
        client.global_params = {n: global_state[n].detach() for n in _param_names(model)}

    def extra_loss(self, model: nn.Module, client: Client) -> torch.Tensor | None:
        if self.mu == 0:
            return None
        prox = sum(((p - client.global_params[n]) ** 2).sum()
                   for n, p in model.named_parameters() if n in client.global_params)
        return 0.5 * self.mu * prox  # FedProx Eq. 2

    def extra_loss_batched(self, params: State, clients: list[Client]) -> torch.Tensor | None:
        if self.mu == 0:
            return None
        prox = sum(((p - clients[0].global_params[n]) ** 2).flatten(1).sum(1)
                   for n, p in params.items() if n in clients[0].global_params)
        return 0.5 * self.mu * prox  # FedProx Eq. 2, per client (one global model)
