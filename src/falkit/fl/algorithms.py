"""Federated optimisation algorithms: what a client adds to local SGD, and how the server
aggregates (ALGORITHMS.md §3). FedAvg here; FedProx / SCAFFOLD / FedNova plug into the same
hooks (issue 5).
"""

from __future__ import annotations

import torch
from torch import nn

from falkit.errors import ConfigError

State = dict[str, torch.Tensor]


def state_bytes(state: State) -> int:
    """Bytes of every state-dict tensor, buffers included (ALGORITHMS.md §7 communication)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def clone_state(model: nn.Module) -> State:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Aggregator:
    """Streaming weighted average: add each client's state as it finishes, in place, so the
    server never holds K copies of the model (FedAvg: weights = labeled counts)."""

    def __init__(self, like: State):
        self.sum = {k: torch.zeros_like(v, dtype=torch.float64 if not v.is_floating_point()
                                        else v.dtype) for k, v in like.items()}
        self.total_weight = 0.0
        self._like = like

    def add(self, state: State, weight: float) -> None:
        for k, acc in self.sum.items():
            v = state[k]
            if v.is_floating_point():
                acc.add_(v, alpha=weight)
            else:  # integer buffers (num_batches_tracked): summed as float64, cast at the end
                acc.add_(v.to(torch.float64), alpha=weight)
        self.total_weight += weight

    def result(self) -> State:
        if self.total_weight <= 0:
            raise ValueError("no client contributed to the aggregate")
        out: State = {}
        for k, acc in self.sum.items():
            avg = acc / self.total_weight
            like = self._like[k]
            out[k] = avg if like.is_floating_point() else avg.round().to(like.dtype)
        return out


class FedAvg:
    """FedAvg (McMahan et al. 2017): global = Σ_k |L_k|/Σ|L| · w_k over every state entry,
    BatchNorm running statistics included (ALGORITHMS.md §3)."""

    name = "fedavg"

    def begin_client(self, model: nn.Module, global_state: State, client: int) -> None:
        """Called once the client's model holds the global weights, before local SGD."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the local loss (FedProx's proximal term)."""
        return None

    def aggregate(self, global_state: State, agg: Aggregator) -> State:
        return agg.result()


ALGORITHMS: dict[str, tuple[type, str]] = {
    "fedavg": (FedAvg, "FedAvg: labeled-count weighted average of all weights and BN buffers"),
}


def create(name: str) -> FedAvg:
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown fl.algorithm '{name}' (valid: {', '.join(ALGORITHMS)})")
    return ALGORITHMS[name][0]()
