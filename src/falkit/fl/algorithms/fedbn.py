"""FedBN (Li, Jiang, Zhang, Kamp, Dou, "FedBN: Federated Learning on Non-IID Features via
Local Batch Normalization", ICLR 2021), Algorithm 1: every client keeps its BatchNorm layers
— their affine weight and bias and their running statistics — local; the server averages
every other entry as FedAvg does (labeled-count weights), and never sees the BatchNorm ones.

A client trains, queries (its "global" model) and is evaluated with the aggregated weights
plus its own BatchNorm entries (`personal`); before its first round it has none of its own
and uses the initial ones. The evaluation is per client, as in the paper: in process the
test set is dealt out in the blocks the Flower clients evaluate (`falkit.site.test_share`),
each block with its client's model. On Flower the BatchNorm entries stay in the client's FL
memory and are never in an uplink (`local_keys`, audited). A backbone without BatchNorm
makes FedBN FedAvg.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from falkit.fl.algorithms.base import Client, FedAvg, State, register, weighted_average


def batchnorm_keys(model: nn.Module) -> frozenset[str]:
    """The state-dict names of every BatchNorm layer's entries of `model`."""
    out = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            prefix = f"{name}." if name else ""
            out.update(prefix + k for k in module.state_dict())
    return frozenset(out)


@register
class FedBN(FedAvg):
    name = "fedbn"
    description = "FedBN: BatchNorm layers stay local; every other weight FedAvg-averaged"

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.keys: frozenset[str] = frozenset()
        self.local: dict[int, State] = {}  # client -> its BatchNorm entries

    def local_keys(self, model: nn.Module) -> frozenset[str]:
        self.keys = batchnorm_keys(model)
        return self.keys

    def personal(self, global_state: State, client_id: int) -> State:
        own = self.local.get(client_id)
        return {**global_state, **own} if own else global_state

    def begin_client(self, model: nn.Module, global_state: State, client: Client) -> None:
        if not self.keys:
            self.local_keys(model)

    def end_client(self, model: nn.Module, global_state: State, client: Client) -> None:
        assert client.state is not None
        self.local[client.id] = {k: client.state[k] for k in self.keys}

    def aggregate(self, global_state: State, clients: list[Client], num_clients: int) -> State:
        shared = {k: v for k, v in global_state.items() if k not in self.keys}
        avg = weighted_average(clients, shared)  # FedBN Alg. 1: all but the BatchNorm layers
        return {**global_state, **{k: v for k, v in avg.items() if k not in self.keys}}

    # on Flower: the BatchNorm entries are the client's memory, never sent
    def at_client(self, client_id: int, downlink: State, memory: State) -> None:
        self.local = {client_id: dict(memory)} if memory else {}

    def client_memory(self, client: Client) -> State:
        return self.local.get(client.id, {})

    def reset(self) -> None:
        self.local = {}

    def state_dict(self) -> dict[str, Any]:
        return {"local": self.local}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.local = dict(state.get("local", {}))
