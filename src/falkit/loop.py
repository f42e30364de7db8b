"""The FAL cycle driver (DESIGN.md §3): initial labels → train → evaluate → query → …

Every cycle ends with an atomic checkpoint; a killed run started again with the same config
resumes after the last finished cycle and produces the same numbers as an uninterrupted run,
because every random draw comes from a stream keyed by (seed, purpose, cycle, client).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from falkit import config as config_mod
from falkit.al.base import QueryContext, Strategy
from falkit.al.base import create as create_strategy
from falkit.config import Config
from falkit.data.federation import FederatedData, build, client_budgets
from falkit.data.partition import write_partition_csv
from falkit.data.sources import ImageDataset
from falkit.errors import FalkitError
from falkit.fl.algorithms import State, check_finite, state_bytes
from falkit.fl.engine import Engine, ImageTensors, configure_process
from falkit.oracle import SimulatedOracle
from falkit.results import (
    read_metrics,
    save_torch,
    write_atomic,
    write_csv,
    write_jsonl,
)
from falkit.rundir import RunDir, data_fingerprint, load_checkpoint
from falkit.seeding import rng


class Reporter:
    """Progress callbacks; the CLI shows them as rich progress bars. Silent by default."""

    def start(self, run_name: str, cycles: int, first_cycle: int) -> None: ...
    def phase(self, description: str, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...
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
    labeled: list[np.ndarray]
    global_state: State | None = None
    last_round: dict[int, State] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    queries: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)


def run(cfg: Config, reporter: Reporter | None = None, overwrite: bool = False,
        dataset: ImageDataset | None = None, stop_after: int | None = None,
        engine_class: type[Engine] = Engine) -> RunResult:
    """Run (or resume, or skip if finished) the experiment `cfg`. `stop_after` ends the call
    after that cycle as if the process had been killed (used by tests); `engine_class` swaps
    in another way of training (benchmarks/ runs the reference's way through it).

    Nothing is written before the config, the strategy and the data are validated; an
    existing run is replaced (`overwrite`) only then (falkit.rundir)."""
    rep = reporter or Reporter()
    rd = RunDir.of(cfg)
    out = rd.path
    if rd.inspect(cfg, overwrite) == "complete":
        return RunResult(out, read_metrics(out), skipped=True)

    strategy = create_strategy(cfg.strategy, **config_mod.strategy_options(cfg))
    data = build(cfg, dataset)
    budgets = client_budgets(cfg, data)
    ds = data.dataset
    # a strategy may wrap the run's backbone (ll4al: a loss-prediction module trained and
    # federated with it)
    wrap = getattr(strategy, "wrap_model", None)
    configure_process(cfg)
    engine = engine_class(cfg,
                    ImageTensors(ds.x_train, torch.as_tensor(ds.y_train), ds.mean, ds.std,
                                 ds.hflip, ds.crop_pad),
                    ImageTensors(ds.x_test, torch.as_tensor(ds.y_test), ds.mean, ds.std),
                    data.num_classes, num_clients=len(data.clients), wrap_model=wrap)
    oracle = SimulatedOracle(ds.y_train)
    fingerprint = data_fingerprint(ds, cfg.data.dataset)
    with rd.open(cfg, overwrite, fingerprint) as state:
        if state == "complete":  # finished by another process meanwhile
            return RunResult(out, read_metrics(out), skipped=True)
        write_partition_csv(out / "partition.csv", data.partition_counts(), ds.classes)
        st, first = _resume(rd, cfg, oracle, strategy, engine)
        resumed = first if st is not None else None
        if st is None:
            st = initial_labels(cfg, data, budgets, oracle)
            first = 0
        rep.start(out.name, cfg.budget.cycles, first)
        try:
            for cycle in range(first, cfg.budget.cycles):
                row = _cycle(cfg, cycle, data, budgets, strategy, engine, oracle, st, rep)
                st.metrics.append(row)
                _checkpoint(out, cycle, cfg, st, strategy, engine)
                rd.commit()
                rep.cycle_done(row)
                if (stop_after is not None and cycle >= stop_after
                        and cycle < cfg.budget.cycles - 1):
                    break
        finally:
            rep.finish()
    return RunResult(out, st.metrics, resumed_from=resumed)


def initial_labels(cfg: Config, data: FederatedData, budgets: list[int],
                    oracle: SimulatedOracle) -> RunState:
    """Cycle 0: b_k labels per client, uniformly at random from its pool (ALGORITHMS.md §1)."""
    labeled = []
    for k, pool in enumerate(data.clients):
        pick = rng(cfg.seed, "initial_labels", k).choice(pool, size=budgets[k], replace=False)
        oracle.label(k, pick)
        labeled.append(np.sort(pick))
    st = RunState(labeled=labeled)
    st.queries = [{"cycle": 0, "client": k, "strategy": "initial_random",
                   "indices": lab.tolist(), "labels": data.dataset.y_train[lab].tolist()}
                  for k, lab in enumerate(labeled)]
    return st


def _cycle(cfg: Config, cycle: int, data: FederatedData, budgets: list[int],
           strategy: Strategy, engine: Engine, oracle: SimulatedOracle, st: RunState,
           rep: Reporter) -> dict[str, Any]:
    C = data.num_classes
    y = data.dataset.y_train
    times = {"query": 0.0, "local_model": 0.0, "train": 0.0, "eval": 0.0}
    queried = np.zeros(C, dtype=np.int64)
    if cycle == 0:
        for lab in st.labeled:
            queried += np.bincount(y[lab], minlength=C)
    else:
        t = time.perf_counter()
        new = _query_phase(cfg, cycle, data, budgets, strategy, engine, oracle, st, rep, times)
        times["query"] = time.perf_counter() - t - times["local_model"]
        queried += np.bincount(y[new], minlength=C) if len(new) else 0
    # the oracle must have revealed exactly the budget so far, no more, no less
    oracle.audit(sum(min(b * (cycle + 1), len(pool))
                     for b, pool in zip(budgets, data.clients, strict=True)))

    # -- federated training on the labeled pools -------------------------------------------
    t = time.perf_counter()
    fl = cfg.fl
    if fl.reset == "continue" and st.global_state is not None:
        global_state = st.global_state
    else:  # a fresh init every cycle (FairFAL protocol); the init differs per seed and cycle
        global_state = engine.init_state(cfg.seed, cycle)
        engine.algorithm.reset()  # e.g. SCAFFOLD's control variates belong to the old model
    K = len(data.clients)
    keep_last = strategy.needs_local_model and local_mode(cfg, strategy) == "last_round"
    if keep_last:
        st.last_round = {}  # this cycle's: each client's model after its last local update
    comm = 0
    decay_after = int(fl.lr_decay_at * fl.rounds)
    rep.phase(f"cycle {cycle + 1}/{cfg.budget.cycles} train", fl.rounds)
    for r in range(fl.rounds):
        lr = fl.lr * (fl.lr_decay if r + 1 > decay_after else 1.0)  # FairFAL: r > int(0.75R)
        if fl.fraction < 1.0:
            m = max(1, round(fl.fraction * K))
            clients = sorted(rng(cfg.seed, "participation", cycle, r).choice(K, m, replace=False))
        else:
            clients = list(range(K))
        last = r == fl.rounds - 1
        # models with a loss hook (ll4al) learn which round of R this is (its stop-gradient)
        hook = {"progress": (r, fl.rounds)} if hasattr(engine.model, "extra_loss") else {}
        # strategies that train their own way (kafal.kcfu) give each client's objective
        # (they read only the labels of st.labeled, which the oracle revealed)
        objectives = (strategy.local_objectives(engine, global_state, st.labeled, y,
                                                data.clients, r)
                      if hasattr(strategy, "local_objectives") else None)
        if objectives is not None:
            hook["objectives"] = objectives
        global_state, kept = engine.fl_round(global_state, clients, st.labeled, lr, cfg.seed,
                                             (cycle, r), keep_states=keep_last, **hook)
        check_finite(global_state, f"cycle {cycle + 1}, round {r + 1}")
        comm += 2 * state_bytes(global_state) * sum(1 for k in clients if len(st.labeled[k]))
        st.last_round.update(kept)  # with fl.fraction < 1 a client's last update may be earlier
        if cfg.runtime.eval_every and (r + 1) % cfg.runtime.eval_every == 0 and not last:
            t_eval = time.perf_counter()
            acc_r, _ = engine.evaluate(global_state)
            st.rounds.append({"cycle": cycle, "round": r + 1, "accuracy": acc_r})
            times["eval"] += time.perf_counter() - t_eval
        rep.advance()
    st.global_state = global_state
    times["train"] = time.perf_counter() - t - times["eval"]  # per-round evals count as eval

    t = time.perf_counter()
    acc, per_class = engine.evaluate(global_state)
    times["eval"] += time.perf_counter() - t
    if cfg.runtime.eval_every:
        st.rounds.append({"cycle": cycle, "round": fl.rounds, "accuracy": acc})

    return metrics_row(cfg, cycle, sum(len(lab) for lab in st.labeled), data.num_train, acc,
                       per_class, queried, comm, times)


def metrics_row(cfg: Config, cycle: int, labeled: int, num_train: int, acc: float,
                per_class: np.ndarray, queried: np.ndarray | None, comm: int,
                times: dict[str, float]) -> dict[str, Any]:
    """One metrics.csv row (in process and on Flower); `queried` None leaves out the
    queried-class columns (they need true labels)."""
    row: dict[str, Any] = {
        "cycle": cycle,
        "target_pct": round(100 * cfg.budget.fraction * (cycle + 1), 6),
        "labeled": labeled,
        "labeled_pct": round(100 * labeled / num_train, 4),
        "accuracy": round(acc, 6),
    }
    row.update({f"acc_{c}": round(float(a), 6) for c, a in enumerate(per_class)})
    if queried is not None:
        row.update({f"queried_{c}": int(n) for c, n in enumerate(queried)})
    row["comm_bytes"] = comm
    row["comm_mib"] = round(comm / 2**20, 4)
    row.update({f"time_{k}": round(v, 3) for k, v in times.items()})
    return row


def local_mode(cfg: Config, strategy: Strategy) -> str:
    """The local model a strategy queries with: its own rule, else `local_model.mode`."""
    return strategy.local_model_mode or cfg.local_model.mode


def _query_phase(cfg: Config, cycle: int, data: FederatedData, budgets: list[int],
                 strategy: Strategy, engine: Engine, oracle: SimulatedOracle, st: RunState,
                 rep: Reporter, times: dict[str, float]) -> np.ndarray:
    """Every client queries with the previous cycle's global model (query before training)."""
    assert st.global_state is not None
    y = data.dataset.y_train
    K = len(data.clients)
    t = time.perf_counter()
    # only st.labeled[k] is read from these labels: the ones the oracle revealed; handed over
    # on the engine's device (its training indexes them there)
    models, distill_info = client_models(cfg, strategy, engine, cycle, dict(enumerate(st.labeled)),
                                         torch.as_tensor(y, device=engine.device),
                                         st.global_state, st.last_round)
    times["local_model"] += time.perf_counter() - t
    global_outputs = global_outputs_fn(engine, st.global_state)
    contexts = []
    for k in range(K):
        unl = np.setdiff1d(data.clients[k], st.labeled[k], assume_unique=True)
        contexts.append(query_context(cfg, strategy, engine, cycle, k, st.labeled[k],
                                      y[st.labeled[k]], unl, data.num_classes, st.global_state,
                                      {m: by_client[k] for m, by_client in models.items()
                                       if k in by_client},
                                      global_outputs, distill_info.get(k, {})))
    # two-phase strategies: client statistics -> server reduce -> broadcast (DESIGN.md §2)
    stats = [strategy.client_stats(ctx) for ctx in contexts]
    if any(s is not None for s in stats):
        server = strategy.server_reduce([s for s in stats if s is not None])
        for ctx in contexts:
            ctx.server = dict(server)
    rep.phase(f"cycle {cycle + 1}/{cfg.budget.cycles} query", K)
    new_all = []
    for k, ctx in enumerate(contexts):
        picks, diagnostics = select(strategy, ctx, budgets[k])
        labels = oracle.label(k, picks)
        st.labeled[k] = np.union1d(st.labeled[k], picks)
        record = {"cycle": cycle, "client": k, "strategy": strategy.id,
                  "indices": picks.tolist(), "labels": labels.tolist()}
        record.update(diagnostics)
        st.queries.append(record)
        new_all.append(picks)
        rep.advance()
    return np.concatenate(new_all) if new_all else np.zeros(0, dtype=np.int64)


# -- one client's query pieces: the in-process loop above and falkit.flower's ClientApp -------
def client_models(cfg: Config, strategy: Strategy, engine: Engine, cycle: int,
                  labeled: dict[int, np.ndarray], labels: torch.Tensor, global_state: State,
                  last_round: dict[int, State]
                  ) -> tuple[dict[str, dict[int, State]], dict[int, dict[str, Any]]]:
    """The client-side models `strategy` queries with, for the clients `labeled` maps (client
    -> its labeled train indices; only those entries of `labels` are read): {"local": ...,
    "distilled": ...} by client, and the distillation diagnostics by client. Trained with
    keyed seeds, so any subset of clients, resumed or on another machine, gets the same
    models."""
    mode = local_mode(cfg, strategy)
    ids = list(labeled)
    local_states: dict[int, State] = {}
    if strategy.needs_local_model:
        if mode == "last_round":
            missing = [k for k in ids if k not in last_round]
            if missing:
                raise RuntimeError(f"clients {missing} took no part in any round of cycle "
                                   f"{cycle - 1}: no last_round local model; raise "
                                   "fl.fraction or fl.rounds")
            local_states = {k: last_round[k] for k in ids}
        else:  # every client's scratch model, trained concurrently when workers > 1
            jobs = [(labeled[k], (cycle, k)) for k in ids]
            local_states = dict(zip(ids, engine.train_scratch(jobs, labels, cfg.seed),
                                    strict=True))
            for k, state in local_states.items():
                check_finite(state, f"cycle {cycle + 1}'s scratch local model of client {k}")
    # model "distilled": a local model distilled from the global one, for strategies that
    # declare its training settings (IFAL, ALGORITHMS.md §4); keyed seeds, so a resumed run
    # trains the same models
    distilled: dict[int, State] = {}
    distill_info: dict[int, dict[str, Any]] = {}
    distill = getattr(strategy, "distillation", None)
    if distill is not None:
        jobs = [(labeled[k], (cycle, k)) for k in ids]
        trained_kd = engine.train_distilled(jobs, global_state, labels, cfg.seed, **distill)
        for k, (state, losses) in zip(ids, trained_kd, strict=True):
            check_finite(state, f"cycle {cycle + 1}'s distilled local model of client {k}")
            distilled[k] = state
            distill_info[k] = {"distill_epochs": len(losses),
                               "distill_loss": min(losses) if losses else None}
    return {"local": local_states, "distilled": distilled}, distill_info


def global_outputs_fn(engine: Engine, global_state: State):
    """pool -> (probs, features) of the global model; the whole train set is inferred once,
    on first use, in the engine's batches, and then indexed."""
    cache: list[tuple[torch.Tensor, torch.Tensor]] = []

    def global_outputs(pool: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if not cache:
            cache.append(engine.predict(global_state))
        probs, feats = cache[0]
        idx = torch.as_tensor(pool)
        return probs[idx], feats[idx]

    return global_outputs


def query_context(cfg: Config, strategy: Strategy, engine: Engine, cycle: int, k: int,
                  labeled: np.ndarray, labeled_y: np.ndarray, unlabeled: np.ndarray,
                  num_classes: int, global_state: State, models: dict[str, State],
                  global_outputs, state: dict[str, Any]) -> QueryContext:
    """Client k's QueryContext: its pools, the models it may query with ("global" and the
    client models of `models`), and its keyed query RNG."""

    def state_of(model: str) -> State:
        if model == "global":
            return global_state
        if model not in models:
            raise RuntimeError(f"{strategy.id} asked for a {model} model it did not declare")
        return models[model]

    def infer(model: str, pool: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if model == "global":
            return global_outputs(pool)
        return engine.predict(state_of(model), pool)

    ctx = QueryContext(client_id=k, cycle=cycle, labeled=labeled, labeled_y=labeled_y,
                       unlabeled=unlabeled, num_classes=num_classes,
                       rng=rng(cfg.seed, "query", cycle, k), infer=infer, weights=state_of,
                       state=dict(state))
    if hasattr(engine.model, "predicted_loss"):  # ll4al: the loss module's predictions
        ctx.state["predicted_loss"] = _loss_predictor(engine, state_of)
    return ctx


def select(strategy: Strategy, ctx: QueryContext, budget: int
           ) -> tuple[np.ndarray, dict[str, Any]]:
    """The client's query and the strategy's diagnostics of it."""
    strategy.clear_diagnostics()
    picks = strategy.query(ctx, budget)
    return picks, dict(strategy.diagnostics())


def _loss_predictor(engine: Engine, weights):
    """(model, indices) -> predicted loss of that model's loss-prediction module, batched."""
    def predicted_loss(model: str, pool: np.ndarray) -> torch.Tensor:
        return engine.predict_loss(weights(model), pool)

    return predicted_loss


def _checkpoint(out: Path, cycle: int, cfg: Config, st: RunState, strategy: Strategy,
                engine: Engine) -> None:
    save_torch(out / "checkpoint" / "latest.pt", {
        "cycle": cycle, "labeled": st.labeled, "global_state": st.global_state,
        "last_round": st.last_round, "metrics": st.metrics, "queries": st.queries,
        "rounds": st.rounds, "strategy": strategy.state_dict(),
        "fl_algorithm": engine.algorithm.state_dict(),
    })
    write_results(out, cfg, st, cycle)


def write_results(out: Path, cfg: Config, st: RunState, cycle: int) -> None:
    write_csv(out / "metrics.csv", st.metrics)
    write_jsonl(out / "queries.jsonl", st.queries)
    if st.rounds:
        write_csv(out / "rounds.csv", st.rounds)
    complete = cycle == cfg.budget.cycles - 1
    write_atomic(out / "status.json",
                 f'{{"complete": {str(complete).lower()}, "cycles_done": {cycle + 1}, '
                 f'"cycles": {cfg.budget.cycles}}}\n')


def to_device(obj: Any, device: torch.device) -> Any:
    """`obj` with every tensor in it (nested dicts, lists, tuples) moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def _resume(rd: RunDir, cfg: Config, oracle: SimulatedOracle, strategy: Strategy,
            engine: Engine) -> tuple[RunState | None, int]:
    ck = load_checkpoint(rd)
    if ck is None:
        return None, 0
    if ck.get("engine") == "flower":
        raise FalkitError(f"{rd.path} holds a Flower run; Flower runs do not resume in "
                          f"process: pass {rd.flag} or choose another name=")
    # the checkpoint's tensors (read onto the CPU) go to this run's device: the device is not
    # part of a run's identity, so a run may resume on another one
    dev = engine.device
    st = RunState(labeled=ck["labeled"], global_state=to_device(ck["global_state"], dev),
                last_round=to_device(ck["last_round"], dev), metrics=ck["metrics"],
                queries=ck["queries"], rounds=ck.get("rounds", []))
    strategy.load_state_dict(ck.get("strategy", {}))
    engine.algorithm.load_state_dict(to_device(ck.get("fl_algorithm", {}), dev))
    oracle.restore(np.concatenate(st.labeled))
    write_results(rd.path, cfg, st, ck["cycle"])  # files may lag the checkpoint by one write
    return st, ck["cycle"] + 1
