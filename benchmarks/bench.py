"""falkit's speed as measured facts (issue 4): `make bench` -> benchmarks/RESULTS.md.

Sections (each a ratio of two things timed side by side in one process, so machine noise
largely cancels; every figure is the median of `--reps` repetitions):

1. slice   — a slice of the FairFAL protocol on FMNIST-LT run by falkit's loop with falkit's
             engine and with the reference's way of running (`reference_style.py`), per phase.
2. engine  — FL local-training throughput vs a bare single-model training loop; GFLOP/s vs
             the machine's matmul GFLOP/s; bf16 autocast vs fp32.
3. query   — every strategy's query time and peak memory at pool sizes 1k/10k/100k (1 %
             budget) on synthetic outputs, each in its own process.
4. runs    — wall time and peak RSS of one `quick` FairFAL run; the paper protocol projected
             from the slice's measured per-round and per-query costs.

    python benchmarks/bench.py [--reps 5] [--only slice,engine,batched,query,runs] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from falkit import config as config_mod  # noqa: E402
from falkit.loop import run  # noqa: E402
from falkit.results import read_metrics  # noqa: E402

PHASES = ("train", "eval", "query")


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def machine() -> dict[str, str]:
    cpu = platform.processor() or "?"
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return {"cpu": cpu, "cores": str(os.cpu_count()), "simd": ",".join(simd) or "?",
            "torch": torch.__version__, "threads": str(torch.get_num_threads()),
            "python": platform.python_version()}


def peak_rss_mib() -> float:
    """This process's own peak resident memory (VmHWM). Not ru_maxrss: on Linux a process
    started by fork + exec inherits its parent's peak there, so every child of a 1.2 GB
    bench process reported >= 1.2 GB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- 1. slice ---------------------------------------------------------------------------------
def slice_config(out_dir: str, precision: str = "fp32") -> config_mod.Config:
    """10 clients, 2 cycles x 3 rounds x 5 local epochs, the test set after every round, one
    FairFAL query at 5 % labels in between (paper settings otherwise)."""
    return config_mod.load(ROOT / "configs" / "fmnist_lt.toml", overrides={
        "strategy": "fairfal", "budget.cycles": "2", "fl.rounds": "3", "fl.local_epochs": "5",
        "runtime.eval_every": "1", "runtime.precision": precision, "out_dir": out_dir})


def time_slice(engine_class, precision: str = "fp32") -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        cfg = slice_config(d, precision)
        t = time.perf_counter()
        result = run(cfg, engine_class=engine_class, overwrite=True)
        total = time.perf_counter() - t
        rows = read_metrics(result.run_dir)
        picks = [json.loads(x) for x in (result.run_dir / "queries.jsonl").read_text()
                 .splitlines()]
    return {"total": total,
            "train": sum(float(r["time_train"]) for r in rows),
            "eval": sum(float(r["time_eval"]) for r in rows),
            "query": sum(float(r["time_query"]) + float(r["time_local_model"]) for r in rows),
            "local_model": sum(float(r["time_local_model"]) for r in rows),
            "labeled": [int(r["labeled"]) for r in rows],
            "accuracy": float(rows[-1]["accuracy"]),
            "picks": [p["indices"] for p in picks if p["cycle"] == 1]}


def bench_slice(reps: int, ref_reps: int) -> dict:
    from reference_style import ReferenceEngine

    from falkit.fl.engine import Engine

    fk, ref = [], []
    for i in range(max(reps, ref_reps)):
        if i < reps:
            fk.append(time_slice(Engine))
            print(f"  slice falkit rep {i + 1}: {fk[-1]['total']:.1f}s", file=sys.stderr)
        if i < ref_reps:
            ref.append(time_slice(ReferenceEngine))
            print(f"  slice reference rep {i + 1}: {ref[-1]['total']:.1f}s", file=sys.stderr)
    out = {"reps": reps, "ref_reps": ref_reps}
    for key in ("total", *PHASES, "local_model"):
        a, b = median([r[key] for r in fk]), median([r[key] for r in ref])
        out[key] = {"falkit": a, "reference": b, "ratio": b / a if a else float("nan")}
    out["accuracy"] = {"falkit": median([r["accuracy"] for r in fk]),
                       "reference": median([r["accuracy"] for r in ref])}
    out["falkit_deterministic"] = all(r["picks"] == fk[0]["picks"] for r in fk)
    out["labeled"] = fk[0]["labeled"]
    return out


def query_identity() -> dict:
    """The same global and local weights, the same FairFAL query step (falkit's own
    `driver.query`), forward passes in batches of `runtime.eval_batch` = 128 or one sample
    at a time (the reference's query loaders): are the picks identical?"""
    import copy

    from falkit.al.base import create as create_strategy
    from falkit.data.federation import build
    from falkit.driver import Reporter, query
    from falkit.fl.engine import configure_process
    from falkit.inprocess import InProcessFederation
    from falkit.loop import engine_for

    cfg = slice_config("/nonexistent")
    data = build(cfg)
    ds, K = data.dataset, len(data.clients)
    one = copy.deepcopy(cfg)
    one.runtime.eval_batch = 1
    configure_process(cfg)
    fast = engine_for(cfg, ds, data.num_classes, K)
    slow = engine_for(one, ds, data.num_classes, K)
    labeled = InProcessFederation(cfg, create_strategy("fairfal"), data, fast)
    labeled.initial_labels()
    state = fast.init_state(cfg.seed, 0)
    for r in range(3):
        state, _ = fast.fl_round(state, list(range(K)), labeled.labeled, cfg.fl.lr, cfg.seed,
                                 (0, r))
    local_models = fast.train_scratch([(lab, (1, k)) for k, lab in enumerate(labeled.labeled)],
                                      torch.as_tensor(ds.y_train), cfg.seed)
    picks, times = {}, {}
    for name, eng in (("batch128", fast), ("batch1", slow)):
        eng.train_scratch = lambda jobs, labels, seed: local_models  # the same local models
        strategy = create_strategy("fairfal", **config_mod.strategy_options(cfg))
        fed = InProcessFederation(cfg, strategy, data, eng)
        fed.initial_labels()  # the same initial labels (keyed draws)
        t = time.perf_counter()
        q = query(cfg, 1, strategy, fed, state, Reporter())
        times[name] = time.perf_counter() - t
        picks[name] = [set(r["indices"]) for r in q.records]
    pairs = list(zip(picks["batch128"], picks["batch1"], strict=True))
    return {"identical_clients": sum(a == b for a, b in pairs), "clients": K,
            "overlap": sum(len(a & b) for a, b in pairs),
            "picked": sum(len(a) for a, _ in pairs), "time": times}


# -- 2. engine overhead -------------------------------------------------------------------------
def _engine_and_pools(precision: str = "fp32", per_client: int = 300, device: str = "cpu",
                      batch_clients: str = "off", local_epochs: int = 1):
    from falkit.data.federation import build
    from falkit.fl.engine import configure_process
    from falkit.loop import engine_for

    cfg = config_mod.load(ROOT / "configs" / "fmnist_lt.toml", overrides={
        "fl.local_epochs": str(local_epochs), "runtime.precision": precision,
        "runtime.device": device, "runtime.batch_clients": batch_clients,
        "local_model.epochs": "5", "local_model.stop_accuracy": "1.0"})
    data = build(cfg)
    ds = data.dataset
    configure_process(cfg)
    eng = engine_for(cfg, ds, data.num_classes, len(data.clients))
    pools = [p[:per_client] for p in data.clients]
    return cfg, eng, pools


def _trained(pools: list[np.ndarray], bs: int) -> int:
    """Samples one epoch trains on (the engine drops a trailing batch of one)."""
    return sum(len(p) - (1 if len(p) % bs == 1 else 0) for p in pools)


def bare_epoch(model, opt, batches: list, n: int) -> float:
    """Samples/s of one plain training pass of `model` over prepared (x, y) batches."""
    import torch.nn.functional as F

    model.train()
    t = time.perf_counter()
    for xb, yb in batches:
        loss = F.cross_entropy(model(xb)[0], yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return n / (time.perf_counter() - t)


def bench_engine(reps: int) -> dict:
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    cfg, eng, pools = _engine_and_pools()
    bs = cfg.fl.batch_size
    clients = list(range(len(pools)))
    n = _trained(pools, bs)
    state = eng.init_state(0, 0)

    # the bare loop: one model, batches prepared before the clock starts
    model = eng.new_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.fl.lr, momentum=cfg.fl.momentum,
                          weight_decay=cfg.fl.weight_decay)
    batches = []
    for p in pools:
        idx = torch.as_tensor(p)
        for b in range(0, len(idx), bs):
            bi = idx[b:b + bs]
            if len(bi) > 1:
                batches.append((eng._inputs(eng.train_x[bi]), eng.train_y[bi]))

    def bare() -> float:
        return bare_epoch(model, opt, batches, n)

    def engine(e=eng, st=state, i=[0]) -> float:  # noqa: B006
        i[0] += 1
        t = time.perf_counter()
        e.fl_round(st, clients, pools, cfg.fl.lr, 0, (0, i[0]))
        return n / (time.perf_counter() - t)

    engine(), bare()  # warm-up
    fe, fb = [], []
    for _ in range(reps):
        fe.append(engine())
        fb.append(bare())
    with FlopCounterMode(display=False) as fc:
        xb, yb = batches[0]
        F.cross_entropy(model(xb)[0], yb).backward()
    flops_per_sample = fc.get_total_flops() / len(yb)

    def matmul(dtype: torch.dtype) -> float:
        a = torch.randn(2048, 2048, dtype=dtype)
        b = torch.randn(2048, 2048, dtype=dtype)
        a @ b
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            ts.append(time.perf_counter() - t)
        return 2 * 2048**3 / median(ts) / 1e9

    gf32, gf16 = matmul(torch.float32), matmul(torch.bfloat16)
    # bf16 autocast through the engine: a shorter measurement (slow without native bf16)
    _, eng16, pools16 = _engine_and_pools("bf16", per_client=64)
    _, eng32, _ = _engine_and_pools("fp32", per_client=64)
    n16 = _trained(pools16, bs)
    st16 = eng16.init_state(0, 0)
    f16, f32 = [], []
    for i in range(max(2, reps // 2)):
        for e, acc in ((eng16, f16), (eng32, f32)):
            t = time.perf_counter()
            e.fl_round(st16, clients, pools16, cfg.fl.lr, 0, (1, i))
            acc.append(n16 / (time.perf_counter() - t))
    e_sps, b_sps = median(fe), median(fb)
    return {"engine_sps": e_sps, "bare_sps": b_sps, "ratio": e_sps / b_sps,
            "techniques": techniques(eng, batches, n, reps),
            "samples_per_round": n, "mflop_per_sample": flops_per_sample / 1e6,
            "engine_gflops": flops_per_sample * e_sps / 1e9, "matmul_gflops_fp32": gf32,
            "matmul_gflops_bf16": gf16, "bf16_sps": median(f16), "fp32_sps_small": median(f32),
            "bf16_speedup": median(f16) / median(f32)}


def bench_batched(reps: int, device: str = "cpu", per_client: int = 102) -> dict:
    """Clients as one batched computation (runtime.batch_clients = on) vs one at a time, in
    one run: an FL round of the paper's first cycle (10 clients x `per_client` labels, 5
    local epochs) and the 10 clients' scratch local models (5 epochs, no early stop)."""
    out: dict = {"device": device, "clients": 10, "per_client": per_client}
    engines = {}
    for mode in ("off", "on"):
        cfg, eng, pools = _engine_and_pools(per_client=per_client, device=device,
                                            batch_clients=mode, local_epochs=5)
        engines[mode] = (cfg, eng, [p[:per_client] for p in pools])
    cfg = engines["off"][0]
    clients = list(range(10))

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def fl_round(mode: str, i: int) -> float:
        _, eng, pools = engines[mode]
        st = eng.init_state(0, 0)
        sync()
        t = time.perf_counter()
        eng.fl_round(st, clients, pools, cfg.fl.lr, 0, (2, i))
        sync()
        return time.perf_counter() - t

    def scratch(mode: str, i: int) -> float:
        _, eng, pools = engines[mode]
        jobs = [(p, (i, k)) for k, p in enumerate(pools)]
        sync()
        t = time.perf_counter()
        eng.train_scratch(jobs, eng.train_y, seed=0)
        sync()
        return time.perf_counter() - t

    for name, fn in (("round", fl_round), ("scratch", scratch)):
        fn("off", -1), fn("on", -1)  # warm-up
        ts: dict[str, list[float]] = {"off": [], "on": []}
        for i in range(reps):
            for mode in ("off", "on"):
                ts[mode].append(fn(mode, i))
        out[name] = {m: median(v) for m, v in ts.items()}
        out[name]["speedup"] = out[name]["off"] / out[name]["on"]
    return out


def techniques(eng, batches: list, n: int, reps: int) -> dict[str, dict[str, float]]:
    """The issue's other levers, each timed against falkit's choice in the same run:
    channels_last vs contiguous, torch.compile (inductor) vs eager for training, and
    BatchNorm folded into the convolutions (torch.jit.freeze) vs eager for inference."""
    def train_sps(model, data=batches) -> float:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        return bare_epoch(model, opt, data, n)

    def best_of(fn) -> float:
        fn()  # warm-up (and, for torch.compile, compilation)
        return median([fn() for _ in range(reps)])

    out = {}
    cl = eng.new_model(0)
    plain = eng.new_model(0).to(memory_format=torch.contiguous_format)
    # clone: for one channel, .contiguous() keeps channels-last strides (already "contiguous")
    contiguous = [(xb.clone(memory_format=torch.contiguous_format), yb) for xb, yb in batches]
    a = best_of(lambda: train_sps(cl))
    b = best_of(lambda: train_sps(plain, contiguous))
    out["channels_last"] = {"falkit": a, "other": b, "speedup": a / b}
    compiled = torch.compile(eng.new_model(0))
    t = time.perf_counter()
    train_sps(compiled)
    compile_s = time.perf_counter() - t
    c = median([train_sps(compiled) for _ in range(reps)])
    out["torch_compile"] = {"falkit": a, "other": c, "speedup": c / a, "compile_s": compile_s}
    x = eng._inputs(eng.test_x)
    model = eng.new_model(0).eval()
    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.trace(model, x[:128], check_trace=False))

    def infer_sps(m) -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            for i in range(0, len(x), 128):
                m(x[i:i + 128])
        return len(x) / (time.perf_counter() - t)

    e, f = best_of(lambda: infer_sps(model)), best_of(lambda: infer_sps(frozen))
    with torch.inference_mode():
        diff = float((model(x[:512])[0] - frozen(x[:512])[0]).abs().max())
    out["bn_folding"] = {"falkit": e, "other": f, "speedup": f / e, "max_logit_diff": diff}
    return out


# -- 3. query scaling ---------------------------------------------------------------------------
QUERY_SIZES = (1_000, 10_000, 100_000)


def _query_one(strategy_id: str, n: int) -> dict:
    """One strategy, one synthetic client: n unlabeled, n/20 labeled, budget n/100, C = 10,
    D = 64 (CNN-4's feature size on 28 px images), softmax outputs of random logits."""
    from falkit.al.base import QueryContext
    from falkit.al.base import create as create_strategy

    C, D = 10, 64
    g = torch.Generator().manual_seed(0)
    total = n + n // 20
    outs = {}
    models = ("global", "local", "distilled")
    for m in models:
        logits = torch.randn(total, C, generator=g) * 2
        outs[m] = (torch.softmax(logits, 1), torch.relu(torch.randn(total, D, generator=g)))
    weights = {m: {"classifier.weight": torch.randn(C, D, generator=g) * 0.1,
                   "classifier.bias": torch.zeros(C)} for m in models}
    predicted_loss = torch.rand(total, generator=g)  # ll4al's module output
    unl = np.arange(n)
    lab = np.arange(n, total)
    labels = np.random.default_rng(0).integers(0, C, len(lab))

    def infer(model: str, pool: np.ndarray):
        p, f = outs[model]
        idx = torch.as_tensor(pool)
        return p[idx], f[idx]

    ctx = QueryContext(client_id=0, cycle=1, labeled=lab, labeled_y=labels, unlabeled=unl,
                       num_classes=C, rng=np.random.default_rng(1), infer=infer,
                       weights=lambda m: weights[m],
                       predicted_loss=lambda m, pool: predicted_loss[pool])
    strategy = create_strategy(strategy_id)
    base = peak_rss_mib()
    t = time.perf_counter()
    ctx.phase_a = strategy.client_stats(ctx)
    if ctx.phase_a is not None:
        ctx.server = dict(strategy.server_reduce([ctx.phase_a.stats]))
    picks = strategy.query(ctx, max(1, n // 100))
    sec = time.perf_counter() - t
    assert len(set(picks.tolist())) == max(1, n // 100)
    return {"seconds": sec, "peak_rss_mib": peak_rss_mib(), "base_rss_mib": base,
            "threads": torch.get_num_threads()}


def bench_query(timeout: float, only: list[str] | None = None, old: dict | None = None
                ) -> dict:
    """Every strategy (or just `only`, keeping `old`'s rows for the others)."""
    from falkit.al.base import list_ids

    out: dict[str, dict] = {}
    for sid in list_ids():
        if only and sid not in only:
            if old and sid in old:
                out[sid] = old[sid]
            continue
        out[sid] = {}
        for n in QUERY_SIZES:
            cmd = [sys.executable, str(Path(__file__)), "_query", sid, str(n)]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
                res = (json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0
                       else {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:120]})
            except subprocess.TimeoutExpired:
                res = {"error": f"> {timeout:.0f} s"}
            out[sid][n] = res
            print(f"  query {sid} n={n}: {res}", file=sys.stderr)
    return out


# -- 4. whole runs ------------------------------------------------------------------------------
def bench_runs() -> dict:
    # the run reports its own peak (VmHWM) at exit: see peak_rss_mib
    code = ("import atexit, sys; sys.path.insert(0, sys.argv.pop(1)); import bench; "
            "rss = sys.argv.pop(1); atexit.register(lambda: open(rss, 'w').write("
            "str(bench.peak_rss_mib()))); from falkit.cli import main; sys.exit(main())")
    with tempfile.TemporaryDirectory() as d:
        rss = Path(d) / "peak_rss_mib"
        cmd = [sys.executable, "-c", code, str(HERE), str(rss),
               "run", str(ROOT / "configs" / "fmnist_lt.toml"), "--preset", "quick",
               "strategy=fairfal", f"out_dir={d}/runs", "--quiet"]
        t = time.perf_counter()
        p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        peak = float(rss.read_text()) if rss.is_file() else float("nan")
    return {"quick_fairfal_s": wall, "quick_fairfal_rss_mib": peak, "ok": p.returncode == 0}


def project(sl: dict) -> dict:
    """The paper protocol (9 trainings x 100 rounds x 5 epochs, 8 FairFAL queries, labeled
    1020 (c + 1)) from the slice's measured costs: training per labeled sample-epoch, one
    test-set evaluation, the query's inference part, and local-model training per labeled
    sample (assumes the same number of local epochs as at 5 % — early stopping varies)."""
    lab = sl["labeled"]  # labeled per cycle in the slice
    sample_epochs = 3 * 5 * sum(lab)
    out = {}
    for who, evals_per_cycle in (("falkit", 1), ("reference", 100)):
        train = sl["train"][who] / sample_epochs
        ev = sl["eval"][who] / 6  # the slice evaluates after each of its 6 rounds
        local = sl["local_model"][who] / lab[0]
        infer = sl["query"][who] - sl["local_model"][who]
        total = sum(100 * 5 * 1020 * (c + 1) * train + evals_per_cycle * ev for c in range(9))
        total += sum(infer + local * 1020 * c for c in range(1, 9))
        out[who] = total / 3600
    return out


# -- RESULTS.md ---------------------------------------------------------------------------------
def _fmt(x: float, nd: int = 1) -> str:
    return f"{x:,.{nd}f}"


def write_results(res: dict, path: Path, command: str) -> None:
    m = res["machine"]
    cmds = res.get("commands", {})
    made = ("; ".join(f"{sec}: `{c}`" for sec, c in cmds.items()) if cmds
            else f"`{command}`")
    L = ["# falkit benchmarks", "",
         f"Produced by {made} (`make bench` runs every section). Machine: {m['cpu']}, "
         f"{m['cores']} cores ({m['simd']}), torch {m['torch']}, {m['threads']} threads, "
         f"Python {m['python']}. Every figure is a median of repetitions run side by side "
         "in one process; ratios are what to compare across machines.", ""]
    targets: list[tuple[str, str, str, bool | None]] = []
    if "slice" in res:
        s = res["slice"]
        L += ["## 1. Slice of the FairFAL protocol: falkit vs the reference's way of running", "",
              "FMNIST-LT (rho 20, 10 clients, alpha 0.1), CNN-4, fp32; 2 cycles x 3 rounds x 5 "
              "local epochs, the test set after every round, one FairFAL query (with its "
              "`scratch` local models) at 5 % labels. Both go through falkit's loop "
              "(`loop.run(cfg, engine_class=...)`), so inits, labels, selection code and phase "
              f"timers are shared. falkit: {s['reps']} reps; reference style: {s['ref_reps']}.", "",
              "| phase | falkit (s) | reference style (s) | speed-up |", "|---|---:|---:|---:|"]
        for k in ("total", "train", "eval", "query", "local_model"):
            L.append(f"| {k} | {_fmt(s[k]['falkit'])} | {_fmt(s[k]['reference'])} | "
                     f"{s[k]['ratio']:.2f}x |")
        L += ["", f"Final accuracy: falkit {100 * s['accuracy']['falkit']:.2f} %, reference "
              f"style {100 * s['accuracy']['reference']:.2f} % (different shuffling streams). "
              f"falkit's picks identical across its reps: {s['falkit_deterministic']}.", ""]
        c = calibration(s)
        L += ["How lean the reference-style loop is: its unit costs beside the reference code's "
              "own, measured on this machine kind (issue 4; not side by side, so indicative):",
              "", "| unit cost | reference code | reference style | falkit |",
              "|---|---:|---:|---:|",
              *(f"| {name} | {_fmt(a, nd)} | {_fmt(b, nd)} | {_fmt(f, nd)} |"
                for name, nd, a, b, f in c), ""]
        targets.append(("slice end to end, fp32", ">= 4x", f"{s['total']['ratio']:.2f}x",
                        s["total"]["ratio"] >= 4))
    if "identity" in res:
        q = res["identity"]
        L += ["### Same weights, same query: batched vs one-sample forward passes", "",
              f"FairFAL query step at 5 % labels with identical global and local weights, "
              f"forward passes in batches of 128 (falkit's default) or one sample at a time "
              f"(as the reference's query loaders): {q['identical_clients']}/{q['clients']} "
              f"clients pick exactly the same samples ({q['overlap']}/{q['picked']} picks "
              f"shared). The query step (inference + selection, local models given) took "
              f"{_fmt(q['time']['batch128'])} s batched vs {_fmt(q['time']['batch1'])} s one "
              f"sample at a time ({q['time']['batch1'] / q['time']['batch128']:.1f}x).", ""]
    if "slice" in res:
        s = res["slice"]
        targets.append(("FairFAL query step at 5 % (incl. local models)", ">= 8x",
                        f"{s['query']['ratio']:.2f}x", s["query"]["ratio"] >= 8))
    if "engine" in res:
        e = res["engine"]
        L += ["## 2. Engine overhead", "",
              "FL local training (10 clients x ~300 labeled, one epoch, batch 64, fp32, "
              "channels_last; includes batch gathering, normalisation, augmentation, weight "
              "loading and FedAvg) vs a bare loop of one model over the same batches "
              "prepared in advance:", "",
              "| | samples/s |", "|---|---:|",
              f"| falkit FL round | {_fmt(e['engine_sps'], 0)} |",
              f"| bare single-model loop | {_fmt(e['bare_sps'], 0)} |",
              f"| ratio | {100 * e['ratio']:.1f} % |", "",
              f"CNN-4 costs {e['mflop_per_sample']:.1f} MFLOP per sample (forward + backward, "
              f"torch's FlopCounter), so the engine sustains {e['engine_gflops']:.1f} GFLOP/s = "
              f"{100 * e['engine_gflops'] / e['matmul_gflops_fp32']:.0f} % of a 2048² fp32 "
              f"matmul ({e['matmul_gflops_fp32']:.0f} GFLOP/s; bf16 matmul "
              f"{e['matmul_gflops_bf16']:.2f} GFLOP/s).", "",
              f"bf16 autocast: {_fmt(e['bf16_sps'], 0)} samples/s vs {_fmt(e['fp32_sps_small'], 0)}"
              f" fp32 on the same small round ({e['bf16_speedup']:.2f}x).", ""]
        tq = e.get("techniques")
        if tq:
            cl, tc, bn = tq["channels_last"], tq["torch_compile"], tq["bn_folding"]
            L += ["Levers measured in the same run (bare loop over the same batches, or "
                  "inference over the test set at batch 128):", "",
                  "| lever | falkit's choice (samples/s) | alternative (samples/s) | "
                  "alternative / choice | used |", "|---|---:|---:|---:|---|",
                  f"| channels_last (training) vs contiguous | {_fmt(cl['falkit'], 0)} | "
                  f"{_fmt(cl['other'], 0)} | {1 / cl['speedup']:.2f}x | channels_last "
                  "(`runtime.channels_last`) |",
                  f"| torch.compile (inductor, training) | {_fmt(tc['falkit'], 0)} | "
                  f"{_fmt(tc['other'], 0)} | {tc['speedup']:.2f}x | no (its first pass, "
                  f"compiling, took {tc['compile_s']:.0f} s) |",
                  f"| BatchNorm folded into convs (torch.jit.freeze, inference) | "
                  f"{_fmt(bn['falkit'], 0)} | {_fmt(bn['other'], 0)} | {bn['speedup']:.2f}x | "
                  f"no: changes the arithmetic (logits differ by up to "
                  f"{bn['max_logit_diff']:.1e}), so picks could differ |", ""]
        targets.append(("engine throughput vs bare loop", ">= 90 %",
                        f"{100 * e['ratio']:.1f} %", e["ratio"] >= 0.9))
        targets.append(("bf16 FL training speed-up", ">= 1.8x", f"{e['bf16_speedup']:.2f}x",
                        e["bf16_speedup"] >= 1.8))
    if "batched" in res:
        b = res["batched"]
        L += ["## 2b. Clients as one batched computation (`runtime.batch_clients`)", "",
              f"{b['clients']} clients x {b['per_client']} labels (the paper protocol's first "
              f"cycle), on {b['device']}, seconds (median), one run:", "",
              "| work | one client at a time | batched (vmap) | speed-up |", "|---|---:|---:|---:|",
              f"| FL round, 5 local epochs | {b['round']['off']:.2f} | {b['round']['on']:.2f} | "
              f"{b['round']['speedup']:.2f}x |",
              f"| 10 scratch local models, 5 epochs | {b['scratch']['off']:.2f} | "
              f"{b['scratch']['on']:.2f} | {b['scratch']['speedup']:.2f}x |", "",
              "`runtime.batch_clients = auto` batches on a GPU only; the GPU figures are "
              "`benchmarks/gpu.py`'s.", ""]
    if "query" in res:
        threads = sorted({r.get("threads") for by_n in res["query"].values()
                          for r in by_n.values() if r.get("threads")})
        L += ["## 3. Query scaling (synthetic outputs, one client, budget 1 % of the pool)", "",
              "Seconds and peak RSS (MiB, whole process) per strategy, each in its own process "
              f"with {'/'.join(map(str, threads)) or '?'} torch thread(s); growth = time at "
              "100k / time at 10k (10x the pool and 10x the budget, so selection by k-center "
              "or k-means, O(pool x budget), grows ~100x).", "",
              "| strategy | " + " | ".join(f"{n // 1000}k s" for n in QUERY_SIZES)
              + " | 100k RSS | growth |", "|---|" + "---:|" * (len(QUERY_SIZES) + 2)]
        for sid, by_n in res["query"].items():
            cells = []
            for n in QUERY_SIZES:
                r = by_n.get(str(n), by_n.get(n, {}))
                cells.append(_fmt(r["seconds"], 3) if "seconds" in r else r.get("error", "–"))
            big = by_n.get(str(QUERY_SIZES[-1]), by_n.get(QUERY_SIZES[-1], {}))
            mid = by_n.get(str(QUERY_SIZES[1]), by_n.get(QUERY_SIZES[1], {}))
            rss = _fmt(big["peak_rss_mib"], 0) if "peak_rss_mib" in big else "–"
            growth = (f"{big['seconds'] / mid['seconds']:.1f}x"
                      if "seconds" in big and "seconds" in mid and mid["seconds"] > 0 else "–")
            L.append(f"| {sid} | " + " | ".join(cells) + f" | {rss} | {growth} |")
        L.append("")
    if "runs" in res:
        r = res["runs"]
        L += ["## 4. Whole runs", "",
              f"One `quick` FMNIST-LT FairFAL run (`falkit run configs/fmnist_lt.toml --preset "
              f"quick strategy=fairfal`): {_fmt(r['quick_fairfal_s'])} s wall, peak RSS "
              f"{_fmt(r['quick_fairfal_rss_mib'], 0)} MiB.", ""]
        targets.append(("quick FMNIST-LT FairFAL run", "<= 180 s, <= 1.5 GB",
                        f"{r['quick_fairfal_s']:.0f} s, {r['quick_fairfal_rss_mib']:.0f} MiB",
                        r["quick_fairfal_s"] <= 180 and r["quick_fairfal_rss_mib"] <= 1536))
    if "projection" in res:
        p = res["projection"]
        L += [f"Projected full paper protocol (9 trainings x 100 rounds x 5 epochs, 8 FairFAL "
              f"queries) from the slice's per-sample costs: **falkit {p['falkit']:.1f} h** "
              f"(test set once per cycle, falkit's default `runtime.eval_every = 0`), "
              f"reference style {p['reference']:.1f} h (test set every round, as the "
              "reference does; the reference code itself measured ~11 h here).", ""]
        targets.append(("projected paper protocol, fp32", "<= 5 h", f"{p['falkit']:.1f} h",
                        p["falkit"] <= 5))
    L += ["## Targets (issue 4)", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    L += [f"| {a} | {b} | {c} | {'yes' if ok else 'no'} |" for a, b, c, ok in targets]
    L += ["", *gaps(res)]
    path.write_text("\n".join(L).rstrip() + "\n")


# the reference code's own unit costs on this machine kind (issue 4): FL training throughput
# at 5 % labels, one test-set pass, one FairFAL query step at 5 % labels
REFERENCE_CODE = {"train_sps": 600.0, "eval_s": 6.4, "query_s": 193.0}


def calibration(s: dict) -> list[tuple[str, int, float, float, float]]:
    """(name, decimals, reference code, reference style, falkit) unit costs from the slice."""
    sample_epochs = 3 * 5 * sum(s["labeled"])  # 3 rounds x 5 local epochs per cycle

    def unit(who: str) -> tuple[float, float, float]:
        return (sample_epochs / s["train"][who], s["eval"][who] / 6, s["query"][who])

    ref, fk = unit("reference"), unit("falkit")
    rc = REFERENCE_CODE
    return [("FL training, samples/s", 0, rc["train_sps"], ref[0], fk[0]),
            ("one test-set pass (10k), s", 1, rc["eval_s"], ref[1], fk[1]),
            ("FairFAL query step at 5 % (incl. local models), s", 1, rc["query_s"], ref[2],
             fk[2])]


def gaps(res: dict) -> list[str]:
    """Why the unmet targets are unmet, from the measured numbers."""
    out = ["## Where a target is not met, and why (measured)", ""]
    s, e = res.get("slice"), res.get("engine")
    if s and e:
        per_sample = s["train"]["falkit"] / (3 * 5 * sum(s["labeled"]))
        round5 = 5 * s["labeled"][0] * per_sample
        ev = s["eval"]["falkit"] / 6
        rest = s["query"]["falkit"] - s["local_model"]["falkit"]
        q_rest = ((s["query"]["reference"] - s["local_model"]["reference"]) / rest
                  if rest > 0 else float("nan"))
        out += [
            f"* **Slice >= 4x, query >= 8x.** Training is compute-bound: falkit's FL round runs "
            f"at {100 * e['ratio']:.1f} % of a bare single-model loop, which itself sustains "
            f"{e['engine_gflops']:.0f} GFLOP/s "
            f"({100 * e['engine_gflops'] / e['matmul_gflops_fp32']:.0f} % of the matmul "
            f"peak), so no engine change can make training much faster than the "
            f"{s['train']['ratio']:.2f}x measured against the reference-style loop. That loop "
            f"re-creates the reference's torchvision/PIL transforms and batch-1 query "
            f"inference but runs falkit's vectorised selection code, one forward pass per "
            f"model for all query quantities, and evaluates the test set at batch 64; the "
            f"reference code also re-reads (and re-transforms) every image of a client split "
            f"just to list its labels, and runs several batch-1 passes per query, so it is "
            f"slower still (calibration table above). Against the reference code's own "
            f"measurements on this machine kind "
            f"(issue 4, not side by side): one FL round at 5 % labels took 14.8 s there (8.5 s "
            f"training, 6.4 s test-set evaluation); falkit measures {round5:.1f} s of training "
            f"and {ev:.1f} s per evaluation ({14.8 / (round5 + ev):.1f}x with an evaluation "
            f"every round, {14.8 / round5:.1f}x with falkit's default of one per cycle); one "
            f"FairFAL query step took 193 s there, {s['query']['falkit']:.1f} s here "
            f"({193 / s['query']['falkit']:.0f}x). Inference alone is "
            + (f"{res['identity']['time']['batch1'] / res['identity']['time']['batch128']:.1f}x "
               "faster batched than one sample at a time (same picks)."
               if "identity" in res else "faster batched.")
            + f" The query step splits into training the clients' `scratch` local models "
            f"({s['local_model']['falkit']:.1f} s vs {s['local_model']['reference']:.1f} s, "
            f"{s['local_model']['ratio']:.2f}x: compute-bound training again) and inference "
            f"plus selection ({s['query']['falkit'] - s['local_model']['falkit']:.1f} s vs "
            f"{s['query']['reference'] - s['local_model']['reference']:.1f} s, "
            f"{q_rest:.1f}x)"
            + (f"; with the local models taking "
               f"{100 * s['local_model']['falkit'] / s['query']['falkit']:.0f} % of falkit's "
               "query step, 8x overall would need training itself to run faster."
               if s["query"]["ratio"] < 8 and s["local_model"]["ratio"] < 8 else "."),
        ]
    if e:
        out += [
            f"* **bf16 >= 1.8x.** The engine section's CPU had no native bf16 (flags: "
            f"{res.get('machines', {}).get('engine', res['machine'])['simd']}; no "
            f"avx512_bf16/amx): a bf16 matmul runs at {e['matmul_gflops_bf16']:.2f} GFLOP/s "
            f"against {e['matmul_gflops_fp32']:.0f} fp32, and bf16 autocast makes FL training "
            f"{1 / e['bf16_speedup']:.0f}x slower. The target assumed AVX-512 BF16; on this "
            "machine keep `runtime.precision = \"fp32\"` (the bf16 projection is moot).",
        ]
    r = res.get("runs")
    if r and not r["quick_fairfal_rss_mib"] <= 1536:
        out += [
            f"* **Quick run <= 1.5 GB.** This run peaked at {r['quick_fairfal_rss_mib']:.0f} MiB "
            "(its own VmHWM). The same run measured 0.6, 0.6, 1.2, 1.4, 1.8 and 2.2 GB on "
            "this machine on 2026-11-24 (VmHWM, /usr/bin/time; the last two side by side "
            "with `runtime.threads = 1`, 2.2 GB with `runtime.tune_allocator = false`, so it "
            "is not the allocator tuning): the peak varies from run to run. A run sampled "
            "every 0.14 s climbed from 0.6 to 1.9 GB during its first query step (global "
            "outputs, scratch local models) and fell back to 0.65 GB as that step ended. "
            "It points at oneDNN's primitive cache: a 2-cycle FairFAL run "
            "(`benchmarks/memory_probe.py`) peaked at 644, 939, 1178 and 1213 MiB by "
            "default, at 574, 600 and 628 MiB with `ONEDNN_PRIMITIVE_CACHE_CAPACITY=0` (10 % "
            "slower), at 1180 and 1530 MiB with a capacity of 64 and at 973–1583 MiB with "
            "`MALLOC_ARENA_MAX=2`. Set that variable where memory matters more than time. "
            "Earlier figures (919 MiB) "
            "came from ru_maxrss, which a child inherits from its parent, and are void.",
        ]
    q = res.get("query")
    if q:
        def growth(prefixes: tuple[str, ...]) -> str:
            gs = []
            for sid, by_n in q.items():
                big = by_n.get(str(QUERY_SIZES[-1]), by_n.get(QUERY_SIZES[-1], {}))
                mid = by_n.get(str(QUERY_SIZES[1]), by_n.get(QUERY_SIZES[1], {}))
                if sid.split("@")[0] in prefixes and "seconds" in big and mid.get("seconds"):
                    gs.append(big["seconds"] / mid["seconds"])
            return f"{min(gs):.0f}–{max(gs):.0f}x" if gs else "–"

        def failed(how: str) -> list[str]:
            out = set()
            for sid, by_n in q.items():
                err = by_n.get(str(QUERY_SIZES[-1]), by_n.get(QUERY_SIZES[-1], {})).get("error")
                if err is not None and err.startswith(">") == (how == "timeout"):
                    out.add(sid.split("@")[0])
            return sorted(out)

        why = {"ifal": "ifal's rkNN compares every pair of points in three feature spaces "
                       "(O(pool²) by definition)",
               "logo": "logo runs KMeans with k = budget and n_init = 10 as specified"}
        slow, broken = failed("timeout"), failed("error")
        linear = ("entropy", "margin", "least_confidence", "fairfal", "kafal", "ll4al")
        out += [
            "* **Query scaling.** Uncertainty strategies, fairfal, kafal and ll4al grow about "
            f"linearly ({growth(linear)} "
            "for 10x the pool). Selections by greedy k-center or k-means (coreset, badge, "
            "alfamix, logo) cost O(pool x budget), ~100x when the budget is 1 % of the pool "
            f"(measured: coreset/badge/alfamix {growth(('coreset', 'badge', 'alfamix'))}); "
            "badge's k-means++ works on the rank-one factors of the gradient embeddings "
            "(C + D numbers per distance instead of C·D, in exact float64 products: same "
            "picks as on the built float32 embeddings in `tests/test_primitives.py`, though "
            "a draw within float32 rounding of a boundary can differ). Beyond the time "
            "limit at 100k: "
            + ("; ".join(why.get(x, x) for x in slow) if slow else "none")
            + (f". Failed at 100k: {', '.join(broken)} (see results.json)" if broken else "")
            + ". gcnal subsamples 10k points (its stated exception).",
        ]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_query":
        print(json.dumps(_query_one(argv[1], int(argv[2]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="repetitions per measurement")
    ap.add_argument("--ref-reps", type=int, default=None,
                    help="repetitions of the (slow) reference-style slice (default: --reps)")
    ap.add_argument("--only", default="slice,identity,engine,batched,query,runs")
    ap.add_argument("--query-timeout", type=float, default=120.0)
    ap.add_argument("--query-strategies", default="",
                    help="re-measure only these strategies (comma-separated)")
    ap.add_argument("--json", default=str(HERE / "results.json"))
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    res: dict = {"machine": machine()}
    previous = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
    # sections not re-run keep their last results
    res.update({k: v for k, v in previous.items() if k not in only and k != "machine"})
    # the machine each section was measured on (kept sections keep theirs)
    res["machines"] = {k: previous.get("machines", {}).get(k, previous.get("machine"))
                       for k in res if k not in ("machine", "machines", "commands", "projection")
                       and previous.get("machine")}
    res["commands"] = {k: v for k, v in previous.get("commands", {}).items() if k not in only}
    query_only = [q for q in args.query_strategies.split(",") if q]
    torch.manual_seed(0)
    steps = [("slice", lambda: bench_slice(args.reps, args.ref_reps or args.reps)),
             ("identity", query_identity), ("engine", lambda: bench_engine(args.reps)),
             ("batched", lambda: bench_batched(args.reps)),
             ("runs", bench_runs), ("query", lambda: bench_query(args.query_timeout, query_only,
                                            previous.get("query")))]
    for name, fn in steps:
        if name in only:
            print(f"bench: {name} ...", file=sys.stderr)
            t = time.perf_counter()
            res[name] = fn()
            res["machines"][name] = res["machine"]
            res.setdefault("commands", {})[name] = (
                f"{time.strftime('%Y-%m-%d')} " + ("make bench" if not argv else
                                                   "python benchmarks/bench.py " + " ".join(argv)))
            print(f"bench: {name} done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    if "slice" in res:
        res["projection"] = project(res["slice"])
    Path(args.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
    write_results(res, Path(args.out), "make bench" if not argv else
                  "python benchmarks/bench.py " + " ".join(argv))
    print(f"bench: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
