"""FedDyn (Acar, Zhao, Matas, Mattina, Whatmough, Saligrama, "Federated Learning Based on
Dynamic Regularization", ICLR 2021), Algorithm 1, over the trainable parameters θ:

* client k in round t minimises L_k(θ) − ⟨∇L_k(θ_k^{t−1}), θ⟩ + (α/2)‖θ − θ^{t−1}‖²
  (its dynamic regulariser; the linear term's gradient state starts at 0), then updates
  ∇L_k(θ_k^t) = ∇L_k(θ_k^{t−1}) − α(θ_k^t − θ^{t−1});
* the server keeps h: h^t = h^{t−1} − α (1/m) Σ_{k∈P_t} (θ_k^t − θ^{t−1}) (m: all clients),
  and sets θ^t = (1/|P_t|) Σ_{k∈P_t} θ_k^t − (1/α) h^t.

The participants' mean is uniform, as Algorithm 1 writes it; buffers (BN running statistics)
are averaged as in FedAvg. α is `[feddyn] alpha` (the paper's grid 0.1, 0.01, 0.001; its
code's default 0.01). On Flower a client keeps its gradient state in its own memory and the
server computes h from the weights it receives: nothing travels beyond the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from falkit.fl.algorithms.base import Client, FedAvg, State, register, weighted_average
from falkit.options import option


@dataclass
class FedDynOptions:
    """[feddyn]"""

    alpha: float = option(0.01, low=0, low_in=False)  # α of the dynamic regulariser


@register
class FedDyn(FedAvg):
    """FedDyn: a dynamic regulariser per client, the server's h corrects the mean."""

    name = "feddyn"
    description = "FedDyn: dynamic regulariser per client, server state h ([feddyn] alpha)"
    options = FedDynOptions

    def __init__(self, alpha: float = 0.01, **options: Any):
        super().__init__(**options)
        self.alpha = float(alpha)
        self.h: State = {}  # the server's state, zero at start
        self.grads: dict[int, State] = {}  # ∇L_k(θ_k^{t−1}) per client, zero at start
        self.names: list[str] = []
        self._stacked: dict[tuple[int, ...], State] = {}

    def begin_round(self, global_state: State, param_names: list[str]) -> None:
        self.names = list(param_names)
        self._stacked = {}
        if not self.h:
            self.h = {n: torch.zeros_like(global_state[n]) for n in self.names}

    def begin_client(self, model: nn.Module, global_state: State, client: Client) -> None:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        client.global_params = {n: global_state[n].detach() for n in names}
        client.extras["grad"] = (self.grads.get(client.id)
                                 or {n: torch.zeros_like(global_state[n]) for n in names})

    def _term(self, p: torch.Tensor, g: torch.Tensor, w: torch.Tensor, dims: int
              ) -> torch.Tensor:
        """−⟨g, θ⟩ + (α/2)‖θ − θ^{t−1}‖², summed over all but the first `dims` axes."""
        shape = (-1,) if dims == 0 else (p.shape[0], -1)  # 0-d parameters too
        lin = (g * p).reshape(shape).sum(-1)
        quad = ((p - w) ** 2).reshape(shape).sum(-1)
        return -lin + 0.5 * self.alpha * quad  # FedDyn Algorithm 1, the client's objective

    def extra_loss(self, model: nn.Module, client: Client) -> torch.Tensor | None:
        g, w = client.extras["grad"], client.global_params
        return sum(self._term(p, g[n], w[n], 0) for n, p in model.named_parameters()
                   if n in w)

    def extra_loss_batched(self, params: State, clients: list[Client]) -> torch.Tensor | None:
        ids = tuple(c.id for c in clients)  # each client's gradient state, stacked once
        grads = self._stacked.get(ids)
        if grads is None:
            grads = {n: torch.stack([c.extras["grad"][n] for c in clients])
                     for n in clients[0].extras["grad"]}
            self._stacked[ids] = grads
        w = clients[0].global_params  # one global model for the round
        return sum(self._term(p, grads[n], w[n], 1) for n, p in params.items() if n in w)

    def end_client(self, model: nn.Module, global_state: State, client: Client) -> None:
        assert client.state is not None
        g = client.extras["grad"]
        client.extras["grad_new"] = {  # ∇L_k(θ_k^t) = ∇L_k(θ_k^{t−1}) − α(θ_k^t − θ^{t−1})
            n: g[n] - self.alpha * (client.state[n] - global_state[n]) for n in g}

    def aggregate(self, global_state: State, clients: list[Client], num_clients: int) -> State:
        out = weighted_average(clients, global_state)  # buffers (and a template)
        names = self.names or list(self.h)
        for n in names:
            mean = torch.zeros_like(global_state[n])
            drift = torch.zeros_like(global_state[n])
            for c in clients:  # in client order: deterministic sums
                assert c.state is not None
                mean.add_(c.state[n], alpha=1.0 / len(clients))
                drift.add_(c.state[n] - global_state[n])
            self.h[n] = self.h[n] - self.alpha / num_clients * drift  # FedDyn Alg. 1: h^t
            out[n] = mean - self.h[n] / self.alpha  # θ^t
        for c in clients:
            if "grad_new" in c.extras:  # a client elsewhere keeps its own state
                self.grads[c.id] = c.extras["grad_new"]
        return out

    # on Flower: the gradient state stays with its client; h is the server's
    def at_client(self, client_id: int, downlink: State, memory: State) -> None:
        self.grads = {client_id: dict(memory)} if memory else {}

    def client_memory(self, client: Client) -> State:
        return client.extras["grad_new"]

    def reset(self) -> None:
        self.h, self.grads = {}, {}

    def state_dict(self) -> dict[str, Any]:
        return {"h": self.h, "grads": self.grads}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.h = state.get("h", {})
        self.grads = state.get("grads", {})
