"""Flower as site operators meet it (issue 24), on the in-memory Grid of test_transports: a
site of another falkit, sites that hold different data, a site that dies (what the run says
and what metrics.csv and the report make of the cycles after), and `falkit config --flower`
for a run config Flower would refuse without naming the key. tests/test_flower.py runs the
real deployment (TLS, SuperNode authentication, two npz sites)."""

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Error, Message  # noqa: E402
from tests.test_bad_input_config import fail  # noqa: E402
from tests.test_transports import MemoryGrid, flower_run, run_config  # noqa: E402

from falkit.flower import client_app, server_app  # noqa: E402
from falkit.flower.server_app import FlowerRunError  # noqa: E402


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_a_site_of_another_falkit_is_refused_naming_both_versions(tmp_path, monkeypatch):
    grid = MemoryGrid(run_config(tmp_path / "runs"))
    monkeypatch.setattr(client_app, "versions",
                        lambda: {"falkit": "0.0.9", "schema": "0123456789ab"})
    with pytest.raises(FlowerRunError) as e:
        flower_run(tmp_path / "runs", grid=grid)
    mine = server_app.versions()
    assert (f"node 100 runs falkit 0.0.9 (config schema 0123456789ab), the server falkit "
            f"{mine['falkit']} (config schema {mine['schema']})") in str(e.value)
    assert grid.sent == ["query.info"] * 3 and not (tmp_path / "runs").exists()
    assert not client_app._SITES or all(k[0] != grid.run_id for k in client_app._SITES)


def _sites(tmp_path: Path, names: list[str], roots: list[Path] | None = None) -> MemoryGrid:
    """Three SuperNodes with their own data (digits as an npz per site)."""
    from falkit.data.sources import load

    ds = load("digits")
    grid = MemoryGrid(run_config(tmp_path / "runs"))
    for i, (node, name) in enumerate(zip(sorted(grid.contexts), names, strict=True)):
        root = tmp_path / f"site{i}"
        root.mkdir(exist_ok=True)
        sl = slice(i, None, 3)
        np.savez(root / name.removeprefix("npz:"), x_train=ds.x_train.numpy()[sl],
                 y_train=ds.y_train[sl], x_test=ds.x_test.numpy()[sl], y_test=ds.y_test[sl])
        grid.contexts[node].node_config = {"partition-id": i, "data-root": str(root),
                                           "dataset": name}
    return grid


def test_sites_are_named_and_fingerprinted_by_what_they_hold(tmp_path):
    grid = _sites(tmp_path, ["npz:site.npz"] * 3)
    got = flower_run(tmp_path / "runs", grid=grid)
    assert got.name.startswith("npz-site.npz_sites_"), got.name
    text = (got / "config.toml").read_text()
    assert 'dataset = "npz:site.npz"' in text and 'method = "sites"' in text
    data = json.loads((got / "data.json").read_text())
    assert data["dataset"] == "npz:site.npz" and len(data["sites"]) == 3
    assert data["num_train"] == sum(s["num_train"] for s in data["sites"]) == 1442
    assert len({s["train"] for s in data["sites"]}) == 3
    # every site keeps its files under the run's own name
    for i in range(3):
        assert (got / "clients" / f"client_{i}" / "pools.npz").is_file()
    assert {r["test_samples"] for r in _rows(got)} == {"355"}


def test_sites_of_different_datasets_are_refused(tmp_path):
    grid = _sites(tmp_path, ["npz:a.npz", "npz:a.npz", "npz:b.npz"])
    with pytest.raises(FlowerRunError, match=r"different datasets \(npz:a.npz, npz:b.npz\)"):
        flower_run(tmp_path / "runs", grid=grid)
    grid = _sites(tmp_path, ["npz:a.npz"] * 3)
    grid.contexts[102].node_config = {"partition-id": 2, "num-partitions": 3}
    with pytest.raises(FlowerRunError, match="some SuperNodes hold their own data"):
        flower_run(tmp_path / "runs", grid=grid)


class Dying(MemoryGrid):
    """Node 102 stops answering after cycle 1: the SuperLink answers its messages with
    Flower's node-unavailable error, as it does once a SuperNode misses its heartbeats."""

    def push_messages(self, messages):
        messages = list(messages)
        dead = [m for m in messages if m.metadata.dst_node_id == 102
                and self.sent.count("evaluate") >= 3]
        ids = super().push_messages([m for m in messages if m not in dead])
        for m in dead:
            m.metadata.__dict__["_message_id"] = f"dead-{len(self.sent)}"
            self.sent.append(m.metadata.message_type)
            self.replies_waiting[m.metadata.message_id] = Message(
                Error(code=5, reason="Error: Node Unavailable"), reply_to=m)
        return [*ids, *(m.metadata.message_id for m in dead)]


def test_a_dead_site_stops_the_run_saying_which_what_and_how_to_resume(tmp_path):
    over = {"budget.cycles": "3"}
    with pytest.raises(FlowerRunError) as e:
        flower_run(tmp_path / "runs", grid=Dying(run_config(tmp_path / "runs", **over)), **over)
    msg = str(e.value)
    assert msg.startswith("client 2 (partition 2, node 102) failed in query.")
    assert "its SuperNode stopped answering (Flower noticed after" in msg
    assert "submit the same run config again to resume" in msg and "600" not in msg
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "status.json").read_text())["cycles_done"] == 1


def test_cycles_after_a_site_left_are_counted_and_not_mixed_in_the_report(tmp_path):
    over = {"budget.cycles": "3", "fl.on_client_failure": "continue"}
    got = flower_run(tmp_path / "runs", grid=Dying(run_config(tmp_path / "runs", **over)),
                     **over)
    rows = _rows(got)
    assert [r["clients"] for r in rows] == ["3", "2", "2"]
    samples = [int(r["test_samples"]) for r in rows]
    assert samples[0] == 355 and samples[1] == samples[2] < 355
    from falkit.report import load_runs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (r,) = load_runs([got])
    said = [str(w.message) for w in caught]
    assert any(f"from cycle 2 evaluated on {samples[1]} test samples of 2 clients, before "
               "on 355 of 3" in s and "cycles 1-1 only" in s for s in said), said
    assert len(r.metrics) == 1 and not r.complete


def test_falkit_config_flower_names_the_key_flower_refuses(capsys):
    fail(capsys, ["config", "--flower", "fl.rouds=5 strategy='fairfal'"],
         "unknown config key 'fl.rouds'", "valid at fl:", "rounds", "round-timeout")
    fail(capsys, ["config", "--flower", "data.dataset='digits' model.backbone='cnn4'"],
         "cnn4 needs image_size >= 16")
    fail(capsys, ["config", "--flower", "strategy=fairfal"], "--flower:", "invalid format")
    fail(capsys, ["config", "--flower", "fl.rounds=5", "fl.rounds=6"],
         "--flower takes the whole")
    from falkit.cli import main

    assert main(["config", "--flower", "fl.rounds=5 strategy='fairfal' round-timeout=30"]) == 0
    out = capsys.readouterr().out
    assert "round_timeout=30.0" in out and "rounds = 5" in out and 'strategy = "fairfal"' in out
