"""The `falkit` command line: run | config | sweep | demo | show | partition | data | list ..."""

from __future__ import annotations

import argparse
import itertools
import logging
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from falkit import __version__
from falkit import config as config_mod
from falkit.errors import ConfigError, FalkitError

log = logging.getLogger("falkit")


# -- progress -------------------------------------------------------------------------------
class RichReporter:
    """Progress bars for the phases of each cycle, one summary line per finished cycle."""

    def __init__(self, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.quiet = quiet
        self.progress = None
        self.task = None

    def start(self, run_name: str, cycles: int, first_cycle: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        resumed = f" (resuming at cycle {first_cycle + 1})" if first_cycle else ""
        self.console.print(f"[bold]{run_name}[/bold]: {cycles} cycles{resumed}", soft_wrap=True)
        if not self.quiet:
            self.progress = Progress(TextColumn("  {task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(),
                                     TimeRemainingColumn(), console=self.console,
                                     transient=True)
            self.progress.start()

    def phase(self, description: str, total: int) -> None:
        if self.progress is not None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task, n)

    def round_done(self, cycle: int, r: int, rounds: int, values: dict[str, float]) -> None:
        """(the progress bar advances per round already)"""

    def cycle_done(self, row: dict[str, Any]) -> None:
        auc = row.get("auc")
        auc_text = f", AUC {100 * auc:.2f}%" if isinstance(auc, float) and auc == auc else ""
        msg = (f"  cycle {row['cycle'] + 1}: {row['labeled_pct']:.1f}% labeled, "
               f"accuracy {100 * row['accuracy']:.2f}%{auc_text}  "
               f"(train {row['time_train']:.1f}s, query {row['time_query']:.1f}s, "
               f"local model {row['time_local_model']:.1f}s, eval {row['time_eval']:.1f}s)")
        console = self.progress.console if self.progress is not None else self.console
        console.print(msg, soft_wrap=True, highlight=False)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
            self.task = None


# -- helpers --------------------------------------------------------------------------------
def _load_config(path: str | None, preset: str | None, overrides: list[str]) -> config_mod.Config:
    return config_mod.load(path, preset=preset, overrides=config_mod.parse_overrides(overrides))


def _split_config_arg(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """`falkit run [CONFIG] [key=value ...]`: the first positional is a file unless it has '='."""
    items = list(args.items)
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def accuracy_text(run_dirs: list[str | Path]) -> str:
    """The report's accuracy table (mean ± std over seeds, per setting) as plain text."""
    from falkit.report import accuracy_table, load_runs

    runs = load_runs(run_dirs)
    if not runs:
        where = ", ".join(map(str, run_dirs))
        raise FalkitError(f"no falkit run (metrics.csv + config.toml) under {where}")
    return accuracy_table(runs).to_text()


def _run_one(cfg: config_mod.Config, quiet: bool, overwrite: bool = False):
    from falkit.loop import run  # every strategy, FAST too, runs the one FAL cycle

    result = run(cfg, reporter=RichReporter(quiet), overwrite=overwrite)
    if result.skipped:
        print(f"{result.run_dir}: already complete (use --overwrite to run again)",
              file=sys.stderr)
    return result


# -- commands -------------------------------------------------------------------------------
WAITING = 3  # exit status of a run that stopped to wait for people's labels


def _waiting_text(e: Any, run_dir: Any) -> str:
    lines = [f"falkit: {e}; label them, then run the same command again:"]
    for p in e.pending:
        lines.append(f"  falkit label {run_dir} --client {p.client}    "
                     f"# {p.answered} / {p.total} answered")
    return "\n".join(lines)


def _wait_for_labels(e: Any, quiet: bool, poll: float = 2.0) -> None:
    """Poll the queues until every pending sample has an answer (a progress bar)."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from falkit import labeling

    total = sum(p.total for p in e.pending)

    def answered() -> int:
        return sum(min(p.total, len(labeling.read_answers(p.folder))) for p in e.pending)

    with Progress(TextColumn("  waiting for labels"), BarColumn(), MofNCompleteColumn(),
                  disable=quiet, transient=True) as bar:
        task = bar.add_task("labels", total=total)
        while (done := answered()) < total:
            bar.update(task, completed=done)
            time.sleep(poll)


def cmd_run(args: argparse.Namespace) -> int:
    from falkit.oracle import WaitingForLabels
    from falkit.rundir import RunDir

    path, overrides = _split_config_arg(args)
    cfg = _load_config(path, args.preset, overrides)
    overwrite = args.overwrite
    while True:
        try:
            result = _run_one(cfg, args.quiet, overwrite)
            break
        except WaitingForLabels as e:
            print(_waiting_text(e, RunDir.of(cfg).path), file=sys.stderr)
            if not args.wait:
                return WAITING
            _wait_for_labels(e, args.quiet)
            overwrite = False  # the run now holds the queues to continue from
    print(accuracy_text([result.run_dir]))
    print(f"results: {result.run_dir}")
    return 0


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, e.g. 0,1,2; got "
                          f"{text!r}") from None


def _check_jobs(cfgs: list[config_mod.Config], overwrite: bool = False) -> int:
    """Every job of a sweep is checked before the first one starts: its strategy (or FAST
    encoder) exists, its run directory is free or holds the same run. How many are done."""
    from falkit import registry
    from falkit.al.base import create as create_strategy
    from falkit.rundir import RunDir

    done = 0
    names: dict[Any, str] = {}
    for cfg in cfgs:
        if cfg.oracle != "simulated":
            raise ConfigError("a sweep runs with oracle = simulated; with people labeling, "
                              "run each experiment with falkit run ... oracle=human")
        create_strategy(cfg.strategy, **config_mod.strategy_options(cfg))
        registry.strategy_class(cfg.strategy).check_resources(cfg)  # FAST: its encoder
        rd = RunDir.of(cfg)
        if rd.path in names and names[rd.path] != config_mod.dumps(cfg):
            raise ConfigError(f"two jobs would share the run directory {rd.path}: drop the "
                              "name= override so that each job gets its own")
        names[rd.path] = config_mod.dumps(cfg)
        done += rd.inspect(cfg, overwrite) == "complete"
    return done


def cmd_config(args: argparse.Namespace) -> int:
    if args.flower is not None:  # a Flower run config, read as the ServerApp reads it
        try:
            from falkit.flower.common import load_config as flower_config
            from falkit.flower.common import parse_run_config
        except ImportError:
            raise ConfigError("--flower needs Flower: pip install 'falkit[flower]'") from None
        if args.items or args.preset:
            raise ConfigError("--flower takes the whole run config; give nothing else")
        cfg, opts = flower_config(parse_run_config(args.flower))
        from falkit.flower.server_app import validate as refused_by_server

        refused_by_server(cfg)  # what the ServerApp refuses before it contacts a site
        print(f"# falkit {__version__}: the run config as the ServerApp reads it (run "
              f"directory {cfg.run_name()}; {opts})")
        print(config_mod.dumps_all(cfg), end="")
        return 0
    path, overrides = _split_config_arg(args)
    cfg = _load_config(path, args.preset, overrides)
    print(f"# falkit {__version__}: the resolved config (run directory {cfg.run_name()}); the "
          "run's config.toml keeps only its own strategy's section")
    print(config_mod.dumps_all(cfg), end="")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from falkit.results import csv_text, write_atomic
    from falkit.rundir import RunDir, RunLocked

    n_jobs = _jobs_arg(args.jobs)
    if args.ray is not None and n_jobs > 1:
        raise ConfigError("give --ray or --jobs, not both (on Ray, the cluster's resources "
                          "and --cpus-per-run / --gpus-per-run decide how many runs at once)")
    path, overrides = _split_config_arg(args)
    base = _load_config(path, args.preset, overrides)  # validates the base first
    out = Path(base.out_dir).expanduser() / config_mod.check_name(args.name or "sweep",
                                                                  "--name")
    strategies = ([s for s in args.strategies.split(",") if s] if args.strategies
                  else [base.strategy])
    seeds = _int_list(args.seeds, "--seeds") if args.seeds else [base.seed]
    if not strategies or not seeds:
        raise ConfigError("--strategies and --seeds need at least one value each")
    grid: list[tuple[str, list[str]]] = []
    for g in args.grid or []:
        if "=" not in g:
            raise ConfigError(f"--grid '{g}' is not key=v1,v2")
        k, v = g.split("=", 1)
        grid.append((k, v.split(",")))
    combos = list(itertools.product(*[v for _, v in grid])) or [()]
    jobs, commands = [], []
    out_csv = "sweep.csv"
    for values in combos:
        for strategy in strategies:
            for seed in seeds:
                extra = dict(config_mod.parse_overrides(overrides))
                extra.update({k: v for (k, _), v in zip(grid, values, strict=True)})
                extra.update(strategy=strategy, seed=str(seed))
                jobs.append((config_mod.load(path, args.preset, extra), dict(zip(
                    [k for k, _ in grid], values, strict=True))))
                commands.append(_run_command(path, args.preset, extra))
    shard = _shard_arg(args.shard) if args.shard else None
    if shard is not None:
        keep = shard_jobs([RunDir.of(c).path for c, _ in jobs], *shard)
        jobs, commands = [jobs[i] for i in keep], [commands[i] for i in keep]
        out_csv = f"sweep.shard{shard[0]}of{shard[1]}.csv"
    if args.list:
        _check_jobs([c for c, _ in jobs])  # a listed job is one that would start
        for (cfg, _), command in zip(jobs, commands, strict=True):
            print(f"{cfg.run_name()}\t{command}")
        return 0
    if not jobs:
        print(f"sweep: shard {shard[0]}/{shard[1]} holds no run (the sweep has fewer runs "
              "than shards)", file=sys.stderr)
        return 0
    done = _check_jobs([c for c, _ in jobs])
    if args.ray is not None:
        device_set = "runtime.device" in dict(config_mod.parse_overrides(overrides)) or any(
            k == "runtime.device" for k, _ in grid)
        code = _sweep_ray(args, jobs, out / out_csv, done, device_set)
        if code is not None:
            return code
    elif args.cpus_per_run is not None or args.gpus_per_run is not None:
        raise ConfigError("--cpus-per-run and --gpus-per-run are for --ray (with --jobs N "
                          "each run gets the CPUs / N threads)")
    plan = _parallel_plan([c for c, _ in jobs], n_jobs) if n_jobs > 1 else None
    if plan is not None:
        return _sweep_parallel(jobs, out / out_csv, done, *plan, quiet=args.quiet)
    print(f"sweep: {len(jobs)} runs ({done} already complete)", file=sys.stderr)
    long_rows, locked = [], []
    for i, (cfg, settings) in enumerate(jobs):
        print(f"[{i + 1}/{len(jobs)}] {cfg.run_name()}", file=sys.stderr)
        try:
            result = _run_one(cfg, args.quiet)
        except RunLocked as e:  # another host's or sweep's run: not ours to fail
            print(f"[{i + 1}/{len(jobs)}] skipped {cfg.run_name()}: {e.holder}", file=sys.stderr)
            locked.append((cfg.run_name(), e.holder))
            continue
        for row in result.metrics:
            long_rows.append({"run": cfg.run_name(), "strategy": cfg.strategy, "seed": cfg.seed,
                              **settings, **row})
    _report_locked(locked, len(jobs))
    if long_rows or not locked:
        write_atomic(out / out_csv, csv_text(long_rows))
        print(f"sweep results: {out / out_csv}")
    return 0


def _report_locked(locked: list[tuple[str, str]], total: int) -> None:
    """The runs a sweep skipped because a live process holds them (another host, another
    sweep): a note, not a failure; the same command again runs (or reads) them."""
    if not locked:
        return
    print(f"sweep: {len(locked)} of {total} runs skipped, in use by another process (not "
          "in this sweep's csv; run the same command again once they end):", file=sys.stderr)
    for name, holder in locked:
        print(f"  {name}: {holder}", file=sys.stderr)


def shard_jobs(paths: list[Path], shard: int, shards: int) -> list[int]:
    """The jobs of shard `shard` of `shards` (`falkit sweep --shard I/N`): the distinct run
    directories, in job order, dealt out in turn, so that every run belongs to exactly one
    shard and the same command gives every shard the same runs. Jobs that share a run
    directory (the same run) share a shard."""
    order: dict[Path, int] = {}
    for path in paths:
        order.setdefault(path, len(order))
    return [i for i, path in enumerate(paths) if order[path] % shards == shard]


def _shard_arg(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or int(m[2]) < 1 or int(m[1]) >= int(m[2]):
        raise ConfigError(f"--shard must be I/N with 0 <= I < N (e.g. "
                          f"$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT), got {text!r}")
    return int(m[1]), int(m[2])


def _run_command(path: str | None, preset: str | None, overrides: dict[str, str]) -> str:
    """The `falkit run` command line of one sweep job (`falkit sweep --list`)."""
    import shlex

    words = ["falkit", "run", *([path] if path else []), *(["--preset", preset] if preset
                                                            else [])]
    words += [f"{k}={v}" for k, v in overrides.items()]
    return shlex.join(words)


def _jobs_arg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--jobs must be an integer >= 1 (runs at once), got {text!r}")
    return n


def _parallel_plan(cfgs: list[config_mod.Config], n_jobs: int, threads_each: int = 0
                   ) -> tuple[int, list[int], list[int], list[int]] | None:
    """How a sweep runs with --jobs N > 1: (processes, each job's first job with the same
    run directory, the jobs to run, each job's intra-op threads), or None when every run is
    complete (the sweep only reads them, as with --jobs 1). Jobs with one run directory (the
    same run) run once; finished runs are only read. With runtime.threads = 0 a job gets
    the CPUs divided by the processes (at least one), so that the processes do not
    oversubscribe the CPU. The worker sets that thread count itself and the job's config
    stays as it is; the thread count is no part of a run's identity (config.NOT_IDENTITY)
    nor of its name, so a run resumes with any --jobs. `threads_each`: that many instead
    (--ray: the CPUs a task holds)."""
    from falkit.parallel import cpu_count
    from falkit.rundir import RunDir

    first: dict[Path, int] = {}
    firsts = [first.setdefault(RunDir.of(cfg).path, i) for i, cfg in enumerate(cfgs)]
    left = [i for i in first.values() if RunDir.of(cfgs[i]).inspect(cfgs[i], False)
            != "complete"]
    if not left:
        return None
    n = min(n_jobs, len(left))
    each = threads_each or (0 if n == 1 else max(1, cpu_count() // n))
    threads = [0 if cfg.runtime.threads else each for cfg in cfgs]
    return n, firsts, left, threads


def _sweep_job(cfg: config_mod.Config, run_dir: str, threads: int,
               device: str = "") -> tuple[list[dict[str, Any]], bool, int | None]:
    """One run of `falkit sweep --jobs N`, in a spawned process of its own (falkit.parallel),
    or of `--ray` in a Ray task (falkit.raysweep): its metrics rows, whether it was complete
    already, the cycle it resumed at (None: it started afresh). Silent: the parent reports.
    `device`: the runtime.device to run on instead of the config's (a GPU run on a node the
    driver is not: checked here, where the GPU is)."""
    import os

    _setup_output()
    if device:
        config_mod.check_device(device)
        cfg.runtime.device = device  # not part of the run's identity (config.NOT_IDENTITY)
    if threads:  # before numpy and torch are imported: their thread pools read these
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(var, str(threads))
        import torch

        torch.set_num_threads(threads)
    from falkit.rundir import RunDir

    if str(RunDir.of(cfg).path) != run_dir:  # the config did not arrive as it was sent
        raise FalkitError(f"the worker's run directory {RunDir.of(cfg).path} is not the "
                          f"sweep's {run_dir}")
    from falkit.loop import run

    result = run(cfg)
    return result.metrics, result.skipped, result.resumed_from


class _SweepLines:
    """A sweep's lines (one per run as it starts and ends) above one overall progress bar
    (on a terminal; elsewhere only the lines)."""

    def __init__(self, total: int, quiet: bool = False):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console, transient=True,
                                 disable=quiet)
        self.task = self.progress.add_task("sweep", total=total)

    def __enter__(self) -> _SweepLines:
        if self.console.is_terminal and not self.progress.disable:
            self.progress.start()  # (rich's stop() writes a blank line where it never drew)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress.live.is_started:
            self.progress.stop()

    def line(self, text: str, done: bool = False) -> None:
        self.console.print(text, soft_wrap=True, highlight=False, markup=False, emoji=False)
        if done:
            self.progress.advance(self.task)


def _sweep_parallel(jobs: list[tuple[config_mod.Config, dict[str, str]]], table: Path,
                    done: int, n: int, firsts: list[int], left: list[int],
                    threads: list[int], execute: Callable[..., list[Any]] | None = None,
                    how: str = "", device: str = "", quiet: bool = False) -> int:
    """`falkit sweep --jobs N` (or `--ray`): the runs in N processes at once (or as Ray
    tasks: `execute(job_args, on_start, on_finish)`, falkit.raysweep), one line per run as
    it starts and ends; a failed run does not stop the others; sweep.csv in job order, with
    the rows a --jobs 1 sweep writes."""
    from falkit.parallel import LOCKED, Outcome, run_jobs
    from falkit.results import csv_text, read_metrics, write_atomic
    from falkit.rundir import RunDir

    total = len(jobs)
    paths = [RunDir.of(cfg).path for cfg, _ in jobs]
    each = sorted({threads[i] for i in left if threads[i]})
    per_job = (f", {'/'.join(map(str, each))} CPU thread(s) each (runtime.threads=0)"
               if each else "")
    print(f"sweep: {total} runs ({done} already complete), {how or f'{n} at once'}{per_job}",
          file=sys.stderr)
    by_job: dict[int, Outcome] = {}
    for i in sorted(set(firsts) - set(left)):  # finished: read, as run() does when it skips
        by_job[i] = Outcome(True, (read_metrics(paths[i]), True, None))
        print(f"[{i + 1}/{total}] already complete {paths[i].name}", file=sys.stderr)
    lines = _SweepLines(len(left), quiet)

    def started(k: int, where: str = "") -> None:
        i = left[k]
        lines.line(f"[{i + 1}/{total}] start {paths[i].name}{' ' + where if where else ''}")

    def finished(k: int, o: Outcome) -> None:
        i = left[k]
        name = paths[i].name
        if o.code == LOCKED:
            line = f"skipped {name}: {o.error}"
        elif not o.ok:
            line = f"failed {name} ({o.seconds:.1f} s): {o.error}"
        elif o.value[1]:
            line = f"already complete {name}"
        else:
            last = o.value[0][-1] if o.value[0] else {}
            acc = (f": accuracy {100 * last['accuracy']:.2f}% at "
                   f"{last.get('labeled_pct', float('nan')):.1f}% labeled"
                   if isinstance(last.get("accuracy"), float) else "")
            resumed = f" (resumed at cycle {o.value[2] + 1})" if o.value[2] else ""
            where = f" {o.where}" if o.where else ""
            line = f"done {name} in {o.seconds:.1f} s{where}{resumed}{acc}"
        lines.line(f"[{i + 1}/{total}] {line}", done=True)
        if o.detail:
            lines.line(o.detail.rstrip())

    args = [(jobs[i][0], str(paths[i]), threads[i], device) for i in left]
    with lines:
        outcomes = (execute(args, started, finished) if execute is not None else
                    run_jobs(_sweep_job, args, n, on_start=started, on_finish=finished))
    by_job.update(zip(left, outcomes, strict=True))
    long_rows, ok = [], 0
    for i, (cfg, settings) in enumerate(jobs):
        o = by_job[firsts[i]]
        if not o.ok:
            continue
        ok += 1
        # a repeated job reads the run's metrics.csv, as --jobs 1 does when it skips it
        metrics = o.value[0] if firsts[i] == i else read_metrics(paths[i])
        for row in metrics:
            long_rows.append({"run": cfg.run_name(), "strategy": cfg.strategy, "seed": cfg.seed,
                              **settings, **row})
    locked = [i for i in left if by_job[i].code == LOCKED]
    failed = [(paths[i].name, by_job[i]) for i in left
              if not by_job[i].ok and by_job[i].code != LOCKED]
    if long_rows:
        write_atomic(table, csv_text(long_rows))
    _report_locked([(paths[i].name, by_job[i].error) for i in locked], len(set(firsts)))
    if not failed:
        print(f"sweep results: {table}")
        return 0
    kept = (f"{table.name} holds the {ok} of {total} runs that finished" if long_rows
            else f"{table.name} was not written")
    print(f"falkit: error: {len(failed)} of {len(set(firsts))} runs failed ({kept}; run the "
          "same command again to retry them, finished runs are skipped):", file=sys.stderr)
    for name, o in failed:
        print(f"  {name}: {o.error}", file=sys.stderr)
    if long_rows:
        print(f"sweep results (partial, {ok} of {total} runs): {table}")
    return 2 if all(o.code == 2 for _, o in failed) else 1


def _float_arg(text: str | None, flag: str, default: float) -> float:
    """A resource amount of --ray: 0, or at least Ray's resolution 0.0001."""
    if text is None:
        return default
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not v >= 0 or v == float("inf") or 0 < v < 1e-4:
        raise ConfigError(f"{flag} must be 0 or a number >= 0.0001 (fractions share a "
                          f"{'GPU' if 'gpu' in flag else 'CPU'}), got {text!r}")
    return round(v, 4)  # Ray's resolution


def _sweep_ray(args: argparse.Namespace, jobs: list[tuple[config_mod.Config, dict[str, str]]],
               table: Path, done: int, device_set: bool) -> int | None:
    """`falkit sweep --ray ADDRESS`: every run a Ray task of --cpus-per-run CPUs and
    --gpus-per-run GPUs on the cluster (falkit.raysweep); the lines, table and exit codes
    of --jobs N. None when every run is complete (read as --jobs 1 does: no cluster)."""
    from falkit import raysweep

    cfgs = [c for c, _ in jobs]
    default_cpus = float(max((c.runtime.threads for c in cfgs), default=0) or 1)
    cpus = _float_arg(args.cpus_per_run, "--cpus-per-run", default_cpus)
    gpus = _float_arg(args.gpus_per_run, "--gpus-per-run", 0.0)
    if cpus == 0 and gpus == 0:
        raise ConfigError("--cpus-per-run 0 needs --gpus-per-run > 0 (a run needs a CPU or "
                          "a GPU)")
    # a run's intra-op threads: runtime.threads, else the CPUs the task holds (at least 1)
    plan = _parallel_plan(cfgs, len(cfgs), threads_each=max(1, int(cpus)))
    if plan is None:
        return None
    n, firsts, left, threads = plan
    # a GPU run runs on CUDA unless the command line or the config chose the device (the
    # driver may have no GPU: the worker checks it)
    device = ("cuda" if gpus > 0 and not device_set
              and all(c.runtime.device == "cpu" for c in cfgs) else "")
    raysweep.connect(args.ray)
    nodes = raysweep.check_nodes(sorted({Path(c.out_dir).expanduser() for c in cfgs}),
                                 cpus, gpus)
    how = (f"on Ray ({len(nodes)} node{'s' if len(nodes) != 1 else ''}), {cpus:g} CPU"
           f"{f' and {gpus:g} GPU' if gpus else ''} per run"
           f"{', runtime.device=cuda' if device else ''}")

    def execute(job_args: list[tuple[Any, ...]], on_start: Any, on_finish: Any) -> list[Any]:
        return raysweep.run_tasks(_sweep_job, job_args, cpus, gpus, on_start, on_finish)

    return _sweep_parallel(jobs, table, done, n, firsts, left, threads, execute, how, device,
                           args.quiet)


def cmd_label(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from falkit import labeling
    from falkit.results import write_atomic

    folder = labeling.latest_queue(Path(args.run_dir), args.client)
    if args.export_label_studio:
        out = Path(args.export_label_studio)
        tasks = labeling.export_label_studio(folder)
        write_atomic(out, json.dumps(tasks, indent=1) + "\n")
        conf = out.with_suffix(".xml")
        write_atomic(conf, labeling.label_studio_config(labeling.read_queue(folder)["classes"]))
        print(f"{len(tasks)} tasks -> {out}; labeling config -> {conf}")
        return 0
    if args.import_label_studio:
        try:
            tasks = json.loads(Path(args.import_label_studio).read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:
            raise FalkitError(f"{args.import_label_studio}: not a JSON export ({e})") from None
        got = labeling.import_label_studio(folder, tasks)
        q = labeling.progress(labeling.read_queue(folder), labeling.read_answers(folder))
        print(f"Label Studio: {_ls_summary(got)}; {q['answered']} / {q['total']} answered")
        return 0
    token = _label_token(args)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"falkit: warning: serving on {args.host}: anyone who can reach this machine "
              "and has the token can label this queue", file=sys.stderr)
        if not args.certfile:
            print("falkit: warning: the page is plain HTTP: the token and the answers "
                  "cross the network unencrypted (use --certfile/--keyfile, or an SSH "
                  "tunnel to 127.0.0.1)", file=sys.stderr)
    from falkit.labelpage import serve

    serve(folder, args.host, args.port, token, args.certfile, args.keyfile)
    return 0


def _ls_summary(got: dict[str, list[int]]) -> str:
    """One line on what a Label Studio import did (labeling.import_label_studio's rule)."""
    def ids(k: str) -> str:
        shown = ", ".join(str(i) for i in got[k][:5])
        return f" (sample {shown}{', ...' if len(got[k]) > 5 else ''})"

    parts = [f"{len(got['new'])} new answers"]
    if got["updated"]:
        parts.append(f"{len(got['updated'])} updated (corrected in Label Studio){ids('updated')}")
    if got["unchanged"]:
        parts.append(f"{len(got['unchanged'])} unchanged")
    if got["conflicting"]:
        parts.append(f"{len(got['conflicting'])} tasks with disagreeing annotations took the "
                     f"newest{ids('conflicting')}")
    if got["kept"]:
        parts.append(f"{len(got['kept'])} answers given on the page kept over Label "
                     f"Studio's{ids('kept')}")
    if got["unannotated"]:
        parts.append(f"{len(got['unannotated'])} tasks without an annotation")
    return ", ".join(parts)


def _label_token(args: argparse.Namespace) -> str:
    """The page's access token: --token, or the one in --token-file (written there, 0600,
    if the file does not exist yet), or a new random one."""
    import os
    import re
    from pathlib import Path

    from falkit import labeling

    def checked(t: str, where: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]{16,128}", t):
            raise FalkitError(f"{where}: a token is 16-128 letters, digits, - or _")
        return t

    if args.token and args.token_file:
        raise FalkitError("give --token or --token-file, not both")
    if args.token:
        return checked(args.token, "--token")
    if not args.token_file:
        return labeling.new_token()
    path = Path(args.token_file)
    try:
        return checked(path.read_text(encoding="utf-8").strip(), str(path))
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as e:
        raise FalkitError(f"{path}: cannot read the token ({e})") from None
    token = labeling.new_token()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1..65535, got {text!r}")
    return port


def cmd_demo(args: argparse.Namespace) -> int:
    from falkit.report import write_report

    runs = []
    for strategy in args.strategies.split(","):
        cfg = config_mod.load(args.config, preset="quick",
                              overrides={"strategy": strategy, "out_dir": args.out})
        result = _run_one(cfg, args.quiet)
        runs.append((strategy, result.run_dir))
    print()
    print(f"Global-model accuracy on the full {cfg.data.dataset} test set: rho={cfg.data.rho}, "
          f"{cfg.partition.method} alpha={cfg.partition.alpha:g}, "
          f"{cfg.partition.num_clients} clients, quick preset, seed {cfg.seed}")
    print(accuracy_text([d for _, d in runs]))
    print()
    for s, d in runs:
        print(f"results of {s}: {d}")
    html = write_report([d for _, d in runs], Path(args.out) / "report")
    print(f"report (tables, figures): {html}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    print(accuracy_text(args.runs))
    return 0


def _check_report_out(out: Path) -> None:
    """A report folder is a directory of its own: not a file, not (inside) a run."""
    from falkit.rundir import check_out_dir, is_run

    check_out_dir(out, "--out")
    for p in (out, *out.parents):
        if is_run(p):
            raise ConfigError(f"--out {out} is inside the run directory {p}; write the report "
                              "to a folder of its own")


def cmd_report(args: argparse.Namespace) -> int:
    from falkit.report import write_report

    _check_report_out(Path(args.out))
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    html = write_report(args.runs, Path(args.out), formats=formats)
    print(accuracy_text(args.runs))
    print(f"report: {html}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from falkit.report import compare_text, load_runs

    print(compare_text(load_runs(args.runs), args.a, args.b))
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from falkit.data.federation import build, client_budgets
    from falkit.data.partition import format_partition_table, write_partition_csv

    path, overrides = _split_config_arg(args)
    cfg = _load_config(path, args.preset, overrides)
    data = build(cfg)
    counts = data.partition_counts()
    print(f"{cfg.data.dataset}: {data.num_train} train samples after the long tail "
          f"(rho={cfg.data.rho}), {len(data.clients)} clients, "
          f"{cfg.partition.method} alpha={cfg.partition.alpha:g}, seed {cfg.seed}")
    print(format_partition_table(counts, data.dataset.classes))
    budgets = client_budgets(cfg, data)
    print(f"per-client budget per cycle: {budgets[0] if len(set(budgets)) == 1 else budgets}")
    if args.csv:
        write_partition_csv(Path(args.csv), counts, data.dataset.classes)
        print(f"written: {args.csv}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from falkit.data import sources

    if args.action == "list":
        for name, desc in sources.describe():
            where = sources.find(name, args.data_root)
            print(f"{name:<14} {'present' if where else 'missing':<8} {where or ''}  {desc}")
        for name, info in sources.SIZED.items():  # MedMNIST+ sizes: listed where present
            where = sources.find(name, args.data_root)
            if where is not None:
                print(f"{name:<14} {'present':<8} {where}  {info.description}")
        return 0
    if not args.name:
        raise ConfigError(f"falkit data {args.action} needs a dataset NAME")
    if args.action == "find":
        where = sources.find(args.name, args.data_root)
        if where is None:
            sources.load(args.name, args.data_root)  # raises the error that says how to get it
        print(where)
        return 0
    print(sources.download(args.name, args.data_root))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from falkit.al.base import STRATEGIES, list_ids
    from falkit.data import partition, sources
    from falkit.fl.algorithms import ALGORITHMS
    from falkit.models.backbones import describe as describe_backbones

    list_ids()
    sections = [
        ("strategies (@G = global model, @L = local model)",
         [(n + ("@G|@L" if c.uses_selector else ""), c.description)
          for n, c in STRATEGIES.items()]),
        ("FL algorithms", [(n, c.description) for n, c in ALGORITHMS.items()]),
        ("backbones", [*describe_backbones(),
                       ("frozen:<encoder>", "a frozen encoder (pixels, pca[:dim], hf:, "
                                            "open_clip:, timm:, torchscript:) under a trained "
                                            "model.head = linear | mlp")]),
        ("datasets", sources.describe()),
        ("partitions", [*[(n, d) for n, (_, d) in partition.PARTITIONERS.items()],
                        ("natural", "the data's own sites (npz site_train, image folders "
                                    "train/<site>/<class>/, a CSV's site column)")]),
        ("feature shifts (partition.shift)",
         [("rotate", "each client's images rotated by its own angle, up to 180°·strength"),
          ("color", "its own contrast and brightness per channel (a colour cast)"),
          ("noise", "its own level of Gaussian noise"),
          ("blur", "its own Gaussian blur")]),
        ("presets", [("paper", "the papers' protocol as their text states it (the defaults)"),
                     ("quick", "the same protocol scaled to a 2-core CPU (docs: Presets)"),
                     ("reference", "every choice of the authors' code (docs: Fidelity)")]),
    ]
    from falkit import registry

    plugins = [(f"{name} ({kind.replace('_', ' ')})", where)
               for kind, name, where in registry.listing()]
    if plugins:  # installed through entry points, or named by module:Class in this process
        sections.append(("plug-ins", plugins))
    for title, items in sections:
        print(f"{title}:")
        for name, desc in items:
            print(f"  {name:<22} {desc}")
    return 0


def cmd_fast(args: argparse.Namespace) -> int:
    from falkit import fast

    path, overrides = _split_config_arg(args)
    cfg = _load_config(path, args.preset, [*overrides, "strategy=fast"])
    result = fast.run(cfg, reporter=RichReporter(args.quiet), overwrite=args.overwrite)
    if result.skipped:
        print(f"{result.run_dir}: already complete (use --overwrite to run again)",
              file=sys.stderr)
    print(fast.summary_text(result.run_dir))
    print(f"results: {result.run_dir}")
    return 0


def cmd_fast_compare(args: argparse.Namespace) -> int:
    from falkit import fast
    from falkit.results import write_atomic

    path, overrides = _split_config_arg(args)
    base = _load_config(path, args.preset, overrides)
    out = Path(base.out_dir).expanduser() / config_mod.check_name(args.name or "fast_compare",
                                                                  "--name")
    variants = [v.split(",") if v else [] for v in (args.fast or [""])]
    jobs = [("baseline", _load_config(path, args.preset, [*overrides, f"strategy={s}"]))
            for s in args.baselines.split(",") if s]
    jobs += [("variant", _load_config(path, args.preset, [*overrides, "strategy=fast", *v]))
             for v in variants]
    _check_jobs([cfg for _, cfg in jobs])
    runs = []
    for i, (kind, cfg) in enumerate(jobs):
        print(f"[{i + 1}/{len(jobs)}] {cfg.run_name()}", file=sys.stderr)
        if kind == "variant":  # a FAST variant
            runs.append(fast.run(cfg, reporter=RichReporter(args.quiet)).run_dir)
        else:
            runs.append(_run_one(cfg, args.quiet).run_dir)
    rows = fast.comparison_rows(runs)
    text = fast.comparison_markdown(rows)
    from falkit.results import csv_text

    write_atomic(out / "comparison.csv", csv_text(rows))
    write_atomic(out / "comparison.md", text)
    print(text)
    print(f"comparison: {out / 'comparison.md'}")
    return 0


def cmd_comm(args: argparse.Namespace) -> int:
    from falkit import fast
    from falkit.data import sources
    from falkit.fl.algorithms import clone_state, state_bytes
    from falkit.models.backbones import create as create_backbone

    for flag, value in (("--clients", args.clients), ("--rounds", args.rounds),
                        ("--dim", args.dim)):
        if value is not None and value < 1:
            raise ConfigError(f"falkit comm {flag} must be >= 1, got {value}")
    # a built-in dataset's shape is known without its files; any other is read
    shape = sources.image_shape(args.dataset)
    if shape is None:
        ds = sources.load(args.dataset, args.data_root)
        shape = (ds.num_classes, ds.in_channels, ds.image_size)
    num_classes, channels, size = shape
    if args.model == "linear":
        if not args.dim:
            raise ConfigError("falkit comm --model linear needs --dim (the embedding size)")
        channels, size, what = args.dim, 1, f"{args.dim}-dim embeddings"
    else:
        what = f"{channels}x{size}x{size} images"
    model = create_backbone(args.model, num_classes=num_classes, in_channels=channels,
                            image_size=size)
    nbytes = state_bytes(clone_state(model))
    t = fast.model_traffic(nbytes, args.clients, args.rounds)
    print(f"{args.model} on {args.dataset} ({num_classes} classes, {what}): "
          f"{nbytes:,} bytes per state dict (every tensor, buffers included)")
    print(f"per round: 2 x {nbytes:,} B x {args.clients} clients = {t['round_bytes']:,} B = "
          f"{t['round_mib']:.4f} MiB")
    print(f"{args.rounds} rounds: {t['total_bytes']:,} B = {t['total_mib']:.4f} MiB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="falkit", description="Federated active learning.")
    p.add_argument("--version", action="version", version=f"falkit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]",
                        help="a TOML config file, then overrides such as partition.alpha=100")
        sp.add_argument("--preset", metavar="P[,P]",
                        help=f"one of {', '.join(config_mod.PRESETS)}, or several joined by "
                        "commas (e.g. reference,quick)")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    sp = sub.add_parser("run", help="run (or resume) one experiment")
    with_config(sp)
    sp.add_argument("--overwrite", action="store_true", help="discard an existing run directory")
    sp.add_argument("--wait", action="store_true",
                    help="oracle=human: wait for the labels instead of stopping with exit "
                         f"status {WAITING}, then go on")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("label", help="label a client's queued samples in the browser "
                                      "(runs with oracle=human)")
    sp.add_argument("run_dir", help="the run directory")
    sp.add_argument("--client", type=int, default=0, help="the client whose queue to label")
    sp.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default: loopback only; any other is "
                         "reachable over the network, guarded by the printed token)")
    sp.add_argument("--port", type=_port, default=8765)
    sp.add_argument("--token-file", metavar="FILE",
                    help="keep the access token in FILE (made, mode 0600, if missing): a "
                         "restarted server keeps it, and open pages keep working")
    sp.add_argument("--token", help="the access token to use (visible to other users of "
                                    "this machine in the process list: prefer --token-file)")
    sp.add_argument("--certfile", help="serve HTTPS with this certificate (PEM)")
    sp.add_argument("--keyfile", help="the certificate's private key (PEM)")
    sp.add_argument("--export-label-studio", metavar="FILE",
                    help="write the queue's unanswered samples as a Label Studio import "
                         "file (and the labeling config beside it) instead of serving")
    sp.add_argument("--import-label-studio", metavar="FILE",
                    help="take answers from a Label Studio JSON export instead of serving")
    sp.set_defaults(func=cmd_label)

    sp = sub.add_parser("config", help="print the fully resolved config as TOML (every "
                        "section, every default); runs nothing")
    with_config(sp)
    sp.add_argument("--flower", metavar="RUN_CONFIG",
                    help="check a `flwr run --run-config` value (\"k=v k=v\" or a .toml "
                    "file) before submitting it: falkit's message for a key Flower refuses")
    sp.set_defaults(func=cmd_config)

    sp = sub.add_parser("sweep", help="run a grid of strategies x seeds x settings")
    with_config(sp)
    sp.add_argument("--strategies", help="comma-separated, e.g. random,entropy@G,coreset@L")
    sp.add_argument("--seeds", help="comma-separated, e.g. 0,1,2")
    sp.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                    help="a setting to vary, e.g. partition.alpha=0.1,100 (repeatable)")
    sp.add_argument("--name", help="sweep name (default: sweep)")
    sp.add_argument("--jobs", default="1", metavar="N",
                    help="runs at once, each in a process of its own (default 1); with "
                    "runtime.threads=0 each gets the CPUs / N intra-op threads")
    sp.add_argument("--list", action="store_true",
                    help="print the jobs (run name, tab, its `falkit run` command) and stop")
    sp.add_argument("--shard", metavar="I/N",
                    help="run only shard I of N (0 <= I < N), e.g. in a Slurm job array: "
                    "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; its table is "
                    "sweep.shardIofN.csv")
    sp.add_argument("--ray", metavar="ADDRESS",
                    help="run each run as a task on a Ray cluster: auto (the cluster this "
                    "machine belongs to) or HEAD:PORT; every node must see out_dir and the "
                    "working directory at the same paths (a shared file system)")
    sp.add_argument("--cpus-per-run", metavar="C",
                    help="--ray: CPUs each run holds, fractional allowed (default: "
                    "runtime.threads, else 1); its intra-op threads unless runtime.threads")
    sp.add_argument("--gpus-per-run", metavar="G",
                    help="--ray: GPUs each run holds, e.g. 0.25 = 4 runs per GPU (default 0); "
                    "such runs see only their GPU and use runtime.device=cuda unless the "
                    "command line sets runtime.device")
    sp.set_defaults(func=cmd_sweep)

    sp = sub.add_parser("demo", help="the quick FMNIST-LT demo of `make demo`")
    sp.add_argument("config", nargs="?", default=None, help="base config (default: built-in)")
    sp.add_argument("--strategies", default="random,entropy@G,coreset@G,fairfal")
    sp.add_argument("--out", default="runs/demo")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("show", help="print the accuracy table of run directories")
    sp.add_argument("runs", nargs="+")
    sp.set_defaults(func=cmd_show)

    sp = sub.add_parser("report", help="tables, paired statistics, figures and one HTML page")
    sp.add_argument("runs", nargs="+", help="run directories (or folders holding them)")
    sp.add_argument("--out", required=True, help="output directory")
    sp.add_argument("--formats", default="png", metavar="F[,F]",
                    help="figure files to write beside the PNGs the page shows: png, pdf, "
                         "svg (e.g. png,pdf)")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("compare", help="paired statistics of two methods across seeds")
    sp.add_argument("a", help="method id, e.g. fairfal")
    sp.add_argument("b", help="method id, e.g. entropy@G")
    sp.add_argument("runs", nargs="+", help="run directories (or folders holding them)")
    sp.set_defaults(func=cmd_compare)

    sp = sub.add_parser("partition", help="print the client x class partition of a config")
    with_config(sp)
    sp.add_argument("--csv", help="also write the counts to this CSV")
    sp.set_defaults(func=cmd_partition)

    sp = sub.add_parser("data", help="list, find or download datasets")
    sp.add_argument("action", choices=["list", "find", "download"])
    sp.add_argument("name", nargs="?")
    sp.add_argument("--data-root", help="searched before $FALKIT_DATA and ~/.cache/falkit")
    sp.set_defaults(func=cmd_data)

    sp = sub.add_parser("fast", help="FAST: two passes with a frozen encoder, one-shot "
                        "training (strategy=fast)")
    with_config(sp)
    sp.add_argument("--overwrite", action="store_true", help="discard an existing run directory")
    sp.set_defaults(func=cmd_fast)

    sp = sub.add_parser("fast-compare", help="FAST (one AL round) vs iterative baselines: "
                        "accuracy, rounds, MiB, wall-clock (FAST Table III)")
    with_config(sp)
    sp.add_argument("--baselines", default="random,entropy@G,fairfal",
                    help="comma-separated strategies run with the config's cycles")
    sp.add_argument("--fast", action="append", metavar="KEY=V,KEY=V",
                    help="one FAST variant's overrides, e.g. model.backbone=linear "
                    "(repeatable; default: one variant with the config as it is)")
    sp.add_argument("--name", help="output folder under out_dir (default: fast_compare)")
    sp.set_defaults(func=cmd_fast_compare)

    sp = sub.add_parser("comm", help="model traffic of FL training (bytes per round, MiB)")
    sp.add_argument("--model", required=True, help="backbone, e.g. cnn4 or linear")
    sp.add_argument("--dataset", required=True, help="gives the classes and the input shape")
    sp.add_argument("--clients", type=int, default=10, help="participating clients per round")
    sp.add_argument("--rounds", type=int, default=100)
    sp.add_argument("--dim", type=int, help="embedding size (model linear)")
    sp.add_argument("--data-root", help="searched before $FALKIT_DATA and ~/.cache/falkit")
    sp.set_defaults(func=cmd_comm)

    sp = sub.add_parser("list", help="every strategy, FL algorithm, backbone, dataset, partition")
    sp.set_defaults(func=cmd_list)
    return p


def _one_line_warning(message: Warning | str, category: type[Warning], *args: Any,
                      **kwargs: Any) -> str:
    return f"falkit: warning: {message}\n"


def _setup_output() -> None:
    """Log lines and one-line warnings on stderr (the CLI, and each worker of a sweep)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.formatwarning = _one_line_warning
    warnings.simplefilter("once", UserWarning)  # a command may load the same runs twice


def main(argv: list[str] | None = None) -> int:
    _setup_output()
    parser = build_parser()
    # options may come after key=value overrides: collect the stray positionals
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "items") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.items += extra
    try:
        return int(args.func(args) or 0)
    except FalkitError as e:
        print(f"falkit: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, read-only file system, permissions: the last good
        # checkpoint and every finished result are kept (writes are atomic)
        where = f": {e.filename}" if e.filename else ""
        print(f"falkit: error: {e.strerror or e}{where} (what was already written is intact: "
              "run the same command again once this is fixed)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("falkit: interrupted; run the same command again to resume after the last "
              "finished cycle", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
