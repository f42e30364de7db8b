"""Tests of falkit.models.backbones: the (logits, features) contract, architectures, registry."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from falkit.errors import ConfigError
from falkit.models.backbones import BACKBONES, CNN4, Backbone, LinearHead, create, describe

NAMES = [n for n, (c, _) in BACKBONES.items() if c.__module__ == "falkit.models.backbones"]
# (num_classes, in_channels, image_size): every backbone at 28 px gray and 32 px RGB,
# plus 64 px / 200 classes (Tiny-ImageNet-like) for cnn4 and resnet18.
CASES = [(name, 10, 1, 28) for name in NAMES] + [(name, 10, 3, 32) for name in NAMES]
CASES += [("cnn4", 200, 3, 64), ("resnet18", 200, 3, 64)]
CASE_IDS = [f"{n}-C{c}-ch{ch}-{s}px" for n, c, ch, s in CASES]
BATCH = 2


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny batches run fastest on one thread; with more, every OpenMP region can stall for a
    scheduler slice on a busy machine, and bf16 depthwise convs on CPUs without native bf16
    run one region per channel (MobileNet took 40 s instead of 0.3 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _input(name: str, in_channels: int, image_size: int, seed: int = 0) -> torch.Tensor:
    """A batch for backbone `name`: N×D×1×1 embeddings for `linear`, N×C×H×W images otherwise."""
    gen = torch.Generator().manual_seed(seed)
    if name == "linear":
        return torch.randn(BATCH, in_channels, 1, 1, generator=gen)
    return torch.randn(BATCH, in_channels, image_size, image_size, generator=gen)


def _build(name: str, num_classes: int, in_channels: int, image_size: int) -> Backbone:
    torch.manual_seed(0)
    return create(name, num_classes, in_channels, image_size)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the contract, for every backbone --------------------------------------------------------


@pytest.mark.parametrize(("name", "num_classes", "in_ch", "size"), CASES, ids=CASE_IDS)
def test_contract_shapes_and_classifier(name: str, num_classes: int, in_ch: int,
                                        size: int) -> None:
    model = _build(name, num_classes, in_ch, size)
    assert isinstance(model.feature_dim, int) and model.feature_dim > 0
    assert isinstance(model.classifier, nn.Linear)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears[-1] is model.classifier
    assert model.classifier.in_features == model.feature_dim
    assert model.classifier.out_features == num_classes
    x = _input(name, in_ch, size)

    model.train()
    logits, features = model(x)
    assert logits.shape == (BATCH, num_classes)
    assert features.shape == (BATCH, model.feature_dim)
    logits.sum().backward()  # trainable end to end
    assert model.classifier.weight.grad is not None

    model.eval()
    with torch.no_grad():
        logits, features = model(x)
        assert logits.shape == (BATCH, num_classes)
        assert features.shape == (BATCH, model.feature_dim)
        assert torch.allclose(model.classifier(features), logits)
        assert torch.isfinite(logits).all() and torch.isfinite(features).all()


@pytest.mark.parametrize("name", NAMES)
def test_eval_is_deterministic(name: str) -> None:
    model = _build(name, 10, 3, 32).eval()
    x = _input(name, 3, 32)
    with torch.no_grad():
        a_logits, a_feats = model(x)
        b_logits, b_feats = model(x)
    assert torch.equal(a_logits, b_logits) and torch.equal(a_feats, b_feats)
    # the batch does not leak into a sample's output in eval mode
    with torch.no_grad():
        single_logits, _ = model(x[:1])
    assert torch.allclose(single_logits, a_logits[:1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_matches_contiguous(name: str) -> None:
    model = _build(name, 10, 3, 32).eval()
    x = _input(name, 3, 32)
    x_cl = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref_logits, ref_feats = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        logits, features = model_cl(x_cl)
    assert logits.shape == (BATCH, 10) and features.shape == (BATCH, model.feature_dim)
    assert torch.isfinite(logits).all() and torch.isfinite(features).all()
    assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert torch.allclose(features, ref_feats, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_runs(name: str) -> None:
    # one 28 px gray image: bf16 convolutions are emulated (slow) on CPUs without native bf16
    model = _build(name, 10, 1, 28).eval()
    x = _input(name, 1, 28)[:1]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, features = model(x)
    assert logits.dtype == torch.bfloat16  # autocast did engage on the classifier
    assert logits.shape == (1, 10) and features.shape == (1, model.feature_dim)
    assert torch.isfinite(logits.float()).all() and torch.isfinite(features.float()).all()


# --- registry ---------------------------------------------------------------------------------


def test_registry_names_and_describe() -> None:
    assert NAMES == ["cnn4", "resnet8_preact16", "resnet8_w64", "resnet18", "mobilenet", "linear"]
    rows = describe()  # falkit's own first, then any installed plug-in's (examples/plugin)
    assert [name for name, _ in rows][:len(NAMES)] == NAMES
    for name, desc in rows:
        assert desc == BACKBONES[name][1] and desc.strip() and "\n" not in desc


@pytest.mark.parametrize("name", NAMES)
def test_registry_class_follows_constructor_contract(name: str) -> None:
    cls = BACKBONES[name][0]
    torch.manual_seed(0)
    direct = cls(10, 3, 32)
    built = _build(name, 10, 3, 32)
    assert type(direct) is type(built) and issubclass(cls, Backbone)
    assert _n_params(direct) == _n_params(built)


@pytest.mark.parametrize("bad", ["resnet", "CNN4", "", "vit"])
def test_unknown_name_raises_config_error(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        create(bad, 10, 3, 32)
    message = str(info.value)
    assert "\n" not in message
    for name in NAMES:
        assert name in message


# --- cnn4 -------------------------------------------------------------------------------------


def test_cnn4_layer_structure() -> None:
    model = CNN4(10, 3, 32)
    layers = list(model.features)
    assert len(layers) == 16
    for block in range(4):
        conv, bn, relu, pool = layers[4 * block: 4 * block + 4]
        assert type(conv) is nn.Conv2d
        assert conv.in_channels == (3 if block == 0 else 64) and conv.out_channels == 64
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
        assert conv.bias is not None
        assert type(bn) is nn.BatchNorm2d and bn.num_features == 64
        assert type(relu) is nn.ReLU
        assert type(pool) is nn.MaxPool2d and pool.kernel_size == 2
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4


@pytest.mark.parametrize("num_classes", [10, 200])
def test_cnn4_classifier_bias_zero_at_init(num_classes: int) -> None:
    model = CNN4(num_classes, 3, 32)
    assert torch.count_nonzero(model.classifier.bias) == 0
    assert torch.count_nonzero(model.classifier.weight) > 0


@pytest.mark.parametrize(("size", "dim"), [(28, 64), (32, 256), (64, 1024)])
def test_cnn4_feature_dim(size: int, dim: int) -> None:
    model = CNN4(10, 1, size)
    assert model.feature_dim == dim
    _, features = model.eval()(torch.zeros(1, 1, size, size))
    assert features.shape == (1, dim)


@pytest.mark.parametrize(("num_classes", "in_ch", "size", "dim"),
                         [(10, 1, 28, 64), (10, 3, 32, 256), (200, 3, 64, 1024)])
def test_cnn4_parameter_count_matches_formula(num_classes: int, in_ch: int, size: int,
                                              dim: int) -> None:
    conv1 = in_ch * 64 * 9 + 64
    conv_rest = 3 * (64 * 64 * 9 + 64)
    bn = 4 * 2 * 64  # weight + bias per BN layer
    head = dim * num_classes + num_classes
    assert _n_params(CNN4(num_classes, in_ch, size)) == conv1 + conv_rest + bn + head


def test_cnn4_rejects_too_small_images() -> None:
    with pytest.raises(ConfigError):
        CNN4(10, 3, 15)


# --- ResNets / MobileNet: parameter counts ----------------------------------------------------


def test_resnet8_preact16_parameter_count() -> None:
    model = create("resnet8_preact16", 10, 3, 32)
    assert abs(_n_params(model) - 78_000) <= 0.05 * 78_000
    assert _n_params(model) == 77_850
    assert model.feature_dim == 64


def test_resnet8_preact16_structure() -> None:
    model = create("resnet8_preact16", 10, 3, 32)
    convs3 = [m for m in model.modules()
              if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    convs1 = [m for m in model.modules()
              if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert [c.out_channels for c in convs3] == [16, 16, 16, 32, 32, 64, 64]
    assert [c.stride for c in convs3] == [(1, 1)] * 3 + [(2, 2), (1, 1), (2, 2), (1, 1)]
    assert [(c.in_channels, c.out_channels) for c in convs1] == [(16, 32), (32, 64)]
    # pre-activation: each block's first module is a BatchNorm on the block input
    blocks = list(model.layers)
    assert len(blocks) == 3
    for block, width_in in zip(blocks, (16, 16, 32), strict=True):
        first = next(block.children())
        assert isinstance(first, nn.BatchNorm2d) and first.num_features == width_in


def test_resnet8_preact16_convs_see_activated_inputs() -> None:
    """Pre-activation: every conv but the stem consumes a ReLU output; features follow
    the final BN → ReLU → pool, so they are non-negative too."""
    model = _build("resnet8_preact16", 10, 3, 32).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    mins: list[float] = []
    handles = [c.register_forward_hook(lambda _m, inp, _o: mins.append(inp[0].min().item()))
               for c in convs]
    with torch.no_grad():
        _, features = model(_input("resnet8_preact16", 3, 32))
    for h in handles:
        h.remove()
    assert len(mins) == len(convs) == 1 + 2 * 3 + 2
    assert mins[0] < 0  # the stem sees the raw image
    assert all(v >= 0 for v in mins[1:])
    assert (features >= 0).all()


def test_resnet8_w64_parameter_count() -> None:
    model = create("resnet8_w64", 10, 3, 32)
    assert abs(_n_params(model) - 4_900_000) <= 0.05 * 4_900_000
    assert _n_params(model) == 4_903_242
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 4


def test_resnet18_and_mobilenet_parameter_counts() -> None:
    # the well-known kuangliu/pytorch-cifar sizes for CIFAR-10
    assert _n_params(create("resnet18", 10, 3, 32)) == 11_173_962
    assert _n_params(create("mobilenet", 10, 3, 32)) == 3_217_226
    mobilenet = create("mobilenet", 10, 3, 32)
    depthwise = [m for m in mobilenet.modules()
                 if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 13 and all(m.groups == m.in_channels for m in depthwise)


@pytest.mark.parametrize("name", ["resnet8_preact16", "resnet8_w64", "resnet18", "mobilenet"])
def test_no_maxpool_and_adaptive_pooling(name: str) -> None:
    model = create(name, 10, 1, 28)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())


# --- linear head ------------------------------------------------------------------------------


def test_linear_head_features_are_the_input() -> None:
    model = LinearHead(5, 16, 999).eval()
    flat = torch.randn(3, 16)
    logits2d, feats2d = model(flat)
    logits4d, feats4d = model(flat[:, :, None, None])
    assert torch.equal(feats2d, flat) and torch.equal(feats4d, flat)
    assert torch.equal(logits2d, logits4d)
    assert torch.allclose(logits2d, flat @ model.classifier.weight.T + model.classifier.bias)
    with pytest.raises(ValueError):
        model(torch.randn(3, 8))
