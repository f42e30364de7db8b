"""The loss-prediction module of Learning Loss for Active Learning (LL4AL; Yoo & Kweon,
CVPR 2019) and the wrapper that attaches it to any backbone (ALGORITHMS.md §4 **ll4al**).

* `LossNet` — per block output: global average pool → Linear(channels → 128) → ReLU; the
  per-block vectors are concatenated → Linear(→ 1) = the predicted loss (paper Fig. 2 / §3.2).
* `loss_pred_loss` — the margin ranking loss on pairs of a mini-batch (paper Eq. 2–3).
* `WithLossModule(backbone)` — behaves like the backbone (`forward(x) -> (logits, features)`,
  `feature_dim`, `classifier`, the backbone's state-dict keys unchanged) and adds the module's
  parameters under `loss_net.*`, so that they are trained with the backbone and federated like
  every other state entry. It offers the engine's generic model hook
  `extra_loss(logits, targets, progress)` and the query-time `predicted_loss(x)`.

References: Yoo & Kweon, "Learning Loss for Active Learning", CVPR 2019 (arXiv:1905.03677);
the widely used public re-implementation Mephisto405/Learning-Loss-for-Active-Learning
(`LossPredLoss` in main.py, `LossNet` in models/lossnet.py) — re-implemented here, not copied.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LossNet", "WithLossModule", "loss_pred_loss"]


def loss_pred_loss(pred: Tensor, target: Tensor, margin: float = 1.0) -> Tensor:
    """Margin ranking loss between predicted and true per-sample losses (LL4AL Eq. 2–3).

    Pairs are formed as in the reference `LossPredLoss`: sample i is compared with sample
    B−1−i (the batch against its flip), for i < B // 2, so each sample is in one pair;
    with an odd B the middle sample (paired with itself) is left out — the reference asserted
    an even B. For a pair (i, j):
        L = max(0, −1(l_i, l_j) · (l̂_i − l̂_j) + ξ),  1(l_i, l_j) = +1 if l_i > l_j else −1
    (paper Eq. 2; `2·sign(clamp(l_i − l_j, min=0)) − 1` in the reference, so a tie counts as
    −1), averaged over the B // 2 pairs (paper Eq. 3). The true losses `target` are
    constants (detached), so the term trains only through `pred`.
    """
    half = len(pred) // 2
    if half == 0:
        return pred.sum() * 0.0  # no pair: a zero that keeps the graph
    # [l̂_0 − l̂_{B−1}, l̂_1 − l̂_{B−2}, ...]  (reference LossPredLoss)
    d_pred = (pred - pred.flip(0))[:half]
    d_true = (target - target.flip(0))[:half].detach()
    sign = 2.0 * torch.sign(torch.clamp(d_true, min=0)) - 1.0  # paper Eq. 2: 1(l_i, l_j)
    return torch.clamp(margin - sign * d_pred, min=0).sum() / half  # Eq. 2, mean over pairs (Eq. 3)


def _global_average_pool(x: Tensor) -> Tensor:
    """N×C×H×W → N×C (LL4AL Fig. 2's GAP; the reference's AvgPool2d(feature size) is the same
    for its square maps); an N×D input (the `linear` backbone's embedding) passes through."""
    return x.mean(dim=(2, 3)) if x.dim() == 4 else torch.flatten(x, 1)


class LossNet(nn.Module):
    """LL4AL's loss-prediction module (Yoo & Kweon 2019, §3.2 and Fig. 2): for every tapped
    block, GAP → FC(channels → `hidden`) → ReLU; concatenate; FC(→ 1). `hidden` = 128 as in
    the paper. `forward(blocks)` returns the predicted loss, shape (N,)."""

    def __init__(self, channels: Sequence[int], hidden: int = 128) -> None:
        super().__init__()
        if not channels:
            raise ValueError("LossNet needs at least one block")
        self.fcs = nn.ModuleList(nn.Linear(int(c), hidden) for c in channels)
        self.linear = nn.Linear(hidden * len(channels), 1)

    def forward(self, blocks: Sequence[Tensor]) -> Tensor:
        if len(blocks) != len(self.fcs):
            raise ValueError(f"LossNet expects {len(self.fcs)} block outputs, got {len(blocks)}")
        # per block: GAP → Linear(· → 128) → ReLU (paper Fig. 2)
        parts = [F.relu(fc(_global_average_pool(b))) for fc, b in zip(self.fcs, blocks,
                                                                      strict=True)]
        return self.linear(torch.cat(parts, 1)).view(-1)  # concatenated → Linear(→ 1)


class WithLossModule(nn.Module):
    """A backbone plus LL4AL's loss-prediction module, trained jointly (Yoo & Kweon 2019, Eq. 4):

        loss = CE + λ · L_loss(l̂, l),   L_loss = `loss_pred_loss` with margin ξ.

    The backbone's submodules become this module's submodules under their own names, so the
    state dict holds exactly the backbone's keys plus `loss_net.*` (checkpoints, `head()`,
    aggregation and communication accounting all see one flat state). Forward hooks on the
    backbone's `block_taps()` keep the block outputs of the last forward pass (only in
    training mode or inside `predicted_loss`), so the classification forward is the
    backbone's own, unchanged.

    Stop-gradient: from FL round r ≥ `detach_from` · R of a cycle on, the block outputs are
    detached before the module reads them, so its gradient no longer reaches the backbone
    (ALGORITHMS.md §4 ll4al: the last quarter of rounds; LL4AL §4.1 stops it after 120 of
    200 epochs). The module itself keeps learning.
    """

    def __init__(self, backbone: nn.Module, hidden: int = 128, margin: float = 1.0,
                 weight: float = 1.0, detach_from: float = 0.75) -> None:
        super().__init__()
        taps = backbone.block_taps()  # ConfigError for a backbone without blocks
        for name, child in backbone.named_children():  # same names: same state-dict keys
            self.add_module(name, child)
        if any(True for _ in backbone.named_parameters(recurse=False)) or any(
                True for _ in backbone.named_buffers(recurse=False)):
            raise ValueError("WithLossModule needs a backbone whose state lives in submodules")
        object.__setattr__(self, "_backbone", backbone)  # not registered: its children are ours
        self.feature_dim = backbone.feature_dim
        self.margin = float(margin)  # ξ = 1.0 (LL4AL §4.1)
        self.weight = float(weight)  # λ = 1 (LL4AL §4.1)
        self.detach_from = float(detach_from)
        self.loss_net = LossNet([c for _, c in taps], hidden)
        self._blocks: dict[int, Tensor] = {}
        self._capture = False
        for i, (module, _) in enumerate(taps):
            module.register_forward_hook(self._keeper(i))

    def _keeper(self, i: int):
        def keep(module: nn.Module, args: object, out: Tensor) -> None:
            if self.training or self._capture:
                self._blocks[i] = out
        return keep

    def train(self, mode: bool = True) -> WithLossModule:
        super().train(mode)
        self._backbone.train(mode)  # its submodules are ours; keep its own flag in step
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._blocks = {}
        return self._backbone(x)

    def _take_blocks(self) -> list[Tensor]:
        blocks = [self._blocks[i] for i in range(len(self.loss_net.fcs))]
        self._blocks = {}
        return blocks

    def stops_gradient(self, progress: tuple[int, int] | None) -> bool:
        """True in FL round r (0-based) of R when r + 1 > int(detach_from · R): the rounds
        whose learning rate is decayed (loop.py, FairFAL's r > int(0.75 R)), e.g. rounds
        75–99 of 100, the last of 3 or 4. Outside FL training (`progress` None) the gradient
        flows."""
        if progress is None:
            return False
        r, rounds = progress
        return r + 1 > int(self.detach_from * rounds)

    def extra_loss(self, logits: Tensor, targets: Tensor,
                   progress: tuple[int, int] | None = None) -> Tensor:
        """λ · L_loss for the batch of the last forward pass (the engine adds it to its CE;
        LL4AL Eq. 4). The true losses are the per-sample CE of `logits`, detached."""
        blocks = self._take_blocks()
        if self.stops_gradient(progress):
            blocks = [b.detach() for b in blocks]  # stop the module's gradient into the backbone
        pred = self.loss_net(blocks).float()
        true = F.cross_entropy(logits.float(), targets, reduction="none").detach()
        return self.weight * loss_pred_loss(pred, true, self.margin)  # λ · L_loss (Eq. 4)

    def predicted_loss(self, x: Tensor) -> Tensor:
        """The module's predicted loss l̂(x), shape (N,), for a batch (query time: the model
        in eval mode, LL4AL §3.1 ranks the unlabeled pool by it)."""
        self._capture = True
        try:
            self._backbone(x)
        finally:
            self._capture = False
        return self.loss_net(self._take_blocks())
