"""One cycle, two transports (issue 15): every strategy gives the same queries.jsonl and
metrics in process and through falkit's Flower ServerApp and ClientApps, and a Flower run
stopped after a finished cycle resumes to the uninterrupted run's results.

The Flower side runs the real ServerApp federation and the real ClientApp (called through
flwr's public `ClientApp.__call__` with Flower `Message`s and per-node `Context`s) on an
in-memory Grid; tests/test_flower.py runs the same App under Flower's simulation engine and
on a loopback deployment."""

import csv
import json
import secrets
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from flwr.app import Context, Message, RecordDict  # noqa: E402

from falkit import config, fast, registry  # noqa: E402
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


class MemoryGrid:
    """A Grid whose SuperNodes are ClientApp calls in this process, each node with its own
    Context (node config, state) kept across messages, as a SuperNode keeps it."""

    def __init__(self, run_config: dict, nodes: int = 3, run_id: int | None = None):
        self.run_id = run_id or secrets.randbits(62)  # as Flower's: random
        self.run_config = run_config
        self.contexts = {
            100 + i: Context(run_id=self.run_id, node_id=100 + i,
                             node_config={"partition-id": i, "num-partitions": nodes},
                             state=RecordDict(), run_config=run_config)
            for i in range(nodes)}
        self.sent: list[str] = []
        self.replies_waiting: dict[str, Message] = {}
        self.die_after_selects: int | None = None
        self.fresh_process = False  # every message in a new ClientApp process (deployment)
        # who is sending: Flower's runtime sets this for a ServerApp (flwr internals; the
        # App itself uses only the public API)
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (
            1, self.run_id, SUPERLINK_NODE_ID)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        """Each message is answered at once (in order); `pull_messages` hands the replies
        out by the ids of the messages they answer, as a SuperLink does."""
        ids = []
        for msg in messages:
            if self.die_after_selects is not None and msg.metadata.message_type == "train" \
                    and self.sent.count("query.select") >= self.die_after_selects:
                raise ConnectionError("the server lost its SuperLink")
            self.sent.append(msg.metadata.message_type)
            if self.fresh_process:
                client_app._SITES.clear()
                client_app._DATA.clear()
            msg.metadata.__dict__["_message_id"] = secrets.token_hex(16)
            reply = client_app.app(msg, self.contexts[msg.metadata.dst_node_id])
            assert isinstance(reply, Message)
            assert reply.metadata.reply_to_message_id == msg.metadata.message_id
            self.replies_waiting[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies_waiting.pop(i) for i in list(message_ids)
                if i in self.replies_waiting]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def run_config(out: Path, **extra) -> dict:
    over = " ".join(f"{k}={v}" for k, v in {**SMALL, "out_dir": str(out), **extra}.items())
    return {"overrides": over, "simulation-metrics": True, "round-timeout": 60.0,
            "node-wait": 5.0, "overwrite": False}


def flower_run(out: Path, stop_after=None, grid=None, **extra) -> Path:
    """The ServerApp on `grid` (default: a new MemoryGrid), with the grid's run config."""
    grid = grid or MemoryGrid(run_config(out, **extra))
    rc = grid.run_config
    return run_server(grid, Context(run_id=grid.run_id, node_id=0, node_config={},
                                    state=RecordDict(), run_config=rc), stop_after=stop_after)


def metrics(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv without the wall-clock columns (and FAST's note whether this run found
    the embeddings in the cache: the first run of a test fills it)."""
    with (run_dir / "metrics.csv").open() as f:
        return [{k: v for k, v in r.items()
                 if not k.startswith("time_") and k != "embeddings_cached"}
                for r in csv.DictReader(f)]


def same_results(a: Path, b: Path) -> None:
    assert (a / "queries.jsonl").read_bytes() == (b / "queries.jsonl").read_bytes()
    assert metrics(a) == metrics(b)
    # the fingerprint of the data: every simulated partition reports the dataset's
    assert (a / "data.json").read_bytes() == (b / "data.json").read_bytes()
    for name in ("partition.csv", "clients.csv", "comm.csv"):  # the last two: FAST's
        assert (a / name).is_file() == (b / name).is_file(), name
        if (a / name).is_file():
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert json.loads((a / "status.json").read_text())["complete"] is True


FAST = {"fast.initial": "0.05", "fast.budget": "0.1", "fast.local_steps": "3"}


def same_in_process_and_on_flower(tmp_path: Path, **extra: str) -> Path:
    """The run `SMALL` + `extra` in process and on Flower (MemoryGrid): the same run
    directory name and results; the in-process run directory."""
    ref = run(config.load(None, overrides={**SMALL, **extra,
                                           "out_dir": str(tmp_path / "inproc")})).run_dir
    got = flower_run(tmp_path / "flower", **extra)
    assert got.name == ref.name
    same_results(got, ref)
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [*list_ids(), "fast", "fast:linear,local",
                                      *[f"{s}:frozen" for s in list_ids()]])
def test_every_strategy_same_in_process_and_on_flower(tmp_path, strategy, monkeypatch):
    frozen = strategy.endswith(":frozen")  # on a frozen encoder's embeddings, an MLP head
    strategy = strategy.removesuffix(":frozen")
    extra = {"strategy": strategy}
    if frozen:
        monkeypatch.setenv("FALKIT_CACHE", str(tmp_path / "cache"))  # each site's own disk
        extra.update({"model.backbone": "frozen:pca:16", "model.head": "mlp",
                      "model.head_hidden": "32"})
    if not strategy.startswith("fast"):  # what a run of it needs (bald: model.dropout)
        extra.update(registry.strategy_class(strategy).example_settings)
    if strategy == "kafal":
        extra["kafal.kcfu"] = "true"  # its own training objective, built on each client
    reference = run
    if strategy.startswith("fast"):  # one cycle: the two passes, human + weak labels
        extra = {"strategy": "fast", **FAST, "fast.cache_dir": str(tmp_path / "cache")}
        if strategy.endswith("linear,local"):  # linear probing, each client its own bank
            extra.update({"model.backbone": "linear", "fast.bank": "local",
                          "fast.uncertainty": "smallest_margin"})
        reference = fast.run
    ref = reference(config.load(None, overrides={**SMALL, **extra,
                                                 "out_dir": str(tmp_path / "inproc")})).run_dir
    got = flower_run(tmp_path / "flower", **extra)
    assert got.name == ref.name
    same_results(got, ref)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fairfal", "ifal", "ll4al", "kafal", "entropy@L"])
def test_a_new_clientapp_process_per_message_gives_the_same_run(tmp_path, strategy):
    """Flower's deployment runtime starts a ClientApp process per message: everything a
    client needs between messages (pools, client models, phase A, last-round models) comes
    from its node state, nothing from the process."""
    extra = {"strategy": strategy, **({"kafal.kcfu": "true"} if strategy == "kafal" else {})}
    ref = run(config.load(None, overrides={**SMALL, **extra,
                                           "out_dir": str(tmp_path / "inproc")})).run_dir
    grid = MemoryGrid(run_config(tmp_path / "flower", **extra))
    grid.fresh_process = True
    same_results(flower_run(tmp_path / "flower", grid=grid, **extra), ref)


@pytest.mark.slow
@pytest.mark.parametrize("strategy,extra", [
    ("fairfal", {"fl.algorithm": "scaffold", "runtime.eval_every": "1"}),
    # FedDyn's server h and each client's gradient state carried across cycles
    ("entropy@G", {"fl.algorithm": "feddyn", "fl.reset": "continue"}),
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


def test_fast_pooled_scope_is_refused_on_flower_before_anything_is_written(tmp_path):
    from falkit.errors import ConfigError

    grid = MemoryGrid(run_config(tmp_path / "runs", strategy="fast", **{"fast.scope": "pooled"}))
    with pytest.raises(ConfigError, match="fast.scope = client"):
        flower_run(tmp_path / "runs", grid=grid, strategy="fast", **{"fast.scope": "pooled"})
    assert grid.sent == [] and not (tmp_path / "runs").exists()


def test_a_bank_upload_is_audited():
    """FAST's bank: the labeled embeddings (n × d) and n labels, nothing else."""
    import numpy as np
    from flwr.app import MetricRecord

    from falkit.al.base import create
    from falkit.fl.algorithms import create as create_algorithm
    from falkit.flower.common import PrivacyViolation, array_record, audit, declared

    allowed = declared(create("fast"), create_algorithm("fedavg"), False)
    ok = RecordDict({"query": MetricRecord({"labeled": 2, "queried": 2, "dim": 3, "cached": 1}),
                     "bank": array_record(z=np.zeros((2, 3), np.float32), y=np.zeros(2))})
    audit("query.select", ok, allowed, {}, [])
    for bad in (array_record(z=np.zeros((2, 3)), y=np.zeros(3)),  # more labels than rows
                array_record(z=np.zeros((2, 3)), y=np.zeros(2), x=np.zeros(2)),  # images
                array_record(z=np.zeros(6), y=np.zeros(2))):
        with pytest.raises(PrivacyViolation):
            audit("query.select", RecordDict({"bank": bad}), allowed, {}, [])
    no_bank = declared(create("random"), create_algorithm("fedavg"), False)
    with pytest.raises(PrivacyViolation):
        audit("query.select", ok, no_bank, {}, [])


def test_every_falkit_setting_is_a_run_config_key_of_the_app():
    """Native run-config (issue 16): the App declares every falkit setting under its dotted
    name ("" = default), flwr passes them flat, and they win over config/preset/overrides;
    an unknown key is refused."""
    import tomllib

    from falkit.errors import ConfigError
    from falkit.flower import APP_DIR
    from falkit.flower.common import app_config_toml, app_dir, load_config, setting_keys
    from falkit.flower.simulation import app_run_config

    # the shipped App: falkit's own settings (generated); `app_dir()`'s adds every method's
    shipped = (APP_DIR / "pyproject.toml").read_text()
    assert shipped.endswith(app_config_toml(methods=False))
    text = (app_dir() / "pyproject.toml").read_text()
    assert text.endswith(app_config_toml()) and "fairfal.kappa" in text
    assert "fairfal.kappa" not in shipped and "fl.rounds" in shipped
    assert shipped[:shipped.index("[tool.flwr.app.config]")] == \
        text[:text.index("[tool.flwr.app.config]")]  # the same components
    declared_keys = set(app_run_config({}))
    assert set(setting_keys()) <= declared_keys
    cfg, opts = load_config(app_run_config({
        "preset": "quick", "overrides": "fl.rounds=7 seed=3", "fl.rounds": 5,
        "strategy": "fairfal", "partition.alpha": 100.0, "fairfal.kappa": 2.0,
        "simulation-metrics": True}))
    assert (cfg.fl.rounds, cfg.seed, cfg.strategy, cfg.partition.alpha) == (5, 3, "fairfal",
                                                                            100.0)
    assert cfg.fairfal.kappa == 2.0 and cfg.budget.cycles == 5  # quick's
    assert opts.simulation_metrics is True and opts.round_timeout == 600.0
    inline, _ = load_config({"config": "[fl]\nrounds = 4\n[partition]\nnum_clients = 3"})
    assert (inline.fl.rounds, inline.partition.num_clients) == (4, 3)
    with pytest.raises(ConfigError, match="fl.round"):
        load_config({"fl.round": 5})
    with pytest.raises(ConfigError, match="fl.rounds"):
        load_config({"fl.rounds": 0})
    assert tomllib.loads(text)["project"]["dependencies"] == []  # nothing to install


def test_a_bad_config_is_refused_before_any_client_is_contacted(tmp_path):
    from falkit.errors import ConfigError

    over = {"model.backbone": "cnn4"}  # four 2x max-pools on 8x8 digits
    grid = MemoryGrid(run_config(tmp_path / "runs", **over))
    with pytest.raises(ConfigError, match="cnn4 needs image_size >= 16"):
        flower_run(tmp_path / "runs", grid=grid, **over)
    assert grid.sent == [] and not (tmp_path / "runs").exists()
