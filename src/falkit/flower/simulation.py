"""An in-process Flower simulation of a falkit run: Flower's simulation runtime (Ray
backend) runs the ServerApp and one ClientApp per partition, with the App's run config
(APP_DIR's pyproject defaults fused with `run_config`), as `flwr run` does with a simulation
SuperLink, but inside this process."""

from __future__ import annotations

import math
from typing import Any

import torch
from flwr.app import Context, RecordDict
from flwr.common.config import get_fused_config_from_dir
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.telemetry import EventType

from falkit.flower import APP_DIR


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


def simulate(run_config: dict[str, Any], num_supernodes: int, num_cpus: int = 2,
             client_cpus: int = 1, server_app: Any = None,
             client_gpus: float | None = None) -> None:
    """Run the falkit Flower App on `num_supernodes` simulated nodes. `run_config` overrides
    the App's config (e.g. {"overrides": "data.dataset=digits strategy=fairfal"});
    `server_app` replaces falkit's ServerApp (tests wrap it). `client_gpus`: each ClientApp's
    GPU share (None: an equal share of the GPUs when torch sees one, see `backend_config`)."""
    # flwr.simulation.run_simulation takes no run config: its internal entry point (the one
    # `flwr run` reaches) does; flwr is pinned to 1.41
    from flwr.simulation.run_simulation import _run_simulation

    from falkit.flower.client_app import app as client_app
    from falkit.flower.server_app import app as default_server_app

    server_app = server_app or default_server_app

    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.override_config = dict(run_config)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (
        1, run.run_id, SUPERLINK_NODE_ID)
    fused = get_fused_config_from_dir(APP_DIR, run.override_config)
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(),
                      run_config=fused)
    _run_simulation(num_supernodes=num_supernodes, client_app=client_app, server_app=server_app,
                    backend_config=backend_config(num_cpus, client_cpus, client_gpus),
                    server_app_context=context, app_dir=str(APP_DIR), is_app=True, run=run,
                    exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE)
