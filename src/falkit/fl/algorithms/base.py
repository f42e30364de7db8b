"""The FL-algorithm contract and FedAvg (ALGORITHMS.md §3): what a client adds to local SGD,
and how the server aggregates. One object per run; everything per client lives in the
`Client` record a call returns, so clients can train concurrently (engine workers). Every
other algorithm is one module of this package (`fedprox.py`, ...), found without a list."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from falkit.errors import FalkitError

State = dict[str, torch.Tensor]


def state_bytes(state: State) -> int:
    """Bytes of every state-dict tensor, buffers included (ALGORITHMS.md §7 communication)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def client_weight(cfg: Any, labeled: int) -> float:
    """A client's aggregation weight: its labeled count (FedAvg) or 1 (`fl.weighting =
    "uniform"`, FAST's option)."""
    return float(labeled) if cfg.fl.weighting == "labeled" else 1.0


ALGORITHMS: dict[str, type[FedAvg]] = {}  # name -> class (`register`; falkit.registry)


def register(cls: type[FedAvg]) -> type[FedAvg]:
    """Class decorator: make `cls` an `fl.algorithm` under its `name`."""
    ALGORITHMS[cls.name] = cls
    return cls


class TrainingDiverged(FalkitError):
    """Weights became NaN or infinite: the run stops instead of finishing with them."""


def check_finite(state: State, where: str) -> None:
    """Refuse NaN/inf weights (a NaN or infinite loss makes them so) after `where`."""
    bad = [n for n, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainingDiverged(f"training diverged in {where}: {len(bad)} of {len(state)} "
                               f"weight tensors are NaN or infinite (e.g. {bad[0]}); lower "
                               "fl.lr (or local_model.lr) and run again; the finished cycles "
                               "are kept")


def clone_state(model: nn.Module) -> State:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class Client:
    """One client's round: filled by begin_client, read by the hooks and by aggregate."""

    id: int
    weight: float  # labeled count (FedAvg weight)
    global_params: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    state: State | None = None  # the client's weights after local training
    steps: int = 0
    lr: float = 0.0


class Aggregator:
    """Weighted average of the floating-point entries of client states; integer buffers
    (num_batches_tracked) are taken from the first client, never averaged (ALGORITHMS.md
    §3)."""

    def __init__(self, like: State):
        self.sum = {k: torch.zeros_like(v) for k, v in like.items() if v.is_floating_point()}
        self.first: State = {}
        self.total_weight = 0.0

    def add(self, state: State, weight: float) -> None:
        for k, acc in self.sum.items():
            acc.add_(state[k], alpha=weight)
        if not self.first:
            self.first = {k: v.clone() for k, v in state.items() if not v.is_floating_point()}
        self.total_weight += weight

    def result(self) -> State:
        if self.total_weight <= 0:
            raise ValueError("no client contributed to the aggregate")
        out = {k: acc / self.total_weight for k, acc in self.sum.items()}
        out.update(self.first)
        return out


def weighted_average(clients: list[Client], like: State) -> State:
    agg = Aggregator(like)
    for c in clients:  # client order: deterministic floating-point sums
        assert c.state is not None
        agg.add(c.state, c.weight)
    return agg.result()


def _param_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@register
class FedAvg:
    """FedAvg (McMahan et al. 2017): global = Σ_k |L_k|/Σ|L| · w_k over every state entry,
    BatchNorm running statistics included.

    The base of every FL algorithm: a subclass sets `name` and `description`, overrides the
    hooks below it needs, and is registered with `@register`. Its settings are an options
    dataclass (`options`, falkit.options: the config section [<name>]) or, for the
    algorithms older than that, keys of [fl] that `config_options` reads."""

    name: ClassVar[str] = "fedavg"
    description: ClassVar[str] = ("FedAvg: labeled-count weighted average of all weights "
                                  "and BN buffers")
    options: ClassVar[type | None] = None  # its options dataclass: the section [<name>]

    def __init__(self, **options: Any):
        self.options = options

    @classmethod
    def config_options(cls, cfg: Any) -> dict[str, Any]:
        """The keyword options this algorithm is built with from a run's config: its own
        section's fields (the default), or the [fl] keys it has always read."""
        section = cfg.section(cls.name) if cls.options is not None else None
        return dataclasses.asdict(section) if section is not None else {}

    def begin_round(self, global_state: State, param_names: list[str]) -> None:
        """Called on the main thread before the round's clients train."""

    def begin_client(self, model: nn.Module, global_state: State, client: Client) -> None:
        """Called once the model holds the global weights, before local SGD."""

    def extra_loss(self, model: nn.Module, client: Client) -> torch.Tensor | None:
        """A term added to the local loss (FedProx's proximal term)."""
        return None

    def correct_grads(self, model: nn.Module, client: Client) -> None:
        """Called after backward, before the optimizer step (SCAFFOLD's correction)."""

    def end_client(self, model: nn.Module, global_state: State, client: Client) -> None:
        """Called after local SGD with client.state, steps and lr filled in."""

    # Clients trained as one batched computation (Engine, runtime.batch_clients): the same
    # hooks over weights stacked along a leading client dimension, `clients` in that order.
    def extra_loss_batched(self, params: State, clients: list[Client]) -> torch.Tensor | None:
        """Each client's `extra_loss` as one tensor of shape (len(clients),)."""
        return None

    def correct_grads_batched(self, params: State, clients: list[Client]) -> None:
        """`correct_grads` on the stacked parameters' gradients."""

    def aggregate(self, global_state: State, clients: list[Client], num_clients: int) -> State:
        return weighted_average(clients, global_state)

    # Entries of the model that never leave a client (FedBN: its BatchNorm layers').
    def local_keys(self, model: nn.Module) -> frozenset[str]:
        """The state entries of `model` that stay with each client: it trains, queries and
        is evaluated with its own (`personal`), its uplink omits them (audited on Flower)
        and the server's global model keeps its initial ones. Default: none."""
        return frozenset()

    def personal(self, global_state: State, client_id: int) -> State:
        """The global model as client `client_id` uses it: `global_state` with the client's
        own `local_keys` entries (once it has trained). Default: `global_state` itself."""
        return global_state

    @classmethod
    def batchable(cls) -> bool:
        """Whether clients may train as one batched computation with this algorithm: each
        per-client hook it overrides (`extra_loss`, `correct_grads`) has its batched form.
        Where one is missing the engine trains one client at a time (never without the
        algorithm's term); tests/test_batched.py checks batched = one at a time for every
        registered algorithm."""
        return ((cls.extra_loss is FedAvg.extra_loss
                 or cls.extra_loss_batched is not FedAvg.extra_loss_batched)
                and (cls.correct_grads is FedAvg.correct_grads
                     or cls.correct_grads_batched is not FedAvg.correct_grads_batched))

    def reset(self) -> None:
        """A fresh model: forget any server/client state (called at each fresh init)."""

    # Clients on other machines (falkit.flower): what a round carries besides the weights.
    # Names of the scalars and of the parameter-shaped arrays a client sends the server:
    uplink_scalars: tuple[str, ...] = ()
    uplink_arrays: bool = False

    def downlink(self) -> State:
        """Server: arrays every participant receives with the global weights."""
        return {}

    def at_client(self, client_id: int, downlink: State, memory: State) -> None:
        """Client: install the server's `downlink` and this client's own `memory` (what
        `client_memory` returned last round) before `begin_client`."""

    def uplink(self, client: Client) -> tuple[State, dict[str, float]]:
        """Client, after `end_client`: the arrays and scalars the server aggregates with."""
        return {}, {}

    def client_memory(self, client: Client) -> State:
        """Client, after `end_client`: what it keeps for its next round."""
        return {}

    def from_uplink(self, client: Client, arrays: State, scalars: dict[str, float]) -> None:
        """Server: fill `client` (weights, weight, lr already set) from its uplink so that
        `aggregate` treats it as a client trained in process."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned (resume)."""


def create(name: str, **options: Any) -> FedAvg:
    """The FL algorithm registered as `name` (a built-in, a plug-in's entry point, or a
    `module:Class` spec; falkit.registry), built with `options`."""
    from falkit import registry

    return registry.algorithm(name)(**options)


def for_config(cfg: Any) -> FedAvg:
    """The run's FL algorithm (`fl.algorithm`) with the options its config gives it."""
    from falkit import registry

    cls = registry.algorithm(cfg.fl.algorithm)
    return cls(**cls.config_options(cfg))
