"""Does opening falkit up cost speed? (issue 26). The same three workloads timed on this
checkout's falkit and on another checkout's (the commit before the change), in one
invocation, the two interleaved rep by rep so that machine drift hits both alike:

* **FL round**: `Engine.fl_round` on Fashion-MNIST-LT (configs/fmnist_lt.toml), 10 clients x
  300 labels, one local epoch, CNN-4 (the FairFAL protocol's round);
* **scratch local model**: `Engine.train_scratch` for the 10 clients, 2 epochs each;
* **FairFAL query step**: one client's phase A, the server's reduce and the query on a
  synthetic client (20,000 unlabeled, C = 10, D = 64), as benchmarks/bench.py's query rows
  (each worker's figure: the median of 15 steps).

    python benchmarks/split_speed.py --old OLD/src            # writes SPLIT_RESULTS.md

Ratios are new / old, of the medians and of the fastest runs (less sensitive to a busy
machine); < 1 is faster. Each worker is a fresh process with
`runtime.threads` as configured and PYTHONPATH on one checkout's `src`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("fl_round", "scratch", "fairfal_query")


def worker(what: str) -> float:
    """Seconds of one run of workload `what` (after one untimed warm-up run)."""
    import numpy as np
    import torch

    from falkit import config as config_mod

    if what == "fairfal_query":
        from falkit.al.base import QueryContext
        from falkit.al.base import create as create_strategy

        n, C, D = 20_000, 10, 64
        g = torch.Generator().manual_seed(0)
        total = n + n // 20
        outs = {m: (torch.softmax(torch.randn(total, C, generator=g) * 2, 1),
                    torch.relu(torch.randn(total, D, generator=g))) for m in ("global", "local")}

        def once() -> float:
            def infer(model, pool):
                p, f = outs[model]
                idx = torch.as_tensor(pool)
                return p[idx], f[idx]

            ctx = QueryContext(client_id=0, cycle=1, labeled=np.arange(n, total),
                               labeled_y=np.random.default_rng(0).integers(0, C, total - n),
                               unlabeled=np.arange(n), num_classes=C,
                               rng=np.random.default_rng(1), infer=infer)
            s = create_strategy("fairfal")
            t = time.perf_counter()
            ctx.phase_a = s.client_stats(ctx)
            ctx.server = dict(s.server_reduce([ctx.phase_a.stats]))
            s.query(ctx, n // 100)
            return time.perf_counter() - t

        once()
        # ~20 ms a query: the median of 15 in this process, less noisy than one
        return statistics.median(once() for _ in range(15))

    from falkit.data.federation import build
    from falkit.fl.engine import configure_process
    from falkit.loop import engine_for

    cfg = config_mod.load(ROOT / "configs" / "fmnist_lt.toml", overrides={
        "fl.local_epochs": "1", "local_model.epochs": "2", "local_model.stop_accuracy": "1.0",
        "runtime.batch_clients": "off"})
    data = build(cfg)
    configure_process(cfg)
    eng = engine_for(cfg, data.dataset, data.num_classes, len(data.clients))
    pools = [p[:300] for p in data.clients]
    state = eng.init_state(0)

    def once() -> float:
        t = time.perf_counter()
        if what == "fl_round":
            eng.fl_round(state, list(range(len(pools))), pools, 0.01, seed=0, key=(0, 0))
        else:
            eng.train_scratch([(p, (1, k)) for k, p in enumerate(pools)], eng.train_y, 0)
        return time.perf_counter() - t

    once()
    return once()


def run_worker(src: Path, what: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, __file__, "--worker", what], env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, help="the other checkout's src/ (the code before)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--worker", choices=WORKLOADS, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "SPLIT_RESULTS.md")
    args = ap.parse_args(argv)
    if args.worker:
        print(worker(args.worker))
        return 0
    if args.old is None:
        ap.error("--old OLD/src is required")
    new_src = ROOT / "src"
    times: dict[str, dict[str, list[float]]] = {w: {"old": [], "new": []} for w in WORKLOADS}
    for rep in range(args.reps):
        for w in WORKLOADS:
            for label, src in (("old", args.old), ("new", new_src))[:: 1 if rep % 2 else -1]:
                times[w][label].append(run_worker(src, w))
                print(f"rep {rep + 1}/{args.reps} {w} {label}: {times[w][label][-1]:.3f} s",
                      flush=True)
    rows = []
    for w in WORKLOADS:
        old, new = statistics.median(times[w]["old"]), statistics.median(times[w]["new"])
        rows.append((w, old, new, new / old, min(times[w]["new"]) / min(times[w]["old"])))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    lines = ["# Opening falkit up: speed before and after (issue 26)", "",
             f"`python benchmarks/split_speed.py --old {args.old} --reps {args.reps}` on "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch threads as configured; new = commit {commit}. Medians of {args.reps} "
             "fresh processes each (one warm-up run per process), old and new interleaved.",
             "", "| workload | old median (s) | new median (s) | new / old (medians) | "
             "new / old (fastest runs) |", "|---|---|---|---|---|"]
    lines += [f"| {w} | {o:.3f} | {n:.3f} | {r:.3f} | {m:.3f} |" for w, o, n, r, m in rows]
    lines += ["", "Raw seconds: " + json.dumps(times), ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines[4:4 + 2 + len(rows)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
