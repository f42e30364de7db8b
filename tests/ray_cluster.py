"""A Ray cluster of two nodes on loopback, started with Ray's own `ray start` (head and one
worker, each with its own raylet and temp dir), for the `falkit sweep --ray` test and
benchmarks/ray_sweep.py. Its processes are found by their temp dirs and stopped with
SIGKILL (never `ray stop`, which would stop every Ray cluster of this machine)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.deployment import free_ports

BIN = Path(sys.executable).parent


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
    """A Ray head and one worker node on 127.0.0.1, one CPU each; the worker declares
    `worker_gpus` GPUs (scheduling only: this machine has none). Each node has its own temp
    dir, by which its processes are found (and killed)."""

    def __init__(self, worker_gpus: int = 1) -> None:
        self.worker_gpus = worker_gpus
        (self.port,) = free_ports(1)
        self.address = f"127.0.0.1:{self.port}"
        # short paths: Ray's unix sockets live under the temp dir (108 bytes at most)
        self.head_dir = tempfile.mkdtemp(prefix="frh", dir="/tmp")
        self.worker_dir = tempfile.mkdtemp(prefix="frw", dir="/tmp")
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}

    COMMON = ("--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats")

    def start(self, workers: bool = True) -> None:
        subprocess.run([str(BIN / "ray"), "start", "--head", "--port", str(self.port),
                        "--temp-dir", self.head_dir, "--include-dashboard", "false", *self.COMMON],
                       check=True, capture_output=True, env=self.env, timeout=120)
        if workers:
            self.start_worker()

    def start_worker(self) -> None:
        subprocess.run([str(BIN / "ray"), "start", "--address", self.address, "--temp-dir",
                        self.worker_dir, "--num-gpus", str(self.worker_gpus), *self.COMMON],
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
