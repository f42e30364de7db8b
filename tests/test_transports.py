"""One cycle, two transports (issue 15): every strategy gives the same queries.jsonl and
metrics in process and through falkit's Flower ServerApp and ClientApps, and a Flower run
stopped after a finished cycle resumes to the uninterrupted run's results.

The Flower side runs the real ServerApp federation and the real ClientApp (called through
flwr's public `ClientApp.__call__` with Flower `Message`s and per-node `Context`s) on an
in-memory Grid; tests/test_flower.py runs the same App under Flower's simulation engine and
on a loopback deployment."""

import csv
import itertools
import json
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from flwr.app import Context, Message, RecordDict  # noqa: E402

from falkit import config  # noqa: E402
from falkit.al.base import list_ids  # noqa: E402
from falkit.flower import client_app  # noqa: E402
from falkit.flower.server_app import run_server  # noqa: E402
from falkit.loop import run  # noqa: E402

SMALL = {
    "data.dataset": "digits", "data.rho": "5", "partition.num_clients": "3",
    "partition.alpha": "1.0", "budget.fraction": "0.05", "budget.cycles": "2",
    "fl.rounds": "2", "fl.local_epochs": "1", "fl.lr": "0.05", "local_model.epochs": "2",
    "model.backbone": "resnet8_preact16", "runtime.threads": "1",
}
_IDS = itertools.count(1)


class MemoryGrid:
    """A Grid whose SuperNodes are ClientApp calls in this process, each node with its own
    Context (node config, state) kept across messages, as a SuperNode keeps it."""

    def __init__(self, run_config: dict, nodes: int = 3, run_id: int | None = None):
        self.run_id = run_id or next(_IDS)
        self.contexts = {
            100 + i: Context(run_id=self.run_id, node_id=100 + i,
                             node_config={"partition-id": i, "num-partitions": nodes},
                             state=RecordDict(), run_config=run_config)
            for i in range(nodes)}
        self.sent: list[str] = []
        self.die_after_selects: int | None = None
        # who is sending: Flower's runtime sets this for a ServerApp (flwr internals; the
        # App itself uses only the public API)
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (
            1, self.run_id, SUPERLINK_NODE_ID)

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            if self.die_after_selects is not None and msg.metadata.message_type == "train" \
                    and self.sent.count("query.select") >= self.die_after_selects:
                raise ConnectionError("the server lost its SuperLink")
            self.sent.append(msg.metadata.message_type)
            reply = client_app.app(msg, self.contexts[msg.metadata.dst_node_id])
            assert isinstance(reply, Message)
            replies.append(reply)
        return replies


def run_config(out: Path, **extra) -> dict:
    over = " ".join(f"{k}={v}" for k, v in {**SMALL, "out_dir": str(out), **extra}.items())
    return {"overrides": over, "simulation-metrics": True, "round-timeout": 60.0,
            "node-wait": 5.0, "overwrite": False}


def flower_run(out: Path, stop_after=None, grid=None, **extra) -> Path:
    rc = run_config(out, **extra)
    grid = grid or MemoryGrid(rc)
    return run_server(grid, Context(run_id=grid.run_id, node_id=0, node_config={},
                                    state=RecordDict(), run_config=rc), stop_after=stop_after)


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return [{k: v for k, v in r.items() if not k.startswith("time_")}
                for r in csv.DictReader(f)]


def same_results(a: Path, b: Path) -> None:
    assert (a / "queries.jsonl").read_bytes() == (b / "queries.jsonl").read_bytes()
    assert metrics(a) == metrics(b)
    assert (a / "partition.csv").read_bytes() == (b / "partition.csv").read_bytes()
    assert json.loads((a / "status.json").read_text())["complete"] is True


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list_ids())
def test_every_strategy_same_in_process_and_on_flower(tmp_path, strategy):
    extra = {"strategy": strategy}
    if strategy == "kafal":
        extra["kafal.kcfu"] = "true"  # its own training objective, built on each client
    ref = run(config.load(None, overrides={**SMALL, **extra,
                                           "out_dir": str(tmp_path / "inproc")})).run_dir
    got = flower_run(tmp_path / "flower", **extra)
    assert got.name == ref.name
    same_results(got, ref)


@pytest.mark.slow
@pytest.mark.parametrize("strategy,extra", [
    ("fairfal", {"fl.algorithm": "scaffold", "runtime.eval_every": "1"}),
    ("entropy@L", {"fl.fraction": "0.67"}),  # last-round local models kept across the stop
])
def test_flower_run_resumes_after_a_finished_cycle(tmp_path, strategy, extra):
    extra = {"strategy": strategy, "budget.cycles": "3", **extra}
    whole = flower_run(tmp_path / "whole", **extra)
    # the server dies in cycle 2's training: the clients have already queried (and saved)
    # cycle 2's labels, which the resumed run must replace
    grid = MemoryGrid(run_config(tmp_path / "stopped", **extra))
    grid.die_after_selects = 6
    with pytest.raises(ConnectionError):
        flower_run(tmp_path / "stopped", grid=grid, **extra)
    (first,) = (tmp_path / "stopped").iterdir()
    assert len(metrics(first)) == 1
    status = json.loads((first / "status.json").read_text())
    assert status["cycles_done"] == 1 and "SuperLink" in status["error"]
    # a new server and new SuperNodes: nothing in memory, nothing in the nodes' state
    client_app._SITES.clear()
    grid = MemoryGrid(run_config(tmp_path / "stopped", **extra))
    again = flower_run(tmp_path / "stopped", grid=grid, **extra)
    assert again == first
    assert grid.sent.count("query.restore") == 3
    same_results(again, whole)
    if "runtime.eval_every" in extra:
        assert (again / "rounds.csv").read_bytes() == (whole / "rounds.csv").read_bytes()
