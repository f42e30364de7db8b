"""Jobs as Ray tasks on a cluster (`falkit sweep --ray ADDRESS`), the counterpart of
`falkit.parallel.run_jobs` for more than one machine.

Every job is one Ray task with the resources it declares (CPUs and GPUs, fractional), run in
the driver's working directory with the driver's FALKIT_* / HF_* environment, so that every
relative path of a config means on each node what it means where the sweep was started.
That needs the directories to be visible at the same path on every node (a shared file
system): `check_nodes` proves it before a job starts. A task reports as it starts (which
node, which GPU) through a small actor that lives on the driver's node, and answers with an
`Outcome` as a worker process of `run_jobs` does. A node that dies takes its tasks with it:
Ray runs each again (at most `RETRIES` times) on another node, where the run resumes from its
last checkpoint. A task's run lock names the task (`rundir.LOCK_TAG`), so that the new try
waits for the lock of its own dead predecessor (held until its process is gone) instead of
skipping the run as one another process holds. Ctrl-C cancels the tasks: a running one ends
its run as `falkit run` does on Ctrl-C, and the same command again resumes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from falkit.errors import ConfigError, FalkitError
from falkit.parallel import GRACE_S, Outcome, call

RETRIES = 3  # tries of a task after the first when its node or worker process dies
FORWARDED = ("FALKIT_", "HF_", "TRANSFORMERS_")  # environment variables a task inherits
POLL_S = 0.5  # how often the driver asks the start reports
NO_NODE_S = 60.0  # how long the tasks left wait for a node that can hold them (then: failed)


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'falkit[ray]' (on every node)") from None
    return ray


def connect(address: str) -> Any:
    """Join the cluster at `address` (`auto`: the one this machine belongs to) as its
    driver; a cluster that is not there is a one-line error."""
    import logging

    ray = _ray()
    if ray.is_initialized():
        return ray
    _reachable(address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        with warnings.catch_warnings():  # Ray's tip on CUDA_VISIBLE_DEVICES of CPU tasks
            warnings.filterwarnings("ignore", "Tip: In future versions of Ray", FutureWarning)
            # the workers' output stays in the nodes' Ray logs (a dying node's state dump
            # too); a task's answer carries what the user needs, a bug's traceback included
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                     configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FalkitError(f"--ray {address}: cannot join the Ray cluster ({first}); start it "
                          "with `ray start --head` (and `ray start --address HEAD:PORT` on "
                          "the other machines)") from None
    return ray


def _reachable(address: str, timeout: float = 10.0) -> None:
    """HOST:PORT must accept a connection (Ray itself retries an absent head for minutes)."""
    if address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"--ray must be auto or HEAD:PORT (the head's `ray start --head "
                          f"--port`), got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise FalkitError(f"--ray {address}: no Ray head answers there ({e.strerror or e}); "
                          "start it with `ray start --head --port PORT`") from None


def _node_name(node_id: str, host: str) -> str:
    return f"{node_id[:8]} ({host})"


def _probe(cwd: str, paths: list[str], token: str) -> tuple[str, str, str]:
    """On one node: (its node id, host name, '' or what it cannot see)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    try:
        os.chdir(cwd)
    except OSError as e:
        return node, socket.gethostname(), f"the working directory {cwd} ({e.strerror})"
    for p in paths:
        try:
            seen = Path(p).read_text(encoding="utf-8")
        except OSError:
            seen = ""
        if seen != token:
            return node, socket.gethostname(), f"{Path(p).parent} (a file the driver wrote there)"
    return node, socket.gethostname(), ""


def check_nodes(folders: Sequence[Path], cpus: float, gpus: float) -> list[str]:
    """Every alive node that can hold a run (`cpus`, `gpus`) sees `folders` (the sweep's
    out_dir) and the driver's working directory at the same paths (the same folders, not
    copies): a file written here is read back there by a task pinned to that node.
    Returns the nodes' names; raises a one-line error naming the first node that does not,
    or when no node can hold a run."""
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fit = _fitting(nodes, cpus, gpus)
    if not fit:
        have = ", ".join(f"{_node_name(n['NodeID'], n['NodeManagerHostname'])}: "
                         f"{n['Resources'].get('CPU', 0):g} CPU, "
                         f"{n['Resources'].get('GPU', 0):g} GPU" for n in nodes) or "no node"
        raise ConfigError(f"no node of the Ray cluster has {cpus:g} CPU and {gpus:g} GPU for "
                          f"a run (--cpus-per-run, --gpus-per-run); it has {have}")
    token = uuid.uuid4().hex
    probes = []
    for folder in [*folders, Path.cwd()]:
        probe = folder / f".falkit-probe-{token}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_text(token, encoding="utf-8")
        except OSError:
            if folder == Path.cwd():  # a read-only working directory: its path is checked
                continue
            raise
        probes.append(probe)
    remote = ray.remote(_probe)
    try:
        refs = [remote.options(num_cpus=0, max_retries=0, scheduling_strategy=(
            NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))).remote(
                os.getcwd(), [str(p.resolve()) for p in probes], token) for n in fit]
        answers = ray.get(refs, timeout=120)
    except Exception as e:  # GetTimeoutError, a node that died meanwhile
        raise FalkitError(f"--ray: the check that every node sees the sweep's out_dir did "
                          f"not answer ({type(e).__name__}); is every node alive?") from None
    finally:
        for p in probes:
            p.unlink(missing_ok=True)
    for node, host, missing in answers:
        if missing:
            raise ConfigError(f"Ray node {_node_name(node, host)} cannot see {missing}: every "
                              "node must see the sweep's out_dir and the working directory "
                              f"{os.getcwd()} at the same paths (a shared file system, e.g. "
                              "NFS); or run the sweep on one machine (--jobs N)")
    return [_node_name(n, h) for n, h, _ in answers]


class _Reports:
    """The start reports of the tasks (an actor on the driver's node): (job, node, GPUs),
    taken by the driver as it polls; a second report of a job is Ray's next try of it."""

    def __init__(self) -> None:
        self.items: list[tuple[int, str, list[Any]]] = []

    def started(self, job: int, node: str, gpus: list[Any]) -> None:
        self.items.append((job, node, gpus))

    def take(self) -> list[tuple[int, str, list[Any]]]:
        items, self.items = self.items, []
        return items


def _task(reports: Any, job: int, cwd: str, env: dict[str, str],
          target: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Outcome, tuple[Any, ...]]:
    """The body of one Ray task: report the start, run the job in the driver's working
    directory and environment, answer its Outcome (a failure is an answer, not raised) and
    where it ran (the start report, in case it arrives after the answer)."""
    import ray

    from falkit import rundir

    ctx = ray.get_runtime_context()
    os.environ.update(env)
    os.chdir(cwd)
    task = ctx.get_task_id()
    rundir.LOCK_TAG = f"ray task {task}"  # a retry of this task waits for its lock
    # not waited for: a task blocked in ray.get lends its CPUs to another task meanwhile
    where = (job, _node_name(ctx.get_node_id(), socket.gethostname()), list(ray.get_gpu_ids()))
    reports.started.remote(*where)
    try:
        out = call(target, args)  # KeyboardInterrupt (ray.cancel: the run ended as on
    finally:  # Ctrl-C) goes on: the task is cancelled, an answer would trip Ray's books
        rundir.LOCK_TAG = ""
    return out, where


def _fitting(nodes: list[dict[str, Any]], cpus: float, gpus: float) -> list[dict[str, Any]]:
    """The alive nodes among `nodes` (ray.nodes()) that can hold one run."""
    return [n for n in nodes if n.get("Alive") and n["Resources"].get("CPU", 0) >= cpus
            and n["Resources"].get("GPU", 0) >= gpus]


def _fits(ray: Any, cpus: float, gpus: float) -> bool:
    """Whether an alive node of the cluster can hold one run."""
    try:
        return bool(_fitting(ray.nodes(), cpus, gpus))
    except Exception:  # the GCS is busy: assume so, ask again later
        return True


def run_tasks(target: Callable[..., Any], jobs: Sequence[tuple[Any, ...]], cpus: float,
              gpus: float, on_start: Callable[[int, str], None] | None = None,
              on_finish: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
    """`target(*jobs[i])` for every i as Ray tasks of `cpus` CPUs and `gpus` GPUs each (on a
    cluster `connect` joined), submitted in job order; Ray runs as many at once as the
    nodes hold. Returns the Outcomes in job order. `on_start(i, where)` is called as job i
    starts on a node (again, with "try k", when Ray runs it again after its node died),
    `on_finish(i, outcome)` as it ends. When no alive node can hold a run any more (the
    last GPU node died), the tasks left fail after NO_NODE_S. Ctrl-C (or an exception of
    a callback) cancels every task before it goes on."""
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    # on the driver's node, which lives as long as the sweep does (soft=True lets Ray
    # place it elsewhere, even on a node that may die)
    reports = ray.remote(_Reports).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)
    ).remote()
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED)}
    # max_calls=1: a GPU run gets a fresh worker process (CUDA, once initialised, stays on
    # the GPU the process first saw, whatever CUDA_VISIBLE_DEVICES says for the next task)
    remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=RETRIES,
                        retry_exceptions=False, max_calls=1 if gpus else 0)(_task)
    t0 = time.monotonic()
    refs = [remote.remote(reports, i, os.getcwd(), env, target, tuple(job))
            for i, job in enumerate(jobs)]
    index = {ref: i for i, ref in enumerate(refs)}
    started: dict[int, float] = {}
    last: dict[int, tuple[str, list[Any]]] = {}  # each job's latest start: node, GPUs
    tries: dict[int, int] = {}
    outcomes: list[Outcome | None] = [None] * len(jobs)

    def where_text(node: str, gpu_ids: list[Any]) -> str:
        return f"on node {node}" + (f", GPU {','.join(map(str, gpu_ids))}" if gpu_ids else "")

    def report(i: int, node: str, gpu_ids: list[Any]) -> None:
        if outcomes[i] is not None:
            return  # the late report of a task whose answer came first (shown then)
        where = where_text(node, gpu_ids)
        tries[i] = tries.get(i, 0) + 1
        if tries[i] > 1:
            where += f" (try {tries[i]}: the last one's node or process died)"
        started.setdefault(i, time.monotonic())
        last[i] = (node, gpu_ids)
        if on_start is not None:
            on_start(i, where)

    def poll() -> None:
        try:
            items = ray.get(reports.take.remote(), timeout=60)
        except ray.exceptions.RayError:  # the reports are lost: the answers still come
            return
        for item in items:
            report(*item)

    def finish(i: int, out: Outcome) -> None:
        outcomes[i] = out
        if on_finish is not None:
            on_finish(i, out)

    pending = list(refs)
    no_node_since: float | None = None
    checked = time.monotonic()
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            # the answers first: a task that started after one ended on its node is shown
            # after that one's end
            for ref in ready:
                i = index[ref]
                try:
                    out, (_, node, gpu_ids) = ray.get(ref)
                except ray.exceptions.RayError as e:  # its node died RETRIES + 1 times, ...
                    finish(i, Outcome(False, error=_ray_error(e), code=2,
                                      seconds=time.monotonic() - started.get(i, t0)))
                    continue
                if last.get(i) != (node, gpu_ids):  # this try's start report is on its way
                    poll()
                    if last.get(i) != (node, gpu_ids):
                        report(i, node, gpu_ids)
                out.where = where_text(node, gpu_ids)
                finish(i, out)
            poll()
            if pending and time.monotonic() - checked > 5.0:
                checked = time.monotonic()
                if _fits(ray, cpus, gpus):
                    no_node_since = None
                elif no_node_since is None:
                    no_node_since = checked
                elif checked - no_node_since > NO_NODE_S:
                    _cancel(ray, pending)
                    for ref in pending:
                        finish(index[ref], Outcome(False, code=2, error=(
                            f"no alive node of the Ray cluster has {cpus:g} CPU and "
                            f"{gpus:g} GPU for it any more (for {NO_NODE_S:.0f} s)")))
                    pending = []
    except BaseException:
        _cancel(ray, pending)
        raise
    finally:
        with contextlib.suppress(Exception):
            ray.kill(reports)
    return outcomes  # type: ignore[return-value]


def _ray_error(e: BaseException) -> str:
    """One line for a task Ray could not finish (its node died more than RETRIES times,
    out of memory, cancelled)."""
    name = type(e).__name__
    text = str(e).strip().splitlines()
    first = next((t.strip() for t in text if t.strip()), "")
    return f"Ray: {name}" + (f": {first[:200]}" if first else "") + (
        f" (Ray ran it {RETRIES + 1} times)" if "Died" in name or "Crashed" in name else "")


def _cancel(ray: Any, refs: list[Any], grace: float = GRACE_S) -> None:
    """Cancel `refs`: a running task gets a KeyboardInterrupt (its run ends as on Ctrl-C),
    `grace` seconds to end, then its worker is killed; a waiting one never starts."""
    left = list(refs)
    try:
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=False)
        with contextlib.suppress(Exception):
            _, left = ray.wait(refs, num_returns=len(refs), timeout=grace)
    except KeyboardInterrupt:
        pass
    for ref in left:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
