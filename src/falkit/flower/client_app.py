"""The ClientApp: one falkit client on a Flower SuperNode (DESIGN.md §8).

Every message rebuilds the site (its data, engine and oracle: a ClientApp process may serve
a single message) and reads the client's pools from `context.state`; the labels it knows are
the ones its oracle revealed. Data: a partition of the configured dataset (simulation: node
config `partition-id`, `num-partitions`), or a site's own data (`data-root=DIR`, optionally
`dataset=NAME`, any format falkit reads: its whole train split is the pool, its test split
the evaluation data, its labels the simulated oracle).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from falkit import config as config_mod
from falkit.al.base import create as create_strategy
from falkit.data.federation import build
from falkit.data.sources import ImageDataset, load
from falkit.fl.algorithms import State
from falkit.fl.engine import Engine, ImageTensors, configure_process
from falkit.flower.common import (
    NUM_EXAMPLES,
    array_record,
    config_json,
    json_config,
    load_config,
    record_arrays,
    record_state,
    state_record,
)
from falkit.loop import client_models, global_outputs_fn, query_context, select
from falkit.oracle import SimulatedOracle
from falkit.seeding import rng, torch_generator

app = ClientApp()

POOLS, META = "falkit.pools", "falkit.meta"  # context.state: labeled indices/labels; tags
MODEL = "falkit.model."  # + name: client models kept between messages
FL_MEMORY = "falkit.fl_memory"  # the FL algorithm's client memory (SCAFFOLD's c_k)


class Site:
    """One client's data, engine, oracle and pools for the message at hand."""

    def __init__(self, context: Context):
        self.cfg, self.opts = load_config(dict(context.run_config))
        cfg, node = self.cfg, context.node_config
        self.context = context
        self.partition_id = int(node.get("partition-id", -1))
        if "data-root" in node:  # a real site: its own data, all of it
            ds = load(str(node.get("dataset", cfg.data.dataset)), str(node["data-root"]))
            self.pool = np.arange(len(ds.y_train), dtype=np.int64)
            self.num_train = len(ds.y_train)
            self.test = np.arange(len(ds.y_test), dtype=np.int64)
        else:  # simulation: this partition of the configured dataset
            data = build(cfg)
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
            bs, M = cfg.runtime.eval_batch, len(ds.y_test)
            blocks = [np.arange(j * bs, min((j + 1) * bs, M))
                      for j in range(-(-M // bs)) if j % K == self.partition_id]
            self.test = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)
        self.dataset: ImageDataset = ds
        self.num_classes = len(ds.classes)
        self.oracle = SimulatedOracle(ds.y_train)  # ground truth answers, audited
        pools = record_arrays(context.state[POOLS]) if POOLS in context.state else {}
        self.labeled = pools.get("labeled", np.zeros(0, dtype=np.int64)).astype(np.int64)
        self.known = np.full(len(ds.y_train), -1, dtype=np.int64)  # labels the oracle revealed
        if len(self.labeled):
            self.known[self.labeled] = pools["labels"]
            self.oracle.restore(self.labeled)
        self.strategy = create_strategy(cfg.strategy, **config_mod.strategy_options(cfg))
        configure_process(cfg)
        self.engine = Engine(cfg,
                             ImageTensors(ds.x_train, torch.as_tensor(self.known), ds.mean,
                                          ds.std, ds.hflip, ds.crop_pad),
                             ImageTensors(ds.x_test, torch.as_tensor(ds.y_test), ds.mean,
                                          ds.std),
                             self.num_classes, num_clients=1,
                             wrap_model=getattr(self.strategy, "wrap_model", None))
        self.device = self.engine.device  # where every received tensor goes

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


def _conf(msg: Message) -> dict[str, Any]:
    rec = msg.content["config"]
    return {k: config_json(rec, k) for k in rec}


def _reply(msg: Message, **records: Any) -> Message:
    return Message(RecordDict(records), reply_to=msg)


@app.query("info")
def info(msg: Message, context: Context) -> Message:
    """Pool size, data shape and test count; class counts only as simulation metrics."""
    site = Site(context)
    ds = site.dataset
    values = {"partition-id": site.partition_id, "pool": len(site.pool),
              "num-train": site.num_train, "num-classes": site.num_classes,
              "in-channels": int(ds.x_train.shape[1]), "image-size": int(ds.x_train.shape[2]),
              "test": len(site.test)}
    counts = np.bincount(ds.y_train[site.pool], minlength=site.num_classes).tolist()
    return _reply(msg, info=MetricRecord(values),
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
                                 torch.as_tensor(site.known, device=site.device), global_state,
                                 last)
    mine = {m: by_client[k] for m, by_client in models.items() if k in by_client}
    for n, s in mine.items():
        state[MODEL + n] = state_record(s)
    site.set_meta(models_cycle=cycle, models=list(mine), models_info=info.get(k, {}))
    return mine, info.get(k, {})


def _context(site: Site, conf: dict[str, Any], global_state: State):
    models, info = _models(site, conf, global_state)
    unl = np.setdiff1d(site.pool, site.labeled, assume_unique=True)
    return query_context(site.cfg, site.strategy, site.engine, conf["cycle"], conf["client"],
                         site.labeled, site.known[site.labeled], unl, site.num_classes,
                         global_state, models, global_outputs_fn(site.engine, global_state),
                         info)


@app.query("stats")
def stats(msg: Message, context: Context) -> Message:
    """Phase A of a two-phase strategy: only its declared scalars leave (FairFAL: γ_k)."""
    site = Site(context)
    conf = _conf(msg)
    site.strategy.load_state_dict(conf["strategy"])
    ctx = _context(site, conf, record_state(msg.content["global"], site.device))
    values = site.strategy.client_stats(ctx) or {}
    return _reply(msg, stats=MetricRecord({k: float(v) for k, v in values.items()}))


@app.query("select")
def select_(msg: Message, context: Context) -> Message:
    """Cycle 0: the initial random labels; later: the strategy's query. The oracle answers
    here; the server learns the counts (and, as simulation metrics, the record)."""
    site = Site(context)
    conf = _conf(msg)
    cycle, k, budget = conf["cycle"], conf["client"], conf["budget"]
    y = site.dataset.y_train
    if cycle == 0:  # b_k labels uniformly at random from the pool (ALGORITHMS.md §1)
        picks = np.sort(rng(site.cfg.seed, "initial_labels", k).choice(
            site.pool, size=budget, replace=False))
        record = {"cycle": 0, "client": k, "strategy": "initial_random"}
        diag: dict[str, Any] = {}
    else:
        ctx = _context(site, conf, record_state(msg.content["global"], site.device))
        if conf.get("two_phase"):
            # replay phase A on the same keyed RNG: the context reaches exactly the state the
            # in-process loop queries from (FairFAL's d_k, its B_k draws)
            site.strategy.load_state_dict(conf["strategy"])
            site.strategy.client_stats(ctx)
            site.strategy.load_state_dict(conf["strategy_after"])
            ctx.server = dict(conf["server"])
        picks, diag = select(site.strategy, ctx, budget)
        record = {"cycle": cycle, "client": k, "strategy": site.strategy.id}
    labels = site.oracle.label(k, picks)
    site.labeled = np.union1d(site.labeled, picks).astype(np.int64)
    site.known[picks] = labels
    site.oracle.audit(min(budget * (cycle + 1), len(site.pool)))
    site.save_pools()
    record.update({"indices": np.asarray(picks).tolist(), "labels": labels.tolist()})
    record.update(diag)
    queried = np.bincount(y[picks], minlength=site.num_classes).tolist()
    return _reply(msg, query=MetricRecord({"labeled": len(site.labeled), "queried": len(picks)}),
                  **site.diagnostics(record=record, **{"queried-classes": queried}))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local update from the global weights with the run's FL algorithm:
    `Engine.train_client`, as `Engine.fl_round` runs it for each client in process."""
    site = Site(context)
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
    objectives = (site.strategy.local_objectives(engine, global_state, [site.labeled],
                                                 site.known, [site.pool], r)
                  if hasattr(site.strategy, "local_objectives") else None)
    client = engine.train_client(engine.model, global_state, k, site.labeled, lr,
                                 torch_generator(cfg.seed, "train", cycle, r, k),
                                 progress=progress,
                                 objective=objectives(0) if objectives else None)
    arrays, scalars = algo.uplink(client)
    context.state[FL_MEMORY] = state_record(algo.client_memory(client))
    if conf.get("keep_last"):  # the `last_round` local model of this cycle
        context.state[MODEL + "last_round"] = state_record(client.state)
    site.set_meta(fl_generation=conf["generation"],
                  **({"last_round_cycle": cycle} if conf.get("keep_last") else {}))
    records: dict[str, Any] = {
        "model": state_record(client.state),
        "metrics": MetricRecord({NUM_EXAMPLES: len(site.labeled), **scalars})}
    if algo.uplink_arrays:
        records["uplink"] = state_record(arrays)
    return _reply(msg, **records)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Per-class correct and total counts of the global model on this client's test data."""
    site = Site(context)
    state = record_state(msg.content["global"], site.device)
    C = site.num_classes
    y = site.dataset.y_test[site.test]
    if len(site.test):
        probs, _ = site.engine.predict(state, site.test, split="test")
        pred = probs.argmax(1).cpu().numpy()
    else:
        pred = np.zeros(0, dtype=np.int64)
    correct = np.bincount(y[pred == y], minlength=C).tolist()
    total = np.bincount(y, minlength=C).tolist()
    return _reply(msg, eval=MetricRecord({"correct": correct, "total": total}))

