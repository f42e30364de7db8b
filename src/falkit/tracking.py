"""Experiment trackers (issue 18): `tracking = ["tensorboard", "mlflow", "wandb"]` (or
"tensorboard,mlflow") sends a run's per-cycle metrics (and per-round accuracy, with
`runtime.eval_every`) to each, beside the run directory's own files. All three work
offline: TensorBoard event files under `<run>/tensorboard/`, an MLflow file store under
`<run>/mlruns/` (or `$MLFLOW_TRACKING_URI`), W&B in offline mode under `<run>/wandb/`
(`wandb sync` uploads it later; `WANDB_MODE=online` logs live). Each is an optional extra:
`pip install 'falkit[tensorboard]'`, `'falkit[mlflow]'`, `'falkit[wandb]'`.

The sinks are fed by one hook, the driver's Reporter: `round_done` after every FL round,
`cycle_done` after every cycle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from falkit import config as config_mod
from falkit.config import Config, tracker_names
from falkit.driver import Reporter
from falkit.errors import ConfigError

_PACKAGE = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check(cfg: Config) -> None:
    """Unknown trackers and missing packages, before a run starts."""
    import importlib.util

    for name in tracker_names(cfg):
        if importlib.util.find_spec(_PACKAGE[name]) is None:
            raise ConfigError(f"tracking = {name} needs the {_PACKAGE[name]} package: "
                              f"pip install 'falkit[{name}]'")


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "cycle"}


class TensorBoard(Reporter):
    def __init__(self, cfg: Config, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + config_mod.dumps(cfg) + "\n```")

    def round_done(self, cycle: int, r: int, rounds: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"round/{k}", v, cycle * rounds + r + 1)

    def cycle_done(self, row: dict[str, Any]) -> None:
        for k, v in _numbers(row).items():
            self.writer.add_scalar(f"cycle/{k}", v, int(row["cycle"]))
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


class MLflow(Reporter):
    def __init__(self, cfg: Config, run_dir: Path):
        import mlflow

        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a local file store in the run directory (MLflow 3 asks to opt in)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").absolute().as_uri()
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("falkit")
        self.run = mlflow.start_run(run_name=run_dir.name)
        flat = config_mod.flatten(config_mod.experiment_dict(cfg))
        mlflow.log_params({k: str(v) for k, v in flat.items()})

    def round_done(self, cycle: int, r: int, rounds: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics({f"round_{k}": v for k, v in values.items()},
                                step=cycle * rounds + r + 1)

    def cycle_done(self, row: dict[str, Any]) -> None:
        self.mlflow.log_metrics(_numbers(row), step=int(row["cycle"]))

    def finish(self) -> None:
        self.mlflow.end_run()


class WandB(Reporter):
    def __init__(self, cfg: Config, run_dir: Path):
        import wandb

        self.wandb = wandb
        flat = config_mod.flatten(config_mod.experiment_dict(cfg))
        self.run = wandb.init(project="falkit", name=run_dir.name, dir=str(run_dir),
                              config=flat, mode=os.environ.get("WANDB_MODE", "offline"),
                              reinit="create_new")
        self.run.define_metric("cycle")
        self.run.define_metric("cycle/*", step_metric="cycle")
        self.run.define_metric("fl_round")
        self.run.define_metric("round/*", step_metric="fl_round")

    def round_done(self, cycle: int, r: int, rounds: int, values: dict[str, float]) -> None:
        self.run.log({"fl_round": cycle * rounds + r + 1,
                      **{f"round/{k}": v for k, v in values.items()}})

    def cycle_done(self, row: dict[str, Any]) -> None:
        self.run.log({"cycle": int(row["cycle"]),
                      **{f"cycle/{k}": v for k, v in _numbers(row).items()}})

    def finish(self) -> None:
        self.run.finish()


_SINKS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


class Fanout(Reporter):
    """Several reporters as one: the progress display and each tracker."""

    def __init__(self, reporters: list[Reporter]):
        self.reporters = reporters

    def start(self, *a: Any) -> None:
        for r in self.reporters:
            r.start(*a)

    def phase(self, *a: Any) -> None:
        for r in self.reporters:
            r.phase(*a)

    def advance(self, n: int = 1) -> None:
        for r in self.reporters:
            r.advance(n)

    def round_done(self, *a: Any) -> None:
        for r in self.reporters:
            if hasattr(r, "round_done"):  # a reporter of one's own may not have this hook
                r.round_done(*a)

    def cycle_done(self, row: dict[str, Any]) -> None:
        for r in self.reporters:
            r.cycle_done(row)

    def finish(self) -> None:
        for r in self.reporters:
            r.finish()


def with_trackers(cfg: Config, run_dir: Path, reporter: Reporter) -> Reporter:
    """`reporter` and the run's trackers as one reporter (a reporter of one's own may lack
    the newer hooks: the Fanout calls only those it has)."""
    return Fanout([reporter, *(_SINKS[name](cfg, run_dir) for name in tracker_names(cfg))])
