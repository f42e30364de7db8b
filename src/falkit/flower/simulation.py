"""An in-process Flower simulation of a falkit run: Flower's simulation runtime (Ray
backend) runs the ServerApp and one ClientApp per partition, with the App's run config
(APP_DIR's pyproject defaults fused with `run_config`), as `flwr run` does with a simulation
SuperLink, but inside this process."""

from __future__ import annotations

from typing import Any

from flwr.app import Context, RecordDict
from flwr.common.config import get_fused_config_from_dir
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.telemetry import EventType

from falkit.flower import APP_DIR


def simulate(run_config: dict[str, Any], num_supernodes: int, num_cpus: int = 2,
             client_cpus: int = 1, server_app: Any = None) -> None:
    """Run the falkit Flower App on `num_supernodes` simulated nodes. `run_config` overrides
    the App's config (e.g. {"overrides": "data.dataset=digits strategy=fairfal"});
    `server_app` replaces falkit's ServerApp (tests wrap it)."""
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
                    backend_config={"client_resources": {"num_cpus": client_cpus},
                                    "init_args": {"num_cpus": num_cpus}},
                    server_app_context=context, app_dir=str(APP_DIR), is_app=True, run=run,
                    exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE)
