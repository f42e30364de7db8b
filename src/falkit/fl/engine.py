"""The training engine: local SGD for every client, aggregation, evaluation and batched
inference, on in-memory tensors (DESIGN.md §7).

One working model is reused for every client (its weights are overwritten from the global
state), the images stay one uint8 tensor, a batch is gathered by index, normalised and
augmented as a tensor op; nothing goes through a DataLoader.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from falkit.config import Config
from falkit.fl.algorithms import Aggregator, State, clone_state
from falkit.fl.algorithms import create as create_algorithm
from falkit.models.backbones import create as create_backbone
from falkit.seeding import torch_generator, torch_seed


@dataclass
class ImageTensors:
    """Images (uint8 N×C×H×W) and labels of one split, plus how to normalise and augment."""

    x: torch.Tensor
    y: torch.Tensor  # int64
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = False
    crop_pad: int = 0


class Engine:
    """Trains, aggregates, evaluates and runs inference for one experiment."""

    def __init__(self, cfg: Config, train: ImageTensors, test: ImageTensors, num_classes: int):
        self.cfg = cfg
        self.device = torch.device(cfg.runtime.device)
        if cfg.runtime.threads > 0:
            torch.set_num_threads(cfg.runtime.threads)
        self.num_classes = num_classes
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
        self.memory_format = (torch.channels_last if cfg.runtime.channels_last
                              else torch.contiguous_format)
        self.in_channels, self.image_size = c, train.x.shape[2]
        self.algorithm = create_algorithm(cfg.fl.algorithm)
        self.model = self.new_model(init_seed=0)  # the working model, reused for every client

    # -- models ---------------------------------------------------------------------------
    def new_model(self, init_seed: int) -> nn.Module:
        """A freshly initialised backbone; init draws from its own seeded torch RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = create_backbone(self.cfg.model.backbone, num_classes=self.num_classes,
                                    in_channels=self.in_channels, image_size=self.image_size)
        return model.to(self.device, memory_format=self.memory_format)

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

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        if self.crop_pad:
            p = self.crop_pad
            padded = F.pad(x, (p, p, p, p))
            h, w = x.shape[2], x.shape[3]
            dy = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(x.device)
            rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
            cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
            idx_n = torch.arange(n, device=x.device).view(n, 1, 1, 1)
            idx_c = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
            x = padded[idx_n, idx_c, rows, cols]
        if self.hflip:
            flip = (torch.rand(n, generator=gen) < 0.5).to(x.device).view(n, 1, 1, 1)
            x = torch.where(flip, x.flip(3), x)
        return x.contiguous(memory_format=self.memory_format)

    def _batches(self, idx: torch.Tensor, gen: torch.Generator):
        """Shuffled mini-batches of one epoch. A trailing batch of one sample is dropped:
        BatchNorm cannot normalise a single 1×1 feature map (the reference crashed there)."""
        perm = idx[torch.randperm(len(idx), generator=gen)]
        bs = self.cfg.fl.batch_size
        for b in range(0, len(perm), bs):
            bi = perm[b:b + bs]
            if len(bi) > 1:
                yield bi

    # -- local training -------------------------------------------------------------------
    def local_sgd(self, model: nn.Module, idx: np.ndarray, epochs: int, lr: float,
                  gen: torch.Generator, labels: torch.Tensor | None = None,
                  lr_at_epoch: Callable[[int], float] | None = None,
                  stop_accuracy: float | None = None) -> tuple[int, float]:
        """SGD on the samples `idx` (a fresh optimizer, ALGORITHMS.md §3). Returns the number
        of steps and the training accuracy of the last epoch."""
        cfg = self.cfg.fl
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        ys = self.train_y if labels is None else labels
        idx_t = torch.as_tensor(idx, dtype=torch.int64)
        steps, acc = 0, 0.0
        for epoch in range(epochs):
            if lr_at_epoch is not None:
                for group in opt.param_groups:
                    group["lr"] = lr_at_epoch(epoch)
            correct = seen = 0
            for bi in self._batches(idx_t, gen):
                bi_d = bi.to(self.device)
                xb = self._augment(self._inputs(self.train_x[bi_d]), gen)
                yb = ys[bi_d]
                with self._autocast():
                    logits, _ = model(xb)
                    loss = F.cross_entropy(logits.float(), yb)
                extra = self.algorithm.extra_loss(model)
                if extra is not None:
                    loss = loss + extra
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                correct += int((logits.argmax(1) == yb).sum())
                seen += len(bi)
            acc = correct / max(seen, 1)
            if stop_accuracy is not None and acc >= stop_accuracy:
                break
        return steps, acc

    def fl_round(self, global_state: State, clients: list[int], pools: list[np.ndarray],
                 lr: float, seed: int, key: tuple[object, ...],
                 keep_states: bool = False) -> tuple[State, dict[int, State]]:
        """One FL round: every participating client trains from the global weights, the
        server averages with labeled-count weights. Returns the new global state and, when
        asked, each client's final local state (the `last_round` local model)."""
        agg = Aggregator(global_state)
        kept: dict[int, State] = {}
        for k in clients:
            if len(pools[k]) == 0:
                continue
            self.model.load_state_dict(global_state)
            self.algorithm.begin_client(self.model, global_state, k)
            gen = torch_generator(seed, "train", *key, k)
            self.local_sgd(self.model, pools[k], self.cfg.fl.local_epochs, lr, gen)
            state = self.model.state_dict()
            agg.add(state, float(len(pools[k])))
            if keep_states:
                kept[k] = {n: v.detach().clone() for n, v in state.items()}
        return self.algorithm.aggregate(global_state, agg), kept

    def train_scratch(self, idx: np.ndarray, labels: torch.Tensor, seed: int,
                      key: tuple[object, ...]) -> State:
        """The `scratch` local model: fresh init, trained only on the client's labels,
        lr x 0.1 from `decay_epoch` (per epoch — the reference stepped per batch, a bug),
        early stop at `stop_accuracy` training accuracy (ALGORITHMS.md §3)."""
        lm = self.cfg.local_model
        model = self.new_model(torch_seed(seed, "local_init", *key))
        gen = torch_generator(seed, "local_train", *key)

        def lr_at(epoch: int) -> float:
            return lm.lr * (0.1 if epoch >= lm.decay_epoch else 1.0)

        self.local_sgd(model, idx, lm.epochs, lm.lr, gen, labels=labels, lr_at_epoch=lr_at,
                       stop_accuracy=lm.stop_accuracy)
        return clone_state(model)

    # -- inference ------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, state: State, idx: np.ndarray | None = None, split: str = "train"
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax probabilities and penultimate features (float32, on CPU) for the samples
        `idx` of a split, in batches of `runtime.eval_batch`, without augmentation."""
        self.model.load_state_dict(state)
        self.model.eval()
        x_all = self.train_x if split == "train" else self.test_x
        n = len(x_all) if idx is None else len(idx)
        idx_t = None if idx is None else torch.as_tensor(idx, dtype=torch.int64)
        probs, feats = [], []
        bs = self.cfg.runtime.eval_batch
        for b in range(0, n, bs):
            sel = slice(b, b + bs) if idx_t is None else idx_t[b:b + bs].to(self.device)
            with self._autocast():
                logits, f = self.model(self._inputs(x_all[sel]))
            probs.append(torch.softmax(logits.float(), 1).cpu())
            feats.append(f.float().cpu())
        if not probs:
            d = getattr(self.model, "feature_dim", 0)
            return torch.zeros(0, self.num_classes), torch.zeros(0, d)
        return torch.cat(probs), torch.cat(feats)

    @torch.inference_mode()
    def evaluate(self, state: State) -> tuple[float, np.ndarray]:
        """Accuracy and per-class accuracy of a model on the full test set."""
        probs, _ = self.predict(state, split="test")
        pred = probs.argmax(1)
        y = self.test_y.cpu()
        correct = (pred == y).to(torch.float64)
        per_class = np.array([float(correct[y == c].mean()) if (y == c).any() else np.nan
                              for c in range(self.num_classes)])
        return float(correct.mean()), per_class
