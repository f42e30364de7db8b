"""Reports over finished runs (DESIGN.md §6): paper-style tables, paired statistics, PNG figures
and one self-contained HTML page. Reads run directories only (falkit.results, falkit.config) and
uses falkit.stats; it never imports the loop, the engine or the models.

Conventions, decided once here:

* A **run directory** is any directory holding both ``config.toml`` and ``metrics.csv``; every
  path given to :func:`load_runs` is either one or a parent searched recursively. A path that
  does not exist, or paths holding no run at all, raise :class:`~falkit.errors.FalkitError`; an
  existing path without runs among others only warns. A run whose metrics.csv has no row yet is
  skipped with a warning.
* **Damaged files** are refused, never half-read: a metrics.csv, partition.csv, rounds.csv or
  status.json that is not UTF-8, not CSV / JSON, has a short row or an extra field, lacks a
  column, holds text (or an out-of-range number) where a number belongs, or disagrees with the
  run's other files raises one :class:`~falkit.errors.FalkitError` naming the file (and line).
* **Incomplete runs** (status.json missing or not ``complete``) are loaded with
  ``Run.complete = False`` and a warning: their cycles count in accuracy tables and curves
  (each cell shows its own n when it differs), but not in AULC or the paired statistics, since an
  area over fewer cycles is not comparable. The report lists them.
* Runs are grouped by **setting**: every config field except ``strategy`` (the method),
  ``seed``, ``name``, ``out_dir``, ``data.data_root`` and runtime knobs other than precision.
  The setting's label names dataset, partition, ρ and K, plus the other fields that tell
  apart settings that share those. If two runs share setting, method and seed, the complete one with
  the most cycles is kept (the other is dropped with a warning).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from falkit import stats
from falkit.config import Config, flatten, loads, method_sections, to_dict
from falkit.errors import FalkitError
from falkit.results import parse_value, read_csv_records, read_csv_table, read_status

__all__ = [
    "Run", "load_runs", "find_run_dirs", "by_setting", "method_order", "recorded",
    "accuracy_table", "paired_table", "compare_text", "write_report",
    "Table", "Section", "Cell",
]

# Config fields that do not define the experiment: they never split settings.
_NOT_SETTING = ("name", "out_dir", "seed", "strategy", "data.data_root", "runtime.device",
                "runtime.channels_last", "runtime.threads", "runtime.eval_batch",
                "runtime.eval_every")
_CORE = ("data.dataset", "partition.method", "partition.alpha", "partition.classes_per_client",
         "partition.shards_per_client",
         "data.rho", "partition.num_clients", "data.val_split")


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v).lower() if v is None else str(v)


def recorded(value: Any) -> float | None:
    """A metrics.csv value as a number; None where none was recorded ("", NaN, absent)."""
    if value is None or value == "" or math.isnan(float(value)):
        return None
    return float(value)


@dataclass
class Run:
    """One run directory, parsed. ``setting`` is filled in by :func:`load_runs`."""

    dir: Path
    config: Config
    metrics: list[dict[str, Any]]
    class_names: list[str]
    partition: np.ndarray | None  # clients x classes, from partition.csv
    class_counts: np.ndarray | None  # global training count per class (partition.csv total row)
    complete: bool
    status: dict[str, Any] = field(default_factory=dict)
    setting: str = ""
    # rounds.csv (runtime.eval_every > 0): accuracy after every n-th FL round
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def method(self) -> str:
        """The strategy, plus its own option section's non-default values (an ablation or
        variant is a method of its own: `fairfal[selector=global]`, `kafal[kcfu=True]`)."""
        from falkit import registry

        section = self.config.section(registry.strategy_class(self.config.strategy).name)
        if section is None:
            return self.config.strategy
        default = type(section)()
        changed = [f"{f.name}={_fmt(getattr(section, f.name))}"
                   for f in dataclasses.fields(section)
                   if getattr(section, f.name) != getattr(default, f.name)]
        return self.config.strategy + (f"[{','.join(changed)}]" if changed else "")

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def num_classes(self) -> int:
        return sum(1 for k in self.metrics[0] if k.startswith("acc_")) if self.metrics else 0

    def setting_key(self) -> tuple[tuple[str, str], ...]:
        flat = flatten(to_dict(self.config))
        # a strategy's own options belong to the method (see `method`), not the setting
        own = method_sections("strategy")
        return tuple(sorted((k, _fmt(v)) for k, v in flat.items() if k not in _NOT_SETTING
                            and k.split(".", 1)[0] not in own))

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(labeled %, accuracy %) per cycle."""
        x = np.array([float(r["labeled_pct"]) for r in self.metrics])
        y = np.array([100.0 * float(r["accuracy"]) for r in self.metrics])
        return x, y

    def accuracy_at(self, pct: float, metric: str = "accuracy") -> float | None:
        """Accuracy (or another metric: "auc") in % at the cycle whose target labeled
        fraction is ``pct`` %, if reached and recorded (runs before falkit recorded the AUC,
        and Flower runs without simulation metrics, have none)."""
        for r in self.metrics:
            if math.isclose(float(r["target_pct"]), pct, abs_tol=1e-6):
                value = recorded(r.get(metric))
                return None if value is None else 100.0 * value
        return None

    def has_auc(self) -> bool:
        return any(self.accuracy_at(float(r["target_pct"]), "auc") is not None
                   for r in self.metrics)

    def aulc(self) -> float:
        return stats.aulc(*self.curve())

    def query_hist(self) -> np.ndarray:
        """cycles x classes: labels revealed per class in each cycle (row 0 = initial labels)."""
        c = self.num_classes
        return np.array([[int(r.get(f"queried_{k}", 0)) for k in range(c)] for r in self.metrics])

    def query_shares(self, include_initial: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(cycles, cumulative majority/intermediate/minority shares), see stats.group_shares."""
        if self.class_counts is None:
            raise FalkitError(f"{self.dir}: no partition.csv, so no class groups")
        groups = stats.class_groups(self.class_counts)
        return stats.group_shares(self.query_hist(), groups, include_initial)


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories among ``paths`` (each a run directory or a parent searched recursively)."""
    found: list[Path] = []
    seen: set[Path] = set()
    empty: list[Path] = []
    paths = list(paths)
    for p in map(Path, paths):
        if not p.exists():
            raise FalkitError(f"{p}: no such run directory")
        if (p / "config.toml").is_file() and (p / "metrics.csv").is_file():
            here = [p]
        else:
            # hidden folders are falkit's own (a run moved aside by --overwrite), not runs
            here = sorted(c.parent for c in p.rglob("config.toml")
                          if (c.parent / "metrics.csv").is_file()
                          and not any(part.startswith(".")
                                      for part in c.parent.relative_to(p).parts))
            if not here:
                empty.append(p)
        for d in here:
            if d.resolve() not in seen:
                seen.add(d.resolve())
                found.append(d)
    if not found:
        where = ", ".join(map(str, paths)) or "(no path given)"
        raise FalkitError(f"no run directory (config.toml + metrics.csv) under {where}")
    for p in empty:
        warnings.warn(f"{p}: no run directory (config.toml + metrics.csv) found", stacklevel=3)
    return found


def _value(v: Any) -> str:
    """A value as an error message quotes it (short, on one line)."""
    return repr(v if len(str(v)) <= 40 else f"{str(v)[:40]}...")


def _number(path: Path, line: int, row: dict[str, Any], key: str, low: float | None = None,
            high: float | None = None, nan: bool = False) -> None:
    """``row[key]`` is a number (NaN only if ``nan``), within [low, high] where given."""
    v = row[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (
            math.isnan(v) and not nan) or math.isinf(v):
        what = "a number" + (" (or nan)" if nan else "")
        raise FalkitError(f"{path}: line {line}: {key} is {_value(v)}, not {what}")
    if (low is not None and v < low) or (high is not None and v > high):
        where = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise FalkitError(f"{path}: line {line}: {key} is {v!r}, not {where}")


def _count(path: Path, line: int, key: str, v: Any) -> int:
    """``v`` (text or parsed) as a whole number >= 0."""
    if isinstance(v, str):
        try:
            v = int(v)
        except ValueError:
            pass
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise FalkitError(f"{path}: line {line}: {key} is {_value(v)}, not a whole number >= 0")
    return v


def _class_columns(path: Path, header: Sequence[str], prefix: str) -> int:
    """How many ``<prefix><c>`` columns there are; they must be numbered 0, 1, ..., C - 1."""
    for k in header:
        if k.startswith(prefix) and not (k[len(prefix):].isascii()
                                         and k[len(prefix):].isdigit()):
            raise FalkitError(f"{path}: column {_value(k)}: {prefix}<class> columns are "
                              "named by the class number")
    idx = sorted(int(k[len(prefix):]) for k in header if k.startswith(prefix))
    if idx != list(range(len(idx))):
        raise FalkitError(f"{path}: the {prefix}<class> columns must be numbered 0 to "
                          f"{len(idx) - 1}, not {', '.join(map(str, idx[:12]))}"
                          + (", ..." if len(idx) > 12 else ""))
    return len(idx)


_METRICS_NEEDED = ("cycle", "target_pct", "labeled", "labeled_pct", "accuracy")


def _read_metrics(run_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """metrics.csv, parsed and checked: the columns the report reads are there and every
    value the report or falkit.load_runs computes with is a number of the right kind, the
    cycles are 0, 1, 2, ... Damage is a FalkitError naming the file, the line and the value."""
    path = run_dir / "metrics.csv"
    header, records = read_csv_records(path)
    rows = [{k: parse_value(v) for k, v in r.items()} for _, r in records]
    if not rows:
        return header, rows
    missing = [k for k in _METRICS_NEEDED if k not in header]
    if missing:
        raise FalkitError(f"{path}: missing column(s) {', '.join(missing)} (a metrics.csv has "
                          f"{', '.join(_METRICS_NEEDED)}, ...)")
    n_acc = _class_columns(path, header, "acc_")
    n_queried = _class_columns(path, header, "queried_")
    if n_queried and n_acc and n_queried != n_acc:
        raise FalkitError(f"{path}: queried_<class> columns for {n_queried} classes but acc_"
                          f"<class> columns for {n_acc}")
    for i, ((line, _), row) in enumerate(zip(records, rows, strict=True)):
        cycle = _count(path, line, "cycle", row["cycle"])
        if cycle != i:
            raise FalkitError(f"{path}: line {line}: cycle {cycle} where {i} belongs (the "
                              "rows are cycles 0, 1, 2, ... in order)")
        _count(path, line, "labeled", row["labeled"])
        for key in ("target_pct", "labeled_pct"):
            _number(path, line, row, key, 0, 100)
        _number(path, line, row, "accuracy", 0, 1)
        if "auc" in row and row["auc"] != "":  # "" in rows from before falkit recorded it
            _number(path, line, row, "auc", 0, 1, nan=True)
        for key in header:
            if key.startswith("acc_"):
                _number(path, line, row, key, 0, 1, nan=True)  # nan: no test sample
            elif key.startswith("queried_"):
                _count(path, line, key, row[key])
            elif key in ("comm_bytes", "comm_mib") or key.startswith("time_"):
                _number(path, line, row, key, 0)
    return header, rows


def _read_partition(run_dir: Path) -> tuple[list[str], np.ndarray | None, np.ndarray | None]:
    """partition.csv (``client,<class names>,total``, a row per client 0, 1, ..., then a
    ``total`` row), checked: counts are whole numbers >= 0 and every total is its sum."""
    path = run_dir / "partition.csv"
    if not path.is_file():
        return [], None, None
    header, body = read_csv_table(path)
    if not header:
        raise FalkitError(f"{path}: empty file (no header client,<classes>,total)")
    if len(header) < 3 or header[0] != "client" or header[-1] != "total":
        raise FalkitError(f"{path}: the header must be client,<class names>,total, not "
                          f"{_value(','.join(header))}")
    names = header[1:-1]
    clients: list[list[int]] = []
    total: list[int] | None = None
    for line, r in body:
        if total is not None:
            raise FalkitError(f"{path}: line {line}: a row after the total row")
        counts = [_count(path, line, f"the count of class {_value(n)}", v)
                  for n, v in zip(names, r[1:-1], strict=True)]
        row_total = _count(path, line, "total", r[-1])
        if row_total != sum(counts):
            raise FalkitError(f"{path}: line {line}: total {row_total} is not the sum of the "
                              f"row ({sum(counts)})")
        if r[0] == "total":
            total = counts
            sums = np.array(clients, dtype=np.int64).sum(axis=0).tolist() if clients else []
            if total != sums:
                raise FalkitError(f"{path}: line {line}: the total row is not the sum of the "
                                  "client rows")
        elif r[0] != str(len(clients)):
            raise FalkitError(f"{path}: line {line}: client {_value(r[0])} where "
                              f"{len(clients)} belongs (rows are clients 0, 1, ..., then total)")
        else:
            clients.append(counts)
    if not clients:
        raise FalkitError(f"{path}: no client row")
    part = np.array(clients, dtype=np.int64)
    return names, part, np.array(total, dtype=np.int64) if total else part.sum(axis=0)


def _read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """rounds.csv (cycle, round, accuracy), checked like metrics.csv; [] if there is none."""
    path = run_dir / "rounds.csv"
    if not path.is_file():
        return []
    header, records = read_csv_records(path)
    missing = [k for k in ("cycle", "round", "accuracy") if k not in header]
    if records and missing:
        raise FalkitError(f"{path}: missing column(s) {', '.join(missing)} (a rounds.csv has "
                          "cycle, round, accuracy)")
    rounds = []
    for line, r in records:
        row = {"cycle": _count(path, line, "cycle", r["cycle"]),
               "round": _count(path, line, "round", r["round"]),
               "accuracy": parse_value(r["accuracy"])}
        _number(path, line, row, "accuracy", 0, 1)
        rounds.append(row)
    return rounds


def _same_test_set(run_dir: Path, metrics: list[dict[str, Any]]) -> int:
    """How many leading cycles were evaluated on one test set (metrics.csv `test_samples`,
    `clients`): accuracies of different test sets are never averaged or compared, so the
    report keeps the cycles before a change and says so."""
    def of(row: dict[str, Any]) -> tuple[Any, Any]:
        return row.get("test_samples"), row.get("clients")

    for i, row in enumerate(metrics[1:], 1):
        if of(row) != of(metrics[0]):
            (n0, k0), (n, k) = of(metrics[0]), of(row)
            warnings.warn(f"{run_dir}: from cycle {i + 1} evaluated on {n} test samples of "
                          f"{k} clients, before on {n0} of {k0} (a site left the run); the "
                          f"report uses cycles 1-{i} only, as an incomplete run",
                          stacklevel=4)
            return i
    return len(metrics)


def _load_one(run_dir: Path) -> Run | None:
    """One run directory, every file read and checked before anything is used (or warned
    about): damage is one FalkitError naming the file and what is wrong."""
    try:
        cfg = loads((run_dir / "config.toml").read_text())
    except Exception as e:  # noqa: BLE001 - any parse failure becomes one user-facing line
        raise FalkitError(f"{run_dir / 'config.toml'}: cannot read config ({e})") from None
    header, metrics = _read_metrics(run_dir)
    if not metrics:
        warnings.warn(f"{run_dir}: metrics.csv has no cycle yet; skipped", stacklevel=3)
        return None
    names, part, counts = _read_partition(run_dir)
    status = read_status(run_dir)
    rounds = _read_rounds(run_dir)
    classes = _class_columns(run_dir / "metrics.csv", header, "acc_")
    if names and classes and len(names) != classes:
        raise FalkitError(f"{run_dir / 'metrics.csv'}: {classes} classes (acc_<class> "
                          f"columns), but partition.csv has {len(names)}")
    cycles = status.get("cycles")
    if cycles is not None and (len(metrics) > cycles
                               or (status["complete"] and len(metrics) != cycles)):
        raise FalkitError(f"{run_dir / 'metrics.csv'}: {len(metrics)} cycle(s), but status.json "
                          + (f"says the run completed {cycles}" if status["complete"]
                             else f"says the run has {cycles} in all"))
    complete = bool(status.get("complete"))
    cut = _same_test_set(run_dir, metrics)
    if cut < len(metrics):  # a site left a Flower run (fl.on_client_failure = continue)
        metrics, rounds, complete = metrics[:cut], [r for r in rounds if r["cycle"] < cut], False
    run = Run(run_dir, cfg, metrics, names, part, counts, complete, status)
    run.rounds = rounds
    if not names:
        run.class_names = [str(c) for c in range(run.num_classes)]
    if not run.complete:
        warnings.warn(f"{run_dir}: incomplete run ({len(metrics)} cycles); "
                      "used in accuracy tables and curves, not in AULC statistics", stacklevel=3)
    return run


def _label(key: dict[str, str], extra: Sequence[str]) -> str:
    method = key["partition.method"]
    if method in ("dirichlet", "dirichlet_balanced"):
        part = f"{method} α={key['partition.alpha']}"
    elif method == "shards":
        part = f"shards s={key.get('partition.shards_per_client', 2)}"
    elif method == "pathological":
        part = f"pathological c={key['partition.classes_per_client']}"
    else:
        part = method
    bits = [key["data.dataset"], part, f"ρ={key['data.rho']}", f"K={key['partition.num_clients']}"]
    split = key.get("data.val_split", "ignore")
    if split != "ignore":  # always said: "test" means the numbers are on the val split
        bits.append("train+val" if split == "train" else "evaluated on val")
    bits += [f"{k}={key[k]}" for k in extra]
    return ", ".join(bits)


def load_runs(run_dirs: Iterable[str | Path]) -> list[Run]:
    """Load every run under ``run_dirs`` (see the module docstring for the conventions)."""
    runs = [r for r in map(_load_one, find_run_dirs(run_dirs)) if r is not None]
    by_core: dict[str, set[tuple[tuple[str, str], ...]]] = {}
    for r in runs:
        by_core.setdefault(_label(dict(r.setting_key()), ()), set()).add(r.setting_key())
    for r in runs:
        # fields beyond the core ones are named only where they tell settings apart
        dicts = [dict(k) for k in by_core[_label(dict(r.setting_key()), ())]]
        varying = sorted({k for d in dicts for k in d
                          if k not in _CORE and len({dd.get(k) for dd in dicts}) > 1})
        r.setting = _label(dict(r.setting_key()), varying)
    best: dict[tuple[str, str, int], Run] = {}
    for r in runs:
        k = (r.setting, r.method, r.seed)
        old = best.get(k)
        if old is None:
            best[k] = r
            continue
        keep, drop = (r, old) if (r.complete, len(r.metrics)) > (old.complete,
                                                                  len(old.metrics)) else (old, r)
        warnings.warn(f"{drop.dir}: same setting, method and seed as {keep.dir}; dropped",
                      stacklevel=2)
        best[k] = keep
    kept = {id(r) for r in best.values()}
    return [r for r in runs if id(r) in kept]


def _setting_sort_key(runs: list[Run]) -> tuple[Any, ...]:
    c = runs[0].config
    return (c.data.dataset, c.partition.method, c.partition.alpha,
            c.data.rho if c.data.rho is not None else math.inf, c.partition.num_clients,
            runs[0].setting)


def by_setting(runs: Iterable[Run]) -> dict[str, list[Run]]:
    """Runs grouped by setting label, settings ordered by dataset, partition, α, ρ, K."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.setting, []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: _setting_sort_key(kv[1])))


def method_order(runs: Iterable[Run]) -> list[str]:
    """Distinct methods, ``random`` first, the rest alphabetically."""
    return sorted({r.method for r in runs}, key=lambda m: (m != "random", m.lower()))


# The submodules import Run and the helpers above, so they are imported last.
from falkit.report.html import write_report  # noqa: E402
from falkit.report.tables import (  # noqa: E402
    Cell,
    Section,
    Table,
    accuracy_table,
    compare_text,
    paired_table,
)
