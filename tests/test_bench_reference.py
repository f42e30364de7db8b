"""The benchmarks' reference-style loop (benchmarks/reference_style.py) must compute what
falkit computes, or its speed ratios mean nothing."""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from reference_style import PerSampleImages  # noqa: E402

from falkit import config as config_mod  # noqa: E402
from falkit.fl.engine import Engine, ImageTensors  # noqa: E402


def _images(c: int, n: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(c)
    return torch.randint(0, 256, (n, c, 16, 15), dtype=torch.uint8, generator=g)


def test_pil_pipeline_gives_the_normalised_tensor_of_each_image():
    for c, mean, std in ((1, (0.286,), (0.353,)), (3, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))):
        x = _images(c)
        data = x[:, 0].numpy() if c == 1 else x.permute(0, 2, 3, 1).contiguous().numpy()
        idx = np.array([3, 0, 17])
        ds = PerSampleImages(data, torch.arange(len(x)), idx, mean, std, train=False,
                             hflip=True)
        m, s = torch.tensor(mean).view(c, 1, 1), torch.tensor(std).view(c, 1, 1)
        # what falkit feeds its models for the same images (a folded multiply-add: equal up
        # to float32 rounding, not bit for bit)
        engine = Engine(config_mod.Config(), ImageTensors(x, torch.arange(len(x)), mean, std),
                        ImageTensors(x[:2], torch.arange(2), mean, std), num_classes=40)
        falkit_view = engine._inputs(x[torch.as_tensor(idx)])
        for i, j in enumerate(idx):
            img, label = ds[i]
            assert img.shape == (c, 16, 15) and int(label) == j
            assert torch.equal(img, (x[j].float() / 255.0 - m) / s)  # torchvision's arithmetic
            assert torch.allclose(img, falkit_view[i], atol=1e-5)


def test_training_view_flips_about_half_the_images_left_to_right():
    x = _images(1, n=400)
    data = x[:, 0].numpy()
    plain = PerSampleImages(data, torch.zeros(400), np.arange(400), (0.5,), (0.5,), False, True)
    aug = PerSampleImages(data, torch.zeros(400), np.arange(400), (0.5,), (0.5,), True, True)
    torch.manual_seed(0)
    flipped = same = 0
    for i in range(400):
        a, p = aug[i][0], plain[i][0]
        flipped += torch.equal(a, p.flip(2))
        same += torch.equal(a, p)
    assert flipped + same == 400 and 150 < flipped < 250


def test_reference_engine_evaluates_like_falkit():
    """The reference-style evaluation returns what falkit's does (accuracy, per class, AUC)
    for the same model, so `make bench`'s slice compares like with like."""
    from reference_style import ReferenceEngine

    cfg = config_mod.Config()
    cfg.model.backbone = "resnet8_preact16"
    x, y = _images(1, 48), torch.arange(48) % 4
    train = ImageTensors(x, y, (0.5,), (0.25,))
    test = ImageTensors(_images(1, 30), torch.arange(30) % 4, (0.5,), (0.25,))
    ours = Engine(cfg, train, test, num_classes=4)
    ref = ReferenceEngine(cfg, train, test, num_classes=4)
    state = ours.init_state(0)
    a, b = ours.evaluate(state), ref.evaluate(state)
    assert a.accuracy == b.accuracy and np.allclose(a.per_class, b.per_class, equal_nan=True)
    assert abs(a.auc - b.auc) < 1e-6 and 0.0 <= a.auc <= 1.0
