"""The training engine: local SGD for every client, aggregation, evaluation and batched
inference, on in-memory tensors (DESIGN.md §7).

One working model is reused for every client (its weights are overwritten from the global
state), the images stay one uint8 tensor, a batch is gathered by index, normalised and
augmented as a tensor op; nothing goes through a DataLoader.

`Engine` is the facade over three parts, each its own file: the images as device tensors,
their normalisation, augmentation and mini-batches (`falkit.fl.tensors`); the one training
loop, `fit`, of which an FL round's local updates, a scratch local model and a distilled
local model are calls with their own losses and stop rules (`falkit.fl.fit`); and batched
eval-mode inference (`falkit.fl.inference`). What stays here: the working models (one per
worker thread, `map`), their optimizers, and which loss and stop rule each training hands
to `fit`.
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
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from falkit.config import Config
from falkit.fl import inference
from falkit.fl.algorithms import Client, State, client_weight, clone_state
from falkit.fl.algorithms import for_config as algorithm_for
from falkit.fl.fit import (
    AccuracyStop,
    Objective,
    One,
    PatienceStop,
    Stack,
    distillation_loss,
    distilled_loss,
    fit,
    training_loss,
)
from falkit.fl.tensors import DeviceImages, ImageTensors, batches
from falkit.metrics import Evaluation
from falkit.models.backbones import Backbone
from falkit.models.backbones import create as create_backbone
from falkit.seeding import torch_generator, torch_seed

__all__ = ["Engine", "ImageTensors", "Objective", "configure_process", "distillation_loss",
           "tune_allocator"]

J = TypeVar("J")
R = TypeVar("R")


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


def _images_attr(name: str, doc: str) -> property:
    """An attribute of the engine's `DeviceImages`, readable and writable on the engine."""
    return property(lambda self: getattr(self.images, name),
                    lambda self, value: setattr(self.images, name, value), doc=doc)


class Engine:
    """Trains, aggregates, evaluates and runs inference for one experiment."""

    train_x = _images_attr("train_x", "the train images, uint8 N×C×H×W on the device")
    train_y = _images_attr("train_y", "the train labels on the device (written in place as "
                                      "the oracle reveals them)")
    test_x = _images_attr("test_x", "the test images, uint8 on the device")
    test_y = _images_attr("test_y", "the test labels on the device")
    _scale = _images_attr("scale", "normalisation: x_u8 · _scale + _shift")
    _shift = _images_attr("shift", "normalisation: x_u8 · _scale + _shift")
    hflip = _images_attr("hflip", "training augmentation: random horizontal flips")
    crop_pad = _images_attr("crop_pad", "training augmentation: random crop padding")
    memory_format = _images_attr("memory_format", "the inputs' memory format")

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
        self.images = DeviceImages(train, test, self.device,
                                   torch.channels_last if cfg.runtime.channels_last
                                   else torch.contiguous_format)
        self.mean, self.std = tuple(train.mean), tuple(train.std)  # recorded with saved models
        self.in_channels, self.image_size = train.x.shape[1], train.x.shape[2]
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
                                    in_channels=self.in_channels, image_size=self.image_size,
                                    head=self.cfg.model.head,
                                    hidden=self.cfg.model.head_hidden)
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

    # -- batches (falkit.fl.tensors) ------------------------------------------------------
    def _inputs(self, x_u8: torch.Tensor) -> torch.Tensor:
        return self.images.inputs(x_u8)

    def train_batch(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The training inputs of the train samples `idx`, normalised and augmented (random
        crop / flip from `gen`) on the engine's device: what local SGD feeds the model, for
        strategies that build batches of their own (KAFAL's unlabeled mixup)."""
        return self.images.train_batch(idx, gen)

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.images.augment(x, gen)

    def _epoch_batches(self, idx: torch.Tensor, gen: torch.Generator, limit: int | None,
                       up_front: bool = True):
        """`DeviceImages.epoch_batches` at `fl.batch_size`."""
        return self.images.epoch_batches(idx, gen, self.cfg.fl.batch_size, limit, up_front)

    def _epoch_plan(self, idx: torch.Tensor, gen: torch.Generator, limit: int | None = None):
        """`DeviceImages.epoch_plan` at `fl.batch_size`."""
        return self.images.epoch_plan(idx, gen, self.cfg.fl.batch_size, limit)

    def _batches(self, idx: torch.Tensor, gen: torch.Generator):
        """`falkit.fl.tensors.batches` at `fl.batch_size` (a trailing batch of one sample is
        dropped: BatchNorm)."""
        return batches(idx, gen, self.cfg.fl.batch_size)

    # -- local training: calls of falkit.fl.fit -------------------------------------------
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
        """SGD on the samples `idx` (a fresh optimizer, ALGORITHMS.md §3): `fit` of a group
        of one. Returns the number of steps and the training accuracy of the last epoch.

        A model may add its own term to the loss: `model.extra_loss(logits, targets,
        progress)`, called right after the forward pass (ll4al's loss-prediction module);
        `progress` = (round index r, rounds R) of the FL round this update belongs to, None
        outside FL training. Models without the method train on plain cross-entropy.
        `objective(model, x, logits, y, gen)`, if given, replaces that cross-entropy (KAFAL's
        KCFU: logit-adjusted CE plus distillation on unlabeled mixup). With a `client`, the
        FL algorithm's `extra_loss` and `correct_grads` hooks join the step.

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
            algo = self.algorithm
            loss = training_loss(
                self._autocast, objective=objective, gen=gen, model_loss=model_loss,
                progress=progress,
                extra=None if client is None else (lambda m: algo.extra_loss(m, client)))
            # an objective draws from `gen` inside each step (KAFAL's mixup): then every
            # batch's draws must come just before its step, as they always did
            one = One(model, opt, self.images, self.cfg.fl.batch_size,
                      torch.as_tensor(idx, dtype=torch.int64), gen, ys, loss,
                      after_backward=None if client is None
                      else (lambda m: algo.correct_grads(m, client)),
                      up_front=objective is None)
            steps = fit(one, epochs, end_epoch=AccuracyStop(stop_accuracy, stop_on_eval,
                                                            self._accuracy),
                        max_steps=max_steps, lr_at_epoch=lr_at_epoch, lr_at_step=lr_at_step)
            return steps, one.accuracy

    def _accuracy(self, model: nn.Module, idx: torch.Tensor, labels: torch.Tensor,
                  gen: torch.Generator | None = None) -> float:
        """`falkit.fl.inference.accuracy`: eval-mode accuracy of `model` on the train
        samples `idx`, with `gen` under the training augmentation (the reference's
        early-stop pass); the model is back in train mode afterwards."""
        return inference.accuracy(self, model, idx, labels, gen)

    def sgd_group(self, inits: Sequence[State], idxs: Sequence[np.ndarray],
                  gens: Sequence[torch.Generator], epochs: int, lr: float, *,
                  labels: torch.Tensor | None = None,
                  lr_at_epoch: Callable[[int], float] | None = None,
                  lr_at_step: Callable[[int], float] | None = None,
                  stop_accuracy: float | None = None, stop_on_eval: bool = False,
                  clients: list[Client] | None = None, max_steps: int | None = None
                  ) -> tuple[list[State], list[int], list[float]]:
        """`local_sgd` for G models at once (`fit` of a `falkit.fl.fit.Stack`), each from its
        own `inits[g]` on its own equally large sample set `idxs[g]` with its own generator;
        with `clients`, the FL algorithm's batched hooks (`extra_loss_batched`,
        `correct_grads_batched`) join the step. A model that reaches `stop_accuracy` leaves
        the group at the end of that epoch. Returns each model's state, steps and last
        epoch's accuracy."""
        algo = self.algorithm
        group = Stack(
            self.model, inits, idxs, gens, self.train_y if labels is None
            else labels.to(self.device), lr, momentum=self.cfg.fl.momentum,
            weight_decay=self.cfg.fl.weight_decay, images=self.images,
            batch_size=self.cfg.fl.batch_size, autocast=self._autocast,
            extra=None if clients is None else (
                lambda params, live: algo.extra_loss_batched(params, [clients[g] for g in live])),
            after_backward=None if clients is None else (
                lambda params, live: algo.correct_grads_batched(params,
                                                                [clients[g] for g in live])))
        steps = fit(group, epochs, end_epoch=AccuracyStop(stop_accuracy, stop_on_eval,
                                                          self._accuracy),
                    max_steps=max_steps, lr_at_epoch=lr_at_epoch, lr_at_step=lr_at_step)
        return group.result(steps)

    # -- FL rounds ------------------------------------------------------------------------
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

        def one(model: nn.Module, k: int) -> Client:  # from the client's own view of it
            return self.train_client(model, algo.personal(global_state, k), k, pools[k], lr,
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
            [algo.personal(global_state, k) for k in ks], [pools[k] for k in ks], gens,
            self.cfg.fl.local_epochs,
            lr, clients=clients, max_steps=self.local_steps)
        for client, state, n in zip(clients, states, steps, strict=True):
            client.state, client.steps = state, n
            algo.end_client(self.model, global_state, client)
        return clients

    # -- local models ---------------------------------------------------------------------
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
        indices, key): IFAL's KD local model (ALGORITHMS.md §4 ifal), `fit` of a group of
        one with `distilled_loss` and `PatienceStop`. Fresh init, SGD at `lr` (the FL
        momentum and weight decay) on the job's labeled samples only, both models seeing
        the same augmented batch; stops once the epoch's mean training loss has not
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
            stop = PatienceStop(model, patience, keep)
            with self._dropout_masks(model, gen):  # model.dropout's masks, keyed
                # each batch drawn as it comes (model.dropout draws from `gen` in the step)
                one = One(model, opt, self.images, self.cfg.fl.batch_size,
                          torch.as_tensor(idx, dtype=torch.int64), gen, labels,
                          distilled_loss(self._autocast, frozen, temperature, ce_weight),
                          up_front=False)
                fit(one, epochs, end_epoch=stop)
                return stop.weights(), stop.losses

        return self.map(train, list(range(len(jobs))))

    # -- inference (falkit.fl.inference) --------------------------------------------------
    def _map_batches(self, state: State, idx: torch.Tensor, x_all: torch.Tensor,
                     head: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, ...]]
                     ) -> list[tuple[torch.Tensor, ...]]:
        return inference.map_batches(self, state, idx, x_all, head)

    def predict(self, state: State, idx: np.ndarray | None = None, split: str = "train"
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax probabilities and penultimate features (float32, on CPU) for the samples
        `idx` of a split, in batches of `runtime.eval_batch`, without augmentation."""
        return inference.predict(self, state, idx, split)

    def predict_loss(self, state: State, idx: np.ndarray) -> torch.Tensor:
        """The model's predicted loss (ll4al's loss-prediction module; float32, on CPU) for
        the train samples `idx`, batched like `predict`, without augmentation."""
        return inference.predict_loss(self, state, idx)

    def evaluate(self, state: State) -> Evaluation:
        """Accuracy, per-class accuracy and AUC of a model on the full test set."""
        return inference.evaluate(self, state)


def _equal_pools(ids: list[int], pools: Sequence[np.ndarray]) -> list[list[int]]:
    """`ids` grouped by the size of their pool (first-seen order): equally large pools have
    the same mini-batch shapes, so their SGD runs in lockstep."""
    groups: dict[int, list[int]] = {}
    for k in ids:
        groups.setdefault(len(pools[k]), []).append(k)
    return list(groups.values())
