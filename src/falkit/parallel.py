"""Jobs in separate processes, at most `n` at once (`falkit sweep --jobs N`).

Every job runs in a process of its own, started with the "spawn" method (a fresh
interpreter: safe with CUDA and with torch's thread pools, nothing inherited but the
arguments), and sends back its result or a one-line error through a pipe. A job that fails
does not stop the others; a job whose process dies without an answer (killed, out of memory)
is reported as failed. If the parent is interrupted (Ctrl-C) or a callback raises, the
running jobs are stopped before the exception goes on: each gets one SIGINT (whether or not
the terminal's Ctrl-C reached it too) and ends its run as `falkit run` does on Ctrl-C; one
that has not ended after a grace period is terminated. Runs are resumable after that, since
every result of falkit's is written atomically and a run's lock dies with its process.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from falkit.errors import FalkitError, RunLocked

GRACE_S = 3.0  # how long interrupted workers get to end by themselves before SIGTERM
LOCKED = 75  # an Outcome's code for a run that a live process holds (EX_TEMPFAIL): skipped


@dataclass
class Outcome:
    """What became of one job."""

    ok: bool
    value: Any = None  # the job's return value (ok)
    error: str = ""  # one line (not ok)
    code: int = 1  # the exit code the error stands for: 2 falkit's own / an OSError, 1 else
    seconds: float = 0.0  # wall-clock time from start to answer
    detail: str = ""  # a bug's traceback (the parent prints it under the job's line)
    where: str = ""  # where it ran, when not here (a Ray node)


def error_outcome(e: BaseException) -> Outcome:
    """The one-line error falkit's CLI would print for `e`, and its exit code."""
    if isinstance(e, RunLocked):  # not a failure: another process is running it
        return Outcome(False, error=f"in use by {e.holder}", code=LOCKED)
    if isinstance(e, FalkitError):
        return Outcome(False, error=str(e), code=2)
    if isinstance(e, OSError):  # disk full, read-only file system, permissions
        where = f": {e.filename}" if e.filename else ""
        return Outcome(False, error=f"{e.strerror or e}{where}", code=2)
    text = str(e).strip().splitlines()
    name = type(e).__name__
    return Outcome(False, error=f"{name}: {text[0]}" if text else name, code=1)


def call(target: Callable[..., Any], args: tuple[Any, ...]) -> Outcome:
    """`target(*args)` as an Outcome, timed: a failure is an answer, a bug's traceback in
    `detail`. KeyboardInterrupt goes on (the caller decides what an interrupt is)."""
    t0 = time.monotonic()
    try:
        out = Outcome(True, target(*args))
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - every failure is reported, not raised
        out = error_outcome(e)
        if not isinstance(e, (FalkitError, OSError)):
            out.detail = traceback.format_exc()  # a bug: its traceback helps
    out.seconds = time.monotonic() - t0
    return out


def _interrupt_once(signum: int, frame: Any) -> None:
    """A worker's SIGINT: one KeyboardInterrupt (from the terminal's Ctrl-C, the parent's, or
    both), so that the run's clean-up (unlocking its run directory) is not cut short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _child(conn: Connection, target: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """The body of a worker process: run the job, send its Outcome."""
    signal.signal(signal.SIGINT, _interrupt_once)
    try:
        try:
            out = call(target, args)
        except KeyboardInterrupt:
            out = Outcome(False, error="interrupted", code=130)
        try:
            conn.send(out)
        except Exception as e:  # e.g. a result that cannot be pickled
            conn.send(error_outcome(e))
    except (KeyboardInterrupt, OSError):
        pass  # the parent is stopping every worker or is gone: nobody reads the answer
    finally:
        conn.close()


def _stop(procs: list[Any], grace: float = GRACE_S) -> None:
    """End every process in `procs`: SIGINT (a worker ends its run as `falkit run` does on
    Ctrl-C), `grace` seconds, then SIGTERM, then SIGKILL. A second Ctrl-C skips the waiting."""
    try:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(p.pid, signal.SIGINT)
        deadline = time.monotonic() + grace
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + 5.0
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:
        pass
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


def run_jobs(target: Callable[..., Any], jobs: Sequence[tuple[Any, ...]], n: int,
             on_start: Callable[[int], None] | None = None,
             on_finish: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
    """`target(*jobs[i])` for every i, each in its own spawned process, at most `n` at once,
    started in job order. `target` must be importable (a module-level function) and its
    arguments and result picklable. Returns the Outcomes in job order (not completion
    order). `on_start(i)` is called as job i starts, `on_finish(i, outcome)` as it ends."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ctx = mp.get_context("spawn")
    outcomes: list[Outcome | None] = [None] * len(jobs)
    todo = list(range(len(jobs)))[::-1]
    running: dict[Connection, tuple[int, Any, float]] = {}
    try:
        while todo or running:
            while todo and len(running) < n:
                i = todo.pop()
                reader, writer = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_child, args=(writer, target, tuple(jobs[i])),
                                   name=f"falkit-job-{i + 1}")
                if on_start is not None:
                    on_start(i)
                proc.start()
                writer.close()  # the child holds the only writer: its exit means EOF here
                running[reader] = (i, proc, time.monotonic())
            for reader in wait(list(running)):
                i, proc, t0 = running.pop(reader)  # type: ignore[index]
                try:
                    out = reader.recv()
                except (EOFError, OSError):
                    out = None
                reader.close()
                proc.join()
                if out is None:
                    code = proc.exitcode or 0
                    how = (f"killed by signal {-code}, out of memory?" if code < 0
                           else f"exit code {code}")
                    out = Outcome(False, error=f"its process ended without a result ({how})",
                                  code=1)
                out.seconds = time.monotonic() - t0
                outcomes[i] = out
                if on_finish is not None:
                    on_finish(i, out)
    except BaseException:
        _stop([proc for _, proc, _ in running.values()])
        raise
    return outcomes  # type: ignore[return-value]


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask; os.cpu_count() elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1

