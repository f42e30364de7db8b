"""The ServerApp: falkit's FAL cycle (`falkit.loop`) over Flower messages (DESIGN.md §8).

Per run: `query.info` (pool sizes, data shape) → budgets; per cycle: the query phase
(`query.stats` → `server_reduce` for strategies with a server statistic, then
`query.select`; cycle 0 draws the initial random labels), `fl.rounds` rounds of `train`
aggregated by the run's FL algorithm (falkit.fl.algorithms: FedAvg, FedProx, SCAFFOLD,
FedNova), and `evaluate` (per-class counts summed over the clients' test data). Replies are
audited against the declared payloads and processed in client order (clients are numbered by
their `partition-id`); a client that fails or times out stops the run or is dropped, as
`fl.on_client_failure` says. Results go to the same run directory `falkit run` writes, one
cycle at a time; Flower runs do not resume (the pools lived in that run's SuperNodes).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from falkit import config as config_mod
from falkit.al.base import Strategy
from falkit.al.base import create as create_strategy
from falkit.config import Config
from falkit.data.federation import budgets_for
from falkit.data.partition import write_partition_csv
from falkit.fl.algorithms import Client, State, check_finite, client_weight, state_bytes
from falkit.fl.engine import Engine, ImageTensors, configure_process
from falkit.flower.common import (
    EVALUATE,
    INFO,
    NUM_EXAMPLES,
    SELECT,
    STATS,
    TRAIN,
    Options,
    audit,
    config_json,
    declared,
    json_config,
    load_config,
    record_state,
    state_record,
)
from falkit.loop import RunState, local_mode, metrics_row, write_results
from falkit.results import save_torch, write_atomic
from falkit.rundir import RunDir
from falkit.seeding import rng

log = logging.getLogger("falkit.flower")

app = ServerApp()


class FlowerRunError(RuntimeError):
    """The run cannot go on (a client failed under fl.on_client_failure = stop, ...)."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context)


def run_server(grid: Grid, context: Context) -> Path:
    """Run the experiment of the App's run config on the nodes of `grid`; the run dir."""
    cfg, opts = load_config(dict(context.run_config))
    return FlowerServer(grid, cfg, opts).run()


class FlowerServer:
    def __init__(self, grid: Grid, cfg: Config, opts: Options):
        self.grid, self.cfg, self.opts = grid, cfg, opts
        self.rundir = RunDir.of(cfg, flag="the run config overwrite=true")
        self.out = self.rundir.path
        self.strategy: Strategy = create_strategy(cfg.strategy,
                                                  **config_mod.strategy_options(cfg))
        self.nodes: dict[int, int] = {}  # client k -> node id, alive clients only
        self.st = RunState(labeled=[])
        self.labeled: dict[int, int] = {}  # client k -> labeled count

    # -- messaging ------------------------------------------------------------------------
    def _round(self, message_type: str, contents: dict[int, RecordDict], what: str
               ) -> dict[int, RecordDict]:
        """Send each client k its content; the replies by k, in client order. A client that
        errs or does not answer within round-timeout is handled by fl.on_client_failure."""
        msgs = [Message(content, self.nodes[k], message_type, group_id=what)
                for k, content in contents.items()]
        by_node = {self.nodes[k]: k for k in contents}
        replies = self.grid.send_and_receive(msgs, timeout=self.opts.round_timeout)
        out: dict[int, RecordDict] = {}
        failed: dict[int, str] = {}
        for reply in replies:
            k = by_node.get(reply.metadata.src_node_id)
            if k is None:
                continue
            if reply.has_error():
                failed[k] = f"error: {reply.error.reason}"
                continue
            audit(message_type, reply.content, self.allowed, self.model_like, self.params)
            out[k] = reply.content
        for k in contents:
            if k not in out and k not in failed:
                failed[k] = f"no reply within {self.opts.round_timeout:g} s"
        for k, why in sorted(failed.items()):
            self._fail(k, what, why)
        return {k: out[k] for k in sorted(out)}

    def _fail(self, k: int, what: str, why: str) -> None:
        msg = f"client {k} (node {self.nodes.get(k)}) failed in {what}: {why}"
        if self.cfg.fl.on_client_failure != "continue" or not hasattr(self, "budgets"):
            raise FlowerRunError(f"{msg}; the run stops (fl.on_client_failure = stop; the "
                                 f"cycles already finished are in {self.out})")
        log.warning("%s; going on without it (fl.on_client_failure = continue)", msg)
        self.nodes.pop(k, None)
        self.labeled.pop(k, None)
        if not self.nodes:
            raise FlowerRunError(f"{msg}; no client is left")

    def _wait_for_nodes(self, want: int) -> list[int]:
        deadline = time.monotonic() + self.opts.node_wait
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= want:
                return nodes
            if time.monotonic() > deadline:
                raise FlowerRunError(f"{len(nodes)} SuperNodes connected in "
                                     f"{self.opts.node_wait:g} s, partition.num_clients = "
                                     f"{want} are needed")
            time.sleep(1.0)

    # -- the run --------------------------------------------------------------------------
    def run(self) -> Path:
        cfg, out, rd = self.cfg, self.out, self.rundir
        state = rd.inspect(cfg, self.opts.overwrite)
        if state == "complete":
            log.info("%s is complete; nothing to run", out)
            return out
        if state == "resume":
            raise FlowerRunError(f"{out} holds an unfinished run; Flower runs do not resume "
                                 "(the pools lived in that run's SuperNodes): set the run "
                                 "config overwrite=true or choose another name=")
        self._start()  # validates the federation before anything is written
        with rd.open(cfg, self.opts.overwrite) as state:
            if state == "complete":  # finished by another ServerApp meanwhile
                return out
            if state == "resume":
                raise FlowerRunError(f"{out} holds an unfinished run; Flower runs do not "
                                     "resume: set the run config overwrite=true or choose "
                                     "another name=")
            self._write_partition()
            try:
                for cycle in range(cfg.budget.cycles):
                    row = self._cycle(cycle)
                    self.st.metrics.append(row)
                    self._checkpoint(cycle)
                    rd.commit()
                    log.info("cycle %d/%d: accuracy %.4f, %d clients", cycle + 1,
                             cfg.budget.cycles, row["accuracy"], len(self.nodes))
            except Exception as e:
                done = len(self.st.metrics)
                if done:  # a run that finished no cycle is put back as it was (rundir)
                    write_atomic(out / "status.json",
                                 f'{{"complete": false, "cycles_done": {done}, "cycles": '
                                 f'{cfg.budget.cycles}, "error": {json.dumps(str(e))}}}\n')
                raise
        return out

    def _start(self) -> None:
        cfg = self.cfg
        K = cfg.partition.num_clients
        nodes = self._wait_for_nodes(K)
        # query.info before the declarations are known: only the info keys may come back
        self.allowed = {INFO: declared(self.strategy, _NoAlgo, self.opts.simulation_metrics)[INFO]}
        self.model_like, self.params = {}, []
        self.nodes = dict(enumerate(nodes))
        info = self._round(INFO, {k: RecordDict({"config": json_config()}) for k in self.nodes},
                           "query.info")
        order = sorted(info, key=lambda k: (int(info[k]["info"]["partition-id"]), self.nodes[k]))
        order = order[:K]
        self.nodes = {i: self.nodes[k] for i, k in enumerate(order)}
        infos = [dict(info[k]["info"]) for k in order]
        shape = {(i["num-classes"], i["in-channels"], i["image-size"]) for i in infos}
        if len(shape) != 1:
            raise FlowerRunError(f"the clients' data differ in (classes, channels, size): {shape}")
        C, c, s = (int(v) for v in shape.pop())
        self.num_classes = C
        pools = [int(i["pool"]) for i in infos]
        # simulation: every partition reports the federated train set's size; sites their own
        sizes = {int(i["num-train"]) for i in infos}
        self.num_train = sizes.pop() if len(sizes) == 1 else 0
        self.num_train = max(self.num_train, sum(pools))
        self.budgets = budgets_for(cfg, self.num_train, pools)
        # a model template: the same init and parameter names as the in-process engine
        tmpl = ImageTensors(torch.zeros(1, c, s, s, dtype=torch.uint8),
                            torch.zeros(1, dtype=torch.int64), (0.0,) * c, (1.0,) * c)
        configure_process(cfg)
        self.engine = Engine(cfg, tmpl, tmpl, C, num_clients=len(self.nodes),
                             wrap_model=getattr(self.strategy, "wrap_model", None))
        self.model_like = self.engine.init_state(cfg.seed, 0)
        self.params = [n for n, p in self.engine.model.named_parameters() if p.requires_grad]
        self.allowed = declared(self.strategy, self.engine.algorithm,
                                self.opts.simulation_metrics)
        self._partition = None
        if self.opts.simulation_metrics:
            counts = [config_json(info[k]["diagnostics"], "class-counts") for k in order]
            classes = config_json(info[order[0]]["diagnostics"], "classes") or [
                str(j) for j in range(C)]
            self._partition = (np.array(counts), classes)
        self.generation = 0
        log.info("%d clients, budgets %s, %d train samples", len(self.nodes), self.budgets,
                 self.num_train)

    def _write_partition(self) -> None:
        if self._partition is not None:
            write_partition_csv(self.out / "partition.csv", *self._partition)

    def _cycle(self, cycle: int) -> dict[str, Any]:
        cfg, st = self.cfg, self.st
        C = self.num_classes
        times = {"query": 0.0, "local_model": 0.0, "train": 0.0, "eval": 0.0}
        t = time.perf_counter()
        queried = self._query_phase(cycle)
        times["query"] = time.perf_counter() - t  # the clients' local models included

        t = time.perf_counter()
        fl, engine, algo = cfg.fl, self.engine, self.engine.algorithm
        if fl.reset == "continue" and st.global_state is not None:
            global_state = st.global_state
        else:  # a fresh init every cycle, the same as falkit run's
            global_state = engine.init_state(cfg.seed, cycle)
            algo.reset()
            self.generation = cycle  # clients drop their algorithm memory (SCAFFOLD's c_k)
        K = cfg.partition.num_clients
        keep_last = (self.strategy.needs_local_model
                     and local_mode(cfg, self.strategy) == "last_round")
        comm = 0
        decay_after = int(fl.lr_decay_at * fl.rounds)
        for r in range(fl.rounds):
            lr = fl.lr * (fl.lr_decay if r + 1 > decay_after else 1.0)  # FairFAL: r > int(0.75R)
            if fl.fraction < 1.0:
                m = max(1, round(fl.fraction * K))
                clients = sorted(rng(cfg.seed, "participation", cycle, r).choice(K, m,
                                                                                 replace=False))
            else:
                clients = list(range(K))
            active = [int(k) for k in clients if self.labeled.get(int(k), 0) > 0]
            last = r == fl.rounds - 1
            hook = [r, fl.rounds] if hasattr(engine.model, "extra_loss") else None
            algo.begin_round(global_state, self.params)
            down = state_record(algo.downlink())
            contents = {k: RecordDict({
                "global": state_record(global_state), "downlink": down,
                "config": json_config(cycle=cycle, round=r, client=k, lr=lr,
                                      generation=self.generation, keep_last=keep_last,
                                      progress=hook)}) for k in active}
            replies = self._round(TRAIN, contents, f"train cycle {cycle} round {r}")
            done = []
            for k, rep in replies.items():
                metrics = dict(rep["metrics"])
                # on the server engine's device, where the global state and the algorithm's
                # state (SCAFFOLD's c) live
                client = Client(id=k, weight=client_weight(cfg, int(metrics[NUM_EXAMPLES])),
                                lr=lr, state=record_state(rep["model"], engine.device))
                ups = record_state(rep["uplink"], engine.device) if "uplink" in rep else {}
                algo.from_uplink(client, ups, {n: float(v) for n, v in metrics.items()
                                               if n != NUM_EXAMPLES})
                done.append(client)
            if done:
                global_state = algo.aggregate(global_state, done, num_clients=K)
                check_finite(global_state, f"cycle {cycle + 1}, round {r + 1}")
            comm += 2 * state_bytes(global_state) * len(active)
            if cfg.runtime.eval_every and (r + 1) % cfg.runtime.eval_every == 0 and not last:
                t_eval = time.perf_counter()
                acc_r, _ = self._evaluate(global_state, f"evaluate cycle {cycle} round {r}")
                st.rounds.append({"cycle": cycle, "round": r + 1, "accuracy": acc_r})
                times["eval"] += time.perf_counter() - t_eval
        st.global_state = global_state
        times["train"] = time.perf_counter() - t - times["eval"]

        t = time.perf_counter()
        acc, per_class = self._evaluate(global_state, f"evaluate cycle {cycle}")
        times["eval"] += time.perf_counter() - t
        if cfg.runtime.eval_every:
            st.rounds.append({"cycle": cycle, "round": fl.rounds, "accuracy": acc})

        assert len(per_class) == C
        # queried-class columns need the true labels: simulation metrics only
        return metrics_row(cfg, cycle, sum(self.labeled.values()), self.num_train, acc,
                           per_class, queried, comm, times)

    def _query_phase(self, cycle: int) -> np.ndarray | None:
        """Cycle 0: the initial random labels; later, the strategy's two phases. Returns the
        queried-class histogram when the clients send simulation metrics."""
        strategy, st = self.strategy, self.st
        base = {"cycle": cycle}
        extra: dict[str, Any] = {}
        glob: dict[str, Any] = {}
        if cycle > 0:
            assert st.global_state is not None
            glob = {"global": state_record(st.global_state)}
            two_phase = type(strategy).client_stats is not Strategy.client_stats
            before = strategy.state_dict()
            extra = {"two_phase": two_phase, "strategy": before}
            if two_phase:  # phase A: declared scalars only; the server reduces them
                replies = self._round(STATS, {k: RecordDict({
                    **glob, "config": json_config(**base, client=k, strategy=before)})
                    for k in self.nodes}, f"query.stats cycle {cycle}")
                server = strategy.server_reduce([dict(rep["stats"])
                                                 for rep in replies.values()])
                extra.update(server=server, strategy_after=strategy.state_dict())
        replies = self._round(SELECT, {k: RecordDict({
            **glob, "config": json_config(**base, client=k, budget=self.budgets[k], **extra)})
            for k in self.nodes}, f"query.select cycle {cycle}")
        queried = np.zeros(self.num_classes, dtype=np.int64) if self.opts.simulation_metrics \
            else None
        for k, rep in replies.items():
            self.labeled[k] = int(rep["query"]["labeled"])
            if queried is not None:
                diag = rep["diagnostics"]
                queried += np.asarray(config_json(diag, "queried-classes"), dtype=np.int64)
                st.queries.append(config_json(diag, "record"))
            else:
                st.queries.append({"cycle": cycle, "client": k,
                                   "strategy": "initial_random" if cycle == 0 else strategy.id,
                                   "count": int(rep["query"]["queried"])})
        return queried

    def _evaluate(self, state: State, what: str) -> tuple[float, np.ndarray]:
        """Accuracy and per-class accuracy over the clients' test data (falkit run's test
        set, dealt out in its evaluation batches, in simulation)."""
        replies = self._round(EVALUATE, {k: RecordDict({
            "global": state_record(state), "config": json_config()}) for k in self.nodes}, what)
        correct = np.zeros(self.num_classes, dtype=np.int64)
        total = np.zeros(self.num_classes, dtype=np.int64)
        for rep in replies.values():
            correct += np.asarray(rep["eval"]["correct"], dtype=np.int64)
            total += np.asarray(rep["eval"]["total"], dtype=np.int64)
        if total.sum() == 0:
            raise FlowerRunError("no client holds test data to evaluate on")
        per_class = np.array([int(c) / int(n) if n else np.nan
                              for c, n in zip(correct, total, strict=True)])
        return int(correct.sum()) / int(total.sum()), per_class

    def _checkpoint(self, cycle: int) -> None:
        st = self.st
        save_torch(self.out / "checkpoint" / "latest.pt", {
            "cycle": cycle, "labeled": dict(self.labeled), "global_state": st.global_state,
            "metrics": st.metrics, "queries": st.queries, "rounds": st.rounds,
            "strategy": self.strategy.state_dict(),
            "fl_algorithm": self.engine.algorithm.state_dict(), "engine": "flower"})
        write_results(self.out, self.cfg, st, cycle)


class _NoAlgo:
    uplink_scalars: tuple[str, ...] = ()
    uplink_arrays = False


