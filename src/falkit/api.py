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
from typing import Any

from falkit import config as config_mod
from falkit.config import Config


@dataclass
class Result:
    """What `falkit.run` did: the run directory and its metrics rows (one per cycle)."""

    run_dir: Path
    metrics: list[dict[str, Any]]
    skipped: bool = False  # it was complete already
    resumed_from: int | None = None  # the first cycle this call ran, when it resumed

    @property
    def accuracy(self) -> list[float]:
        return [float(r["accuracy"]) for r in self.metrics]

    def frame(self):
        """This run as `load_runs` gives it (a pandas DataFrame)."""
        return load_runs([self.run_dir])

    def model(self, cycle: int = -1):
        """The global model of `cycle` (default the last), rebuilt (an nn.Module)."""
        from falkit.models.saved import load_model, model_file

        c = int(self.metrics[cycle]["cycle"])
        return load_model(model_file(self.run_dir, c))


def run(config: str | Path | Config | None = None, *, preset: str | None = None,
        quiet: bool = False, overwrite: bool = False, **overrides: Any) -> Result:
    """Run (or resume, or skip if finished) one experiment: a TOML file, a `Config`, or the
    defaults, with a preset and settings on top (`strategy="fairfal"`, `fl={"rounds": 3}`,
    `**{"partition.alpha": 100}`). Shows progress bars unless `quiet`. FAST runs too."""
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


def load_runs(paths: str | Path | list[str | Path]):
    """Every run under `paths` (run directories, or folders searched for them) as one tidy
    pandas DataFrame: a row per run × cycle with the run, its method (strategy and its
    non-default options), setting, seed, every setting that differs between the runs, the
    cycle, target and labeled %, accuracy, AUC (NaN where not recorded), per-class accuracy
    (`acc_<class>`), the share of each class among the cycle's queries (`share_<class>`),
    times and communication. The same loader as `falkit report` (falkit.report.load_runs)."""
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
