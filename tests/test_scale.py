"""Runs with 5, 10, 20 and 30 clients, and with every backbone (tiny data)."""

import numpy as np
import pytest

from falkit import config
from falkit.loop import run
from falkit.models.backbones import BACKBONES


@pytest.mark.parametrize("clients", [5, 10, 20, 30])
def test_client_counts(tmp_path, clients):
    cfg = config.load(None, overrides={
        "data.dataset": "digits", "data.rho": "none", "partition.num_clients": str(clients),
        "partition.alpha": "0.5", "budget.cycles": "2", "fl.rounds": "1", "fl.local_epochs": "1",
        "model.backbone": "resnet8_preact16", "strategy": "fairfal", "local_model.epochs": "1",
        "out_dir": str(tmp_path)})
    rows = run(cfg).metrics
    per_client = int(round(1442, -2) * 0.05 / clients)
    assert [r["labeled"] for r in rows] == [per_client * clients, 2 * per_client * clients]


@pytest.fixture(scope="module")
def rgb32(tmp_path_factory):
    """A tiny 3-channel 32 px dataset written as a generic npz."""
    g = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    y_tr, y_te = np.arange(160) % 4, np.arange(40) % 4
    x_tr = g.integers(0, 255, (160, 32, 32, 3), dtype=np.uint8)
    x_tr[:, :8, :8, 0] = (y_tr * 60)[:, None, None]  # a learnable signal
    x_te = g.integers(0, 255, (40, 32, 32, 3), dtype=np.uint8)
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    return path


@pytest.mark.parametrize("backbone", [b for b in BACKBONES if b != "linear"])
def test_every_image_backbone_runs(tmp_path, rgb32, backbone):
    cfg = config.load(None, overrides={
        "data.dataset": f"npz:{rgb32}", "data.rho": "none", "partition.num_clients": "2",
        "partition.method": "iid", "budget.fraction": "0.1", "budget.cycles": "2",
        "fl.rounds": "1", "fl.local_epochs": "1", "model.backbone": backbone,
        "strategy": "badge@G", "out_dir": str(tmp_path)})
    rows = run(cfg).metrics
    assert [r["labeled"] for r in rows] == [20, 40]  # round(160, -2) * 0.1 / 2 = 10 each
    assert all(np.isfinite(r["accuracy"]) for r in rows)
