"""Experiment trackers (issue 18): TensorBoard event files, an MLflow file store and W&B
offline runs, each read back, with the run's per-cycle and per-round numbers."""

import pytest

from falkit import config
from falkit.errors import ConfigError
from falkit.loop import run

SMALL = {"data.dataset": "digits", "data.rho": "5", "partition.num_clients": "3",
         "partition.alpha": "1.0", "budget.fraction": "0.05", "budget.cycles": "2",
         "fl.rounds": "2", "fl.local_epochs": "1", "model.backbone": "resnet8_preact16",
         "runtime.threads": "1", "runtime.eval_every": "1", "strategy": "entropy@G"}


def _run(tmp_path, tracker: str):
    cfg = config.load(None, overrides={**SMALL, "out_dir": str(tmp_path), "tracking": tracker})
    return run(cfg)


def test_tensorboard_event_files_hold_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = _run(tmp_path, "tensorboard")
    acc = EventAccumulator(str(res.run_dir / "tensorboard"))
    acc.Reload()
    cycle = [(e.step, e.value) for e in acc.Scalars("cycle/accuracy")]
    assert cycle == [(r["cycle"], pytest.approx(r["accuracy"])) for r in res.metrics]
    rounds = acc.Scalars("round/accuracy")
    assert [e.step for e in rounds] == [1, 2, 3, 4]  # every round of both cycles
    assert rounds[1].value == pytest.approx(res.metrics[0]["accuracy"], abs=1e-6)


def test_mlflow_file_store_holds_params_and_metrics(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    from mlflow.tracking import MlflowClient

    res = _run(tmp_path, "mlflow")
    client = MlflowClient(tracking_uri=(res.run_dir / "mlruns").absolute().as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "falkit"]
    (mrun,) = client.search_runs([exp.experiment_id])
    assert mrun.data.params["strategy"] == "entropy@G"
    assert mrun.data.params["fl.rounds"] == "2"
    hist = client.get_metric_history(mrun.info.run_id, "accuracy")
    assert [(m.step, m.value) for m in hist] == \
        [(r["cycle"], pytest.approx(r["accuracy"])) for r in res.metrics]
    assert len(client.get_metric_history(mrun.info.run_id, "round_accuracy")) == 4


def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
    """W&B offline: the run's .wandb file (what `wandb sync` uploads) holds the config, the
    per-cycle and per-round keys and every cycle's accuracy (its records are protobufs
    with the values as JSON text; wandb has no offline reader to call)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    res = _run(tmp_path, "wandb")
    (path,) = list((res.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    data = path.read_bytes()
    for key in (b"cycle/accuracy", b"round/accuracy", b"fl_round", b"entropy@G"):
        assert key in data, key
    for r in res.metrics:  # the values as the metrics row has them
        assert f"{r['accuracy']}".encode() in data


def test_tracking_is_validated_and_not_part_of_a_run(tmp_path):
    with pytest.raises(ConfigError, match="'neptune' is not one of"):
        config.load(None, overrides={"tracking": "neptune"})
    a = config.load(None, overrides={**SMALL, "tracking": "tensorboard,mlflow"})
    b = config.load(None, text='tracking = ["tensorboard", "mlflow"]')
    assert a.tracking == b.tracking == "tensorboard,mlflow"
    from falkit.rundir import RunDir

    assert RunDir.of(a).path.name == RunDir.of(
        config.load(None, overrides=SMALL)).path.name  # the same experiment
