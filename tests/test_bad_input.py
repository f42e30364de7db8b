"""Nothing lost, nothing silently wrong (issue 12): every bad input is one line on stderr with
exit code 2, no traceback, and nothing previously written is changed or lost. The corpus is
parametrised so that a new option cannot regress it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from falkit import config
from falkit.cli import main
from falkit.flower.common import load_config as flower_load_config
from falkit.loop import run
from falkit.results import read_metrics, read_status
from falkit.rundir import RunDir, RunLocked

SMALL = ["data.dataset=digits", "data.rho=5", "partition.num_clients=3", "partition.alpha=1",
         "budget.cycles=2", "fl.rounds=1", "fl.local_epochs=1", "model.backbone=resnet8_preact16"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root` with a hash of its content."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def fail(capsys, argv: list[str], *words: str) -> str:
    """Run the CLI; it must fail with one line (exit 2) holding `words`, no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("falkit: error:")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def finished_run(tmp_path: Path, capsys, *extra: str) -> Path:
    """A finished small run under tmp_path/D/runs, beside a user's notes.txt."""
    runs = tmp_path / "D" / "runs"
    runs.mkdir(parents=True)
    (runs / "notes.txt").write_text("my notes\n")
    (tmp_path / "D" / "thesis.tex").write_text("\\documentclass{article}\n")
    assert main(["run", *SMALL, f"out_dir={runs}", "name=keep", "--quiet", *extra]) == 0
    capsys.readouterr()
    return runs


# -- data loss ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [".", "..", "/abs/path/elsewhere", "a/b", ".hidden"])
def test_run_name_is_one_path_component(tmp_path, capsys, name):
    runs = finished_run(tmp_path, capsys)
    before = snapshot(tmp_path)
    argv = ["run", *SMALL, f"out_dir={runs}", "--overwrite", "--quiet"]
    fail(capsys, [*argv, f"name={name}"], "name must be a single folder name")
    assert snapshot(tmp_path) == before


def test_overwrite_never_deletes_a_folder_falkit_did_not_create(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "thesis.tex").write_text("chapter 1\n")
    before = snapshot(tmp_path)
    fail(capsys, ["run", *SMALL, f"out_dir={tmp_path}", "name=elsewhere", "--overwrite"],
         "not a falkit run", "never deletes it")
    assert snapshot(tmp_path) == before


def test_overwrite_waits_for_valid_config_and_data(tmp_path, capsys):
    runs = finished_run(tmp_path, capsys)
    before = snapshot(tmp_path)
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    before = snapshot(tmp_path)
    fail(capsys, ["run", *SMALL, f"out_dir={runs}", "name=keep", "--overwrite",
                  f"data.dataset=npz:{tmp_path / 'bad.npz'}"], "bad.npz")
    assert snapshot(tmp_path) == before
    fail(capsys, ["run", *SMALL, f"out_dir={runs}", "name=keep", "--overwrite",
                  "strategy=entrophy"], "unknown strategy")
    assert snapshot(tmp_path) == before


def test_overwrite_that_fails_in_its_first_cycle_puts_the_old_run_back(tmp_path, capsys):
    runs = finished_run(tmp_path, capsys)
    before = snapshot(tmp_path)
    fail(capsys, ["run", *SMALL, f"out_dir={runs}", "name=keep", "--overwrite", "--quiet",
                  "fl.rounds=2", "fl.lr=1e38"], "training diverged in cycle 1, round 1")
    assert snapshot(tmp_path) == before  # the finished run is back, nothing left aside


def test_overwrite_replaces_the_run_and_leaves_nothing_aside(tmp_path, capsys):
    runs = finished_run(tmp_path, capsys)
    assert main(["run", *SMALL, f"out_dir={runs}", "name=keep", "--overwrite", "--quiet",
                 "seed=1"]) == 0
    assert sorted(p.name for p in runs.iterdir()) == ["keep", "notes.txt"]
    assert config.loads((runs / "keep" / "config.toml").read_text()).seed == 1
    assert read_status(runs / "keep")["complete"] is True


def test_a_killed_overwrite_is_undone_at_the_next_start(tmp_path, capsys):
    runs = finished_run(tmp_path, capsys)
    cfg = config.load(None, overrides=config.parse_overrides(
        [*SMALL, f"out_dir={runs}", "name=keep"]))
    before = snapshot(runs / "keep")
    # what a kill -9 right after the move aside leaves: the old run aside, a new partial one
    rd = RunDir.of(cfg)
    os.replace(rd.path, rd.aside)
    rd.path.mkdir()
    (rd.path / "status.json").write_text('{"complete": false, "cycles_done": 0, "cycles": 2}')
    new = config.load(None, overrides=config.parse_overrides(
        [*SMALL, f"out_dir={runs}", "name=keep", "fl.rounds=30"]))
    (rd.path / "config.toml").write_text(config.dumps(new))
    # the first look at the run already sees the old one (no "different config" advice)
    assert RunDir.of(cfg).inspect(cfg, overwrite=False) == "complete"
    assert snapshot(runs / "keep") == before and not rd.aside.exists()
    assert run(cfg).skipped


def test_a_run_that_finished_no_cycle_is_replaced_without_overwrite(tmp_path, capsys):
    argv = ["run", *SMALL, f"out_dir={tmp_path}", "name=q", "--quiet"]
    fail(capsys, [*argv, "fl.rounds=2", "fl.lr=1e38"], "training diverged")
    assert main([*argv, "fl.lr=0.05"]) == 0  # the advice "lower fl.lr" just works
    assert read_status(tmp_path / "q")["complete"] is True


@pytest.mark.parametrize("argv, words", [
    (["sweep", *SMALL, "--name", "../x"], ["--name must be a single folder name"]),
    (["sweep", *SMALL, "--seeds", "0,a"], ["--seeds must be comma-separated integers"]),
    (["sweep", *SMALL, "--strategies", "random,entrophy"], ["unknown strategy 'entrophy'"]),
    (["sweep", *SMALL, "--seeds", ","], ["need at least one value"]),
    (["fast", *SMALL, "fast.encoder=pixels", "model.backbone=cnn4"], ["cnn4 needs image_size"]),
    (["fast-compare", *SMALL, "--name", ".."], ["--name must be a single folder name"]),
    (["fast", *SMALL, "fast.encoder=torchscript:{tmp}/enc.pt"], ["not a TorchScript archive"]),
    (["fast", *SMALL, "fast.encoder=hf:{tmp}/no_model"], ["no model directory"]),
    (["fast", *SMALL, "fast.encoder=timm:vit:{tmp}/none.pth"], ["no checkpoint file"]),
    (["fast", *SMALL, "fast.encoder=clip"], ["unknown encoder"]),
])
def test_bad_jobs_are_refused_before_anything_is_written(tmp_path, capsys, argv, words):
    (tmp_path / "enc.pt").write_bytes(b"garbage, not a zip archive")
    out = tmp_path / "runs"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    fail(capsys, [*argv, f"out_dir={out}", "--quiet"], *words)
    assert not out.exists()


def test_flower_run_directory_name_is_checked_too():
    with pytest.raises(config.ConfigError, match="single folder name"):
        flower_load_config({"overrides": "name=.."})


def test_report_out_must_be_a_folder_of_its_own(tmp_path, capsys):
    runs = finished_run(tmp_path, capsys)
    before = snapshot(tmp_path)
    fail(capsys, ["report", str(runs), "--out", str(runs / "notes.txt")], "is a file")
    fail(capsys, ["report", str(runs), "--out", str(runs / "keep" / "report")],
         "inside the run directory")
    assert snapshot(tmp_path) == before


# -- wrong results with exit 0 -------------------------------------------------------------------
BAD_SETTINGS = [
    ("fl.lr=nan", "fl.lr must be a finite number"),
    ("fl.lr=inf", "fl.lr must be a finite number"),
    ("fl.lr=1e300", "fl.lr must be at most 3.403e+38 in size (float32)"),
    ("local_model.lr=1e39", "local_model.lr must be at most"),
    ("fl.lr=0", "fl.lr must be > 0"),
    ("fairfal.delta=nan", "fairfal.delta must be a finite number"),
    ("fairfal.delta=1.5", "fairfal.delta must be in [0, 1]"),
    ("fairfal.kappa=nan", "fairfal.kappa must be a finite number"),
    ("local_model.epochs=0", "local_model.epochs must be >= 1"),
    ("local_model.lr=-1", "local_model.lr must be > 0"),
    ("local_model.stop_accuracy=0", "local_model.stop_accuracy must be in (0, 1]"),
    ("partition.min_partition_size=-1", "partition.min_partition_size must be >= 0"),
    ("partition.alpha=inf", "partition.alpha must be a finite number"),
    ("runtime.eval_every=-1", "runtime.eval_every must be >= 0"),
    ("runtime.eval_batch=0", "runtime.eval_batch must be >= 1"),
    ("runtime.threads=-2", "runtime.threads must be >= 0"),
    ("fl.momentum=-1", "fl.momentum must be in [0, 1)"),
    ("fl.weight_decay=-1", "fl.weight_decay must be >= 0"),
    ("fl.lr_decay=0", "fl.lr_decay must be in (0, 1]"),
    ("fl.lr_decay_at=2", "fl.lr_decay_at must be in [0, 1]"),
    ("fl.mu=-0.1", "fl.mu must be >= 0"),
    ("fl.batch_size=1", "fl.batch_size must be >= 2"),
    ("budget.fraction=nan", "budget.fraction must be a finite number"),
    ("data.rho=0.05", "data.rho must be >= 1"),
    ("ifal.kd_ce_weight=2", "ifal.kd_ce_weight must be in [0, 1]"),
    ("fast.k=0", "fast.k must be >= 1"),
    ("seed=-1", "seed must be >= 0"),
    ("runtime.device=cuda:x", "runtime.device must be cpu, cuda or cuda:N"),
    ("runtime.device=gpu", "runtime.device must be cpu, cuda or cuda:N"),
    ("out_dir=", "out_dir cannot be empty"),
]


@pytest.mark.parametrize("setting, words", BAD_SETTINGS)
def test_every_bad_setting_is_one_line_before_anything_is_written(tmp_path, capsys, setting,
                                                                  words):
    out = tmp_path / "runs"
    argv = ["run", *SMALL, "--quiet", setting]
    if not setting.startswith("out_dir="):
        argv.append(f"out_dir={out}")
    fail(capsys, argv, words)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it(tmp_path, capsys):
    fail(capsys, ["run", *SMALL, f"out_dir={tmp_path / 'r'}", "runtime.device=cuda"],
         "has no CUDA GPU")
    assert not (tmp_path / "r").exists()


def test_divergence_stops_the_run_naming_cycle_and_round(tmp_path, capsys):
    out = tmp_path / "runs"
    fail(capsys, ["run", *SMALL, f"out_dir={out}", "fl.rounds=2", "fl.lr=1e38", "--quiet"],
         "training diverged in cycle 1, round 1", "lower fl.lr")
    (run_dir,) = out.iterdir()
    assert read_metrics(run_dir) == [] and not (run_dir / "checkpoint").exists()


def _npz(path: Path, y_train, y_test, n_test: int | None = None, seed: int = 0) -> None:
    g = np.random.default_rng(seed)
    n_test = len(y_test) if n_test is None else n_test
    np.savez(path, x_train=g.integers(0, 256, (len(y_train), 8, 8), dtype=np.uint8),
             y_train=np.asarray(y_train), x_test=g.integers(0, 256, (n_test, 8, 8),
                                                            dtype=np.uint8),
             y_test=np.asarray(y_test)[:n_test])


def test_a_label_only_in_the_test_split_is_named(tmp_path, capsys):
    _npz(tmp_path / "d.npz", np.arange(200) % 4, np.arange(40) % 5)
    fail(capsys, ["run", *SMALL, f"data.dataset=npz:{tmp_path / 'd.npz'}",
                  f"out_dir={tmp_path / 'r'}", "data.rho=none"],
         "label 4 has test samples but no train sample")


def test_a_stray_label_is_named(tmp_path, capsys):
    y = np.arange(200) % 4
    y[17] = 999
    _npz(tmp_path / "d.npz", y, np.arange(40) % 4)
    fail(capsys, ["run", *SMALL, f"data.dataset=npz:{tmp_path / 'd.npz'}",
                  f"out_dir={tmp_path / 'r'}", "data.rho=none"], "label 999", "gap")
    assert not (tmp_path / "r").exists()


def test_an_empty_test_split_is_refused(tmp_path, capsys):
    _npz(tmp_path / "d.npz", np.arange(200) % 4, np.zeros(0, np.int64))
    fail(capsys, ["run", *SMALL, f"data.dataset=npz:{tmp_path / 'd.npz'}",
                  f"out_dir={tmp_path / 'r'}", "data.rho=none"], "test split is empty")


def test_missing_data_root_warns_once(tmp_path, recwarn):
    assert main(["partition", "data.dataset=fmnist", f"data.data_root={tmp_path / 'nope'}"]) == 0
    said = [str(w.message) for w in recwarn if "searching the other data roots" in str(w.message)]
    assert len(said) == 1 and "does not exist" in said[0]


# -- a run is the same run wherever it is reached from ------------------------------------------
NPZ_RUN = ["data.rho=none", "partition.num_clients=2", "budget.cycles=3", "fl.rounds=1",
           "fl.local_epochs=1", "model.backbone=resnet8_preact16", "name=r", "--quiet"]


def test_data_changed_between_run_and_resume_is_refused(tmp_path, capsys):
    data = tmp_path / "d.npz"
    _npz(data, np.arange(400) % 4, np.arange(80) % 4)
    argv = ["run", f"data.dataset=npz:{data}", f"out_dir={tmp_path / 'runs'}", *NPZ_RUN]
    cfg = config.load(None, overrides=config.parse_overrides(argv[1:-1]))
    run(cfg, stop_after=0)
    before = snapshot(tmp_path / "runs")
    _npz(data, np.arange(400) % 4, np.arange(80) % 4, seed=1)  # new pixels, same labels
    fail(capsys, argv, "different data")
    y = np.arange(400) % 4
    y[:4] = y[:4][::-1]
    _npz(data, y, np.arange(80) % 4)  # same pixels, changed labels
    fail(capsys, argv, "different data")
    assert snapshot(tmp_path / "runs") == before
    _npz(data, np.arange(400) % 4, np.arange(80) % 4)  # the data restored: it resumes ...
    moved = tmp_path / "moved.npz"
    os.replace(data, moved)  # ... from wherever the same bytes are now
    argv[1] = f"data.dataset=npz:{moved}"
    assert main(argv) == 0
    assert read_status(tmp_path / "runs" / "r")["complete"] is True


def test_relative_absolute_moved_and_other_data_root_are_the_same_run(tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["run", *SMALL, "out_dir=runs", "name=r", "--quiet"]
    cfg = config.load(None, overrides=config.parse_overrides(argv[1:-1]))
    run(cfg, stop_after=0)  # a partial run reached through a relative out_dir
    # resumed through the absolute path, with a data root that holds nothing
    assert main([*argv, f"out_dir={tmp_path / 'runs'}",
                 f"data.data_root={tmp_path}"]) == 0
    capsys.readouterr()
    metrics = (tmp_path / "runs" / "r" / "metrics.csv").read_text()
    os.replace(tmp_path / "runs", tmp_path / "moved")  # the runs folder moved: skipped
    assert main([*argv, "out_dir=moved"]) == 0
    assert "already complete" in capsys.readouterr().err
    assert (tmp_path / "moved" / "r" / "metrics.csv").read_text() == metrics
    # a real difference names the key, and says what --overwrite would cost
    fail(capsys, [*argv, "out_dir=moved", "fl.rounds=2"], "fl.rounds: 1 -> 2",
         "--overwrite would discard its 2 finished cycle(s)")
    # where it computes is not identity: another thread count continues the same run
    assert main([*argv, "out_dir=moved", "runtime.threads=1"]) == 0


# -- tracebacks where one line belongs -----------------------------------------------------------
def test_out_dir_or_run_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    fail(capsys, ["run", *SMALL, f"out_dir={tmp_path / 'file'}"], "is a file")
    fail(capsys, ["run", *SMALL, f"out_dir={tmp_path / 'file' / 'deeper'}"], "is a file")
    fail(capsys, ["run", *SMALL, f"out_dir={tmp_path}", "name=file"], "is a file")
    assert snapshot(tmp_path) == before


def test_config_file_that_is_not_text(tmp_path, capsys):
    (tmp_path / "c.toml").write_bytes(b"\xff\xfe\x00binary")
    fail(capsys, ["run", str(tmp_path / "c.toml")], "not UTF-8 text")


@pytest.mark.parametrize("content", [b"", b"garbage bytes", None])
def test_unreadable_checkpoint_says_how_to_restart(tmp_path, capsys, content):
    argv = ["run", *SMALL, f"out_dir={tmp_path}", "name=r", "budget.cycles=3", "--quiet"]
    cfg = config.load(None, overrides=config.parse_overrides(argv[1:-1]))
    run(cfg, stop_after=0)
    ck = tmp_path / "r" / "checkpoint" / "latest.pt"
    if content is None:  # truncated
        content = ck.read_bytes()[: ck.stat().st_size // 2]
    ck.write_bytes(content)
    before = snapshot(tmp_path)
    fail(capsys, argv, "checkpoint of run", "unreadable", "--overwrite")
    assert snapshot(tmp_path) == before
    assert main([*argv, "--overwrite"]) == 0


def test_comm_refuses_non_positive_counts(capsys):
    fail(capsys, ["comm", "--model", "cnn4", "--dataset", "digits", "--clients", "-3"],
         "--clients must be >= 1")
    fail(capsys, ["comm", "--model", "cnn4", "--dataset", "digits", "--rounds", "0"],
         "--rounds must be >= 1")


# -- also: locks, temporary files ---------------------------------------------------------------
def test_a_second_process_on_the_same_run_is_told_who_holds_it(tmp_path, capsys):
    argv = ["run", *SMALL, f"out_dir={tmp_path}", "name=r", "--quiet"]
    cfg = config.load(None, overrides=config.parse_overrides(argv[1:-1]))
    holder = RunDir.of(cfg)
    holder._lock()
    try:
        fail(capsys, argv, "is in use by falkit pid", str(os.getpid()))
        with pytest.raises(RunLocked):
            RunDir.of(cfg)._lock()
    finally:
        holder._unlock()
    assert not (tmp_path / "r").exists() and not holder.lock_path.exists()
    assert main(argv) == 0  # free again


def test_temporary_files_of_a_killed_write_are_cleaned_up(tmp_path):
    argv = [*SMALL, f"out_dir={tmp_path}", "name=r", "budget.cycles=3"]
    cfg = config.load(None, overrides=config.parse_overrides(argv))
    run(cfg, stop_after=0)
    litter = [tmp_path / "r" / ".metrics.csv.a1b2c3d4", tmp_path / "r" / "checkpoint" /
              ".latest.pt.zz_9x8y7"]
    for p in litter:
        p.write_bytes(b"half a write")
    (tmp_path / "r" / "user_notes.md").write_text("mine")
    run(cfg)
    assert not any(p.exists() for p in litter)
    assert (tmp_path / "r" / "user_notes.md").read_text() == "mine"


# -- file systems: read-only, full ---------------------------------------------------------------
def _mount(where: Path, opts: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)


def test_read_only_out_dir(tmp_path, capsys):
    ro = tmp_path / "ro"
    _mount(ro, "ro,size=100k")
    try:
        fail(capsys, ["run", *SMALL, f"out_dir={ro}", "--quiet"], "Read-only file system")
    finally:
        _umount(ro)


def test_disk_full_keeps_the_last_checkpoint_and_resumes_elsewhere(tmp_path, capsys):
    # (no saved models: the 500k disk holds one checkpoint, the test is about those)
    argv = ["run", *SMALL, "budget.cycles=3", "name=r", "runtime.save_models=none", "--quiet"]
    full = tmp_path / "small"
    # room for one checkpoint (~330 KB), not for the temporary file of the next one
    _mount(full, "size=500k")
    try:
        fail(capsys, [*argv, f"out_dir={full}"], "No space left on device", str(full / "r"))
        done = read_status(full / "r").get("cycles_done", 0)
        metrics = read_metrics(full / "r")
        assert len(metrics) == done == 1
        (tmp_path / "big").mkdir()
        subprocess.run(["cp", "-a", str(full / "r"), str(tmp_path / "big" / "r")], check=True)
    finally:
        _umount(full)
    # the run moved to a larger disk (another out_dir) resumes after its last good cycle
    assert main([*argv, f"out_dir={tmp_path / 'big'}"]) == 0
    rows = read_metrics(tmp_path / "big" / "r")
    assert [r["cycle"] for r in rows] == [0, 1, 2] and rows[:len(metrics)] == metrics
    assert json.loads((tmp_path / "big" / "r" / "status.json").read_text())["complete"]
