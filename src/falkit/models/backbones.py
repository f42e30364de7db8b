"""Backbone networks used by the federated active learning papers falkit reproduces.

Every backbone is an `nn.Module` with the same contract:

* constructor `(num_classes, in_channels, image_size)`;
* `forward(x) -> (logits N×C, features N×D)`, where `features` are the penultimate activations;
* `feature_dim: int` (D) and `classifier: nn.Linear` (the last layer, D → C), so that
  `classifier(features) == logits` and last-layer gradient embeddings (BADGE, ...) need no
  second forward pass;
* `block_taps() -> [(module, channels)]`: the submodules whose outputs are the network's
  block outputs, in forward order, with their channel counts. Nothing reads them in a plain
  forward pass; the LL4AL loss-prediction module (`falkit.models.lossnet`) hooks them.

The ResNets and MobileNet end in adaptive average pooling, so they accept 28, 32 and 64 px
inputs with 1 or 3 channels. All accept `channels_last` inputs and run under
`torch.autocast("cpu", dtype=torch.bfloat16)`; features are returned as computed (no cast).

Registry (timm style): `BACKBONES`, `create(name, ...)`, `describe()`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from falkit.errors import ConfigError

__all__ = [
    "BACKBONES",
    "Backbone",
    "CNN4",
    "LinearHead",
    "MobileNetCifar",
    "PreActResNet8",
    "ResNet8W64",
    "ResNet18",
    "ResNetCifar",
    "create",
    "describe",
]


class Backbone(nn.Module):
    """Base class: subclasses set `classifier`, `feature_dim` and implement `embed`.

    `dropout` (`model.dropout`, set by the engine; 0 = none) drops each penultimate feature
    with that probability before the classifier while training (inverted dropout: the kept
    ones scaled by 1/(1 − p)); its masks come from `dropout_generator` when one is set (the
    engine sets the local update's keyed generator, so runs reproduce), else from torch's
    global RNG. Evaluation never drops; MC-dropout strategies sample the same masks on the
    features themselves (`falkit.client.mc_dropout_probs`)."""

    classifier: nn.Linear
    feature_dim: int
    dropout: float = 0.0
    dropout_generator: torch.Generator | None = None

    def embed(self, x: Tensor) -> Tensor:
        """Penultimate features, N×D."""
        raise NotImplementedError

    def block_taps(self) -> list[tuple[nn.Module, int]]:
        """(module, output channels) of every block whose output a loss-prediction module
        reads (LL4AL, Yoo & Kweon 2019, Fig. 2: one tap per block), in forward order."""
        raise ConfigError(f"backbone {type(self).__name__} exposes no block outputs")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.embed(x)
        if self.training and self.dropout > 0:  # model.dropout, on the classifier's input
            keep = 1.0 - self.dropout
            mask = torch.empty(features.shape, dtype=features.dtype).bernoulli_(
                keep, generator=self.dropout_generator).to(features.device)
            return self.classifier(features * mask / keep), features
        return self.classifier(features), features


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if int(value) < 1:
            raise ConfigError(f"backbone {key} must be a positive integer, got {value!r}")


# ---------------------------------------------------------------------------------------------
# 4-layer CNN
# ---------------------------------------------------------------------------------------------


class CNN4(Backbone):
    """The "4-layer CNN" of FairFAL, LoGo (Kim et al., CVPR 2023) and FAST: the Conv-4 of
    Vinyals et al. (NeurIPS 2016), 4 × [Conv3×3(64, bias) → BN → ReLU → MaxPool2d(2)].

    feature_dim = 64·s², s = image_size halved (floor) four times: 64 at 28 px, 256 at 32 px,
    1024 at 64 px. The classifier bias starts at zero; everything else uses PyTorch defaults.
    """

    width = 64

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ConfigError(f"cnn4 needs image_size >= 16 (four 2× max-pools), got {image_size}")
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(4):
            layers += [
                nn.Conv2d(channels, self.width, kernel_size=3, padding=1, bias=True),
                nn.BatchNorm2d(self.width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = self.width
        self.features = nn.Sequential(*layers)
        self.feature_dim = self.width * side * side
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        nn.init.zeros_(self.classifier.bias)

    def embed(self, x: Tensor) -> Tensor:
        return torch.flatten(self.features(x), 1)

    def block_taps(self) -> list[tuple[nn.Module, int]]:
        # each conv block ends in its max-pool (index 3 of every 4 layers)
        return [(self.features[4 * i + 3], self.width) for i in range(4)]


# ---------------------------------------------------------------------------------------------
# ResNets
# ---------------------------------------------------------------------------------------------


def _conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al., ECCV 2016): (BN → ReLU → conv3×3) × 2, with a
    1×1 conv shortcut on the pre-activated input when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet8(Backbone):
    """KAFAL's "ResNet-8" (Cao et al., ICCV 2023): a narrow pre-activation ResNet
    (He et al., ECCV 2016). conv3×3(→16), one PreActBlock per stage with widths 16/32/64 and
    strides 1/2/2, BN → ReLU → global average pool → Linear(64 → C).

    77,850 parameters for 10 classes and 3 input channels (77,562 at 1 channel).
    """

    widths = (16, 32, 64)

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
        self.conv1 = _conv3x3(in_channels, self.widths[0])
        blocks = []
        in_planes = self.widths[0]
        for planes, stride in zip(self.widths, (1, 2, 2), strict=True):
            blocks.append(PreActBlock(in_planes, planes, stride))
            in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_planes
        self.classifier = nn.Linear(in_planes, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        out = self.layers(self.conv1(x))
        out = self.pool(self.relu(self.bn(out)))
        return torch.flatten(out, 1)

    def block_taps(self) -> list[tuple[nn.Module, int]]:
        return [(block, planes) for block, planes in zip(self.layers, self.widths, strict=True)]


class BasicBlock(nn.Module):
    """Post-activation basic block (He et al., CVPR 2016), kuangliu/pytorch-cifar style:
    conv3×3 → BN → ReLU → conv3×3 → BN, + shortcut (1×1 conv + BN when the shape changes),
    → ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCifar(Backbone):
    """CIFAR ResNet (He et al., CVPR 2016; kuangliu/pytorch-cifar): 3×3 stride-1 stem conv
    → BN → ReLU (no max-pool), four stages of BasicBlocks with widths 64/128/256/512 and
    strides 1/2/2/2, global average pool, Linear(512 → C)."""

    widths = (64, 128, 256, 512)

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        num_blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
    ) -> None:
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
        self.conv1 = _conv3x3(in_channels, self.widths[0])
        self.bn1 = nn.BatchNorm2d(self.widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages = []
        in_planes = self.widths[0]
        for planes, stride, count in zip(self.widths, (1, 2, 2, 2), num_blocks, strict=True):
            blocks = []
            for i in range(count):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_planes
        self.classifier = nn.Linear(in_planes, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(self.pool(out), 1)

    def block_taps(self) -> list[tuple[nn.Module, int]]:
        # the four stages, as the LL4AL paper taps ResNet-18 (Yoo & Kweon 2019, §4.1)
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        return list(zip(stages, self.widths, strict=True))


class ResNet8W64(ResNetCifar):
    """FAST's "ResNet-8" / LoGo's "resnet10": CIFAR ResNet with BasicBlocks [1, 1, 1, 1].

    4,903,242 parameters for 10 classes and 3 input channels.
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__(num_classes, in_channels, image_size, num_blocks=(1, 1, 1, 1))


class ResNet18(ResNetCifar):
    """CIFAR ResNet-18 (He et al., CVPR 2016): BasicBlocks [2, 2, 2, 2].

    11,173,962 parameters for 10 classes and 3 input channels.
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__(num_classes, in_channels, image_size, num_blocks=(2, 2, 2, 2))


# ---------------------------------------------------------------------------------------------
# MobileNet v1
# ---------------------------------------------------------------------------------------------


class DepthwiseSeparable(nn.Module):
    """Depthwise 3×3 conv → BN → ReLU, then pointwise 1×1 conv → BN → ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_planes, in_planes, kernel_size=3, stride=stride, padding=1, groups=in_planes,
            bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv2 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)))


class MobileNetCifar(Backbone):
    """CIFAR MobileNet v1 (Howard et al., arXiv 2017; kuangliu/pytorch-cifar): 3×3 conv(→32)
    → BN → ReLU, 13 depthwise-separable blocks, global average pool, Linear(1024 → C)."""

    cfg: tuple[int | tuple[int, int], ...] = (
        64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024)

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
        self.conv1 = _conv3x3(in_channels, 32)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU(inplace=True)
        blocks = []
        in_planes = 32
        for item in self.cfg:
            planes, stride = item if isinstance(item, tuple) else (item, 1)
            blocks.append(DepthwiseSeparable(in_planes, planes, stride))
            in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_planes
        self.classifier = nn.Linear(in_planes, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        out = self.layers(self.relu(self.bn1(self.conv1(x))))
        return torch.flatten(self.pool(out), 1)

    def block_taps(self) -> list[tuple[nn.Module, int]]:
        # the last block of each resolution (before each stride-2 block, and the final one):
        # widths 64/128/256/512/1024, one tap per stage as for the ResNets
        taps = []
        for i, item in enumerate(self.cfg):
            nxt = self.cfg[i + 1] if i + 1 < len(self.cfg) else None
            if nxt is None or isinstance(nxt, tuple):
                planes = item[0] if isinstance(item, tuple) else item
                taps.append((self.layers[i], planes))
        return taps


# ---------------------------------------------------------------------------------------------
# Linear head on precomputed embeddings
# ---------------------------------------------------------------------------------------------


class LinearHead(Backbone):
    """Linear probe on precomputed (e.g. foundation-model) embeddings, as in FAST's linear
    evaluation: input N×D or N×D×1×1, features = the flattened input, logits = Linear(D → C).
    `in_channels` is the embedding dimension D; `image_size` is ignored."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int = 1) -> None:
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels)
        self.feature_dim = in_channels
        self.flatten = nn.Flatten(1)  # no state; a module so that block_taps can name it
        self.classifier = nn.Linear(in_channels, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        features = self.flatten(x)
        if features.shape[1] != self.feature_dim:
            raise ValueError(
                f"linear backbone expects {self.feature_dim}-dim embeddings, got shape "
                f"{tuple(x.shape)}")
        return features

    def block_taps(self) -> list[tuple[nn.Module, int]]:
        # no blocks: the one "block output" is the input embedding itself
        return [(self.flatten, self.feature_dim)]


class MLPHead(Backbone):
    """An MLP head on precomputed embeddings (`model.head = "mlp"` on a `frozen:` backbone):
    features = ReLU(Linear(D → hidden)) of the flattened input, logits = Linear(hidden → C)."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int = 1,
                 hidden: int = 256) -> None:
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels, hidden=hidden)
        self.embed_dim = in_channels
        self.flatten = nn.Flatten(1)
        self.hidden = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU())
        self.feature_dim = hidden
        self.classifier = nn.Linear(hidden, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        z = self.flatten(x)
        if z.shape[1] != self.embed_dim:
            raise ValueError(f"mlp head expects {self.embed_dim}-dim embeddings, got shape "
                             f"{tuple(x.shape)}")
        return self.hidden(z)

    def block_taps(self) -> list[tuple[nn.Module, int]]:
        return [(self.flatten, self.embed_dim), (self.hidden, self.feature_dim)]


#: `model.backbone = "frozen:<encoder spec>"`: a frozen encoder's embeddings (computed once
#: per site, falkit.site.frozen_inputs) under a trained head (`model.head`)
FROZEN = "frozen:"


def is_frozen(name: str) -> bool:
    return name.startswith(FROZEN)


def on_embeddings(name: str) -> bool:
    """Whether backbone `name` trains on embeddings rather than images."""
    return name == "linear" or is_frozen(name)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

BACKBONES: dict[str, tuple[type[Backbone], str]] = {
    "cnn4": (CNN4, "4 × [conv3×3(64)-BN-ReLU-maxpool] CNN (FairFAL, LoGo, FAST)"),
    "resnet8_preact16": (PreActResNet8, "pre-activation ResNet-8, widths 16/32/64, ~78k "
                         "params (KAFAL)"),
    "resnet8_w64": (ResNet8W64, "CIFAR ResNet, blocks [1,1,1,1], widths 64-512, ~4.9M params "
                    "(FAST ResNet-8, LoGo resnet10)"),
    "resnet18": (ResNet18, "CIFAR ResNet-18, blocks [2,2,2,2], ~11.2M params"),
    "mobilenet": (MobileNetCifar, "CIFAR MobileNet v1, 13 depthwise-separable blocks, "
                  "~3.2M params"),
    "linear": (LinearHead, "linear head on precomputed embeddings (in_channels = embedding dim)"),
}


def create(name: str, num_classes: int, in_channels: int, image_size: int,
           head: str = "linear", hidden: int = 256) -> Backbone:
    """Build backbone `name` (a built-in, a plug-in's entry point or a `module:Class` spec:
    falkit.registry; `frozen:<encoder>`: the head `head` on in_channels-dim embeddings);
    raises ConfigError for an unknown name."""
    from falkit import registry

    if is_frozen(name):
        if head == "mlp":
            return MLPHead(num_classes, in_channels, hidden=hidden)
        return LinearHead(num_classes, in_channels)

    key = registry.resolve("backbone", name)
    if key not in BACKBONES:
        raise ConfigError(
            f"unknown backbone {name!r}; valid backbones: {', '.join(BACKBONES)}, or a "
            "plug-in: module:Class")
    return BACKBONES[key][0](num_classes, in_channels, image_size)


def describe() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered backbone, in registry order."""
    return [(name, desc) for name, (_, desc) in BACKBONES.items()]
