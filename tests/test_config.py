"""Typed config: TOML round trip, presets, overrides, one-line validation errors."""

import re
import subprocess
import sys

import pytest

from falkit import config
from falkit.errors import ConfigError


def test_defaults_are_the_fairfal_protocol():
    cfg = config.Config()
    assert (cfg.partition.num_clients, cfg.fl.rounds, cfg.fl.local_epochs) == (10, 100, 5)
    assert (cfg.fl.lr, cfg.fl.batch_size, cfg.budget.cycles, cfg.budget.fraction) == (
        0.01, 64, 9, 0.05)
    assert cfg.data.rho == 20 and cfg.partition.alpha == 0.1


def test_roundtrip_dumps_loads_including_none():
    cfg = config.load(None, preset="quick", overrides={"data.rho": "none", "seed": "3",
                                                       "strategy": "entropy@L"})
    again = config.loads(config.dumps(cfg))
    # the same experiment (other strategies' option sections are not saved)
    assert config.experiment_dict(again) == config.experiment_dict(cfg)
    assert again.data.rho is None and again.seed == 3
    ff = config.load(None, preset="quick", overrides={"strategy": "fairfal", "fairfal.kappa": 0})
    assert config.loads(config.dumps(ff)).fairfal.kappa == 0


def test_file_preset_and_overrides_order(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('preset = "quick"\nseed = 5\n[fl]\nrounds = 7\n')
    cfg = config.load(p, overrides={"partition.alpha": "100"})
    assert cfg.seed == 5 and cfg.partition.alpha == 100.0
    # the file's preset is its base: the file's own values win over it ...
    assert cfg.fl.rounds == 7 and cfg.fl.lr == config.PRESETS["quick"]["fl.lr"]
    # ... while --preset is applied on top of the file, and key=value on top of everything
    assert config.load(p, preset="quick").fl.rounds == config.PRESETS["quick"]["fl.rounds"]
    assert config.load(p, preset="quick", overrides={"fl.rounds": "9"}).fl.rounds == 9


def test_run_names_differ_whenever_the_experiment_differs():
    a = config.load(None, overrides={"fl.algorithm": "fedavg"})
    b = config.load(None, overrides={"fl.algorithm": "scaffold"})
    c = config.load(None, overrides={"strategy": "fairfal", "fairfal.selector": "global"})
    d = config.load(None, overrides={"strategy": "fairfal"})
    assert len({a.run_name(), b.run_name(), c.run_name(), d.run_name()}) == 4
    # another strategy's options are not part of a run: neither its name nor its config.toml
    e = config.load(None, overrides={"fairfal.selector": "global", "ifal.top_k": "9"})
    assert e.run_name() == a.run_name() and config.dumps(e) == config.dumps(a)
    assert "[fairfal]" not in config.dumps(a) and "[ifal]" not in config.dumps(a)
    assert "[fairfal]" in config.dumps(c) and "[ifal]" not in config.dumps(c)
    assert a.run_name() == config.load(None, overrides={"out_dir": "/elsewhere"}).run_name()
    assert config.load(None, overrides={"name": "mine"}).run_name() == "mine"


@pytest.mark.parametrize("overrides, message", [
    ({"partition.alhpa": "1"}, "unknown config key 'partition.alhpa'"),
    ({"partition.alpha": "0"}, "partition.alpha must be > 0"),
    ({"data.rho": "0.05"}, "data.rho must be >= 1"),
    ({"fl.rounds": "two"}, "fl.rounds must be int"),
    ({"fl.reset": "sometimes"}, "fl.reset"),
    ({"budget.fraction": "1.5"}, "budget.fraction"),
    ({"fairfal.kappa": "0.5"}, "fairfal.kappa must be 0 (one stage) or >= 1"),
    ({"seed": "-1"}, "seed must be >= 0"),
])
def test_invalid_settings_raise_one_line(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        config.load(None, overrides=overrides)
    assert "\n" not in str(e.value)


def test_cli_exit_code_2_and_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "falkit.cli", "run", "partition.alpha=-1",
                        f"out_dir={tmp_path}"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "partition.alpha must be > 0" in r.stderr
    assert not any(tmp_path.iterdir())  # nothing half-written
