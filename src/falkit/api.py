"""falkit's Python API (issue 18): run an experiment from a notebook, load runs as one tidy
table.

    import falkit
    res = falkit.run("configs/fmnist_lt.toml", preset="quick", strategy="fairfal",
                     partition={"alpha": 0.1})          # or **{"partition.alpha": 0.1}
    res.metrics[-1]["accuracy"]; model = res.model()    # the last cycle's global model
    df = falkit.load_runs(["runs/"])                    # one row per run x cycle
    df.pivot_table(index="labeled_pct", columns="method", values="accuracy")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from falkit import config as config_mod
from falkit.config import Config

if TYPE_CHECKING:
    import pandas
    import torch


@dataclass
class Result:
    """What `falkit.run` did.

    Attributes:
        run_dir: The run directory (its config.toml, metrics.csv, checkpoint/, ...).
        metrics: The run's metrics rows, one dict per cycle, as metrics.csv holds them.
        skipped: Whether the run was complete already (nothing ran).
        resumed_from: The first cycle this call ran when it resumed a run, else None.
    """

    run_dir: Path
    metrics: list[dict[str, Any]]
    skipped: bool = False  # it was complete already
    resumed_from: int | None = None  # the first cycle this call ran, when it resumed

    @property
    def accuracy(self) -> list[float]:
        """The global model's test accuracy after each cycle, in [0, 1]."""
        return [float(r["accuracy"]) for r in self.metrics]

    def frame(self) -> pandas.DataFrame:
        """This run as `load_runs` gives it.

        Returns:
            One row per cycle.
        """
        return load_runs([self.run_dir])

    def model(self, cycle: int = -1) -> torch.nn.Module:
        """The global model after a cycle, rebuilt from the run's saved weights.

        Args:
            cycle: An index into `metrics` (default -1: the last cycle).

        Returns:
            The model, on the CPU.
        """
        from falkit.models.saved import load_model, model_file

        c = int(self.metrics[cycle]["cycle"])
        return load_model(model_file(self.run_dir, c))


def run(config: str | Path | Config | None = None, *, preset: str | None = None,
        quiet: bool = False, overwrite: bool = False, **overrides: Any) -> Result:
    """Run, resume, or (when it is finished) skip one experiment, as `falkit run` does.

    Args:
        config: A TOML file, a `Config`, or None for the defaults.
        preset: Presets to apply first, e.g. "quick" or "reference,quick".
        quiet: No progress bars (the per-cycle lines remain).
        overwrite: Discard a finished or different run of the same name and start again.
        **overrides: Settings on top, e.g. `strategy="fairfal"`, `fl={"rounds": 3}` or
            `**{"partition.alpha": 100}`; a strategy or FL-algorithm class may stand for
            its name.

    Returns:
        The `Result`: the run directory and its metrics.

    Raises:
        falkit.errors.FalkitError: A bad setting or missing data, with a one-line message.
    """
    # a class given for a method (strategy=MyStrategy): its registered name, or its
    # `module:Class` spec (a class defined in a script runs in this process only)
    from falkit import registry

    overrides = {k: (registry.name_of(v) if isinstance(v, type) else v)
                 for k, v in config_mod.flatten(overrides).items()}
    if isinstance(config, Config):  # its TOML, with the preset and settings on top
        cfg = config_mod.load(None, preset, overrides, text=config_mod.dumps(config))
    else:
        cfg = config_mod.load(config, preset, overrides)
    from falkit.cli import RichReporter

    reporter = RichReporter(quiet)
    from falkit.loop import run  # every strategy, FAST too, runs the one FAL cycle

    res = run(cfg, reporter=reporter, overwrite=overwrite)
    return Result(res.run_dir, res.metrics, res.skipped, res.resumed_from)


def load_runs(paths: str | Path | list[str | Path]) -> pandas.DataFrame:
    """Every run under `paths` as one tidy pandas DataFrame (needs pandas).

    The same loader as `falkit report` (`falkit.report.load_runs`).

    Args:
        paths: Run directories, or folders searched for them; one path or a list.

    Returns:
        A row per run and cycle, with the run, its method (strategy and its non-default
            options), setting, seed, every setting that differs between the runs, the
            cycle, target and labeled %, accuracy, AUC (NaN where not recorded), per-class
            accuracy (`acc_<class>`), the share of each class among the cycle's queries
            (`share_<class>`), times and communication.

    Raises:
        falkit.errors.FalkitError: pandas is missing, or a result file is damaged.
    """
    try:
        import pandas as pd
    except ImportError:
        from falkit.errors import FalkitError

        raise FalkitError("falkit.load_runs needs pandas: pip install pandas") from None
    from falkit import report

    runs = report.load_runs([paths] if isinstance(paths, (str, Path)) else list(paths))
    flats = [config_mod.flatten(config_mod.experiment_dict(r.config)) for r in runs]
    keys = sorted({k for f in flats for k in f})
    varying = [k for k in keys if k not in ("name", "out_dir", "seed", "strategy")
               and len({repr(f.get(k)) for f in flats}) > 1]
    rows = []
    for r, flat in zip(runs, flats, strict=True):
        names = r.class_names
        for m in r.metrics:
            row: dict[str, Any] = {"run": r.dir.name, "method": r.method, "setting": r.setting,
                                   "seed": r.seed, "complete": r.complete}
            row.update({k: flat.get(k) for k in varying})
            queried = [int(m.get(f"queried_{c}", 0) or 0) for c in range(len(names))]
            total = sum(queried)
            for key, value in m.items():
                if key.startswith("acc_") and key[4:].isdigit():
                    row[f"acc_{names[int(key[4:])]}"] = value
                elif not key.startswith("queried_"):
                    row[key] = value
            if any(f"queried_{c}" in m for c in range(len(names))):
                row.update({f"share_{n}": (q / total if total else 0.0)
                            for n, q in zip(names, queried, strict=True)})
            rows.append(row)
    df = pd.DataFrame(rows)
    if "auc" in df.columns:  # a run resumed across the upgrade has "" in its early rows
        df["auc"] = pd.to_numeric(df["auc"], errors="coerce")
    return df
