"""The in-process federation: every client's pools, oracle and query in this process, trained
by one `Engine` (DESIGN.md §3). `falkit.driver.run` drives it exactly as it drives the Flower
ServerApp's federation; `falkit.loop.run` builds it from a config."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from falkit.al.base import QueryContext, Strategy
from falkit.client import client_models, global_outputs_fn, train_hooks
from falkit.config import Config
from falkit.data.federation import FederatedData, client_budgets
from falkit.driver import Queried, to_device
from falkit.fl.algorithms import State
from falkit.fl.engine import Engine
from falkit.metrics import Evaluation, evaluation
from falkit.oracle import UNSURE, LabelsPending, SimulatedOracle, WaitingForLabels
from falkit.site import ClientSite, audit, initial_passes, initial_queried, test_share


class InProcessFederation:
    transport = "in_process"

    def __init__(self, cfg: Config, strategy: Strategy, data: FederatedData, engine: Engine,
                 oracle: SimulatedOracle | None = None, extras: dict[str, Any] | None = None,
                 times: dict[str, float] | None = None):
        """`extras`: what the strategy's engine inputs gave its passes (FAST: embeddings);
        `times`: seconds of phases before cycle 0, reported with it (FAST: data, encode)."""
        self.cfg, self.strategy, self.data, self.engine = cfg, strategy, data, engine
        self.y = data.dataset.y_train  # the simulated oracle's answers
        self.oracle = oracle or SimulatedOracle(self.y)
        # the labels the oracle gave (-1 where none): what the clients train and query with
        self.known = np.full(len(self.y), UNSURE, dtype=np.int64)
        self.budgets = client_budgets(cfg, data)
        self.num_clients = len(data.clients)
        self.num_classes = data.num_classes
        self.num_train = data.num_train
        self.algorithm = engine.algorithm
        self.device = engine.device
        truth = None if cfg.oracle == "human" else self.y
        self.sites = [ClientSite(cfg, k, pool, data.num_classes, self.oracle, self.known,
                                 engine, self.budgets[k], truth, extras)
                      for k, pool in enumerate(data.clients)]
        # each client's model after its last local update of the last cycle (last_round mode)
        self.last_round: dict[int, State] = {}
        self._contexts: list[QueryContext] = []
        self._times = dict(times or {})

    @property
    def labeled(self) -> list[np.ndarray]:
        return [s.labeled for s in self.sites]

    @property
    def unsure(self) -> int:
        """"unsure" answers so far: spent budget that labeled nothing."""
        return sum(s.unsure for s in self.sites)

    def partition(self) -> tuple[np.ndarray, list[str]]:
        return self.data.partition_counts(), self.data.dataset.classes

    def initial_state(self, cycle: int) -> State:
        state = self.engine.init_state(self.cfg.seed, cycle)
        self.algorithm.reset()  # e.g. SCAFFOLD's control variates belong to the old model
        return state

    def labeled_counts(self) -> dict[int, int]:
        return {k: len(lab) for k, lab in enumerate(self.labeled)}

    def initial_labels(self) -> Queried:
        out = initial_queried(self.cfg, self.strategy,
                              initial_passes(self.cfg, self.strategy, self.sites, self.oracle))
        out.times = dict(self._times)
        return out

    def prepare_query(self, cycle: int, global_state: State) -> float:
        """Every client's QueryContext; the client models are trained here (all clients at
        once, concurrently when runtime.workers > 1)."""
        cfg, engine = self.cfg, self.engine
        t = time.perf_counter()
        # only labeled[k] is read from these labels: the ones the oracle revealed; handed
        # over on the engine's device (its training indexes them there)
        models, distill_info = client_models(cfg, self.strategy, engine, cycle,
                                             dict(enumerate(self.labeled)),
                                             torch.as_tensor(self.known, device=engine.device),
                                             global_state, self.last_round)
        local_s = time.perf_counter() - t
        shared = global_outputs_fn(engine, global_state)
        personal = bool(self.algorithm.local_keys(engine.model))  # FedBN: each its own view
        self._contexts = []
        for site in self.sites:
            own = self.algorithm.personal(global_state, site.k) if personal else global_state
            self._contexts.append(site.context(
                self.strategy, cycle, own,
                {m: by_client[site.k] for m, by_client in models.items() if site.k in by_client},
                global_outputs_fn(engine, own) if personal else shared,
                distill_info.get(site.k, {})))
        return local_s

    def query_stats(self, cycle: int, global_state: State) -> list[dict[str, float]]:
        for ctx in self._contexts:  # phase A; what it keeps stays with the client's context
            ctx.phase_a = self.strategy.client_stats(ctx)
        return [ctx.phase_a.stats for ctx in self._contexts if ctx.phase_a is not None]

    def select(self, cycle: int, global_state: State, server: dict[str, float] | None,
               advance) -> Queried:
        replies, pending = [], []
        for site, ctx in zip(self.sites, self._contexts, strict=True):
            if server is not None:
                ctx.server = dict(server)
            try:
                replies.append(site.query(self.strategy, ctx, cycle))
            except LabelsPending as p:
                pending.append(p)
            advance()
        self._contexts = []
        if pending:
            raise WaitingForLabels(pending)
        audit(self.oracle, self.sites)
        return Queried([r.record for r in replies],
                       np.sum([r.classes for r in replies], axis=0) if replies
                       else np.zeros(self.num_classes, dtype=np.int64))

    def begin_training(self, cycle: int, keep_last: bool) -> None:
        if keep_last:
            self.last_round = {}  # this cycle's: each client's model after its last update

    def train_round(self, cycle: int, r: int, global_state: State, clients: list[int],
                    lr: float, keep_last: bool) -> State:
        hooks = train_hooks(self.strategy, self.engine, global_state, r, self.cfg.fl.rounds,
                            self.labeled, self.known, self.data.clients)
        state, kept = self.engine.fl_round(global_state, clients, self.labeled, lr,
                                           self.cfg.seed, (cycle, r), keep_states=keep_last,
                                           **hooks)
        self.last_round.update(kept)  # with fl.fraction < 1 a client's last update may be earlier
        return state

    def evaluate(self, state: State, final: bool, cycle: int) -> Evaluation:
        if not self.algorithm.local_keys(self.engine.model):
            return self.engine.evaluate(state)
        # each client's own model on its share of the test set (FedBN), as on Flower
        y = self.engine.test_y.cpu().numpy()
        probs = np.zeros((len(y), self.num_classes), dtype=np.float32)
        for k in range(self.num_clients):
            share = test_share(len(y), self.cfg.runtime.eval_batch, k, self.num_clients)
            if len(share):
                probs[share] = self.engine.predict(self.algorithm.personal(state, k), share,
                                                   split="test")[0].numpy()
        return evaluation(y, probs, self.num_classes)

    def state_dict(self) -> dict[str, Any]:
        # the oracle's labels too: a resumed run trains on exactly what this one used
        return {"labeled": self.labeled, "last_round": self.last_round,
                "labels": [self.known[lab] for lab in self.labeled], "unsure": self.unsure,
                "unsure_by_client": [s.unsure for s in self.sites]}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        for site, lab in zip(self.sites, checkpoint["labeled"], strict=True):
            site.labeled = np.asarray(lab, dtype=np.int64)
        self.last_round = to_device(checkpoint["last_round"], self.device)
        revealed = np.concatenate(self.labeled)
        labels = None
        if "labels" in checkpoint:  # the labels the run used, as it used them
            unsure = int(checkpoint.get("unsure", 0))
            labels = np.concatenate([np.asarray(x, dtype=np.int64)
                                     for x in checkpoint["labels"]])
        else:  # a checkpoint from before the labels were saved in it
            unsure = self.oracle.unsure_before(checkpoint["cycle"])
        by_client = checkpoint.get("unsure_by_client") or [unsure] + [0] * (len(self.sites) - 1)
        for site, n in zip(self.sites, by_client, strict=True):
            site.unsure = int(n)
        for site in self.sites:  # the budget so far, as the audit after that cycle had it
            site.spend(int(checkpoint["cycle"]))
        self.oracle.restore(revealed, spent=unsure, labels=labels)
        for site in self.sites:
            site.reveal(site.labeled, self.oracle.answers(site.labeled))
