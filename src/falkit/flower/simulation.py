"""An in-process Flower simulation of a falkit run with Flower's public API
(`flwr.simulation.run_simulation`, Ray backend): the ServerApp and one ClientApp per
partition, given the App's run config (`app_dir()`'s `[tool.flwr.app.config]` defaults fused
with `run_config`, as `flwr run` fuses them)."""

from __future__ import annotations

import math
import tomllib
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from falkit.config import flatten
from falkit.flower.common import app_dir


def backend_config(num_cpus: int = 2, client_cpus: int = 1,
                   client_gpus: float | None = None) -> dict[str, dict[str, Any]]:
    """The Ray backend's config: `num_cpus` for the simulation, `client_cpus` per ClientApp,
    so num_cpus // client_cpus clients run in parallel. With a CUDA GPU (`client_gpus` None:
    when torch sees one) each ClientApp gets an equal share of a GPU: the parallel clients
    spread over the GPUs, ceil(parallel / GPUs) to a GPU, each 1 / that of it (one GPU, two
    clients: 0.5 each). Ray hides the GPUs from a ClientApp without a share
    (CUDA_VISIBLE_DEVICES is empty), so a run with runtime.device=cuda needs one. Without a
    GPU the config is the CPU-only one."""
    config: dict[str, dict[str, Any]] = {"client_resources": {"num_cpus": client_cpus},
                                         "init_args": {"num_cpus": num_cpus}}
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if client_gpus is None:
        parallel = max(1, num_cpus // max(client_cpus, 1))
        client_gpus = 1.0 / math.ceil(parallel / gpus) if gpus else 0.0
    if client_gpus > 0:
        config["client_resources"]["num_gpus"] = float(client_gpus)
        if gpus:
            config["init_args"]["num_gpus"] = gpus
    return config


def app_run_config(run_config: dict[str, Any]) -> dict[str, Any]:
    """The App's run-config defaults with `run_config`'s keys on top (unknown keys are
    refused by the ServerApp, as with `flwr run`)."""
    with (app_dir() / "pyproject.toml").open("rb") as fh:
        defaults = flatten(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])
    return {**defaults, **run_config}


def _with_run_config(context: Context, run_config: dict[str, Any]) -> Context:
    # the node's own state object: what a ClientApp stores there persists across messages
    return Context(run_id=context.run_id, node_id=context.node_id,
                   node_config=context.node_config, state=context.state,
                   run_config=dict(run_config))


class ConfiguredClientApp(ClientApp):
    """falkit's ClientApp, handed the run config `run_simulation` cannot pass."""

    def __init__(self, run_config: dict[str, Any]):
        super().__init__()
        self.run_config = run_config

    def __call__(self, message: Message, context: Context) -> Message:
        from falkit.flower.client_app import app

        return app(message, _with_run_config(context, self.run_config))


def simulate(run_config: dict[str, Any], num_supernodes: int, num_cpus: int = 2,
             client_cpus: int = 1, server_main: Any = None,
             client_gpus: float | None = None) -> None:
    """Run the falkit Flower App on `num_supernodes` simulated nodes. `run_config` sets the
    App's run-config keys (e.g. {"data.dataset": "digits", "strategy": "fairfal"});
    `server_main(grid, context)` replaces falkit's ServerApp main (tests wrap it).
    `client_gpus`: each ClientApp's GPU share (None: an equal share of the GPUs when torch
    sees one, see `backend_config`)."""
    from flwr.simulation import run_simulation

    from falkit.flower.server_app import main

    fused = app_run_config(run_config)
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        (server_main or main)(grid, _with_run_config(context, fused))

    run_simulation(server_app=server, client_app=ConfiguredClientApp(fused),
                   num_supernodes=num_supernodes,
                   backend_config=backend_config(num_cpus, client_cpus, client_gpus))
