"""falkit on a GPU in one command (issue 14): every strategy, FL algorithm and FAST for two
quick cycles on the device (failing loudly), then the paper protocol timed; figures to
benchmarks/GPU_RESULTS.md and .json.

    PYTHONPATH=src python benchmarks/gpu.py                     # on a CUDA machine, < 10 min
    PYTHONPATH=src python benchmarks/gpu.py --device cpu --only smoke --cases strategies \
        --strategies random,fairfal --data digits --out /tmp/r.md     # the CPU test's mode

Needs only a torch build for the device, numpy, scipy, scikit-learn (transformers for the
tiny `hf:` encoder case, flwr for the Flower case: each is skipped, and says so, when
missing) and Fashion-MNIST in a data root falkit searches ($FALKIT_DATA, ...). falkit is
imported from src/ (no installation, no CLI).

1. smoke — each case is a `quick` run with two cycles (fl.rounds = 1, 2 where a method
   needs a second round, local models 2 epochs) on FMNIST-LT with runtime.device = --device:
   every registered strategy id, every @L strategy and LoGo with `scratch` local models,
   FedAvg/FedProx/SCAFFOLD/FedNova (batched clients and one at a time, partial
   participation), every FairFAL ablation switch, the `reference` preset, bf16, KAFAL with
   KCFU, FAST with the offline pca encoder (image backbone, linear probing, pooled) and a
   tiny randomly initialised SigLIP saved from a config (`hf:<dir>`, on sklearn digits), and a
   Flower simulation. A case is ok when the run finishes with every cycle's metrics and a
   finite accuracy; otherwise FAILED with the exception's last line (full traceback in the
   results). Any failure: exit code 1, the results are still written.
2. timing — the paper protocol (configs/fmnist_lt.toml, preset paper) for FairFAL seed 0,
   cycle by cycle (falkit resumes after each), within a wall-clock budget (--budget-s, and
   never past --deadline-s of the whole script): per-phase times from metrics.csv,
   training samples/s, seconds per cycle, the full protocol projected from the measured
   cycles (and said so); the same with runtime.precision = bf16 and the accuracy difference
   at the last cycle both reached; the GPU's kernel-busy share of wall-clock over a few FL
   rounds (torch.profiler); with --cpu-too the CPU engine's seconds per round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from falkit import config as config_mod  # noqa: E402
from falkit.al.base import list_ids  # noqa: E402
from falkit.data.sources import load as load_dataset  # noqa: E402

PAPER_TOML = ROOT / "configs" / "fmnist_lt.toml"
CASE_GROUPS = ("strategies", "fl", "ablations", "fast", "flower")
PHASES = ("train", "query", "local_model", "eval")

# the smoke runs: `quick`, two cycles, one FL round, short local models
SMOKE = {"budget.cycles": "2", "fl.rounds": "1", "local_model.epochs": "2",
         "local_model.decay_epoch": "1", "ifal.kd_epochs": "2"}
# sklearn's digits (8 px, always there): the CPU test's data; cnn4 needs >= 16 px
DIGITS = {"data.dataset": "digits", "data.rho": "5", "partition.num_clients": "3",
          "partition.alpha": "1.0", "model.backbone": "resnet8_preact16"}
FAIRFAL_ABLATIONS = [("selector", "complement"), ("selector", "global"), ("selector", "local"),
                     ("classwise", "false"), ("prototypes", "local"), ("kappa", "0"),
                     ("uncertainty", "margin"), ("uncertainty", "least_confidence"),
                     ("embedding_probs", "code"), ("similarity", "dot")]


@dataclass
class Case:
    id: str
    group: str
    overrides: dict[str, str] = field(default_factory=dict)
    kind: str = "run"  # run | fast | fast_hf | flower
    preset: str = "quick"


def smoke_cases(groups: list[str], strategies: list[str]) -> list[Case]:
    cases: list[Case] = []
    if "strategies" in groups:
        for sid in strategies:
            cases.append(Case(sid, "strategies", {"strategy": sid}))
        for sid in strategies:  # the @L path with a scratch local model (issue 14's crash)
            if sid.endswith("@L") or sid == "logo":
                cases.append(Case(f"{sid} scratch", "strategies",
                                  {"strategy": sid, "local_model.mode": "scratch"}))
    if "fl" in groups:
        two = {"strategy": "entropy@G", "fl.rounds": "2"}
        for algo in ("fedavg", "fedprox", "scaffold", "fednova"):
            cases.append(Case(algo, "fl", {**two, "fl.algorithm": algo}))
        for algo in ("fedavg", "scaffold"):
            cases.append(Case(f"{algo} fraction=0.5", "fl",
                              {**two, "fl.algorithm": algo, "fl.fraction": "0.5"}))
            cases.append(Case(f"{algo} one client at a time", "fl",
                              {**two, "fl.algorithm": algo, "runtime.batch_clients": "off"}))
    if "ablations" in groups:
        for key, value in FAIRFAL_ABLATIONS:
            cases.append(Case(f"fairfal {key}={value}", "ablations",
                              {"strategy": "fairfal", f"fairfal.{key}": value}))
        cases.append(Case("fairfal preset reference", "ablations", {"strategy": "fairfal"},
                          preset="reference,quick"))
        cases.append(Case("fairfal bf16", "ablations",
                          {"strategy": "fairfal", "runtime.precision": "bf16"}))
        cases.append(Case("kafal kcfu", "ablations",
                          {"strategy": "kafal", "kafal.kcfu": "true", "fl.rounds": "2"}))
    if "fast" in groups:
        fast = {"strategy": "fast", "fl.rounds": "2", "fast.encoder": "pca"}
        cases.append(Case("fast pca", "fast", fast, kind="fast"))
        cases.append(Case("fast pca linear", "fast", {**fast, "model.backbone": "linear"},
                          kind="fast"))
        cases.append(Case("fast pca pooled linear", "fast",
                          {**fast, "model.backbone": "linear", "fast.scope": "pooled"},
                          kind="fast"))
        cases.append(Case("fast hf tiny-siglip linear (digits)", "fast",
                          {**fast, "model.backbone": "linear"}, kind="fast_hf"))
    if "flower" in groups:
        cases.append(Case("flower simulation fairfal (digits)", "flower",
                          {"strategy": "fairfal"}, kind="flower"))
    return cases


class Skip(Exception):
    """A case that cannot run here (a package that is not installed): not a failure."""


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-.")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _tiny_siglip(path: Path) -> Path:
    """A tiny randomly initialised SigLIP vision tower and its processor, saved the way a
    downloaded checkpoint is (as tests/test_encoders.py does)."""
    try:
        import transformers as tr
    except ImportError:
        raise Skip("transformers is not installed") from None
    major = int(tr.__version__.split(".")[0])
    if major < 5:  # falkit[fm] pins transformers 5 (its PIL image-processor backend)
        raise Skip(f"transformers {tr.__version__} is older than falkit[fm]'s 5.x")
    if not path.is_dir():
        torch.manual_seed(0)
        model = tr.SiglipVisionModel(tr.SiglipVisionConfig(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
            num_hidden_layers=2, num_attention_heads=4))
        model.save_pretrained(path)
        tr.SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def run_case(case: Case, args: argparse.Namespace, work: Path, datasets: dict[str, Any]
             ) -> dict[str, Any]:
    """One smoke case; returns accuracy and cycles, raises on any error."""
    from falkit import fast, loop

    digits_only = args.data == "digits" or case.kind in ("fast_hf", "flower")
    base = dict(SMOKE)
    if digits_only:
        base.update(DIGITS)
    over = {**base, **case.overrides, "runtime.device": args.device,
            "out_dir": str(work / "runs"), "name": _safe(case.id)}
    if case.kind in ("fast", "fast_hf"):
        over["fast.cache_dir"] = str(work / "embeddings")  # fresh: the encoder really runs
    if case.kind == "fast_hf":
        over.update({"data.rho": "none", "partition.method": "iid", "fast.initial": "0.05",
                     "fast.encoder": f"hf:{_tiny_siglip(work / 'tiny-siglip')}",
                     "fast.encode_batch": "256"})
    toml = None if digits_only else PAPER_TOML
    if case.kind == "flower":
        return _flower(case, args, over)
    cfg = config_mod.load(toml, case.preset, over)
    ds = datasets["digits" if digits_only else args.data]
    if case.kind in ("fast", "fast_hf"):
        res = fast.run(cfg, dataset=ds, overwrite=True)
        rows = res.metrics
        want = 1
    else:
        res = loop.run(cfg, dataset=ds, overwrite=True)
        rows = res.metrics
        want = cfg.budget.cycles
    _sync(args.device)
    if len(rows) != want:
        raise RuntimeError(f"{len(rows)} of {want} cycles in the metrics")
    acc = float(rows[-1]["accuracy"])
    if not math.isfinite(acc) or not 0.0 <= acc <= 1.0:
        raise RuntimeError(f"accuracy {acc} is not a finite fraction")
    return {"accuracy": acc, "cycles": len(rows)}


def _flower(case: Case, args: argparse.Namespace, over: dict[str, str]) -> dict[str, Any]:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise Skip("flwr is not installed") from None
    from falkit.flower.simulation import simulate
    from falkit.results import read_metrics

    over = {**over, "partition.num_clients": "3"}
    text = " ".join(f"{k}={v}" for k, v in over.items())
    simulate({"overrides": text, "preset": case.preset, "overwrite": True}, num_supernodes=3)
    rows = read_metrics(Path(over["out_dir"]) / over["name"])
    if len(rows) != int(over["budget.cycles"]):
        raise RuntimeError(f"{len(rows)} cycles in the Flower run's metrics")
    return {"accuracy": float(rows[-1]["accuracy"]), "cycles": len(rows)}


def smoke(args: argparse.Namespace, work: Path, datasets: dict[str, Any],
          deadline: float = float("inf")) -> list[dict]:
    """Every case, until `deadline` (time.monotonic()): the cases left then are recorded as
    skipped, so the script keeps its time limit and says what it did not run."""
    groups = [g for g in args.cases.split(",") if g]
    strategies = [s for s in args.strategies.split(",") if s] if args.strategies else list_ids()
    out = []
    for case in smoke_cases(groups, strategies):
        t = time.perf_counter()
        rec: dict[str, Any] = {"id": case.id, "group": case.group, "preset": case.preset,
                               "overrides": case.overrides}
        if time.monotonic() > deadline:
            rec.update(status="skipped", error="the script's deadline (--deadline-s) passed",
                       seconds=0.0)
            out.append(rec)
            print(f"  smoke skipped (deadline)  {case.id}", flush=True)
            continue
        try:
            rec.update(run_case(case, args, work, datasets))
            rec["status"] = "ok"
        except Skip as e:
            rec.update(status="skipped", error=str(e))
        except Exception as e:  # noqa: BLE001 - every failure is recorded, the run goes on
            lines = str(e).strip().splitlines()
            rec.update(status="FAILED", error=f"{type(e).__name__}: {lines[-1] if lines else ''}",
                       traceback=traceback.format_exc())
        rec["seconds"] = round(time.perf_counter() - t, 2)
        out.append(rec)
        line = f"  smoke {rec['status']:<7} {rec['seconds']:7.1f}s  {case.id}"
        if rec["status"] != "ok":
            line += f"  -- {rec['error']}"
        print(line, flush=True)
    return out


# -- 2. timing ------------------------------------------------------------------------------------
def _protocol(args: argparse.Namespace, work: Path, name: str, device: str,
              extra: dict[str, str]) -> config_mod.Config:
    over = {"strategy": "fairfal", "seed": "0", "runtime.device": device,
            "out_dir": str(work / "timing"), "name": name, **extra}
    if args.data == "digits":
        over.update({k: v for k, v in DIGITS.items() if k != "partition.num_clients"})
    return config_mod.load(PAPER_TOML, "paper", over)


def time_protocol(args: argparse.Namespace, work: Path, ds: Any, label: str,
                  extra: dict[str, str], share_s: float, deadline: float) -> dict[str, Any]:
    """The paper protocol cycle by cycle (a resume after each), while the next cycle's
    predicted time fits `share_s` and the script's deadline; cycle 0 always runs."""
    from falkit import loop

    cfg = _protocol(args, work, f"paper-fairfal-{label}", args.device, extra)
    start = time.perf_counter()
    walls: list[float] = []
    rows: list[dict[str, Any]] = []
    stopped = ""
    for c in range(cfg.budget.cycles):
        if c > 0:
            per_label = walls[-1] / rows[-1]["labeled"]
            predicted = per_label * rows[0]["labeled"] * (c + 1)
            if c == 1:  # the first query cycle also trains the scratch local models
                predicted *= 1.5
            spent = time.perf_counter() - start
            if spent + predicted > share_s or time.monotonic() + predicted > deadline:
                stopped = (f"stopped before cycle {c + 1}: {spent:.0f} s spent, ~{predicted:.0f}"
                           f" s predicted for the next, budget {share_s:.0f} s")
                break
        t = time.perf_counter()
        res = loop.run(cfg, dataset=ds, stop_after=c, overwrite=(c == 0))
        _sync(args.device)
        walls.append(time.perf_counter() - t)
        rows = res.metrics
        print(f"  timing {label}: cycle {c + 1}/{cfg.budget.cycles} in {walls[-1]:.1f} s, "
              f"accuracy {100 * rows[-1]['accuracy']:.2f} %", flush=True)
    fl = cfg.fl
    cycles = []
    for row, wall in zip(rows, walls, strict=True):
        times = {p: float(row.get(f"time_{p}", 0.0)) for p in PHASES}
        samples = fl.rounds * fl.local_epochs * int(row["labeled"])
        cycles.append({"cycle": int(row["cycle"]), "labeled": int(row["labeled"]),
                       "accuracy": float(row["accuracy"]), "wall_s": round(wall, 2),
                       **{f"{p}_s": round(v, 2) for p, v in times.items()},
                       "train_samples": samples,
                       "train_samples_per_s": round(samples / times["train"], 1)
                       if times["train"] > 0 else None,
                       "s_per_round": round(times["train"] / fl.rounds, 4)})
    return {"label": label, "device": args.device, "extra": extra, "cycles_total":
            cfg.budget.cycles, "rounds": fl.rounds, "local_epochs": fl.local_epochs,
            "measured": cycles, "stopped": stopped,
            "projection": _project(cycles, cfg.budget.cycles)}


def _project(cycles: list[dict[str, Any]], total: int) -> dict[str, Any]:
    """The full protocol from the measured cycles: an unmeasured cycle's training and local
    model times scale with its labeled count (steps per epoch do), its query and evaluation
    take what the last measured query cycle's took."""
    if not cycles:
        return {}
    per_cycle = cycles[0]["labeled"]
    last = cycles[-1]
    last_q = next((c for c in reversed(cycles) if c["cycle"] > 0), None)
    est = [c["wall_s"] for c in cycles]
    for c in range(len(cycles), total):
        lab = per_cycle * (c + 1)
        t = last["train_s"] * lab / last["labeled"] + last["eval_s"]
        if last_q is not None:
            t += last_q["query_s"] + last_q["local_model_s"] * lab / last_q["labeled"]
        est.append(t)
    method = ("measured" if len(cycles) == total else
              f"{len(cycles)} of {total} cycles measured, the rest extrapolated (train and "
              "local-model time x labeled count"
              + ("; query time of the last query cycle)" if last_q else
                 "; no query cycle measured: query time not included)"))
    return {"total_s": round(sum(est), 1), "per_cycle_s": [round(x, 1) for x in est],
            "method": method}


def gpu_busy(args: argparse.Namespace, ds: Any, rounds: int = 3) -> dict[str, Any]:
    """The share of wall-clock the GPU runs kernels while FL rounds of the paper protocol's
    first cycle train (torch.profiler: the sum of CUDA kernel self times over the wall time
    of the rounds; one stream, so kernels do not overlap)."""
    from torch.profiler import ProfilerActivity, profile

    from falkit.al.base import create as create_strategy
    from falkit.data.federation import build
    from falkit.fl.engine import configure_process
    from falkit.inprocess import InProcessFederation
    from falkit.loop import engine_for

    cfg = _protocol(args, Path(tempfile.gettempdir()), "busy", args.device, {})
    data = build(cfg, ds)
    configure_process(cfg)
    eng = engine_for(cfg, data.dataset, data.num_classes, len(data.clients))
    st = InProcessFederation(cfg, create_strategy("random"), data, eng)
    st.initial_labels()
    state = eng.init_state(cfg.seed, 0)
    K = len(data.clients)
    state, _ = eng.fl_round(state, list(range(K)), st.labeled, cfg.fl.lr, 0, (0, 0))  # warm
    _sync(args.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for r in range(rounds):
            state, _ = eng.fl_round(state, list(range(K)), st.labeled, cfg.fl.lr, 0, (0, r + 1))
        _sync(args.device)
        wall = time.perf_counter() - t
    from torch.autograd import DeviceType

    kernel_us = 0.0  # as the profiler's table totals it: only the device's own events
    for e in prof.key_averages():
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            kernel_us += float(e.self_device_time_total)
    return {"rounds": rounds, "wall_s": round(wall, 3), "kernel_s": round(kernel_us / 1e6, 3),
            "busy_pct": round(100 * kernel_us / 1e6 / wall, 1) if wall > 0 else None,
            "batched_clients": eng.batches_clients()}


def cpu_figures(args: argparse.Namespace, work: Path, ds: Any) -> dict[str, Any]:
    """The CPU engine on the paper protocol's first cycle, `--cpu-rounds` rounds only."""
    from falkit import loop

    cfg = _protocol(args, work, "paper-fairfal-cpu", "cpu",
                    {"budget.cycles": "1", "fl.rounds": str(args.cpu_rounds)})
    t = time.perf_counter()
    row = loop.run(cfg, dataset=ds, overwrite=True).metrics[0]
    wall = time.perf_counter() - t
    train = float(row["time_train"])
    samples = cfg.fl.rounds * cfg.fl.local_epochs * int(row["labeled"])
    return {"rounds": cfg.fl.rounds, "threads": torch.get_num_threads(), "wall_s": round(wall, 2),
            "train_s": round(train, 2), "s_per_round": round(train / cfg.fl.rounds, 3),
            "train_samples_per_s": round(samples / train, 1) if train > 0 else None,
            "cycle0_train_s_extrapolated_to_100_rounds": round(train / cfg.fl.rounds * 100, 1)}


def timing(args: argparse.Namespace, work: Path, ds: Any, deadline: float) -> dict[str, Any]:
    budget = max(0.0, min(args.budget_s, deadline - time.monotonic()))
    out: dict[str, Any] = {"budget_s": round(budget, 1)}
    if budget < 30:  # not even the first cycle would fit: say so instead of overrunning
        out["skipped"] = "the script's deadline (--deadline-s) left no time"
        return out
    t0 = time.monotonic()
    out["fp32"] = time_protocol(args, work, ds, "fp32", {}, 0.55 * budget, deadline)
    left = budget - (time.monotonic() - t0)
    out["bf16"] = time_protocol(args, work, ds, "bf16", {"runtime.precision": "bf16"},
                                max(left - 0.1 * budget, 0.0), deadline)
    a, b = out["fp32"]["measured"], out["bf16"]["measured"]
    n = min(len(a), len(b))
    if n:
        out["bf16_vs_fp32"] = {
            "cycle": n - 1, "labeled": a[n - 1]["labeled"],
            "accuracy_fp32": a[n - 1]["accuracy"], "accuracy_bf16": b[n - 1]["accuracy"],
            "accuracy_diff_pp": round(100 * (b[n - 1]["accuracy"] - a[n - 1]["accuracy"]), 2),
            "train_speedup": round(a[0]["train_s"] / b[0]["train_s"], 2)
            if b[0]["train_s"] else None}
    if args.device.startswith("cuda") and time.monotonic() < deadline - 30:
        try:
            out["gpu_busy"] = gpu_busy(args, ds)
        except Exception as e:  # noqa: BLE001 - a figure, not a check: say why it is missing
            out["gpu_busy"] = {"error": f"{type(e).__name__}: {e}"}
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if time.monotonic() < deadline - 60:
        try:  # issue 14's target: batched clients >= 5x one at a time on the GPU
            sys.path.insert(0, str(HERE))
            from bench import bench_batched

            out["batched"] = bench_batched(reps=3, device=args.device)
        except Exception as e:  # noqa: BLE001 - a figure, not a check: say why it is missing
            out["batched"] = {"error": f"{type(e).__name__}: {e}"}
    if args.cpu_too:
        out["cpu"] = cpu_figures(args, work, ds)
    return out


# -- results --------------------------------------------------------------------------------------
def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "cpu_cores": os.cpu_count(), "device": device,
                            "cuda": torch.version.cuda}
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1),
                    capability=f"{p.major}.{p.minor}")
    return info


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if not head:
        return "unknown (not a git checkout)"
    return head + (" + uncommitted changes" if dirty else "")


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = ["# falkit on a GPU: smoke test and timings (benchmarks/gpu.py)", "",
             f"Command: `{res['command']}`  ", f"Commit: `{res['commit']}`  ",
             f"Date: {res['date']}; wall-clock of the whole script {res['wall_s']:.0f} s  ",
             f"Machine: {m.get('gpu', 'no GPU')} ({m.get('gpu_mem_gib', '-')} GiB), torch "
             f"{m['torch']} (CUDA {m['cuda']}), Python {m['python']}, {m['cpu_cores']} CPU "
             f"cores; runtime.device = {m['device']}", ""]
    sm = res.get("smoke")
    if sm is not None:
        n_ok = sum(r["status"] == "ok" for r in sm)
        n_fail = sum(r["status"] == "FAILED" for r in sm)
        lines += ["## 1. Smoke: every strategy, FL algorithm and FAST for two quick cycles", "",
                  f"{n_ok} ok, {n_fail} FAILED, {len(sm) - n_ok - n_fail} skipped of "
                  f"{len(sm)} cases (`quick`, budget.cycles = 2, fl.rounds = 1 or 2, "
                  f"local_model.epochs = 2; data {res['data']}).", "",
                  "| case | group | status | s | accuracy % | error |",
                  "|---|---|---|---:|---:|---|"]
        for r in sm:
            acc = _f(100 * r["accuracy"]) if "accuracy" in r else "-"
            err = r.get("error", "").replace("|", "\\|")
            lines.append(f"| {r['id']} | {r['group']} | {r['status']} | {r['seconds']:.1f} | "
                         f"{acc} | {err} |")
        failed = [r for r in sm if r["status"] == "FAILED"]
        if failed:
            lines += ["", "### Tracebacks", ""]
            for r in failed:
                lines += [f"**{r['id']}**", "", "```", r["traceback"].rstrip(), "```", ""]
        lines.append("")
    tm = res.get("timing")
    if tm is not None:
        lines += ["## 2. Timing: the paper protocol, FairFAL, seed 0", "",
                  f"Budget {tm['budget_s']:.0f} s of wall-clock; cycles run one after "
                  "another (falkit resumes after each); phase times from metrics.csv; "
                  "samples/s = rounds x local epochs x labeled / training time.", ""]
        if "skipped" in tm:
            lines += [f"Skipped: {tm['skipped']}.", ""]
        if "error" in tm:
            lines += [f"**FAILED**: {tm['error']}", "", "```", tm.get("traceback", ""), "```"]
        for key in ("fp32", "bf16"):
            t = tm.get(key)
            if not t:
                continue
            lines += [f"### {key} ({t['rounds']} rounds x {t['local_epochs']} local epochs per "
                      "cycle)", "",
                      "| cycle | labeled | accuracy % | wall s | train s | query s | "
                      "local model s | eval s | s / round | train samples/s |",
                      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for c in t["measured"]:
                lines.append(f"| {c['cycle'] + 1} | {c['labeled']} | {100 * c['accuracy']:.2f} | "
                             f"{c['wall_s']:.1f} | {c['train_s']:.1f} | {c['query_s']:.1f} | "
                             f"{c['local_model_s']:.1f} | {c['eval_s']:.1f} | "
                             f"{c['s_per_round']:.3f} | {_f(c['train_samples_per_s'], '{:.0f}')} |")
            p = t["projection"]
            if p:
                lines += ["", f"Full protocol ({t['cycles_total']} cycles): "
                          f"**{p['total_s'] / 60:.1f} min** ({p['method']}). {t['stopped']}",
                          ""]
        cmp_ = tm.get("bf16_vs_fp32")
        if cmp_:
            lines += [f"bf16 vs fp32 at cycle {cmp_['cycle'] + 1} ({cmp_['labeled']} labels): "
                      f"accuracy {100 * cmp_['accuracy_bf16']:.2f} % vs "
                      f"{100 * cmp_['accuracy_fp32']:.2f} % ({cmp_['accuracy_diff_pp']:+.2f} pp); "
                      f"first-cycle training {_f(cmp_['train_speedup'])}x the fp32 speed.", ""]
        busy = tm.get("gpu_busy")
        if busy:
            if "error" in busy:
                lines += [f"GPU busy share: not measured ({busy['error']}).", ""]
            else:
                lines += [f"GPU busy share: kernels ran {busy['kernel_s']:.2f} s of "
                          f"{busy['wall_s']:.2f} s wall-clock = **{busy['busy_pct']} %** over "
                          f"{busy['rounds']} FL rounds of cycle 1 (torch.profiler, sum of CUDA "
                          f"kernel self times; batched clients: {busy['batched_clients']}).", ""]
        bt = tm.get("batched")
        if bt:
            if "error" in bt:
                lines += [f"Batched clients: not measured ({bt['error']}).", ""]
            else:
                lines += ["### Clients as one batched computation (`runtime.batch_clients`)", "",
                          f"{bt['clients']} clients x {bt['per_client']} labels, on "
                          f"{bt['device']}, seconds (median of 3):", "",
                          "| work | one at a time | batched | speed-up |",
                          "|---|---:|---:|---:|"]
                for key, what in (("round", "FL round, 5 local epochs"),
                                  ("scratch", "10 scratch local models, 5 epochs")):
                    lines.append(f"| {what} | {bt[key]['off']:.2f} | {bt[key]['on']:.2f} | "
                                 f"{bt[key]['speedup']:.2f}x |")
                lines.append("")
        if "peak_gpu_mib" in tm:
            lines += [f"Peak GPU memory allocated: {tm['peak_gpu_mib']:.0f} MiB.", ""]
        cpu = tm.get("cpu")
        if cpu:
            lines += [f"CPU engine ({cpu['threads']} threads), cycle 1, {cpu['rounds']} rounds: "
                      f"{cpu['s_per_round']:.2f} s per round, "
                      f"{_f(cpu['train_samples_per_s'], '{:.0f}')} samples/s; 100 rounds "
                      f"extrapolated: {cpu['cycle0_train_s_extrapolated_to_100_rounds']:.0f} s.",
                      ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="runtime.device of every run (cuda)")
    ap.add_argument("--only", default="smoke,timing", help="smoke,timing")
    ap.add_argument("--cases", default=",".join(CASE_GROUPS),
                    help=f"smoke case groups ({','.join(CASE_GROUPS)})")
    ap.add_argument("--strategies", default="",
                    help="strategy ids of the strategies group (default: every registered)")
    ap.add_argument("--data", default="fmnist", choices=("fmnist", "digits"),
                    help="fmnist (the real check) | digits (sklearn's: the CPU test)")
    ap.add_argument("--data-root", default=None, help="else $FALKIT_DATA and falkit's roots")
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="wall-clock for the timing part (fp32, bf16, profile)")
    ap.add_argument("--deadline-s", type=float, default=570.0,
                    help="the timing part never runs past this much wall-clock of the script")
    ap.add_argument("--cpu-too", action="store_true", help="also time the CPU engine")
    ap.add_argument("--cpu-rounds", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "GPU_RESULTS.md"))
    ap.add_argument("--work", default=None, help="run directories (default: a temp dir)")
    args = ap.parse_args(argv)
    t_start, deadline = time.perf_counter(), time.monotonic() + args.deadline_s
    parts = [p for p in args.only.split(",") if p]
    command = "PYTHONPATH=src python benchmarks/gpu.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU",
              file=sys.stderr)
        return 2
    work_ctx = (contextlib.nullcontext(args.work) if args.work
                else tempfile.TemporaryDirectory(prefix="falkit-gpu-"))
    res: dict[str, Any] = {"command": command.strip(), "commit": git_commit(),
                           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                           "machine": machine(args.device), "data": args.data}
    failed = False
    with work_ctx as w:
        work = Path(w)
        work.mkdir(parents=True, exist_ok=True)
        datasets = {"digits": load_dataset("digits")}
        if args.data == "fmnist":
            datasets["fmnist"] = load_dataset("fmnist", args.data_root)
        print(f"falkit GPU check on {res['machine'].get('gpu', args.device)}, torch "
              f"{torch.__version__}; runs under {work}", flush=True)
        if "smoke" in parts:
            res["smoke"] = smoke(args, work, datasets, deadline - 30)
            failed |= any(r["status"] == "FAILED" for r in res["smoke"])
        if "timing" in parts:
            try:
                res["timing"] = timing(args, work, datasets[args.data], deadline)
            except Exception as e:  # noqa: BLE001 - recorded, and the exit code says so
                failed = True
                res["timing"] = {"budget_s": args.budget_s, "error": f"{type(e).__name__}: {e}",
                                 "traceback": traceback.format_exc()}
                print(f"  timing FAILED: {type(e).__name__}: {e}", flush=True)
        if not args.work:
            shutil.rmtree(work / "runs", ignore_errors=True)
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    res["ok"] = not failed
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(res))
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(f"results: {out} and {out.with_suffix('.json')} ({res['wall_s']:.0f} s); "
          f"{'all ok' if not failed else 'FAILURES: see the results'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
