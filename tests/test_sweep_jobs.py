"""`falkit sweep --jobs N`: N runs at once in processes of their own, the same sweep.csv as
--jobs 1, resumable, a failed run does not stop the others (issue 14, item 4)."""

import csv
import operator
import os

from falkit.cli import main
from falkit.config import identity
from falkit.parallel import run_jobs
from falkit.rundir import RunDir

# digits, 2 cycles of a few rounds: ~2 s a run in process, ~5 s in a fresh process (torch)
SMALL = ["data.dataset=digits", "data.rho=none", "partition.num_clients=3", "partition.alpha=1",
         "budget.cycles=2", "fl.rounds=3", "fl.local_epochs=2", "fl.lr=0.05",
         "model.backbone=resnet8_preact16"]


def _rows(path):
    """sweep.csv without the timing columns (wall-clock, never equal twice)."""
    with path.open() as f:
        return [{k: v for k, v in r.items() if not k.startswith("time_")}
                for r in csv.DictReader(f)]


def test_jobs_2_writes_the_rows_of_jobs_1_and_resumes(capsys, tmp_path):
    # the same thread count in both (the default gives each of 2 jobs CPUs / 2 threads, and
    # another thread layout may change float rounding)
    argv = ["sweep", *SMALL, "runtime.threads=1", "--strategies", "random,entropy@G",
            "--seeds", "0", "--quiet"]
    assert main([*argv, f"out_dir={tmp_path / 'one'}"]) == 0
    capsys.readouterr()
    two = [*argv, f"out_dir={tmp_path / 'two'}", "--jobs", "2"]
    assert main(two) == 0
    cap = capsys.readouterr()
    assert "2 at once" in cap.err
    for word in ("[1/2] start", "[2/2] start", "[1/2] done", "[2/2] done", "accuracy"):
        assert word in cap.err, word
    sweep = tmp_path / "two" / "sweep" / "sweep.csv"
    rows = _rows(sweep)
    assert len(rows) == 2 * 2 and rows == _rows(tmp_path / "one" / "sweep" / "sweep.csv")
    assert [r["strategy"] for r in rows] == ["random", "random", "entropy@G", "entropy@G"]
    runs = sorted(p for p in (tmp_path / "two").iterdir() if p.name != "sweep")
    assert [p.name for p in runs] == sorted(p.name for p in (tmp_path / "one").iterdir()
                                            if p.name != "sweep")
    assert not [p for p in (tmp_path / "two").iterdir() if p.name.endswith(".lock")]

    # the same command again: every run is skipped, sweep.csv is the same
    stamps = {p: (p / "metrics.csv").stat().st_mtime_ns for p in runs}
    assert main(two) == 0
    assert "(2 already complete)" in capsys.readouterr().err
    assert _rows(sweep) == rows
    assert {p: (p / "metrics.csv").stat().st_mtime_ns for p in runs} == stamps

    # more seeds: the two finished runs are read, the two new ones run at once
    assert main([*two[:-2], "--seeds", "0,1", "--jobs", "2"]) == 0
    err = capsys.readouterr().err
    assert "(2 already complete), 2 at once" in err
    assert err.count("already complete digits") == 2 and err.count("] done ") == 2
    assert {p: (p / "metrics.csv").stat().st_mtime_ns for p in runs} == stamps
    more = _rows(sweep)
    assert len(more) == 4 * 2 and [r for r in more if r["seed"] == "0"] == rows


def test_default_threads_split_the_cpus_and_keep_the_run(tmp_path):
    """runtime.threads = 0 gives each of N jobs CPUs / N threads, set by the worker: the
    job's config is not changed, the run directory is the one --jobs 1 uses, and neither the
    run name nor resume depends on the thread count (identity)."""
    from falkit import config as config_mod
    from falkit.cli import _parallel_plan

    def load(*extra):
        return config_mod.load(overrides=dict(s.split("=", 1) for s in
                                              [*SMALL, f"out_dir={tmp_path}", *extra]))

    cfgs = [load(f"strategy={st}") for st in ("random", "entropy@G", "random")]
    before = [RunDir.of(c).path for c in cfgs]
    n, firsts, left, threads = _parallel_plan(cfgs, 4)
    assert n == 2 and firsts == [0, 1, 0] and left == [0, 1]  # the repeated job runs once
    assert threads == [max(1, len(os.sched_getaffinity(0)) // 2)] * 3
    assert [c.runtime.threads for c in cfgs] == [0] * 3
    assert [RunDir.of(c).path for c in cfgs] == before
    # hardware settings name no other run: the same experiment, the same directory
    assert RunDir.of(load("runtime.threads=1")).path == before[0]
    assert RunDir.of(load("runtime.batch_clients=on", "runtime.eval_batch=64")).path == before[0]
    assert RunDir.of(load("seed=1")).path != before[0]
    assert "runtime.threads" not in identity(cfgs[0])
    assert _parallel_plan([load("runtime.threads=3", f"strategy={st}")  # set: kept
                           for st in ("random", "entropy@G")], 2)[3] == [0, 0]
    assert _parallel_plan(cfgs[:1], 4)[3] == [0]  # one process: torch's default, as --jobs 1


def test_a_failing_run_does_not_stop_the_others(capsys, tmp_path):
    # budget.fraction=0.6 for 2 cycles needs more labels than a client holds: that is only
    # known once the data are loaded, in the worker, after every job was checked
    argv = ["sweep", *SMALL, f"out_dir={tmp_path}", "--strategies", "random",
            "--grid", "budget.fraction=0.05,0.6", "--jobs", "2"]
    assert main(argv) == 2
    cap = capsys.readouterr()
    bad = next(line for line in cap.err.splitlines() if line.startswith("[2/2] failed"))
    name = bad.split()[2]
    assert "impossible budget" in bad
    assert "falkit: error: 1 of 2 runs failed (sweep.csv holds the 1 of 2 runs" in cap.err
    assert f"  {name}: impossible budget: client" in cap.err
    assert "[1/2] done" in cap.err and "sweep results (partial, 1 of 2 runs)" in cap.out
    rows = _rows(tmp_path / "sweep" / "sweep.csv")
    assert len(rows) == 2 and {r["budget.fraction"] for r in rows} == {"0.05"}
    assert not (tmp_path / name).exists()  # it failed before writing anything
    # rerun: the finished run is skipped (read, not run), the failing one fails again
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert "(1 already complete), 1 at once" in cap.err and "[1/2] already complete" in cap.err
    assert f"  {name}: impossible budget" in cap.err
    assert _rows(tmp_path / "sweep" / "sweep.csv") == rows


def test_run_jobs_keeps_job_order_and_reports_each_failure(capsys):
    """The scheduler alone, with jobs any process can import: a result, an exception (a bug:
    exit code 1, with its traceback on stderr), a process that exits without an answer."""
    starts, ends = [], []
    out = run_jobs(operator.truediv, [(6, 3), (1, 0), (9, 3)], 2, on_start=starts.append,
                   on_finish=lambda i, o: ends.append(i))
    assert [o.ok for o in out] == [True, False, True]
    assert (out[0].value, out[2].value) == (2.0, 3.0)
    assert (out[1].error, out[1].code) == ("ZeroDivisionError: division by zero", 1)
    assert starts == [0, 1, 2] and sorted(ends) == [0, 1, 2]
    (died,) = run_jobs(os._exit, [(3,)], 1)
    assert not died.ok and "ended without a result (exit code 3)" in died.error


def test_jobs_must_be_a_positive_integer(capsys, tmp_path):
    for bad in ("0", "-2", "two"):
        assert main(["sweep", *SMALL, f"out_dir={tmp_path}", "--jobs", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("falkit: error: --jobs must be an integer >= 1") and \
            err.count("\n") == 1, err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
