"""The command line as a user meets it: output, errors (one line, exit 2), sweeps."""

import csv

from falkit.cli import main
from falkit.results import read_metrics

SMALL = ["data.dataset=digits", "data.rho=5", "partition.num_clients=3", "partition.alpha=1",
         "budget.cycles=3", "fl.rounds=1", "fl.local_epochs=1", "model.backbone=resnet8_preact16"]


def test_list_names_every_kind(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("entropy@G|@L", "coreset@G|@L", "badge", "random", "fedavg", "cnn4",
                 "resnet18", "fmnist", "digits", "dirichlet_balanced", "quick"):
        assert word in out, word


def test_data_list_and_find(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("fmnist") and "present" in line for line in out.splitlines())
    assert not any(line.startswith("pathmnist_64") for line in out.splitlines())  # if present
    assert main(["data", "find", "fmnist"]) == 0


def test_data_list_shows_a_present_medmnist_size(capsys, tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.setenv("HOME", str(tmp_path))
    x, y = np.zeros((2, 64, 64, 3), np.uint8), np.zeros((2, 1), np.uint8)
    np.savez(tmp_path / "pathmnist_64.npz", train_images=x, train_labels=y, test_images=x,
             test_labels=y)
    assert main(["data", "list", "--data-root", str(tmp_path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("pathmnist_64"))
    assert "present" in line and str(tmp_path / "pathmnist_64.npz") in line and "64×64" in line


def test_missing_dataset_says_how_to_get_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    code = main(["data", "find", "cifar10", "--data-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "falkit data download cifar10" in err and err.count("\n") == 1


def test_partition_prints_table_and_budget(capsys, tmp_path):
    out_csv = tmp_path / "p.csv"
    assert main(["partition", "configs/fmnist_lt.toml", "--csv", str(out_csv)]) == 0
    out = capsys.readouterr().out
    assert "20428 train samples" in out and "per-client budget per cycle: 102" in out
    rows = list(csv.reader(out_csv.open()))
    assert rows[0][0] == "client" and len(rows) == 12  # header, 10 clients, total


def test_unknown_key_exit_2(capsys):
    assert main(["run", "fl.roudns=3"]) == 2
    assert "unknown config key 'fl.roudns'" in capsys.readouterr().err


def test_sweep_runs_grid_and_skips_finished(capsys, tmp_path):
    args = ["sweep", *SMALL, f"out_dir={tmp_path}", "--strategies", "random,entropy@G",
            "--seeds", "0,1", "--grid", "partition.alpha=1,100", "--quiet"]
    assert main(args) == 0
    rows = list(csv.DictReader((tmp_path / "sweep" / "sweep.csv").open()))
    assert len(rows) == 2 * 2 * 2 * 3
    assert {r["strategy"] for r in rows} == {"random", "entropy@G"}
    assert {r["partition.alpha"] for r in rows} == {"1", "100"}
    capsys.readouterr()
    assert main(args) == 0
    assert "(8 already complete)" in capsys.readouterr().err
    runs = sorted(p for p in tmp_path.iterdir() if p.name != "sweep")
    assert len(runs) == 8 and all(len(read_metrics(r)) == 3 for r in runs)


def test_run_prints_table_and_show_reads_it(capsys, tmp_path):
    assert main(["run", *SMALL, f"out_dir={tmp_path}", "name=r", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "15%" in out and f"results: {tmp_path / 'r'}" in out
    assert main(["show", str(tmp_path / "r")]) == 0
    assert "r " in capsys.readouterr().out


def test_run_strategy_fast_goes_to_fast(capsys, tmp_path):
    """`falkit run strategy=fast` runs FAST's one AL round (not the per-cycle loop)."""
    assert main(["run", "configs/fmnist_lt.toml", "--preset", "quick", "strategy=fast",
                 "model.backbone=linear", f"out_dir={tmp_path}", "fast.cache_dir="
                 f"{tmp_path / 'cache'}", "--quiet"]) == 0
    out = capsys.readouterr().out
    run_dir = next(p for p in tmp_path.iterdir() if "_fast_" in p.name)
    assert f"results: {run_dir}" in out and (run_dir / "clients.csv").is_file()


def test_version_is_the_installed_packages(capsys):
    import importlib.metadata

    import pytest

    import falkit

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"falkit {falkit.__version__}" == f"falkit {importlib.metadata.version('falkit')}"
