"""Dataset loaders: each format is written here in miniature and must load back exactly."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from falkit.data import sources
from falkit.data.sources import (
    DATASETS,
    ImageDataset,
    data_roots,
    describe,
    download,
    find,
    load,
)
from falkit.errors import ConfigError, DataNotFoundError, FalkitError

N_TRAIN, N_TEST, N_CLASSES = 12, 6, 3
H, W = 5, 4  # not square, so a swapped height and width cannot go unnoticed
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _no_user_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the real home cache and $FALKIT_DATA out of every test."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FALKIT_DATA", raising=False)


def _images(n: int, *shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _labels(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) % N_CLASSES


def _check(ds: ImageDataset, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
           y_test: np.ndarray) -> None:
    """Exactly the written pixels (given as N×C×H×W) and labels, in the promised types."""
    for x, want in ((ds.x_train, x_train), (ds.x_test, x_test)):
        assert x.dtype == torch.uint8 and x.is_contiguous()
        assert tuple(x.shape) == want.shape
        np.testing.assert_array_equal(x.numpy(), want)
    for y, want in ((ds.y_train, y_train), (ds.y_test, y_test)):
        assert y.dtype == np.int64 and y.shape == want.shape
        np.testing.assert_array_equal(y, want)
    assert ds.in_channels == x_train.shape[1] and ds.image_size == x_train.shape[2]
    assert len(ds.mean) == len(ds.std) == ds.in_channels


# -- idx -----------------------------------------------------------------------------------

def _idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + \
        arr.astype(np.uint8).tobytes()


def _write_idx(folder: Path, gz: bool, seed: int = 0) -> tuple[np.ndarray, ...]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = (_images(N_TRAIN, H, W, seed=seed), _labels(N_TRAIN),
              _images(N_TEST, H, W, seed=seed + 1), _labels(N_TEST)[::-1].copy())
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for name, arr in zip(names, arrays, strict=True):
        data = _idx_bytes(arr)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path: Path, gz: bool) -> None:
    xtr, ytr, xte, yte = _write_idx(tmp_path / "mnist", gz)
    ds = load("mnist", tmp_path)
    _check(ds, xtr[:, None], ytr, xte[:, None], yte)
    assert ds.x_train[3, 0, 4, 1].item() == xtr[3, 4, 1]
    assert ds.classes == [str(i) for i in range(10)]
    assert (ds.name, ds.mean, ds.std, ds.hflip, ds.crop_pad) == \
        ("mnist", (0.1307,), (0.3081,), False, 0)
    assert ds.source == str(tmp_path / "mnist")


def test_fmnist_in_fmnist_dir(tmp_path: Path) -> None:
    xtr, ytr, xte, yte = _write_idx(tmp_path / "fmnist", gz=True)
    ds = load("Fashion-MNIST", tmp_path)  # an alias, any case
    _check(ds, xtr[:, None], ytr, xte[:, None], yte)
    assert ds.name == "fmnist" and ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    assert ds.mean == (0.286,) and ds.std == (0.353,) and ds.hflip


def test_real_fashion_mnist() -> None:
    # installed by `make data` (Debian package dataset-fashion-mnist): never skipped
    ds = load("fmnist")
    assert Path(ds.source) == FMNIST_DIR
    assert tuple(ds.x_train.shape) == (60000, 1, 28, 28)
    assert tuple(ds.x_test.shape) == (10000, 1, 28, 28)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.num_classes == 10 and ds.classes[9] == "Ankle boot"
    assert 0.25 < ds.x_train[:1000].float().mean().item() / 255 < 0.32  # its mean is ~0.286
    assert find("fmnist") == FMNIST_DIR


# -- CIFAR ---------------------------------------------------------------------------------

def _legacy_pickle(obj: object, path: Path) -> None:
    """Like the official CIFAR files: protocol 2 naming numpy 1.x's numpy.core module."""
    data = pickle.dumps(obj, protocol=2).replace(b"numpy._core.", b"numpy.core.")
    path.write_bytes(data)


def _cifar_rows(n: int, seed: int) -> np.ndarray:
    return _images(n, 3 * 32 * 32, seed=seed)


def test_cifar10(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    sizes = (3, 3, 2, 2, 2)  # 12 train images over the five official batches
    rows = [_cifar_rows(n, seed=i) for i, n in enumerate(sizes)]
    y = _labels(N_TRAIN)
    start = 0
    for i, (r, n) in enumerate(zip(rows, sizes, strict=True), 1):
        _legacy_pickle({b"batch_label": b"x", b"data": r, b"labels": y[start:start + n].tolist()},
                       folder / f"data_batch_{i}")
        start += n
    test_rows, y_test = _cifar_rows(N_TEST, seed=9), _labels(N_TEST)
    _legacy_pickle({b"data": test_rows, b"labels": y_test.tolist()}, folder / "test_batch")
    _legacy_pickle({b"label_names": [b"airplane", b"automobile", b"bird"]},
                   folder / "batches.meta")
    ds = load("cifar10", tmp_path)
    train_rows = np.concatenate(rows)
    _check(ds, train_rows.reshape(-1, 3, 32, 32), y, test_rows.reshape(-1, 3, 32, 32), y_test)
    # a row is the R, G, B planes in turn, each row-major
    assert ds.x_train[4, 1, 2, 5].item() == train_rows[4, 1024 + 2 * 32 + 5]
    assert ds.x_test[0, 2, 31, 0].item() == test_rows[0, 2048 + 31 * 32]
    assert ds.classes == ["airplane", "automobile", "bird"]
    assert ds.hflip and ds.mean == (0.485, 0.456, 0.406)


def test_cifar100(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    xtr, xte = _cifar_rows(N_TRAIN, 1), _cifar_rows(N_TEST, 2)
    ytr, yte = _labels(N_TRAIN), _labels(N_TEST)
    for name, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        d = {b"data": x, b"fine_labels": y.tolist(), b"coarse_labels": [0] * len(y)}
        (folder / name).write_bytes(pickle.dumps(d))  # today's protocol works too
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"apple", b"bee", b"cup"],
                                                b"coarse_label_names": [b"all"]}))
    ds = load("cifar100", tmp_path)
    _check(ds, xtr.reshape(-1, 3, 32, 32), ytr, xte.reshape(-1, 3, 32, 32), yte)
    assert ds.classes == ["apple", "bee", "cup"] and ds.std == (0.267, 0.256, 0.276)


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(pickle.dumps(os.getcwd))  # a global other than numpy's
    with pytest.raises(FalkitError, match=r"train.*refusing to unpickle"):
        load("cifar100", tmp_path)


# -- SVHN ----------------------------------------------------------------------------------

def test_svhn(tmp_path: Path) -> None:
    folder = tmp_path / "svhn"
    folder.mkdir()
    arrays = []
    for name, n, seed in (("train", N_TRAIN, 0), ("test", N_TEST, 1)):
        x = _images(n, 3, H, W, seed=seed)  # N×C×H×W, the expected result
        y = np.arange(n) % 3 + 9  # labels 9, 10 (= digit 0), 11 -> clipped below
        y = np.where(y == 11, 1, y)
        scipy.io.savemat(folder / f"{name}_32x32.mat",
                         {"X": x.transpose(2, 3, 1, 0), "y": y[:, None].astype(np.uint8)})
        arrays += [x, np.where(y == 10, 0, y)]
    ds = load("svhn", tmp_path)
    _check(ds, *arrays)
    assert ds.y_train[:3].tolist() == [9, 0, 1]
    assert ds.classes[0] == "0" and not ds.hflip


# -- MedMNIST ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,where,channels", [("octmnist", "medmnist", 1),
                                                  ("dermamnist", "", 3)])
def test_medmnist(tmp_path: Path, name: str, where: str, channels: int) -> None:
    shape = (H, W) if channels == 1 else (H, W, 3)
    xtr, xte = _images(N_TRAIN, *shape), _images(N_TEST, *shape, seed=1)
    ytr, yte = _labels(N_TRAIN)[:, None], _labels(N_TEST)[:, None]
    (tmp_path / where).mkdir(exist_ok=True)
    path = tmp_path / where / f"{name}.npz"
    np.savez(path, train_images=xtr, train_labels=ytr, val_images=xte[:2],
             val_labels=yte[:2], test_images=xte, test_labels=yte)
    ds = load(name, tmp_path)
    nchw = (lambda x: x[:, None]) if channels == 1 else (lambda x: x.transpose(0, 3, 1, 2))
    _check(ds, nchw(xtr), ytr[:, 0], nchw(xte), yte[:, 0])
    assert ds.mean == (0.5,) * channels and ds.std == (0.5,) * channels and ds.hflip
    assert find(name, tmp_path) == path and ds.source == str(path)
    assert ds.classes[1] == {"octmnist": "diabetic macular edema",
                             "dermamnist": "basal cell carcinoma"}[name]


def _medmnist_npz(path: Path, size: int, channels: int, n_classes: int,
                  multilabel: bool = False) -> dict[str, np.ndarray]:
    """A miniature MedMNIST file as the medmnist package writes it (N×H×W[×3] uint8 images,
    N×1 labels; ChestMNIST: N×14 0/1 findings)."""
    shape = (size, size) if channels == 1 else (size, size, 3)
    arrays = {}
    for i, (split, n) in enumerate((("train", 9), ("val", 4), ("test", 5))):
        arrays[f"{split}_images"] = _images(n, *shape, seed=i)
        if multilabel:
            arrays[f"{split}_labels"] = (np.random.default_rng(i).random((n, 14)) < 0.1) \
                .astype(np.uint8)
        else:
            arrays[f"{split}_labels"] = ((np.arange(n) + i) % n_classes)[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def test_every_medmnist_2d_set_at_every_size(tmp_path: Path) -> None:
    """All twelve 2D sets of MedMNIST v3, at 28 (plain name) and 64/128/224 (`<name>_64` ...,
    the medmnist package's file names): found, read with their label names, channels and
    size, and the shapes `falkit comm` uses match what the loader gives (issue 18)."""
    from falkit.data import medmnist
    from falkit.data.sources import image_shape

    assert len(medmnist.SETS) == 12
    for name, m in medmnist.SETS.items():
        assert len(m.md5) == 4 and all(len(h) == 32 for h in m.md5)
        for size in (28, 64):
            stem = name if size == 28 else f"{name}_{size}"
            arrays = _medmnist_npz(tmp_path / "medmnist" / f"{stem}.npz", size, m.channels,
                                   len(m.classes), multilabel=name == "chestmnist")
            ds = load(stem, tmp_path)
            assert ds.classes == list(m.classes) and ds.in_channels == m.channels
            assert ds.image_size == size and len(ds.y_train) == 9 and len(ds.y_test) == 5
            assert image_shape(stem) == (ds.num_classes, ds.in_channels, ds.image_size)
            assert ds.hflip == (not name.startswith("organ"))  # left/right organ labels
            want = arrays["train_images"]
            want = want[:, None] if m.channels == 1 else want.transpose(0, 3, 1, 2)
            assert np.array_equal(ds.x_train.numpy(), want)
        for size in (128, 224):
            assert image_shape(f"{name}_{size}") == (len(m.classes), m.channels, size)
    assert load("pathmnist_28", tmp_path).source == str(tmp_path / "medmnist" / "pathmnist.npz")
    names = [n for n, _ in describe()]
    assert "pathmnist_64" not in names and "bloodmnist" in names  # sizes: not listed apart
    with pytest.raises(ConfigError, match="pathmnist_64"):
        load("pathmnist_32", tmp_path)
    info = sources._info("organsmnist_224")
    assert info.urls == ("https://zenodo.org/records/10519652/files/organsmnist_224.npz"
                         "?download=1",)
    assert info.md5 == {"organsmnist_224.npz": "b354719e553fbbb2513d5533f52a4cb1"}


def test_chestmnist_is_binary_any_finding(tmp_path: Path) -> None:
    arrays = _medmnist_npz(tmp_path / "chestmnist.npz", 28, 1, 2, multilabel=True)
    ds = load("chestmnist", tmp_path)
    assert ds.classes == ["no finding", "finding"]
    assert ds.y_train.tolist() == arrays["train_labels"].any(1).astype(int).tolist()
    assert 0 < ds.y_test.sum() or 0 < ds.y_train.sum()
    np.savez(tmp_path / "chestmnist.npz",
             **{**arrays, "train_labels": arrays["train_labels"][:, :3]})
    with pytest.raises(FalkitError, match="ChestMNIST labels must be N×14"):
        load("chestmnist", tmp_path)


def test_medmnist_val_split(tmp_path: Path) -> None:
    """`val_split`: ignore (train/test), train (train+val, test) or test (train, val)."""
    arrays = _medmnist_npz(tmp_path / "bloodmnist.npz", 28, 3, 8)
    nchw = lambda x: x.transpose(0, 3, 1, 2)  # noqa: E731
    base = load("bloodmnist", tmp_path)
    _check(base, nchw(arrays["train_images"]), arrays["train_labels"][:, 0],
           nchw(arrays["test_images"]), arrays["test_labels"][:, 0])
    both = load("bloodmnist", tmp_path, val_split="train")
    _check(both, nchw(np.concatenate([arrays["train_images"], arrays["val_images"]])),
           np.concatenate([arrays["train_labels"], arrays["val_labels"]])[:, 0],
           nchw(arrays["test_images"]), arrays["test_labels"][:, 0])
    tune = load("bloodmnist", tmp_path, val_split="test")
    _check(tune, nchw(arrays["train_images"]), arrays["train_labels"][:, 0],
           nchw(arrays["val_images"]), arrays["val_labels"][:, 0])
    with pytest.raises(ConfigError, match="no official validation split"):
        load("digits", val_split="train")
    from falkit import config

    with pytest.raises(ConfigError, match="fmnist has no official validation split"):
        config.load(None, overrides={"data.val_split": "test"})  # refused before any run
    assert config.load(None, overrides={"data.dataset": "bloodmnist_64",
                                        "data.val_split": "test"}).data.val_split == "test"
    with pytest.raises(ConfigError, match="is not one of"):
        load("bloodmnist", tmp_path, val_split="both")
    np.savez(tmp_path / "bloodmnist.npz", **{k: v for k, v in arrays.items()
                                             if not k.startswith("val")})
    assert len(load("bloodmnist", tmp_path).y_train) == 9  # val not needed when ignored
    with pytest.raises(FalkitError, match="missing arrays val_images, val_labels"):
        load("bloodmnist", tmp_path, val_split="test")


# -- Tiny-ImageNet -------------------------------------------------------------------------

def _png(path: Path, arr: np.ndarray) -> None:
    """Losslessly: the loader reads by content, so a .JPEG name may hold PNG data, which lets
    the test compare exact pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="BMP" if path.suffix == ".bmp" else "PNG")


def test_tinyimagenet(tmp_path: Path) -> None:
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n03", "n01", "n02"]  # file order differs from the sorted class order
    base.mkdir()
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tbee\n"
                                    "n03\tcup, mug\nn99\tunused\n")
    xtr, ytr = _images(N_TRAIN, H, W, 3), np.repeat(np.arange(3), 4)
    xtr[5] = xtr[5, :, :, :1]  # saved as grayscale below; RGB repeats the gray level
    for i in range(N_TRAIN):
        wnid = sorted(wnids)[ytr[i]]
        pixels = xtr[i, :, :, 0] if i == 5 else xtr[i]
        _png(base / "train" / wnid / "images" / f"{wnid}_{i % 4}.JPEG", pixels)
    xte, yte = _images(N_TEST, H, W, 3, seed=1), np.array([2, 0, 1, 1, 0, 2])
    lines = []
    for i in range(N_TEST):
        _png(base / "val" / "images" / f"val_{i}.JPEG", xte[i])
        lines.append(f"val_{i}.JPEG\t{sorted(wnids)[yte[i]]}\t0\t0\t{W}\t{H}")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    ds = load("tinyimagenet", tmp_path)
    _check(ds, xtr.transpose(0, 3, 1, 2), ytr, xte.transpose(0, 3, 1, 2), yte)
    assert ds.classes == ["goldfish", "bee", "cup"]
    assert ds.crop_pad == 4 and ds.hflip and ds.mean == (0.485, 0.456, 0.406)


# -- generic npz and imagefolder -----------------------------------------------------------

@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw", "float", "gray_nhwc"])
def test_generic_npz(tmp_path: Path, layout: str) -> None:
    channels = 1 if layout in ("nhw", "gray_nhwc") else 3
    xtr, xte = _images(N_TRAIN, channels, H, W), _images(N_TEST, channels, H, W, seed=1)
    ytr, yte = _labels(N_TRAIN), _labels(N_TEST)
    to_disk = {"nhw": lambda x: x[:, 0], "nhwc": lambda x: x.transpose(0, 2, 3, 1),
               "gray_nhwc": lambda x: x.transpose(0, 2, 3, 1), "nchw": lambda x: x,
               "float": lambda x: x.astype(np.float32) / 255}[layout]
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=to_disk(xtr), y_train=ytr, x_test=to_disk(xte), y_test=yte,
             classes=np.array(["cat", "dog", "eel"]))
    ds = load(f"npz:{path}")
    _check(ds, xtr, ytr, xte, yte)
    assert ds.classes == ["cat", "dog", "eel"] and not ds.hflip and ds.crop_pad == 0
    np.testing.assert_allclose(ds.mean, (xtr / 255).mean(axis=(0, 2, 3)), atol=1e-9)
    np.testing.assert_allclose(ds.std, (xtr / 255).std(axis=(0, 2, 3)), atol=1e-9)
    assert find(f"npz:{path}") == path


def test_npz_mean_std_are_the_agreed_constants(tmp_path: Path) -> None:
    """A site's npz may carry the federation's normalisation constants; they replace the
    file's own statistics; half of them, or a bad value, is one error naming the file."""
    x, y = _images(N_TRAIN, 3, H, W), _labels(N_TRAIN)
    arrays = {"x_train": x, "y_train": y, "x_test": x[:4], "y_test": y[:4]}
    np.savez(tmp_path / "site.npz", **arrays, mean=[0.5, 0.25, 0.125], std=[0.2, 0.3, 0.4])
    ds = load(f"npz:{tmp_path / 'site.npz'}")
    assert ds.mean == (0.5, 0.25, 0.125) and ds.std == (0.2, 0.3, 0.4)
    for extra, why in (({"mean": [0.5] * 3}, "both `mean` and `std`"),
                       ({"mean": [0.5] * 3, "std": [0.2, 0.0, 0.1]}, "`std` must be"),
                       ({"mean": [[0.5] * 3] * 2, "std": [0.2] * 3}, "`mean` must be"),
                       ({"mean": [0.5], "std": [0.2]}, "3-channel images but mean/std")):
        path = tmp_path / "bad.npz"
        np.savez(path, **arrays, **extra)
        with pytest.raises(FalkitError, match=why) as e:
            load(f"npz:{path}")
        assert str(path) in str(e.value)


def test_a_file_that_is_no_npz_archive_is_named_as_such(tmp_path: Path) -> None:
    # bytes numpy would take for a pickle (and tell to allow_pickle) or a truncated zip
    for i, raw in enumerate((b"\x80\x04\x95garbage", b"PK\x03\x04truncated", b"")):
        path = tmp_path / f"bad{i}.npz"
        path.write_bytes(raw)
        with pytest.raises(FalkitError, match=rf"cannot read .*bad{i}\.npz") as e:
            load(f"npz:{path}")
        assert "allow_pickle" not in str(e.value)
        if not raw.startswith(b"PK"):
            assert "not an npz archive" in str(e.value)


def test_generic_npz_relative_to_data_root(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x_train=_images(4, H, W), y_train=[0, 1, 3, 2],
             x_test=_images(2, H, W), y_test=[1, 1])
    ds = load("npz:d.npz", tmp_path)
    assert ds.classes == ["0", "1", "2", "3"]  # no classes array: 0..max label
    with pytest.raises(DataNotFoundError, match="nope.npz"):
        load("npz:nope.npz", tmp_path)


def _folder_images(root: Path, mode: str) -> tuple[np.ndarray, ...]:
    out = []
    for split, n, seed in (("train", N_TRAIN, 0), ("test", N_TEST, 1)):
        shape = (H, W) if mode == "L" else (H, W, 3)
        x, y = _images(n, *shape, seed=seed), _labels(n)
        # written class by class, file names sorted within a class: the load order
        order = np.argsort(y, kind="stable")
        x, y = x[order], y[order]
        for i in range(n):
            cls = ["ant", "bee", "cow"][y[i]]
            ext = ["png", "bmp", "PNG"][i % 3]
            _png(root / split / cls / f"{i:03d}.{ext}", x[i])
        out += [x[:, None] if mode == "L" else x.transpose(0, 3, 1, 2), y]
    return tuple(out)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_imagefolder(tmp_path: Path, mode: str) -> None:
    arrays = _folder_images(tmp_path / "imgs", mode)
    (tmp_path / "imgs" / "train" / "ant" / "notes.txt").write_text("not an image")
    ds = load(f"imagefolder:{tmp_path / 'imgs'}")
    _check(ds, *arrays)
    assert ds.classes == ["ant", "bee", "cow"] and not ds.hflip


def test_imagefolder_empty_class_folder_warns_and_empty_test_is_refused(tmp_path: Path) -> None:
    x = _images(2, H, W)
    _png(tmp_path / "train" / "a" / "0.png", x[0])
    _png(tmp_path / "test" / "a" / "1.png", x[1])
    (tmp_path / "train" / "b").mkdir()  # a class folder without images
    with pytest.warns(UserWarning, match="no train sample of class b"):
        ds = load(f"imagefolder:{tmp_path}")
    assert ds.classes == ["a", "b"]
    (tmp_path / "test" / "a" / "1.png").unlink()
    with pytest.raises(FalkitError, match="test split is empty"):
        load(f"imagefolder:{tmp_path}")


def test_imagefolder_mixed_modes_become_rgb(tmp_path: Path) -> None:
    x = _images(2, H, W)
    _png(tmp_path / "train" / "a" / "0.png", x[0])
    _png(tmp_path / "train" / "b" / "1.png", np.stack([x[1]] * 3, axis=-1))
    _png(tmp_path / "test" / "a" / "2.png", x[1])
    ds = load(f"imagefolder:{tmp_path}")
    assert tuple(ds.x_train.shape) == (2, 3, H, W)
    np.testing.assert_array_equal(ds.x_train[0].numpy(), np.stack([x[0]] * 3))


def test_imagefolder_size_mismatch_names_the_file(tmp_path: Path) -> None:
    _png(tmp_path / "train" / "a" / "0.png", _images(1, H, W)[0])
    _png(tmp_path / "train" / "a" / "1.png", _images(1, H + 1, W)[0])
    _png(tmp_path / "test" / "a" / "2.png", _images(1, H, W)[0])
    with pytest.raises(FalkitError, match=rf"1\.png is {W}×{H + 1} but .*0\.png is {W}×{H}"):
        load(f"imagefolder:{tmp_path}")


# -- digits --------------------------------------------------------------------------------

def test_digits() -> None:
    from sklearn.datasets import load_digits

    ds = load("digits")
    assert tuple(ds.x_train.shape) == (1442, 1, 8, 8) and tuple(ds.x_test.shape) == (355, 1, 8, 8)
    assert ds.source == "sklearn" and ds.classes == [str(i) for i in range(10)]
    # stratified 80/20 in every class
    tr, te = np.bincount(ds.y_train), np.bincount(ds.y_test)
    assert np.all(np.abs(te / (tr + te) - 0.2) < 0.01)
    raw = load_digits()
    first = raw.images[0]  # class 0, rank 0: in train
    np.testing.assert_array_equal(ds.x_train[0, 0].numpy(), np.rint(first * 255 / 16))
    assert ds.x_train.max().item() == 255
    again = load("digits")
    assert torch.equal(again.x_test, ds.x_test) and ds.mean == again.mean
    assert 0.2 < ds.mean[0] < 0.4 and 0.3 < ds.std[0] < 0.45
    assert find("digits") is not None and find("digits").is_file()


# -- roots, discovery and errors -----------------------------------------------------------

def test_data_roots_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FALKIT_DATA", str(tmp_path / "env"))
    home = tmp_path / "home" / ".cache" / "falkit"
    med = tmp_path / "home" / ".medmnist"  # the medmnist package's
    system = Path("/usr/share/datasets")
    assert data_roots(tmp_path / "explicit") == [
        tmp_path / "explicit", tmp_path / "env", home, med, system]
    assert data_roots() == [tmp_path / "env", home, med, system]
    monkeypatch.delenv("FALKIT_DATA")
    assert data_roots() == [home, med, system]


def test_first_root_holding_the_data_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home" / ".cache" / "falkit"
    _write_idx(home / "mnist", gz=True, seed=3)
    assert find("mnist") == home / "mnist"
    monkeypatch.setenv("FALKIT_DATA", str(tmp_path / "env"))
    env_arrays = _write_idx(tmp_path / "env" / "mnist", gz=False, seed=4)
    assert find("mnist") == tmp_path / "env" / "mnist"
    assert find("mnist", tmp_path / "elsewhere") == tmp_path / "env" / "mnist"
    explicit = _write_idx(tmp_path / "explicit" / "mnist", gz=True, seed=5)
    assert find("mnist", tmp_path / "explicit") == tmp_path / "explicit" / "mnist"
    np.testing.assert_array_equal(load("mnist", tmp_path / "explicit").x_test[:, 0],
                                  explicit[2])
    np.testing.assert_array_equal(load("mnist").x_test[:, 0], env_arrays[2])
    # the system root is last: a user copy of Fashion-MNIST shadows the Debian one
    _write_idx(home / "fashion-mnist", gz=True)
    assert find("fmnist") == tmp_path / "home" / ".cache" / "falkit" / "fashion-mnist"


def test_missing_data_says_how_to_get_it(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "SYSTEM_ROOT", tmp_path / "system")
    assert find("mnist", tmp_path) is None
    with pytest.raises(DataNotFoundError) as err:
        load("mnist", tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path) in msg and "falkit data download mnist" in msg
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load("fmnist", tmp_path)
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py"):
        load("cifar10", tmp_path)  # an incomplete directory is absent, not corrupt


def test_unknown_name() -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'.*fmnist"):
        load("imagenet")
    with pytest.raises(ConfigError):
        download("npz:/x.npz")


def test_describe_lists_every_dataset() -> None:
    names = [n for n, _ in describe()]
    assert names == list(DATASETS)
    assert all(find(n) is None or find(n).exists() for n in names)  # each name is findable
    assert {"fmnist", "mnist", "cifar10", "cifar100", "svhn", "octmnist", "dermamnist",
            "pathmnist", "tinyimagenet", "digits"} <= set(names)
    assert all(d and "\n" not in d for _, d in describe())


def _corrupt_cases(root: Path) -> list[tuple[str, str]]:
    """(dataset, regex the error must match) after writing one broken file for each."""
    mnist = root / "mnist"
    _write_idx(mnist, gz=True)
    (mnist / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x0f\x03abc"))
    full = gzip.compress(_idx_bytes(_images(N_TRAIN, H, W)))
    fm = root / "fashion-mnist"
    _write_idx(fm, gz=True)
    (fm / "train-images-idx3-ubyte.gz").write_bytes(full[: len(full) // 2])  # truncated gz
    c10 = root / "cifar-10-batches-py"
    c10.mkdir()
    for f in DATASETS["cifar10"].files:
        (c10 / f).write_bytes(b"definitely not a pickle")
    svhn = root / "svhn"
    svhn.mkdir()
    for f in DATASETS["svhn"].files:
        (svhn / f).write_bytes(b"MATLAB? no")
    (root / "medmnist").mkdir()
    np.savez(root / "medmnist" / "pathmnist.npz", train_images=_images(2, H, W))
    return [("mnist", r"t10k-images-idx3-ubyte\.gz.*not an idx file"),
            ("fmnist", r"train-images-idx3-ubyte\.gz"),
            ("cifar10", r"data_batch_1"),
            ("svhn", r"train_32x32\.mat"),
            ("pathmnist", r"pathmnist\.npz: missing arrays train_labels")]


def test_corrupt_files_name_the_file(tmp_path: Path) -> None:
    for name, pattern in _corrupt_cases(tmp_path):
        with pytest.raises(FalkitError, match=pattern):
            load(name, tmp_path)
    idx = tmp_path / "mnist"
    good = _idx_bytes(_images(N_TEST, H, W))
    (idx / "t10k-images-idx3-ubyte.gz").unlink()
    (idx / "t10k-images-idx3-ubyte").write_bytes(good[:-7])  # plain, short by 7 bytes
    with pytest.raises(FalkitError, match=r"t10k-images-idx3-ubyte: .*truncated"):
        load("mnist", tmp_path)
    np.savez(tmp_path / "bad.npz", x_train=np.full((2, H, W), 2.0), y_train=[0, 1],
             x_test=np.zeros((1, H, W)), y_test=[0])
    with pytest.raises(FalkitError, match=r"bad\.npz.*\[0, 1\]"):
        load(f"npz:{tmp_path / 'bad.npz'}")


# -- download ------------------------------------------------------------------------------

class _Server:
    """Stands in for urllib.request.urlopen: serves bytes by URL, counts requests."""

    def __init__(self, files: dict[str, bytes], fail_after: int | None = None) -> None:
        self.files, self.fail_after, self.requests = files, fail_after, []

    def __call__(self, url: str, timeout: float | None = None) -> io.BytesIO:
        assert timeout is not None and timeout <= 60
        self.requests.append(url)
        if self.fail_after is not None and len(self.requests) > self.fail_after:
            raise urllib.error.URLError("network unreachable")
        return io.BytesIO(self.files[url])


def _no_network(url: str, timeout: float | None = None) -> io.BytesIO:
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".part"]


def _mnist_server(monkeypatch: pytest.MonkeyPatch, **kw: int) -> tuple[_Server, tuple]:
    info = DATASETS["mnist"]
    arrays = (_images(N_TRAIN, H, W), _labels(N_TRAIN), _images(N_TEST, H, W, seed=1),
              _labels(N_TEST))
    files = {url: gzip.compress(_idx_bytes(a)) for url, a in zip(info.urls, arrays, strict=True)}
    md5 = {url.rsplit("/", 1)[1]: hashlib.md5(data).hexdigest() for url, data in files.items()}
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(info, md5=md5))
    server = _Server(files, **kw)
    monkeypatch.setattr(urllib.request, "urlopen", server)
    return server, arrays


def test_download_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    with pytest.raises(FalkitError) as err:
        download("mnist", tmp_path)
    msg = str(err.value)
    assert msg.startswith("cannot download mnist from https://ossci-datasets.s3.amazonaws.com/")
    assert "name resolution" in msg and f"copy the files to {tmp_path / 'mnist'}" in msg
    assert list(tmp_path.iterdir()) == []  # not even an empty directory
    with pytest.raises(FalkitError, match="cannot download cifar10 from https://www.cs.toronto"):
        download("cifar10", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_download_goes_to_the_first_writable_root(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    server, arrays = _mnist_server(monkeypatch)
    monkeypatch.setenv("FALKIT_DATA", str(tmp_path / "env"))
    path = download("mnist")
    assert path == tmp_path / "env" / "mnist" and len(server.requests) == 4
    assert sorted(p.name for p in path.iterdir()) == sorted(
        f + ".gz" for f in DATASETS["mnist"].files)
    assert _leftovers(tmp_path / "env") == []
    _check(load("mnist"), arrays[0][:, None], arrays[1], arrays[2][:, None], arrays[3])
    assert download("mnist") == path and len(server.requests) == 4  # present: no refetch


def test_interrupted_download_leaves_only_whole_files(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    server, _ = _mnist_server(monkeypatch, fail_after=2)
    with pytest.raises(FalkitError, match="network unreachable"):
        download("mnist", tmp_path)
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == [
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    assert find("mnist", tmp_path) is None
    server.fail_after = None
    assert download("mnist", tmp_path) == tmp_path / "mnist"
    assert len(server.requests) == 3 + 2  # resumed: only the two missing files


def test_download_rejects_a_bad_checksum(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    server, _ = _mnist_server(monkeypatch)
    first = DATASETS["mnist"].urls[0]
    server.files[first] = server.files[first] + b"tampered"
    with pytest.raises(FalkitError, match="corrupt.*md5"):
        download("mnist", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_download_cifar10_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows, y = _cifar_rows(5, 0), [0, 1, 2, 0, 1]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        members = {f"data_batch_{i}": {b"data": rows, b"labels": y} for i in range(1, 6)}
        members["test_batch"] = {b"data": rows[:2], b"labels": y[:2]}
        members["batches.meta"] = {b"label_names": [b"a", b"b", b"c"]}
        for name, obj in members.items():
            data = pickle.dumps(obj)
            entry = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            entry.size = len(data)
            tar.addfile(entry, io.BytesIO(data))
    info = DATASETS["cifar10"]
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(info, md5={}))
    monkeypatch.setattr(urllib.request, "urlopen", _Server({info.urls[0]: buf.getvalue()}))
    assert download("cifar10", tmp_path) == tmp_path / "cifar-10-batches-py"
    assert [p.name for p in tmp_path.iterdir()] == ["cifar-10-batches-py"]  # no scratch left
    ds = load("cifar10", tmp_path)
    assert tuple(ds.x_train.shape) == (25, 3, 32, 32) and ds.classes == ["a", "b", "c"]


def test_download_digits_needs_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    assert download("digits") == find("digits")


def test_digits_read_without_scikit_learn_equal_its_loader():
    """digits come from the file scikit-learn ships, without importing scikit-learn (seconds
    per Flower message): the same images and targets as sklearn.datasets.load_digits."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from falkit.data.sources import digits_arrays

    images, target = digits_arrays()
    ref = load_digits()
    assert np.array_equal(images, ref.images) and np.array_equal(target, ref.target)
    code = ("import sys; from falkit.data.sources import load; load('digits'); "
            "import falkit.al.strategies; print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


def test_built_in_shapes_match_the_loaders_and_comm_needs_no_files(capsys):
    """Each built-in dataset's (classes, channels, size), as its loader gives it where the
    files are here; `falkit comm` uses them, so CIFAR-10's files are not needed."""
    from falkit.cli import main
    from falkit.data.sources import DATASETS, find, image_shape
    from falkit.fl.algorithms import clone_state, state_bytes
    from falkit.models.backbones import create

    assert all(info.shape is not None for info in DATASETS.values())
    for name in ("digits", "fmnist"):
        if name == "digits" or find(name) is not None:
            ds = load(name)
            assert image_shape(name) == (ds.num_classes, ds.in_channels, ds.image_size)
    assert main(["comm", "--model", "cnn4", "--dataset", "cifar10", "--data-root",
                 "/nonexistent", "--clients", "10", "--rounds", "100"]) == 0
    b = state_bytes(clone_state(create("cnn4", num_classes=10, in_channels=3, image_size=32)))
    assert f"{b:,} bytes per state dict" in capsys.readouterr().out


def test_torchvision_and_medmnist_package_layouts_are_found(tmp_path, monkeypatch):
    """Data already downloaded by torchvision (<root>/FashionMNIST/raw, MNIST/raw, SVHN's
    .mat in the root) or by the medmnist package (~/.medmnist) is found (issue 18)."""
    xtr, ytr, xte, yte = _write_idx(tmp_path / "FashionMNIST" / "raw", gz=False)
    assert find("fmnist", tmp_path) == tmp_path / "FashionMNIST" / "raw"
    _check(load("fmnist", tmp_path), xtr[:, None], ytr, xte[:, None], yte)
    _write_idx(tmp_path / "MNIST" / "raw", gz=True)
    assert find("mnist", tmp_path) == tmp_path / "MNIST" / "raw"
    home = tmp_path / "home"
    (home / ".medmnist").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("FALKIT_DATA", raising=False)
    x, y = _images(N_TRAIN, H, W), _labels(N_TRAIN)[:, None]
    np.savez(home / ".medmnist" / "octmnist.npz", train_images=x, train_labels=y,
             val_images=x[:2], val_labels=y[:2], test_images=x, test_labels=y)
    assert find("octmnist") == home / ".medmnist" / "octmnist.npz"
