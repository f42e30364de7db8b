"""The FAL cycle end to end on scikit-learn's digits: reproducible, resumable, audited."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from falkit import config
from falkit.loop import run
from falkit.results import read_metrics, read_status

SMALL = {
    "data.dataset": "digits", "data.rho": "5", "partition.num_clients": "3",
    "partition.alpha": "1.0", "budget.fraction": "0.05", "budget.cycles": "4",
    "fl.rounds": "2", "fl.local_epochs": "1", "fl.lr": "0.05", "local_model.epochs": "3",
    "model.backbone": "resnet8_preact16",  # digits are 8 px: too small for cnn4's 4 pools
}


def small_cfg(tmp_path, **extra):
    return config.load(None, overrides={**SMALL, "out_dir": str(tmp_path), **extra})


def test_run_writes_every_result_file(tmp_path):
    cfg = small_cfg(tmp_path, strategy="entropy@G")
    res = run(cfg)
    d = res.run_dir
    for name in ("config.toml", "metrics.csv", "queries.jsonl", "partition.csv", "status.json"):
        assert (d / name).is_file(), name
    rows = read_metrics(d)
    assert [r["cycle"] for r in rows] == [0, 1, 2, 3]
    assert read_status(d)["complete"] is True
    # labeled grows by exactly the budget every cycle; queried histogram sums to it
    labeled = [r["labeled"] for r in rows]
    per_cycle = labeled[0]
    assert labeled == [per_cycle * (c + 1) for c in range(4)]
    for r in rows:
        assert sum(r[f"queried_{c}"] for c in range(10)) == per_cycle
        assert 0.0 <= r["accuracy"] <= 1.0 and r["comm_bytes"] > 0
    # queries: every index once, from its own client's pool, labels = ground truth
    recs = [json.loads(line) for line in (d / "queries.jsonl").read_text().splitlines()]
    idx = np.concatenate([r["indices"] for r in recs])
    assert len(np.unique(idx)) == len(idx) == labeled[-1]
    assert config.loads((d / "config.toml").read_text()) == cfg  # rebuildable


def test_same_seed_same_metrics_other_seed_differs(tmp_path):
    a = run(small_cfg(tmp_path / "a", strategy="coreset@G")).metrics
    b = run(small_cfg(tmp_path / "b", strategy="coreset@G")).metrics
    strip = [{k: v for k, v in r.items() if not k.startswith("time_")} for r in a]
    assert strip == [{k: v for k, v in r.items() if not k.startswith("time_")} for r in b]
    c = run(small_cfg(tmp_path / "c", strategy="coreset@G", seed="1")).metrics
    assert [r["accuracy"] for r in c] != [r["accuracy"] for r in a]


def _no_time(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def test_resume_after_stop_matches_uninterrupted(tmp_path):
    full = run(small_cfg(tmp_path / "full", strategy="badge@L")).metrics
    cfg = small_cfg(tmp_path / "cut", strategy="badge@L")
    part = run(cfg, stop_after=1)
    assert len(part.metrics) == 2 and read_status(part.run_dir)["complete"] is False
    resumed = run(cfg)
    assert resumed.resumed_from == 2
    assert _no_time(resumed.metrics) == _no_time(full)
    q_full = (tmp_path / "full" / cfg.run_name() / "queries.jsonl").read_text()
    assert (part.run_dir / "queries.jsonl").read_text() == q_full
    assert run(cfg).skipped  # complete: nothing to do


def test_last_round_local_model_survives_resume(tmp_path):
    extra = {"strategy": "entropy@L", "local_model.mode": "last_round"}
    full = run(small_cfg(tmp_path / "full", **extra)).metrics
    cfg = small_cfg(tmp_path / "cut", **extra)
    run(cfg, stop_after=0)
    assert _no_time(run(cfg).metrics) == _no_time(full)


def test_changed_config_in_existing_dir_is_refused(tmp_path):
    from falkit.errors import ConfigError

    cfg = small_cfg(tmp_path, strategy="random", name="x")
    run(cfg, stop_after=0)
    other = small_cfg(tmp_path, strategy="random", name="x", **{"fl.lr": "0.1"})
    with pytest.raises(ConfigError, match="different config"):
        run(other)


@pytest.mark.slow
def test_killed_process_resumes_with_identical_metrics(tmp_path):
    """A real SIGKILL mid-run, then the same command again."""
    over = [f"{k}={v}" for k, v in SMALL.items()] + ["budget.cycles=6", "fl.rounds=6",
                                                     "strategy=entropy@G", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}

    def cmd(out):
        return [sys.executable, "-m", "falkit.cli", "run", *over, f"out_dir={out}", "name=r"]

    subprocess.run(cmd(tmp_path / "full"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd(tmp_path / "cut"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = tmp_path / "cut" / "r" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:  # 2 cycles done
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not read_status(tmp_path / "cut" / "r").get("complete")
    subprocess.run(cmd(tmp_path / "cut"), check=True, env=env, capture_output=True)
    a = read_metrics(tmp_path / "full" / "r")
    b = read_metrics(tmp_path / "cut" / "r")
    assert len(b) == 6 and _no_time(a) == _no_time(b)


def test_two_workers_are_deterministic_and_train_the_same_model(tmp_path):
    """runtime.workers = 2 trains clients on two threads: the same numbers every time, and
    (one intra-op thread instead of two) the same model up to floating-point order."""
    extra = {"strategy": "fairfal", "runtime.workers": "2", "local_model.epochs": "2"}
    a = run(small_cfg(tmp_path / "a", **extra)).metrics
    b = run(small_cfg(tmp_path / "b", **extra)).metrics
    assert _no_time(a) == _no_time(b)
    one = run(small_cfg(tmp_path / "c", **{**extra, "runtime.workers": "1"})).metrics
    assert [r["labeled"] for r in one] == [r["labeled"] for r in a]
    assert abs(one[0]["accuracy"] - a[0]["accuracy"]) < 0.05


def test_last_round_models_under_partial_participation(tmp_path):
    """A client left out of the final round keeps its model from its last round."""
    from falkit.seeding import rng as stream

    def participants(seed, r):  # the loop's draw: 2 of 3 clients per round
        return set(stream(seed, "participation", 0, r).choice(3, 2, replace=False).tolist())

    # a seed where some client misses the last round of cycle 0 but trained before it
    seed = next(s for s in range(50)
                if (set(range(3)) - participants(s, 3))
                & (participants(s, 0) | participants(s, 1) | participants(s, 2)))
    extra = {"strategy": "entropy@L", "local_model.mode": "last_round", "fl.fraction": "0.67",
             "fl.rounds": "4", "seed": str(seed)}
    rows = run(small_cfg(tmp_path, **extra)).metrics
    assert len(rows) == 4


def test_the_global_model_of_each_cycle_is_saved_and_loads(tmp_path):
    """models/cycle_<c>.pt: a state dict and its recipe; load_model rebuilds the model
    whose test accuracy is the cycle's (issue 18); runtime.save_models = last keeps one."""
    import torch

    from falkit.data.sources import load
    from falkit.models.saved import load_model

    cfg = small_cfg(tmp_path / "all")
    res = run(cfg)
    files = sorted((res.run_dir / "models").glob("cycle_*.pt"))
    assert [f.name for f in files] == [f"cycle_{c}.pt" for c in range(len(res.metrics))]
    model = load_model(files[-1])
    rec = torch.load(files[-1], weights_only=False)
    ds = load(cfg.data.dataset)
    x = torch.as_tensor(ds.x_test).float() / 255.0
    mean = torch.tensor(rec["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(rec["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        logits, _ = model((x - mean) / std)
    acc = (logits.argmax(1).numpy() == ds.y_test).mean()
    assert abs(acc - res.metrics[-1]["accuracy"]) < 1e-6
    last = run(small_cfg(tmp_path / "last", **{"runtime.save_models": "last"}))
    assert [f.name for f in (last.run_dir / "models").glob("*.pt")] == \
        [f"cycle_{len(last.metrics) - 1}.pt"]
