"""FAST in process: two-pass, one-shot federated active learning with a frozen encoder
(ALGORITHMS.md §6; the selection itself is `falkit.al.fast`).

`run` embeds every sample with the frozen encoder (cached), then drives FAST's one cycle
with the one FAL driver (`falkit.driver`) on an `InProcessFederation` whose cycle 0 is the
two passes (`two_passes`: per client, or pooled as the reference code does), trained on
human plus weak labels with the ordinary `Engine` (on the images, or on the embeddings for
linear probing). Summaries and FAST Table III's comparison read finished run directories.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from falkit import config as config_mod
from falkit import tracking
from falkit.al.base import create as create_strategy
from falkit.al.fast import (  # noqa: F401  (the primitives, where users found them)
    MIB,
    UNCERTAINTIES,
    bank_payloads,
    class_balanced_pick,
    class_similarity,
    fraction_count,
    initial_set,
    knn_weak_labels,
    model_traffic,
    refine,
    refinement_budgets,
    top_uncertain,
    training_config,
    uncertainty,
    weak_row,
    weak_rows_total,
)
from falkit.config import Config
from falkit.data.federation import FederatedData, build
from falkit.data.sources import ImageDataset, load
from falkit.driver import Queried, Reporter, RunResult
from falkit.driver import run as drive
from falkit.errors import ConfigError
from falkit.fl.engine import Engine, ImageTensors, configure_process
from falkit.inprocess import InProcessFederation
from falkit.loop import engine_for
from falkit.models import encoders
from falkit.models.backbones import create as create_backbone
from falkit.oracle import SimulatedOracle
from falkit.results import read_metrics
from falkit.rundir import RunDir, data_fingerprint
from falkit.seeding import rng


# -- the two passes in process ------------------------------------------------------------------
@dataclass
class Passes:
    """What the two passes decided: human-labeled indices per client (initial, queried), the
    weak label of every train sample that has one, and the bank sizes (uploads)."""

    initial: list[np.ndarray]
    queried: list[np.ndarray]
    weak: np.ndarray  # int64 per train sample, -1 where none was made (human-labeled first)
    bank_sizes: list[int]


def pooled_budget(fraction: float, n: int, unlabeled: int, mode: str = "all") -> int:
    """The pooled pass's refinement count: ceil(fraction · N) over all N samples (`all`),
    or int(fraction · |U_0|) over those left unlabeled by the initial set (`code`:
    FAST-official's `int(query_ratio * len(unlabeled_indices))`)."""
    if mode == "code":
        return min(unlabeled, int(fraction * unlabeled))
    return min(unlabeled, fraction_count(fraction, n))


def two_passes(cfg: Config, data: FederatedData, z: np.ndarray,
               oracle: SimulatedOracle) -> Passes:
    """Both passes of FAST for every client; the oracle reveals (and audits) every human
    label. `z` holds the embeddings of the train samples (rows = data.dataset indices)."""
    f = cfg.fast
    y = data.dataset.y_train  # read only through the oracle and for reporting
    C, K = data.num_classes, len(data.clients)
    weak = np.full(len(y), -1, dtype=np.int64)
    queried: list[np.ndarray] = []
    if f.scope == "client":
        budgets = refinement_budgets(f.budget, [len(p) for p in data.clients], f.budget_split)
        initial = [initial_set(cfg, k, pool) for k, pool in enumerate(data.clients)]
        labels = [oracle.label(k, g) for k, g in enumerate(initial)]
        # §6 step 2: the shared bank is uploaded once and redistributed to every client
        shared = (np.concatenate(initial), np.concatenate(labels))
        bank_sizes = [len(g) for g in initial] if f.bank == "shared" else [0] * K
        for k, pool in enumerate(data.clients):
            bank_idx, bank_y = shared if f.bank == "shared" else (initial[k], labels[k])
            unl, weak_unl, pick = refine(cfg, k, pool, initial[k], z.__getitem__,
                                         z[bank_idx], bank_y, C, budgets[k])
            weak[unl] = weak_unl
            oracle.label(k, pick)  # Alg. 1 refinement pass: human labels for the top-b_k
            queried.append(pick)
    else:  # pooled: the reference code's first pass over the whole training set
        owner = np.full(len(y), -1, dtype=np.int64)
        for k, pool in enumerate(data.clients):
            owner[pool] = k
        everyone = np.sort(np.concatenate(data.clients))
        g0 = class_balanced_pick(y, everyone, fraction_count(f.initial, len(everyone)), C,
                                 rng(cfg.seed, "fast_initial_pooled"))
        initial = [g0[owner[g0] == k] for k in range(K)]
        bank_y = np.concatenate([oracle.label(k, g) for k, g in enumerate(initial)])
        bank_idx = np.concatenate(initial)
        unl = np.setdiff1d(everyone, g0, assume_unique=True)
        weak[unl] = knn_weak_labels(z[unl], z[bank_idx], bank_y, f.k, C)
        s, _ = class_similarity(z[unl], z[bank_idx], bank_y, C)
        u = uncertainty(s, f.uncertainty, rng(cfg.seed, "fast_query_pooled"))
        b = pooled_budget(f.budget, len(everyone), len(unl), f.pooled_budget) if f.refine else 0
        pick = unl[top_uncertain(u, b)]
        for k in range(K):
            mine = pick[owner[pick] == k]
            oracle.label(k, mine)
            queried.append(mine)
        bank_sizes = [len(g) for g in initial]  # counted as if uploaded and redistributed
    return Passes(initial=initial, queried=queried, weak=weak, bank_sizes=bank_sizes)


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


def embeddings(cfg: Config, ds: ImageDataset, splits: tuple[str, ...] = ("train",),
               enc: encoders.Encoder | None = None) -> tuple[dict[str, np.ndarray], bool]:
    """The encoder's embeddings of the full splits of `ds` (before the long tail, so every
    seed and setting reuses one cache entry); whether all came from the cache."""
    if enc is None:
        enc = encoders.create(cfg.fast.encoder, batch_size=cfg.fast.encode_batch,
                              device=cfg.runtime.device)
    enc.fit(ds.x_train)  # pca: fitted on the train split; others: nothing
    out, hits = {}, []
    for split in splits:
        x = ds.x_train if split == "train" else ds.x_test
        out[split], hit = encoders.embed(enc, x, ds.name, split, cfg.fast.cache_dir)
        hits.append(hit)
    return out, all(hits)


def fast_engine(cfg: Config, ds: ImageDataset, num_classes: int, num_clients: int,
                z_train: np.ndarray | None, z_test: np.ndarray | None,
                train_y: torch.Tensor | None = None) -> Engine:
    """FAST's engine: the ordinary one on the images, or, for linear probing
    (`model.backbone = "linear"`), on the embeddings as N×D×1×1 float tensors with mean 0
    and std 1/255, so the engine's normalisation (x/255 − mean)/std is the identity, and no
    augmentation. τ local steps per round (`fast.local_steps`); FAST's training recipe
    (`falkit.al.fast.training_config`: its FedAvg weights, lr, weight decay, batch) and,
    on the images, `fast.crop_pad`'s random crop."""
    cfg = training_config(cfg)
    y = torch.as_tensor(ds.y_train) if train_y is None else train_y
    if cfg.model.backbone == "linear":
        assert z_train is not None and z_test is not None
        d = z_train.shape[1]
        ident = ((0.0,) * d, (1 / 255,) * d)
        engine = Engine(cfg, ImageTensors(torch.as_tensor(z_train).view(-1, d, 1, 1), y,
                                          *ident),
                        ImageTensors(torch.as_tensor(z_test).view(-1, d, 1, 1),
                                     torch.as_tensor(ds.y_test), *ident),
                        num_classes, num_clients=num_clients)
    else:
        if cfg.fast.crop_pad is not None:  # FAST-official: RandomCrop(padding 4)
            ds = dataclasses.replace(ds, crop_pad=cfg.fast.crop_pad)
        engine = engine_for(cfg, ds, num_classes, num_clients, train_y=y)
    engine.local_steps = cfg.fast.local_steps or None  # tau SGD steps, or fl.local_epochs
    return engine


def training_labels(passes: Passes, human: list[np.ndarray], y: np.ndarray,
                    pools: list[np.ndarray], weak_labels: bool
                    ) -> tuple[np.ndarray, list[np.ndarray]]:
    """One-shot training's labels (§6 step 6): the human labels, and the weak label of
    every other sample of a client's pool (`weak_labels`); each client's training pool."""
    train_y = passes.weak.copy()
    all_human = np.concatenate(human)
    train_y[all_human] = y[all_human]  # human labels, revealed by the oracle
    train = ([np.union1d(h, p[passes.weak[p] >= 0]) for h, p in
              zip(human, pools, strict=True)] if weak_labels else human)
    return np.where(train_y < 0, 0, train_y), train  # samples in no pool: never indexed


def _in_process_passes(cfg: Config, fed: InProcessFederation, z_train: np.ndarray,
                       cached: bool, times: dict[str, float]) -> Queried:
    """FAST's cycle 0 on the in-process federation: the two passes, then every client's
    training pool and labels (human + weak)."""
    data, oracle = fed.data, fed.oracle
    y = data.dataset.y_train
    passes = two_passes(cfg, data, z_train, oracle)
    human = [np.union1d(g, q) for g, q in zip(passes.initial, passes.queried, strict=True)]
    oracle.audit(sum(len(h) for h in human))  # exactly the human labels FAST accounts for
    train_y, fed.labeled = training_labels(passes, human, y, data.clients,
                                           cfg.fast.weak_labels)
    fed.engine.train_y = torch.as_tensor(train_y, device=fed.engine.device)
    records = []
    for k in range(len(data.clients)):
        records.append({"cycle": 0, "client": k, "strategy": "fast_initial",
                        "indices": passes.initial[k].tolist(),
                        "labels": y[passes.initial[k]].tolist()})
        records.append({"cycle": 0, "client": k, "strategy": "fast",
                        "indices": passes.queried[k].tolist(),
                        "labels": y[passes.queried[k]].tolist()})
    weak = weak_label_report(data, passes)
    for k in range(len(data.clients)):
        records[2 * k + 1].update(weak_acc_before=weak[k]["weak_acc_before"],
                                  weak_acc_after=weak[k]["weak_acc_after"])
    all_human = np.concatenate(human)
    extra = {"human": len(all_human), "trained_on": sum(len(p) for p in fed.labeled),
             "weak_rows": weak, "bank_sizes": passes.bank_sizes, "dim": z_train.shape[1],
             "cached": cached}
    return Queried(records, np.bincount(y[all_human], minlength=data.num_classes),
                   times=times, extra=extra)


def run(cfg: Config, reporter: Reporter | None = None, overwrite: bool = False,
        dataset: ImageDataset | None = None) -> RunResult:
    """Run FAST (one AL round) for `cfg` (cfg.strategy must be "fast") and write its run
    directory: config.toml, metrics.csv (one row, like one cycle of `falkit run`),
    clients.csv (weak-label accuracy per client), comm.csv (every payload), queries.jsonl,
    partition.csv, status.json. A finished run is skipped; an unfinished one starts over
    (one round of training; the embeddings come from the cache)."""
    if cfg.strategy != "fast":
        raise ConfigError(f"FAST runs need strategy = fast, got {cfg.strategy!r}")
    rd = RunDir.of(cfg)
    if rd.inspect(cfg, overwrite) == "complete":
        return RunResult(rd.path, read_metrics(rd.path), skipped=True)
    tracking.check(cfg)
    configure_process(cfg)
    linear = cfg.model.backbone == "linear"  # Table II ① linear probing
    times = {"data": 0.0, "encode": 0.0}
    # every encoder error (missing model, file, package; unknown kind) before any write
    enc = encoders.create(cfg.fast.encoder, batch_size=cfg.fast.encode_batch,
                          device=cfg.runtime.device)  # runs on the run's device
    t = time.perf_counter()
    ds = dataset if dataset is not None else load(cfg.data.dataset, cfg.data.data_root,
                                                  cfg.data.val_split)
    data = build(cfg, ds)
    times["data"] = time.perf_counter() - t
    if not linear:  # the backbone fits the images, before anything is written
        create_backbone(cfg.model.backbone, num_classes=data.num_classes,
                        in_channels=ds.in_channels, image_size=ds.image_size)
    strategy = create_strategy("fast")
    t = time.perf_counter()
    z, cached = embeddings(cfg, ds, ("train", "test") if linear else ("train",), enc)
    z_train = z["train"][data.source_indices]  # rows of data.dataset (the long-tailed subset)
    times["encode"] = time.perf_counter() - t
    engine = fast_engine(cfg, data.dataset, data.num_classes, len(data.clients), z_train,
                         z.get("test"))
    fed = InProcessFederation(cfg, strategy, data, engine, initial_labels=lambda f: (
        _in_process_passes(cfg, f, z_train, cached, times)))
    return drive(cfg, strategy, fed, rd, reporter=reporter, overwrite=overwrite,
                 fingerprint=data_fingerprint(data.dataset, cfg.data.dataset))


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
