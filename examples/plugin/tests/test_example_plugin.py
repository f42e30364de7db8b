"""The example plug-in's own tests: falkit's contract checks (falkit.testing), a known
answer, and a run in process equal to the same run in Flower's simulation engine, with the
plug-in named by its entry points."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("falkit_example")  # pip install -e examples/plugin (make test does)

from falkit_example.density import InformationDensity  # noqa: E402
from falkit_example.mlp import MLP2  # noqa: E402

from falkit import config, registry  # noqa: E402
from falkit.testing import check_options, check_strategy, fake_context  # noqa: E402

SMALL = {"data.dataset": "digits", "data.rho": "5", "partition.num_clients": "3",
         "partition.alpha": "1.0", "budget.fraction": "0.05", "budget.cycles": "2",
         "fl.rounds": "2", "fl.local_epochs": "1", "fl.lr": "0.05", "runtime.threads": "1",
         "strategy": "density@G", "density.beta": "2", "model.backbone": "mlp2"}


def test_density_meets_falkits_contract():
    check_strategy(InformationDensity)
    check_strategy(InformationDensity, beta=0.0, seeds=(0,))
    check_options(InformationDensity)


def test_beta_zero_is_entropy_sampling():
    ctx, _ = fake_context()
    from falkit.al.base import create

    picks = InformationDensity("G", beta=0.0).query(ctx, 10)
    assert np.array_equal(picks, create("entropy@G").query(fake_context()[0], 10))


def test_installed_entry_points_are_found_with_their_origin():
    assert registry.strategy_class("density@G") is InformationDensity
    assert registry.ORIGINS[("strategy", "density")].startswith(
        "plug-in falkit-example-plugin")
    from falkit.models.backbones import create

    net = create("mlp2", num_classes=10, in_channels=1, image_size=8)
    assert isinstance(net, MLP2) and net(torch.zeros(2, 1, 8, 8))[0].shape == (2, 10)
    cfg = config.load(None, overrides=SMALL)
    assert cfg.density.beta == 2.0 and "[density]" in config.dumps(cfg)


@pytest.mark.slow
def test_the_plugin_runs_in_process_and_in_the_flower_simulation(tmp_path):
    pytest.importorskip("flwr")
    from falkit.flower.simulation import simulate
    from falkit.loop import run

    ref = run(config.load(None, overrides={**SMALL, "out_dir": str(tmp_path / "in")})).run_dir
    over = " ".join(f"{k}={v}" for k, v in {**SMALL, "out_dir": tmp_path / "fl"}.items())
    simulate({"overrides": over, "simulation-metrics": True}, num_supernodes=3)
    (got,) = (tmp_path / "fl").iterdir()
    assert got.name == ref.name
    assert (got / "queries.jsonl").read_bytes() == (ref / "queries.jsonl").read_bytes()
    records = [json.loads(x) for x in (ref / "queries.jsonl").read_text().splitlines()]
    assert any("density_mean_selected" in r for r in records)
