"""FAST: two-pass, one-shot federated active learning with a frozen encoder (ALGORITHMS.md §6;
Li, Funk, Wang, Saeed, "FAST: Federated Active Learning with Foundation Models for
Communication-efficient Sampling and Training").

Pass 1 (preliminary): embed every sample with the frozen encoder, give each unlabeled sample
the majority label of its k nearest labeled embeddings (weak label), and score it by the
uncertainty of its class-similarity vector. Pass 2 (refinement): the oracle labels the b_k
most uncertain samples of each client. Then one federated training (one AL round) on human
plus weak labels, with the ordinary `Engine`.

The selection primitives (`knn_weak_labels`, `class_similarity`, `uncertainty`,
`top_uncertain`) are pure functions on arrays; `run` composes them with the data, the
encoder cache, the oracle and the engine, and writes a run directory like `falkit run`.
FAST is not a per-cycle `Strategy` (it changes the training labels and trains once), so it
has its own driver instead of `loop.run`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from falkit import config as config_mod
from falkit.al.primitives import top_k
from falkit.config import Config
from falkit.data.federation import FederatedData, build
from falkit.data.partition import write_partition_csv
from falkit.data.sources import ImageDataset, load
from falkit.driver import Reporter
from falkit.errors import ConfigError
from falkit.fl.algorithms import check_finite, state_bytes
from falkit.fl.engine import Engine, ImageTensors, configure_process
from falkit.models import encoders
from falkit.models.backbones import create as create_backbone
from falkit.oracle import SimulatedOracle
from falkit.results import read_metrics, write_atomic, write_csv, write_jsonl
from falkit.rundir import RunDir, data_fingerprint
from falkit.seeding import rng

UNCERTAINTIES = config_mod.CHOICES["fast.uncertainty"]  # one list: the config's choices
MIB = 2 ** 20


# -- pure primitives ----------------------------------------------------------------------------
def knn_weak_labels(z: np.ndarray, bank_z: np.ndarray, bank_y: np.ndarray, k: int,
                    num_classes: int, chunk: int = 4096) -> np.ndarray:
    """Weak label of every row of `z`: majority vote of its k nearest bank embeddings in L2
    (FAST Alg. 1, preliminary pass; ALGORITHMS.md §6 step 2). Fewer than k neighbours if the
    bank is smaller; equal distances → smaller bank index first; tied votes → smallest class."""
    if len(bank_z) == 0:
        raise ValueError("the labeled embedding bank is empty")
    k = min(k, len(bank_z))
    bank = torch.as_tensor(bank_z, dtype=torch.float64)
    out = np.empty(len(z), dtype=np.int64)
    for b in range(0, len(z), chunk):
        q = torch.as_tensor(z[b:b + chunk], dtype=torch.float64)
        d = torch.cdist(q, bank).numpy()
        nn_idx = np.argsort(d, axis=1, kind="stable")[:, :k]
        votes = np.zeros((len(q), num_classes), dtype=np.int64)
        np.add.at(votes, (np.arange(len(q))[:, None], bank_y[nn_idx]), 1)
        out[b:b + chunk] = votes.argmax(1)  # argmax takes the first maximum: smallest class
    return out


def class_similarity(z: np.ndarray, bank_z: np.ndarray, bank_y: np.ndarray,
                     num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """s[i, c] = mean over bank entries j of class c of cos(z_i, z_j) (FAST Eq. 7), for the
    classes present in the bank (returned second; absent classes are excluded, §6 step 3).
    The mean of cosines equals the dot product with the mean of the unit bank vectors."""
    present = np.unique(bank_y)
    present = present[present < num_classes]

    def unit(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    bank_u = unit(bank_z)
    protos = np.stack([bank_u[bank_y == c].mean(0) for c in present])
    return unit(z) @ protos.T, present


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def uncertainty(s: np.ndarray, method: str = "entropy",
                gen: np.random.Generator | None = None) -> np.ndarray:
    """Uncertainty score per row of the similarity matrix `s` (higher = more uncertain).

    * entropy — H(softmax(s_i)) (FAST Eq. 8, the paper's default);
    * norm — ‖s_i − onehot(argmax s_i)‖₂ (the reference code's default, §6 step 4);
    * least_confidence — 1 − max p, p = softmax(s_i);
    * smallest_margin — −(p₍₁₎ − p₍₂₎): a small gap between the top two is uncertain;
    * largest_margin — −(p₍₁₎ − p₍C₎): a small gap between the top and the bottom;
    * random — uniform scores from `gen` (FAST Table VII; Table II ④ random refinement).
    The margins and least confidence use softmax(s) like the entropy (FAST appendix Table VII
    names them without a formula: the standard definitions on the probability vector)."""
    s = np.asarray(s, dtype=np.float64)
    if method == "random":
        if gen is None:
            raise ValueError("uncertainty 'random' needs a numpy Generator")
        return gen.random(len(s))
    if method == "norm":
        onehot = np.zeros_like(s)
        onehot[np.arange(len(s)), s.argmax(1)] = 1.0
        return np.linalg.norm(s - onehot, axis=1)
    p = _softmax(s)
    if method == "entropy":
        return -(p * np.log(np.clip(p, 1e-300, None))).sum(1)
    ps = np.sort(p, axis=1)[:, ::-1]
    if method == "least_confidence":
        return 1.0 - ps[:, 0]
    if method == "smallest_margin":
        return -(ps[:, 0] - ps[:, 1]) if p.shape[1] > 1 else np.zeros(len(p))
    if method == "largest_margin":
        return -(ps[:, 0] - ps[:, -1])
    raise ValueError(f"unknown uncertainty {method!r} (valid: {', '.join(UNCERTAINTIES)})")


def top_uncertain(scores: np.ndarray, b: int) -> np.ndarray:
    """Positions of the b highest scores; equal scores → smaller position first."""
    return np.sort(top_k(scores, max(0, min(b, len(scores)))))


def fraction_count(fraction: float, n: int) -> int:
    """ceil(fraction · n), as KAFAL's proportional budget (ALGORITHMS.md §1), at most n."""
    return min(n, math.ceil(round(fraction * n, 9)))


def refinement_budgets(fraction: float, pools: list[int], split: str) -> list[int]:
    """b_k per client: ceil(fraction · |pool_k|) (`proportional`), or ceil(fraction · N)
    split evenly over the K clients, the first N mod K clients one more (`even`); never more
    than a client's pool."""
    if split == "proportional":
        return [fraction_count(fraction, n) for n in pools]
    total, K = fraction_count(fraction, sum(pools)), len(pools)
    return [min(n, total // K + (1 if k < total % K else 0)) for k, n in enumerate(pools)]


def class_balanced_pick(y: np.ndarray, candidates: np.ndarray, n: int, num_classes: int,
                        gen: np.random.Generator) -> np.ndarray:
    """n samples of `candidates` spread evenly over classes (the reference code's pooled
    initial set): n // C per class, the remainder to the smallest class ids, each class
    capped at what it holds; a seeded uniform draw within each class."""
    picks = []
    for c in range(num_classes):
        members = candidates[y[candidates] == c]
        want = n // num_classes + (1 if c < n % num_classes else 0)
        if want and len(members):
            picks.append(gen.choice(members, size=min(want, len(members)), replace=False))
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)


# -- communication (ALGORITHMS.md §7) ------------------------------------------------------------
def model_traffic(model_bytes: int, clients: int, rounds: int) -> dict[str, float]:
    """Per-round model bytes = Σ over participating clients of 2 × state-dict bytes (download
    + upload, ALGORITHMS.md §7); the total over `rounds`, also in MiB (2^20 bytes)."""
    per_round = 2 * model_bytes * clients
    total = per_round * rounds
    return {"model_bytes": model_bytes, "round_bytes": per_round, "total_bytes": total,
            "round_mib": per_round / MIB, "total_mib": total / MIB}


def bank_payloads(bank_sizes: list[int], dim: int, clients: int,
                  emb_itemsize: int = 4, label_itemsize: int = 8) -> list[dict[str, Any]]:
    """FAST's one-off payload (§6 step 2, paper §IV-C): every client uploads its labeled
    embeddings (float32) with their labels (int64) once, the server sends the whole bank to
    every client."""
    entry = dim * emb_itemsize + label_itemsize
    n = sum(bank_sizes)
    return [{"payload": "bank", "direction": "up", "entries": n, "bytes": n * entry},
            {"payload": "bank", "direction": "down", "entries": n * clients,
             "bytes": n * clients * entry}]


# -- the driver ---------------------------------------------------------------------------------
@dataclass
class FastResult:
    run_dir: Path
    metrics: list[dict[str, Any]]
    skipped: bool = False


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
    """Both passes of FAST for every client; the oracle reveals (and audits) every human
    label. `z` holds the embeddings of the train samples (rows = data.dataset indices)."""
    f = cfg.fast
    y = data.dataset.y_train  # read only through the oracle and for reporting
    C, K = data.num_classes, len(data.clients)
    weak = np.full(len(y), -1, dtype=np.int64)
    queried: list[np.ndarray] = []
    if f.scope == "client":
        budgets = refinement_budgets(f.budget, [len(p) for p in data.clients], f.budget_split)
        # FAST Alg. 1 line 1: G_k^0 = r0 of the client's pool, uniformly at random
        initial = [np.sort(rng(cfg.seed, "fast_initial", k).choice(
            pool, size=fraction_count(f.initial, len(pool)), replace=False))
            for k, pool in enumerate(data.clients)]
        labels = [oracle.label(k, g) for k, g in enumerate(initial)]
        # §6 step 2: the shared bank is uploaded once and redistributed to every client
        shared = (np.concatenate(initial), np.concatenate(labels))
        bank_sizes = [len(g) for g in initial] if f.bank == "shared" else [0] * K
        for k, pool in enumerate(data.clients):
            bank_idx, bank_y = shared if f.bank == "shared" else (initial[k], labels[k])
            unl = np.setdiff1d(pool, initial[k], assume_unique=True)
            weak[unl] = knn_weak_labels(z[unl], z[bank_idx], bank_y, f.k, C)  # Alg. 1 line 3
            s, _ = class_similarity(z[unl], z[bank_idx], bank_y, C)  # Eq. 7
            u = uncertainty(s, f.uncertainty, rng(cfg.seed, "fast_query", k))  # Eq. 8
            b = budgets[k] if f.refine else 0  # §6 step 5
            pick = unl[top_uncertain(u, b)]
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
        b = fraction_count(f.budget, len(everyone)) if f.refine else 0
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
    tot = {"n": 0, "before": 0, "after": 0, "corrected": 0, "queried": 0}
    for k, pool in enumerate(data.clients):
        unl = pool[passes.weak[pool] >= 0]
        right = passes.weak[unl] == y[unl]
        q = passes.queried[k]
        corrected = int((passes.weak[q] != y[q]).sum())
        n, before = len(unl), int(right.sum())
        rows.append({"client": k, "pool": len(pool), "initial": len(passes.initial[k]),
                     "queried": len(q), "weak_n": n,
                     "weak_acc_before": round(before / n, 6) if n else None,
                     "weak_acc_after": round((before + corrected) / n, 6) if n else None,
                     "corrected": corrected})
        for key, v in (("n", n), ("before", before), ("after", before + corrected),
                       ("corrected", corrected), ("queried", len(q))):
            tot[key] += v
    n = tot["n"]
    rows.append({"client": "all", "pool": sum(len(p) for p in data.clients),
                 "initial": sum(len(g) for g in passes.initial), "queried": tot["queried"],
                 "weak_n": n, "weak_acc_before": round(tot["before"] / n, 6) if n else None,
                 "weak_acc_after": round(tot["after"] / n, 6) if n else None,
                 "corrected": tot["corrected"]})
    return rows


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


def run(cfg: Config, reporter: Reporter | None = None, overwrite: bool = False,
        dataset: ImageDataset | None = None) -> FastResult:
    """Run FAST (one AL round) for `cfg` (cfg.strategy must be "fast") and write its run
    directory: config.toml, metrics.csv (one row, like one cycle of `falkit run`),
    clients.csv (weak-label accuracy per client), comm.csv (every payload), queries.jsonl,
    partition.csv, status.json. A finished run is skipped; an unfinished one starts over
    (one round of training; the embeddings come from the cache)."""
    if cfg.strategy != "fast":
        raise ConfigError(f"FAST runs need strategy = fast, got {cfg.strategy!r}")
    rep = reporter or Reporter()
    rd = RunDir.of(cfg)
    out = rd.path
    if rd.inspect(cfg, overwrite) == "complete":
        return FastResult(out, read_metrics(out), skipped=True)
    configure_process(cfg)
    linear = cfg.model.backbone == "linear"  # Table II ① linear probing
    times = {"data": 0.0, "encode": 0.0, "query": 0.0, "local_model": 0.0, "train": 0.0,
             "eval": 0.0}
    # every encoder error (missing model, file, package; unknown kind) before any write
    enc = encoders.create(cfg.fast.encoder, batch_size=cfg.fast.encode_batch,
                          device=cfg.runtime.device)  # runs on the run's device

    t = time.perf_counter()
    ds = dataset if dataset is not None else load(cfg.data.dataset, cfg.data.data_root)
    data = build(cfg, ds)
    times["data"] = time.perf_counter() - t
    if not linear:  # the backbone fits the images, before anything is written
        create_backbone(cfg.model.backbone, num_classes=data.num_classes,
                        in_channels=ds.in_channels, image_size=ds.image_size)
    fp = data_fingerprint(data.dataset, cfg.data.dataset)
    with rd.open(cfg, overwrite, fp, cycles=1) as state:
        if state == "complete":
            return FastResult(out, read_metrics(out), skipped=True)
        row = _run(cfg, rd, rep, ds, data, enc, linear, times)
    return FastResult(out, [row])


def _run(cfg: Config, rd: RunDir, rep: Reporter, ds: ImageDataset, data: FederatedData,
         enc: encoders.Encoder, linear: bool, times: dict[str, float]) -> dict[str, Any]:
    out = rd.path
    write_partition_csv(out / "partition.csv", data.partition_counts(), ds.classes)

    rep.start(out.name, 1, 0)
    t = time.perf_counter()
    z, cached = embeddings(cfg, ds, ("train", "test") if linear else ("train",), enc)
    z_train = z["train"][data.source_indices]  # rows of data.dataset (the long-tailed subset)
    times["encode"] = time.perf_counter() - t

    t = time.perf_counter()
    y = data.dataset.y_train
    oracle = SimulatedOracle(y)
    passes = two_passes(cfg, data, z_train, oracle)
    human = [np.union1d(g, q) for g, q in zip(passes.initial, passes.queried, strict=True)]
    oracle.audit(sum(len(h) for h in human))  # exactly the human labels FAST accounts for
    times["query"] = time.perf_counter() - t
    weak_rows = weak_label_report(data, passes)

    # one-shot training (§6 step 6) on human labels + weak labels for every other sample
    train_y = passes.weak.copy()
    all_human = np.concatenate(human)
    train_y[all_human] = y[all_human]  # human labels, revealed by the oracle above
    pools = ([np.union1d(h, p[passes.weak[p] >= 0]) for h, p in
              zip(human, data.clients, strict=True)] if cfg.fast.weak_labels else human)
    train_y = np.where(train_y < 0, 0, train_y)  # samples in no pool: never indexed
    engine = _engine(cfg, data, z_train, z.get("test"), train_y, linear)
    engine.local_steps = cfg.fast.local_steps or None  # tau SGD steps, or fl.local_epochs
    acc, per_class, rounds, traffic = _train(cfg, engine, pools, rep, times)

    C = data.num_classes
    dim = z_train.shape[1]
    oneoff = (bank_payloads(passes.bank_sizes, dim, len(data.clients))
              if any(passes.bank_sizes) else [])
    oneoff_bytes = sum(p["bytes"] for p in oneoff)
    labeled = len(all_human)
    hist = np.bincount(y[all_human], minlength=C)
    overall = weak_rows[-1]
    f = cfg.fast
    row: dict[str, Any] = {
        "cycle": 0,
        "target_pct": round(100 * (f.initial + (f.budget if f.refine else 0.0)), 6),
        "labeled": labeled,
        "labeled_pct": round(100 * labeled / data.num_train, 4),
        "accuracy": round(acc, 6),
    }
    row.update({f"acc_{c}": round(float(a), 6) for c, a in enumerate(per_class)})
    row.update({f"queried_{c}": int(n) for c, n in enumerate(hist)})
    row.update({
        "trained_on": sum(len(p) for p in pools),
        "weak_acc_before": overall["weak_acc_before"],
        "weak_acc_after": overall["weak_acc_after"],
        "rounds": cfg.fl.rounds,
        "comm_round_bytes": traffic["round_bytes"],  # the last round's, both directions
        "comm_down_bytes": traffic["down"],
        "comm_up_bytes": traffic["up"],
        "comm_bytes": traffic["down"] + traffic["up"],  # model traffic, as `falkit run`
        "comm_mib": round((traffic["down"] + traffic["up"]) / MIB, 4),
        "oneoff_bytes": oneoff_bytes,
        "oneoff_mib": round(oneoff_bytes / MIB, 4),
        "embedding_dim": dim,
        "embeddings_cached": cached,
    })
    row.update({f"time_{k}": round(v, 3) for k, v in times.items()})

    comm_rows = [{"payload": "model", "direction": d, "round": r["round"],
                  "clients": r["clients"], "bytes": r[d], "mib": round(r[d] / MIB, 6)}
                 for r in rounds for d in ("down", "up")]
    comm_rows += [{**p, "round": "one-off", "mib": round(p["bytes"] / MIB, 6)} for p in oneoff]
    records = []
    for k in range(len(data.clients)):
        records.append({"cycle": 0, "client": k, "strategy": "fast_initial",
                        "indices": passes.initial[k].tolist(),
                        "labels": y[passes.initial[k]].tolist()})
        records.append({"cycle": 0, "client": k, "strategy": "fast",
                        "indices": passes.queried[k].tolist(),
                        "labels": y[passes.queried[k]].tolist(),
                        "weak_acc_before": weak_rows[k]["weak_acc_before"],
                        "weak_acc_after": weak_rows[k]["weak_acc_after"]})
    write_csv(out / "metrics.csv", [row])
    write_csv(out / "clients.csv", weak_rows)
    write_csv(out / "comm.csv", comm_rows)
    write_jsonl(out / "queries.jsonl", records)
    write_atomic(out / "status.json", json.dumps({"complete": True, "cycles_done": 1,
                                                  "cycles": 1}) + "\n")
    rep.cycle_done(row)
    rep.finish()
    return row


def _engine(cfg: Config, data: FederatedData, z_train: np.ndarray, z_test: np.ndarray | None,
            train_y: np.ndarray, linear: bool) -> Engine:
    """The ordinary engine; in linear-probing mode its "images" are the embeddings as
    N×D×1×1 float tensors with mean 0 and std 1/255, so the engine's normalisation
    (x/255 − mean)/std is the identity, and no augmentation."""
    ds = data.dataset
    K = len(data.clients)
    if linear:
        assert z_test is not None
        d = z_train.shape[1]
        ident = ((0.0,) * d, (1 / 255,) * d)
        train = ImageTensors(torch.as_tensor(z_train).view(-1, d, 1, 1),
                             torch.as_tensor(train_y), *ident)
        test = ImageTensors(torch.as_tensor(z_test).view(-1, d, 1, 1),
                            torch.as_tensor(ds.y_test), *ident)
        return Engine(cfg, train, test, data.num_classes, num_clients=K)
    train = ImageTensors(ds.x_train, torch.as_tensor(train_y), ds.mean, ds.std, ds.hflip,
                         ds.crop_pad)
    test = ImageTensors(ds.x_test, torch.as_tensor(ds.y_test), ds.mean, ds.std)
    return Engine(cfg, train, test, data.num_classes, num_clients=K)


def _train(cfg: Config, engine: Engine, pools: list[np.ndarray], rep: Reporter,
           times: dict[str, float]) -> tuple[float, np.ndarray, list[dict[str, Any]],
                                            dict[str, int]]:
    """R FL rounds from a fresh init, the schedule of `falkit run` (ALGORITHMS.md §3: lr decay
    after int(lr_decay_at · R), `fl.fraction` participation), then the test evaluation.
    Model traffic per round (§7): every state-dict tensor, down and up, for each
    participating client that has data."""
    fl = cfg.fl
    t = time.perf_counter()
    state = engine.init_state(cfg.seed, 0)
    engine.algorithm.reset()
    K = len(pools)
    decay_after = int(fl.lr_decay_at * fl.rounds)
    rounds, down, up = [], 0, 0
    rep.phase("FAST train", fl.rounds)
    for r in range(fl.rounds):
        lr = fl.lr * (fl.lr_decay if r + 1 > decay_after else 1.0)
        if fl.fraction < 1.0:
            m = max(1, round(fl.fraction * K))
            clients = sorted(rng(cfg.seed, "participation", 0, r).choice(K, m, replace=False))
        else:
            clients = list(range(K))
        state, _ = engine.fl_round(state, clients, pools, lr, cfg.seed, (0, r))
        check_finite(state, f"FAST training, round {r + 1}")
        active = sum(1 for k in clients if len(pools[k]))
        nbytes = state_bytes(state) * active
        rounds.append({"round": r + 1, "clients": active, "down": nbytes, "up": nbytes})
        down, up = down + nbytes, up + nbytes
        rep.advance()
    times["train"] = time.perf_counter() - t
    t = time.perf_counter()
    acc, per_class = engine.evaluate(state)
    times["eval"] = time.perf_counter() - t
    last = rounds[-1]["down"] + rounds[-1]["up"] if rounds else 0
    return acc, per_class, rounds, {"down": down, "up": up, "round_bytes": last}


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
