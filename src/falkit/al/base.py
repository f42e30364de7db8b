"""The query-strategy contract (DESIGN.md §2): `Strategy.query(ctx, budget)` returns exactly
min(budget, |U|) distinct indices of the client's unlabeled pool.

A strategy sees only its client's data, through a `QueryContext` whose model outputs are
computed lazily, in large batches, once per cycle per client, and then reused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from falkit.config import Config
from falkit.errors import ConfigError
from falkit.seeding import rng

# (model, indices) -> (probs N×C, features N×D) for "global" or "local"
Infer = Callable[[str, np.ndarray], tuple[torch.Tensor, torch.Tensor]]
# model -> its state dict ("global" or "local"), read-only
Weights = Callable[[str], dict[str, torch.Tensor]]


@dataclass
class PhaseA:
    """What phase A of a two-phase strategy gives (`Strategy.client_stats`): `stats` leave
    the client (only the names in `server_stats`, audited on Flower); `kept` stays on the
    client and is handed to its `select` through `QueryContext.phase_a` (JSON-able values:
    a Flower ClientApp keeps them in its node state between the two messages)."""

    stats: dict[str, float]
    kept: dict[str, object] = field(default_factory=dict)


@dataclass
class QueryContext:
    """Everything client `client_id` may use when it queries in cycle `cycle`."""

    client_id: int
    cycle: int
    labeled: np.ndarray  # sorted train indices with known labels
    labeled_y: np.ndarray  # their labels (from the oracle)
    unlabeled: np.ndarray  # sorted train indices of the unlabeled pool
    num_classes: int
    rng: np.random.Generator
    infer: Infer
    weights: Weights | None = None
    server: dict[str, float] = field(default_factory=dict)  # what server_reduce broadcast
    phase_a: PhaseA | None = None  # this client's phase A (two-phase strategies)
    # the loss-prediction module's scores (ll4al): (model, indices) -> predicted loss
    predicted_loss: Callable[[str, np.ndarray], torch.Tensor] | None = None
    # what training the client's models reported (IFAL's distillation epochs and loss)
    model_info: dict[str, object] = field(default_factory=dict)
    # the extra model outputs the strategy declared (`Strategy.outputs`), each from its
    # provider in `falkit.client.PROVIDERS`: name -> (model, indices) -> tensor
    provided: dict[str, Callable[[str, np.ndarray], torch.Tensor]] = field(
        default_factory=dict)
    _cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False)

    def outputs(self, model: str, subset: str = "unlabeled") -> tuple[torch.Tensor, torch.Tensor]:
        """(probs, features) of `model` ("global" | "local") on `subset` ("unlabeled" |
        "labeled"). Both subsets are inferred in one batched pass and cached."""
        if (model, subset) not in self._cache:
            pool = np.concatenate([self.unlabeled, self.labeled])
            probs, feats = self.infer(model, pool)
            nu = len(self.unlabeled)
            self._cache[(model, "unlabeled")] = (probs[:nu], feats[:nu])
            self._cache[(model, "labeled")] = (probs[nu:], feats[nu:])
        return self._cache[(model, subset)]

    def probs(self, model: str, subset: str = "unlabeled") -> torch.Tensor:
        return self.outputs(model, subset)[0]

    def features(self, model: str, subset: str = "unlabeled") -> torch.Tensor:
        return self.outputs(model, subset)[1]

    def head(self, model: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) of the model's last linear layer (`classifier`: features -> logits)."""
        if self.weights is None:
            raise RuntimeError("this QueryContext carries no model weights")
        state = self.weights(model)
        return state["classifier.weight"].float(), state["classifier.bias"].float()


class Strategy:
    """Base class. Subclasses set `name`, `description` and implement `select`, returning
    positions into `ctx.unlabeled`; `query` maps them to indices and enforces the contract."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    uses_selector: ClassVar[bool] = False  # takes @G / @L
    local_model_mode: ClassVar[str | None] = None  # None: the config's local_model.mode
    # the names of the scalars client_stats sends the server (DESIGN.md §8: audited)
    server_stats: ClassVar[tuple[str, ...]] = ()
    # a query in every cycle (the query contract below); False: FAST's one-shot passes
    per_cycle: ClassVar[bool] = True
    # cycle 0's labeling: the name (queries.jsonl's "strategy") of each of its passes; the
    # default is one pass of random labels (ALGORITHMS.md §1), FAST's are its two
    initial_passes: ClassVar[tuple[str, ...]] = ("initial_random",)
    # what a client of an initial pass may send beyond its counts (audited on Flower): the
    # names of its scalars, and its arrays by record -> {array: ndim} (every array of a
    # record has the same number of rows: FAST's labeled-embedding bank, z: n × d, y: n)
    initial_values: ClassVar[tuple[str, ...]] = ()
    initial_uploads: ClassVar[dict[str, dict[str, int]]] = {}
    # model outputs beyond probabilities, features and weights that `select` reads, by name
    # of their provider in `falkit.client.PROVIDERS` ("predicted_loss": ll4al's module);
    # the client computes only what is declared, and they reach `select` in `ctx.provided`
    outputs: ClassVar[tuple[str, ...]] = ()
    # settings beyond the defaults that any run of this strategy needs (bald:
    # {"model.dropout": "0.5"}), as key=value: falkit's own test suites and examples use them
    example_settings: ClassVar[dict[str, str]] = {}

    def __init__(self, at: str | None = None, **options: object):
        """`at` is the @G / @L suffix of the strategy id; `options` its config section."""
        if self.uses_selector:
            at = at or "G"
            if at not in ("G", "L"):
                raise ConfigError(f"selector must be @G or @L, got @{at}")
        elif at is not None:
            raise ConfigError(f"strategy '{self.name}' takes no @{at} selector")
        self.selector = at
        self.options = options
        self._diag: dict[str, object] = {}

    @property
    def id(self) -> str:
        return f"{self.name}@{self.selector}" if self.selector else self.name

    @property
    def query_model(self) -> str:
        return "local" if self.selector == "L" else "global"

    @property
    def needs_local_model(self) -> bool:
        return self.selector == "L"

    # its options: a dataclass (falkit.options) whose fields are the config section named
    # after the strategy ([fairfal], ...) and the keyword options of its constructor
    options: ClassVar[type | None] = None

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Reject, with a one-line ConfigError, a run config this strategy cannot run with
        (falkit.config.validate calls it for the run's strategy)."""

    @classmethod
    def check_resources(cls, cfg: Config) -> None:
        """Reject what needs more than the config to know (FAST: its encoder can be built);
        a sweep calls it for every job before the first one runs."""

    @classmethod
    def check_transport(cls, cfg: Config, transport: str) -> None:
        """Reject, with a one-line ConfigError, a config this strategy cannot run with on
        `transport` ("in_process" | "flower"), before any client is contacted (FAST: a
        pooled first pass needs every client's samples in one place)."""

    # -- what the driver asks a strategy (defaults: the FAL cycle of ALGORITHMS.md §1) -----
    def cycles(self, cfg: Config) -> int:
        """How many cycles a run has."""
        return cfg.budget.cycles

    def target_pct(self, cfg: Config, cycle: int) -> float:
        """The labeled share (%) the budget aims at after `cycle`."""
        return 100 * cfg.budget.fraction * (cycle + 1)

    def local_steps(self, cfg: Config) -> int | None:
        """SGD steps per local update instead of fl.local_epochs epochs (None: epochs)."""
        return None

    # -- what the clients train (defaults: the backbone, plain cross-entropy) --------------
    def wrap_model(self, backbone: nn.Module) -> nn.Module:
        """The run's model built around `backbone` (ll4al: a loss-prediction module trained
        and federated with it). The default is the backbone itself."""
        return backbone

    @property
    def distillation(self) -> dict[str, object] | None:
        """Settings (Engine.train_distilled keywords) of a local model distilled from the
        global one, served to `select` as model "distilled" (IFAL); None: no such model."""
        return None

    def local_objectives(self, engine: Any, global_state: dict[str, torch.Tensor],
                         labeled: Sequence[np.ndarray], labels: np.ndarray,
                         pools: Sequence[np.ndarray], round_index: int
                         ) -> Callable[[int], object] | None:
        """Per-client training objectives of FL round `round_index` (client -> objective;
        KAFAL's kcfu loss), or None: every client trains with plain cross-entropy."""
        return None

    def training(self, cfg: Config) -> Config:
        """The config a run of this strategy trains with: `cfg` itself, or a strategy's own
        training recipe laid over its [fl] settings (FAST's, from its section)."""
        return cfg

    # -- what the clients' engine trains and infers on -----------------------------------
    def engine_inputs(self, cfg: Config, full: Any, ds: Any, rows: np.ndarray) -> Any:
        """What a site's engine trains and infers on, when not the images of `ds` (its
        train split, rows `rows` of the loaded dataset `full`): a `falkit.site.Inputs`
        (FAST: the frozen encoder's embeddings, computed per site and cached), or None."""
        return None

    # -- cycle 0: one or more passes over the clients (`initial_passes`) ------------------
    def initial_pass(self, cfg: Config, site: Any, p: int, down: Any) -> Any:
        """Client `site` (a `falkit.site.ClientSite`) runs pass `p` of cycle 0 with what the
        server sent it (`down`, a `falkit.site.Down`: nothing for the first pass) and returns
        a `falkit.site.Reply`. The default: its b_k labels uniformly at random from its pool
        (ALGORITHMS.md §1)."""
        picks = initial_picks(cfg, site.k, site.pool, site.budget)
        labels = site.ask(picks, 0)
        site.spend(0)
        return site.reply(0, self.initial_passes[p], picks, labels)

    def central_pass(self, cfg: Config, p: int) -> bool:
        """Whether pass `p` needs every client's samples in one place (simulation in
        process only: `initial_central` runs it); see `check_transport`."""
        return False

    def initial_central(self, cfg: Config, sites: list[Any], p: int) -> dict[int, Any]:
        """A central pass `p` over every client (`central_pass`): client -> its Reply."""
        raise NotImplementedError(f"{self.id} declares no central initial pass")

    def initial_down(self, cfg: Config, p: int, replies: dict[int, Any],
                     pools: dict[int, int]) -> dict[int, Any]:
        """The server between pass `p` and pass p+1: what each client gets (client -> a
        `falkit.site.Down`) from the clients' replies (`falkit.site.Reply`: what the server
        may learn) and their pool sizes."""
        from falkit.site import Down

        return {k: Down() for k in replies}

    def initial_extra(self, cfg: Config, passes: list[dict[int, Any]]) -> dict[str, Any]:
        """What cycle 0's passes report to `finish_cycle` (`passes[p]`: client -> Reply)."""
        return {}

    def finish_cycle(self, cfg: Config, row: dict[str, Any], extra: dict[str, Any],
                     traffic: list[dict[str, int]], num_train: int
                     ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
        """The cycle's metrics row, and extra result files (name -> rows), from what the
        query phase reported (`extra`) and the rounds' model traffic."""
        return row, {}

    def select(self, ctx: QueryContext, budget: int) -> np.ndarray:
        raise NotImplementedError

    def query(self, ctx: QueryContext, budget: int) -> np.ndarray:
        """Exactly min(budget, |U|) distinct indices from ctx.unlabeled."""
        n = len(ctx.unlabeled)
        want = min(int(budget), n)
        if want <= 0:
            return np.zeros(0, dtype=np.int64)
        # select runs even when the whole pool is taken: its diagnostics are still recorded
        pos = np.asarray(self.select(ctx, want), dtype=np.int64)
        if len(pos) != want or len(np.unique(pos)) != want or pos.min() < 0 or pos.max() >= n:
            raise RuntimeError(f"{self.id} broke the query contract: {len(pos)} positions "
                               f"({len(np.unique(pos))} distinct) for a budget of {want}")
        return ctx.unlabeled[pos]

    @property
    def two_phase(self) -> bool:
        """Whether the strategy queries in two phases (it overrides `client_stats`)."""
        return type(self).client_stats is not Strategy.client_stats

    # Optional two-phase hook for strategies with a server statistic (FairFAL's γ).
    def client_stats(self, ctx: QueryContext) -> PhaseA | None:
        """Phase A on one client: the statistics for `server_reduce` and what `select`
        needs of this phase (`ctx.phase_a` there). ctx.rng may be drawn from: `select`
        continues the same stream."""
        return None

    def server_reduce(self, stats: list[dict[str, float]]) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, object]:
        """Server-side state that must survive a resume (FairFAL's frozen γ̄)."""
        return {}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what state_dict returned."""

    def diagnostics(self) -> dict[str, object]:
        """Per-query diagnostics recorded in queries.jsonl (cleared by `clear_diagnostics`)."""
        return self._diag

    def clear_diagnostics(self) -> None:
        """Forget the last query's diagnostics (the loop calls it before every query)."""
        self._diag: dict[str, object] = {}


def initial_picks(cfg: Config, k: int, pool: np.ndarray, budget: int) -> np.ndarray:
    """Cycle 0: client k's b_k labels, uniformly at random from its pool (ALGORITHMS.md §1)."""
    return np.sort(rng(cfg.seed, "initial_labels", k).choice(pool, size=budget, replace=False))


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls
    return cls


def parse_id(strategy_id: str) -> tuple[str, str | None]:
    name, _, selector = strategy_id.partition("@")
    return name, (selector or None)


def create(strategy_id: str, **options: object) -> Strategy:
    """`create("entropy@G")`, `create("mylab.bald:Bald")`: a built-in, a plug-in's entry
    point or a `module:Class` spec (falkit.registry); an unknown name is a ConfigError
    listing the valid ones."""
    from falkit import registry

    _, selector = parse_id(strategy_id)
    return registry.strategy_class(strategy_id)(selector, **options)


def list_ids(every: bool = False) -> list[str]:
    """Every strategy id that queries per cycle, selectors spelled out (entropy@G,
    entropy@L, ...); `every`: FAST too. Plug-ins included."""
    from falkit import registry

    registry.load()
    out = []
    for name, cls in STRATEGIES.items():
        if cls.per_cycle or every:
            out += [f"{name}@G", f"{name}@L"] if cls.uses_selector else [name]
    return out
