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
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from tests.deployment import free_ports
from tests.test_sweep_jobs import _rows

from falkit.cli import main

pytest.importorskip("ray")

BIN = Path(sys.executable).parent
# digits; four cycles, so that a run killed after its first still has most of it to go
JOB = ["data.dataset=digits", "data.rho=none", "partition.num_clients=3", "partition.alpha=1",
       "budget.cycles=4", "fl.rounds=3", "fl.local_epochs=2", "fl.lr=0.05",
       "model.backbone=resnet8_preact16", "runtime.threads=1"]
GRID = ["--strategies", "random,entropy@G,margin@G", "--seeds", "0,1"]
START = re.compile(r"\] start (\S+) on node (\w+) \(")


def _tree(roots: set[int]) -> list[int]:
    """`roots` and every process below them (a node's workers carry their own title, not
    the node's temp dir)."""
    parent = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += [c for c, pp in parent.items() if pp == pid and c not in out]
    return out


def _pids(pattern: str) -> set[int]:
    """The processes whose command line matches `pattern` (a regular expression)."""
    found = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and p.name != str(os.getpid()):
            with contextlib.suppress(OSError):
                line = (p / "cmdline").read_bytes().replace(b"\0", b" ")
                if re.search(pattern, line.decode(errors="replace")):
                    found.add(int(p.name))
    return found


def _kill(pattern: str) -> None:
    for pid in _tree(_pids(pattern)):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


class Cluster:
    """A Ray head and one worker node on 127.0.0.1, one CPU each; the worker declares a GPU
    (scheduling only: this machine has none). Each node has its own temp dir, by which its
    processes are found (and killed)."""

    def __init__(self) -> None:
        (self.port,) = free_ports(1)
        self.address = f"127.0.0.1:{self.port}"
        # short paths: Ray's unix sockets live under the temp dir (108 bytes at most)
        self.head_dir = tempfile.mkdtemp(prefix="frh", dir="/tmp")
        self.worker_dir = tempfile.mkdtemp(prefix="frw", dir="/tmp")
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}

    def start(self) -> None:
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
        subprocess.run([str(BIN / "ray"), "start", "--head", "--port", str(self.port),
                        "--temp-dir", self.head_dir, "--include-dashboard", "false", *common],
                       check=True, capture_output=True, env=self.env, timeout=120)
        subprocess.run([str(BIN / "ray"), "start", "--address", self.address, "--temp-dir",
                        self.worker_dir, "--num-gpus", "1", *common],
                       check=True, capture_output=True, env=self.env, timeout=120)

    def nodes(self) -> dict[str, dict]:
        """node id (8 characters, as falkit prints it) -> its resources."""
        code = (f"import json, ray; ray.init(address={self.address!r}, logging_level=40); "
                "print(json.dumps({n['NodeID'][:8]: n['Resources'] for n in ray.nodes() "
                "if n['Alive']}))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=self.env, timeout=120, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    def kill_worker(self) -> None:
        """The worker node dies: its raylet and every process under it, SIGKILL."""
        _kill(f"raylet_socket_name={re.escape(self.worker_dir)}")

    def stop(self) -> None:
        # the client server names only the head's address
        for pattern in (re.escape(self.worker_dir), re.escape(self.head_dir),
                        rf"--address=[\d.]+:{self.port} "):
            _kill(pattern)
        for folder in (self.worker_dir, self.head_dir):
            shutil.rmtree(folder, ignore_errors=True)


def _sweep(cluster: Cluster, cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "falkit"), "sweep", *args, "--ray", cluster.address],
                            cwd=cwd, env=cluster.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _end(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def _same_runs(a: Path, b: Path) -> None:
    assert _rows(a / "sweep" / "sweep.csv") == _rows(b / "sweep" / "sweep.csv")
    runs = sorted(p.name for p in b.iterdir() if p.name != "sweep" and p.is_dir())
    assert len(runs) == 6 and runs == sorted(p.name for p in a.iterdir()
                                             if p.name != "sweep" and p.is_dir())
    for name in runs:
        assert _rows(a / name / "metrics.csv") == _rows(b / name / "metrics.csv"), name
    assert not [p for p in a.iterdir() if p.name.endswith(".lock")]


@pytest.mark.slow
def test_a_sweep_on_a_two_node_ray_cluster(tmp_path, capsys):
    cluster = Cluster()
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
        code, text = _end(_sweep(cluster, tmp_path, *JOB, *GRID, "out_dir=a"))
        assert code == 0, text
        assert "6 runs (0 already complete), on Ray (2 nodes), 1 CPU per run" in text
        ran_on = dict(START.findall(text))
        assert len(ran_on) == 6 and set(ran_on.values()) == set(nodes), text
        assert text.count("] done ") == 6 and "sweep results: a/sweep/sweep.csv" in text
        _same_runs(tmp_path / "a", tmp_path / "ref")
        # again: every run is complete and only read (no cluster needed for that)
        code, text = _end(_sweep(cluster, tmp_path, *JOB, *GRID, "out_dir=a"))
        assert code == 0 and "(6 already complete)" in text, text
        _same_runs(tmp_path / "a", tmp_path / "ref")

        # 2. GPU runs: only the node with a GPU takes them, two at once on its one GPU,
        # each seeing GPU 0; runtime.device=cuda is their default, refused where torch
        # sees no CUDA (this machine), with the one line of `falkit run`
        small = [*JOB[:4], "budget.cycles=1", *JOB[5:]]
        code, text = _end(_sweep(cluster, tmp_path, *small, "out_dir=gpu", "--seeds", "7,8",
                                 "--gpus-per-run", "0.5", "--cpus-per-run", "0.5",
                                 "runtime.device=cpu"))
        assert code == 0, text
        assert "on Ray (1 node), 0.5 CPU and 0.5 GPU per run" in text
        starts = re.findall(r"\] start \S+ on node (\w+) \(\S+\), GPU (\S+)", text)
        assert starts == [(gpu_node, "0")] * 2, text
        code, text = _end(_sweep(cluster, tmp_path, *small, "out_dir=gpu", "--seeds", "9",
                                 "--gpus-per-run", "1"))
        assert code == 2, text
        assert "per run, runtime.device=cuda" in text
        assert re.search(r"failed \S+_s9_\S+ \(.*\): runtime\.device = cuda, but this "
                         r"machine .* has no CUDA GPU", text), text
        assert "Traceback" not in text

        # 3. a bad job (a file that is no npz) among good ones: the others finish, the bad
        # one is named with its one-line error, exit 2, sweep.csv holds the good ones
        (tmp_path / "bad.npz").write_bytes(b"not an archive")
        code, text = _end(_sweep(cluster, tmp_path, *small, "out_dir=bad", "--seeds", "0,1",
                                 "--grid", "data.dataset=npz:bad.npz,digits"))
        assert code == 2, text
        assert re.search(r"failed npz-bad\.npz\S+ \(.*\): cannot read bad\.npz: not an npz "
                         r"archive", text), text
        assert text.count("] done digits") == 2 and "2 of 4 runs failed" in text
        assert {r["data.dataset"] for r in csv.DictReader(
            (tmp_path / "bad" / "sweep" / "sweep.csv").open())} == {"digits"}

        # 4. the worker node dies mid-run: its task runs again on the head node, the run
        # resumes from its checkpoint, the results are those of the uninterrupted sweep
        proc = _sweep(cluster, tmp_path, *JOB, *GRID, "out_dir=b")
        lines, victim = [], None
        deadline = time.monotonic() + 240
        while victim is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
            m = START.search(line)
            if m and m[2] == gpu_node:
                victim = m[1]
        assert victim is not None, "".join(lines)
        status = tmp_path / "b" / victim / "status.json"
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                s = json.loads(status.read_text())
                if s["cycles_done"] >= 1:
                    assert not s["complete"], "the run ended before its node was killed"
                    break
            time.sleep(0.02)
        cluster.kill_worker()
        code, text = _end(proc)
        text = "".join(lines) + text
        assert code == 0, text
        assert re.search(rf"start {victim} on node \w+ .*\(try 2: the last one's node or "
                         r"process died\)", text), text
        assert re.search(rf"done {victim} in .* \(resumed at cycle [234]\)", text), text
        _same_runs(tmp_path / "b", tmp_path / "ref")
    finally:
        cluster.stop()
