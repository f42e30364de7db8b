"""What one FL round costs on Flower (issue 24): the same small run (digits, 3 clients,
entropy, 2 cycles x 5 rounds) in process (`falkit run`), in Flower's simulation and on a
loopback deployment (a SuperLink and 3 SuperNodes, each a separate process tree, as on
sites), timed side by side in one invocation. The deployment's per-round time comes from the
ServerApp's stream (`train round r/R (x s)`), the others' from metrics.csv (time_train /
rounds). Writes benchmarks/FLOWER_RESULTS.md (and .json).

    python benchmarks/flower_rounds.py                       # falkit as checked out
    python benchmarks/flower_rounds.py --src OLD/src --label before   # another falkit

`--src` runs every Flower process on another checkout's falkit (PYTHONPATH), so a change is
measured against the code before it on the same machine, in the same session; `--env K=V`
adds environment variables (Flower's SuperExec poll interval,
FLWR_SUPEREXEC_TASK_POLL_INTERVAL) to the deployment's processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.deployment import BIN, Deployment  # noqa: E402

RUN = {"data.dataset": "digits", "data.rho": "5", "partition.num_clients": "3",
       "partition.alpha": "1.0", "budget.fraction": "0.05", "budget.cycles": "2",
       "fl.rounds": "5", "fl.local_epochs": "1", "fl.lr": "0.05",
       "model.backbone": "resnet8_preact16", "runtime.threads": "1", "strategy": "entropy"}
ROUNDS = int(RUN["fl.rounds"]) * int(RUN["budget.cycles"])


def _toml(value: str) -> str:
    """A run-config value as a user types it: numbers bare, strings quoted."""
    try:
        float(value)
        return value
    except ValueError:
        return json.dumps(value)


def _app_dir(src: Path | None) -> Path:
    code = "from falkit.flower import APP_DIR; print(APP_DIR)"
    env = {**os.environ, **({"PYTHONPATH": str(src)} if src else {})}
    return Path(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                               text=True, check=True).stdout.strip())


def _train_s(run_dir: Path) -> float:
    import csv

    with (run_dir / "metrics.csv").open() as f:
        return sum(float(r["time_train"]) for r in csv.DictReader(f))


def in_process(tmp: Path, src: Path | None) -> dict:
    over = [f"{k}={v}" for k, v in {**RUN, "out_dir": str(tmp / "inproc")}.items()]
    env = {**os.environ, **({"PYTHONPATH": str(src)} if src else {})}
    t = time.perf_counter()
    subprocess.run([str(BIN / "falkit"), "run", *over, "--quiet"], env=env, check=True,
                   capture_output=True)
    wall = time.perf_counter() - t
    run_dir = next((tmp / "inproc").iterdir())
    return {"wall_s": wall, "round_s": _train_s(run_dir) / ROUNDS}


def simulation(tmp: Path, src: Path | None) -> dict:
    out = tmp / "sim"
    code = ("import sys; from falkit.flower.simulation import simulate; "
            f"simulate({{'overrides': {' '.join(f'{k}={v}' for k, v in RUN.items())!r} + "
            f"' out_dir={out}'}}, num_supernodes=3)")
    env = {**os.environ, **({"PYTHONPATH": str(src)} if src else {}), "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t
    return {"wall_s": wall, "round_s": _train_s(next(out.iterdir())) / ROUNDS}


def deployment(tmp: Path, src: Path | None, env: dict[str, str]) -> dict:
    extra = {**env, **({"PYTHONPATH": str(src)} if src else {})}
    dep = Deployment(tmp / "deployment", [f"partition-id={i} num-partitions=3"
                                          for i in range(3)], env=extra)
    try:
        time.sleep(3)  # the SuperNodes register
        run_config = " ".join(f"{k}={_toml(v)}"
                              for k, v in {**RUN, "out_dir": str(tmp / "dep")}.items())
        t = time.perf_counter()
        job = dep.flwr_run(_app_dir(src), run_config, stream=True)
        text, _ = job.communicate(timeout=3600)
        wall = time.perf_counter() - t
    finally:
        dep.close()
    rounds = [float(x) for x in re.findall(r"train round \d+/\d+ \(([\d.]+) s\)", text)]
    if len(rounds) != ROUNDS:
        raise SystemExit(f"the deployment run did not finish:\n{text[-3000:]}")
    query = [float(x) for x in re.findall(r"query: \d+ clients \(([\d.]+) s\)", text)]
    return {"wall_s": wall, "round_s": sum(rounds) / len(rounds), "rounds_s": rounds,
            "query_s": query}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, help="another checkout's src/ to run")
    ap.add_argument("--label", default="after", help="this measurement's name in the file")
    ap.add_argument("--env", action="append", default=[], help="K=V for the deployment")
    ap.add_argument("--only", default="inproc,sim,deployment")
    args = ap.parse_args()
    env = dict(e.split("=", 1) for e in args.env)
    only = args.only.split(",")
    got: dict = {"label": args.label, "env": env, "src": str(args.src or ROOT / "src")}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "inproc" in only:
            got["inproc"] = in_process(tmp, args.src)
            print("in process", got["inproc"], flush=True)
        if "sim" in only:
            got["sim"] = simulation(tmp, args.src)
            print("simulation", got["sim"], flush=True)
        if "deployment" in only:
            got["deployment"] = deployment(tmp, args.src, env)
            print("deployment", got["deployment"], flush=True)
    path = ROOT / "benchmarks" / "flower_results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[args.label] = {**got, "date": time.strftime("%Y-%m-%d"),
                           "machine": f"{platform.processor() or platform.machine()}, "
                                      f"{os.cpu_count()} cores"}
    path.write_text(json.dumps(results, indent=1) + "\n")
    write_md(results)


# Measured on this machine (2 cores) with timestamps in the ClientApp and the ServerApp during
# the "before" and "after" runs above; kept beside the table so the numbers have their reasons.
WHERE = """
## Where a deployment round's time goes (Flower 1.41)

- **One process per message.** A SuperNode starts a new `flwr-clientapp` for every message
  (Flower 1.41's `run_clientapp` serves exactly one message and exits, with
  `--isolation subprocess` and with `--isolation process` alike), so nothing stays in memory
  between messages. Each start imports torch (2.2 s) and Flower's own ClientApp modules
  (1.9 s: fastapi, sqlalchemy, grpc; not falkit's), then falkit (0.23 s) and the site's data
  and engine (0.14 s). A round is one train message per site (a cycle adds its evaluation
  and query messages), so about 4.5 s of CPU per site per round go to starting a process;
  with 3 sites on 2 cores that alone is ~7 s of each 21 s round.
- **Message size.** Before this change a model state was one Flower array per tensor (46 for
  resnet8_preact16, about 95 Flower objects per message) and each object was a separate
  store/fetch on the SuperLink: receiving took 3.7 s and sending 11.5 s per message under
  load. falkit now packs a state as one array per dtype plus a layout (3 objects); rounds went
  from 37-77 s to 18-32 s.
- **Fixed polls.** The SuperNode polls the SuperLink every 3 s when idle and every 0.5 s while
  waiting for a reply (hard-coded in `start_client_internal`); the SuperExec polls every 1 s
  (`FLWR_SUPEREXEC_TASK_POLL_INTERVAL`, 0.01-60 s, is the one interval a deployment can set;
  at 0.1 s a round was no faster here: 24.0 vs 21.0 s, within the noise of a loaded 2-core
  machine). Flower's `HttpGrid.send_and_receive` slept 3 s between pulls; falkit's ServerApp
  now pulls every 10 ms rising to 0.2 s.
- The SuperLink itself uses a third to a half of a core throughout.

On a site with its own cores the per-message start-up (~4.5 s) is paid in parallel across
sites, so a round costs about one process start plus the local work and the polls; at 900
rounds (the paper protocol) that is hours of overhead, which Flower's simulation (one
long-lived process per worker) does not pay. For the paper protocol, simulate; deploy when
the data cannot move.
"""


def write_md(results: dict) -> None:
    lines = ["# What a round costs on Flower (issue 24)", "",
             "`python benchmarks/flower_rounds.py` (see its docstring): digits, 3 clients, "
             "entropy, 2 cycles x 5 rounds, resnet8_preact16, 1 local epoch; one FL round's "
             "seconds (deployment: the ServerApp's per-round times; in process and "
             "simulation: time_train / rounds) and the whole run's wall time.", "",
             "| measurement | in process (s/round) | simulation (s/round) | deployment "
             "(s/round) | deployment / simulation | deployment / in process | deployment "
             "run (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, r in results.items():
        ip, sim, dep = (r.get(k, {}).get("round_s") for k in ("inproc", "sim", "deployment"))

        def f(v):
            return f"{v:.2f}" if v is not None else "-"

        def ratio(a, b):
            return f"{a / b:.1f}x" if a is not None and b else "-"
        env = ", ".join(f"{k}={v}" for k, v in r.get("env", {}).items())
        name = f"{label} ({r['date']}{'; ' + env if env else ''})"
        lines.append(f"| {name} | {f(ip)} | {f(sim)} | {f(dep)} | {ratio(dep, sim)} | "
                     f"{ratio(dep, ip)} | {f(r.get('deployment', {}).get('wall_s'))} |")
    lines += ["", *WHERE.strip("\n").splitlines(), ""]
    (ROOT / "benchmarks" / "FLOWER_RESULTS.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
