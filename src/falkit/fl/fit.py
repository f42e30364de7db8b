"""The engine's one training loop, `fit`, and what it trains: a group of models, a loss and
an end-of-epoch rule (ALGORITHMS.md §3).

A *group* is what one SGD step updates. `One` is a plain `nn.Module` with its optimizer (a
client, a scratch or a distilled local model): a forward, a backward, a step. `Stack` is G
models of equally large sample sets trained as one computation (`runtime.batch_clients`):
their weights stacked along a leading model dimension, one step is `torch.func.vmap` of the
model's forward and one backward of the summed losses, and a member that meets the stop
rule leaves the group. `fit` runs epochs (or exactly `max_steps` steps) of a group's
mini-batches, sets the learning rate per epoch or per step, and asks the end-of-epoch rule
whether to go on. The three trainings differ only in what they hand it:

* FL round: cross-entropy (or a strategy's objective) + the model's `extra_loss` hook +
  the FL algorithm's `extra_loss` / `correct_grads`; `AccuracyStop()` records the epoch's
  training accuracy and never stops;
* scratch local model: cross-entropy; `AccuracyStop(stop_accuracy, on_eval)` stops (a
  member leaves) at `local_model.stop_accuracy`;
* distilled local model (IFAL): `distilled_loss` against a frozen teacher; `PatienceStop`
  stops after `patience` epochs without a better mean loss and keeps the best or last
  weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from falkit.fl.algorithms import State, clone_state
from falkit.fl.tensors import DeviceImages

# a client's training loss in place of cross-entropy: (model, x, logits, y, generator) -> loss
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator],
                     torch.Tensor]
# what one step of a group of one minimises: (model, x, y) -> (loss, logits)
Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# the eval-mode accuracy pass: (model, sample indices, labels, generator) -> accuracy
Accuracy = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], float]
Autocast = Callable[[], contextlib.AbstractContextManager]


class Tally:
    """One epoch's counts: correct predictions (per member, on the device: no host sync per
    step), samples and steps per member, and (`sum_loss`) the sum of the steps' losses."""

    def __init__(self, hits: torch.Tensor, sum_loss: bool):
        self.hits, self.seen, self.steps, self.loss = hits, 0, 0, 0.0
        self.sum_loss = sum_loss

    def add(self, loss: torch.Tensor, hits: torch.Tensor, n: int) -> None:
        self.hits += hits
        self.seen += n
        self.steps += 1
        if self.sum_loss:
            self.loss = self.loss + loss.item()


class Group(Protocol):
    """What `fit` trains: the members' mini-batches, one SGD step of all of them, their
    accuracies, and members leaving."""

    def set_lr(self, lr: float) -> None: ...
    def epoch(self, limit: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def no_hits(self) -> torch.Tensor: ...
    def train_accuracies(self, tally: Tally) -> list[float]: ...
    def eval_accuracies(self, accuracy: Accuracy) -> list[float]: ...
    def record(self, accuracies: list[float]) -> None: ...
    def retire(self, leaving: list[bool], steps: int) -> bool: ...


class EndEpoch(Protocol):
    sum_loss: bool  # whether it reads the epoch's loss (a host sync per step)

    def __call__(self, group: Group, tally: Tally, steps: int) -> bool: ...


def fit(group: Group, epochs: int, *, end_epoch: EndEpoch | None = None,
        max_steps: int | None = None, lr_at_epoch: Callable[[int], float] | None = None,
        lr_at_step: Callable[[int], float] | None = None) -> int:
    """SGD of `group` for `epochs` epochs, or exactly `max_steps` mini-batch steps
    (reshuffling every pass; FAST's tau), the learning rate following `lr_at_epoch(epoch)`
    or `lr_at_step(step)` (the reference code's per-batch MultiStepLR); after each epoch
    `end_epoch(group, tally, steps)` says whether to stop. Returns the number of steps."""
    steps = 0
    sum_loss = end_epoch is not None and end_epoch.sum_loss
    for epoch in range(epochs if max_steps is None else max(max_steps, 1)):
        if max_steps is not None and steps >= max_steps:
            break
        if lr_at_epoch is not None:
            group.set_lr(lr_at_epoch(epoch))
        tally = Tally(group.no_hits(), sum_loss)
        for xb, yb in group.epoch(None if max_steps is None else max_steps - steps):
            if lr_at_step is not None:
                group.set_lr(lr_at_step(steps))
            loss, hits = group.step(xb, yb)
            steps += 1
            tally.add(loss, hits, yb.shape[-1])
        if end_epoch is not None and end_epoch(group, tally, steps):
            break
    return steps


# -- groups -------------------------------------------------------------------------------
class One:
    """A group of one: `model` (in train mode) and its optimizer, on the samples `idx` with
    the generator `gen`. `up_front`: each epoch's draws are made before its first step
    (`DeviceImages.epoch_plan`: no host sync per step); a loss that draws from `gen` inside
    a step (KAFAL's mixup) needs every batch's draws just before its step instead."""

    def __init__(self, model: nn.Module, opt: torch.optim.SGD, images: DeviceImages,
                 batch_size: int, idx: torch.Tensor, gen: torch.Generator, labels: torch.Tensor,
                 loss: Loss, after_backward: Callable[[nn.Module], None] | None = None,
                 up_front: bool = True):
        self.model, self.opt, self.images, self.batch_size = model, opt, images, batch_size
        self.idx, self.gen, self.labels = idx, gen, labels
        self.loss, self.after_backward, self.up_front = loss, after_backward, up_front
        self.accuracy = 0.0  # the last epoch's

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def epoch(self, limit: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for bi_d, xb in self.images.epoch_batches(self.idx, self.gen, self.batch_size, limit,
                                                  up_front=self.up_front):
            yield xb, self.labels[bi_d]

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, logits = self.loss(self.model, xb, yb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.after_backward is not None:
            self.after_backward(self.model)
        self.opt.step()
        return loss, (logits.argmax(1) == yb).sum()

    def no_hits(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.int64, device=self.labels.device)

    def train_accuracies(self, tally: Tally) -> list[float]:
        return [int(tally.hits) / max(tally.seen, 1)]

    def eval_accuracies(self, accuracy: Accuracy) -> list[float]:
        return [accuracy(self.model, self.idx, self.labels, self.gen)]

    def record(self, accuracies: list[float]) -> None:
        self.accuracy = accuracies[0]

    def retire(self, leaving: list[bool], steps: int) -> bool:
        return leaving[0]


class Stack:
    """G models trained as one computation, each from its own `inits[g]` on its own equally
    large sample set `idxs[g]` with its own generator: the weights are stacked along a
    leading model dimension and one step is `torch.func.vmap` of `model`'s forward
    (BatchNorm's running statistics stacked the same way) and one backward of the summed
    losses (each model's gradient is its own loss's). SGD with momentum and weight decay is
    elementwise, so one optimizer over the stacked weights steps every model as its own
    would. Each member's epoch is drawn up front from its own generator (same draws, same
    order as one at a time) and stacked: a step slices the group's batch, no host sync.
    `extra(params, members)` adds to the summed loss, `after_backward(params, members)`
    edits the gradients (the FL algorithm's batched hooks; `members` the live ids)."""

    def __init__(self, model: nn.Module, inits: Sequence[State], idxs: Sequence[np.ndarray],
                 gens: Sequence[torch.Generator], labels: torch.Tensor, lr: float, *,
                 momentum: float, weight_decay: float, images: DeviceImages, batch_size: int,
                 autocast: Autocast,
                 extra: Callable[[State, list[int]], torch.Tensor | None] | None = None,
                 after_backward: Callable[[State, list[int]], None] | None = None):
        from torch.func import functional_call, vmap

        n_models = len(inits)
        sizes = {len(i) for i in idxs}
        if len(sizes) != 1:
            raise ValueError(f"sgd_group needs equally large sample sets, got sizes {sizes}")
        self.model = model
        model.train()
        self.labels = labels
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.keys = list(model.state_dict())  # state-dict order, as clone_state gives it

        def step_loss(weights: State, x: torch.Tensor, y: torch.Tensor):
            logits, _ = functional_call(model, weights, (x,))
            return F.cross_entropy(logits.float(), y), (logits.argmax(1) == y).sum()

        self.batched = vmap(step_loss)
        self.live = list(range(n_models))  # models still training, in order
        self.params = {n: torch.stack([st[n].detach() for st in inits]).requires_grad_()
                       for n in names}
        self.buffers = {n: torch.stack([st[n].detach() for st in inits])
                        for n in self.keys if n not in self.params}
        self.momentum, self.weight_decay = momentum, weight_decay
        self.opt = self._sgd(lr)
        self.idxs = [torch.as_tensor(i, dtype=torch.int64) for i in idxs]
        self.gens = list(gens)
        self.images, self.batch_size, self.autocast = images, batch_size, autocast
        self.extra, self.after_backward = extra, after_backward
        self.out: list[State | None] = [None] * n_models
        self.steps, self.accuracies = [0] * n_models, [0.0] * n_models

    def _sgd(self, lr: float) -> torch.optim.SGD:
        return torch.optim.SGD(list(self.params.values()), lr=lr, momentum=self.momentum,
                               weight_decay=self.weight_decay)

    def _weights(self, pos: int) -> State:
        return {n: (self.params[n] if n in self.params else self.buffers[n])[pos]
                for n in self.keys}

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def epoch(self, limit: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        im = self.images
        plans = [im.epoch_plan(self.idxs[g], self.gens[g], self.batch_size, limit)
                 for g in self.live]
        spans = plans[0][0]
        flat = torch.stack([p[1] for p in plans])
        draws = [None if plans[0][2][j] is None else torch.stack([p[2][j] for p in plans])
                 for j in range(3)]
        n = len(self.live)
        for a, b in spans:
            bi_d = flat[:, a:b].reshape(-1)  # one gather for the whole group
            xb = im.apply_augment(im.inputs(im.train_x[bi_d]), *(
                None if d is None else d[:, a:b].reshape(-1) for d in draws))
            yield xb.view(n, -1, *xb.shape[1:]), self.labels[bi_d].view(n, -1)

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            losses, hits = self.batched({**self.params, **self.buffers}, xb, yb)
            total = losses.sum()
            if self.extra is not None:
                extra = self.extra(self.params, self.live)
                if extra is not None:
                    total = total + extra.sum()
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if self.after_backward is not None:
            self.after_backward(self.params, self.live)
        self.opt.step()
        return total, hits

    def no_hits(self) -> torch.Tensor:
        return torch.zeros(len(self.live), dtype=torch.int64, device=self.labels.device)

    def train_accuracies(self, tally: Tally) -> list[float]:
        return (tally.hits.double() / max(tally.seen, 1)).tolist()

    def eval_accuracies(self, accuracy: Accuracy) -> list[float]:
        """Each member's own eval pass, with its own generator, on the working model."""
        out = []
        for pos, g in enumerate(self.live):
            self.model.load_state_dict(self._weights(pos))
            out.append(accuracy(self.model, self.idxs[g], self.labels, self.gens[g]))
        return out

    def record(self, accuracies: list[float]) -> None:
        for pos, g in enumerate(self.live):
            self.accuracies[g] = accuracies[pos]

    def _finish(self, rows: list[int], steps: int) -> None:
        for pos, g in enumerate(self.live):
            if g in rows:
                out = self._weights(pos)
                self.out[g] = {n: out[n].detach().clone() for n in self.keys}
                self.steps[g] = steps

    def retire(self, leaving: list[bool], steps: int) -> bool:
        """The members flagged leave the group (their weights kept as they are); True when
        none is left."""
        stopped = [g for pos, g in enumerate(self.live) if leaving[pos]]
        self._finish(stopped, steps)
        keep = [pos for pos, g in enumerate(self.live) if g not in stopped]
        self.live = [self.live[pos] for pos in keep]
        if not self.live:
            return True
        # the group shrinks: the remaining weights and momentum buffers, sliced
        momenta = [self.opt.state[p].get("momentum_buffer") for p in self.params.values()]
        self.params = {n: p.detach()[keep].clone().requires_grad_()
                       for n, p in self.params.items()}
        self.buffers = {n: b[keep].clone() for n, b in self.buffers.items()}
        self.opt = self._sgd(self.opt.param_groups[0]["lr"])
        for p, m in zip(self.params.values(), momenta, strict=True):
            if m is not None:
                self.opt.state[p]["momentum_buffer"] = m[keep].clone()
        return False

    def result(self, steps: int) -> tuple[list[State], list[int], list[float]]:
        """Each model's state, steps and last epoch's accuracy, in `inits` order."""
        self._finish(list(self.live), steps)
        return [o for o in self.out if o is not None], self.steps, self.accuracies


# -- end-of-epoch rules -------------------------------------------------------------------
class AccuracyStop:
    """Records each member's accuracy of the epoch: the running training accuracy, or
    (`on_eval`) an eval-mode pass over its samples with the training augmentation drawn
    from its generator, as the reference code does (it iterates its flipping training
    loader). With a `threshold`, members at or above it leave the group (a group of one
    stops)."""

    sum_loss = False

    def __init__(self, threshold: float | None = None, on_eval: bool = False,
                 accuracy: Accuracy | None = None):
        self.threshold, self.on_eval, self.accuracy = threshold, on_eval, accuracy

    def __call__(self, group: Group, tally: Tally, steps: int) -> bool:
        if self.on_eval:
            assert self.accuracy is not None
            accs = group.eval_accuracies(self.accuracy)
        else:
            accs = group.train_accuracies(tally)
        group.record(accs)
        if self.threshold is None:
            return False
        leaving = [a >= self.threshold for a in accs]
        return any(leaving) and group.retire(leaving, steps)


class PatienceStop:
    """IFAL's early stopping on the epoch's mean training loss: stops once it has not
    strictly improved (the reference's delta = 0) for `patience` epochs, or after an epoch
    without a batch (fewer than two labeled samples: nothing to train on). Keeps a copy of
    the best epoch's weights or (`keep = "last"`) the last epoch's — the IFAL code's
    EarlyStopping saved `model.state_dict()`, a live reference, so its "best" was the last
    — and the loss of every epoch run."""

    sum_loss = True

    def __init__(self, model: nn.Module, patience: int, keep: str = "best"):
        self.model, self.patience, self.keep = model, patience, keep
        self.best, self.best_loss, self.waited = clone_state(model), math.inf, 0
        self.losses: list[float] = []

    def __call__(self, group: Group, tally: Tally, steps: int) -> bool:
        if tally.steps == 0:
            return True
        self.losses.append(tally.loss / tally.steps)
        if self.losses[-1] < self.best_loss:
            self.best_loss, self.waited = self.losses[-1], 0
            if self.keep == "best":
                self.best = clone_state(self.model)
        else:
            self.waited += 1
            if self.waited >= self.patience:
                return True
        return False

    def weights(self) -> State:
        return clone_state(self.model) if self.keep == "last" else self.best


# -- losses -------------------------------------------------------------------------------
def training_loss(autocast: Autocast, *, objective: Objective | None = None,
                  gen: torch.Generator | None = None,
                  model_loss: Callable[..., torch.Tensor] | None = None,
                  progress: tuple[int, int] | None = None,
                  extra: Callable[[nn.Module], torch.Tensor | None] | None = None) -> Loss:
    """Cross-entropy, or `objective(model, x, logits, y, gen)` in its place (KAFAL's KCFU),
    plus the model's own term `model_loss(logits, y, progress)` (ll4al's loss-prediction
    module), under autocast; then `extra(model)` (the FL algorithm's term), outside it."""
    def loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast():
            logits, _ = model(xb)
            value = (F.cross_entropy(logits.float(), yb) if objective is None
                     else objective(model, xb, logits, yb, gen))  # type: ignore[arg-type]
            if model_loss is not None:
                value = value + model_loss(logits, yb, progress)
        if extra is not None:
            more = extra(model)
            if more is not None:
                value = value + more
        return value, logits

    return loss


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor,
                      temperature: float, ce_weight: float) -> torch.Tensor:
    """IFAL's KD objective (ALGORITHMS.md §4 ifal; Hinton et al. 2015): ce_weight · CE(y) +
    (1 − ce_weight) · T² · KL(softmax(teacher/T) ‖ softmax(student/T)), the KL summed over
    classes and averaged over the batch."""
    ce = F.cross_entropy(logits, y)
    kd = F.kl_div(F.log_softmax(logits / temperature, 1),
                  F.softmax(teacher_logits / temperature, 1), reduction="batchmean")
    kd = kd * temperature ** 2
    return ce_weight * ce + (1.0 - ce_weight) * kd


def distilled_loss(autocast: Autocast, teacher: nn.Module, temperature: float,
                   ce_weight: float) -> Loss:
    """`distillation_loss` of the student against the frozen `teacher` (eval mode, no
    gradient) on the same augmented batch."""
    def loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), autocast():
            t_logits, _ = teacher(xb)
        with autocast():
            logits, _ = model(xb)
        return distillation_loss(logits.float(), t_logits.float(), yb, temperature,
                                 ce_weight), logits

    return loss
