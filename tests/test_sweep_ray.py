"""`falkit sweep --ray`: a real two-node Ray cluster on loopback (issue 28). One test doing
much, since a cluster takes ~10 s to start: the runs spread over both nodes and give the
rows of --jobs 1; GPU runs go to the node that declares a GPU and see only theirs; a bad
job among good ones is reported with its one-line error (exit 2); a node killed mid-sweep
costs nothing: Ray runs its task again on the other node, where the run resumes from its
checkpoint, and the results are those of an uninterrupted sweep."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tests.ray_cluster import BIN, Cluster
from tests.test_sweep_jobs import _rows

from falkit import config as config_mod
from falkit.cli import main
from falkit.rundir import RunDir

pytest.importorskip("ray")

# digits; four cycles, so that a run killed after its first still has most of it to go
JOB = ["data.dataset=digits", "data.rho=none", "partition.num_clients=3", "partition.alpha=1",
       "budget.cycles=4", "fl.rounds=3", "fl.local_epochs=2", "fl.lr=0.05",
       "model.backbone=resnet8_preact16", "runtime.threads=1"]
GRID = ["--strategies", "random,entropy@G,margin@G", "--seeds", "0,1"]
START = re.compile(r"\] start (\S+) on node (\w+) \(")


class Sweep:
    """`falkit sweep ... --ray` in a process of its own; its output read by a thread, so
    that waiting for a line is bounded."""

    def __init__(self, cluster: Cluster, cwd: Path, *args: str):
        self.proc = subprocess.Popen([str(BIN / "falkit"), "sweep", *args, "--ray",
                                      cluster.address], cwd=cwd, env=cluster.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")  # the end

    def wait_for(self, pattern: str, timeout: float = 240) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            assert line, f"the sweep ended without {pattern!r}:\n{self.text}"
            self.seen.append(line)
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"no {pattern!r} in {timeout} s:\n{self.text}")

    @property
    def text(self) -> str:
        return "".join(self.seen)

    def end(self, timeout: float = 300) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self.kill()
        while (line := self.lines.get(timeout=10)) != "":
            self.seen.append(line)
        return code, self.text

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _wait_for_a_cycle(status: Path, timeout: float = 240) -> None:
    """Until the run has finished a cycle (and not yet all)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            s = json.loads(status.read_text())
            if s["cycles_done"] >= 1:
                assert not s["complete"], f"{status.parent.name} ended before it was stopped"
                return
        time.sleep(0.02)
    raise AssertionError(f"{status.parent.name} finished no cycle in {timeout} s")


def _same_runs(a: Path, b: Path, n: int = 6) -> None:
    """`a` holds n of the runs of `b`, with the same rows (in sweep.csv, in job order, and
    in each metrics.csv); no lock is left."""
    runs = sorted(p.name for p in a.iterdir() if p.name != "sweep" and p.is_dir())
    assert len(runs) == n and set(runs) <= {p.name for p in b.iterdir()}
    assert _rows(a / "sweep" / "sweep.csv") == [r for r in _rows(b / "sweep" / "sweep.csv")
                                               if r["run"] in runs]
    for name in runs:
        assert _rows(a / name / "metrics.csv") == _rows(b / name / "metrics.csv"), name
    assert not [p for p in a.iterdir() if p.name.endswith(".lock")]


@pytest.mark.slow
def test_a_sweep_on_a_two_node_ray_cluster(tmp_path, capsys):
    cluster = Cluster()
    sweeps: list[Sweep] = []

    def sweep(*args: str) -> Sweep:
        sweeps.append(Sweep(cluster, tmp_path, *args))
        return sweeps[-1]

    try:
        cluster.start()
        nodes = cluster.nodes()
        assert len(nodes) == 2, nodes
        (gpu_node,) = [n for n, r in nodes.items() if r.get("GPU")]

        # the reference: --jobs 1, in this process
        assert main(["sweep", *JOB, *GRID, f"out_dir={tmp_path / 'ref'}", "--quiet"]) == 0
        capsys.readouterr()

        # 1. six runs over both nodes: the rows and metrics of --jobs 1 (relative out_dir:
        # the tasks run in the driver's working directory)
        code, text = sweep(*JOB, *GRID, "out_dir=a").end()
        assert code == 0, text
        assert "6 runs (0 already complete), on Ray (2 nodes), 1 CPU per run" in text
        ran_on = dict(START.findall(text))
        assert len(ran_on) == 6 and set(ran_on.values()) == set(nodes), text
        assert len(re.findall(r"\] done \S+ in [\d.]+ s on node \w+ \(", text)) == 6, text
        assert "sweep results: a/sweep/sweep.csv" in text
        _same_runs(tmp_path / "a", tmp_path / "ref")
        # again: every run is complete and only read (no cluster needed for that)
        code, text = sweep(*JOB, *GRID, "out_dir=a").end()
        assert code == 0 and "(6 already complete)" in text, text
        _same_runs(tmp_path / "a", tmp_path / "ref")

        # 2. GPU runs: only the node with a GPU takes them, two at once on its one GPU,
        # each seeing GPU 0; runtime.device=cuda is their default, refused where torch
        # sees no CUDA (this machine), with the one line of `falkit run`
        small = [*JOB[:4], "budget.cycles=1", *JOB[5:]]
        code, text = sweep(*small, "out_dir=gpu", "--seeds", "7,8", "--gpus-per-run", "0.5",
                           "--cpus-per-run", "0.5", "runtime.device=cpu").end()
        assert code == 0, text
        assert "on Ray (1 node), 0.5 CPU and 0.5 GPU per run" in text
        starts = re.findall(r"\] start \S+ on node (\w+) \(\S+\), GPU (\S+)", text)
        assert starts == [(gpu_node, "0")] * 2, text
        runs = [p for p in (tmp_path / "gpu").iterdir() if p.name != "sweep"]
        began = [(p / "config.toml").stat().st_mtime for p in runs]
        ended = [(p / "metrics.csv").stat().st_mtime for p in runs]
        assert max(began) < min(ended), "the two GPU runs did not overlap"
        code, text = sweep(*small, "out_dir=gpu", "--seeds", "9", "--gpus-per-run", "1").end()
        assert code == 2, text
        assert "per run, runtime.device=cuda" in text
        assert re.search(r"failed \S+_s9_\S+ \(.*\): runtime\.device = cuda, but this "
                         r"machine .* has no CUDA GPU", text), text
        assert "Traceback" not in text

        # 3. a bad job (a file that is no npz) among good ones, and a run another process
        # holds: the others finish, the bad one is named with its one-line error, the held
        # one is skipped with a note; exit 2, sweep.csv holds the finished ones
        (tmp_path / "bad.npz").write_bytes(b"not an archive")
        held = config_mod.load(None, None, dict(config_mod.parse_overrides(
            [*small, "data.dataset=digits", "seed=1"]))).run_name()
        lock = RunDir(tmp_path / "bad" / held)
        lock.path.parent.mkdir(parents=True)
        lock._lock()
        try:
            code, text = sweep(*small, "out_dir=bad", "--seeds", "0,1", "--grid",
                               "data.dataset=npz:bad.npz,digits").end()
        finally:
            lock._unlock()
        assert code == 2, text
        assert re.search(r"failed npz-bad\.npz\S+ \(.*\): cannot read bad\.npz: not an npz "
                         r"archive", text), text
        assert re.search(rf"skipped {held}: in use by falkit pid {os.getpid()} ", text), text
        assert "1 of 4 runs skipped, in use by another process" in text
        assert text.count("] done digits") == 1 and "2 of 4 runs failed" in text
        assert {r["data.dataset"] for r in csv.DictReader(
            (tmp_path / "bad" / "sweep" / "sweep.csv").open())} == {"digits"}

        # 4. Ctrl-C: the tasks are cancelled (exit 130); the same command resumes the runs
        # from their checkpoints, with the results of an uninterrupted sweep
        two = [*JOB, "--strategies", "random,entropy@G", "--seeds", "0", "out_dir=c"]
        s = sweep(*two)
        first = s.wait_for(START.pattern)[1]
        _wait_for_a_cycle(tmp_path / "c" / first / "status.json")
        s.proc.send_signal(signal.SIGINT)
        code, text = s.end(timeout=60)
        assert code == 130 and "falkit: interrupted" in text, text
        code, text = sweep(*two).end()
        assert code == 0 and re.search(rf"done {first} in .* \(resumed at cycle", text), text
        _same_runs(tmp_path / "c", tmp_path / "ref", n=2)

        # 5. the worker node dies mid-run: its task runs again on the head node, the run
        # resumes from its checkpoint, the results are those of the uninterrupted sweep
        s = sweep(*JOB, *GRID, "out_dir=b")
        victim = s.wait_for(rf"\] start (\S+) on node {gpu_node} \(")[1]
        _wait_for_a_cycle(tmp_path / "b" / victim / "status.json")
        cluster.kill_worker()
        code, text = s.end()
        assert code == 0, text
        assert re.search(rf"start {victim} on node \w+ .*\(try 2: the last one's node or "
                         r"process died\)", text), text
        assert re.search(rf"done {victim} in .* \(resumed at cycle [234]\)", text), text
        _same_runs(tmp_path / "b", tmp_path / "ref")
    finally:
        for s in sweeps:
            s.kill()
        cluster.stop()


def test_ray_flags_are_checked_before_anything_is_written(tmp_path, capsys):
    from tests.deployment import free_ports

    base = ["sweep", "data.dataset=digits", f"out_dir={tmp_path / 'o'}"]
    (port,) = free_ports(1)  # nothing listens there
    for extra, why in ((["--ray", "auto", "--jobs", "2"], "give --ray or --jobs, not both"),
                       (["--cpus-per-run", "2"], "--cpus-per-run and --gpus-per-run are for "
                                                 "--ray"),
                       (["--ray", "auto", "--gpus-per-run", "-1"], "--gpus-per-run must be 0 "
                                                                   "or a number >= 0.0001"),
                       (["--ray", "auto", "--cpus-per-run", "0.00001"], "--cpus-per-run must "
                                                                        "be 0 or a number"),
                       (["--ray", ""], "--ray must be auto or HEAD:PORT"),
                       (["--ray", "auto", "--cpus-per-run", "0"], "--cpus-per-run 0 needs "
                                                                  "--gpus-per-run > 0"),
                       (["--ray", "head-without-port"], "--ray must be auto or HEAD:PORT"),
                       (["--ray", f"127.0.0.1:{port}"], f"--ray 127.0.0.1:{port}: no Ray head "
                                                        "answers there")):
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, err
        assert not (tmp_path / "o").exists()


def test_a_ray_tasks_retry_waits_for_its_own_dead_try_and_only_for_it(tmp_path):
    """The lock of a task's earlier try (its node died, its process not yet) is waited for;
    another process's lock is not: that run is skipped (RunLocked) at once."""
    from falkit import rundir

    child = ("import sys, time, os; from pathlib import Path; from falkit import rundir; "
             "rundir.LOCK_TAG = 'ray task abc'; d = rundir.RunDir(Path(sys.argv[1])); "
             "d._lock(); print('locked', flush=True); time.sleep(2.0); os._exit(0)")
    proc = subprocess.Popen([sys.executable, "-c", child, str(tmp_path / "run")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        d = rundir.RunDir(tmp_path / "run")
        for tag in ("", "ray task other"):
            rundir.LOCK_TAG = tag
            t0 = time.monotonic()
            with pytest.raises(rundir.RunLocked) as e:
                d._lock()
            assert "(ray task abc)" in e.value.holder and time.monotonic() - t0 < 1.0
        rundir.LOCK_TAG = "ray task abc"
        t0 = time.monotonic()
        d._lock()  # returns once the dead try's process is gone
        assert proc.poll() is not None and time.monotonic() - t0 > 0.3
        assert "(ray task abc)" in (tmp_path / ".run.lock").read_text()
        d._unlock()
    finally:
        rundir.LOCK_TAG = ""
        proc.kill()
        proc.wait()
