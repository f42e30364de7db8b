"""One client site: what a client does with its pool, its oracle and its budget, written once
for both transports (issue 26). `InProcessFederation` holds one `ClientSite` per client (all
sharing the run's engine and oracle); a Flower ClientApp holds its own. A site reveals the
labels its oracle gives (to the labels it queries and trains with), counts "unsure" answers
as spent, keeps the budget its oracle is audited against, queries with a strategy and makes
the queries.jsonl record and the reply the server may see.

Cycle 0 is a strategy's `initial_passes` (`Strategy.initial_pass` on each site, the server's
`Strategy.initial_down` between passes); `initial_queried` turns every pass's replies into
the driver's `Queried`, the same on both transports.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from falkit.al.base import QueryContext, Strategy
from falkit.client import query_context
from falkit.config import Config
from falkit.driver import Queried
from falkit.oracle import UNSURE, LabelsPending, SimulatedOracle, WaitingForLabels


@dataclass
class Inputs:
    """What a site's engine trains and infers on instead of the dataset's images
    (`Strategy.engine_inputs`): falkit.fl.engine.ImageTensors of the train and test split,
    what the strategy's passes need of them (`extras`: FAST's embeddings) and the seconds its
    phases took (`times`: FAST's encode)."""

    train: Any
    test: Any
    extras: dict[str, Any] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)


@dataclass
class Reply:
    """What one client's query or initial pass gives the server: its queries.jsonl record
    (on Flower only as simulation metrics), the histogram of the classes its oracle
    answered (likewise), its counts and declared scalars (`values`: "labeled" = its labeled
    pool, "queried" = the samples it asked for), declared arrays (`up`: record -> name ->
    array, `Strategy.initial_uploads`) and simulation-only diagnostics (`diag`)."""

    record: dict[str, Any]
    classes: np.ndarray | None
    values: dict[str, float]
    up: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    diag: dict[str, Any] = field(default_factory=dict)


@dataclass
class Down:
    """What the server sends one client for its next initial pass: arrays by record (FAST's
    shared bank) and JSON-able values (FAST's refinement budget b_k)."""

    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)


class ClientSite:
    """Client `k`: its pool, the labels its oracle revealed, its budget (per cycle) and what
    its oracle may have revealed by now (`allowed`, audited). `known` (labels by train
    index, −1 where none) and the engine's `train_y` may be shared with other sites (in
    process): a site writes only its own pool's entries."""

    def __init__(self, cfg: Config, k: int, pool: np.ndarray, num_classes: int,
                 oracle: SimulatedOracle, known: np.ndarray, engine: Any, budget: int = 0,
                 truth: np.ndarray | None = None, extras: dict[str, Any] | None = None):
        self.cfg, self.k, self.pool, self.num_classes = cfg, k, pool, num_classes
        self.oracle, self.known, self.engine = oracle, known, engine
        self.budget = budget
        # the simulated oracle's answers, read only for simulation metrics (FAST's weak-label
        # accuracy); None where people answer
        self.truth = truth
        self.extras = dict(extras or {})  # Inputs.extras (FAST: embeddings), its own copy
        self.labeled = np.zeros(0, dtype=np.int64)  # what it trains on
        self.unsure = 0  # "unsure" answers so far: spent budget that labeled nothing
        self.allowed = 0  # the labels its oracle may have revealed by now (the audit's)

    def reveal(self, idx: np.ndarray, labels: np.ndarray) -> None:
        """Labels become what the client queries and trains with."""
        self.known[idx] = labels
        dev = self.engine.device
        self.engine.train_y[torch.as_tensor(idx, device=dev)] = torch.as_tensor(labels,
                                                                                device=dev)

    def ask(self, picks: np.ndarray, cycle: int) -> np.ndarray:
        """The oracle answers `picks` (LabelsPending while people have not answered them
        all); the answered samples join the labeled pool, an "unsure" one stays unlabeled
        and counts as spent."""
        picks = np.asarray(picks, dtype=np.int64)
        labels = self.oracle.label(self.k, picks, cycle)
        got = labels != UNSURE
        self.unsure += int((~got).sum())
        self.reveal(picks[got], labels[got])
        self.labeled = np.union1d(self.labeled, picks[got]).astype(np.int64)
        return labels

    def spend(self, cycle: int) -> None:
        """The budget after `cycle`: b_k per cycle, at most the pool (ALGORITHMS.md §1)."""
        self.allowed = min(self.budget * (cycle + 1), len(self.pool))

    def unlabeled(self) -> np.ndarray:
        return np.setdiff1d(self.pool, self.labeled, assume_unique=True)

    def reply(self, cycle: int, what: str, picks: np.ndarray, labels: np.ndarray,
              **diagnostics: Any) -> Reply:
        """The Reply of a query (or pass) named `what` that asked for `picks` and got
        `labels`; `diagnostics` go into its record."""
        record = {"cycle": cycle, "client": self.k, "strategy": what,
                  "indices": np.asarray(picks).tolist(), "labels": np.asarray(labels).tolist()}
        record.update(diagnostics)
        answered = labels[labels != UNSURE]
        return Reply(record, np.bincount(answered, minlength=self.num_classes),
                     {"labeled": len(self.labeled), "queried": len(picks)})

    def context(self, strategy: Strategy, cycle: int, global_state: Any,
                models: dict[str, Any], global_outputs: Any,
                model_info: dict[str, Any]) -> QueryContext:
        """This client's QueryContext of `cycle` (falkit.client.query_context)."""
        return query_context(self.cfg, strategy, self.engine, cycle, self.k, self.labeled,
                             self.known[self.labeled], self.unlabeled(), self.num_classes,
                             global_state, models, global_outputs, model_info)

    def query(self, strategy: Strategy, ctx: QueryContext, cycle: int) -> Reply:
        """The strategy's query of this cycle, answered by the oracle."""
        strategy.clear_diagnostics()
        picks = strategy.query(ctx, self.budget)
        diagnostics = dict(strategy.diagnostics())
        labels = self.ask(picks, cycle)
        self.spend(cycle)
        return self.reply(cycle, strategy.id, picks, labels, **diagnostics)


def test_share(num_test: int, batch: int, k: int, num_clients: int) -> np.ndarray:
    """Client k's share of a shared test set (simulation): the blocks of `batch`
    (runtime.eval_batch) dealt round-robin, so the shares cover it once."""
    blocks = [np.arange(j * batch, min((j + 1) * batch, num_test))
              for j in range(-(-num_test // batch)) if j % num_clients == k]
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)


def audit(oracle: SimulatedOracle, sites: list[ClientSite]) -> None:
    """The oracle revealed exactly what the sites' budgets allow so far, no more, no less."""
    oracle.audit(sum(s.allowed for s in sites))


def initial_queried(cfg: Config, strategy: Strategy, passes: list[dict[int, Reply]]
                    ) -> Queried:
    """Cycle 0's Queried from every pass's replies (pass -> client -> Reply): the records by
    client, its passes in order; the classes answered (None where the server may not know
    them); what the strategy reports of the passes."""
    clients = sorted({k for replies in passes for k in replies})
    records = [replies[k].record for k in clients for replies in passes if k in replies]
    hists = [r.classes for replies in passes for r in replies.values()]
    classes = (np.sum(hists, axis=0) if hists and all(h is not None for h in hists)
               else None)
    return Queried(records, classes, extra=strategy.initial_extra(cfg, passes))


def initial_passes(cfg: Config, strategy: Strategy, sites: list[ClientSite],
                   oracle: SimulatedOracle) -> list[dict[int, Reply]]:
    """Cycle 0 in process: every pass of the strategy on every site (a central pass on all
    at once), the oracle audited after each, the server's `initial_down` between them;
    the replies by pass and client. Raises WaitingForLabels once every site has asked."""
    names = strategy.initial_passes
    pools = {s.k: len(s.pool) for s in sites}
    downs = {s.k: Down() for s in sites}
    passes: list[dict[int, Reply]] = []
    for p in range(len(names)):
        if strategy.central_pass(cfg, p):
            got = strategy.initial_central(cfg, sites, p)
        else:
            got, pending = {}, []
            for s in sites:
                try:
                    got[s.k] = strategy.initial_pass(cfg, s, p, downs[s.k])
                except LabelsPending as e:  # the others still ask: every queue is written
                    pending.append(e)
            if pending:
                raise WaitingForLabels(pending)
        audit(oracle, sites)
        passes.append(got)
        if p + 1 < len(names):
            downs = strategy.initial_down(cfg, p, got, pools)
    return passes


def image_inputs(cfg: Config, ds: Any) -> Inputs:
    """The dataset's images, normalised as `data.normalization` says, augmented as it
    declares (hflip, crop_pad) in training."""
    from falkit.data.sources import normalization
    from falkit.fl.engine import ImageTensors

    mean, std = normalization(ds, cfg.data.normalization)
    return Inputs(ImageTensors(ds.x_train, torch.as_tensor(ds.y_train), mean, std, ds.hflip,
                               ds.crop_pad),
                  ImageTensors(ds.x_test, torch.as_tensor(ds.y_test), mean, std))


def embedding_inputs(z_train: np.ndarray, y_train: np.ndarray, z_test: np.ndarray,
                     y_test: np.ndarray, extras: dict[str, Any] | None = None,
                     times: dict[str, float] | None = None) -> Inputs:
    """Embeddings (N×D float) as the engine's inputs: N×D×1×1 tensors with mean 0 and std
    1/255, so the engine's normalisation (x/255 − mean)/std is the identity, and no
    augmentation."""
    from falkit.fl.engine import ImageTensors

    d = z_train.shape[1]
    ident = ((0.0,) * d, (1 / 255,) * d)
    return Inputs(ImageTensors(torch.as_tensor(z_train).view(-1, d, 1, 1),
                               torch.as_tensor(y_train), *ident),
                  ImageTensors(torch.as_tensor(z_test).view(-1, d, 1, 1),
                               torch.as_tensor(y_test), *ident), dict(extras or {}),
                  dict(times or {}))


def frozen_inputs(cfg: Config, full: Any, ds: Any, rows: np.ndarray) -> Inputs:
    """`model.backbone = "frozen:<encoder>"`: the encoder's embeddings of this site's train
    split (rows `rows` of the loaded dataset `full`) and of the test split, computed here
    and cached on this site's disk ($FALKIT_CACHE or ~/.cache/falkit), never sent anywhere.
    The full splits are embedded (one cache entry for every seed and partition); under
    feature shift (partition.shift) the site's own shifted images."""
    from falkit.models import encoders
    from falkit.models.backbones import FROZEN

    enc = encoders.create(cfg.model.backbone[len(FROZEN):], batch_size=cfg.model.encode_batch,
                          device=cfg.runtime.device)
    src = full if cfg.partition.shift == "none" else ds
    z, _ = encoders.embed_splits(enc, src, ("train", "test"))
    z_train = z["train"][rows] if src is full else z["train"]
    return embedding_inputs(z_train, ds.y_train, z["test"], ds.y_test)


def site_engine(cfg: Config, strategy: Strategy, full: Any, ds: Any, rows: np.ndarray,
                num_clients: int, train_y: torch.Tensor | None = None,
                engine_class: type | None = None) -> tuple[Any, Inputs]:
    """The engine of a site (in process: of every client) holding the train split `ds`
    (rows `rows` of the loaded dataset `full`): on the strategy's inputs or the images, with
    the strategy's training recipe and local steps (FAST's), its model wrapper (ll4al's),
    and `train_y` as its train labels (default: the dataset's). Its Inputs too."""
    from falkit.fl.engine import Engine
    from falkit.models.backbones import is_frozen

    inputs = strategy.engine_inputs(cfg, full, ds, rows)
    if inputs is None:  # a frozen encoder's embeddings, or the images
        inputs = (frozen_inputs(cfg, full, ds, rows) if is_frozen(cfg.model.backbone)
                  else image_inputs(cfg, ds))
    # the engine's own labels (the sites reveal into them): never the dataset's array itself
    train = dataclasses.replace(inputs.train,
                                y=inputs.train.y.clone() if train_y is None else train_y)
    engine = (engine_class or Engine)(strategy.training(cfg), train, inputs.test,
                                      len(ds.classes), num_clients=num_clients,
                                      wrap_model=strategy.wrap_model)
    engine.local_steps = strategy.local_steps(cfg)
    return engine, inputs
