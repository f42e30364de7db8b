"""The ClientApp: one falkit client on a Flower SuperNode (DESIGN.md §8).

A site (its data, engine, strategy and simulated oracle) is built at the first message of a
run and kept in the ClientApp process for the next ones (`_SITES`, keyed by run and node;
simulated partitions of one config share one copy of the data). The source of truth for the
client's pools is the node's `context.state` (Flower keeps it between messages of a run) and,
for resuming, the files the client writes on its own disk: `<out_dir>/<name>/clients/client_<k>/`
(or `state-dir=DIR` in the node config: `DIR/<name>/client_<k>/`) — `pools.npz` (every labeled
index, its label, the cycle it was labeled in) after every query, and `cycle_<c>.pt` (the
last-round model and the FL algorithm's memory) after each cycle's last evaluation. Nothing of
these leaves the site. The labels it knows are the ones its oracle revealed.

Data: a partition of the configured dataset (simulation: node config `partition-id`,
`num-partitions`), or a site's own data (`data-root=DIR`, optionally `dataset=NAME`, any
format falkit reads: its whole train split is the pool, its test split the evaluation data,
its labels the simulated oracle).
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from falkit import config as config_mod
from falkit import labeling
from falkit.al.base import PhaseA, QueryContext
from falkit.al.base import create as create_strategy
from falkit.client import client_models, global_outputs_fn, train_hooks
from falkit.data.federation import FederatedData, build
from falkit.data.sources import ImageDataset, load
from falkit.fl.algorithms import State
from falkit.fl.engine import configure_process
from falkit.flower.common import (
    NUM_EXAMPLES,
    array_record,
    config_json,
    json_config,
    load_config,
    record_arrays,
    record_state,
    site_config,
    state_record,
    versions,
)
from falkit.oracle import HumanOracle, LabelsPending, SimulatedOracle
from falkit.results import save_torch, write_atomic
from falkit.rundir import RunDir, data_fingerprint
from falkit.seeding import torch_generator
from falkit.site import ClientSite, Down, site_engine, test_share

app = ClientApp()

POOLS, META = "falkit.pools", "falkit.meta"  # context.state: labeled indices/labels; tags
MODEL = "falkit.model."  # + name: client models kept between messages
FL_MEMORY = "falkit.fl_memory"  # the FL algorithm's client memory (SCAFFOLD's c_k)

_SITES: OrderedDict[tuple, Site] = OrderedDict()  # (run id, node id, configs) -> site
_DATA: OrderedDict[str, FederatedData] = OrderedDict()  # a config's federated data
_KEEP = 16  # sites (and datasets) one ClientApp process keeps


def _remember(cache: OrderedDict, key: Any, value: Any) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _KEEP:
        cache.popitem(last=False)


class Site:
    """One client's data, engine, strategy and oracle, kept across the messages of a run;
    `sync` reads its pools from the node's state at every message."""

    def __init__(self, context: Context):
        self.cfg, self.opts = load_config(dict(context.run_config))
        cfg, node = self.cfg, context.node_config
        self.partition_id = int(node.get("partition-id", -1))
        if "data-root" in node:  # a real site: its own data, all of it
            self.kind, name = "site", str(node.get("dataset", cfg.data.dataset))
            ds = full = load(name, str(node["data-root"]), cfg.data.val_split)
            # named as the server names the run (its files here: the same run name)
            self.cfg = cfg = site_config(cfg, name)
            rows = np.arange(len(ds.y_train), dtype=np.int64)
            self.pool = rows
            self.num_train = len(ds.y_train)
            self.test = np.arange(len(ds.y_test), dtype=np.int64)
        else:  # simulation: this partition of the configured dataset
            self.kind = "partition"
            key = config_mod.dumps(cfg)  # the whole config: data, seed, partition
            if key not in _DATA:
                full = load(cfg.data.dataset, cfg.data.data_root, cfg.data.val_split)
                _remember(_DATA, key, (full, build(cfg, full)))
            full, data = _DATA[key]
            rows = data.source_indices
            K = len(data.clients)
            n = int(node.get("num-partitions", K))
            if n != K or not 0 <= self.partition_id < K:
                raise RuntimeError(f"node config partition-id={self.partition_id}, "
                                   f"num-partitions={n} do not fit partition.num_clients={K}")
            ds = data.dataset
            self.pool = data.clients[self.partition_id]
            self.num_train = data.num_train
            # the test set in blocks of eval_batch dealt round-robin: the clients' shares
            # cover it once, in the batches `falkit run` evaluates it in
            self.test = test_share(len(ds.y_test), cfg.runtime.eval_batch, self.partition_id, K)
        self.dataset: ImageDataset = ds
        self.num_classes = len(ds.classes)
        self.strategy = create_strategy(cfg.strategy, **config_mod.strategy_options(cfg))
        configure_process(cfg)
        unknown = torch.full((len(ds.y_train),), -1, dtype=torch.int64)
        # the strategy's inputs (FAST: the frozen encoder's embeddings, cached on this site)
        self.engine, inputs = site_engine(cfg, self.strategy, full, ds, rows, 1,
                                          train_y=unknown)
        self.extras = inputs.extras
        self.device = self.engine.device  # where every received tensor goes
        self.state_dir = Path(node["state-dir"]) if "state-dir" in node else None
        name = RunDir.of(cfg).path.name  # people's label queues, on this site's disk
        self.label_root = (self.state_dir / name / "labeling" if self.state_dir is not None
                           else RunDir.of(cfg).path / "labeling")
        self._reset_labels()
        self.phase_a: tuple[int, QueryContext] | None = None  # this cycle's, for select

    def _reset_labels(self) -> None:
        """A fresh client: no labels, a fresh oracle (audited), the engine's labels unknown."""
        y = self.dataset.y_train
        human = self.cfg.oracle == "human"
        oracle = (HumanOracle(self.label_root, self.dataset.x_train,
                              list(self.dataset.classes), len(y)) if human
                  else SimulatedOracle(y))
        self.engine.train_y.fill_(-1)
        self.client = ClientSite(self.cfg, max(self.partition_id, 0), self.pool,
                                 self.num_classes, oracle,
                                 np.full(len(y), -1, dtype=np.int64), self.engine,
                                 truth=None if human else y, extras=self.extras)

    @property
    def labeled(self) -> np.ndarray:
        return self.client.labeled

    @property
    def known(self) -> np.ndarray:
        return self.client.known

    @property
    def oracle(self) -> SimulatedOracle:
        return self.client.oracle

    def sync(self, context: Context) -> Site:
        """Take the pools of the node's state (a new process, a restore, or no change)."""
        self.context = context
        pools = record_arrays(context.state[POOLS]) if POOLS in context.state else {}
        labeled = pools.get("labeled", np.zeros(0, dtype=np.int64)).astype(np.int64)
        unsure = int(self.meta().get("unsure", 0))  # spent budget that labeled nothing
        if not np.array_equal(labeled, self.labeled) or unsure != self.client.unsure:
            self._reset_labels()
            self.client.labeled, self.client.unsure = labeled, unsure
            if len(labeled):
                self.client.reveal(labeled, pools["labels"].astype(np.int64))
            self.oracle.restore(labeled, spent=unsure, labels=pools["labels"].astype(
                np.int64) if len(labeled) else None)
        return self

    def meta(self) -> dict[str, Any]:
        rec = self.context.state[META] if META in self.context.state else ConfigRecord()
        return {k: config_json(rec, k) for k in rec}

    def set_meta(self, **values: Any) -> None:
        meta = self.meta()
        meta.update(values)
        self.context.state[META] = json_config(**meta)

    def save_pools(self) -> None:
        self.context.state[POOLS] = array_record(labeled=self.labeled,
                                                 labels=self.known[self.labeled])

    def diagnostics(self, **values: Any) -> dict[str, ConfigRecord]:
        return {"diagnostics": json_config(**values)} if self.opts.simulation_metrics else {}

    # -- the site's own files, for resuming ----------------------------------------------
    def folder(self, k: int) -> Path:
        name = RunDir.of(self.cfg).path.name
        if self.state_dir is not None:
            return self.state_dir / name / f"client_{k}"
        return RunDir.of(self.cfg).path / "clients" / f"client_{k}"

    def save_labels(self, k: int, cycle: int, picks: np.ndarray, later_pass: bool = False
                    ) -> None:
        """pools.npz: every labeled index, its label and the cycle it was labeled in
        (`later_pass`: cycle 0's pass after the first, whose labels stay)."""
        path = self.folder(k) / "pools.npz"
        idx, lab, cyc = picks, self.known[picks], np.full(len(picks), cycle, dtype=np.int64)
        if (cycle > 0 or later_pass) and path.is_file():
            old = dict(np.load(path))
            # a query of this cycle made before a resume goes (a later pass's are its own)
            keep = old["cycles"] <= cycle if later_pass else old["cycles"] < cycle
            idx = np.concatenate([old["indices"][keep], idx])
            lab = np.concatenate([old["labels"][keep], lab])
            cyc = np.concatenate([old["cycles"][keep], cyc])
        buf = io.BytesIO()
        np.savez(buf, indices=idx, labels=lab, cycles=cyc)
        write_atomic(path, buf.getvalue())

    def save_cycle(self, k: int, cycle: int) -> None:
        """cycle_<c>.pt: what the next cycle needs of this one (last-round model, FL
        memory); the files of older cycles but the one before are removed."""
        state, meta = self.context.state, self.meta()
        blob: dict[str, Any] = {"meta": {m: meta[m] for m in ("fl_generation",
                                                               "last_round_cycle") if m in meta}}
        for key in (MODEL + "last_round", FL_MEMORY):
            if key in state:
                blob[key] = record_state(state[key])
        folder = self.folder(k)
        save_torch(folder / f"cycle_{cycle}.pt", blob)
        for old in folder.glob("cycle_*.pt"):
            c = old.stem.split("_")[-1]
            if c.isdigit() and int(c) < cycle - 1:
                old.unlink(missing_ok=True)


def site_of(context: Context) -> Site:
    # the run config too: a site is never reused for another experiment, even if a run id
    # came back (Flower's are random; a test's or another runtime's may not be)
    key = (int(context.run_id), int(context.node_id),
           json.dumps(dict(context.run_config), sort_keys=True, default=str),
           json.dumps(dict(context.node_config), sort_keys=True, default=str))
    site = _SITES.get(key)
    if site is None:
        site = Site(context)
        _remember(_SITES, key, site)
    return site.sync(context)


def _conf(msg: Message) -> dict[str, Any]:
    rec = msg.content["config"]
    return {k: config_json(rec, k) for k in rec}


def _reply(msg: Message, **records: Any) -> Message:
    return Message(RecordDict(records), reply_to=msg)


@app.query("info")
def info(msg: Message, context: Context) -> Message:
    """This site's falkit version and config schema (compared before anything is built: a
    server of another version gets them alone), what it holds (the dataset's name and its
    arrays' SHA-256), pool size, data shape and test count; class counts only as simulation
    metrics."""
    mine = versions()
    if any(_conf(msg).get(k) != v for k, v in mine.items()):
        return _reply(msg, site=json_config(**mine))
    site = site_of(context)
    ds = site.dataset
    fp = data_fingerprint(ds, site.cfg.data.dataset)
    about = json_config(**mine, kind=site.kind, dataset=site.cfg.data.dataset,
                        train=fp["train"], test=fp["test"])
    # the engine's inputs: the images, or FAST's embeddings (D × 1 × 1) for linear probing
    values = {"partition-id": site.partition_id, "pool": len(site.pool),
              "num-train": site.num_train, "num-classes": site.num_classes,
              "in-channels": int(site.engine.in_channels),
              "image-size": int(site.engine.image_size), "test": len(site.test)}
    counts = np.bincount(ds.y_train[site.pool], minlength=site.num_classes).tolist()
    return _reply(msg, info=MetricRecord(values), site=about,
                  **site.diagnostics(**{"class-counts": counts, "classes": list(ds.classes)}))


def _models(site: Site, conf: dict[str, Any], global_state: State) -> tuple[dict, dict]:
    """This cycle's client models (local, distilled): trained once, in `query.stats` or
    `query.select` whichever comes first, and kept in context.state until the other."""
    cycle, k = conf["cycle"], conf["client"]
    meta, state = site.meta(), site.context.state
    if meta.get("models_cycle") == cycle:
        names = meta.get("models", [])
        return ({n: record_state(state[MODEL + n], site.device) for n in names},
                meta.get("models_info", {}))
    last = {}
    if meta.get("last_round_cycle") == cycle - 1 and MODEL + "last_round" in state:
        last = {k: record_state(state[MODEL + "last_round"], site.device)}
    models, info = client_models(site.cfg, site.strategy, site.engine, cycle, {k: site.labeled},
                                 site.engine.train_y, global_state, last)
    mine = {m: by_client[k] for m, by_client in models.items() if k in by_client}
    for n, s in mine.items():
        state[MODEL + n] = state_record(s)
    site.set_meta(models_cycle=cycle, models=list(mine), models_info=info.get(k, {}))
    return mine, info.get(k, {})


def _context(site: Site, conf: dict[str, Any], global_state: State) -> QueryContext:
    models, info = _models(site, conf, global_state)
    site.client.k = conf["client"]
    global_state = _own(site, conf, global_state)  # (FedBN: with its own BatchNorm layers)
    return site.client.context(site.strategy, conf["cycle"], global_state, models,
                               global_outputs_fn(site.engine, global_state), info)


def _own(site: Site, conf: dict[str, Any], global_state: State) -> State:
    """The global model as this client uses it: with its own `local_keys` entries (FedBN's
    BatchNorm layers, from its FL memory), or as it came."""
    algo = site.engine.algorithm
    if not algo.local_keys(site.engine.model):
        return global_state
    meta, state = site.meta(), site.context.state
    memory: State = {}
    if FL_MEMORY in state and meta.get("fl_generation") == conf.get("generation",
                                                                     meta.get("fl_generation")):
        memory = record_state(state[FL_MEMORY], site.device)
    algo.at_client(conf["client"], {}, memory)
    return algo.personal(global_state, conf["client"])


@app.query("stats")
def stats(msg: Message, context: Context) -> Message:
    """Phase A of a two-phase strategy: only its declared scalars leave (FairFAL: γ_k).
    What phase A keeps, and where it left the query RNG, stay in the node's state for
    `query.select` (and the context itself in this process, with its model outputs)."""
    site = site_of(context)
    conf = _conf(msg)
    site.strategy.load_state_dict(conf["strategy"])
    ctx = _context(site, conf, record_state(msg.content["global"], site.device))
    phase_a = site.strategy.client_stats(ctx) or PhaseA(stats={})
    ctx.phase_a = phase_a
    site.phase_a = (conf["cycle"], ctx)
    site.set_meta(phase_a={"cycle": conf["cycle"], "kept": phase_a.kept,
                           "rng": ctx.rng.bit_generator.state})
    return _reply(msg, stats=MetricRecord({k: float(v) for k, v in phase_a.stats.items()}))


@app.query("select")
def select_(msg: Message, context: Context) -> Message:
    """Cycle 0: the strategy's initial pass `initial-pass` (the random labels; FAST's
    passes); later: the strategy's query. The oracle answers here; the server learns the
    counts and what the strategy declares (and, as simulation metrics, the record)."""
    site = site_of(context)
    conf = _conf(msg)
    cycle, k = conf["cycle"], conf["client"]
    client = site.client
    client.k, client.budget = k, conf["budget"]
    before, unsure = client.labeled, client.unsure
    p = int(conf.get("initial_pass", 0))
    try:
        if cycle == 0:
            down = Down({n: record_arrays(r) for n, r in msg.content.items()
                         if n != "config"}, conf.get("down") or {})
            reply = site.strategy.initial_pass(site.cfg, client, p, down)
        else:
            reply = client.query(site.strategy, _query_context(site, msg, conf), cycle)
    except LabelsPending as e:  # people have not answered this queue yet: the run waits
        return _reply(msg, query=MetricRecord({"labeled": len(site.labeled), "queried": 0,
                                               "waiting": e.total - e.answered}))
    site.oracle.audit(client.allowed)
    if client.unsure != unsure:
        site.set_meta(unsure=client.unsure)  # (sync reads it from the node state)
    site.save_pools()
    site.save_labels(k, cycle, np.setdiff1d(client.labeled, before), later_pass=p > 0)
    records = {n: array_record(**a) for n, a in reply.up.items()}
    diag = {"diag": reply.diag} if reply.diag else {}
    return _reply(msg, query=MetricRecord(reply.values), **records, **site.diagnostics(
        record=reply.record, **{"queried-classes": reply.classes.tolist()}, **diag))


def _query_context(site: Site, msg: Message, conf: dict[str, Any]) -> QueryContext:
    """This cycle's QueryContext: phase A's, kept in this process, or a new one (a
    two-phase strategy's phase A then comes from the node state)."""
    cycle, k = conf["cycle"], conf["client"]
    site.strategy.load_state_dict(conf["strategy"])
    kept = site.phase_a
    if conf.get("two_phase") and kept is not None and kept[0] == cycle:
        ctx = kept[1]  # phase A's context, in this process
    else:
        ctx = _context(site, conf, record_state(msg.content["global"], site.device))
        if conf.get("two_phase"):  # a new ClientApp process: phase A from the node state
            saved = site.meta().get("phase_a") or {}
            if saved.get("cycle") != cycle:
                raise RuntimeError(f"client {k} has no phase A of cycle {cycle}")
            ctx.phase_a = PhaseA(stats={}, kept=saved["kept"])
            ctx.rng.bit_generator.state = saved["rng"]
    if conf.get("two_phase"):
        ctx.server = dict(conf["server"])
    site.phase_a = None
    return ctx


@app.query("restore")
def restore(msg: Message, context: Context) -> Message:
    """Resume: the pools as they were after cycle `cycle` (and that cycle's last-round model
    and FL memory), from this site's own files."""
    site = site_of(context)
    conf = _conf(msg)
    cycle, k = conf["cycle"], conf["client"]
    folder = site.folder(k)
    try:
        saved = dict(np.load(folder / "pools.npz"))
        blob = torch.load(folder / f"cycle_{cycle}.pt", map_location="cpu", weights_only=False)
    except OSError as e:
        raise RuntimeError(f"client {k} cannot resume after cycle {cycle + 1}: {e}") from None
    keep = saved["cycles"] <= cycle
    order = np.argsort(saved["indices"][keep], kind="stable")
    state = context.state
    for key in (POOLS, META, FL_MEMORY, MODEL + "last_round", MODEL + "local",
                MODEL + "distilled"):
        if key in state:
            del state[key]
    state[POOLS] = array_record(labeled=saved["indices"][keep][order],
                                labels=saved["labels"][keep][order])
    for key in (MODEL + "last_round", FL_MEMORY):
        if key in blob:
            state[key] = state_record(blob[key])
    unsure = labeling.count_unsure(site.label_root, cycle, k)  # spent, not labeled
    state[META] = json_config(**blob["meta"], **({"unsure": unsure} if unsure else {}))
    site.sync(context)
    site.phase_a = None
    return _reply(msg, query=MetricRecord({"labeled": len(site.labeled), "queried": 0}))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local update from the global weights with the run's FL algorithm:
    `Engine.train_client`, as `Engine.fl_round` runs it for each client in process."""
    site = site_of(context)
    conf = _conf(msg)
    cycle, r, k, lr = conf["cycle"], conf["round"], conf["client"], conf["lr"]
    engine, cfg = site.engine, site.cfg
    algo = engine.algorithm
    # the global weights, the FL algorithm's downlink (SCAFFOLD's c) and this client's memory
    # (its c_k) on the engine's device, where the client trains
    global_state = record_state(msg.content["global"], site.device)
    meta = site.meta()
    memory: State = {}
    if meta.get("fl_generation") == conf["generation"] and FL_MEMORY in context.state:
        memory = record_state(context.state[FL_MEMORY], site.device)
    algo.at_client(k, record_state(msg.content["downlink"], site.device), memory)
    progress = tuple(conf["progress"]) if conf.get("progress") else None
    # a strategy's own training objective (kafal.kcfu), built from this site's data only;
    # `site.known` holds just the labels the oracle revealed here
    hooks = train_hooks(site.strategy, engine, global_state, r, cfg.fl.rounds, [site.labeled],
                        site.known, [site.pool])
    objectives = hooks.get("objectives")
    client = engine.train_client(engine.model, algo.personal(global_state, k), k, site.labeled,
                                 lr,
                                 torch_generator(cfg.seed, "train", cycle, r, k),
                                 progress=progress,
                                 objective=objectives(0) if objectives else None)
    arrays, scalars = algo.uplink(client)
    context.state[FL_MEMORY] = state_record(algo.client_memory(client))
    if conf.get("keep_last"):  # the `last_round` local model of this cycle
        context.state[MODEL + "last_round"] = state_record(client.state)
    site.set_meta(fl_generation=conf["generation"],
                  **({"last_round_cycle": cycle} if conf.get("keep_last") else {}))
    local = algo.local_keys(engine.model)  # (FedBN's BatchNorm layers) never leave the site
    records: dict[str, Any] = {
        "model": state_record({n: v for n, v in client.state.items() if n not in local}),
        "metrics": MetricRecord({NUM_EXAMPLES: len(site.labeled), **scalars})}
    if algo.uplink_arrays:
        records["uplink"] = state_record(arrays)
    return _reply(msg, **records)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Per-class correct and total counts of the global model on this client's test data;
    after a cycle's last evaluation, the site saves what resuming after it needs and (as
    simulation metrics) adds its test labels and softmax scores, for the cycle's AUC."""
    site = site_of(context)
    conf = _conf(msg)
    state = _own(site, conf, record_state(msg.content["global"], site.device))
    C = site.num_classes
    y = site.dataset.y_test[site.test]
    if len(site.test):
        probs = site.engine.predict(state, site.test, split="test")[0].numpy()
    else:
        probs = np.zeros((0, C), dtype=np.float32)
    pred = probs.argmax(1)
    correct = np.bincount(y[pred == y], minlength=C).tolist()
    total = np.bincount(y, minlength=C).tolist()
    scores = {}
    if conf.get("final"):
        site.save_cycle(conf["client"], conf["cycle"])
        if site.opts.simulation_metrics:  # the cycle's AUC (metrics.csv) needs every score
            scores = site.diagnostics(labels=y.tolist(), probs=probs.tolist())
    return _reply(msg, eval=MetricRecord({"correct": correct, "total": total}), **scores)
