"""falkit on Flower (DESIGN.md §8): the simulation gives falkit run's numbers, every
server-bound message is declared, and the deployment engine runs on loopback."""

import csv
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402
from tests.deployment import BIN, Deployment  # noqa: E402

from falkit import config  # noqa: E402
from falkit.flower.common import app_dir  # noqa: E402

APP_DIR = app_dir()  # the App with every registered method's run-config keys
from falkit.flower.common import (  # noqa: E402
    PrivacyViolation,
    array_record,
    audit,
    declared,
    record_layout,
    state_record,
)
from falkit.flower.server_app import run_server  # noqa: E402
from falkit.flower.simulation import simulate  # noqa: E402
from falkit.loop import run  # noqa: E402

SMALL = {
    "data.dataset": "digits", "data.rho": "5", "partition.num_clients": "3",
    "partition.alpha": "1.0", "budget.fraction": "0.05", "budget.cycles": "2",
    "fl.rounds": "2", "fl.local_epochs": "1", "fl.lr": "0.05", "local_model.epochs": "3",
    "model.backbone": "resnet8_preact16", "runtime.threads": "1",
}


def overrides(out, **extra) -> str:
    return " ".join(f"{k}={v}" for k, v in {**SMALL, "out_dir": str(out), **extra}.items())


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return [{k: v for k, v in r.items() if not k.startswith("time_")}
                for r in csv.DictReader(f)]


def only_dir(parent: Path) -> Path:
    (d,) = [p for p in parent.iterdir() if p.is_dir()]
    return d


@pytest.mark.slow
def test_simulation_gives_falkit_runs_queries_and_accuracies(tmp_path):
    cfg = config.load(None, overrides={**SMALL, "out_dir": str(tmp_path / "inproc"),
                                       "strategy": "fairfal"})
    ref = run(cfg).run_dir
    simulate({"overrides": overrides(tmp_path / "flower", strategy="fairfal"),
              "simulation-metrics": True}, num_supernodes=3)
    got = only_dir(tmp_path / "flower")
    assert got.name == ref.name
    # the same selected indices, labels and FairFAL diagnostics, byte for byte
    assert (got / "queries.jsonl").read_bytes() == (ref / "queries.jsonl").read_bytes()
    assert (got / "partition.csv").read_bytes() == (ref / "partition.csv").read_bytes()
    assert metrics(got) == metrics(ref)  # accuracies, per class, labeled, comm bytes
    assert json.loads((got / "status.json").read_text())["complete"] is True


def _inspect(message_type: str, content: RecordDict, model: dict, params: set,
             scalars: dict[str, set]) -> None:
    """The test's own check: model arrays (the global model's names and shapes) and the
    method's declared scalars, nothing else."""
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            assert message_type == "train", (message_type, name)
            layout = record_layout(record)  # one flat array per dtype, and its layout
            assert set(record) == {"layout"} | {dt for _, dt, _ in layout}, set(record)
            keys = {k for k, _, _ in layout}
            assert keys == set(model) or (name == "uplink" and keys <= params), name
            for k, _, shape in layout:
                assert shape == tuple(model[k].shape), (name, k)
        elif isinstance(record, MetricRecord):
            assert set(record) <= scalars[message_type], (message_type, dict(record))
            for k, v in record.items():
                assert not isinstance(v, list) or (message_type, k) in {
                    ("evaluate", "correct"), ("evaluate", "total")}, (message_type, k)
        elif isinstance(record, ConfigRecord) and (message_type, name) == ("query.info", "site"):
            # versions, the dataset's name and two SHA-256 digests: no sample, no label
            assert set(record) == {"falkit", "schema", "kind", "dataset", "train", "test"}
            for k in ("train", "test"):
                assert len(json.loads(record[k])) == 64, record[k]
        else:
            raise AssertionError(f"{message_type} carries {type(record).__name__} {name}")


@pytest.mark.slow
def test_every_server_bound_message_is_declared(tmp_path):
    """FairFAL under SCAFFOLD, without simulation metrics: every reply the server receives
    holds only model-shaped arrays and the declared scalars (γ_k, counts)."""
    seen: list[tuple[str, RecordDict]] = []

    class RecordingGrid:
        def __init__(self, grid):
            self.grid = grid

        def get_node_ids(self):
            return self.grid.get_node_ids()

        types: dict[str, str] = {}

        def push_messages(self, messages):
            messages = list(messages)
            ids = list(self.grid.push_messages(messages))
            self.types.update({m.metadata.message_id: m.metadata.message_type
                               for m in messages})
            return ids

        def pull_messages(self, message_ids):
            replies = list(self.grid.pull_messages(message_ids))
            seen.extend((self.types[r.metadata.reply_to_message_id], r.content)
                        for r in replies)
            return replies

    def main(grid, context):
        run_server(RecordingGrid(grid), context)

    extra = {"strategy": "fairfal", "fl.algorithm": "scaffold"}
    simulate({"overrides": overrides(tmp_path / "flower", **extra)}, num_supernodes=3,
             server_main=main)
    ref = run(config.load(None, overrides={**SMALL, **extra,
                                           "out_dir": str(tmp_path / "inproc")})).run_dir
    got = only_dir(tmp_path / "flower")
    assert [r["accuracy"] for r in metrics(got)] == [r["accuracy"] for r in metrics(ref)]
    # the AUC needs every test score: without simulation metrics the server has none
    assert {r["auc"] for r in metrics(got)} == {"nan"}
    assert all(0 < float(r["auc"]) < 1 for r in metrics(ref))
    assert not (got / "partition.csv").exists()  # class counts need simulation metrics
    records = [json.loads(x) for x in (got / "queries.jsonl").read_text().splitlines()]
    assert all(set(r) == {"cycle", "client", "strategy", "count"} for r in records)

    import torch

    state = torch.load(got / "checkpoint" / "latest.pt", weights_only=False)["global_state"]
    from falkit.models.backbones import create

    params = {n for n, p in create("resnet8_preact16", num_classes=10, in_channels=1,
                                   image_size=8).named_parameters()}
    scalars = {"query.info": {"partition-id", "pool", "num-train", "num-classes",
                              "in-channels", "image-size", "test"},
               "query.stats": {"gamma"}, "query.select": {"labeled", "queried"},
               "train": {"num-examples"}, "evaluate": {"correct", "total"}}
    kinds = {t for t, _ in seen}
    assert kinds == {"query.info", "query.stats", "query.select", "train", "evaluate"}
    for message_type, content in seen:
        _inspect(message_type, content, state, params, scalars)
    assert any("gamma" in c.get("stats", {}) for t, c in seen if t == "query.stats")


def test_audit_rejects_undeclared_payloads():
    import torch

    from falkit.al.base import create as create_strategy
    from falkit.fl.algorithms import create as create_algorithm

    model = {"w": torch.zeros(2, 3), "n": torch.zeros((), dtype=torch.int64)}
    allowed = declared(create_strategy("fairfal"), create_algorithm("fedavg"), False)
    ok = RecordDict({"model": state_record(model), "metrics": MetricRecord({"num-examples": 3})})
    audit("train", ok, allowed, model, ["w"])
    bad = [
        ("train", RecordDict({"model": state_record(model),
                              "metrics": MetricRecord({"num-examples": 3, "loss": 0.1})})),
        ("train", RecordDict({"model": array_record(w=torch.zeros(2, 4).numpy(),
                                                    n=torch.zeros(()).numpy())})),
        ("train", RecordDict({"model": state_record({"w": model["w"]})})),
        ("train", RecordDict({"model": state_record({"w": torch.zeros(2, 4), "n": model["n"]})})),
        ("train", RecordDict({"model": ArrayRecord({**state_record(model),
                                                    "extra": state_record(model)["<f4"]})})),
        ("query.stats", RecordDict({"stats": MetricRecord({"gamma": 0.5, "d": 0.1})})),
        ("query.select", RecordDict({"query": MetricRecord({"labeled": 3}),
                                     "diagnostics": ConfigRecord({"record": "{}"})})),
        ("query.select", RecordDict({"query": MetricRecord({"labeled": [1, 2]})})),
        ("query.info", RecordDict({"labels": array_record(y=torch.zeros(5).numpy())})),
    ]
    for message_type, content in bad:
        with pytest.raises(PrivacyViolation):
            audit(message_type, content, allowed, model, ["w"])


# -- the deployment engine on loopback ----------------------------------------------------
class Loopback(Deployment):
    """A SuperLink and three SuperNodes simulating partitions, no TLS."""

    def __init__(self, tmp: Path, nodes: int = 3):
        super().__init__(tmp, [f"partition-id={i} num-partitions={nodes}"
                               for i in range(nodes)])

    def flwr_run(self, run_config: str) -> subprocess.Popen:
        return super().flwr_run(APP_DIR, run_config)


@pytest.fixture
def loopback(tmp_path):
    lb = Loopback(tmp_path)
    try:
        yield lb
    finally:
        lb.close()


def _wait_status(out: Path, done, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dirs = [p for p in out.iterdir() if p.is_dir()] if out.is_dir() else []
        if dirs and (dirs[0] / "status.json").is_file():
            status = json.loads((dirs[0] / "status.json").read_text())
            if done(status):
                return status
        time.sleep(1.0)
    raise AssertionError(f"no run status satisfying the test in {timeout:g} s under {out}")


def _run_config(out: Path, timeout: float = 120.0, **extra) -> str:
    return (f'overrides="{overrides(out, strategy="fairfal", **extra)}" '
            f"simulation-metrics=true round-timeout={timeout}")


@pytest.mark.slow
def test_deployment_engine_on_loopback_runs_fairfal(tmp_path, loopback):
    out = tmp_path / "runs"
    job = loopback.flwr_run(_run_config(out))
    text, _ = job.communicate(timeout=120)
    assert job.returncode == 0, text
    status = _wait_status(out, lambda s: s.get("complete") or "error" in s, 600)
    assert status["complete"] is True, status
    got = only_dir(out)
    ref = run(config.load(None, overrides={**SMALL, "strategy": "fairfal",
                                           "out_dir": str(tmp_path / "inproc")})).run_dir
    assert (got / "queries.jsonl").read_bytes() == (ref / "queries.jsonl").read_bytes()
    assert metrics(got) == metrics(ref)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["continue", "stop"])
def test_killed_supernode(tmp_path, loopback, policy):
    out = tmp_path / "runs"
    job = loopback.flwr_run(_run_config(out, timeout=300.0, **{
        "budget.cycles": "3", "fl.on_client_failure": policy}))
    job.communicate(timeout=120)
    _wait_status(out, lambda s: s.get("cycles_done", 0) >= 1, 600)
    loopback.stop("node2")
    status = _wait_status(out, lambda s: s.get("complete") or "error" in s, 600)
    rows = metrics(only_dir(out))
    if policy == "continue":
        assert status["complete"] is True, status
        assert [int(r["cycle"]) for r in rows] == [0, 1, 2]
        assert rows[0]["clients"] == "3" and rows[-1]["clients"] == "2"
        assert int(rows[-1]["test_samples"]) < int(rows[0]["test_samples"]) == 355
    else:  # which site, what happened (not "no reply within ..."), how to go on
        assert "client 2 (partition 2, node" in status["error"], status
        assert "its SuperNode stopped answering" in status["error"], status
        assert "submit the same run config again to resume" in status["error"], status
        assert status["cycles_done"] == len(rows) >= 1
        assert [int(r["cycle"]) for r in rows] == list(range(len(rows)))


# -- `flwr run` against Flower's managed local SuperLink (issue 16) -------------------------
@pytest.fixture
def local_superlink(tmp_path):
    """A fresh FLWR_HOME whose default connection is Flower's managed local SuperLink (it
    starts on first use, in simulation mode); the SuperLink is stopped at the end."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)  # nothing a user must know
    try:
        out = subprocess.run([str(BIN / "flwr"), "federation", "simulation-config",
                              "@none/default", "local", "--num-supernodes", "3"],
                             env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        yield env
    finally:
        pattern = f"flower-superlink.*{home}/local-superlink"  # the docs' command
        for sig in ("-TERM", "-KILL"):
            subprocess.run(["pkill", sig, "-f", pattern], check=False)
            time.sleep(2)


def _flwr_run(env: dict, cwd: Path, run_config: str) -> str:
    out = subprocess.run([str(BIN / "flwr"), "run", str(APP_DIR), "--stream", "--run-config",
                          run_config], env=env, cwd=cwd, capture_output=True, text=True,
                         timeout=600)
    return out.stdout + out.stderr


@pytest.mark.slow
def test_flwr_run_on_the_managed_local_superlink(tmp_path, local_superlink):
    """The docs' first Flower example (docs/guide/flower.md): `flwr run` with falkit's settings
    as run-config keys, on Flower's own local SuperLink (3 simulated SuperNodes), no flag
    to know. A bad config is refused in one line before any client is contacted; a good one
    gives the results directory `falkit run` writes, with progress in the stream."""
    keys = {**SMALL, "strategy": "fairfal"}

    def native(**extra) -> str:  # TOML values, as a user types them
        return " ".join(f"{k}={v if v.replace('.', '').isdigit() else repr(v)}"
                        for k, v in {**keys, **extra}.items())

    bad = _flwr_run(local_superlink, tmp_path, native(**{"model.backbone": "cnn4",
                                                         "out_dir": str(tmp_path / "bad")}))
    assert "falkit: error: cnn4 needs image_size >= 16" in bad, bad
    assert "Traceback" not in bad and not (tmp_path / "bad").exists()

    text = _flwr_run(local_superlink, tmp_path,
                     native(out_dir=str(tmp_path / "flower")) + " simulation-metrics=true")
    assert "falkit: cycle 2/2: accuracy" in text and "train round 2/2" in text, text
    got = only_dir(tmp_path / "flower")
    assert f"results in {got}" in text
    ref = run(config.load(None, overrides={**keys, "out_dir": str(tmp_path / "inproc")})).run_dir
    assert got.name == ref.name
    assert (got / "queries.jsonl").read_bytes() == (ref / "queries.jsonl").read_bytes()
    assert (got / "partition.csv").read_bytes() == (ref / "partition.csv").read_bytes()
    assert metrics(got) == metrics(ref)


# -- the "Across machines" recipe, on loopback (issue 24) --------------------------------
def _site_files(tmp: Path) -> tuple[list[Path], Path, Path]:
    """digits dealt to two sites, each its own npz under its own data root, with the
    federation's agreed mean/std; site 1 holds no 0 (so its npz declares `classes`). And the
    same data for `falkit run`: every site's train and test split concatenated, and a
    partition file giving each client its site's rows."""
    from falkit.data.sources import _channel_stats, load

    ds = load("digits")
    rng = np.random.default_rng(0)
    split = {}
    for part in ("train", "test"):
        y = getattr(ds, f"y_{part}")
        to0 = rng.random(len(y)) < np.where(y < 5, 0.8, 0.25)
        split[part] = [np.flatnonzero(to0 | (y == 0)), np.flatnonzero(~to0 & (y != 0))]
    x = {p: getattr(ds, f"x_{p}").numpy() for p in ("train", "test")}
    y = {p: getattr(ds, f"y_{p}") for p in ("train", "test")}
    mean, std = _channel_stats(x["train"])  # the combined train split's: agreed by all
    classes = np.array([str(c) for c in range(10)])
    roots = []
    for i in range(2):
        root = tmp / f"site{i}"
        root.mkdir()
        np.savez(root / "site.npz", **{f"{a}_{p}": d[p][split[p][i]] for p in ("train", "test")
                                       for a, d in (("x", x), ("y", y))},
                 classes=classes, mean=mean, std=std)
        roots.append(root)
    both = tmp / "both.npz"
    np.savez(both, **{f"{a}_{p}": np.concatenate([d[p][split[p][i]] for i in range(2)])
                      for p in ("train", "test") for a, d in (("x", x), ("y", y))},
             classes=classes, mean=mean, std=std)
    n0 = len(split["train"][0])
    parts = tmp / "parts.json"
    parts.write_text(json.dumps([list(range(n0)), list(range(n0, len(y["train"])))]))
    return roots, both, parts


def _accuracies(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv but the wall-clock columns, the AUC (it needs every test score) and the
    queried-class counts (they need the labels): a Flower run without simulation metrics
    has neither."""
    return [{k: v for k, v in r.items() if k != "auc" and not k.startswith("queried_")}
            for r in metrics(run_dir)]


@pytest.mark.slow
def test_across_machines_recipe_with_tls_and_supernode_auth(tmp_path):
    """The docs' "Across machines" recipe, verbatim but for the addresses: a CA and a
    server certificate made here, a TLS SuperLink that admits only registered SuperNodes,
    two sites with their own npz files (one without any 0). A bad config submitted to the
    running deployment shows falkit's one-line error in the stream within seconds and the
    run is failed with it; the good run gives `falkit run`'s numbers on the same data, named
    and fingerprinted by what the sites hold."""
    roots, both, parts = _site_files(tmp_path)
    dep = Deployment(tmp_path / "deployment", [
        f'partition-id={i} data-root="{root}" dataset="npz:site.npz"'
        for i, root in enumerate(roots)], tls=True, auth=True)
    try:
        keys = {"strategy": "entropy", "partition.num_clients": 2, "budget.cycles": 2,
                "fl.rounds": 2, "fl.local_epochs": 1, "fl.lr": 0.05, "runtime.threads": 1,
                "model.backbone": "resnet8_preact16", "budget.fraction": 0.05}

        def native(**extra) -> str:  # TOML values, as a user types them
            return " ".join(f"{k}={json.dumps(v)}" for k, v in {**keys, **extra}.items())

        t = time.monotonic()
        job = dep.flwr_run(APP_DIR, native(**{"model.backbone": "cnn4",
                                              "out_dir": str(tmp_path / "bad")}), stream=True)
        text, _ = job.communicate(timeout=120)
        assert time.monotonic() - t < 60, text
        # the sites' images are 8×8: each site refuses cnn4 (the server has no images)
        error = ("falkit: error: client 0 (node {}) cannot take part in the run: its "
                 "ClientApp raised an error: cnn4 needs image_size >= 16")
        lines = [ln for ln in text.splitlines() if "falkit: error:" in ln]
        assert len(lines) == 1 and "cnn4 needs image_size >= 16" in lines[0], text
        assert "Traceback" not in text and not (tmp_path / "bad").exists()
        failed = dep.runs()[0]
        assert failed["status"] == "finished:failed", failed
        node = lines[0].split("(node ")[1].split(")")[0]
        assert error.format(node) in lines[0] and error.format(node) in failed["status-details"]

        out = tmp_path / "runs"
        job = dep.flwr_run(APP_DIR, native(out_dir=str(out), **{"round-timeout": 120}),
                           stream=True)
        text, _ = job.communicate(timeout=900)
        assert "falkit: cycle 2/2: accuracy" in text, text
        assert "2 sites with their own npz:site.npz data" in text, text
    finally:
        dep.close()
    got = only_dir(out)
    assert got.name.startswith("npz-site.npz_sites_"), got.name
    saved = config.loads((got / "config.toml").read_text())
    assert (saved.data.dataset, saved.partition.method, saved.data.rho) == (
        "npz:site.npz", "sites", 1.0)
    from falkit.data.sources import load
    from falkit.rundir import data_fingerprint

    sites = json.loads((got / "data.json").read_text())["sites"]
    for i, root in enumerate(roots):
        fp = data_fingerprint(load("npz:site.npz", root), "npz:site.npz")
        assert (sites[i]["train"], sites[i]["test"]) == (fp["train"], fp["test"])
    ref = run(config.load(None, overrides={
        **{k: str(v) for k, v in keys.items()}, "data.dataset": f"npz:{both}",
        "data.rho": "1", "partition.method": "json", "partition.file": str(parts),
        "out_dir": str(tmp_path / "inproc")})).run_dir
    assert _accuracies(got) == _accuracies(ref)
    assert {r["test_samples"] for r in metrics(got)} == {str(355)}
