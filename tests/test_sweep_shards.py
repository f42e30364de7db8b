"""`falkit sweep --list` and `--shard I/N` (a Slurm job array without Ray), and a run that a
live process holds: skipped with a note, not failed (issue 28, items 2 and 3)."""

import csv
import subprocess
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from tests.test_sweep_jobs import SMALL, _rows

from falkit.cli import main, shard_jobs
from falkit.rundir import RunDir


@given(st.lists(st.integers(0, 9), max_size=30), st.integers(1, 7))
def test_every_job_is_in_exactly_one_shard(names, n):
    paths = [Path(f"run{k}") for k in names]
    shards = [shard_jobs(paths, i, n) for i in range(n)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(len(paths)))  # each job once, over all shards
    for s in shards:  # jobs of one run directory share a shard, and shards are in job order
        assert s == sorted(s)
        for i in s:
            assert all(j in s for j, p in enumerate(paths) if p == paths[i])
    # the distinct runs are dealt in turn: shard sizes differ by at most one run
    sizes = [len({paths[i] for i in s}) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_list_prints_each_job_and_its_command(capsys, tmp_path):
    argv = ["sweep", *SMALL, f"out_dir={tmp_path}", "--strategies", "random,entropy@G",
            "--seeds", "0,1,2", "--grid", "partition.alpha=1,100", "--list"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * 3 * 2
    names = [line.split("\t")[0] for line in lines]
    assert len(set(names)) == 12 and not list(tmp_path.iterdir())  # ran nothing
    name, command = lines[-1].split("\t")
    assert command.startswith("falkit run ") and "strategy=entropy@G" in command
    assert "seed=2" in command and "partition.alpha=100" in command
    # the printed command names the same run directory
    from falkit import config as config_mod

    words = command.split()[2:]
    cfg = config_mod.load(overrides=dict(w.split("=", 1) for w in words))
    assert cfg.run_name() == name
    shards = []
    for i in range(5):
        assert main([*argv, "--shard", f"{i}/5"]) == 0
        shards.append(capsys.readouterr().out.splitlines())
    assert sorted(sum(shards, [])) == sorted(lines)
    assert [len(s) for s in shards] == [3, 3, 2, 2, 2]


def test_bad_shard_is_one_line(capsys, tmp_path):
    for bad in ("2/2", "1", "a/b", "0/0", "-1/3"):
        assert main(["sweep", *SMALL, f"out_dir={tmp_path}", f"--shard={bad}"]) == 2
        err = capsys.readouterr().err
        assert "--shard must be I/N" in err and len(err.strip().splitlines()) == 1


def test_two_shards_at_once_run_every_job_once(tmp_path):
    argv = [str(Path(sys.executable).parent / "falkit"), "sweep", *SMALL, "runtime.threads=1",
            f"out_dir={tmp_path}", "--strategies", "random,entropy@G", "--seeds", "0,1",
            "--quiet"]
    procs = [subprocess.Popen([*argv, "--shard", f"{i}/2"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    tables = [tmp_path / "sweep" / f"sweep.shard{i}of2.csv" for i in range(2)]
    runs = [{r["run"] for r in _rows(t)} for t in tables]
    assert len(runs[0]) == len(runs[1]) == 2 and not runs[0] & runs[1]
    done = {p.name for p in tmp_path.iterdir() if p.is_dir() and p.name != "sweep"}
    assert done == runs[0] | runs[1]
    for name in done:  # each run was started by one shard only, and ran its 2 cycles
        assert sum(name in err for _, err in outs) == 1, name
        with (tmp_path / name / "metrics.csv").open() as f:
            assert [r["cycle"] for r in csv.DictReader(f)] == ["0", "1"]
    assert not any("runs skipped" in err for _, err in outs)


def test_a_locked_run_is_skipped_not_failed(capsys, tmp_path):
    argv = ["sweep", *SMALL, "runtime.threads=1", f"out_dir={tmp_path}", "--strategies",
            "random,entropy@G", "--seeds", "0", "--quiet"]
    assert main([*argv, "--list"]) == 0
    held = capsys.readouterr().out.splitlines()[0].split("\t")[0]
    other = RunDir(tmp_path / held)  # as another host's sweep holds it
    other._lock()
    try:
        for jobs in ("1", "2"):
            assert main([*argv, "--jobs", jobs]) == 0, jobs
            err = capsys.readouterr().err
            assert f"skipped {held}: " in err and "1 of 2 runs skipped, in use" in err
            assert f"pid {__import__('os').getpid()}" in err  # who holds it
            assert "failed" not in err
            rows = _rows(tmp_path / "sweep" / "sweep.csv")
            assert held not in {r["run"] for r in rows} and len(rows) == 2  # the other run
    finally:
        other._unlock()
    assert main(argv) == 0  # released: the same command runs it now
    err = capsys.readouterr().err
    assert f"skipped {held}" not in err and "runs skipped" not in err
    assert held in {r["run"] for r in _rows(tmp_path / "sweep" / "sweep.csv")}
