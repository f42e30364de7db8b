"""A frozen foundation backbone for every method (issue 27 item 1): `model.backbone =
"frozen:<encoder>"` embeds each site's images once (cached on the site's disk), trains
`model.head` on the embeddings. Every strategy on it, in process = Flower, is
tests/test_transports.py's parametrised equality test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from falkit import config
from falkit.errors import ConfigError
from falkit.models import backbones

SMALL = {"data.dataset": "digits", "data.rho": "5", "partition.num_clients": "3",
         "partition.alpha": "1.0", "budget.fraction": "0.05", "budget.cycles": "2",
         "fl.rounds": "2", "fl.local_epochs": "1", "fl.lr": "0.05", "runtime.threads": "1",
         "model.backbone": "frozen:pca:16"}


def test_heads_on_embeddings():
    lin = backbones.create("frozen:pca:16", 10, 16, 1)
    mlp = backbones.create("frozen:hf:any", 10, 16, 1, head="mlp", hidden=8)
    assert isinstance(lin, backbones.LinearHead) and lin.feature_dim == 16
    assert isinstance(mlp, backbones.MLPHead) and mlp.feature_dim == 8
    z = torch.randn(5, 16, 1, 1)
    logits, feats = mlp(z)
    assert logits.shape == (5, 10) and feats.shape == (5, 8) and (feats >= 0).all()
    assert [n for _, n in mlp.block_taps()] == [16, 8]
    with pytest.raises(ValueError, match="16-dim embeddings"):
        mlp(torch.randn(5, 12, 1, 1))
    assert backbones.on_embeddings("frozen:pixels") and backbones.on_embeddings("linear")
    assert not backbones.on_embeddings("cnn4")


def test_bad_specs_are_refused_when_the_config_loads():
    with pytest.raises(ConfigError, match="unknown encoder 'clip'"):
        config.load(None, overrides={"model.backbone": "frozen:clip"})
    with pytest.raises(ConfigError, match="pca:<dim> needs an integer"):
        config.load(None, overrides={"model.backbone": "frozen:pca:x"})
    with pytest.raises(ConfigError, match="model.head"):
        config.load(None, overrides={"model.backbone": "frozen:pixels", "model.head": "deep"})
    with pytest.raises(ConfigError, match="would not share coordinates"):
        config.load(None, overrides={"model.backbone": "frozen:pca:8",
                                     "partition.method": "sites"})
    with pytest.raises(ConfigError, match="model.backbone = linear"):
        config.load(None, overrides={"strategy": "fast", "model.backbone": "frozen:pixels"})
    base = config.load(None)
    assert base.run_name() == config.load(None, overrides={"model.head": "linear"}).run_name()


def test_a_run_trains_the_head_on_cached_embeddings(tmp_path, monkeypatch):
    from falkit.loop import run
    from falkit.models.saved import load_model

    monkeypatch.setenv("FALKIT_CACHE", str(tmp_path / "cache"))
    over = {**SMALL, "strategy": "entropy@G", "model.head": "mlp", "model.head_hidden": "32",
            "fl.rounds": "20", "fl.local_epochs": "5", "out_dir": str(tmp_path / "runs")}
    res = run(config.load(None, overrides=over))
    assert len(res.metrics) == 2 and res.metrics[-1]["accuracy"] > 0.5  # pca features learn
    files = sorted((tmp_path / "cache" / "embeddings").glob("*.npy"))
    assert len(files) == 2  # the train and test splits, embedded once
    stamp = [f.stat().st_mtime_ns for f in files]
    again = run(config.load(None, overrides={**over, "seed": "1"}))  # another seed: cached
    assert [f.stat().st_mtime_ns for f in files] == stamp and again.metrics
    model = load_model(res.run_dir / "models" / "cycle_1.pt")
    assert isinstance(model, backbones.MLPHead)
    assert np.isfinite(model(torch.randn(2, 16, 1, 1))[0].detach().numpy()).all()


def test_every_strategy_queries_on_a_frozen_backbone(tmp_path, monkeypatch):
    """The contract on real outputs: each strategy's picks are its budget of distinct
    unlabeled samples (coreset and BADGE on the head's features and gradients, ll4al's
    loss module on the head, FairFAL's prototypes on the global head's features)."""
    import json

    from falkit import registry
    from falkit.al.base import list_ids
    from falkit.loop import run

    monkeypatch.setenv("FALKIT_CACHE", str(tmp_path / "cache"))
    for sid in list_ids():
        extra = {"strategy": sid, **registry.strategy_class(sid).example_settings}
        res = run(config.load(None, overrides={**SMALL, **extra, "budget.cycles": "2",
                                               "fl.rounds": "1", "local_model.epochs": "1",
                                               "out_dir": str(tmp_path / "runs")}))
        rows = [json.loads(x) for x in (res.run_dir / "queries.jsonl").read_text().split()]
        later = [r for r in rows if r["cycle"] == 1]
        assert len(later) == 3, sid
        for r in later:
            first = next(x for x in rows if x["cycle"] == 0 and x["client"] == r["client"])
            assert len(set(r["indices"])) == len(r["indices"]) == len(first["indices"]), sid
            assert not set(r["indices"]) & set(first["indices"]), sid


@pytest.mark.slow
def test_on_flower_no_embedding_leaves_a_site(tmp_path, monkeypatch):
    """Every array a client sends is the head's weights (packed by dtype) or nothing: no
    reply carries as many values as a site's embeddings, and each site filled its own
    cache only with its own embeddings."""
    pytest.importorskip("flwr")
    from tests.test_transports import MemoryGrid, flower_run, run_config

    from falkit.flower import client_app

    monkeypatch.setenv("FALKIT_CACHE", str(tmp_path / "cache"))
    extra = {**SMALL, "strategy": "entropy@L", "model.head": "mlp", "model.head_hidden": "8"}
    grid = MemoryGrid(run_config(tmp_path / "fl", **extra))
    sizes = []
    real = client_app.app

    def spy(msg, context):
        reply = real(msg, context)
        for rec in reply.content.array_records.values():
            for a in rec.values():
                arr = a.numpy()
                if arr.dtype.kind == "f":  # (a packed state's layout is JSON, as uint8)
                    sizes.append(arr.size)
        return reply

    monkeypatch.setattr(client_app, "app", spy)
    flower_run(tmp_path / "fl", grid=grid, **extra)
    head = 16 * 8 + 8 + 8 * 10 + 10  # the MLP head's parameters
    assert sizes and max(sizes) <= head
    assert not any(s % 16 == 0 and s >= 16 * 50 for s in sizes)  # no N × 16 embeddings
