"""Tutorial: write your own query strategy, check it, run it (docs/tutorials/own-strategy.md).

    python docs/tutorials/own_strategy.py [OUT_DIR]

A strategy is one class: what it reads (here: the query model's class probabilities on the
client's unlabeled pool) and `select`, which returns the indices to label. `falkit.testing`
checks the contract every strategy meets; `falkit.run` runs it like any built-in one.
"""

from __future__ import annotations

import sys

import numpy as np

import falkit
from falkit.al.base import QueryContext, Strategy
from falkit.al.primitives import top_k
from falkit.testing import check_strategy


class SmallestMargin(Strategy):
    """The b samples whose two most probable classes are closest (Scheffer et al. 2001)."""

    name = "tutorial_margin"
    description = "smallest gap between the two most probable classes"
    uses_selector = True  # @G: the global model scores the pool, @L: the client's own

    def select(self, ctx: QueryContext, budget: int) -> np.ndarray:
        probs, _ = ctx.outputs(self.query_model, "unlabeled")  # one batched pass
        top2 = probs.double().topk(2, dim=1).values
        return top_k(-(top2[:, 0] - top2[:, 1]), budget)  # positions in ctx.unlabeled


if __name__ == "__main__":
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/tutorial"
    check_strategy(SmallestMargin)  # picks: right count, no repeats, in the pool, seeded
    print("contract: ok")
    res = falkit.run(strategy=SmallestMargin, seed=0, quiet=True, out_dir=out_dir,
                     **{"data.dataset": "digits", "data.rho": "none",
                        "partition.num_clients": 3, "partition.alpha": 1, "budget.cycles": 3,
                        "fl.rounds": 3, "fl.local_epochs": 2, "fl.lr": 0.05,
                        "model.backbone": "resnet8_preact16"})
    for row in res.metrics:
        print(f"cycle {int(row['cycle']) + 1}: {float(row['labeled_pct']):.1f}% labeled, "
              f"accuracy {100 * float(row['accuracy']):.2f}%")
    print(f"results: {res.run_dir}")
