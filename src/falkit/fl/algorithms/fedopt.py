"""Adaptive server optimisers: FedAdagrad, FedYogi and FedAdam (Reddi, Charles, Zaheer,
Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated Optimization", ICLR 2021),
Algorithm 2, over the trainable parameters x. The clients train as in FedAvg; the server
treats the round's mean update as a pseudo-gradient:

* Δ_t = Σ_k w_k (x_k^t − x_t) / Σ_k w_k (Alg. 2: 1/|S| Σ Δ_i^t, i.e. `fl.weighting =
  uniform`; falkit's default weights w_k = |L_k|, as its FedAvg and Flower's FedOpt do);
* m_t = β1 m_{t−1} + (1 − β1) Δ_t, with m_{−1} = 0;
* v_t = v_{t−1} + Δ_t² (FedAdagrad) | v_{t−1} − (1 − β2) Δ_t² sign(v_{t−1} − Δ_t²) (FedYogi)
  | β2 v_{t−1} + (1 − β2) Δ_t² (FedAdam), with v_{−1} = τ² (Alg. 2: v_{−1} ≥ τ²;
  `v_init = "zero"`: Flower's strategies start at 0);
* x_{t+1} = x_t + η m_t / (√v_t + τ).

No bias correction (Algorithm 2 has none). The buffers (BatchNorm running statistics) are
averaged as in FedAvg. The server's m and v are its own (checkpointed, reset with a fresh
model); nothing travels beyond the model, so on Flower the ClientApp does FedAvg's work.
Defaults: η = 0.1 (Flower's), β1 = 0.9, β2 = 0.99 (Reddi et al. §5), τ = 1e-3 (their
most-used value; their grid 1e-1 … 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from falkit.fl.algorithms.base import Client, FedAvg, State, register, weighted_average
from falkit.options import Options, option


@dataclass
class FedOptOptions(Options):
    """[fedadam], [fedyogi], [fedadagrad]"""

    eta: float = option(0.1, low=0, low_in=False)  # η: the server's learning rate
    beta1: float = option(0.9, low=0, high=1, high_in=False)  # β1 of m
    beta2: float = option(0.99, low=0, high=1, high_in=False)  # β2 of v (not FedAdagrad's)
    tau: float = option(1e-3, low=0, low_in=False)  # τ: the adaptivity's floor
    v_init: str = option("tau2", choices=("tau2", "zero"))  # v_{−1}: τ² (Alg. 2) | 0 (Flower)


class FedOpt(FedAvg):
    """The server step of Algorithm 2; a subclass gives the second moment (`second`)."""

    options: ClassVar[type | None] = FedOptOptions

    def __init__(self, eta: float = 0.1, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3, v_init: str = "tau2", **options: Any):
        super().__init__(**options)
        self.eta, self.beta1, self.beta2, self.tau = float(eta), float(beta1), float(beta2), \
            float(tau)
        self.v_init = v_init
        self.m: State = {}
        self.v: State = {}
        self.names: list[str] = []

    def second(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        """v_t from v_{t−1} and Δ_t²."""
        raise NotImplementedError

    def begin_round(self, global_state: State, param_names: list[str]) -> None:
        self.names = list(param_names)

    def aggregate(self, global_state: State, clients: list[Client], num_clients: int) -> State:
        out = weighted_average(clients, global_state)  # FedAvg's mean (buffers: that mean)
        for n in self.names:
            x = global_state[n]
            delta = out[n] - x  # Δ_t, the pseudo-gradient
            if n not in self.m:
                self.m[n] = torch.zeros_like(x)
                self.v[n] = (torch.full_like(x, self.tau ** 2) if self.v_init == "tau2"
                             else torch.zeros_like(x))
            self.m[n] = self.beta1 * self.m[n] + (1 - self.beta1) * delta  # Alg. 2: m_t
            self.v[n] = self.second(self.v[n], delta * delta)  # Alg. 2: v_t
            out[n] = x + self.eta * self.m[n] / (self.v[n].sqrt() + self.tau)  # x_{t+1}
        return out

    def reset(self) -> None:
        self.m, self.v = {}, {}

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m = dict(state.get("m", {}))
        self.v = dict(state.get("v", {}))


@register
class FedAdagrad(FedOpt):
    name = "fedadagrad"
    description = "FedAdagrad: server Adagrad on the mean client update ([fedadagrad] eta, tau)"

    def second(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v + d2  # Reddi et al. Alg. 2, FedAdagrad


@register
class FedYogi(FedOpt):
    name = "fedyogi"
    description = "FedYogi: server Yogi on the mean client update ([fedyogi] eta, beta2, tau)"

    def second(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * d2 * torch.sign(v - d2)  # Reddi et al. Alg. 2, FedYogi


@register
class FedAdam(FedOpt):
    name = "fedadam"
    description = "FedAdam: server Adam on the mean client update ([fedadam] eta, beta2, tau)"

    def second(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * d2  # Reddi et al. Alg. 2, FedAdam
