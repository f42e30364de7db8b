"""The trained global models a run saves (issue 18): after each cycle,
`runs/<name>/models/cycle_<c>.pt` holds a standard PyTorch state dict and what is needed to
rebuild the model (`runtime.save_models` = all | last | none).

    from falkit.models.saved import load_model
    model = load_model("runs/<name>/models/cycle_4.pt")   # an nn.Module in eval mode
    logits, features = model(x)  # x: N×C×H×W float, normalised as in training

Normalisation: x = (image / 255 − mean) / std with the dataset's mean and std, which the
file also records (`mean`, `std`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "falkit-model-1"


def model_file(run_dir: Path, cycle: int) -> Path:
    return Path(run_dir) / "models" / f"cycle_{cycle}.pt"


def model_record(state: dict[str, torch.Tensor], *, backbone: str, num_classes: int,
                 in_channels: int, image_size: int, strategy: str, cycle: int,
                 accuracy: float, config_toml: str, mean=None, std=None) -> dict[str, Any]:
    return {"format": FORMAT, "state_dict": {k: v.detach().cpu() for k, v in state.items()},
            "backbone": backbone, "num_classes": num_classes, "in_channels": in_channels,
            "image_size": image_size, "strategy": strategy, "cycle": cycle,
            "accuracy": accuracy, "mean": mean, "std": std, "config": config_toml}


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model a run saved, rebuilt and loaded (strictly), in eval mode."""
    from falkit.al.base import create as create_strategy
    from falkit.errors import FalkitError
    from falkit.models.backbones import create as create_backbone
    from falkit.models.backbones import is_frozen

    rec = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise FalkitError(f"{path} is not a model falkit saved")
    head: dict[str, Any] = {}
    if is_frozen(rec["backbone"]) and rec.get("config"):  # its head (model.head, ...)
        from falkit import config as config_mod

        m = config_mod.loads(rec["config"]).model
        head = {"head": m.head, "hidden": m.head_hidden}
    model = create_backbone(rec["backbone"], num_classes=rec["num_classes"],
                            in_channels=rec["in_channels"], image_size=rec["image_size"],
                            **head)
    # ll4al: its loss-prediction module was trained with the model
    model = create_strategy(rec["strategy"]).wrap_model(model)
    model.load_state_dict(rec["state_dict"], strict=True)
    return model.to(device).eval()
