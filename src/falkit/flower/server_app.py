"""The ServerApp: falkit's FAL cycle (`falkit.driver`) over Flower messages (DESIGN.md §8).

`FlowerFederation` is the driver's federation on a Flower `Grid`. Per run: `query.info` (pool
sizes, data shape) → budgets; per cycle: the query phase (`query.stats` → `server_reduce` for
strategies with a server statistic, then `query.select`; cycle 0 draws the initial random
labels), `fl.rounds` rounds of `train` aggregated by the run's FL algorithm
(falkit.fl.algorithms: FedAvg, FedProx, SCAFFOLD, FedNova), and `evaluate` (per-class counts
summed over the clients' test data). Replies are audited against the declared payloads and
processed in client order (clients are numbered by their `partition-id`); a client that fails
or times out stops the run or is dropped, as `fl.on_client_failure` says. Results go to the
same run directory `falkit run` writes, one cycle at a time. A stopped run resumes from its
checkpoint: `query.restore` asks every client to take back its pools (and its last-round
model and FL memory) as they were after that cycle, from the files it keeps on its own disk.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.app.exception import AppExitException
from flwr.common import log as flwr_log
from flwr.serverapp import Grid, ServerApp

from falkit import config as config_mod
from falkit import tracking
from falkit.al.base import Strategy
from falkit.al.base import create as create_strategy
from falkit.config import Config
from falkit.data.federation import budgets_for
from falkit.data.sources import image_shape
from falkit.driver import Queried, Reporter
from falkit.driver import run as drive
from falkit.errors import FalkitError
from falkit.fl.algorithms import Client, State, check_finite, client_weight
from falkit.fl.engine import Engine, ImageTensors, configure_process
from falkit.flower.common import (
    EVALUATE,
    INFO,
    NUM_EXAMPLES,
    RESTORE,
    SELECT,
    SITE_KEYS,
    STATS,
    TRAIN,
    Options,
    array_record,
    audit,
    config_json,
    declared,
    json_config,
    load_config,
    record_arrays,
    record_state,
    site_config,
    state_record,
    versions,
)
from falkit.metrics import Evaluation, macro_auc
from falkit.models.backbones import create as create_backbone
from falkit.models.backbones import on_embeddings
from falkit.oracle import LabelsPending, WaitingForLabels
from falkit.rundir import RunDir
from falkit.site import Down, Reply, initial_queried

app = ServerApp()


class FlowerRunError(FalkitError):
    """The run cannot go on (a client failed under fl.on_client_failure = stop, ...)."""


class RunFailed(AppExitException):
    """A refused config or a failed run, as Flower's runtime reports an App's failure: it
    marks the run failed with this one line as the reason, after sending the log lines
    (`flwr run --stream`, `flwr log`). Flower 1.41 catches only Exception: a SystemExit
    skipped all of that and the run was marked failed by the heartbeat timeout, silently."""

    exit_code = 201  # Flower's ExitCode.SERVERAPP_EXCEPTION


class _NoTraceback(logging.Filter):
    """Flower logs an App's exception with its traceback; falkit's one-line errors are the
    whole story (the line above says it), so their records go without."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], RunFailed):
            record.exc_info, record.exc_text = None, None
        return True


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run_server(grid, context)
    except WaitingForLabels as e:  # people label at the sites; the run continues when
        # it is submitted again (status.json says what it waits for)
        flwr_log(logging.WARNING, "falkit: %s; label them at the sites (falkit label "
                 "RUN_DIR --client K, on each site's disk), then submit the same run again",
                 e)
    except FalkitError as e:  # a refused config, a failed site: one line, as the CLI says it
        flwr_log(logging.ERROR, "falkit: error: %s", e)
        logger = logging.getLogger("flwr")
        if not any(isinstance(f, _NoTraceback) for f in logger.filters):
            logger.addFilter(_NoTraceback())
        raise RunFailed(f"falkit: error: {e}") from None


class LogReporter(Reporter):
    """The run's progress as log lines through Flower's logger, which `flwr run --stream`
    and `flwr log` carry: one line per FL round and per query phase, one per cycle."""

    def start(self, run_name: str, cycles: int, first_cycle: int) -> None:
        self.cycles, self.t0 = cycles, time.perf_counter()
        self.what, self.total, self.done, self.t = "", 0, 0, self.t0
        flwr_log(logging.INFO, "falkit: run %s, cycles %d..%d of %d", run_name,
                 first_cycle + 1, cycles, cycles)

    def phase(self, description: str, total: int) -> None:
        self.what, self.total, self.done, self.t = description, total, 0, time.perf_counter()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.what.endswith("train"):
            flwr_log(logging.INFO, "falkit: %s round %d/%d (%.1f s)", self.what, self.done,
                     self.total, now - self.t)
            self.t = now
        elif self.done == self.total:
            flwr_log(logging.INFO, "falkit: %s: %d clients (%.1f s)", self.what, self.total,
                     now - self.t)

    def cycle_done(self, row: dict[str, Any]) -> None:
        flwr_log(logging.INFO, "falkit: cycle %d/%d: accuracy %.4f, %.2f %% labeled "
                 "(%.1f s so far)", row["cycle"] + 1, self.cycles, row["accuracy"],
                 row["labeled_pct"], time.perf_counter() - self.t0)
        seen = (row["test_samples"], row["clients"])
        first = getattr(self, "first", None)
        if first is None:
            self.first = seen
        elif seen != first:
            flwr_log(logging.WARNING, "falkit: cycle %d was evaluated on %d test samples of "
                     "%d clients, earlier cycles on %d of %d: its accuracy is of another test "
                     "set (falkit report uses the cycles before the change only)",
                     row["cycle"] + 1, seen[0], seen[1], first[0], first[1])


def validate(cfg: Config) -> Strategy:
    """What can be checked before any client is contacted: the strategy and its options,
    FAST's scope, the backbone on a built-in dataset's images (the budgets need the
    clients' pool sizes: checked right after `query.info`)."""
    strategy = create_strategy(cfg.strategy, **config_mod.strategy_options(cfg))
    tracking.check(cfg)
    strategy.check_transport(cfg, FlowerFederation.transport)  # (FAST: scope = client)
    shape = image_shape(cfg.data.dataset)
    if shape is not None and not on_embeddings(cfg.model.backbone):
        C, channels, size = shape
        create_backbone(cfg.model.backbone, num_classes=C, in_channels=channels,
                        image_size=size)
    return strategy


def run_server(grid: Grid, context: Context, stop_after: int | None = None) -> Path:
    """Run (or resume) the experiment of the App's run config on the nodes of `grid`; the
    run dir. `stop_after` ends after that cycle as if the server had been stopped (tests).
    Nothing is sent before the config is validated."""
    cfg, opts = load_config(dict(context.run_config))
    cfg.out_dir = str(Path(cfg.out_dir).absolute())  # where this ServerApp runs
    strategy = validate(cfg)
    rd = RunDir.of(cfg, flag="the run config overwrite=true")
    if rd.inspect(cfg, opts.overwrite) == "complete":  # (simulated partitions: the name
        flwr_log(logging.INFO, "falkit: %s is complete; nothing to run", rd.path)  # is known)
        return rd.path
    fed = FlowerFederation(grid, cfg, opts, strategy, rd.path)
    fed.start()  # waits for the nodes, asks what they hold, checks versions and budgets
    if fed.cfg is not cfg:  # sites with their own data: the run is named by what they hold
        cfg = fed.cfg
        rd = RunDir.of(cfg, flag="the run config overwrite=true")
        fed.out = rd.path
        if rd.inspect(cfg, opts.overwrite) == "complete":
            flwr_log(logging.INFO, "falkit: %s is complete; nothing to run", rd.path)
            return rd.path
    flwr_log(logging.INFO, "falkit: %s on Flower, results in %s", cfg.strategy, rd.path)
    drive(cfg, strategy, fed, rd, reporter=LogReporter(), overwrite=opts.overwrite,
          fingerprint=fed.fingerprint, stop_after=stop_after)
    return rd.path


class FlowerFederation:
    """The driver's federation on a Flower Grid: every client is a SuperNode's ClientApp."""

    transport = "flower"

    def __init__(self, grid: Grid, cfg: Config, opts: Options, strategy: Strategy, out: Path):
        self.grid, self.cfg, self.opts, self.strategy, self.out = grid, cfg, opts, strategy, out
        self.nodes: dict[int, int] = {}  # client k -> node id, alive clients only
        self.labeled: dict[int, int] = {}  # client k -> labeled count
        self.generation = 0  # clients drop their FL memory (SCAFFOLD's c_k) when it changes
        self._before: dict[str, Any] | None = None  # the strategy's state before phase A
        self.sites: dict[int, str] = {}  # client k -> what it is, for messages
        self.fingerprint: dict[str, Any] | None = None  # the run's data.json

    # -- messaging ------------------------------------------------------------------------
    def _exchange(self, msgs: dict[int, Message]) -> tuple[dict[int, Message], float]:
        """Push every message, then pull the replies until all came or round-timeout passed:
        each by the message it answers (a SuperNode that died is answered by the SuperLink,
        not by the node). Pulls are 10 ms apart at first, then up to POLL s: Flower's own
        `send_and_receive` sleeps 3 s between pulls, a round's most of it for small work."""
        t0 = time.monotonic()
        pushed = list(msgs.items())
        ids = set(self.grid.push_messages([m for _, m in pushed]))  # (None: not pushed)
        pending = {m.metadata.message_id: k for k, m in pushed if m.metadata.message_id in ids}
        replies: dict[int, Message] = {}
        wait, deadline = 0.01, t0 + self.opts.round_timeout
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                k = pending.pop(reply.metadata.reply_to_message_id, None)
                if k is not None:
                    replies[k] = reply
            now = time.monotonic()
            if not pending or now >= deadline:
                break
            time.sleep(min(wait, deadline - now))
            wait = min(wait * 2, POLL)
        return replies, time.monotonic() - t0

    def _round(self, message_type: str, contents: dict[int, RecordDict], what: str,
               must: bool = False) -> dict[int, RecordDict]:
        """Send each client k its content; the replies by k, in client order. A client that
        errs or does not answer within round-timeout is handled by fl.on_client_failure
        (`must`: the run stops)."""
        msgs = {k: Message(content, self.nodes[k], message_type, group_id=what)
                for k, content in contents.items()}
        replies, took = self._exchange(msgs)
        out: dict[int, RecordDict] = {}
        failed: dict[int, str] = {}
        for k, reply in replies.items():
            if reply.has_error():
                failed[k] = _failure(reply.error.code, reply.error.reason, took)
                continue
            audit(message_type, reply.content, self.allowed, self.uplink_like, self.params)
            out[k] = reply.content
        for k in contents:
            if k not in out and k not in failed:
                failed[k] = (f"no reply within round-timeout = {self.opts.round_timeout:g} s "
                             "(the site is slow or stuck; a SuperNode that stopped is "
                             "reported as stopped, usually within 60-90 s)")
        for k, why in sorted(failed.items()):
            self._fail(k, what, why, must)
        return {k: out[k] for k in sorted(out)}

    def _fail(self, k: int, what: str, why: str, must: bool = False) -> None:
        where = self.sites.get(k, f"node {self.nodes.get(k)}")
        msg = f"client {k} ({where}) failed in {what}: {why}"
        if not hasattr(self, "budgets"):  # before the run started: nothing to resume
            raise FlowerRunError(f"client {k} ({where}) cannot take part in the run: {why}")
        if must or self.cfg.fl.on_client_failure != "continue":
            raise FlowerRunError(f"{msg}; the run stops (fl.on_client_failure = "
                                 f"{self.cfg.fl.on_client_failure}); the cycles already "
                                 f"finished are in {self.out}: bring the site back and "
                                 "submit the same run config again to resume after them")
        flwr_log(logging.WARNING, "falkit: %s; going on without it "
                 "(fl.on_client_failure = continue: later cycles are evaluated on the other "
                 "sites' test data; metrics.csv counts test_samples and clients)", msg)
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
                raise FlowerRunError(
                    f"{len(nodes)} SuperNodes connected in {self.opts.node_wait:g} s, "
                    f"partition.num_clients = {want} are needed (Flower's managed local "
                    "SuperLink forgets its SuperNodes when it restarts: run `flwr federation "
                    f"simulation-config @none/default local --num-supernodes {want}` again)")
            time.sleep(1.0)

    # -- the federation -------------------------------------------------------------------
    def start(self) -> None:
        """Wait for the SuperNodes, learn their pools and data shape (`query.info`), and
        build the server's model template and FL algorithm."""
        cfg = self.cfg
        K = cfg.partition.num_clients
        nodes = self._wait_for_nodes(K)
        # query.info before the declarations are known: only the info keys may come back
        self.allowed = {INFO: declared(self.strategy, _NoAlgo, self.opts.simulation_metrics)[INFO]}
        self.model_like, self.params = {}, []
        self.uplink_like: State = {}
        self.nodes = dict(enumerate(nodes))
        info = self._round(INFO, {k: RecordDict({"config": json_config(**versions())})
                                  for k in self.nodes}, "query.info")
        mine = versions()
        for k, rep in info.items():  # before anything else: a site of another falkit
            theirs = {v: config_json(rep["site"], v) for v in mine} if "site" in rep else {}
            if theirs != mine:
                site = (f"falkit {theirs['falkit']} (config schema {theirs['schema']})"
                        if theirs else "a falkit that reports no version")
                raise FlowerRunError(
                    f"node {self.nodes[k]} runs {site}, the server falkit {mine['falkit']} "
                    f"(config schema {mine['schema']}): install the same falkit on the "
                    "server and every site")
        order = sorted(info, key=lambda k: (int(info[k]["info"]["partition-id"]), self.nodes[k]))
        order = order[:K]
        self.nodes = {i: self.nodes[k] for i, k in enumerate(order)}
        self.num_clients = K
        self._sites([{v: config_json(info[k]["site"], v) for v in SITE_KEYS} for k in order],
                    [dict(info[k]["info"]) for k in order])
        infos = [dict(info[k]["info"]) for k in order]
        cfg = self.cfg  # (sites: named by their data)
        shape = {(i["num-classes"], i["in-channels"], i["image-size"]) for i in infos}
        if len(shape) != 1:
            raise FlowerRunError(f"the clients' data differ in (classes, channels, size): {shape}")
        C, c, s = (int(v) for v in shape.pop())
        self.num_classes = C
        pools = [int(i["pool"]) for i in infos]
        self.pools = dict(enumerate(pools))
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
                             wrap_model=self.strategy.wrap_model)
        self.algorithm, self.device = self.engine.algorithm, self.engine.device
        self.engine.mean = self.engine.std = None  # the sites normalise with their data's
        self.model_like = self.engine.init_state(cfg.seed, 0)
        # what a client's model uplink holds: every entry but the FL algorithm's local ones
        local = self.algorithm.local_keys(self.engine.model)
        self.uplink_like = {k: v for k, v in self.model_like.items() if k not in local}
        self.params = [n for n, p in self.engine.model.named_parameters() if p.requires_grad]
        self.allowed = declared(self.strategy, self.engine.algorithm,
                                self.opts.simulation_metrics)
        self._partition = None
        if self.opts.simulation_metrics:
            counts = [config_json(info[k]["diagnostics"], "class-counts") for k in order]
            classes = config_json(info[order[0]]["diagnostics"], "classes") or [
                str(j) for j in range(C)]
            self._partition = (np.array(counts), classes)
        flwr_log(logging.INFO, "falkit: %d clients, budgets %s, %d train samples",
                 len(self.nodes), self.budgets,
                 self.num_train)

    def _sites(self, about: list[dict[str, Any]], infos: list[dict[str, Any]]) -> None:
        """What the clients hold: simulated partitions of the configured dataset (every one
        reports its fingerprint) or sites with their own data, all of one dataset (the run
        is then named and reported by it: `site_config`). The run's data.json."""
        kinds = {a["kind"] for a in about}
        names = sorted({a["dataset"] for a in about})
        self.sites = {k: f"{'site' if a['kind'] == 'site' else 'partition'} "
                         f"{i['partition-id']}, node {self.nodes[k]}"
                      for k, (a, i) in enumerate(zip(about, infos, strict=True))}
        if len(kinds) > 1:
            raise FlowerRunError("some SuperNodes hold their own data (data-root), others "
                                 "simulate partitions: give every one a data-root, or none")
        if len(names) > 1:
            raise FlowerRunError(f"the sites hold different datasets ({', '.join(names)}): "
                                 "every site's node config needs the same dataset=NAME")
        num_test = sum(int(i["test"]) for i in infos)
        if kinds == {"partition"}:  # one dataset, dealt out: its fingerprint, as falkit run's
            a = about[0]
            self.fingerprint = {"dataset": a["dataset"], "train": a["train"],
                                "test": a["test"], "num_train": int(infos[0]["num-train"]),
                                "num_test": num_test}
            return
        digest = lambda part: hashlib.sha256(  # noqa: E731
            "".join(a[part] for a in about).encode()).hexdigest()
        self.fingerprint = {"dataset": names[0], "train": digest("train"),
                            "test": digest("test"),
                            "num_train": sum(int(i["pool"]) for i in infos),
                            "num_test": num_test,
                            "sites": [{"client": k, "train": a["train"], "test": a["test"],
                                       "num_train": int(i["pool"]), "num_test": int(i["test"])}
                                      for k, (a, i) in enumerate(zip(about, infos,
                                                                     strict=True))]}
        self.cfg = site_config(self.cfg, names[0])
        flwr_log(logging.INFO, "falkit: %d sites with their own %s data", len(about), names[0])

    def partition(self) -> tuple[np.ndarray, list[str]] | None:
        return self._partition

    def initial_state(self, cycle: int) -> State:
        state = self.engine.init_state(self.cfg.seed, cycle)
        self.algorithm.reset()
        self.generation = cycle  # clients drop their algorithm memory (SCAFFOLD's c_k)
        return state

    def labeled_counts(self) -> dict[int, int]:
        return dict(self.labeled)

    def initial_labels(self) -> Queried:
        """Cycle 0: the strategy's initial passes (`query.select` with `initial-pass` p; the
        random draw, or FAST's two), the server's `initial_down` between them (FAST: the
        shared bank, concatenated in client order, and each client's budget b_k). The
        server learns counts, the declared scalars and arrays, and (simulation metrics) the
        records."""
        names = self.strategy.initial_passes
        downs = {k: Down() for k in self.nodes}
        passes: list[dict[int, Reply]] = []
        for p, what in enumerate(names):
            label = f" ({what})" if len(names) > 1 else ""
            replies = self._round(SELECT, {k: RecordDict({
                **{n: array_record(**a) for n, a in downs[k].arrays.items()},
                "config": json_config(cycle=0, client=k, budget=self.budgets[k],
                                      initial_pass=p, down=downs[k].values)})
                for k in self.nodes if k in downs}, f"query.select cycle 0{label}")
            got = self._replies(0, what, replies)
            passes.append(got)
            if p + 1 < len(names):
                downs = self.strategy.initial_down(self.cfg, p, got, self.pools)
        return initial_queried(self.cfg, self.strategy, passes)

    def _replies(self, cycle: int, what: str, replies: dict[int, RecordDict]
                 ) -> dict[int, Reply]:
        """The clients' `query.select` replies as the server may see them (the record and
        the classes only as simulation metrics); the run pauses while people label."""
        waiting = [LabelsPending(k, 0, int(rep["query"]["waiting"]), f"site of client {k}")
                   for k, rep in replies.items() if int(rep["query"].get("waiting", 0)) > 0]
        if waiting:  # people have not answered every queue yet: the run pauses here
            raise WaitingForLabels(waiting)
        out = {}
        for k, rep in replies.items():
            values = {n: float(v) for n, v in rep["query"].items()}
            self.labeled[k] = int(values["labeled"])
            up = {n: record_arrays(rep[n]) for n in self.strategy.initial_uploads if n in rep}
            if self.opts.simulation_metrics:
                diag = rep["diagnostics"]
                out[k] = Reply(config_json(diag, "record"),
                               np.asarray(config_json(diag, "queried-classes"), np.int64),
                               values, up, config_json(diag, "diag", {}))
            else:
                out[k] = Reply({"cycle": cycle, "client": k, "strategy": what,
                                "count": int(values["queried"])}, None, values, up)
        return out

    def prepare_query(self, cycle: int, global_state: State) -> float:
        return 0.0  # each client trains its models in its first query message (query time)

    def query_stats(self, cycle: int, global_state: State) -> list[dict[str, float]]:
        """Phase A: declared scalars only (FairFAL: γ_k); the driver reduces them."""
        self._before = self.strategy.state_dict()
        replies = self._round(STATS, {k: RecordDict({
            "global": state_record(global_state),
            "config": json_config(cycle=cycle, client=k, strategy=self._before)})
            for k in self.nodes}, f"query.stats cycle {cycle}")
        return [dict(rep["stats"]) for rep in replies.values()]

    def select(self, cycle: int, global_state: State, server: dict[str, float] | None,
               advance) -> Queried:
        before = self._before if self._before is not None else self.strategy.state_dict()
        self._before = None
        extra: dict[str, Any] = {"two_phase": server is not None, "strategy": before}
        if server is not None:
            extra["server"] = server
        return self._select(cycle, {"global": state_record(global_state)}, extra, advance)

    def _select(self, cycle: int, glob: dict[str, Any], extra: dict[str, Any], advance
                ) -> Queried:
        """`query.select`: the clients query, their oracles answer; the server learns the
        counts (and, as simulation metrics, the records and the queried-class histograms)."""
        replies = self._round(SELECT, {k: RecordDict({
            **glob, "config": json_config(cycle=cycle, client=k, budget=self.budgets[k],
                                          **extra)})
            for k in self.nodes}, f"query.select cycle {cycle}")
        got = self._replies(cycle, self.strategy.id, replies)
        for _ in got:
            advance()
        hists = [r.classes for r in got.values()]
        classes = (np.sum(hists, axis=0) if hists else np.zeros(self.num_classes, np.int64)) \
            if self.opts.simulation_metrics else None
        return Queried([r.record for r in got.values()], classes)

    def begin_training(self, cycle: int, keep_last: bool) -> None:
        pass  # each client replaces its last-round model as it trains

    def train_round(self, cycle: int, r: int, global_state: State, clients: list[int],
                    lr: float, keep_last: bool) -> State:
        cfg, algo = self.cfg, self.algorithm
        active = [k for k in clients if self.labeled.get(k, 0) > 0]
        # models with a loss hook (ll4al) learn which round of R this is
        progress = [r, cfg.fl.rounds] if hasattr(self.engine.model, "extra_loss") else None
        algo.begin_round(global_state, self.params)
        down = state_record(algo.downlink())
        contents = {k: RecordDict({
            "global": state_record(global_state), "downlink": down,
            "config": json_config(cycle=cycle, round=r, client=k, lr=lr,
                                  generation=self.generation, keep_last=keep_last,
                                  progress=progress)}) for k in active}
        replies = self._round(TRAIN, contents, f"train cycle {cycle} round {r}")
        weights_cfg = self.strategy.training(cfg)  # FAST's own FedAvg weights
        done = []
        for k, rep in replies.items():
            metrics = dict(rep["metrics"])
            # on the server engine's device, where the global state and the algorithm's
            # state (SCAFFOLD's c) live
            client = Client(id=k, weight=client_weight(weights_cfg,
                                                       int(metrics[NUM_EXAMPLES])),
                            lr=lr, state=record_state(rep["model"], self.device))
            ups = record_state(rep["uplink"], self.device) if "uplink" in rep else {}
            algo.from_uplink(client, ups, {n: float(v) for n, v in metrics.items()
                                           if n != NUM_EXAMPLES})
            done.append(client)
        if done:
            global_state = algo.aggregate(global_state, done, num_clients=self.num_clients)
            check_finite(global_state, f"cycle {cycle + 1}, round {r + 1}")
        return global_state

    def evaluate(self, state: State, final: bool, cycle: int) -> Evaluation:
        """Accuracy and per-class accuracy over the clients' test data (falkit run's test
        set, dealt out in its evaluation batches, in simulation), from their per-class
        counts; the AUC needs every test sample's scores, so only simulation metrics give
        it, for the cycle's last evaluation (NaN otherwise: rounds.csv has accuracy only).
        After the cycle's last evaluation every client saves what a resumed run needs (its
        last-round model, its FL memory)."""
        replies = self._round(EVALUATE, {k: RecordDict({
            "global": state_record(state),
            "config": json_config(cycle=cycle, client=k, final=final)}) for k in self.nodes},
            f"evaluate cycle {cycle}")
        correct = np.zeros(self.num_classes, dtype=np.int64)
        total = np.zeros(self.num_classes, dtype=np.int64)
        for rep in replies.values():
            correct += np.asarray(rep["eval"]["correct"], dtype=np.int64)
            total += np.asarray(rep["eval"]["total"], dtype=np.int64)
        if total.sum() == 0:
            raise FlowerRunError("no client holds test data to evaluate on")
        per_class = np.array([int(c) / int(n) if n else np.nan
                              for c, n in zip(correct, total, strict=True)])
        auc = float("nan")
        if self.opts.simulation_metrics and final:
            diag = [rep["diagnostics"] for rep in replies.values()]
            labels = np.concatenate([np.asarray(config_json(d, "labels"), np.int64)
                                     for d in diag])
            probs = np.concatenate([np.asarray(config_json(d, "probs"), np.float32)
                                    .reshape(-1, self.num_classes) for d in diag])
            auc = macro_auc(labels, probs)
        return Evaluation(int(correct.sum()) / int(total.sum()), per_class, auc,
                          int(total.sum()))

    def state_dict(self) -> dict[str, Any]:
        return {"labeled": dict(self.labeled), "generation": self.generation,
                "engine": "flower"}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Resume: every client still in the run takes back its pools as they were after
        the checkpoint's cycle (`query.restore`, from its own disk); its labeled count must
        be the checkpoint's."""
        want = {int(k): int(n) for k, n in checkpoint["labeled"].items()}
        self.generation = int(checkpoint.get("generation", 0))
        self.nodes = {k: n for k, n in self.nodes.items() if k in want}
        cycle = int(checkpoint["cycle"])
        replies = self._round(RESTORE, {k: RecordDict({"config": json_config(
            cycle=cycle, client=k, generation=self.generation)}) for k in self.nodes},
            f"query.restore cycle {cycle}", must=True)
        for k, rep in replies.items():
            got = int(rep["query"]["labeled"])
            if got != want[k]:
                raise FlowerRunError(f"client {k} restored {got} labels after cycle "
                                     f"{cycle}, the checkpoint counts {want[k]}; start the "
                                     "run again with the run config overwrite=true")
            self.labeled[k] = got
        flwr_log(logging.INFO, "falkit: resumed after cycle %d of %s", cycle + 1, self.out)


POLL = 0.2  # seconds between pulls of a round's replies, at most

# Flower's error codes (flwr.common.constant.ErrorCode) a failed reply carries
_NODE_UNAVAILABLE, _CLIENT_APP_RAISED = 5, 2


def _failure(code: int, reason: str, took: float) -> str:
    """What happened to a site, in words: Flower's reason is kept, shortened."""
    if code == _NODE_UNAVAILABLE:
        return (f"its SuperNode stopped answering (Flower noticed after {took:.0f} s: no "
                "heartbeat)")
    if code == _CLIENT_APP_RAISED:  # "<class 'X'>:<'message'>": the message
        inner = reason.partition(":<'")[2].removesuffix("'>") or reason
        return f"its ClientApp raised an error: {inner}"
    return f"Flower error {code}: {reason}"


class _NoAlgo:
    uplink_scalars: tuple[str, ...] = ()
    uplink_arrays = False


