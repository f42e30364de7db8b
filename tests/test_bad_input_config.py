"""Config values of the wrong type (issue 23.17) and `falkit config` validating like `falkit run`
(issue 23.21): each bad input is one line on stderr beginning `falkit: error:`, exit code 2,
no traceback, and nothing written. Every case fails before any training."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pytest

import falkit
from falkit import config
from falkit.cli import main
from falkit.errors import ConfigError

SMALL = ["data.dataset=digits", "data.rho=5", "partition.num_clients=3", "partition.alpha=1",
         "budget.cycles=2", "fl.rounds=1", "fl.local_epochs=1", "model.backbone=resnet8_preact16"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative path a bad value might name lands here


def fail(capsys, argv: list[str], *words: str) -> str:
    """Run the CLI; it must fail with one line (exit 2) holding `words`, no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("falkit: error:"), err
    assert "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def nothing_written(tmp_path: Path) -> None:
    """Only the config file the test wrote is there: no out_dir, no run directory."""
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["c.toml"])


# -- 23.17: TOML values of the wrong type --------------------------------------------------------
# (the TOML file, words of the one-line error)
BAD_TOML = [
    # arrays where a number, a string or a bool is expected
    ("seed = [1, 2]", ["seed must be int", "an array"]),
    ("[fl]\nlr = [0.1]", ["fl.lr must be float", "an array"]),
    ("[data]\nrho = [20]", ["data.rho must be float", "an array"]),
    ('name = ["a", "b"]', ["name must be str", "an array"]),
    ('strategy = ["random"]', ["strategy must be str", "an array"]),
    ('[model]\nbackbone = ["cnn4"]', ["model.backbone must be str", "an array"]),
    ("[runtime]\nchannels_last = [true]", ["runtime.channels_last must be bool"]),
    ("[[fl.lr]]\nx = 1", ["fl.lr must be float", "an array"]),
    # dates, times, datetimes
    ("seed = 2024-01-01", ["seed must be int", "a date 2024-01-01"]),
    ("[fl]\nlr = 1979-05-27T07:32:00Z", ["fl.lr must be float", "a datetime"]),
    ("[fairfal]\nkappa = 07:32:00", ["fairfal.kappa must be float", "a time 07:32:00"]),
    ("name = 1979-05-27", ["name must be str", "a date 1979-05-27"]),
    ("name = 07:32:00", ["name must be str", "a time 07:32:00"]),
    ("[data]\ndataset = 1979-05-27T07:32:00", ["data.dataset must be str", "a datetime"]),
    ("[fast]\nweak_labels = 2024-01-01", ["fast.weak_labels must be bool", "a date"]),
    # tables (inline or not) where a scalar is expected
    ("[fl]\nlr = {}", ["fl.lr must be float", "a table"]),
    ("[fl.lr]", ["fl.lr must be float", "a table"]),
    ("seed = {}", ["seed must be int", "a table"]),
    ("[partition]\nself_balancing = {}", ["partition.self_balancing must be bool", "a table"]),
    ("[fl]\nlr = {value = 0.1}", ["fl.lr is a setting, not a section"]),
    ("[seed]\nx = 1", ["seed is a setting, not a section"]),
    ("[fl.rounds.deeper]\nx = 1", ["fl.rounds is a setting, not a section"]),
    # numbers and bools where a string is expected
    ("[data]\ndata_root = 5", ["data.data_root must be str", "got 5"]),
    ("name = true", ["name must be str", "got true"]),
    ("strategy = 3.5", ["strategy must be str", "got 3.5"]),
    # a string list's elements, the preset key
    ("tracking = [1, 2]", ["tracking must be str or a list of str", "an array [1, 2]"]),
    ('tracking = [["tensorboard"]]', ["tracking must be str or a list of str", "an array"]),
    ('preset = ["quick"]', ["preset must be str", "an array"]),
    ("preset = 2024-01-01", ["preset must be str", "a date"]),
    # a section where something else (or other keys) is given
    ("fl = 3", ["'fl' is a section"]),
    ("fl = [1]", ["'fl' is a section"]),
    ("[[fl]]\nlr = 0.1", ["'fl' is a section"]),
    ("[fl]\nlearning_rate = 0.1", ["unknown config key 'fl.learning_rate'"]),
    ("[fl.schedule]\nlr = 0.1", ["unknown config key 'fl.schedule.lr'"]),
]


@pytest.mark.parametrize("toml, words", BAD_TOML, ids=[t for t, _ in BAD_TOML])
def test_a_toml_value_of_the_wrong_type_is_one_line(tmp_path, capsys, toml, words):
    (tmp_path / "c.toml").write_text(toml + "\n")
    out = tmp_path / "runs"
    fail(capsys, ["run", str(tmp_path / "c.toml"), *SMALL, f"out_dir={out}", "--quiet"],
         *words)
    nothing_written(tmp_path)


# the same values as key=value overrides: always text, parsed by the setting's type
BAD_OVERRIDES = [
    ("seed=[1, 2]", ["seed must be int", "'[1, 2]'"]),
    ("fl.lr=2024-01-01", ["fl.lr must be float", "'2024-01-01'"]),
    ("runtime.channels_last=[true]", ["runtime.channels_last must be bool"]),
    ("fl.lr.x=1", ["fl.lr is a setting, not a section"]),
    ("fl={}", ["'fl' is a section"]),
]


@pytest.mark.parametrize("setting, words", BAD_OVERRIDES)
def test_an_override_of_the_wrong_type_is_one_line(tmp_path, capsys, setting, words):
    fail(capsys, ["run", *SMALL, setting, f"out_dir={tmp_path / 'runs'}", "--quiet"], *words)
    nothing_written(tmp_path)


# the same values as keyword settings of falkit.run (the Python API shares config.load)
BAD_KEYWORDS = [
    ({"seed": [1]}, ["seed must be int", "an array"]),
    ({"fl": {"lr": [0.1]}}, ["fl.lr must be float", "an array"]),
    ({"fl": {"lr": {}}}, ["fl.lr must be float", "a table"]),
    ({"fl.lr": {}}, ["fl.lr must be float", "a table"]),
    ({"fl": {"lr": {"x": 1}}}, ["fl.lr is a setting, not a section"]),
    ({"name": ["a", "b"]}, ["name must be str", "an array"]),
    ({"data": {"rho": datetime.date(2024, 1, 1)}}, ["data.rho must be float", "a date"]),
    ({"runtime": {"channels_last": 2}}, ["runtime.channels_last must be bool", "got 2"]),
    ({"strategy": 5}, ["strategy must be str", "got 5"]),
    ({"fl": 3}, ["'fl' is a section"]),
]


@pytest.mark.parametrize("settings, words", BAD_KEYWORDS, ids=[repr(s) for s, _ in BAD_KEYWORDS])
def test_a_keyword_setting_of_the_wrong_type_is_one_line(tmp_path, settings, words):
    small = config.parse_overrides(SMALL)
    with pytest.raises(ConfigError) as e:
        falkit.run(quiet=True, **{**small, "out_dir": str(tmp_path / "runs"), **settings})
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    nothing_written(tmp_path)


def test_well_typed_values_still_load(tmp_path):
    """What the type check must keep accepting: ints for floats, integral floats for ints,
    "none" for optional settings, paths for strings, numpy scalars, a list of trackers."""
    (tmp_path / "c.toml").write_text('seed = 3.0\ntracking = []\n[fl]\nlr = 1\n'
                                     '[data]\nrho = "none"\n[runtime]\nchannels_last = 0\n')
    cfg = config.load(tmp_path / "c.toml")
    assert (cfg.seed, cfg.fl.lr, cfg.data.rho, cfg.runtime.channels_last) == (3, 1.0, None,
                                                                              False)
    cfg = config.load(None, overrides={"out_dir": tmp_path / "runs", "seed": np.int64(4),
                                       "fl.lr": np.float32(0.5), "tracking": ["tensorboard"]})
    assert (cfg.out_dir, cfg.seed, cfg.fl.lr, cfg.tracking) == (str(tmp_path / "runs"), 4,
                                                                0.5, "tensorboard")
    assert type(cfg.seed) is int and type(cfg.fl.lr) is float
    assert config.loads(config.dumps(cfg)).seed == 4


# -- 23.21: `falkit config` validates exactly like `falkit run` ----------------------------------
BAD_SETTINGS = [
    ("strategy=nonsense", "unknown strategy 'nonsense'"),
    ("strategy=entropy@X", "selector must be @G or @L"),
    ("strategy=random@G", "strategy 'random' takes no @G selector"),
    ("data.dataset=nonsense", "unknown dataset 'nonsense'"),
    ("fl.lr=nan", "fl.lr must be a finite number"),
    ("fl.reset=sometimes", "fl.reset = 'sometimes' is not one of"),
]


@pytest.mark.parametrize("setting, words", BAD_SETTINGS)
def test_config_refuses_what_run_refuses_with_the_same_line(tmp_path, capsys, setting, words):
    argv = [*SMALL, setting, f"out_dir={tmp_path / 'runs'}"]
    line = fail(capsys, ["config", *argv], words)
    assert fail(capsys, ["run", *argv, "--quiet"], words) == line
    nothing_written(tmp_path)


def test_config_refuses_a_bad_toml_file_like_run(tmp_path, capsys):
    (tmp_path / "c.toml").write_text('strategy = "entrophy"\n[fl]\nlr = [0.1]\n')
    argv = [str(tmp_path / "c.toml"), *SMALL, f"out_dir={tmp_path / 'runs'}"]
    line = fail(capsys, ["config", *argv], "fl.lr must be float")
    assert fail(capsys, ["run", *argv, "--quiet"]) == line
    (tmp_path / "c.toml").write_text('strategy = "entrophy"\n')
    line = fail(capsys, ["config", *argv], "unknown strategy 'entrophy'")
    assert fail(capsys, ["run", *argv, "--quiet"]) == line
    nothing_written(tmp_path)
