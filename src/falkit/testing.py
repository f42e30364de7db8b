"""The contract checks every falkit method passes, for a plug-in author's own tests
(issue 26; scikit-activeml templates its strategy tests the same way):

    from falkit.testing import check_strategy
    from mylab.bald import Bald

    def test_bald_meets_falkit_contract():
        check_strategy(Bald)

`check_strategy` runs the strategy on synthetic query contexts (`fake_context`: a client's
pools, random model outputs, classifier heads and predicted losses) and asserts the query
contract of `falkit.al.base.Strategy.query`: exactly min(b, |U|) picks, distinct, only from
the unlabeled pool, the same picks for the same seed, each model's outputs inferred once
(in one batched pass), and no model asked for that the strategy did not declare.
`check_options` checks a method's options dataclass against its own declared choices and
ranges. Nothing here needs data, a GPU or Flower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from falkit.al.base import QueryContext, Strategy
from falkit.client import PROVIDERS, mc_dropout_probs

NUM_CLASSES, DIM = 5, 8
BUDGETS = (1, 7, 59, 60, 200)  # 60 = the whole pool of `fake_context`'s defaults


def fake_context(seed: int = 0, n_unlabeled: int = 60, n_labeled: int = 12,
                 probs: dict[str, torch.Tensor] | None = None,
                 feats: dict[str, torch.Tensor] | None = None, dropout: float = 0.5
                 ) -> tuple[QueryContext, list[tuple[str, int]]]:
    """A client's QueryContext over a 10,000-sample train set: `n_labeled` labeled and
    `n_unlabeled` unlabeled indices, random probabilities and features for the models
    "global", "local" and "distilled" (or the given tables), random classifier heads,
    predicted losses and MC-dropout passes (at `dropout`) - every output a strategy may
    declare. `calls` records every inference: (model, number of samples)."""
    g = np.random.default_rng(100 + seed)
    pool = np.sort(g.choice(10_000, n_unlabeled + n_labeled, replace=False))
    labeled = np.sort(g.choice(pool, n_labeled, replace=False))
    unlabeled = np.setdiff1d(pool, labeled)
    gen = torch.Generator().manual_seed(seed)
    table_p = {m: torch.softmax(3 * torch.randn(10_000, NUM_CLASSES, generator=gen), 1)
               for m in ("global", "local")}
    table_f = {m: torch.randn(10_000, DIM, generator=gen) for m in ("global", "local")}
    calls: list[tuple[str, int]] = []

    def infer(model: str, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append((model, len(idx)))
        idx_t = torch.as_tensor(idx)
        p = table_p[model][idx_t] if probs is None else probs[model][idx_t]
        f = table_f[model][idx_t] if feats is None else feats[model][idx_t]
        return p, f

    heads = {m: {"classifier.weight": torch.randn(NUM_CLASSES, DIM, generator=gen),
                 "classifier.bias": torch.randn(NUM_CLASSES, generator=gen)}
             for m in ("global", "local")}
    # a third model (IFAL's distilled one), drawn last so the tables above stay what they were
    table_p["distilled"] = torch.softmax(3 * torch.randn(10_000, NUM_CLASSES, generator=gen), 1)
    table_f["distilled"] = torch.randn(10_000, DIM, generator=gen)
    table_l = torch.randn(10_000, generator=gen)  # predicted losses, drawn last too
    heads["distilled"] = {"classifier.weight": torch.randn(NUM_CLASSES, DIM, generator=gen),
                          "classifier.bias": torch.randn(NUM_CLASSES, generator=gen)}

    def predicted_loss(model: str, idx: np.ndarray) -> torch.Tensor:
        calls.append((f"{model}:predicted_loss", len(idx)))
        return table_l[torch.as_tensor(idx)]

    ctx = QueryContext(client_id=0, cycle=1, labeled=labeled,
                       labeled_y=g.integers(0, NUM_CLASSES, n_labeled), unlabeled=unlabeled,
                       num_classes=NUM_CLASSES, rng=np.random.default_rng(seed), infer=infer,
                       weights=heads.__getitem__)
    ctx.predicted_loss = predicted_loss
    ctx.provided["predicted_loss"] = predicted_loss
    ctx.provided["mc_probs"] = mc_dropout_probs(ctx, dropout)
    missing = set(PROVIDERS) - set(ctx.provided)
    assert not missing, f"fake_context provides no {sorted(missing)}"  # keep up with falkit
    return ctx, calls


def query_once(strategy: Strategy, ctx: QueryContext, budget: int) -> np.ndarray:
    """What a federation does: phase A on the client, the server's reduce, the broadcast,
    then the query (a one-client federation)."""
    ctx.phase_a = strategy.client_stats(ctx)
    if ctx.phase_a is not None:
        ctx.server = strategy.server_reduce([ctx.phase_a.stats])
    return strategy.query(ctx, budget)


def _declared_only(ctx: QueryContext, calls: list[tuple[str, int]], strategy: Strategy
                   ) -> tuple[QueryContext, list[tuple[str, int]]]:
    """The context as a falkit client hands it to `strategy`: only the model outputs it
    declares (`Strategy.outputs`) are provided."""
    ctx.provided = {k: v for k, v in ctx.provided.items() if k in strategy.outputs}
    ctx.predicted_loss = ctx.provided.get("predicted_loss")
    return ctx, calls


def _instances(strategy: type[Strategy] | Strategy | str, options: dict[str, Any]
               ) -> list[tuple[str, Any]]:
    """(label, factory) of every form of the strategy: @G and @L for one with a selector."""
    from falkit import registry

    if isinstance(strategy, str):
        cls = registry.strategy_class(strategy)
        at = strategy.partition("@")[2] or None
        selectors = [at] if at else (["G", "L"] if cls.uses_selector else [None])
    elif isinstance(strategy, Strategy):
        cls, selectors = type(strategy), [strategy.selector]
        options = {**strategy.options, **options}
    else:
        cls = strategy
        selectors = ["G", "L"] if cls.uses_selector else [None]
    if cls.options is not None:  # built as falkit builds it: its options' defaults first
        options = {**dataclasses.asdict(cls.options()), **options}
    return [(f"{cls.name}@{s}" if s else cls.name,
             (lambda s=s: cls(s, **options))) for s in selectors]


def check_strategy(strategy: type[Strategy] | Strategy | str,
                   budgets: Iterable[int] = BUDGETS, seeds: Iterable[int] = (0, 1),
                   **options: Any) -> None:
    """Assert falkit's query contract for `strategy` (a Strategy subclass, an instance, or
    an id: "entropy@G", "mylab.bald:Bald") built with `options`; an AssertionError says
    which rule broke, for which selector, seed and budget."""
    for label, make in _instances(strategy, options):
        declared = {"global"}
        probe = make()
        if probe.needs_local_model:
            declared.add("local")
        if probe.distillation is not None:
            declared.add("distilled")
        declared |= {f"{m}:{out}" for out in probe.outputs for m in ("global", "local")}
        for seed in seeds:
            for budget in budgets:
                where = f"{label}, seed {seed}, budget {budget}"
                ctx, calls = _declared_only(*fake_context(seed), probe)
                picks = np.asarray(query_once(make(), ctx, budget))
                want = min(budget, len(ctx.unlabeled))
                assert len(picks) == want, f"{where}: {len(picks)} picks, not {want}"
                assert len(np.unique(picks)) == len(picks), f"{where}: duplicate picks"
                assert np.isin(picks, ctx.unlabeled).all(), \
                    f"{where}: a pick is not in the client's unlabeled pool"
                again = query_once(make(), _declared_only(*fake_context(seed), probe)[0],
                                   budget)
                assert np.array_equal(picks, again), \
                    f"{where}: not deterministic (the same seed gave other picks)"
                models = [m for m, _ in calls]
                assert len(models) == len(set(models)), \
                    f"{where}: a model's outputs were inferred more than once: {models}"
                undeclared = set(models) - declared
                assert not undeclared, (f"{where}: asked for {sorted(undeclared)} without "
                                        "declaring it (needs_local_model, distillation, "
                                        "outputs)")


def check_options(method: Any) -> None:
    """Assert that a strategy's or FL algorithm's `options` dataclass is sound: every
    default meets its own declared choices and range, and the method builds with them."""
    from falkit import options as options_mod

    opts = method.options  # declared on Strategy and FedAvg (None: no options)
    if opts is None:
        return
    assert dataclasses.is_dataclass(opts), f"{method.__name__}.options is not a dataclass"
    default = opts()
    for f in dataclasses.fields(opts):
        value = getattr(default, f.name)
        if options_mod.CHOICES in f.metadata:
            assert value in f.metadata[options_mod.CHOICES], f"{f.name}: default not a choice"
        if options_mod.RANGE in f.metadata and value is not None:
            lo, hi, lo_in, hi_in = f.metadata[options_mod.RANGE]
            assert lo is None or (value >= lo if lo_in else value > lo), f"{f.name} < low"
            assert hi is None or (value <= hi if hi_in else value < hi), f"{f.name} > high"
    kwargs = dataclasses.asdict(default)
    if isinstance(method, type) and issubclass(method, Strategy):
        method("G" if method.uses_selector else None, **kwargs)
    else:
        method(**kwargs)
