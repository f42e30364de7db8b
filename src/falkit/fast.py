"""FAST runs and their summaries (ALGORITHMS.md §6; the method itself is the strategy
`falkit.al.fast.Fast`, whose two passes are cycle 0 of the one FAL cycle on either transport).

`run` is `falkit.loop.run` for a FAST config; `two_passes` runs the strategy's passes on
in-process client sites over given embeddings (for studies and tests); summaries and FAST
Table III's comparison read finished run directories.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from falkit import config as config_mod
from falkit.al.base import create as create_strategy
from falkit.al.fast import (  # noqa: F401  (the primitives, where users found them)
    MIB,
    UNCERTAINTIES,
    bank_payloads,
    class_balanced_pick,
    class_similarity,
    embeddings,
    fraction_count,
    initial_set,
    knn_weak_labels,
    model_traffic,
    pooled_budget,
    refine,
    refinement_budgets,
    top_uncertain,
    training_config,
    uncertainty,
    weak_row,
    weak_rows_total,
)
from falkit.config import Config
from falkit.data.federation import FederatedData
from falkit.data.sources import ImageDataset
from falkit.driver import Reporter, RunResult
from falkit.errors import ConfigError
from falkit.oracle import SimulatedOracle
from falkit.results import read_metrics
from falkit.site import ClientSite, initial_passes


def run(cfg: Config, reporter: Reporter | None = None, overwrite: bool = False,
        dataset: ImageDataset | None = None) -> RunResult:
    """Run FAST (one AL round) for `cfg` (cfg.strategy must be "fast"): `falkit.loop.run`,
    which writes config.toml, metrics.csv (one row), clients.csv (weak-label accuracy per
    client), comm.csv (every payload), queries.jsonl, partition.csv, status.json. A
    finished run is skipped; an unfinished one starts over (one round of training; the
    embeddings come from the cache)."""
    if cfg.strategy != "fast":
        raise ConfigError(f"FAST runs need strategy = fast, got {cfg.strategy!r}")
    from falkit.loop import run as run_loop

    return run_loop(cfg, reporter=reporter, overwrite=overwrite, dataset=dataset)


# -- the two passes on given embeddings ----------------------------------------------------------
@dataclass
class Passes:
    """What the two passes decided: human-labeled indices per client (initial, queried), the
    weak label of every train sample that has one, and the bank sizes (uploads)."""

    initial: list[np.ndarray]
    queried: list[np.ndarray]
    weak: np.ndarray  # int64 per train sample, -1 where none was made (human-labeled first)
    bank_sizes: list[int]


def two_passes(cfg: Config, data: FederatedData, z: np.ndarray,
               oracle: SimulatedOracle) -> Passes:
    """Both passes of FAST (the strategy's hooks, as a run makes them) for every client of
    `data`; the oracle reveals (and audits) every human label. `z` holds the embeddings of
    the train samples (rows = data.dataset indices)."""
    strategy = create_strategy("fast")
    y = data.dataset.y_train
    labels = types.SimpleNamespace(train_y=torch.full((len(y),), -1, dtype=torch.int64),
                                   device=torch.device("cpu"))  # what the sites reveal to
    known = np.full(len(y), -1, dtype=np.int64)
    sites = [ClientSite(cfg, k, pool, data.num_classes, oracle, known, labels, 0, y,
                        {"z": z, "cached": False}) for k, pool in enumerate(data.clients)]
    first, second = initial_passes(cfg, strategy, sites, oracle)
    weak = np.full(len(y), -1, dtype=np.int64)
    for s in sites:
        unl, w = s.extras["weak"]
        weak[unl] = w
    extra = strategy.initial_extra(cfg, [first, second])
    return Passes(initial=[np.asarray(first[k].record["indices"], dtype=np.int64)
                           for k in range(len(sites))],
                  queried=[np.asarray(second[k].record["indices"], dtype=np.int64)
                           for k in range(len(sites))],
                  weak=weak, bank_sizes=extra["bank_sizes"])


def weak_label_report(data: FederatedData, passes: Passes) -> list[dict[str, Any]]:
    """Weak-label accuracy per client and overall, before and after refinement (§6 "Report"):
    over the samples that got a weak label; after refinement a queried sample carries its
    human label, so after − before = corrected / n exactly."""
    y = data.dataset.y_train
    rows = []
    for k, pool in enumerate(data.clients):
        unl = pool[passes.weak[pool] >= 0]
        rows.append(weak_row(k, len(pool), len(passes.initial[k]), passes.weak[unl], y[unl],
                             np.isin(unl, passes.queried[k])))
    return weak_rows_total(rows)


# -- summaries ----------------------------------------------------------------------------------
def _read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open() as fh:
        return list(csv.DictReader(fh))


def _pct(v: Any) -> str:
    return "-" if v in (None, "") else f"{100 * float(v):.2f} %"


def summary_text(run_dir: str | Path) -> str:
    """What a FAST run did, in a few lines: accuracy, labels, weak-label accuracy per client
    before/after refinement, communication, time per phase."""
    run_dir = Path(run_dir)
    cfg = config_mod.loads((run_dir / "config.toml").read_text())
    row = read_metrics(run_dir)[0]
    f = cfg.fast
    lines = [f"FAST: encoder {f.encoder}, scope {f.scope}, bank {f.bank}, uncertainty "
             f"{f.uncertainty}, model {cfg.model.backbone}, weak labels "
             f"{'on' if f.weak_labels else 'off'}, refinement {'on' if f.refine else 'off'}",
             f"accuracy {100 * row['accuracy']:.2f} % on the test set, "
             f"{row['labeled']:,} human labels ({row['labeled_pct']:.2f} %), trained on "
             f"{row['trained_on']:,} samples",
             "weak-label accuracy before -> after refinement (corrected / queried):"]
    for r in _read_csv(run_dir / "clients.csv"):
        who = "all" if r["client"] == "all" else f"client {r['client']}"
        lines.append(f"  {who:<10} {_pct(r['weak_acc_before']):>9} -> "
                     f"{_pct(r['weak_acc_after']):>9}  ({r['corrected']} / {r['queried']})")
    lines.append(f"communication: model {row['comm_mib']:.4f} MiB over {row['rounds']} rounds "
                 f"(down + up), one-off {row['oneoff_mib']:.4f} MiB (labeled-embedding bank)")
    phases = ", ".join(f"{k[5:]} {float(v):.1f} s" for k, v in row.items()
                       if k.startswith("time_") and k != "time_local_model")
    lines.append(f"time: {phases}")
    return "\n".join(lines)


def comparison_rows(run_dirs: list[str | Path]) -> list[dict[str, Any]]:
    """FAST Table III's layout from finished run directories (FAST or `falkit run`): final
    accuracy, labeled %, AL rounds (trainings), FL rounds, model MiB, one-off MiB, wall-clock
    (the runs' own phase timings; FAST's includes encoding, neither includes data loading)."""
    rows = []
    for d in run_dirs:
        d = Path(d)
        cfg = config_mod.loads((d / "config.toml").read_text())
        metrics = read_metrics(d)
        last = metrics[-1]
        is_fast = cfg.strategy == "fast"
        method = (f"FAST ({cfg.fast.encoder}, {cfg.model.backbone}"
                  f"{', pooled' if cfg.fast.scope == 'pooled' else ''})" if is_fast
                  else cfg.strategy)
        wall = sum(float(r[k]) for r in metrics for k in r
                   if k.startswith("time_") and k != "time_data")
        rows.append({
            "method": method,
            "model": cfg.model.backbone,
            "labeled_pct": round(float(last["labeled_pct"]), 2),
            "accuracy": round(100 * float(last["accuracy"]), 2),
            "al_rounds": len(metrics),
            "fl_rounds": len(metrics) * cfg.fl.rounds,
            "model_mib": round(sum(float(r["comm_bytes"]) for r in metrics) / MIB, 2),
            "oneoff_mib": round(sum(float(r.get("oneoff_bytes", 0)) for r in metrics) / MIB, 3),
            "wall_clock_s": round(wall, 1),
            "run": d.name,
        })
    return rows


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| method | labeled % | accuracy % | AL rounds | FL rounds | model MiB | "
            "one-off MiB | wall-clock s |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['method']} | {r['labeled_pct']:.2f} | {r['accuracy']:.2f} | "
                     f"{r['al_rounds']} | {r['fl_rounds']} | {r['model_mib']:.2f} | "
                     f"{r['oneoff_mib']:.3f} | {r['wall_clock_s']:.1f} |")
    return "\n".join(lines) + "\n"
