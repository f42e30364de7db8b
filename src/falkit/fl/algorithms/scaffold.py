"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates correct client drift."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from falkit.fl.algorithms.base import (
    Client,
    FedAvg,
    State,
    register,
    weighted_average,
)


@register
class Scaffold(FedAvg):
    """SCAFFOLD (Karimireddy et al. 2020), option II: each step uses g − c_k + c on trainable
    parameters (not BN buffers); c_k⁺ = c_k − c + (w_global − w_k)/(steps · lr);
    c += (1/K) Σ_{k ∈ S} (c_k⁺ − c_k), i.e. the participants' mean × |S|/K."""

    name = "scaffold"
    description = "SCAFFOLD: control variates correct client drift"

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.c: dict[str, torch.Tensor] = {}
        self.c_k: dict[int, dict[str, torch.Tensor]] = {}
        # this round's c − c_k stacked per batched group (correct_grads_batched)
        self._stacked: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}

    def begin_round(self, global_state: State, param_names: list[str]) -> None:
        self._stacked = {}
        if not self.c:  # control variates start at zero
            self.c = {n: torch.zeros_like(global_state[n]) for n in param_names}

    def begin_client(self, model: nn.Module, global_state: State, client: Client) -> None:
        names = list(self.c)
        ck = self.c_k.get(client.id) or {n: torch.zeros_like(self.c[n]) for n in names}
        client.extras["c_k"] = ck
        client.extras["delta"] = {n: self.c[n] - ck[n] for n in names}  # c − c_k

    def correct_grads(self, model: nn.Module, client: Client) -> None:
        delta = client.extras["delta"]
        for n, p in model.named_parameters():
            if p.grad is not None and n in delta:
                p.grad.add_(delta[n])

    def correct_grads_batched(self, params: State, clients: list[Client]) -> None:
        ids = tuple(c.id for c in clients)  # stacked once per group and round
        stacked = self._stacked.get(ids)
        if stacked is None:
            stacked = {n: torch.stack([c.extras["delta"][n] for c in clients])
                       for n in clients[0].extras["delta"]}
            self._stacked[ids] = stacked
        for n, p in params.items():
            if p.grad is not None and n in stacked:
                p.grad.add_(stacked[n])

    def end_client(self, model: nn.Module, global_state: State, client: Client) -> None:
        assert client.state is not None
        ck = client.extras["c_k"]
        scale = 1.0 / max(client.steps * client.lr, 1e-12)
        new = {n: ck[n] - self.c[n] + (global_state[n] - client.state[n]) * scale for n in ck}
        client.extras["c_k_new"] = new
        client.extras["dc"] = {n: new[n] - ck[n] for n in ck}  # c_k⁺ − c_k

    def aggregate(self, global_state: State, clients: list[Client], num_clients: int) -> State:
        for client in clients:  # in client order: deterministic sums
            dc = client.extras["dc"]
            for n in self.c:
                self.c[n] += dc[n] / num_clients
            if "c_k_new" in client.extras:  # a client elsewhere keeps its own c_k
                self.c_k[client.id] = client.extras["c_k_new"]
        return weighted_average(clients, global_state)

    uplink_arrays = True  # c_k⁺ − c_k, one array per trainable parameter

    def downlink(self) -> State:
        return dict(self.c)

    def at_client(self, client_id: int, downlink: State, memory: State) -> None:
        self.c = dict(downlink)
        self.c_k = {client_id: dict(memory)} if memory else {}

    def uplink(self, client: Client) -> tuple[State, dict[str, float]]:
        return client.extras["dc"], {}

    def client_memory(self, client: Client) -> State:
        return client.extras["c_k_new"]

    def from_uplink(self, client: Client, arrays: State, scalars: dict[str, float]) -> None:
        client.extras["dc"] = arrays

    def reset(self) -> None:
        self.c, self.c_k = {}, {}

    def state_dict(self) -> dict[str, Any]:
        return {"c": self.c, "c_k": self.c_k}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.c = state.get("c", {})
        self.c_k = state.get("c_k", {})
