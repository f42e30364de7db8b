"""The way the FairFAL reference code runs a FAL cycle, kept only as a speed baseline.

Same model, same arithmetic as falkit, organised as the reference organises it:
* a per-sample `torch.utils.data.Dataset` whose `__getitem__` turns one stored array into a
  PIL image, flips it (training), converts and normalises it (the reference's torchvision
  transforms, re-created with PIL), read through a `DataLoader` (batch 64, shuffle,
  `num_workers=0`) per client;
* a `copy.deepcopy` of the global model for every client in every round, a fresh optimizer;
* FedAvg over the clients' state dicts (labeled-count weights);
* the test set evaluated through a DataLoader after every round;
* every query-time forward pass at batch size 1 (the reference's query loaders), and the
  `scratch` local models trained through DataLoaders as well.

Selections are made by falkit's own strategy code on these outputs, so a query differs from
falkit's only in how the forward passes are run (`benchmarks/bench.py` checks the picks).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from falkit.fl.algorithms import State
from falkit.fl.engine import Engine
from falkit.metrics import evaluation
from falkit.seeding import torch_seed


class PerSampleImages(Dataset):
    """One image per `__getitem__`, the reference's torchvision pipeline re-created with PIL
    (torchvision does not import beside this torch): `Image.fromarray` of the stored uint8
    array, `RandomHorizontalFlip` (training, `torch.rand(1) < 0.5`), `ToTensor` (÷ 255) and
    `Normalize` ((x − mean) / std): torchvision's arithmetic, equal to falkit's folded
    multiply-add up to float32 rounding (`tests/test_bench_reference.py`)."""

    def __init__(self, data: np.ndarray, y: torch.Tensor, idx: np.ndarray,
                 mean: tuple[float, ...], std: tuple[float, ...], train: bool, hflip: bool):
        self.data, self.y, self.idx = data, y, np.asarray(idx)
        c = 1 if data.ndim == 3 else data.shape[3]
        self.mean = torch.tensor(mean).view(c, 1, 1)
        self.std = torch.tensor(std).view(c, 1, 1)
        self.train, self.hflip = train, hflip

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = int(self.idx[i])
        img = Image.fromarray(self.data[j])  # mode L (grey) or RGB
        if self.train and self.hflip and torch.rand(1) < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = torch.from_numpy(np.array(img, np.uint8, copy=True))
        t = (arr.view(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1).contiguous()
             .to(torch.float32).div(255))  # ToTensor
        return t.sub_(self.mean).div_(self.std), self.y[j]  # Normalize


class ReferenceStyle:
    """FL training, evaluation and query-time inference the reference's way."""

    def __init__(self, x_train: torch.Tensor,
                 y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                 mean: tuple[float, ...], std: tuple[float, ...], hflip: bool,
                 batch_size: int = 64, lr: float = 0.01, momentum: float = 0.9,
                 weight_decay: float = 1e-5):
        self.y_train, self.y_test = y_train, y_test
        # stored as the reference stores images: N × H × W (grey) or N × H × W × C uint8
        self.arrays = {split: (x[:, 0] if x.shape[1] == 1 else x.permute(0, 2, 3, 1))
                       .contiguous().numpy() for split, x in (("train", x_train), ("test", x_test))}
        self.mean, self.std, self.hflip = mean, std, hflip
        self.bs, self.lr, self.momentum, self.wd = batch_size, lr, momentum, weight_decay

    def _loader(self, idx: np.ndarray, train: bool, batch_size: int, test: bool = False):
        data, y = ((self.arrays["test"], self.y_test) if test
                   else (self.arrays["train"], self.y_train))
        ds = PerSampleImages(data, y, idx, self.mean, self.std, train, self.hflip)
        return DataLoader(ds, batch_size=batch_size, shuffle=train, num_workers=0,
                          drop_last=False)

    def _local_train(self, model: nn.Module, idx: np.ndarray, epochs: int, lr: float,
                     stop_accuracy: float | None = None,
                     lr_at_epoch: Callable[[int], float] | None = None) -> None:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=self.momentum,
                              weight_decay=self.wd)
        for epoch in range(epochs):
            if lr_at_epoch is not None:
                for g in opt.param_groups:
                    g["lr"] = lr_at_epoch(epoch)
            correct = seen = 0
            for xb, yb in self._loader(idx, True, self.bs):
                if len(yb) < 2:  # BatchNorm cannot take one sample (falkit drops it too)
                    continue
                logits, _ = model(xb)
                loss = F.cross_entropy(logits, yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                correct += int((logits.argmax(1) == yb).sum())
                seen += len(yb)
            if stop_accuracy is not None and correct / max(seen, 1) >= stop_accuracy:
                break

    def fl_round(self, global_model: nn.Module, pools: list[np.ndarray], epochs: int,
                 lr: float) -> nn.Module:
        """Every client trains a deep copy of the global model; FedAvg of the state dicts."""
        states, weights = [], []
        for idx in pools:
            if len(idx) == 0:
                continue
            local = copy.deepcopy(global_model)
            self._local_train(local, idx, epochs, lr)
            states.append(local.state_dict())
            weights.append(float(len(idx)))
        total = sum(weights)
        avg = {}
        for name, ref in global_model.state_dict().items():
            if ref.is_floating_point():
                avg[name] = sum(w / total * s[name] for s, w in zip(states, weights, strict=True))
            else:
                avg[name] = states[0][name].clone()
        new = copy.deepcopy(global_model)
        new.load_state_dict(avg)
        return new

    @torch.no_grad()
    def infer_batch1(self, model: nn.Module, idx: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Softmax and features, one sample per forward pass (the reference's query loaders)."""
        model.eval()
        probs, feats = [], []
        for xb, _ in self._loader(idx, False, 1):
            logits, f = model(xb)
            probs.append(torch.softmax(logits, 1))
            feats.append(f)
        if not probs:
            return torch.zeros(0), torch.zeros(0)
        return torch.cat(probs), torch.cat(feats)



class ReferenceEngine(Engine):
    """falkit's loop driving `ReferenceStyle`: `loop.run(cfg, engine_class=ReferenceEngine)`
    runs the same protocol (same inits, labels, strategies, metrics and phase timers) with
    training, evaluation and query-time inference done the reference's way."""

    def __init__(self, cfg, train, test, num_classes: int, num_clients: int = 1, **kwargs):
        super().__init__(cfg, train, test, num_classes, num_clients, **kwargs)
        fl = cfg.fl
        self.ref = ReferenceStyle(train.x, train.y, test.x, test.y, train.mean, train.std,
                                  train.hflip, fl.batch_size, fl.lr, fl.momentum,
                                  fl.weight_decay)

    @staticmethod
    def _plain(model: nn.Module) -> nn.Module:
        return model.to(memory_format=torch.contiguous_format)  # the reference's default

    def _model(self, state: State) -> nn.Module:
        model = self._plain(self.new_model(0))
        model.load_state_dict(state)
        return model

    def fl_round(self, global_state, clients, pools, lr, seed, key, keep_states=False):
        new = self.ref.fl_round(self._model(global_state), [pools[k] for k in clients],
                                self.cfg.fl.local_epochs, lr)
        return {n: v.detach().clone() for n, v in new.state_dict().items()}, {}

    def evaluate(self, state):
        model = self._model(state)
        model.eval()
        probs = []
        with torch.no_grad():
            for xb, _ in self.ref._loader(np.arange(len(self.ref.y_test)), False, self.ref.bs,
                                          test=True):
                probs.append(torch.softmax(model(xb)[0].float(), 1))
        # the same metrics as falkit's engine (accuracy, per class, AUC), so both time alike
        return evaluation(np.asarray(self.ref.y_test), torch.cat(probs).numpy(),
                          self.num_classes)

    def predict(self, state, idx=None, split="train"):
        assert split == "train"
        idx = np.arange(len(self.ref.y_train)) if idx is None else np.asarray(idx)
        return self.ref.infer_batch1(self._model(state), idx)

    def train_scratch(self, jobs, labels, seed):
        lm = self.cfg.local_model
        out = []
        for idx, key in jobs:
            model = self._plain(self.new_model(torch_seed(seed, "local_init", *key)))
            self.ref._local_train(model, idx, lm.epochs, lm.lr, lm.stop_accuracy,
                                  lambda e: lm.lr * (0.1 if e >= lm.decay_epoch else 1.0))
            out.append({n: v.detach().clone() for n, v in model.state_dict().items()})
        return out
