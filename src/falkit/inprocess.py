"""The in-process federation: every client's pools, oracle and query in this process, trained
by one `Engine` (DESIGN.md §3). `falkit.driver.run` drives it exactly as it drives the Flower
ServerApp's federation; `falkit.loop.run` builds it from a config."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from falkit.al.base import QueryContext, Strategy
from falkit.client import (
    client_models,
    global_outputs_fn,
    initial_picks,
    query_context,
    select,
    train_hooks,
)
from falkit.config import Config
from falkit.data.federation import FederatedData, client_budgets
from falkit.driver import Queried, to_device
from falkit.fl.algorithms import State
from falkit.fl.engine import Engine
from falkit.metrics import Evaluation
from falkit.oracle import (
    UNSURE,
    LabelsPending,
    SimulatedOracle,
    WaitingForLabels,
)


class InProcessFederation:
    transport = "in_process"

    def __init__(self, cfg: Config, strategy: Strategy, data: FederatedData, engine: Engine,
                 oracle: SimulatedOracle | None = None,
                 initial_labels: Callable[[InProcessFederation], Queried] | None = None):
        """`initial_labels`: cycle 0's labeling in place of the random draw (FAST's two
        passes, `falkit.fast`)."""
        self.cfg, self.strategy, self.data, self.engine = cfg, strategy, data, engine
        self.y = data.dataset.y_train  # the simulated oracle's answers (and FAST's report)
        self.oracle = oracle or SimulatedOracle(self.y)
        # the labels the oracle gave (-1 where none): what the clients train and query with
        self.known = np.full(len(self.y), UNSURE, dtype=np.int64)
        self.budgets = client_budgets(cfg, data)
        self.num_clients = len(data.clients)
        self.num_classes = data.num_classes
        self.num_train = data.num_train
        self.algorithm = engine.algorithm
        self.device = engine.device
        self.labeled: list[np.ndarray] = [np.zeros(0, dtype=np.int64) for _ in data.clients]
        # each client's model after its last local update of the last cycle (last_round mode)
        self.last_round: dict[int, State] = {}
        self._contexts: list[QueryContext] = []
        self._initial = initial_labels
        self.unsure = 0  # "unsure" answers so far: spent budget that labeled nothing

    def partition(self) -> tuple[np.ndarray, list[str]]:
        return self.data.partition_counts(), self.data.dataset.classes

    def initial_state(self, cycle: int) -> State:
        state = self.engine.init_state(self.cfg.seed, cycle)
        self.algorithm.reset()  # e.g. SCAFFOLD's control variates belong to the old model
        return state

    def labeled_counts(self) -> dict[int, int]:
        return {k: len(lab) for k, lab in enumerate(self.labeled)}

    def _audit(self, cycle: int) -> None:
        """The oracle must have revealed exactly the budget so far, no more, no less."""
        self.oracle.audit(sum(min(b * (cycle + 1), len(pool))
                              for b, pool in zip(self.budgets, self.data.clients, strict=True)))

    def initial_labels(self) -> Queried:
        if self._initial is not None:
            return self._initial(self)
        records, answers, pending = [], [], []
        for k, pool in enumerate(self.data.clients):
            pick = initial_picks(self.cfg, k, pool, self.budgets[k])
            labels = self._ask(k, pick, 0, pending)
            if labels is None:
                continue
            records.append({"cycle": 0, "client": k, "strategy": "initial_random",
                            "indices": pick.tolist(), "labels": labels.tolist()})
            answers.append(labels)
        if pending:
            raise WaitingForLabels(pending)
        self._audit(0)
        return Queried(records, self._histogram(answers))

    def _ask(self, k: int, picks: np.ndarray, cycle: int, pending: list[LabelsPending]
             ) -> np.ndarray | None:
        """Client k's oracle answers `picks` (None while people have not answered them all,
        noted in `pending`); the answered samples join its labeled pool ("unsure" ones stay
        unlabeled)."""
        try:
            labels = self.oracle.label(k, picks, cycle)
        except LabelsPending as p:
            pending.append(p)
            return None
        got = labels != UNSURE
        self.unsure += int((~got).sum())  # spent, not labeled (checkpointed)
        self._reveal(picks[got], labels[got])
        self.labeled[k] = np.union1d(self.labeled[k], picks[got])
        return labels

    def _reveal(self, idx: np.ndarray, labels: np.ndarray) -> None:
        """The oracle's labels become what the clients query and train with."""
        self.known[idx] = labels
        dev = self.engine.device
        self.engine.train_y[torch.as_tensor(idx, device=dev)] = torch.as_tensor(labels,
                                                                                 device=dev)

    def _histogram(self, answers: list[np.ndarray]) -> np.ndarray:
        """The classes the oracle answered (an "unsure" counts in none)."""
        labels = np.concatenate(answers) if answers else np.zeros(0, dtype=np.int64)
        return np.bincount(labels[labels != UNSURE], minlength=self.num_classes)

    def prepare_query(self, cycle: int, global_state: State) -> float:
        """Every client's QueryContext; the client models are trained here (all clients at
        once, concurrently when runtime.workers > 1)."""
        cfg, engine, data = self.cfg, self.engine, self.data
        t = time.perf_counter()
        # only labeled[k] is read from these labels: the ones the oracle revealed; handed
        # over on the engine's device (its training indexes them there)
        models, distill_info = client_models(cfg, self.strategy, engine, cycle,
                                             dict(enumerate(self.labeled)),
                                             torch.as_tensor(self.known, device=engine.device),
                                             global_state, self.last_round)
        local_s = time.perf_counter() - t
        global_outputs = global_outputs_fn(engine, global_state)
        self._contexts = []
        for k, lab in enumerate(self.labeled):
            unl = np.setdiff1d(data.clients[k], lab, assume_unique=True)
            self._contexts.append(query_context(
                cfg, self.strategy, engine, cycle, k, lab, self.known[lab], unl, data.num_classes,
                global_state, {m: by_client[k] for m, by_client in models.items()
                               if k in by_client}, global_outputs, distill_info.get(k, {})))
        return local_s

    def query_stats(self, cycle: int, global_state: State) -> list[dict[str, float]]:
        for ctx in self._contexts:  # phase A; what it keeps stays with the client's context
            ctx.phase_a = self.strategy.client_stats(ctx)
        return [ctx.phase_a.stats for ctx in self._contexts if ctx.phase_a is not None]

    def select(self, cycle: int, global_state: State, server: dict[str, float] | None,
               advance) -> Queried:
        records, answers, pending = [], [], []
        for k, ctx in enumerate(self._contexts):
            if server is not None:
                ctx.server = dict(server)
            picks, diagnostics = select(self.strategy, ctx, self.budgets[k])
            labels = self._ask(k, picks, cycle, pending)
            advance()
            if labels is None:
                continue
            record = {"cycle": cycle, "client": k, "strategy": self.strategy.id,
                      "indices": picks.tolist(), "labels": labels.tolist()}
            record.update(diagnostics)
            records.append(record)
            answers.append(labels)
        self._contexts = []
        if pending:
            raise WaitingForLabels(pending)
        self._audit(cycle)
        return Queried(records, self._histogram(answers))

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
        return self.engine.evaluate(state)

    def state_dict(self) -> dict[str, Any]:
        # the oracle's labels too: a resumed run trains on exactly what this one used
        return {"labeled": self.labeled, "last_round": self.last_round,
                "labels": [self.known[lab] for lab in self.labeled], "unsure": self.unsure}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        self.labeled = list(checkpoint["labeled"])
        self.last_round = to_device(checkpoint["last_round"], self.device)
        revealed = np.concatenate(self.labeled)
        labels = None
        if "labels" in checkpoint:  # the labels the run used, as it used them
            self.unsure = int(checkpoint.get("unsure", 0))
            labels = np.concatenate([np.asarray(x, dtype=np.int64)
                                     for x in checkpoint["labels"]])
        else:  # a checkpoint from before the labels were saved in it
            self.unsure = self.oracle.unsure_before(checkpoint["cycle"])
        self.oracle.restore(revealed, spent=self.unsure, labels=labels)
        self._reveal(revealed, self.oracle.answers(revealed))
