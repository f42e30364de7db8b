"""The Python API (issue 18): falkit.run from a notebook, falkit.load_runs as one tidy
table."""

import pytest

import falkit
from falkit import config

SMALL = {"data.dataset": "digits", "data.rho": "5", "partition.num_clients": "3",
         "partition.alpha": "1.0", "budget.fraction": "0.05", "budget.cycles": "2",
         "fl.rounds": "1", "fl.local_epochs": "1", "model.backbone": "resnet8_preact16",
         "runtime.threads": "1"}

pd = pytest.importorskip("pandas")


def test_run_takes_nested_and_dotted_settings_and_returns_its_results(tmp_path, capsys):
    res = falkit.run(strategy="entropy@G", out_dir=str(tmp_path), quiet=True,
                     partition={"num_clients": 3, "alpha": 1.0}, fl={"rounds": 1},
                     **{k: v for k, v in SMALL.items()
                        if not k.startswith(("partition.", "fl.rounds"))})
    assert res.run_dir.parent == tmp_path and not res.skipped
    assert [r["cycle"] for r in res.metrics] == [0, 1] and len(res.accuracy) == 2
    saved = config.loads((res.run_dir / "config.toml").read_text())
    assert (saved.partition.num_clients, saved.fl.rounds, saved.strategy) == (3, 1,
                                                                             "entropy@G")
    again = falkit.run(saved, quiet=True)  # a Config object: the same run, complete
    assert again.skipped and again.run_dir == res.run_dir
    model = res.model()
    assert sum(p.numel() for p in model.parameters()) > 0


def test_load_runs_is_one_tidy_row_per_run_and_cycle(tmp_path):
    for strategy in ("random", "entropy@G"):
        for alpha in ("1.0", "100.0"):
            falkit.run(quiet=True, out_dir=str(tmp_path), strategy=strategy,
                       **{**SMALL, "partition.alpha": alpha})
    df = falkit.load_runs(tmp_path)
    assert len(df) == 4 * 2
    assert set(df["method"]) == {"random", "entropy@G"}
    assert set(df["partition.alpha"]) == {1.0, 100.0}  # the setting that differs
    assert "fl.rounds" not in df.columns  # the same in every run
    for col in ("run", "seed", "cycle", "labeled_pct", "accuracy", "acc_0", "acc_9",
                "share_0", "time_train", "comm_bytes"):
        assert col in df.columns, col
    shares = df[[f"share_{c}" for c in range(10)]].sum(axis=1)
    assert ((shares - 1).abs() < 1e-9).all()  # each cycle's queries, by class
    one = falkit.load_runs([next(tmp_path.iterdir())])
    row = one[one["cycle"] == 1].iloc[0]
    import csv

    rows = list(csv.DictReader((next(tmp_path.iterdir()) / "metrics.csv").open()))
    assert row["accuracy"] == pytest.approx(float(rows[1]["accuracy"]))
    pivot = df.pivot_table(index="cycle", columns="method", values="accuracy")
    assert pivot.shape == (2, 2)


def _tiny_bloodmnist(root) -> None:
    """A BloodMNIST-shaped npz (28×28×3, 8 classes, train/val/test), with a class signal
    in the mean brightness so the model learns something."""
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 160), ("val", 48), ("test", 64)):
        y = np.arange(n) % 8
        x = rng.integers(0, 64, (n, 28, 28, 3)) + (y * 24)[:, None, None, None]
        arrays[f"{split}_images"] = x.astype(np.uint8)
        arrays[f"{split}_labels"] = y[:, None].astype(np.uint8)
    np.savez(root / "bloodmnist.npz", **arrays)


def test_medmnist_run_records_auc_and_the_report_tabulates_it(tmp_path):
    """A MedMNIST run end to end: its metrics hold MedMNIST's AUC beside accuracy, training
    on train+val (`data.val_split = "train"`) enlarges the pool, and the report writes
    auc.md and shows the final AUC (issue 18)."""
    import math

    from falkit import report

    _tiny_bloodmnist(tmp_path)
    common = {**SMALL, "data.dataset": "bloodmnist", "data.data_root": str(tmp_path),
              "data.rho": "none", "partition.num_clients": "2", "budget.fraction": "0.1",
              "fl.rounds": "2", "out_dir": str(tmp_path / "runs")}
    plain = falkit.run(quiet=True, strategy="entropy@G", **common)
    both = falkit.run(quiet=True, strategy="entropy@G", **{**common, "data.val_split": "train"})
    assert plain.run_dir != both.run_dir  # val_split is part of a run's identity
    for res in (plain, both):
        aucs = [float(r["auc"]) for r in res.metrics]
        assert all(0.0 <= a <= 1.0 and not math.isnan(a) for a in aucs), aucs
    runs = {r.dir: r for r in report.load_runs([plain.run_dir, both.run_dir])}
    assert runs[plain.run_dir].class_counts.sum() == 160
    assert runs[both.run_dir].class_counts.sum() == 160 + 48
    out = report.write_report([plain.run_dir, both.run_dir], tmp_path / "report")
    auc_md = (tmp_path / "report" / "auc.md").read_text()
    assert "AUC (%)" in auc_md and "| AULC" not in auc_md
    assert "K=2, train+val" in auc_md  # the setting names the split it trained on
    final = 100 * float(plain.metrics[-1]["auc"])
    assert f"{final:.2f}" in out.read_text()  # the runs table's final AUC
    df = falkit.load_runs([plain.run_dir])
    assert df["auc"].tolist() == pytest.approx([float(r["auc"]) for r in plain.metrics])
