"""Plug-ins (issue 26): a strategy, an FL algorithm and a backbone from a module of one's
own, named `module:Class` in a config, validated like built-ins, run in process and on
Flower with the same results, checked by falkit.testing; broken ones are one-line errors."""

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from falkit import config, registry
from falkit.errors import ConfigError

PLUGIN = textwrap.dedent('''
    """A tiny lab package: a strategy with options, an FL algorithm with options, a backbone."""
    from dataclasses import dataclass

    import numpy as np
    import torch
    from torch import nn

    from falkit.al.base import Strategy
    from falkit.fl.algorithms import FedAvg, weighted_average
    from falkit.models.backbones import Backbone
    from falkit.options import Options, option


    @dataclass
    class SkipOptions(Options):
        skip: int = option(0, low=0)  # skip the `skip` most uncertain samples
        score: str = option("entropy", choices=("entropy", "confidence"))

        def check(self, cfg):
            from falkit.errors import ConfigError
            if self.skip > 1000:
                raise ConfigError("skiptop.skip must be at most 1000")


    class SkipTop(Strategy):
        """Uncertainty sampling that skips the most uncertain (outliers) first."""

        name = "skiptop"
        description = "uncertainty, skipping the `skip` most uncertain"
        options = SkipOptions

        def __init__(self, at=None, *, skip=0, score="entropy", **options):
            super().__init__(at, **options)
            self.skip, self.score = int(skip), score

        def select(self, ctx, budget):
            p = ctx.probs("global").double()
            s = (-(p * p.clamp_min(1e-12).log()).sum(1) if self.score == "entropy"
                 else 1 - p.max(1).values).numpy()
            order = np.argsort(-s, kind="stable")
            order = np.concatenate([order[self.skip:], order[:self.skip]])
            self._diag = {"skipped": min(self.skip, len(order))}
            return order[:budget]


    @dataclass
    class DampedOptions:
        beta: float = option(0.5, low=0, high=1, low_in=False)  # server step size


    class Damped(FedAvg):
        """FedAvg with a server step: w <- w + beta (mean - w)."""

        name = "damped"
        description = "FedAvg with server step size beta"
        options = DampedOptions

        def __init__(self, beta=0.5, **options):
            super().__init__(**options)
            self.beta = float(beta)

        def aggregate(self, global_state, clients, num_clients):
            mean = weighted_average(clients, global_state)
            return {k: (g + self.beta * (mean[k] - g)) if g.is_floating_point() else mean[k]
                    for k, g in global_state.items()}


    def tinydata(data_root):
        """A plug-in dataset: 4 classes of random 8x8 images."""
        from falkit.data.sources import ImageDataset

        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (400, 1, 8, 8), generator=g, dtype=torch.uint8)
        y = np.arange(400) % 4
        return ImageDataset("tinydata", x[:300], y[:300], x[300:], y[300:],
                            ["a", "b", "c", "d"], (0.5,), (0.25,), False, 0, "plugin")


    class Tiny(Backbone):
        """A 2-layer MLP on the flattened image."""

        def __init__(self, num_classes, in_channels, image_size):
            super().__init__()
            self.feature_dim = 32
            self.body = nn.Sequential(nn.Flatten(1),
                                      nn.Linear(in_channels * image_size ** 2, 32), nn.ReLU())
            self.classifier = nn.Linear(32, num_classes)

        def embed(self, x):
            return self.body(x)
''')

from tests.test_transports import SMALL  # noqa: E402  (the transports' small run)

USE = {"strategy": "myplug:SkipTop", "skiptop.skip": "3", "fl.algorithm": "myplug:Damped",
       "damped.beta": "0.7", "model.backbone": "myplug:Tiny"}


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """`myplug` importable; every registry as it was afterwards (the other tests see only
    the built-ins)."""
    (tmp_path / "myplug.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.load()
    tables = registry._tables()
    saved = {k: dict(t) for k, t in tables.items()}
    kept = {n: dict(getattr(registry, n)) for n in ("ORIGINS", "BROKEN", "_SPECS")}
    yield tmp_path
    for k, t in tables.items():
        t.clear()
        t.update(saved[k])
    for n, d in kept.items():
        getattr(registry, n).clear()
        getattr(registry, n).update(d)
    sys.modules.pop("myplug", None)


def test_a_plugins_options_are_a_config_section_validated_like_a_builtins(plugin):
    cfg = config.load(None, overrides={**SMALL, **USE})
    assert cfg.skiptop.skip == 3 and cfg.damped.beta == 0.7
    text = config.dumps(cfg)  # the run's own sections only, and they read back
    assert "[skiptop]" in text and "[damped]" in text and "[fairfal]" not in text
    again = config.loads(text)
    assert again.skiptop.skip == 3 and again.damped.beta == 0.7
    for bad, words in ((("skiptop.skip", "-1"), "skiptop.skip must be >= 0"),
                       (("skiptop.score", "margin"), "skiptop.score = 'margin' is not one"),
                       (("skiptop.skip", "2000"), "at most 1000"),  # its own check
                       (("damped.beta", "0"), "damped.beta must be in (0, 1]")):
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace("[", r"\[")
                           .replace("]", r"\]").replace(")", r"\)")):
            config.load(None, overrides={**SMALL, **USE, bad[0]: bad[1]})
    if importlib.util.find_spec("flwr"):  # on Flower its options are native run-config keys
        from falkit.flower.common import app_dir

        assert 'skiptop.skip = ""  # 0' in (app_dir() / "pyproject.toml").read_text()
    # a builtin's run does not carry the plug-in's section: its name and hash do not move
    plain = config.load(None, overrides=SMALL)
    assert "skiptop" not in config.identity(plain) and "[skiptop]" not in config.dumps(plain)


def test_falkit_testing_checks_a_plugin_strategy_and_catches_a_broken_one(plugin):
    import myplug

    from falkit.testing import check_options, check_strategy

    check_strategy(myplug.SkipTop, skip=2)
    check_strategy("myplug:SkipTop", seeds=(0,))
    check_options(myplug.SkipTop)
    check_options(myplug.Damped)

    class Duplicates(myplug.SkipTop):
        name = "dups"

        def select(self, ctx, budget):
            return np.zeros(budget, dtype=np.int64)

    with pytest.raises(RuntimeError, match="broke the query contract"):
        check_strategy(Duplicates, budgets=(3,))

    class Undeclared(myplug.SkipTop):
        name = "undeclared"

        def select(self, ctx, budget):
            ctx.probs("local")  # a local model it did not declare
            return super().select(ctx, budget)

    with pytest.raises(AssertionError, match="without declaring"):
        check_strategy(Undeclared, budgets=(3,))


def test_a_plugin_run_in_process_equals_flower(plugin, tmp_path):
    pytest.importorskip("flwr")
    from tests.test_transports import flower_run, same_results

    from falkit.loop import run

    ref = run(config.load(None, overrides={**SMALL, **USE,
                                           "out_dir": str(tmp_path / "inproc")})).run_dir
    records = [json.loads(line) for line in (ref / "queries.jsonl").read_text().splitlines()]
    assert records and all(r.get("skipped") == 3 for r in records if r["cycle"] > 0)
    got = flower_run(tmp_path / "flower", **{k: v for k, v in USE.items()})
    assert got.name == ref.name
    same_results(got, ref)
    # the options change the run: another beta, another model
    other = run(config.load(None, overrides={**SMALL, **USE, "damped.beta": "1.0",
                                             "out_dir": str(tmp_path / "b1")})).run_dir
    assert other.name != ref.name
    assert (other / "metrics.csv").read_text() != (ref / "metrics.csv").read_text()


@pytest.mark.parametrize("spec,words", [
    ("nosuchmodule:X", "cannot import 'nosuchmodule'"),
    ("myplug:Nope", "'myplug' has no 'Nope'"),
    ("myplug:Tiny", "is not a falkit.al.base.Strategy subclass"),
    ("myplug:SkipOptions", "is not a falkit.al.base.Strategy subclass"),
])
def test_a_missing_or_wrong_plugin_is_one_line(plugin, spec, words):
    with pytest.raises(ConfigError, match=words):
        config.load(None, overrides={"strategy": spec})


def test_cli_names_a_plugin_and_refuses_a_broken_one_before_writing(plugin, tmp_path):
    import os

    env = {**os.environ, "PYTHONPATH": f"{plugin}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    falkit = [str(Path(sys.executable).parent / "falkit")]
    out = subprocess.run([*falkit, "config", *(f"{k}={v}" for k, v in USE.items())],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "[skiptop]" in out.stdout and "skip = 3" in out.stdout
    bad = subprocess.run([*falkit, "run", "--preset", "quick", "strategy=myplug:Gone",
                          f"out_dir={tmp_path / 'runs'}"], capture_output=True, text=True,
                         env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "'myplug' has no 'Gone'" in bad.stderr
    assert not (tmp_path / "runs").exists()


def test_an_entry_point_plugin_is_listed_with_its_origin_and_a_broken_one_is_reported(
        plugin, monkeypatch, capsys):
    import importlib.metadata as md

    from falkit import cli

    class Dist:
        name = "mylab"

    def eps(group):
        found = {"falkit.strategies": [md.EntryPoint("skiptop", "myplug:SkipTop", group),
                                       md.EntryPoint("broken", "myplug:Missing", group)],
                 "falkit.backbones": [md.EntryPoint("tiny", "myplug:Tiny", group)]}
        out = found.get(group, [])
        for ep in out:
            ep._for(Dist)  # the distribution an installed entry point comes from
        return out

    monkeypatch.setattr(md, "entry_points", eps)
    monkeypatch.setattr(registry, "_state", {"builtins": False, "plugins": False})
    monkeypatch.setattr(registry, "BROKEN", {})
    assert registry.strategy_class("skiptop").__name__ == "SkipTop"
    cfg = config.load(None, overrides={"strategy": "skiptop", "skiptop.skip": "4",
                                       "model.backbone": "tiny"})
    assert cfg.skiptop.skip == 4
    with pytest.raises(ConfigError, match="'broken' from mylab .* cannot be imported"):
        config.load(None, overrides={"strategy": "broken"})
    cli.main(["list"])
    shown = capsys.readouterr().out
    assert "plug-in mylab (myplug:SkipTop)" in shown and "plug-in mylab (myplug:Tiny)" in shown
    assert "BROKEN" in shown


def test_a_plugin_dataset_runs_and_a_bad_one_is_refused(plugin, tmp_path):
    from falkit.data import sources
    from falkit.errors import FalkitError
    from falkit.loop import run

    ds = sources.load("myplug:tinydata")
    assert ds.num_classes == 4 and ds.image_size == 8
    res = run(config.load(None, overrides={
        "data.dataset": "myplug:tinydata", "data.rho": "1", "partition.num_clients": "2",
        "budget.cycles": "2", "fl.rounds": "1", "fl.local_epochs": "1",
        "model.backbone": "myplug:Tiny", "runtime.threads": "1",
        "out_dir": str(tmp_path / "runs")}))
    assert len(res.metrics) == 2 and res.run_dir.name.startswith("myplug-tinydata_")
    (plugin / "badplug.py").write_text("def notdata(root):\n    return 42\n")
    with pytest.raises(FalkitError, match="returned int, not a falkit.data.sources"):
        sources.load("badplug:notdata")
    sys.modules.pop("badplug", None)


def test_registry_refuses_clashes_and_keeps_builtins_usable(plugin, monkeypatch):
    import importlib.metadata as md

    from falkit.al.base import Strategy

    class Clash(Strategy):  # a strategy whose options would take FedDyn's section
        name = "feddyn"
        options = __import__("myplug").SkipOptions

    with pytest.raises(ConfigError, match=r"\[feddyn\] is already the fl algorithm"):
        registry._add("strategy", "", Clash, "test")

    def eps(group):  # an installed plug-in that breaks and is named like a built-in
        return ([md.EntryPoint("entropy", "myplug:Missing", group)]
                if group == "falkit.strategies" else [])

    monkeypatch.setattr(md, "entry_points", eps)
    monkeypatch.setattr(registry, "_state", {"builtins": True, "plugins": False})
    monkeypatch.setattr(registry, "BROKEN", {})
    assert registry.strategy_class("entropy@G").__module__ == "falkit.al.uncertainty"
    assert ("strategy", "entropy") in registry.BROKEN  # and `falkit list` reports it


def test_a_config_made_before_a_plugin_registers_gets_its_defaults(plugin):
    early = config.Config()
    import myplug

    registry.resolve("strategy", "myplug:SkipTop")
    assert early.skiptop.skip == 0 and isinstance(early.skiptop, myplug.SkipOptions)
    early.skiptop = myplug.SkipOptions(skip=5)  # a whole section set, seen everywhere
    assert config.to_dict(early)["skiptop"]["skip"] == 5


def test_check_strategy_refuses_an_output_used_without_declaring_it(plugin):
    import myplug

    from falkit.testing import check_strategy

    class Sneaky(myplug.SkipTop):
        name = "sneaky"

        def select(self, ctx, budget):
            ctx.provided["mc_probs"]  # never declared in `outputs`
            return super().select(ctx, budget)

    with pytest.raises(KeyError, match="mc_probs"):
        check_strategy(Sneaky, budgets=(3,), seeds=(0,))


def test_a_flower_site_ignores_unset_keys_it_does_not_know():
    pytest.importorskip("flwr")
    from falkit.flower.common import load_config

    cfg, _ = load_config({"otherlab.beta": "", "fl.rounds": 3})  # "" = not set
    assert cfg.fl.rounds == 3
    with pytest.raises(ConfigError, match="otherlab"):
        load_config({"otherlab.beta": 2})
