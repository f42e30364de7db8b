"""The engine's images as device tensors: normalisation, augmentation and mini-batches
(DESIGN.md §7).

The images of a split stay one uint8 tensor on the engine's device; a batch is gathered by
index, normalised (one multiply-add) and augmented (random crop / flip) as a tensor op;
nothing goes through a DataLoader. Every random draw comes from the generator the caller
hands in, on the CPU, in a fixed order (`draw_augment`, `epoch_plan`), so that a training
reproduces on any device and transport.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Draws = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


@dataclass
class ImageTensors:
    """Images (uint8 N×C×H×W) and labels of one split, plus how to normalise and augment."""

    x: torch.Tensor
    y: torch.Tensor  # int64
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = False
    crop_pad: int = 0


def batches(idx: torch.Tensor, gen: torch.Generator, batch_size: int) -> Iterator[torch.Tensor]:
    """Shuffled mini-batches of one epoch. A trailing batch of one sample is dropped:
    BatchNorm cannot normalise one sample on a 1×1 feature map, which some backbones
    reach at small image sizes (the FairFAL code's CNN-4, whose smallest map is 3×3 /
    4×4, trains on it; no FMNIST-LT protocol budget makes one: docs/guide/running.md "Fidelity")."""
    perm = idx[torch.randperm(len(idx), generator=gen)]
    for b in range(0, len(perm), batch_size):
        bi = perm[b:b + batch_size]
        if len(bi) > 1:
            yield bi


class DeviceImages:
    """The train and test images and labels on `device`, and how a training batch is made
    of them: normalised, then augmented (the train split's crop padding and flips)."""

    def __init__(self, train: ImageTensors, test: ImageTensors, device: torch.device,
                 memory_format: torch.memory_format):
        self.device = device
        self.train_x = train.x.to(device)
        self.train_y = train.y.to(device)
        self.test_x = test.x.to(device)
        self.test_y = test.y.to(device)
        c = train.x.shape[1]
        # normalisation folded into one multiply-add: (x/255 - mean)/std
        std = torch.tensor(train.std, dtype=torch.float32, device=device).view(1, c, 1, 1)
        mean = torch.tensor(train.mean, dtype=torch.float32, device=device).view(1, c, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -mean / std
        self.hflip = train.hflip
        self.crop_pad = train.crop_pad
        self.memory_format = memory_format

    def inputs(self, x_u8: torch.Tensor) -> torch.Tensor:
        """uint8 images, normalised (no augmentation)."""
        x = x_u8.to(torch.float32) * self.scale + self.shift
        return x.contiguous(memory_format=self.memory_format)

    def train_batch(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The training inputs of the train samples `idx`, normalised and augmented (random
        crop / flip from `gen`) on the device: what local SGD feeds the model, for
        strategies that build batches of their own (KAFAL's unlabeled mixup)."""
        return self.augment(self.inputs(self.train_x[idx.to(self.device)]), gen)

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.apply_augment(x, *self.draw_augment(gen, x.shape[0]))

    def draw_augment(self, gen: torch.Generator, n: int) -> Draws:
        """The random draws of augmenting n images, on the CPU from `gen`, in this order:
        crop offsets dy, dx (when cropping), then flips (when flipping)."""
        dy = dx = flip = None
        if self.crop_pad:
            dy = torch.randint(0, 2 * self.crop_pad + 1, (n,), generator=gen)
            dx = torch.randint(0, 2 * self.crop_pad + 1, (n,), generator=gen)
        if self.hflip:
            flip = torch.rand(n, generator=gen) < 0.5
        return dy, dx, flip

    def apply_augment(self, x: torch.Tensor, dy: torch.Tensor | None,
                      dx: torch.Tensor | None, flip: torch.Tensor | None) -> torch.Tensor:
        """Random crop (pad, then the window at dy, dx) and flip of a batch, with the draws of
        `draw_augment` (moved to the batch's device here, if they are not there already)."""
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

    def epoch_batches(self, idx: torch.Tensor, gen: torch.Generator, batch_size: int,
                      limit: int | None, up_front: bool = True
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(indices on the device, augmented inputs) of each mini-batch of one epoch, at most
        `limit`. `up_front`: the epoch's draws are made first and copied to the device once
        (`epoch_plan`); else each batch's draws are made as it comes. Same draws, same
        order within `gen`, either way."""
        if up_front:
            spans, flat, draws = self.epoch_plan(idx, gen, batch_size, limit)
            for a, b in spans:
                bi_d = flat[a:b]
                yield bi_d, self.apply_augment(self.inputs(self.train_x[bi_d]), *(
                    None if d is None else d[a:b] for d in draws))
            return
        for n, bi in enumerate(batches(idx, gen, batch_size)):
            if limit is not None and n >= limit:
                break
            bi_d = bi.to(self.device)
            yield bi_d, self.train_batch(bi_d, gen)

    def epoch_plan(self, idx: torch.Tensor, gen: torch.Generator, batch_size: int,
                   limit: int | None = None
                   ) -> tuple[list[tuple[int, int]], torch.Tensor, list[torch.Tensor | None]]:
        """One epoch of local SGD drawn up front: the mini-batches of `batches` (at most
        `limit`) and each batch's augmentation draws, from `gen` in the order a step-by-step
        loop draws them (the permutation, then each batch's crop offsets and flips), then
        moved to the device in one copy each, so that the steps need no host sync. Returns
        the batches' (start, end) in the flat order, the flat sample indices and the flat
        draws (dy, dx, flip; None where unused), all on the device."""
        spans: list[tuple[int, int]] = []
        parts: list[torch.Tensor] = []
        draws: list[list[torch.Tensor]] = [[], [], []]
        pos = 0
        for bi in batches(idx, gen, batch_size):
            if limit is not None and len(spans) >= limit:
                break
            for acc, d in zip(draws, self.draw_augment(gen, len(bi)), strict=True):
                if d is not None:
                    acc.append(d)
            parts.append(bi)
            spans.append((pos, pos + len(bi)))
            pos += len(bi)
        flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        return (spans, flat.to(self.device),
                [torch.cat(d).to(self.device) if d else None for d in draws])
