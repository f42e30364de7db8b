"""`falkit run`: one experiment in this process — the config's data, strategy, engine and
simulated oracle put together as an `InProcessFederation` and driven by the one FAL cycle,
`falkit.driver.run` (DESIGN.md §3)."""

from __future__ import annotations

import torch

from falkit import config as config_mod
from falkit import tracking
from falkit.al.base import create as create_strategy
from falkit.config import Config
from falkit.data.federation import build
from falkit.data.sources import ImageDataset, normalization
from falkit.driver import Reporter, RunResult
from falkit.driver import run as drive
from falkit.fl.engine import Engine, ImageTensors, configure_process
from falkit.inprocess import InProcessFederation
from falkit.oracle import HumanOracle
from falkit.results import read_metrics
from falkit.rundir import RunDir, data_fingerprint

__all__ = ["Reporter", "RunResult", "run", "engine_for"]


def engine_for(cfg: Config, ds: ImageDataset, num_classes: int, num_clients: int,
               engine_class: type[Engine] = Engine, wrap_model=None,
               train_y: torch.Tensor | None = None) -> Engine:
    """The engine of a run on `ds` (train labels `train_y`, default the dataset's)."""
    y = torch.as_tensor(ds.y_train) if train_y is None else train_y
    mean, std = normalization(ds, cfg.data.normalization)
    return engine_class(cfg, ImageTensors(ds.x_train, y, mean, std, ds.hflip, ds.crop_pad),
                        ImageTensors(ds.x_test, torch.as_tensor(ds.y_test), mean, std),
                        num_classes, num_clients=num_clients, wrap_model=wrap_model)


def run(cfg: Config, reporter: Reporter | None = None, overwrite: bool = False,
        dataset: ImageDataset | None = None, stop_after: int | None = None,
        engine_class: type[Engine] = Engine) -> RunResult:
    """Run (or resume, or skip if finished) the experiment `cfg`. `stop_after` ends the call
    after that cycle as if the process had been killed (used by tests); `engine_class` swaps
    in another way of training (benchmarks/ runs the reference's way through it).

    Nothing is written before the config, the strategy and the data are validated; an
    existing run is replaced (`overwrite`) only then (falkit.rundir)."""
    rd = RunDir.of(cfg)
    if rd.inspect(cfg, overwrite) == "complete":
        return RunResult(rd.path, read_metrics(rd.path), skipped=True)
    strategy = create_strategy(cfg.strategy, **config_mod.strategy_options(cfg))
    tracking.check(cfg)  # a tracker's package is missing: say so before anything is written
    data = build(cfg, dataset)
    configure_process(cfg)
    # a strategy may wrap the run's backbone (ll4al: a loss-prediction module trained and
    # federated with it)
    engine = engine_for(cfg, data.dataset, data.num_classes, len(data.clients), engine_class,
                        wrap_model=strategy.wrap_model)
    oracle = None
    if cfg.oracle == "human":  # people answer, through queues in the run directory
        oracle = HumanOracle(rd.path / "labeling", data.dataset.x_train,
                             list(data.dataset.classes), len(data.dataset.y_train))
    fed = InProcessFederation(cfg, strategy, data, engine, oracle)
    return drive(cfg, strategy, fed, rd, reporter=reporter, overwrite=overwrite,
                 fingerprint=data_fingerprint(data.dataset, cfg.data.dataset),
                 stop_after=stop_after)
