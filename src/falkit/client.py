"""What one client does in a query phase, wherever it runs (in this process or in a Flower
ClientApp): the models it queries with, its QueryContext, its query. The federations
(`falkit.inprocess`, `falkit.flower`) call these; the cycle itself is `falkit.driver`'s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from falkit.al.base import QueryContext, Strategy
from falkit.config import Config
from falkit.fl.algorithms import State, check_finite
from falkit.fl.engine import Engine
from falkit.seeding import rng


def local_mode(cfg: Config, strategy: Strategy) -> str:
    """The local model a strategy queries with: its own rule, else `local_model.mode`."""
    return strategy.local_model_mode or cfg.local_model.mode


def keeps_last_round(cfg: Config, strategy: Strategy) -> bool:
    """Whether the clients keep their model after their last local update of a cycle (the
    `last_round` local model the next query phase uses)."""
    return strategy.needs_local_model and local_mode(cfg, strategy) == "last_round"


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
    distill = strategy.distillation
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
                  global_outputs, model_info: dict[str, Any]) -> QueryContext:
    """Client k's QueryContext: its pools, the models it may query with ("global" and the
    client models of `models`, with what their training reported), and its keyed query
    RNG."""

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
                       model_info=dict(model_info))
    for name in strategy.outputs:  # what the strategy declared, and nothing else
        if name not in PROVIDERS:
            raise RuntimeError(f"{strategy.id} declares the model output {name!r}, which no "
                               f"provider computes (known: {', '.join(sorted(PROVIDERS))})")
        ctx.provided[name] = PROVIDERS[name](engine, state_of, ctx)
    ctx.predicted_loss = ctx.provided.get("predicted_loss")
    return ctx


def loss_predictor(engine: Engine, weights):
    """(model, indices) -> predicted loss of that model's loss-prediction module, batched."""
    def predicted_loss(model: str, pool: np.ndarray) -> torch.Tensor:
        return engine.predict_loss(weights(model), pool)

    return predicted_loss


def mc_dropout_probs(ctx: QueryContext, p: float):
    """(model, passes, generator, subset="unlabeled") -> passes × N × C softmax outputs of
    `model` under MC dropout (Gal & Ghahramani 2016): each pass drops every penultimate
    feature with probability `p` (`model.dropout`, where the backbone trains with dropout)
    and applies the model's classifier. The features are the context's (inferred once, in
    eval mode); only the classifier runs per pass, and the masks come from the given
    generator, so the strategy's keyed RNG makes them reproducible."""
    def mc_probs(model: str, passes: int, gen: torch.Generator,
                 subset: str = "unlabeled") -> torch.Tensor:
        if p <= 0:
            raise RuntimeError("MC dropout needs model.dropout > 0 (the model trains with "
                               "dropout on its classifier input)")
        feats = ctx.features(model, subset).float()  # on whichever device they were computed
        w, b = ctx.head(model)
        w, b = w.to(feats.device), b.to(feats.device)
        keep = 1.0 - p
        out = torch.empty(passes, len(feats), len(b), device=feats.device)
        for t in range(passes):  # masks from the CPU generator: the same on every device
            mask = torch.empty(feats.shape).bernoulli_(keep, generator=gen).to(feats.device)
            out[t] = torch.softmax((feats * mask / keep) @ w.T + b, dim=1)
        return out

    return mc_probs


# Model outputs a strategy may declare (`Strategy.outputs`): name -> (engine, weights of a
# model name, the client's context) -> what `select` finds in ctx.provided[name]. A new
# output is one function added here.
PROVIDERS: dict[str, Callable[[Engine, Callable[[str], State], QueryContext], Any]] = {
    # ll4al: (model, indices) -> the loss-prediction module's l̂(x)
    "predicted_loss": lambda engine, state_of, ctx: loss_predictor(engine, state_of),
    # MC-dropout strategies (bald): see mc_dropout_probs
    "mc_probs": lambda engine, state_of, ctx: mc_dropout_probs(ctx, engine.cfg.model.dropout),
}


def train_hooks(strategy: Strategy, engine: Engine, global_state: State, r: int, rounds: int,
                labeled: list[np.ndarray], known: np.ndarray, pools: list[np.ndarray]
                ) -> dict[str, Any]:
    """The extra arguments of a training round a strategy asks for: models with a loss hook
    (ll4al) learn which round of R this is (its stop-gradient); strategies that train their
    own way (kafal.kcfu) give each client's objective, built from `known` (read only at the
    `labeled` indices: the labels the oracle revealed)."""
    hook: dict[str, Any] = {}
    if hasattr(engine.model, "extra_loss"):
        hook["progress"] = (r, rounds)
    objectives = strategy.local_objectives(engine, global_state, labeled, known, pools, r)
    if objectives is not None:
        hook["objectives"] = objectives
    return hook
