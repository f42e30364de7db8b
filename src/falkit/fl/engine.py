"""The training engine: local SGD for every client, aggregation, evaluation and batched
inference, on in-memory tensors (DESIGN.md §7).

One working model is reused for every client (its weights are overwritten from the global
state), the images stay one uint8 tensor, a batch is gathered by index, normalised and
augmented as a tensor op; nothing goes through a DataLoader.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from falkit.config import Config
from falkit.fl.algorithms import Client, State, client_weight, clone_state
from falkit.fl.algorithms import for_config as algorithm_for
from falkit.metrics import Evaluation, evaluation
from falkit.models.backbones import Backbone
from falkit.models.backbones import create as create_backbone
from falkit.seeding import torch_generator, torch_seed

J = TypeVar("J")
R = TypeVar("R")
# a client's training loss in place of cross-entropy: (model, x, logits, y, generator) -> loss
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator],
                     torch.Tensor]


_ALLOCATOR_TUNED = False


def tune_allocator() -> bool:
    """Keep freed activation buffers in the heap instead of returning them to the OS.

    glibc serves allocations above its mmap threshold (activations of a 64-image batch are
    several MB) with fresh mmap'd pages and unmaps them on free, so every training step
    page-faults its buffers in again: measured here, 25–35 % of a CNN-4 step went to kernel
    time. Raising the mmap threshold to its maximum (32 MiB) and the trim threshold to 1 GiB
    removes that (sys time 1.2 s -> 0.05 s per 80 steps, 1.15–1.3x faster steps). Only
    affects glibc; elsewhere it does nothing."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        ok = bool(libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024))
        ok = bool(libc.mallopt(m_trim_threshold, 1 << 30)) and ok
    except (OSError, AttributeError):
        return False
    _ALLOCATOR_TUNED = ok
    return ok


def configure_process(cfg: Config) -> None:
    """The process-wide settings a run asks for: glibc's allocator tuning
    (`runtime.tune_allocator`) and torch's intra-op thread count (`runtime.threads`, 0 =
    torch's default). Called once by each entry point that starts a run (loop.run, fast.run,
    the Flower apps), not by the Engine, which has no business changing the process."""
    if cfg.runtime.tune_allocator:
        tune_allocator()
    if cfg.runtime.threads > 0:
        torch.set_num_threads(cfg.runtime.threads)


@dataclass
class ImageTensors:
    """Images (uint8 N×C×H×W) and labels of one split, plus how to normalise and augment."""

    x: torch.Tensor
    y: torch.Tensor  # int64
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = False
    crop_pad: int = 0


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


class Engine:
    """Trains, aggregates, evaluates and runs inference for one experiment."""

    def __init__(self, cfg: Config, train: ImageTensors, test: ImageTensors, num_classes: int,
                 num_clients: int = 1,
                 wrap_model: Callable[[nn.Module], nn.Module] | None = None):
        self.cfg = cfg
        # what a strategy adds around every backbone (ll4al: its loss-prediction module)
        self.wrap_model = wrap_model
        self.device = torch.device(cfg.runtime.device)
        self.num_classes = num_classes
        self.num_clients = num_clients  # K, for SCAFFOLD's partial-participation scaling
        # SGD steps per local update instead of fl.local_epochs epochs (FAST's tau)
        self.local_steps: int | None = None
        self.train_x = train.x.to(self.device)
        self.train_y = train.y.to(self.device)
        self.test_x = test.x.to(self.device)
        self.test_y = test.y.to(self.device)
        c = train.x.shape[1]
        # normalisation folded into one multiply-add: (x/255 - mean)/std
        std = torch.tensor(train.std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        mean = torch.tensor(train.mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std
        self.hflip = train.hflip
        self.crop_pad = train.crop_pad
        self.mean, self.std = tuple(train.mean), tuple(train.std)  # recorded with saved models
        self.memory_format = (torch.channels_last if cfg.runtime.channels_last
                              else torch.contiguous_format)
        self.in_channels, self.image_size = c, train.x.shape[2]
        self.algorithm = algorithm_for(cfg)  # fl.algorithm with its config's options
        self.model = self.new_model(init_seed=0)  # the working model, reused for every client
        self.workers = cfg.runtime.workers
        self._optimizers: dict[int, torch.optim.SGD] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._replicas: queue.SimpleQueue[nn.Module] = queue.SimpleQueue()
        self._configured = threading.local()

    def map(self, fn: Callable[[nn.Module, J], R], jobs: Sequence[J]) -> list[R]:
        """fn(working_model, job) for every job, results in job order. With workers > 1 the
        jobs run on that many threads, each with one intra-op thread and its own model
        replica (torch releases the GIL inside its kernels). A job must not depend on the
        replica's previous contents: every job loads the weights it needs."""
        if self.workers <= 1 or len(jobs) <= 1:
            return [fn(self.model, j) for j in jobs]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="falkit")
            for _ in range(self.workers):
                self._replicas.put(self.new_model(init_seed=0))

        def run(job: J) -> R:
            if not getattr(self._configured, "done", False):
                torch.set_num_threads(1)  # OpenMP's thread count is per calling thread
                self._configured.done = True
            model = self._replicas.get()
            try:
                return fn(model, job)
            finally:
                self._replicas.put(model)

        return list(self._pool.map(run, jobs))

    # -- models ---------------------------------------------------------------------------
    def new_model(self, init_seed: int) -> nn.Module:
        """A freshly initialised backbone (wrapped by `wrap_model`, if any); init draws from
        its own seeded torch RNG, the backbone first, so its weights do not depend on the
        wrapper."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = create_backbone(self.cfg.model.backbone, num_classes=self.num_classes,
                                    in_channels=self.in_channels, image_size=self.image_size)
            if self.wrap_model is not None:
                model = self.wrap_model(model)
        if self.cfg.model.dropout > 0:  # on the backbone's classifier input, while training
            for m in model.modules():
                if isinstance(m, Backbone):
                    m.dropout = float(self.cfg.model.dropout)
        return model.to(self.device, memory_format=self.memory_format)

    @contextlib.contextmanager
    def _dropout_masks(self, model: nn.Module, gen: torch.Generator):
        """Dropout masks (model.dropout) drawn from the training's keyed generator `gen`
        while in the block, so a run reproduces on any transport; none kept afterwards."""
        backbones = [m for m in model.modules() if isinstance(m, Backbone) and m.dropout > 0]
        for m in backbones:
            m.dropout_generator = gen
        try:
            yield
        finally:
            for m in backbones:
                m.dropout_generator = None

    def init_state(self, seed: int, *key: object) -> State:
        return clone_state(self.new_model(torch_seed(seed, "init", *key)))

    def _autocast(self):
        if self.cfg.runtime.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- batches --------------------------------------------------------------------------
    def _inputs(self, x_u8: torch.Tensor) -> torch.Tensor:
        x = x_u8.to(torch.float32) * self._scale + self._shift
        return x.contiguous(memory_format=self.memory_format)

    def train_batch(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The training inputs of the train samples `idx`, normalised and augmented (random
        crop / flip from `gen`) on the engine's device: what local SGD feeds the model, for
        strategies that build batches of their own (KAFAL's unlabeled mixup)."""
        return self._augment(self._inputs(self.train_x[idx.to(self.device)]), gen)

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self._apply_augment(x, *self._draw_augment(gen, x.shape[0]))

    def _draw_augment(self, gen: torch.Generator, n: int
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The random draws of augmenting n images, on the CPU from `gen`, in this order:
        crop offsets dy, dx (when cropping), then flips (when flipping)."""
        dy = dx = flip = None
        if self.crop_pad:
            dy = torch.randint(0, 2 * self.crop_pad + 1, (n,), generator=gen)
            dx = torch.randint(0, 2 * self.crop_pad + 1, (n,), generator=gen)
        if self.hflip:
            flip = torch.rand(n, generator=gen) < 0.5
        return dy, dx, flip

    def _apply_augment(self, x: torch.Tensor, dy: torch.Tensor | None,
                       dx: torch.Tensor | None, flip: torch.Tensor | None) -> torch.Tensor:
        """Random crop (pad, then the window at dy, dx) and flip of a batch, with the draws of
        `_draw_augment` (moved to the batch's device here, if they are not there already)."""
        n = x.shape[0]
        if dy is not None and dx is not None:
            p = self.crop_pad
            padded = F.pad(x, (p, p, p, p))
            h, w = x.shape[2], x.shape[3]
            dy, dx = dy.to(x.device), dx.to(x.device)
            rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
            cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
            idx_n = torch.arange(n, device=x.device).view(n, 1, 1, 1)
            idx_c = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
            x = padded[idx_n, idx_c, rows, cols]
        if flip is not None:
            x = torch.where(flip.to(x.device).view(n, 1, 1, 1), x.flip(3), x)
        return x.contiguous(memory_format=self.memory_format)

    def _epoch_batches(self, idx: torch.Tensor, gen: torch.Generator, limit: int | None,
                       up_front: bool = True):
        """(indices on the device, augmented inputs) of each mini-batch of one epoch, at most
        `limit`. `up_front`: the epoch's draws are made first and copied to the device once
        (`_epoch_plan`); else each batch's draws are made as it comes. Same draws, same
        order within `gen`, either way."""
        if up_front:
            spans, flat, draws = self._epoch_plan(idx, gen, limit)
            for a, b in spans:
                bi_d = flat[a:b]
                yield bi_d, self._apply_augment(self._inputs(self.train_x[bi_d]), *(
                    None if d is None else d[a:b] for d in draws))
            return
        for n, bi in enumerate(self._batches(idx, gen)):
            if limit is not None and n >= limit:
                break
            bi_d = bi.to(self.device)
            yield bi_d, self.train_batch(bi_d, gen)

    def _epoch_plan(self, idx: torch.Tensor, gen: torch.Generator, limit: int | None = None
                    ) -> tuple[list[tuple[int, int]], torch.Tensor, list[torch.Tensor | None]]:
        """One epoch of local SGD drawn up front: the mini-batches of `_batches` (at most
        `limit`) and each batch's augmentation draws, from `gen` in the order a step-by-step
        loop draws them (the permutation, then each batch's crop offsets and flips), then
        moved to the device in one copy each, so that the steps need no host sync. Returns
        the batches' (start, end) in the flat order, the flat sample indices and the flat
        draws (dy, dx, flip; None where unused), all on the device."""
        spans: list[tuple[int, int]] = []
        parts: list[torch.Tensor] = []
        draws: list[list[torch.Tensor]] = [[], [], []]
        pos = 0
        for bi in self._batches(idx, gen):
            if limit is not None and len(spans) >= limit:
                break
            for acc, d in zip(draws, self._draw_augment(gen, len(bi)), strict=True):
                if d is not None:
                    acc.append(d)
            parts.append(bi)
            spans.append((pos, pos + len(bi)))
            pos += len(bi)
        flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        return (spans, flat.to(self.device),
                [torch.cat(d).to(self.device) if d else None for d in draws])

    def _batches(self, idx: torch.Tensor, gen: torch.Generator):
        """Shuffled mini-batches of one epoch. A trailing batch of one sample is dropped:
        BatchNorm cannot normalise one sample on a 1×1 feature map, which some backbones
        reach at small image sizes (the FairFAL code's CNN-4, whose smallest map is 3×3 /
        4×4, trains on it; no FMNIST-LT protocol budget makes one: README "Fidelity")."""
        perm = idx[torch.randperm(len(idx), generator=gen)]
        bs = self.cfg.fl.batch_size
        for b in range(0, len(perm), bs):
            bi = perm[b:b + bs]
            if len(bi) > 1:
                yield bi

    def _optimizer(self, model: nn.Module, lr: float) -> torch.optim.SGD:
        """A fresh SGD optimizer for `model` (ALGORITHMS.md §3: fresh every round). Building
        torch.optim.SGD costs ~30 ms here (9 000 times in the paper protocol), so each
        working model keeps one and its state (momentum buffers) is cleared instead — the
        same arithmetic as a new optimizer, since load_state_dict updates params in place."""
        opt = self._optimizers.get(id(model))
        if opt is None or opt.param_groups[0]["params"][0] is not next(model.parameters()):
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=self.cfg.fl.momentum,
                                  weight_decay=self.cfg.fl.weight_decay)
            self._optimizers[id(model)] = opt
        opt.state.clear()
        for group in opt.param_groups:
            group["lr"] = lr
        return opt

    # -- local training -------------------------------------------------------------------
    def local_sgd(self, model: nn.Module, idx: np.ndarray, epochs: int, lr: float,
                  gen: torch.Generator, labels: torch.Tensor | None = None,
                  lr_at_epoch: Callable[[int], float] | None = None,
                  stop_accuracy: float | None = None,
                  client: Client | None = None,
                  lr_at_step: Callable[[int], float] | None = None,
                  stop_on_eval: bool = False,
                  max_steps: int | None = None,
                  progress: tuple[int, int] | None = None,
                  objective: Objective | None = None) -> tuple[int, float]:
        """SGD on the samples `idx` (a fresh optimizer, ALGORITHMS.md §3). Returns the number
        of steps and the training accuracy of the last epoch.

        A model may add its own term to the loss: `model.extra_loss(logits, targets,
        progress)`, called right after the forward pass (ll4al's loss-prediction module);
        `progress` = (round index r, rounds R) of the FL round this update belongs to, None
        outside FL training. Models without the method train on plain cross-entropy.
        `objective(model, x, logits, y, gen)`, if given, replaces that cross-entropy (KAFAL's
        KCFU: logit-adjusted CE plus distillation on unlabeled mixup).

        The learning rate follows `lr_at_epoch(epoch)` or `lr_at_step(step)` (the reference
        code's per-batch MultiStepLR); the early stop at `stop_accuracy` checks the running
        training accuracy of the epoch, or (`stop_on_eval`) an eval-mode accuracy pass over
        the samples after the epoch with the training augmentation, as the reference code
        does (it iterates its flipping training loader). `max_steps` trains exactly
        that many mini-batch steps instead of `epochs` epochs (reshuffling every pass)."""
        with self._dropout_masks(model, gen):  # model.dropout's masks, keyed
            model.train()
            opt = self._optimizer(model, lr)
            model_loss = getattr(model, "extra_loss", None)  # looked up once, not per batch
            ys = self.train_y if labels is None else labels.to(self.device)
            idx_t = torch.as_tensor(idx, dtype=torch.int64)
            steps, acc = 0, 0.0
            for epoch in range(epochs if max_steps is None else max(max_steps, 1)):
                if max_steps is not None and steps >= max_steps:
                    break
                if lr_at_epoch is not None:
                    for group in opt.param_groups:
                        group["lr"] = lr_at_epoch(epoch)
                # counted on the device: no host sync per step
                correct, seen = torch.zeros((), dtype=torch.int64, device=self.device), 0
                # an objective draws from `gen` inside each step (KAFAL's mixup): then every
                # batch's draws must come just before its step, as they always did
                for bi_d, xb in self._epoch_batches(
                        idx_t, gen, None if max_steps is None else max_steps - steps,
                        up_front=objective is None):
                    if lr_at_step is not None:
                        for group in opt.param_groups:
                            group["lr"] = lr_at_step(steps)
                    yb = ys[bi_d]
                    with self._autocast():
                        logits, _ = model(xb)
                        loss = (F.cross_entropy(logits.float(), yb) if objective is None
                                else objective(model, xb, logits, yb, gen))
                        if model_loss is not None:
                            loss = loss + model_loss(logits, yb, progress)
                    if client is not None:  # FL local update: the algorithm's hooks
                        extra = self.algorithm.extra_loss(model, client)
                        if extra is not None:
                            loss = loss + extra
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if client is not None:
                        self.algorithm.correct_grads(model, client)
                    opt.step()
                    steps += 1
                    correct += (logits.argmax(1) == yb).sum()
                    seen += len(yb)
                acc = int(correct) / max(seen, 1)
                if stop_on_eval:  # the reference's pass draws the training augmentation
                    acc = self._accuracy(model, idx_t, ys, gen)
                if stop_accuracy is not None and acc >= stop_accuracy:
                    break
            return steps, acc

    @torch.no_grad()
    def _accuracy(self, model: nn.Module, idx: torch.Tensor, labels: torch.Tensor,
                  gen: torch.Generator | None = None) -> float:
        """Eval-mode accuracy of `model` on the train samples `idx`; the model is back in
        train mode afterwards. With `gen` the inputs get the training augmentation (random
        flip / crop drawn from `gen`): the reference code's early-stop pass iterates its
        training loader, whose transform flips, with the model in eval mode."""
        model.eval()
        correct = 0
        for start in range(0, len(idx), self.cfg.runtime.eval_batch):
            b = idx[start:start + self.cfg.runtime.eval_batch]
            xb = self._inputs(self.train_x[b.to(self.device)])
            if gen is not None:
                xb = self._augment(xb, gen)
            with self._autocast():
                logits, _ = model(xb)
            correct += int((logits.argmax(1) == labels[b.to(labels.device)]).sum())
        model.train()
        return correct / max(len(idx), 1)

    def fl_round(self, global_state: State, clients: list[int], pools: list[np.ndarray],
                 lr: float, seed: int, key: tuple[object, ...],
                 keep_states: bool = False,
                 progress: tuple[int, int] | None = None,
                 objectives: Callable[[int], Objective | None] | None = None
                 ) -> tuple[State, dict[int, State]]:
        """One FL round: every participating client trains from the global weights, the
        server averages with labeled-count weights. Returns the new global state and, when
        asked, each client's final local state (the `last_round` local model). `progress`
        = (r, R) is handed to the model's `extra_loss` hook; `objectives(k)` gives client
        k's training objective, None for plain cross-entropy (see `local_sgd`)."""
        active = [k for k in clients if len(pools[k]) > 0]
        algo = self.algorithm
        algo.begin_round(global_state, [n for n, p in self.model.named_parameters()
                                        if p.requires_grad])

        def one(model: nn.Module, k: int) -> Client:
            return self.train_client(model, global_state, k, pools[k], lr,
                                     torch_generator(seed, "train", *key, k), progress=progress,
                                     objective=objectives(k) if objectives else None)

        if self.batches_clients(custom_loss=objectives is not None):
            by_id: dict[int, Client] = {}
            for group in _equal_pools(active, pools):
                if len(group) == 1:
                    by_id[group[0]] = one(self.model, group[0])
                    continue
                gens = [torch_generator(seed, "train", *key, k) for k in group]
                for c in self.train_clients(global_state, group, pools, lr, gens):
                    by_id[c.id] = c
            done = [by_id[k] for k in active]  # client order: the same sums as one by one
        else:
            done = self.map(one, active)  # results in client order
        new_state = algo.aggregate(global_state, done, num_clients=self.num_clients)
        kept = {c.id: c.state for c in done if c.state is not None} if keep_states else {}
        return new_state, kept

    def train_client(self, model: nn.Module, global_state: State, k: int, pool: np.ndarray,
                     lr: float, gen: torch.Generator, *,
                     progress: tuple[int, int] | None = None,
                     objective: Objective | None = None) -> Client:
        """Client k's local update of one round, from the global weights: the FL algorithm's
        begin/end hooks around `local_sgd` over its labeled `pool`. `fl_round` runs it for
        every client in process; the Flower ClientApp runs it for its own site."""
        client = Client(id=k, weight=client_weight(self.cfg, len(pool)), lr=lr)
        model.load_state_dict(global_state)
        self.algorithm.begin_client(model, global_state, client)
        client.steps, _ = self.local_sgd(model, pool, self.cfg.fl.local_epochs, lr, gen,
                                         client=client, progress=progress, objective=objective,
                                         max_steps=self.local_steps)
        client.state = {n: v.detach().clone() for n, v in model.state_dict().items()}
        self.algorithm.end_client(model, global_state, client)
        return client

    # -- clients as one batched computation (runtime.batch_clients) ------------------------
    def batches_clients(self, custom_loss: bool = False) -> bool:
        """Whether clients with equally many labels train as one batched computation: the
        setting (auto = on a GPU), and only for plain cross-entropy — a strategy's own
        training objective (KAFAL) or loss module (ll4al) trains one client at a time, and
        so do bf16 on the CPU and an FL algorithm without batched hooks (`batchable`)."""
        mode = self.cfg.runtime.batch_clients
        on = mode == "on" or (mode == "auto" and self.device.type == "cuda")
        # under vmap a convolution reaches autocast as aten.convolution, which CPU autocast
        # leaves in fp32 (CUDA's casts it): bf16 on the CPU trains one client at a time
        bf16_cpu = self.cfg.runtime.precision == "bf16" and self.device.type != "cuda"
        # an algorithm with a per-client hook but no batched form trains one at a time
        # dropout masks come from each client's generator, which vmap cannot draw from
        return (on and not bf16_cpu and not custom_loss and self.algorithm.batchable()
                and self.cfg.model.dropout == 0 and not hasattr(self.model, "extra_loss"))

    def train_clients(self, global_state: State, ks: list[int], pools: list[np.ndarray],
                      lr: float, gens: list[torch.Generator]) -> list[Client]:
        """`train_client` for clients whose pools are equally large, as one computation:
        the same begin/end hooks, the algorithm's batched loss and gradient hooks, and
        each client's own random stream, so the result equals one client at a time up to
        float rounding (tests/test_batched.py). `end_client` gets the working model holding
        the global weights (the client's are in client.state, which the algorithms read)."""
        algo = self.algorithm
        self.model.load_state_dict(global_state)  # begin_client reads names off the model
        clients = []
        for k in ks:
            client = Client(id=k, weight=client_weight(self.cfg, len(pools[k])), lr=lr)
            algo.begin_client(self.model, global_state, client)
            clients.append(client)
        states, steps, _ = self.sgd_group(
            [global_state] * len(ks), [pools[k] for k in ks], gens, self.cfg.fl.local_epochs,
            lr, clients=clients, max_steps=self.local_steps)
        for client, state, n in zip(clients, states, steps, strict=True):
            client.state, client.steps = state, n
            algo.end_client(self.model, global_state, client)
        return clients

    def sgd_group(self, inits: Sequence[State], idxs: Sequence[np.ndarray],
                  gens: Sequence[torch.Generator], epochs: int, lr: float, *,
                  labels: torch.Tensor | None = None,
                  lr_at_epoch: Callable[[int], float] | None = None,
                  lr_at_step: Callable[[int], float] | None = None,
                  stop_accuracy: float | None = None, stop_on_eval: bool = False,
                  clients: list[Client] | None = None, max_steps: int | None = None
                  ) -> tuple[list[State], list[int], list[float]]:
        """`local_sgd` for G models at once, each from its own `inits[g]` on its own equally
        large sample set `idxs[g]` with its own generator: the weights are stacked along a
        leading model dimension and one step is `torch.func.vmap` of the model's forward
        (BatchNorm's running statistics stacked the same way) and one backward of the summed
        losses (each model's gradient is its own loss's). SGD with momentum and weight decay
        is elementwise, so one optimizer over the stacked weights steps every model as its
        own would. A model that reaches `stop_accuracy` leaves the group at the end of that
        epoch. Returns each model's state, steps and last epoch's accuracy."""
        from torch.func import functional_call, vmap

        n_models = len(inits)
        sizes = {len(i) for i in idxs}
        if len(sizes) != 1:
            raise ValueError(f"sgd_group needs equally large sample sets, got sizes {sizes}")
        model = self.model
        model.train()
        ys_all = self.train_y if labels is None else labels.to(self.device)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        keys = list(model.state_dict())  # state-dict order, as clone_state gives it

        def step_loss(weights: State, x: torch.Tensor, y: torch.Tensor):
            logits, _ = functional_call(model, weights, (x,))
            return F.cross_entropy(logits.float(), y), (logits.argmax(1) == y).sum()

        batched = vmap(step_loss)
        live = list(range(n_models))  # models still training, in order
        params = {n: torch.stack([st[n].detach() for st in inits]).requires_grad_()
                  for n in names}
        buffers = {n: torch.stack([st[n].detach() for st in inits])
                   for n in keys if n not in params}
        opt = torch.optim.SGD(list(params.values()), lr=lr, momentum=self.cfg.fl.momentum,
                              weight_decay=self.cfg.fl.weight_decay)
        idx_ts = [torch.as_tensor(i, dtype=torch.int64) for i in idxs]
        out: list[State | None] = [None] * n_models
        steps, accs = [0] * n_models, [0.0] * n_models
        done_steps = 0

        def finish(rows: list[int]) -> None:
            for pos, g in enumerate(live):
                if g in rows:
                    out[g] = {n: (params[n] if n in params else buffers[n])[pos].detach().clone()
                              for n in keys}
                    steps[g] = done_steps

        for epoch in range(epochs if max_steps is None else max(max_steps, 1)):
            if max_steps is not None and done_steps >= max_steps:
                break
            if lr_at_epoch is not None:
                for group in opt.param_groups:
                    group["lr"] = lr_at_epoch(epoch)
            correct = torch.zeros(len(live), dtype=torch.int64, device=self.device)
            seen = 0
            # each model's epoch drawn up front from its own generator (same draws, same
            # order as one at a time), stacked: a step slices the group's batch, no host sync
            limit = None if max_steps is None else max_steps - done_steps
            plans = [self._epoch_plan(idx_ts[g], gens[g], limit) for g in live]
            spans = plans[0][0]
            flat = torch.stack([p[1] for p in plans])
            draws = [None if plans[0][2][j] is None else torch.stack([p[2][j] for p in plans])
                     for j in range(3)]
            for a, b in spans:
                if lr_at_step is not None:
                    for group in opt.param_groups:
                        group["lr"] = lr_at_step(done_steps)
                bi_d = flat[:, a:b].reshape(-1)  # one gather for the whole group
                xb = self._apply_augment(self._inputs(self.train_x[bi_d]), *(
                    None if d is None else d[:, a:b].reshape(-1) for d in draws))
                xb = xb.view(len(live), -1, *xb.shape[1:])
                yb = ys_all[bi_d].view(len(live), -1)
                with self._autocast():
                    losses, hits = batched({**params, **buffers}, xb, yb)
                    total = losses.sum()
                    if clients is not None:
                        extra = self.algorithm.extra_loss_batched(
                            params, [clients[g] for g in live])
                        if extra is not None:
                            total = total + extra.sum()
                opt.zero_grad(set_to_none=True)
                total.backward()
                if clients is not None:
                    self.algorithm.correct_grads_batched(params, [clients[g] for g in live])
                opt.step()
                done_steps += 1
                correct += hits
                seen += b - a
            epoch_acc = (correct.double() / max(seen, 1)).tolist()
            if stop_on_eval:  # each model's own eval pass, with its own generator
                epoch_acc = []
                for pos, g in enumerate(live):
                    model.load_state_dict({n: (params[n] if n in params else buffers[n])[pos]
                                           for n in keys})
                    epoch_acc.append(self._accuracy(model, idx_ts[g], ys_all, gens[g]))
            for pos, g in enumerate(live):
                accs[g] = epoch_acc[pos]
            if stop_accuracy is None:
                continue
            stopped = [g for pos, g in enumerate(live) if epoch_acc[pos] >= stop_accuracy]
            if not stopped:
                continue
            finish(stopped)
            keep = [pos for pos, g in enumerate(live) if g not in stopped]
            live = [live[pos] for pos in keep]
            if not live:
                break
            # the group shrinks: the remaining weights and momentum buffers, sliced
            momenta = [opt.state[p].get("momentum_buffer") for p in params.values()]
            params = {n: p.detach()[keep].clone().requires_grad_() for n, p in params.items()}
            buffers = {n: b[keep].clone() for n, b in buffers.items()}
            lr_now = opt.param_groups[0]["lr"]
            opt = torch.optim.SGD(list(params.values()), lr=lr_now,
                                  momentum=self.cfg.fl.momentum,
                                  weight_decay=self.cfg.fl.weight_decay)
            for p, m in zip(params.values(), momenta, strict=True):
                if m is not None:
                    opt.state[p]["momentum_buffer"] = m[keep].clone()
        finish(list(live))
        return [o for o in out if o is not None], steps, accs

    def train_scratch(self, jobs: Sequence[tuple[np.ndarray, tuple[object, ...]]],
                      labels: torch.Tensor, seed: int) -> list[State]:
        """`scratch` local models, one per job (labeled indices, key): fresh init, trained
        only on those labels, lr x 0.1 from `decay_epoch` (per epoch; `local_model.lr_step =
        "batch"`: from that many mini-batches, the reference code's per-batch scheduler),
        early stop at `stop_accuracy` (running training accuracy; `local_model.stop_check =
        "eval"`: an eval-mode pass after each epoch, the reference's) (ALGORITHMS.md §3).
        Inits are drawn here, in order, because torch's init RNG is process-global."""
        lm = self.cfg.local_model
        inits = [clone_state(self.new_model(torch_seed(seed, "local_init", *key)))
                 for _, key in jobs]

        def lr_at(epoch_or_step: int) -> float:  # local_model.lr_step: epoch | batch
            return lm.lr * (0.1 if epoch_or_step >= lm.decay_epoch else 1.0)

        per_batch = lm.lr_step == "batch"
        if self.batches_clients() and len(jobs) > 1:
            out: list[State | None] = [None] * len(jobs)
            for group in _equal_pools(list(range(len(jobs))), [idx for idx, _ in jobs]):
                states, _, _ = self.sgd_group(
                    [inits[i] for i in group], [jobs[i][0] for i in group],
                    [torch_generator(seed, "local_train", *jobs[i][1]) for i in group],
                    lm.epochs, lm.lr, labels=labels, lr_at_epoch=None if per_batch else lr_at,
                    lr_at_step=lr_at if per_batch else None, stop_accuracy=lm.stop_accuracy,
                    stop_on_eval=lm.stop_check == "eval")
                for i, state in zip(group, states, strict=True):
                    out[i] = state
            return [o for o in out if o is not None]

        def train(model: nn.Module, i: int) -> State:
            idx, key = jobs[i]
            model.load_state_dict(inits[i])
            gen = torch_generator(seed, "local_train", *key)
            self.local_sgd(model, idx, lm.epochs, lm.lr, gen, labels=labels,
                           lr_at_epoch=None if per_batch else lr_at,
                           lr_at_step=lr_at if per_batch else None,
                           stop_accuracy=lm.stop_accuracy, stop_on_eval=lm.stop_check == "eval")
            return clone_state(model)

        return self.map(train, list(range(len(jobs))))

    def train_distilled(self, jobs: Sequence[tuple[np.ndarray, tuple[object, ...]]],
                        teacher: State, labels: torch.Tensor, seed: int, *, lr: float,
                        epochs: int, patience: int, temperature: float, ce_weight: float,
                        keep: str = "best") -> list[tuple[State, list[float]]]:
        """Local models distilled from `teacher` (the global model), one per job (labeled
        indices, key): IFAL's KD local model (ALGORITHMS.md §4 ifal). Fresh init, SGD at `lr`
        (the FL momentum and weight decay) on the job's labeled samples only, both models
        seeing the same augmented batch; stops once the epoch's mean training loss has not
        improved for `patience` epochs, or after `epochs`. Returns, per job, a copy of the
        best epoch's weights or (`keep = "last"`, `ifal.kd_keep`) the last epoch's — the IFAL
        code's EarlyStopping saved `model.state_dict()`, a live reference, so its "best" was
        the last — and the loss of every epoch run."""
        inits = [clone_state(self.new_model(torch_seed(seed, "distill_init", *key)))
                 for _, key in jobs]
        labels = labels.to(self.device)

        def train(model: nn.Module, i: int) -> tuple[State, list[float]]:
            idx, key = jobs[i]
            model.load_state_dict(inits[i])
            frozen = copy.deepcopy(model)  # the teacher; deepcopy draws no random numbers
            frozen.load_state_dict(teacher)
            frozen.eval()
            model.train()
            opt = self._optimizer(model, lr)
            gen = torch_generator(seed, "distill_train", *key)
            idx_t = torch.as_tensor(idx, dtype=torch.int64)
            best, best_loss, waited, losses = clone_state(model), float("inf"), 0, []
            with self._dropout_masks(model, gen):  # model.dropout's masks, keyed
                for _ in range(epochs):
                    total, n = 0.0, 0
                    for bi in self._batches(idx_t, gen):
                        bi_d = bi.to(self.device)
                        xb = self.train_batch(bi_d, gen)
                        with torch.no_grad(), self._autocast():
                            t_logits, _ = frozen(xb)
                        with self._autocast():
                            logits, _ = model(xb)
                        loss = distillation_loss(logits.float(), t_logits.float(), labels[bi_d],
                                                 temperature, ce_weight)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        total, n = total + loss.item(), n + 1
                    if n == 0:  # fewer than two labeled samples: nothing to train on
                        break
                    losses.append(total / n)  # IFAL: early stopping on the mean training loss
                    if losses[-1] < best_loss:  # strict improvement (the reference's delta = 0)
                        best_loss, waited = losses[-1], 0
                        if keep == "best":
                            best = clone_state(model)
                    else:
                        waited += 1
                        if waited >= patience:
                            break
                return (clone_state(model) if keep == "last" else best), losses

        return self.map(train, list(range(len(jobs))))

    # -- inference ------------------------------------------------------------------------
    def _map_batches(self, state: State, idx: torch.Tensor, x_all: torch.Tensor,
                     head: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, ...]]
                     ) -> list[tuple[torch.Tensor, ...]]:
        """`head(model, inputs)` of the model with weights `state` (eval mode, no
        augmentation) over the samples `idx` of `x_all` in batches of `runtime.eval_batch`,
        each output float32 on the CPU; one job per worker (a contiguous run of batches, the
        weights loaded once per job). Returns the outputs per batch, in order."""
        bs = self.cfg.runtime.eval_batch
        batches = [idx[b:b + bs] for b in range(0, len(idx), bs)]
        per_job = -(-len(batches) // max(self.workers, 1)) if batches else 1
        jobs = [batches[j:j + per_job] for j in range(0, len(batches), per_job)]

        @torch.inference_mode()
        def infer(model: nn.Module, job: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
            model.load_state_dict(state)
            model.eval()
            out = []
            for sel in job:
                with self._autocast():
                    res = head(model, self._inputs(x_all[sel.to(self.device)]))
                out.append(tuple(r.float().cpu() for r in res))
            return out

        return [batch for job in self.map(infer, jobs) for batch in job]

    def predict(self, state: State, idx: np.ndarray | None = None, split: str = "train"
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax probabilities and penultimate features (float32, on CPU) for the samples
        `idx` of a split, in batches of `runtime.eval_batch`, without augmentation."""
        x_all = self.train_x if split == "train" else self.test_x
        n = len(x_all) if idx is None else len(idx)
        idx_t = torch.arange(n) if idx is None else torch.as_tensor(idx, dtype=torch.int64)

        def head(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits, f = model(x)
            return torch.softmax(logits.float(), 1), f

        outs = self._map_batches(state, idx_t, x_all, head)
        if not outs:
            d = getattr(self.model, "feature_dim", 0)
            return torch.zeros(0, self.num_classes), torch.zeros(0, d)
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def predict_loss(self, state: State, idx: np.ndarray) -> torch.Tensor:
        """The model's predicted loss (ll4al's loss-prediction module; float32, on CPU) for
        the train samples `idx`, batched like `predict`, without augmentation."""
        if not hasattr(self.model, "predicted_loss"):
            raise RuntimeError(f"backbone {self.cfg.model.backbone!r} carries no loss-prediction "
                               "module (only strategy ll4al adds one)")
        outs = self._map_batches(state, torch.as_tensor(idx, dtype=torch.int64), self.train_x,
                                 lambda model, x: (model.predicted_loss(x),))
        return torch.cat([o[0] for o in outs]) if outs else torch.zeros(0)

    @torch.inference_mode()
    def evaluate(self, state: State) -> Evaluation:
        """Accuracy, per-class accuracy and AUC of a model on the full test set."""
        probs, _ = self.predict(state, split="test")
        return evaluation(self.test_y.cpu().numpy(), probs.numpy(), self.num_classes)


def _equal_pools(ids: list[int], pools: Sequence[np.ndarray]) -> list[list[int]]:
    """`ids` grouped by the size of their pool (first-seen order): equally large pools have
    the same mini-batch shapes, so their SGD runs in lockstep."""
    groups: dict[int, list[int]] = {}
    for k in ids:
        groups.setdefault(len(pools[k]), []).append(k)
    return list(groups.values())
