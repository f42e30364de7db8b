"""The engine's inference: a model's outputs in eval mode, batched, without gradients
(softmax and features, ll4al's predicted loss, test-set metrics), and the eval-mode accuracy
pass that a local model's early stop may ask for.

Each function takes the `Engine` whose working models (`Engine.map`: one per worker), inputs
(`Engine._inputs`, `Engine._augment`), precision (`Engine._autocast`) and batch size
(`runtime.eval_batch`) it uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from falkit.fl.algorithms import State
from falkit.metrics import Evaluation, evaluation

if TYPE_CHECKING:
    from falkit.fl.engine import Engine

Head = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, ...]]


def map_batches(eng: Engine, state: State, idx: torch.Tensor, x_all: torch.Tensor, head: Head
                ) -> list[tuple[torch.Tensor, ...]]:
    """`head(model, inputs)` of the model with weights `state` (eval mode, no
    augmentation) over the samples `idx` of `x_all` in batches of `runtime.eval_batch`,
    each output float32 on the CPU; one job per worker (a contiguous run of batches, the
    weights loaded once per job). Returns the outputs per batch, in order."""
    bs = eng.cfg.runtime.eval_batch
    batches = [idx[b:b + bs] for b in range(0, len(idx), bs)]
    per_job = -(-len(batches) // max(eng.workers, 1)) if batches else 1
    jobs = [batches[j:j + per_job] for j in range(0, len(batches), per_job)]

    @torch.inference_mode()
    def infer(model: nn.Module, job: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        model.load_state_dict(state)
        model.eval()
        out = []
        for sel in job:
            with eng._autocast():
                res = head(model, eng._inputs(x_all[sel.to(eng.device)]))
            out.append(tuple(r.float().cpu() for r in res))
        return out

    return [batch for job in eng.map(infer, jobs) for batch in job]


def predict(eng: Engine, state: State, idx: np.ndarray | None = None, split: str = "train"
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and penultimate features (float32, on CPU) for the samples
    `idx` of a split, in batches of `runtime.eval_batch`, without augmentation."""
    x_all = eng.train_x if split == "train" else eng.test_x
    n = len(x_all) if idx is None else len(idx)
    idx_t = torch.arange(n) if idx is None else torch.as_tensor(idx, dtype=torch.int64)

    def head(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, f = model(x)
        return torch.softmax(logits.float(), 1), f

    outs = map_batches(eng, state, idx_t, x_all, head)
    if not outs:
        d = getattr(eng.model, "feature_dim", 0)
        return torch.zeros(0, eng.num_classes), torch.zeros(0, d)
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def predict_loss(eng: Engine, state: State, idx: np.ndarray) -> torch.Tensor:
    """The model's predicted loss (ll4al's loss-prediction module; float32, on CPU) for
    the train samples `idx`, batched like `predict`, without augmentation."""
    if not hasattr(eng.model, "predicted_loss"):
        raise RuntimeError(f"backbone {eng.cfg.model.backbone!r} carries no loss-prediction "
                           "module (only strategy ll4al adds one)")
    outs = map_batches(eng, state, torch.as_tensor(idx, dtype=torch.int64), eng.train_x,
                       lambda model, x: (model.predicted_loss(x),))
    return torch.cat([o[0] for o in outs]) if outs else torch.zeros(0)


@torch.inference_mode()
def evaluate(eng: Engine, state: State) -> Evaluation:
    """Accuracy, per-class accuracy and AUC of a model on the full test set."""
    probs, _ = eng.predict(state, split="test")
    return evaluation(eng.test_y.cpu().numpy(), probs.numpy(), eng.num_classes)


@torch.no_grad()
def accuracy(eng: Engine, model: nn.Module, idx: torch.Tensor, labels: torch.Tensor,
             gen: torch.Generator | None = None) -> float:
    """Eval-mode accuracy of `model` on the train samples `idx`; the model is back in
    train mode afterwards. With `gen` the inputs get the training augmentation (random
    flip / crop drawn from `gen`): the reference code's early-stop pass iterates its
    training loader, whose transform flips, with the model in eval mode."""
    model.eval()
    correct = 0
    for start in range(0, len(idx), eng.cfg.runtime.eval_batch):
        b = idx[start:start + eng.cfg.runtime.eval_batch]
        xb = eng._inputs(eng.train_x[b.to(eng.device)])
        if gen is not None:
            xb = eng._augment(xb, gen)
        with eng._autocast():
            logits, _ = model(xb)
        correct += int((logits.argmax(1) == labels[b.to(labels.device)]).sum())
    model.train()
    return correct / max(len(idx), 1)
