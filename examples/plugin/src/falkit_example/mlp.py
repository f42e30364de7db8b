"""A two-layer MLP backbone on the flattened image (any falkit Backbone: `embed`,
`classifier`, `feature_dim`)."""

from __future__ import annotations

from torch import Tensor, nn

from falkit.models.backbones import Backbone


class MLP2(Backbone):
    """Flatten → Linear(H·W·C, 128) → ReLU → Linear(128, 64) → ReLU → classifier."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.feature_dim = 64
        self.body = nn.Sequential(nn.Flatten(1),
                                  nn.Linear(in_channels * image_size * image_size, 128),
                                  nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.classifier = nn.Linear(64, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.body(x)
