"""`falkit run`: one experiment in this process — the config's data, strategy, engine and
simulated oracle put together as an `InProcessFederation` and driven by the one FAL cycle,
`falkit.driver.run` (DESIGN.md §3)."""

from __future__ import annotations

import dataclasses
import time

import torch

from falkit import config as config_mod
from falkit import tracking
from falkit.al.base import create as create_strategy
from falkit.config import Config
from falkit.data.federation import build
from falkit.data.sources import ImageDataset, load
from falkit.driver import Reporter, RunResult
from falkit.driver import run as drive
from falkit.fl.engine import Engine, configure_process
from falkit.inprocess import InProcessFederation
from falkit.oracle import HumanOracle
from falkit.results import read_metrics
from falkit.rundir import RunDir, data_fingerprint
from falkit.site import image_inputs, site_engine

__all__ = ["Reporter", "RunResult", "run", "engine_for"]


def engine_for(cfg: Config, ds: ImageDataset, num_classes: int, num_clients: int,
               engine_class: type[Engine] = Engine, wrap_model=None,
               train_y: torch.Tensor | None = None) -> Engine:
    """An engine on the images of `ds` (train labels `train_y`, default the dataset's), with
    the config as it is (a run's engine is `falkit.site.site_engine`'s: its strategy's)."""
    inputs = image_inputs(cfg, ds)
    train = inputs.train if train_y is None else dataclasses.replace(inputs.train, y=train_y)
    return engine_class(cfg, train, inputs.test, num_classes, num_clients=num_clients,
                        wrap_model=wrap_model)


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
    strategy.check_transport(cfg, InProcessFederation.transport)
    tracking.check(cfg)  # a tracker's package is missing: say so before anything is written
    t = time.perf_counter()
    full = dataset if dataset is not None else load(cfg.data.dataset, cfg.data.data_root,
                                                    cfg.data.val_split)
    data = build(cfg, full)
    data_s = time.perf_counter() - t
    configure_process(cfg)
    # the strategy's inputs (FAST: the encoder's embeddings), training recipe and model
    # wrapper (ll4al: a loss-prediction module trained and federated with the backbone)
    engine, inputs = site_engine(cfg, strategy, full, data.dataset, data.source_indices,
                                 len(data.clients), engine_class=engine_class)
    oracle = None
    if cfg.oracle == "human":  # people answer, through queues in the run directory
        oracle = HumanOracle(rd.path / "labeling", data.dataset.x_train,
                             list(data.dataset.classes), len(data.dataset.y_train))
    # the phases a strategy's inputs took (FAST: encode) are reported with the data's
    times = {"data": data_s, **inputs.times} if inputs.times else {}
    fed = InProcessFederation(cfg, strategy, data, engine, oracle, extras=inputs.extras,
                              times=times)
    return drive(cfg, strategy, fed, rd, reporter=reporter, overwrite=overwrite,
                 fingerprint=data_fingerprint(data.dataset, cfg.data.dataset),
                 stop_after=stop_after)
