"""FedNova (Wang et al., NeurIPS 2020): normalised averaging by each client's local steps."""

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
    weighted_average,
)


@register
class FedNova(FedAvg):
    """FedNova (Wang et al. 2020): normalised averaging of local updates. Client k reports
    τ_k local steps and a_k = ‖a_k‖₁ (plain SGD: τ_k; momentum ρ:
    [τ_k − ρ(1 − ρ^τ_k)/(1 − ρ)]/(1 − ρ)); the server sets
    w ← w_g − τ_eff Σ_k p_k (w_g − w_k)/a_k with τ_eff = Σ_k p_k a_k. Buffers (BN running
    statistics) are averaged as in FedAvg."""

    name = "fednova"
    description = "FedNova: normalised averaging by each client's local steps"

    @classmethod
    def config_options(cls, cfg: Any) -> dict[str, Any]:
        return {"momentum": cfg.fl.momentum}

    uplink_scalars = ("a",)  # the client's normaliser a_k

    def __init__(self, momentum: float = 0.0, **options: Any):
        super().__init__(**options)
        self.rho = float(momentum)
        self.params: list[str] = []

    def begin_round(self, global_state: State, param_names: list[str]) -> None:
        self.params = list(param_names)

    def uplink(self, client: Client) -> tuple[State, dict[str, float]]:
        return {}, {"a": float(client.extras["a"])}

    def from_uplink(self, client: Client, arrays: State, scalars: dict[str, float]) -> None:
        client.extras["a"] = float(scalars["a"])
        client.extras["params"] = self.params

    def begin_client(self, model: nn.Module, global_state: State, client: Client) -> None:
        client.extras["params"] = _param_names(model)

    def end_client(self, model: nn.Module, global_state: State, client: Client) -> None:
        tau, rho = client.steps, self.rho
        if rho == 0:
            a = float(tau)
        else:
            a = (tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho)
        client.extras["a"] = max(a, 1e-12)

    def aggregate(self, global_state: State, clients: list[Client], num_clients: int) -> State:
        out = weighted_average(clients, global_state)  # buffers (and a template)
        total = sum(c.weight for c in clients)
        p = [c.weight / total for c in clients]
        tau_eff = sum(pk * c.extras["a"] for pk, c in zip(p, clients, strict=True))
        for n in clients[0].extras["params"]:
            d = torch.zeros_like(global_state[n])
            for pk, c in zip(p, clients, strict=True):
                assert c.state is not None
                d.add_(global_state[n] - c.state[n], alpha=pk / c.extras["a"])
            out[n] = global_state[n] - tau_eff * d
        return out
