"""A short run of the FairFAL protocol on the real Fashion-MNIST-LT (slow)."""

import json

import numpy as np
import pytest

from falkit import config
from falkit.loop import run


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["coreset@L", "badge@G"])
def test_fmnist_lt_two_cycles(tmp_path, strategy):
    # coreset@L with a scratch local model (the default, last_round, trains none; test_loop
    # covers it)
    cfg = config.load("configs/fmnist_lt.toml", preset="quick", overrides={
        "strategy": strategy, "budget.cycles": "2", "fl.rounds": "2",
        "local_model.mode": "scratch", "local_model.epochs": "3", "out_dir": str(tmp_path)})
    res = run(cfg)
    rows = res.metrics
    assert [r["labeled"] for r in rows] == [1020, 2040]  # 102 per client per cycle
    assert rows[1]["accuracy"] > 0.3  # chance is 0.1 (alpha = 0.1: extreme non-IID)
    assert rows[1]["time_query"] > 0
    if strategy.endswith("@L"):
        assert rows[1]["time_local_model"] > 0
    recs = [json.loads(x) for x in (res.run_dir / "queries.jsonl").read_text().splitlines()]
    assert len(recs) == 20 and all(len(r["indices"]) == 102 for r in recs)
    # each client queried only inside its own pool (partition is deterministic in the seed)
    from falkit.data.federation import build

    data = build(cfg)
    for r in recs:
        assert np.isin(r["indices"], data.clients[r["client"]]).all()
        assert r["labels"] == data.dataset.y_train[r["indices"]].tolist()
