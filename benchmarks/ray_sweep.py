"""What does a sweep gain from a second Ray node, and what does going through Ray cost per
run against `falkit sweep --jobs`? (issue 28). One invocation, one machine:

* `--jobs 2`: the sweep in two local processes (the baseline: two runs at once);
* `--ray`, one node: a loopback Ray cluster of one node with one CPU (one run at once);
* `--ray`, two nodes: the same cluster with a second node of one CPU (two runs at once).

The sweep: 12 quick FMNIST-LT runs (configs/fmnist_lt.toml, preset quick, two cycles,
random and entropy@G x 6 seeds, `runtime.threads=1` so that every mode runs one thread per
run). Each mode writes into a fresh out_dir; wall-clock time is the `falkit sweep` command's,
from start to exit (the cluster is started before, not timed); a run's own seconds are those
of its "done ... in X s" line.

    python benchmarks/ray_sweep.py                      # writes benchmarks/RAY_RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.ray_cluster import BIN, Cluster  # noqa: E402

SWEEP = [str(ROOT / "configs" / "fmnist_lt.toml"), "--preset", "quick", "budget.cycles=2",
         "runtime.threads=1", "--strategies", "random,entropy@G", "--seeds", "0,1,2,3,4,5",
         "--quiet"]
DONE = re.compile(r"\] done \S+ in ([\d.]+) s")


def sweep(out: Path, extra: list[str], env: dict[str, str]) -> tuple[float, list[float]]:
    """(wall seconds, each run's own seconds) of one sweep."""
    cmd = [str(BIN / "falkit"), "sweep", *SWEEP, f"out_dir={out}", *extra]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out.parent)
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    runs = [float(s) for s in DONE.findall(p.stderr)]
    if len(runs) != 12:
        raise SystemExit(f"expected 12 finished runs, got {len(runs)}:\n{p.stderr[-3000:]}")
    print(f"{' '.join(extra)}: {wall:.1f} s", file=sys.stderr, flush=True)
    return wall, runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "RAY_RESULTS.md"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="falkit-ray-bench-"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    rows: dict[str, tuple[float, list[float]]] = {"--jobs 2": sweep(tmp / "jobs2", ["--jobs",
                                                                               "2"], env)}
    starts = {}
    for key, nodes in (("--ray, 1 node", 1), ("--ray, 2 nodes", 2)):
        cluster = Cluster(worker_gpus=0)  # a fresh cluster each: no worker is warm
        try:
            t0 = time.monotonic()
            cluster.start(workers=nodes == 2)
            starts[nodes] = time.monotonic() - t0
            rows[key] = sweep(tmp / f"ray{nodes}", ["--ray", cluster.address], cluster.env)
        finally:
            cluster.stop()
    jobs2, ray1, ray2 = (rows[k][0] for k in ("--jobs 2", "--ray, 1 node", "--ray, 2 nodes"))
    lines = [
        "# `falkit sweep --ray`: one node vs two, and Ray against `--jobs` (issue 28)",
        "",
        f"Measured by `python benchmarks/ray_sweep.py` on {platform.node()} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores; Python "
        f"{platform.python_version()}), {time.strftime('%Y-%m-%d')}. The sweep: 12 quick "
        "FMNIST-LT runs (`configs/fmnist_lt.toml --preset quick budget.cycles=2 "
        "runtime.threads=1 --strategies random,entropy@G --seeds 0,1,2,3,4,5`), one thread "
        "per run in every mode. Wall = the `falkit sweep` command from start to exit (the "
        "loopback cluster, fresh for each Ray mode, was started before it: one node "
        f"{starts[1]:.1f} s, two nodes {starts[2]:.1f} s, not included); a run's own time = "
        "its `done ... in X s` line: under `--jobs`, from the start of its spawned process "
        "(a fresh interpreter importing torch and falkit) to its answer; in a Ray task, the "
        "task's own on its node, in a worker process Ray keeps for the next task. Fixed "
        "cost = wall - the runs' own times / runs at once: what the sweep spends outside "
        "its runs (validating the jobs, joining the cluster, checking that every node "
        "sees out_dir, starting Ray's worker processes, idle slots at the end).",
        "",
        "| mode | runs at once | wall (s) | a run's own time, median (s) | fixed cost (s) |",
        "|---|---|---|---|---|",
    ]
    for k, at_once in (("--jobs 2", 2), ("--ray, 1 node", 1), ("--ray, 2 nodes", 2)):
        wall, runs = rows[k]
        lines.append(f"| `{k}` | {at_once} | {wall:.1f} | {statistics.median(runs):.1f} | "
                     f"{wall - sum(runs) / at_once:.1f} |")
    own = {k: statistics.median(r) for k, (_, r) in rows.items()}
    lines += [
        "",
        f"- **One Ray node vs two:** {ray1 / ray2:.2f}x faster with two (wall {ray1:.0f} s "
        f"-> {ray2:.0f} s)." + (
            f" Less than 2x because both \"nodes\" are this one {os.cpu_count()}-core "
            f"machine: a run takes {own['--ray, 1 node']:.1f} s alone and "
            f"{own['--ray, 2 nodes']:.1f} s beside another (median), the two sharing its "
            "caches and memory bandwidth, which two machines would not."
            if own["--ray, 2 nodes"] > 1.05 * own["--ray, 1 node"] else ""),
        f"- **Ray against `--jobs 2`** (both two runs at once): {ray2 / jobs2:.2f}x the wall "
        f"time, {(ray2 - jobs2) / 6:+.1f} s per run per slot (the difference spread over the "
        "6 runs each slot ran). A run's own time is "
        f"{own['--ray, 2 nodes'] - own['--jobs 2']:+.1f} s (median) through Ray: `--jobs` "
        "starts a fresh process per run (torch and falkit imported each time), Ray a worker "
        "process per node that runs task after task.",
        "",
    ]
    Path(a.out).write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
