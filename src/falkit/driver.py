"""The FAL cycle (DESIGN.md §3), written once: initial labels → train → evaluate → query → …

`run(cfg, strategy, federation, run_dir)` is the only cycle falkit has. It owns the schedule
(learning rate, participants, rounds, evaluation cadence), the communication accounting, the
metrics, checkpoints, resume and status. Where the clients live is the federation's business:
`falkit.inprocess.InProcessFederation` holds them in this process, the Flower ServerApp's
federation reaches them through a Grid; both implement `Federation`, and the driver never
knows which one it drives.

Every cycle ends with an atomic checkpoint; a run started again with the same config resumes
after the last finished cycle and produces the same numbers as an uninterrupted run, because
every random draw comes from a stream keyed by (seed, purpose, cycle, client).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from falkit.al.base import Strategy
from falkit.client import keeps_last_round
from falkit.config import Config, FLConfig, milestones
from falkit.data.partition import write_partition_csv
from falkit.errors import FalkitError
from falkit.fl.algorithms import FedAvg, State, check_finite, state_bytes
from falkit.metrics import Evaluation
from falkit.oracle import WaitingForLabels
from falkit.results import read_metrics, save_torch, write_atomic, write_csv, write_jsonl
from falkit.rundir import RunDir, load_checkpoint
from falkit.seeding import rng


class Reporter:
    """Progress callbacks; the CLI shows them as rich progress bars. Silent by default."""

    def start(self, run_name: str, cycles: int, first_cycle: int) -> None: ...
    def phase(self, description: str, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def round_done(self, cycle: int, r: int, rounds: int, values: dict[str, float]) -> None:
        """After FL round r of `cycle` (of `rounds`): its lr, model traffic and, when it was
        evaluated (runtime.eval_every), its accuracy."""
    def cycle_done(self, row: dict[str, Any]) -> None: ...
    def finish(self) -> None: ...


@dataclass
class RunResult:
    run_dir: Path
    metrics: list[dict[str, Any]]
    resumed_from: int | None = None  # first cycle run in this call, if resumed
    skipped: bool = False  # already complete, nothing run


@dataclass
class RunState:
    """What the driver carries from cycle to cycle (the clients' pools are the federation's)."""

    global_state: State | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    queries: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Queried:
    """What a query phase gave: one queries.jsonl record per client, the histogram of the
    queried classes (None where the server may not know labels) and the seconds spent
    training client models (the rest of the phase is query time)."""

    records: list[dict[str, Any]]
    classes: np.ndarray | None
    local_model_s: float = 0.0
    # seconds of phases before the query, spent outside it (FAST in process: data, encode)
    times: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # for strategy.finish_cycle


class Federation(Protocol):
    """The clients, wherever they are. Clients are numbered 0..num_clients-1."""

    transport: str  # "in_process" | "flower": a checkpoint resumes only on its own
    num_clients: int
    num_classes: int
    num_train: int  # N of the federated train set (labeled %)
    algorithm: FedAvg  # the server side of the FL algorithm (its state is checkpointed)
    device: Any  # where the global model lives (torch.device)
    engine: Any  # the server's Engine: the model's recipe (input shape) and the FL algorithm

    def partition(self) -> tuple[np.ndarray, list[str]] | None:
        """Per-client class counts and class names (partition.csv), or None if unknown."""

    def initial_state(self, cycle: int) -> State:
        """A fresh global model for `cycle`; the FL algorithm's memory is reset with it."""

    def labeled_counts(self) -> dict[int, int]:
        """Labeled samples of every client still in the run."""

    def initial_labels(self) -> Queried:
        """Cycle 0: every client's random initial labels, answered by its oracle."""

    def prepare_query(self, cycle: int, global_state: State) -> float:
        """Before a query phase (client models, contexts); seconds spent training models."""

    def query_stats(self, cycle: int, global_state: State) -> list[dict[str, float]]:
        """Phase A of a two-phase strategy: every client's declared statistics (what phase A
        keeps stays with the client for `select`)."""

    def select(self, cycle: int, global_state: State, server: dict[str, float] | None,
               advance) -> Queried:
        """Phase B: every client queries its budget, its oracle answers; `advance()` per
        client."""

    def begin_training(self, cycle: int, keep_last: bool) -> None:
        """Before the rounds of `cycle` (the clients forget last cycle's last-round models
        when this cycle keeps new ones)."""

    def train_round(self, cycle: int, r: int, global_state: State, clients: list[int],
                    lr: float, keep_last: bool) -> State:
        """One FL round of `clients` from `global_state`; the aggregated state."""

    def evaluate(self, state: State, final: bool, cycle: int) -> Evaluation:
        """Accuracy, per-class accuracy and AUC on the test data; `final` for the cycle's
        last."""

    def state_dict(self) -> dict[str, Any]:
        """The clients' side of a checkpoint (merged into it)."""

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Restore the clients from a checkpoint (the whole dict, on the CPU)."""


# -- the schedule (ALGORITHMS.md §3), one copy ------------------------------------------------
def lr_at(fl: FLConfig, r: int) -> float:
    """Round r's learning rate (r from 0), × lr_decay once int(lr_decay_at · R) rounds are
    done (the FairFAL protocol, ALGORITHMS.md §3: after 75 % of the rounds), or once more
    after each of `fl.lr_milestones`; `fl.lr_decay_rule = "code"` decays from round
    r > int(m · R), as the FairFAL code's `r > 75` (util/misc.py): one round later; `at`
    from r + 1 >= int(m · R), FAST-official's int(rnd / step) over rounds counted from 1."""
    times = 0
    for m in milestones(fl.lr_milestones) or [fl.lr_decay_at]:  # fl.lr_milestones: instead
        at = int(m * fl.rounds)
        rule = fl.lr_decay_rule
        times += (r > at) if rule == "code" else (r + 1 >= at) if rule == "at" else (r + 1 > at)
    return fl.lr * fl.lr_decay ** times


def participants(cfg: Config, cycle: int, r: int, K: int) -> list[int]:
    """The clients of round r of `cycle`: all, or round(fl.fraction · K) drawn from a keyed
    stream."""
    if cfg.fl.fraction < 1.0:
        m = max(1, round(cfg.fl.fraction * K))
        return sorted(int(k) for k in rng(cfg.seed, "participation", cycle, r).choice(
            K, m, replace=False))
    return list(range(K))


def round_bytes(state: State, clients: int) -> int:
    """Model traffic of one round (ALGORITHMS.md §7): the state dict down and up for each
    participating client that has data."""
    return 2 * state_bytes(state) * clients


def metrics_row(target_pct: float, cycle: int, labeled: int, num_train: int,
                result: Evaluation, queried: np.ndarray | None, comm: int,
                times: dict[str, float], clients: int) -> dict[str, Any]:
    """One metrics.csv row; `queried` None leaves out the queried-class columns (they need
    true labels). `test_samples` and `clients` say what the accuracy is of: on Flower a site
    that dropped out (fl.on_client_failure = continue) takes its test data with it."""
    row: dict[str, Any] = {
        "cycle": cycle,
        "target_pct": round(target_pct, 6),
        "labeled": labeled,
        "labeled_pct": round(100 * labeled / num_train, 4),
        "accuracy": round(result.accuracy, 6),
        "auc": round(result.auc, 6),  # MedMNIST's AUC (falkit.metrics.macro_auc)
        "test_samples": result.samples,
        "clients": clients,
    }
    row.update({f"acc_{c}": round(float(a), 6) for c, a in enumerate(result.per_class)})
    if queried is not None:
        row.update({f"queried_{c}": int(n) for c, n in enumerate(queried)})
    row["comm_bytes"] = comm
    row["comm_mib"] = round(comm / 2**20, 4)
    row.update({f"time_{k}": round(v, 3) for k, v in times.items()})
    return row


# -- the run ----------------------------------------------------------------------------------
def run(cfg: Config, strategy: Strategy, fed: Federation, rd: RunDir, *,
        reporter: Reporter | None = None, overwrite: bool = False,
        fingerprint: dict[str, Any] | None = None, stop_after: int | None = None) -> RunResult:
    """Run (or resume, or skip if finished) `cfg` on `fed`, writing `rd`. Everything is
    validated before this is called (the federation is built); `stop_after` ends the call
    after that cycle as if the process had been killed (tests)."""
    rep = reporter or Reporter()
    out = rd.path
    cycles = strategy.cycles(cfg)
    with rd.open(cfg, overwrite, fingerprint, cycles=cycles) as state:
        if state == "complete":  # finished by another process meanwhile
            return RunResult(out, read_metrics(out), skipped=True)
        part = fed.partition()
        if part is not None:
            write_partition_csv(out / "partition.csv", *part)
        st, first = _resume(rd, cycles, strategy, fed)
        resumed = first if st is not None else None
        if st is None:
            st, first = RunState(), 0
        from falkit.tracking import with_trackers

        rep = with_trackers(cfg, out, rep)  # TensorBoard, MLflow, W&B (config `tracking`)
        rep.start(out.name, cycles, first)
        saved = first - 1  # the last cycle in the checkpoint
        try:
            for cycle in range(first, cycles):
                row, files = _cycle(cfg, cycles, cycle, strategy, fed, st, rep)
                st.metrics.append(row)
                for name, rows in files.items():
                    write_csv(out / name, rows)
                _save_model(out, cfg, cycles, cycle, st, strategy, fed)  # before the
                _checkpoint(out, cycles, cycle, st, strategy, fed)  # checkpoint says done
                saved = cycle
                rd.commit()
                rep.cycle_done(row)
                if stop_after is not None and stop_after <= cycle < cycles - 1:
                    break
        except WaitingForLabels as e:  # people label; the same command continues
            write_status(out, cycles, saved, waiting=e)
            rd.commit()  # its queues are the new run's: an overwritten run is not put back
            raise
        except Exception as e:
            if saved >= 0:  # the saved cycles stand; say why the run stopped
                with contextlib.suppress(OSError):  # a full disk may refuse this too
                    write_status(out, cycles, saved, error=str(e))
            raise
        finally:
            rep.finish()
    return RunResult(out, st.metrics, resumed_from=resumed)


def query(cfg: Config, cycle: int, strategy: Strategy, fed: Federation, global_state: State,
          rep: Reporter, cycles: int | None = None) -> Queried:
    """The query phase of `cycle` (> 0), with the previous cycle's global model: client
    models, phase A and the server's reduce for two-phase strategies (DESIGN.md §2), then
    every client's query."""
    rep.phase(f"cycle {cycle + 1}/{cycles or cfg.budget.cycles} query", fed.num_clients)
    local_s = fed.prepare_query(cycle, global_state)
    server = None
    if strategy.two_phase:
        server = strategy.server_reduce(fed.query_stats(cycle, global_state))
    out = fed.select(cycle, global_state, server, rep.advance)
    out.local_model_s += local_s
    return out


def _cycle(cfg: Config, cycles: int, cycle: int, strategy: Strategy, fed: Federation,
           st: RunState, rep: Reporter
           ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    t = time.perf_counter()
    if cycle == 0:
        q = fed.initial_labels()
    else:
        assert st.global_state is not None
        q = query(cfg, cycle, strategy, fed, st.global_state, rep, cycles)
    times = dict(q.times)
    times["query"] = time.perf_counter() - t - q.local_model_s
    times.update({"local_model": q.local_model_s, "train": 0.0, "eval": 0.0})
    st.queries.extend(q.records)

    # -- federated training on the labeled pools -------------------------------------------
    t = time.perf_counter()
    fl = strategy.training(cfg).fl  # the strategy's own recipe (FAST's), else [fl]
    if fl.reset == "continue" and st.global_state is not None:
        global_state = st.global_state
    else:  # a fresh init every cycle (FairFAL protocol); the init differs per seed and cycle
        global_state = fed.initial_state(cycle)
    keep_last = keeps_last_round(cfg, strategy)
    fed.begin_training(cycle, keep_last)
    comm = 0
    traffic = []  # per round: the participating clients with data, the bytes each way
    rep.phase(f"cycle {cycle + 1}/{cycles} train", fl.rounds)
    for r in range(fl.rounds):
        clients = participants(cfg, cycle, r, fed.num_clients)
        counts = fed.labeled_counts()
        active = sum(1 for k in clients if counts.get(k, 0) > 0)
        global_state = fed.train_round(cycle, r, global_state, clients, lr_at(fl, r),
                                       keep_last)
        check_finite(global_state, f"cycle {cycle + 1}, round {r + 1}")
        comm += round_bytes(global_state, active)
        traffic.append({"round": r + 1, "clients": active,
                        "bytes": state_bytes(global_state) * active})
        values = {"lr": lr_at(fl, r), "comm_bytes": float(round_bytes(global_state, active))}
        if cfg.runtime.eval_every and (r + 1) % cfg.runtime.eval_every == 0 \
                and r < fl.rounds - 1:
            t_eval = time.perf_counter()
            acc_r = fed.evaluate(global_state, False, cycle).accuracy
            st.rounds.append({"cycle": cycle, "round": r + 1, "accuracy": acc_r})
            times["eval"] += time.perf_counter() - t_eval
            values["accuracy"] = acc_r
        if r == fl.rounds - 1:
            t_eval = time.perf_counter()
            result = fed.evaluate(global_state, True, cycle)
            acc = result.accuracy
            times["eval"] += time.perf_counter() - t_eval
            if cfg.runtime.eval_every:
                values["accuracy"] = acc
        rep.round_done(cycle, r, fl.rounds, values)  # (a tracking.Fanout: see `run`)
        rep.advance()
    st.global_state = global_state
    times["train"] = time.perf_counter() - t - times["eval"]  # evaluations count as eval
    if cfg.runtime.eval_every:
        st.rounds.append({"cycle": cycle, "round": fl.rounds, "accuracy": acc})
    counts = fed.labeled_counts()
    row = metrics_row(strategy.target_pct(cfg, cycle), cycle, sum(counts.values()),
                      fed.num_train, result, q.classes, comm, times, len(counts))
    return strategy.finish_cycle(cfg, row, q.extra, traffic, fed.num_train)


# -- checkpoints, results, status -------------------------------------------------------------
def _checkpoint(out: Path, cycles: int, cycle: int, st: RunState, strategy: Strategy,
                fed: Federation) -> None:
    ck = {"cycle": cycle, "global_state": st.global_state, "metrics": st.metrics,
          "queries": st.queries, "rounds": st.rounds, "strategy": strategy.state_dict(),
          "fl_algorithm": fed.algorithm.state_dict(), "transport": fed.transport,
          **fed.state_dict()}
    save_torch(out / "checkpoint" / "latest.pt", ck)
    write_results(out, cycles, st, cycle)


def _save_model(out: Path, cfg: Config, cycles: int, cycle: int, st: RunState,
                strategy: Strategy, fed: Federation) -> None:
    """models/cycle_<c>.pt (`runtime.save_models`): the global model and its recipe."""
    keep = cfg.runtime.save_models
    if st.global_state is None or keep == "none" or (keep == "last" and cycle < cycles - 1):
        return
    from falkit import config as config_mod
    from falkit.models.saved import model_file, model_record

    engine = fed.engine
    save_torch(model_file(out, cycle), model_record(
        st.global_state, backbone=cfg.model.backbone, num_classes=fed.num_classes,
        in_channels=engine.in_channels, image_size=engine.image_size, strategy=strategy.id,
        cycle=cycle, accuracy=st.metrics[-1]["accuracy"], config_toml=config_mod.dumps(cfg),
        mean=getattr(engine, "mean", None), std=getattr(engine, "std", None)))
    if keep == "last":
        for old in (out / "models").glob("cycle_*.pt"):
            if old != model_file(out, cycle):
                old.unlink(missing_ok=True)


def write_results(out: Path, cycles: int, st: RunState, cycle: int) -> None:
    write_csv(out / "metrics.csv", st.metrics)
    write_jsonl(out / "queries.jsonl", st.queries)
    if st.rounds:
        write_csv(out / "rounds.csv", st.rounds)
    write_status(out, cycles, cycle)


def write_status(out: Path, cycles: int, cycle: int, error: str | None = None,
                 waiting: WaitingForLabels | None = None) -> None:
    """status.json after `cycle` finished (and, if the run stopped, why; or which labels
    it waits for)."""
    status: dict[str, Any] = {"complete": cycle == cycles - 1 and error is None
                              and waiting is None,
                              "cycles_done": cycle + 1, "cycles": cycles}
    if error is not None:
        status["error"] = error
    if waiting is not None:
        status["waiting"] = {"labels": waiting.left, "clients": {
            str(p.client): {"answered": p.answered, "total": p.total, "queue": str(p.folder)}
            for p in waiting.pending}}
    write_atomic(out / "status.json", json.dumps(status) + "\n")


def to_device(obj: Any, device) -> Any:
    """`obj` with every tensor in it (nested dicts, lists, tuples) moved to `device`."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def transport_of(ck: dict[str, Any]) -> str:
    """Where a checkpoint's run ran (checkpoints before the driver: "engine": "flower")."""
    return ck.get("transport") or ("flower" if ck.get("engine") == "flower" else "in_process")


def _resume(rd: RunDir, cycles: int, strategy: Strategy, fed: Federation
            ) -> tuple[RunState | None, int]:
    ck = load_checkpoint(rd)
    if ck is None:
        return None, 0
    if transport_of(ck) != fed.transport:
        where = {"flower": "on Flower", "in_process": "in process"}
        raise FalkitError(f"{rd.path} holds a run made {where[transport_of(ck)]}; it resumes "
                          f"only there: pass {rd.flag} or choose another name=")
    # the checkpoint's tensors (read onto the CPU) go to this run's device: the device is not
    # part of a run's identity, so a run may resume on another one
    dev = fed.device
    st = RunState(global_state=to_device(ck["global_state"], dev), metrics=ck["metrics"],
                  queries=ck["queries"], rounds=ck.get("rounds", []))
    strategy.load_state_dict(ck.get("strategy", {}))
    fed.algorithm.load_state_dict(to_device(ck.get("fl_algorithm", {}), dev))
    fed.load_state_dict(ck)
    write_results(rd.path, cycles, st, ck["cycle"])  # files may lag the checkpoint by one write
    return st, ck["cycle"] + 1
