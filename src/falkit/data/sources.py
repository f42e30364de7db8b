"""Image datasets from their standard on-disk formats, as uint8 N×C×H×W tensors.

Every loader returns an :class:`ImageDataset`; every malformed file becomes a one-line
:class:`FalkitError` naming the file, and absent data a :class:`DataNotFoundError` saying how
to get it. Data is searched under :func:`data_roots`; :func:`download` fetches the official
files. Names users type: see :data:`DATASETS`, plus ``npz:<file>``, ``imagefolder:<dir>`` and
``csv:<file>``.

Conventions the rest of falkit relies on:

* MedMNIST: train = ``train``, test = ``test``; the official ``val`` split is ignored unless
  ``val_split`` asks for it (train on train+val, or evaluate on val). ``chestmnist`` is
  binary (no finding vs any of its 14 findings); see :mod:`falkit.data.medmnist`.
* Tiny-ImageNet: classes are the sorted wnids (ImageFolder order); ``val`` is the test set.
* ``digits``: a fixed split with no RNG, so it cannot drift across library versions: in each
  class, every 5th image (file order) is test, the rest train (1442 train / 355 test);
  mean/std are computed from that train split, like for ``npz:`` and ``imagefolder:``.
* ``npz:`` and ``imagefolder:``: mean/std from the train set, no flip, no crop (the loader
  cannot know whether flipping preserves the label). An npz may carry ``mean`` and ``std``
  (per channel, of x/255): the sites of one federation then normalise alike.
* The clients' own split (``partition.method = natural``): the site of every train sample,
  ``site_train`` (ints 0..S-1, optional ``sites`` names) in an npz, a folder per site
  (``train/<site>/<class>/``) in an image folder, a ``site`` column in a CSV index. The
  test split stays one, shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import http.client
import importlib.util
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from falkit.data import medmnist
from falkit.errors import ConfigError, DataNotFoundError, FalkitError

#: Shared, read-only data root of Debian's ``dataset-*`` packages; searched last.
SYSTEM_ROOT = Path("/usr/share/datasets")
#: Seconds before a stalled download gives up.
DOWNLOAD_TIMEOUT = 30.0

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp"}


@dataclass(eq=False)
class ImageDataset:
    """A train and a test split as uint8 N×C×H×W tensors, int64 labels and how to train on it."""

    name: str
    x_train: torch.Tensor  # uint8, N×C×H×W, contiguous
    y_train: np.ndarray  # int64, (N,)
    x_test: torch.Tensor  # uint8, M×C×H×W, contiguous
    y_test: np.ndarray  # int64, (M,)
    classes: list[str]
    mean: tuple[float, ...]  # per channel, of x/255
    std: tuple[float, ...]
    hflip: bool  # random horizontal flip while training
    crop_pad: int  # 0: no random crop; p: random crop after zero-padding by p
    source: str  # file or directory read, or "sklearn"
    # the site (client) of every train sample, where the data says (partition.method =
    # natural): int64 (N,) in 0..S-1, and the sites' names; None where it does not
    site_train: np.ndarray | None = None
    sites: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[2])

    def __repr__(self) -> str:  # the default would print the tensors
        def shape(x: torch.Tensor) -> str:
            return "×".join(str(d) for d in x.shape)

        return (f"ImageDataset({self.name!r}, train={shape(self.x_train)}, "
                f"test={shape(self.x_test)}, classes={self.num_classes}, source={self.source!r})")


@dataclass(frozen=True)
class DatasetInfo:
    """Where a named dataset lives, where it comes from and how to train on it."""

    name: str
    title: str
    description: str
    kind: str  # which loader reads it
    dirs: tuple[str, ...] = ()  # subdirectories of a data root, in search order; [0] for download
    files: tuple[str, ...] = ()  # must all exist there (idx files: with or without .gz)
    urls: tuple[str, ...] = ()  # official download URLs
    md5: Mapping[str, str] = field(default_factory=dict)  # downloaded file name -> md5
    mean: tuple[float, ...] | None = None  # None: computed from the train split
    std: tuple[float, ...] | None = None
    # the constants the FairFAL authors' code normalises with, where they differ
    # (`data.normalization = "code"`); None: the same as mean/std
    code_mean: tuple[float, ...] | None = None
    code_std: tuple[float, ...] | None = None
    hflip: bool = False
    crop_pad: int = 0
    classes: tuple[str, ...] | None = None  # None: read from the files
    apt: str | None = None  # Debian package that installs it under SYSTEM_ROOT
    shape: tuple[int, int, int] | None = None  # (classes, channels, image size)

    @property
    def archive(self) -> bool:
        """True if the download is one archive that unpacks to ``dirs[0]``."""
        return len(self.urls) == 1 and self.urls[0].endswith((".tar.gz", ".zip"))


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_DIGITS = tuple(str(i) for i in range(10))
_FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"


def _medmnist(name: str, size: int = 28) -> DatasetInfo:
    m = medmnist.SETS[name]
    stem = medmnist.file_stem(name, size)
    return DatasetInfo(
        name=stem, title=m.title if size == 28 else f"{m.title} {size}×{size}",
        kind="medmnist",
        description=f"{m.title}: {m.train}/{m.val}/{m.test} (train/val/test) {m.what}, "
                    f"{len(m.classes)} classes (MedMNIST npz, {size}×{size}"
                    + (f"; {name}_64/_128/_224 for MedMNIST+)" if size == 28 else ")"),
        dirs=("medmnist", ""), files=(f"{stem}.npz",), urls=(medmnist.URL.format(stem),),
        md5={f"{stem}.npz": m.md5[medmnist.SIZES.index(size)]}, mean=(0.5,) * m.channels,
        std=(0.5,) * m.channels, hflip=m.hflip, classes=m.classes,
        shape=(len(m.classes), m.channels, size))


DATASETS: dict[str, DatasetInfo] = {
    "fmnist": DatasetInfo(
        name="fmnist", title="Fashion-MNIST", kind="idx",
        description="Fashion-MNIST: 60k/10k 28×28 grayscale clothing images, 10 classes",
        dirs=("fashion-mnist", "fmnist", "FashionMNIST/raw"), files=_IDX_FILES,
        urls=tuple(f"{_FMNIST_URL}{f}.gz" for f in _IDX_FILES),
        md5={"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
             "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
             "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
             "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
        mean=(0.286,), std=(0.353,), hflip=True,
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"),
        apt="dataset-fashion-mnist"),
    "mnist": DatasetInfo(
        name="mnist", title="MNIST", kind="idx",
        description="MNIST: 60k/10k 28×28 grayscale handwritten digits, 10 classes",
        dirs=("mnist", "MNIST/raw"), files=_IDX_FILES,
        urls=tuple(f"{_MNIST_URL}{f}.gz" for f in _IDX_FILES),
        md5={"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
             "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
             "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
        mean=(0.1307,), std=(0.3081,), hflip=False, classes=_DIGITS),
    "cifar10": DatasetInfo(
        name="cifar10", title="CIFAR-10", kind="cifar10",
        description="CIFAR-10: 50k/10k 32×32 colour images, 10 classes",
        dirs=("cifar-10-batches-py",),
        files=tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
        urls=("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
        md5={"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
        mean=IMAGENET_MEAN, std=IMAGENET_STD, hflip=True),
    "cifar100": DatasetInfo(
        name="cifar100", title="CIFAR-100", kind="cifar100",
        description="CIFAR-100: 50k/10k 32×32 colour images, 100 fine classes",
        dirs=("cifar-100-python",), files=("train", "test", "meta"),
        urls=("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
        md5={"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"},
        mean=(0.507, 0.487, 0.441), std=(0.267, 0.256, 0.276), hflip=True,
        # the FairFAL code's CIFAR-100-LT class inherits its CIFAR-10-LT class's transform
        code_mean=IMAGENET_MEAN, code_std=IMAGENET_STD),
    "svhn": DatasetInfo(
        name="svhn", title="SVHN", kind="svhn",
        description="SVHN: 73k/26k 32×32 colour house-number digits, 10 classes",
        dirs=("svhn", ""), files=("train_32x32.mat", "test_32x32.mat"),
        urls=("http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
              "http://ufldl.stanford.edu/housenumbers/test_32x32.mat"),
        md5={"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
             "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"},
        mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970), hflip=False,
        classes=_DIGITS),
    "tinyimagenet": DatasetInfo(
        name="tinyimagenet", title="Tiny-ImageNet", kind="tinyimagenet",
        description="Tiny-ImageNet-200: 100k/10k 64×64 colour images, 200 classes (val = test)",
        dirs=("tiny-imagenet-200",), files=("wnids.txt", "train", "val/val_annotations.txt"),
        urls=("http://cs231n.stanford.edu/tiny-imagenet-200.zip",),
        md5={"tiny-imagenet-200.zip": "90528d7ca1a48142e341f4ef8d21d0de"},
        mean=IMAGENET_MEAN, std=IMAGENET_STD, hflip=True, crop_pad=4),
    "digits": DatasetInfo(
        name="digits", title="scikit-learn digits", kind="digits",
        description="digits: 1442/355 8×8 grayscale digits bundled with scikit-learn "
                    "(no download), 10 classes",
        hflip=False, classes=_DIGITS),
    **{name: _medmnist(name) for name in medmnist.SETS},
}
#: MedMNIST+ at 64/128/224 (``pathmnist_64`` ...): named like the files, not listed one by one
SIZED: dict[str, DatasetInfo] = {
    f"{name}_{size}": _medmnist(name, size) for name in medmnist.SETS
    for size in medmnist.SIZES[1:]}

# the built-in datasets' shapes, known without their files (`image_shape`)
for _name, _shape in {"fmnist": (10, 1, 28), "mnist": (10, 1, 28), "cifar10": (10, 3, 32),
                      "cifar100": (100, 3, 32), "svhn": (10, 3, 32),
                      "tinyimagenet": (200, 3, 64), "digits": (10, 1, 8)}.items():
    DATASETS[_name] = dataclasses.replace(DATASETS[_name], shape=_shape)


def image_shape(dataset: str) -> tuple[int, int, int] | None:
    """(classes, channels, image size) of a built-in dataset, None for any other."""
    key = dataset.strip().lower()
    info = _info(_ALIASES.get(key, key))
    return info.shape if info is not None else None


def _info(key: str) -> DatasetInfo | None:
    """A named dataset's info: DATASETS, or a MedMNIST+ size (``pathmnist_64``; ``_28`` is
    the plain name)."""
    if key.endswith("_28") and key[:-3] in medmnist.SETS:
        key = key[:-3]
    return DATASETS.get(key) or SIZED.get(key)


_ALIASES = {"fashion-mnist": "fmnist", "fashion_mnist": "fmnist", "fashionmnist": "fmnist",
            "cifar-10": "cifar10", "cifar-100": "cifar100", "tiny-imagenet": "tinyimagenet",
            "tiny-imagenet-200": "tinyimagenet", "tiny_imagenet": "tinyimagenet"}
#: The generic forms, (pattern, description); not in describe() as they have no fixed location.
GENERIC_FORMATS = [
    ("npz:<file>", "any .npz with x_train, y_train, x_test, y_test (optional classes, "
                   "mean, std)"),
    ("imagefolder:<dir>", "<dir>/train/<class>/*.png|jpg|bmp and <dir>/test/<class>/... "
                          "(or train/<site>/<class>/: the sites' own split)"),
    ("csv:<file>", "an index with columns path, label, split (train|test) and optional site; "
                   "paths relative to the file"),
]


# -- public API ----------------------------------------------------------------------------

def describe() -> list[tuple[str, str]]:
    """(name, one-line description) of every named dataset, for ``falkit list``; the
    generic ``npz:``/``imagefolder:`` forms are in :data:`GENERIC_FORMATS`."""
    return [(n, i.description) for n, i in DATASETS.items()]


def data_roots(data_root: str | Path | None = None) -> list[Path]:
    """Directories searched for data, in order: ``data_root``, ``$FALKIT_DATA`` (several may
    be joined with ``os.pathsep``), ``~/.cache/falkit``, ``~/.medmnist`` (the medmnist
    package's), ``/usr/share/datasets``. In each, a dataset's own folders (for
    torchvision's layout too: ``FashionMNIST/raw``, ``MNIST/raw``, ``cifar-10-batches-py``,
    ``cifar-100-python``, SVHN's ``.mat`` files in the root). They need not exist; callers
    check."""
    return _dedupe(_user_roots(data_root) + [SYSTEM_ROOT])


def find(name: str, data_root: str | Path | None = None) -> Path | None:
    """Where the files of ``name`` are (a directory, or the file of one-file datasets)."""
    kind, arg = _parse(name)
    if kind == "npz":
        return _existing_local(arg, data_root, want_dir=False)
    if kind == "imagefolder":
        return _existing_local(arg, data_root, want_dir=True)
    if kind == "csv":
        return _existing_local(arg, data_root, want_dir=False)
    info = _info(arg)
    assert info is not None  # _parse checked
    if info.kind == "digits":
        return _digits_file()
    return _locate(info, data_roots(data_root))


#: data.val_split: what to do with an official validation split (MedMNIST's)
VAL_SPLITS = ("ignore", "train", "test")


def check_val_split(name: str, val_split: str) -> None:
    """ConfigError unless ``val_split`` is one of VAL_SPLITS and, if not ``ignore``, dataset
    ``name`` has an official validation split."""
    if val_split not in VAL_SPLITS:
        raise ConfigError(f"data.val_split = {val_split!r} is not one of "
                          f"{', '.join(VAL_SPLITS)}")
    kind, arg = _parse(name)
    if val_split != "ignore" and (kind != "named" or _info(arg).kind != "medmnist"):
        raise ConfigError(f"data.val_split = {val_split!r}: {name.strip()} has no official "
                          "validation split (only the MedMNIST sets have one)")


def load(name: str, data_root: str | Path | None = None,
         val_split: str = "ignore") -> ImageDataset:
    """Read dataset ``name`` from the first data root holding it. ``val_split``, for datasets
    with an official validation split (MedMNIST): ``ignore`` it, add it to the ``train``
    split, or evaluate on it instead of the ``test`` split (for tuning)."""
    kind, arg = _parse(name)
    check_val_split(name, val_split)
    if kind == "npz":
        return _load_npz(_local(name, arg, data_root, want_dir=False), name.strip())
    if kind == "imagefolder":
        return _load_imagefolder(_local(name, arg, data_root, want_dir=True), name.strip())
    if kind == "csv":
        return _load_csv(_local(name, arg, data_root, want_dir=False), name.strip())
    if kind == "plugin":
        return _load_plugin(arg, data_root)
    info = _info(arg)
    assert info is not None  # _parse checked
    if info.kind == "digits":
        return _load_digits(info)
    roots = data_roots(data_root)
    where = _locate(info, roots)
    if where is None:
        raise DataNotFoundError(_not_found(info, roots, data_root))
    if info.kind == "medmnist":
        return _load_medmnist(info, where, val_split)
    return _LOADERS[info.kind](info, where)


def _load_plugin(name: str, data_root: str | Path | None) -> ImageDataset:
    """A plug-in's dataset: its function (data_root) -> ImageDataset, checked like a file."""
    from falkit import registry

    try:
        ds = registry.dataset(name)(data_root)
    except (ConfigError, FalkitError):
        raise
    except Exception as e:  # noqa: BLE001 (the plug-in's own failure, in one line)
        raise FalkitError(f"dataset {name!r}: the plug-in failed ({type(e).__name__}: "
                          f"{e})") from None
    if not isinstance(ds, ImageDataset):
        raise FalkitError(f"dataset {name!r}: the plug-in returned {type(ds).__name__}, not "
                          "a falkit.data.sources.ImageDataset")
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        if x.dtype != torch.uint8 or x.ndim != 4 or len(x) != len(y):
            raise FalkitError(f"dataset {name!r}: its {split} split must be uint8 N×C×H×W "
                              f"images with N labels, got {x.dtype} {tuple(x.shape)} and "
                              f"{len(y)} labels")
    return ds


def normalization(ds: ImageDataset, mode: str = "dataset"
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel (mean, std) a run normalises `ds` with: its own (`dataset`), or
    (`code`) the constants the FairFAL authors' code uses for that dataset where they
    differ (CIFAR-100: ImageNet's, inherited from its CIFAR-10-LT class)."""
    info = _info(ds.name) if mode == "code" else None
    if info is not None and info.code_mean is not None and info.code_std is not None:
        return info.code_mean, info.code_std
    return ds.mean, ds.std


def download(name: str, data_root: str | Path | None = None) -> Path:
    """Fetch ``name`` from its official URL into the first writable root (``data_root``,
    ``$FALKIT_DATA``, ``~/.cache/falkit``) and return :func:`find`'s answer. Data already
    present under any root is not fetched again; ``digits`` ships with scikit-learn and
    returns its bundled file. Every file appears atomically, after its md5 was checked."""
    kind, arg = _parse(name)
    if kind != "named":
        raise ConfigError(f"{name.strip()} is a local dataset; there is nothing to download")
    info = _info(arg)
    assert info is not None  # _parse checked
    found = find(arg, data_root)
    if found is not None:
        return found
    root = _writable_root(data_root)
    target = root / info.dirs[0]
    if info.archive:
        _download_archive(info, root, target)
    else:
        created = not target.exists()
        target.mkdir(parents=True, exist_ok=True)
        try:
            for url in info.urls:
                fname = _url_name(url)
                dest = target / fname
                expected = info.md5.get(fname)
                if dest.is_file() and (expected is None or _md5_file(dest) == expected):
                    continue  # an earlier, interrupted download got this far
                _fetch(info.name, url, dest, expected, target)
        except FalkitError:
            if created:
                with contextlib.suppress(OSError):  # only if still empty
                    target.rmdir()
            raise
    where = _locate(info, [root])
    if where is None:
        raise FalkitError(f"downloaded {info.name} into {target} but its files are incomplete "
                          f"(expected {', '.join(info.files)})")
    return where


# -- names and roots -----------------------------------------------------------------------

def _parse(name: str) -> tuple[str, str]:
    """("npz", path) | ("imagefolder", dir) | ("csv", path) | ("named", canonical name);
    unknown: ConfigError."""
    text = name.strip()
    for prefix in ("npz", "imagefolder", "csv"):
        if text.lower().startswith(prefix + ":"):
            arg = text[len(prefix) + 1:]
            if not arg:
                raise ConfigError(f"{text}: give a path after '{prefix}:'")
            return prefix, arg
    key = _ALIASES.get(text.lower(), text.lower())
    info = _info(key)
    if info is None:
        from falkit import registry  # a plug-in's dataset: entry point or module:function

        if registry.dataset(text) is not None:
            return "plugin", text
        raise ConfigError(f"unknown dataset {text!r}; choose one of {', '.join(DATASETS)}, "
                          "a MedMNIST set at 64/128/224 (e.g. pathmnist_64), npz:<file>, "
                          "imagefolder:<dir>, csv:<file> or a plug-in's (module:function)")
    return "named", info.name


def _user_roots(data_root: str | Path | None) -> list[Path]:
    roots: list[Path] = []
    if data_root is not None and str(data_root) != "":
        root = Path(data_root).expanduser()
        if not root.is_dir():
            what = "is a file" if root.exists() else "does not exist"
            warnings.warn(f"data.data_root {root} {what}; searching the other data roots",
                          stacklevel=3)
        roots.append(root)
    for part in os.environ.get("FALKIT_DATA", "").split(os.pathsep):
        if part.strip():
            roots.append(Path(part.strip()).expanduser())
    with contextlib.suppress(RuntimeError, KeyError):  # no home directory: skip that root
        roots.append(Path.home() / ".cache" / "falkit")
        roots.append(Path.home() / ".medmnist")  # the medmnist package's downloads
    return _dedupe(roots)


def _dedupe(paths: Sequence[Path]) -> list[Path]:
    return list(dict.fromkeys(paths))


def _present(base: Path, fname: str, kind: str) -> bool:
    if (base / fname).exists():
        return True
    return kind == "idx" and (base / (fname + ".gz")).is_file()


def _locate(info: DatasetInfo, roots: Sequence[Path]) -> Path | None:
    for root in roots:
        for sub in info.dirs:
            base = root / sub if sub else root
            if all(_present(base, f, info.kind) for f in info.files):
                # one-file datasets are named by their file, the others by their directory
                return base / info.files[0] if info.kind == "medmnist" else base
    return None


def _not_found(info: DatasetInfo, roots: Sequence[Path], data_root: str | Path | None) -> str:
    dirs = info.dirs[0]
    if len(info.dirs) > 1:
        dirs = "{" + ",".join(d or "." for d in info.dirs) + "}"
    files = ", ".join(f + ("[.gz]" if info.kind == "idx" else "") for f in info.files)
    how = [f"`apt-get install {info.apt}` (Debian/Ubuntu)"] if info.apt else []
    how.append(f"`falkit data download {info.name}`")
    target = (_user_roots(data_root) or list(roots))[0] / info.dirs[0]
    how.append(f"copy {files} to {target}/")
    return (f"{info.title} ({info.name}) not found: looked in <root>/{dirs} for roots "
            f"{', '.join(map(str, roots))}; get it with " + ", or ".join(how))


def _local(name: str, arg: str, data_root: str | Path | None, want_dir: bool) -> Path:
    found = _existing_local(arg, data_root, want_dir)
    if found is None:
        where = ", ".join(str(p) for p in _local_candidates(arg, data_root))
        what = "directory" if want_dir else "file"
        raise DataNotFoundError(f"{name.strip()}: no such {what} (looked at {where})")
    return found


def _local_candidates(arg: str, data_root: str | Path | None) -> list[Path]:
    path = Path(arg).expanduser()
    if path.is_absolute():
        return [path]
    # relative paths: the working directory first, then each data root
    return _dedupe([path] + [root / path for root in data_roots(data_root)])


def _existing_local(arg: str, data_root: str | Path | None, want_dir: bool) -> Path | None:
    for path in _local_candidates(arg, data_root):
        if path.is_dir() if want_dir else path.is_file():
            return path
    return None


def _digits_file() -> Path | None:
    # find_spec does not import scikit-learn (slow); its digits are a bundled csv.gz
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


# -- building and checking -----------------------------------------------------------------

@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn what a broken file raises into one FalkitError naming the file."""
    try:
        yield
    except FalkitError:
        raise
    except KeyError as e:
        raise FalkitError(f"cannot read {path}: missing {e.args[0]!r}") from e
    except (OSError, EOFError, ValueError, TypeError, IndexError, NotImplementedError,
            MemoryError, pickle.UnpicklingError, zlib.error, zipfile.BadZipFile,
            tarfile.TarError) as e:
        reason = str(e) or type(e).__name__
        raise FalkitError(f"cannot read {path}: {reason}") from e


def _to_nchw(x: np.ndarray, where: str) -> np.ndarray:
    """N×H×W, N×H×W×C or N×C×H×W (C in 1, 3) to N×C×H×W; the channel axis is the one of
    size 1 or 3 among axis 1 and the last."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        first, last = x.shape[1] in (1, 3), x.shape[3] in (1, 3)
        if last and not first:
            return x.transpose(0, 3, 1, 2)
        if first and not last:
            return x
        if first and last:
            raise FalkitError(f"{where}: cannot tell the channel axis of shape {x.shape}")
    raise FalkitError(f"{where}: images must be N×H×W, N×H×W×C or N×C×H×W with 1 or 3 "
                      f"channels, got shape {x.shape}")


def _to_uint8(x: np.ndarray, where: str) -> np.ndarray:
    """uint8 as is; other integers in 0..255 cast; floats in [0, 1] scaled by 255."""
    if x.dtype == np.uint8:
        return x
    if x.size == 0:
        return x.astype(np.uint8)
    if np.issubdtype(x.dtype, np.integer) and not np.issubdtype(x.dtype, np.bool_):
        if x.min() < 0 or x.max() > 255:
            raise FalkitError(f"{where}: integer pixels must be in 0..255, "
                              f"got {x.min()}..{x.max()}")
        return x.astype(np.uint8)
    if np.issubdtype(x.dtype, np.floating):
        lo, hi = float(np.min(x)), float(np.max(x))
        if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
            raise FalkitError(f"{where}: float pixels must be in [0, 1], got {lo:g}..{hi:g}")
        return np.rint(x * 255.0).astype(np.uint8)
    raise FalkitError(f"{where}: pixels must be uint8 or floats in [0, 1], got {x.dtype}")


def _to_labels(y: np.ndarray, where: str) -> np.ndarray:
    """Integer class indices of shape (N,) or (N, 1) to int64 (N,)."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise FalkitError(f"{where}: labels must have shape (N,) or (N, 1), got {y.shape}")
    if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
        y = y.astype(np.int64)  # integral floats, as MATLAB and some exporters write them
    if not np.issubdtype(y.dtype, np.integer):
        raise FalkitError(f"{where}: labels must be integers, got {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise FalkitError(f"{where}: negative label {y.min()}")
    return y


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std of x/255 via a 256-bin histogram (no float copy of x)."""
    means, stds = [], []
    levels = np.arange(256, dtype=np.float64) / 255.0
    for c in range(x.shape[1]):
        hist = np.bincount(x[:, c].ravel(), minlength=256).astype(np.float64)
        n = hist.sum()
        if n == 0:
            means.append(0.0)
            stds.append(1.0)
            continue
        mean = float(hist @ levels / n)
        var = float(hist @ (levels - mean) ** 2 / n)
        means.append(mean)
        # a constant channel would divide by zero when normalising
        stds.append(var**0.5 if var > 0 else 1.0)
    return tuple(means), tuple(stds)


def _build(name: str, source: Path | str, x_train: np.ndarray, y_train: np.ndarray,
           x_test: np.ndarray, y_test: np.ndarray, classes: Sequence[str] | None,
           mean: tuple[float, ...] | None, std: tuple[float, ...] | None,
           hflip: bool, crop_pad: int, site_train: np.ndarray | None = None,
           sites: Sequence[str] | None = None) -> ImageDataset:
    """Check shapes, dtypes and labels once for every format, then wrap as tensors."""
    src = str(source)
    if site_train is not None:
        site_train, sites = _check_sites(src, site_train, sites, len(y_train))
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise FalkitError(f"{src}: {split} images must be uint8 N×C×H×W with C in 1, 3, "
                              f"got {x.dtype} {x.shape}")
        if len(x) != len(y):
            raise FalkitError(f"{src}: {len(x)} {split} images but {len(y)} labels")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise FalkitError(f"{src}: train images are {x_train.shape[1:]} but test images "
                          f"{x_test.shape[1:]} (C×H×W)")
    if len(x_train) == 0:
        raise FalkitError(f"{src}: the train split is empty")
    if len(x_test) == 0:
        raise FalkitError(f"{src}: the test split is empty (accuracy needs test images)")
    top = int(max(y_train.max(initial=-1), y_test.max(initial=-1)))
    present = np.unique(y_train)
    if classes is None:
        # C = the labels' own range: a label past a gap is a stray value, not 990 classes
        missing = np.setdiff1d(np.arange(top + 1), present)
        if len(missing):
            m = int(missing[0])
            if m in set(np.unique(y_test).tolist()):
                why = f"label {m} has test samples but no train sample"
            else:
                stray = int(min(v for v in np.union1d(present, y_test) if v > m))
                why = f"label {stray} follows a gap (no sample of label {m})"
            raise FalkitError(f"{src}: {why}; labels must be 0..C-1, every one with train "
                              "samples (give a `classes` array to declare the classes)")
        classes = [str(i) for i in range(top + 1)]
    classes = [str(c) for c in classes]
    if top >= len(classes):
        raise FalkitError(f"{src}: label {top} out of range for {len(classes)} classes "
                          f"(labels must be 0..{len(classes) - 1})")
    empty = [classes[c] for c in np.setdiff1d(np.arange(len(classes)), present)]
    if empty:
        warnings.warn(f"{src}: no train sample of class {', '.join(empty[:5])}"
                      f"{' ...' if len(empty) > 5 else ''}", stacklevel=3)
    if mean is None or std is None:
        mean, std = _channel_stats(x_train)
    if len(mean) != x_train.shape[1] or len(std) != x_train.shape[1]:
        raise FalkitError(f"{src}: {x_train.shape[1]}-channel images but mean/std for "
                          f"{len(mean)} channels")
    return ImageDataset(
        name=name, classes=classes, mean=tuple(mean), std=tuple(std), hflip=hflip,
        crop_pad=crop_pad, source=src,
        x_train=torch.from_numpy(np.ascontiguousarray(x_train)),
        y_train=np.ascontiguousarray(y_train, dtype=np.int64),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test)),
        y_test=np.ascontiguousarray(y_test, dtype=np.int64),
        site_train=site_train, sites=sites)


def _check_sites(src: str, site: np.ndarray, names: Sequence[str] | None, n: int
                 ) -> tuple[np.ndarray, list[str]]:
    """The site of each of `n` train samples: integers 0..S-1, every site with a sample;
    its names (default "0".."S-1")."""
    site = np.asarray(site)
    if site.ndim != 1 or len(site) != n or (len(site) and not (
            np.issubdtype(site.dtype, np.integer) or
            (np.issubdtype(site.dtype, np.floating) and np.isfinite(site).all()
             and (site == np.round(site)).all()))):
        raise FalkitError(f"{src}: site_train must be one integer site per train sample "
                          f"({n}), got {site.dtype} {site.shape}")
    site = site.astype(np.int64)
    if len(site) and site.min() < 0:
        raise FalkitError(f"{src}: site_train holds {int(site.min())}; sites are 0..S-1")
    count = int(site.max()) + 1 if len(site) else 0
    empty = np.setdiff1d(np.arange(count), site)
    if len(empty):
        raise FalkitError(f"{src}: site {int(empty[0])} has no train sample; sites are "
                          "0..S-1, each with samples")
    names = [str(x) for x in names] if names is not None else [str(i) for i in range(count)]
    if len(names) != count:
        raise FalkitError(f"{src}: {len(names)} site names for {count} sites")
    return np.ascontiguousarray(site), names


def _build_named(info: DatasetInfo, source: Path | str, x_train: np.ndarray,
                 y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 classes: Sequence[str] | None = None) -> ImageDataset:
    return _build(info.name, source, x_train, y_train, x_test, y_test,
                  classes if classes is not None else info.classes,
                  info.mean, info.std, info.hflip, info.crop_pad)


# -- idx (MNIST, Fashion-MNIST) ------------------------------------------------------------

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: Path) -> np.ndarray:
    """One idx file (optionally gzipped): magic 0 0 <dtype> <ndim>, big-endian u32 dims, data."""
    with _reading(path):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise FalkitError(f"cannot read {path}: not an idx file (magic number "
                          f"0x{raw[:4].hex() or 'empty'})")
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise FalkitError(f"cannot read {path}: truncated idx header")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    count = int(np.prod(dims))
    if len(raw) != header + count * dtype.itemsize:
        raise FalkitError(f"cannot read {path}: {len(raw) - header} data bytes but the header "
                          f"says {dims} of {dtype.itemsize} bytes (truncated?)")
    arr = np.frombuffer(raw, dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # a native, writable copy


def _load_idx(info: DatasetInfo, base: Path) -> ImageDataset:
    def path(stem: str) -> Path:
        plain = base / stem
        return plain if plain.exists() else base / (stem + ".gz")

    splits = []
    for prefix in ("train", "t10k"):
        xp, yp = path(f"{prefix}-images-idx3-ubyte"), path(f"{prefix}-labels-idx1-ubyte")
        x, y = _read_idx(xp), _read_idx(yp)
        if x.ndim != 3 or x.dtype != np.uint8:
            raise FalkitError(f"cannot read {xp}: expected uint8 images N×H×W, got {x.dtype} "
                              f"{x.shape}")
        if len(x) != len(y):
            raise FalkitError(f"{xp} holds {len(x)} images but {yp} {len(y)} labels")
        splits += [x[:, None], _to_labels(y, str(yp))]
    return _build_named(info, base, *splits)


# -- CIFAR ---------------------------------------------------------------------------------

class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds only numpy arrays: CIFAR ships pickles, and a pickle may otherwise run code."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
                ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str) -> object:
        canon = module
        if module.startswith("numpy.core."):  # written by numpy 1.x, as CIFAR's are
            canon = "numpy._core." + module[len("numpy.core."):]
        if (canon, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        try:
            return super().find_class(canon, name)
        except (ImportError, AttributeError):  # numpy < 1.26 has no numpy._core
            return super().find_class(canon.replace("numpy._core.", "numpy.core.", 1), name)


def _unpickle(path: Path) -> dict:
    with _reading(path), open(path, "rb") as f:
        try:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
        except pickle.UnpicklingError as e:
            raise FalkitError(f"cannot read {path}: not a CIFAR python pickle ({e})") from e
    if not isinstance(obj, dict):
        raise FalkitError(f"cannot read {path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _entry(d: dict, key: bytes, path: Path) -> object:
    if key in d:
        return d[key]
    if key.decode() in d:  # pickled under Python 3 with str keys
        return d[key.decode()]
    raise FalkitError(f"cannot read {path}: missing key {key.decode()!r}")


def _cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    x = np.asarray(_entry(d, b"data", path))
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise FalkitError(f"cannot read {path}: 'data' must be uint8 N×3072, got {x.dtype} "
                          f"{x.shape}")
    y = _to_labels(np.asarray(_entry(d, label_key, path)), str(path))
    if len(y) != len(x):
        raise FalkitError(f"cannot read {path}: {len(x)} images but {len(y)} labels")
    # each row holds the R, G and B planes one after the other, each row-major 32×32
    return x.reshape(-1, 3, 32, 32), y


def _cifar_names(path: Path, key: bytes) -> list[str]:
    names = _entry(_unpickle(path), key, path)
    try:
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    except (TypeError, UnicodeDecodeError) as e:
        raise FalkitError(f"cannot read {path}: bad {key.decode()!r}: {e}") from e


def _load_cifar10(info: DatasetInfo, base: Path) -> ImageDataset:
    parts = [_cifar_batch(base / f"data_batch_{i}", b"labels") for i in range(1, 6)]
    x_test, y_test = _cifar_batch(base / "test_batch", b"labels")
    return _build_named(info, base, np.concatenate([p[0] for p in parts]),
                        np.concatenate([p[1] for p in parts]), x_test, y_test,
                        _cifar_names(base / "batches.meta", b"label_names"))


def _load_cifar100(info: DatasetInfo, base: Path) -> ImageDataset:
    x_train, y_train = _cifar_batch(base / "train", b"fine_labels")
    x_test, y_test = _cifar_batch(base / "test", b"fine_labels")
    return _build_named(info, base, x_train, y_train, x_test, y_test,
                        _cifar_names(base / "meta", b"fine_label_names"))


# -- SVHN ----------------------------------------------------------------------------------

def _svhn_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io  # lazily: importing scipy.io costs startup time for everyone else

    with _reading(path):
        try:
            mat = scipy.io.loadmat(str(path))
        except scipy.io.matlab.MatReadError as e:  # not a ValueError
            raise FalkitError(f"cannot read {path}: {e}") from e
    if "X" not in mat or "y" not in mat:
        raise FalkitError(f"cannot read {path}: expected variables 'X' and 'y'")
    x, y = np.asarray(mat["X"]), _to_labels(np.asarray(mat["y"]), str(path))
    if x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8:
        raise FalkitError(f"cannot read {path}: 'X' must be uint8 H×W×3×N, got {x.dtype} "
                          f"{x.shape}")
    if x.shape[3] != len(y):
        raise FalkitError(f"cannot read {path}: {x.shape[3]} images but {len(y)} labels")
    y[y == 10] = 0  # SVHN labels the digit 0 as 10
    return x.transpose(3, 2, 0, 1), y


def _load_svhn(info: DatasetInfo, base: Path) -> ImageDataset:
    x_train, y_train = _svhn_split(base / "train_32x32.mat")
    x_test, y_test = _svhn_split(base / "test_32x32.mat")
    return _build_named(info, base, x_train, y_train, x_test, y_test)


# -- npz (MedMNIST and generic) ------------------------------------------------------------

def _npz_arrays(path: Path, keys: Sequence[str], optional: Sequence[str] = ()) -> dict:
    with _reading(path), path.open("rb") as f:
        head = f.read(6)
    if not head.startswith((b"PK\x03\x04", b"\x93NUMPY")):  # a zip (savez) or one .npy
        raise FalkitError(f"cannot read {path}: not an npz archive (numpy.savez writes one)")
    with _reading(path), np.load(path, allow_pickle=False) as z:
        if not hasattr(z, "files"):
            raise FalkitError(f"cannot read {path}: a single array, not an npz archive")
        missing = [k for k in keys if k not in z.files]
        if missing:
            raise FalkitError(f"cannot read {path}: missing arrays {', '.join(missing)} "
                              f"(it has {', '.join(z.files) or 'none'})")
        return {k: z[k] for k in [*keys, *optional] if k in z.files}


def _medmnist_labels(y: np.ndarray, where: str, multilabel: bool) -> np.ndarray:
    if not multilabel:
        return _to_labels(y, where)
    # ChestMNIST: N × 14 findings (0/1) -> falkit's binary task, 1 = any finding
    y = np.asarray(y)
    if y.ndim != 2 or y.shape[1] != len(medmnist.CHEST_FINDINGS) or \
            not np.isin(y, (0, 1)).all():
        raise FalkitError(f"{where}: ChestMNIST labels must be N×14 of 0/1, got {y.dtype} "
                          f"{y.shape}")
    return y.any(axis=1).astype(np.int64)


def _load_medmnist(info: DatasetInfo, path: Path, val_split: str = "ignore") -> ImageDataset:
    """MedMNIST's train and test splits; its val split left out ("ignore"), added to the
    train split ("train") or evaluated on instead of the test split ("test")."""
    # only the splits used are read: the 224×224 files hold gigabytes
    test = "val" if val_split == "test" else "test"  # "test": tune on val, never on test
    splits = ("train", test) + (("val",) if val_split == "train" else ())
    a = _npz_arrays(path, [f"{s}_{k}" for s in splits for k in ("images", "labels")])
    where = str(path)
    multilabel = info.name.partition("_")[0] == "chestmnist"
    x, y = {}, {}
    for s in splits:  # each raw array is dropped once converted (peak: one extra copy)
        x[s] = _to_uint8(_to_nchw(a.pop(f"{s}_images"), where), where)
        y[s] = _medmnist_labels(a.pop(f"{s}_labels"), f"{where}: {s}_labels", multilabel)
    if val_split == "train":  # train on train + val (MedMNIST's final-model protocol)
        x["train"] = np.concatenate([x["train"], x.pop("val")])
        y["train"] = np.concatenate([y["train"], y.pop("val")])
    return _build_named(info, path, x["train"], y["train"], x[test], y[test])


def _load_npz(path: Path, name: str) -> ImageDataset:
    a = _npz_arrays(path, ("x_train", "y_train", "x_test", "y_test"),
                    optional=("classes", "mean", "std", "site_train", "sites"))
    where = str(path)
    classes = None
    if "classes" in a:
        classes = [str(c) for c in np.asarray(a["classes"]).ravel()]
    # sites of one federation normalise alike only with agreed constants: optional per-
    # channel `mean` and `std` of x/255 (default: this file's own train split's)
    norm: dict[str, tuple[float, ...] | None] = {"mean": None, "std": None}
    if "sites" in a and "site_train" not in a:
        raise FalkitError(f"{where}: `sites` names the sites of `site_train`, which is missing")
    if ("mean" in a) != ("std" in a):
        raise FalkitError(f"{where}: give both `mean` and `std` (per channel, of x/255) "
                          "or neither")
    for k in ("mean", "std") if "mean" in a else ():
        v = np.asarray(a[k])
        if v.ndim > 1 or not np.issubdtype(v.dtype, np.number) or not np.isfinite(v).all() \
                or (k == "std" and (v <= 0).any()):
            raise FalkitError(f"{where}: `{k}` must be finite per-channel numbers"
                              f"{' > 0' if k == 'std' else ''}, got {v.dtype} {v.shape}")
        norm[k] = tuple(float(x) for x in v.ravel())
    return _build(name, path, _to_uint8(_to_nchw(a["x_train"], f"{where}: x_train"), where),
                  _to_labels(a["y_train"], f"{where}: y_train"),
                  _to_uint8(_to_nchw(a["x_test"], f"{where}: x_test"), where),
                  _to_labels(a["y_test"], f"{where}: y_test"),
                  classes, norm["mean"], norm["std"], hflip=False, crop_pad=0,
                  site_train=a.get("site_train"),
                  sites=[str(x) for x in np.asarray(a["sites"]).ravel()] if "sites" in a
                  else None)


# -- image files (Tiny-ImageNet, imagefolder) ----------------------------------------------

def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_EXTS and p.is_file())


def _read_images(paths: Sequence[Path], mode: str) -> np.ndarray:
    """Decode images as ``mode`` ("L" or "RGB") into one uint8 N×C×H×W array; all images
    must share the first one's size."""
    from PIL import Image  # lazily, like scipy

    channels = 1 if mode == "L" else 3
    out: np.ndarray | None = None
    for i, p in enumerate(paths):
        with _reading(p), Image.open(p) as im:
            if out is None:
                out = np.empty((len(paths), channels, im.height, im.width), np.uint8)
            if im.size != (out.shape[3], out.shape[2]):
                raise FalkitError(f"{p} is {im.width}×{im.height} but {paths[0]} is "
                                  f"{out.shape[3]}×{out.shape[2]}; all images must share a size")
            arr = np.asarray(im if im.mode == mode else im.convert(mode))
        out[i] = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return out if out is not None else np.empty((0, channels, 1, 1), np.uint8)


def _read_lines(path: Path) -> list[str]:
    with _reading(path):
        return [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines()]


def _load_tinyimagenet(info: DatasetInfo, base: Path) -> ImageDataset:
    wnids = sorted({w.strip() for w in _read_lines(base / "wnids.txt") if w.strip()})
    index = {w: i for i, w in enumerate(wnids)}
    names = dict.fromkeys(wnids, "")
    if (base / "words.txt").is_file():  # optional: wnid \t "name, synonym, ..."
        for line in _read_lines(base / "words.txt"):
            wnid, _, words = line.partition("\t")
            if wnid in names:
                names[wnid] = words.split(",")[0].strip()
    train_paths, train_labels = [], []
    for w in wnids:
        folder = base / "train" / w / "images"
        if not folder.is_dir():
            raise FalkitError(f"{folder} is missing (class {w} of {base / 'wnids.txt'})")
        files = _image_files(folder)
        train_paths += files
        train_labels += [index[w]] * len(files)
    test_paths, test_labels = [], []
    ann = base / "val" / "val_annotations.txt"
    for n, line in enumerate(_read_lines(ann), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise FalkitError(f"cannot read {ann}: line {n} is not '<file>\\t<wnid>...' with a "
                              f"wnid of wnids.txt: {line[:80]!r}")
        test_paths.append(base / "val" / "images" / parts[0])
        test_labels.append(index[parts[1]])
    return _build_named(info, base, _read_images(train_paths, "RGB"),
                        np.array(train_labels, np.int64), _read_images(test_paths, "RGB"),
                        np.array(test_labels, np.int64),
                        [names[w] or w for w in wnids])


def _mode_of(paths: Sequence[Path]) -> str:
    """"L" if every image is 8-bit grayscale (one channel kept), else "RGB"; opening an
    image reads just its header."""
    from PIL import Image

    for p in paths:
        with _reading(p), Image.open(p) as im:
            if im.mode != "L":
                return "RGB"
    return "L"


def _load_imagefolder(root: Path, name: str) -> ImageDataset:
    """train/<class>/ and test/<class>/; or train/<site>/<class>/ (each train folder holds
    class folders and no image): the sites' own split, sites and classes in name order."""

    train_dir, test_dir = root / "train", root / "test"
    if not train_dir.is_dir() or not test_dir.is_dir():
        raise FalkitError(f"{root}: expected subfolders train/<class>/ and test/<class>/")
    tops = sorted(d for d in train_dir.iterdir() if d.is_dir())
    by_site = bool(tops) and all(not _image_files(d) and any(c.is_dir() for c in d.iterdir())
                                 for d in tops)
    site_dirs = tops if by_site else [train_dir]
    classes = sorted({c.name for d in site_dirs for c in d.iterdir() if c.is_dir()})
    extra = sorted({d.name for d in test_dir.iterdir() if d.is_dir()} - set(classes))
    if extra:
        raise FalkitError(f"{test_dir}: classes {', '.join(extra)} have no folder in {train_dir}")

    def files(folders: list[Path]) -> tuple[list[Path], np.ndarray, np.ndarray]:
        paths, labels, site = [], [], []
        for s_i, folder in enumerate(folders):
            for i, c in enumerate(classes):
                if (folder / c).is_dir():
                    found = _image_files(folder / c)
                    paths += found
                    labels += [i] * len(found)
                    site += [s_i] * len(found)
        return paths, np.array(labels, np.int64), np.array(site, np.int64)

    train_paths, train_y, train_site = files(site_dirs)
    test_paths, test_y, _ = files([test_dir])
    if not train_paths:
        raise FalkitError(f"{train_dir}: no .png/.jpg/.jpeg/.bmp images in its class folders")
    mode = _mode_of(train_paths + test_paths)
    x_train, x_test = (_read_images(paths, mode) for paths in (train_paths, test_paths))
    if len(x_test) and x_test.shape[2:] != x_train.shape[2:]:
        raise FalkitError(f"{test_paths[0]} is {x_test.shape[3]}×{x_test.shape[2]} but "
                          f"{train_paths[0]} is {x_train.shape[3]}×{x_train.shape[2]}; "
                          f"all images must share a size")
    if not len(x_test):
        x_test = np.empty((0, *x_train.shape[1:]), np.uint8)
    return _build(name, root, x_train, train_y, x_test, test_y, classes, None, None,
                  hflip=False, crop_pad=0, site_train=train_site if by_site else None,
                  sites=[d.name for d in tops] if by_site else None)


def _load_csv(path: Path, name: str) -> ImageDataset:
    """An index of image files: a header with `path`, `label`, `split` (train | test) and
    optionally `site` (the sites' own split); paths relative to the index's folder. Classes
    in name order (numeric order where every label is an integer), sites likewise."""
    import csv


    with _reading(path), path.open(newline="", encoding="utf-8-sig") as f:  # (Excel's BOM)
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        missing = [c for c in ("path", "label", "split") if c not in cols]
        if missing:
            raise FalkitError(f"cannot read {path}: no column {', '.join(missing)} in its "
                              f"header (it has {', '.join(cols) or 'none'}; want path, label, "
                              "split and optional site)")
        rows = list(reader)
    if not rows:
        raise FalkitError(f"{path}: no rows below the header")
    has_site = "site" in cols
    for n, r in enumerate(rows, 2):
        if r["split"] not in ("train", "test"):
            raise FalkitError(f"{path}: line {n}: split must be train or test, got "
                              f"{r['split']!r}")
        if not r["path"] or not r["label"] or (has_site and r["split"] == "train"
                                                and not r["site"]):
            raise FalkitError(f"{path}: line {n}: an empty path, label or site")

    def order(values: set[str]) -> list[str]:
        numeric = all(v.lstrip("-").isdigit() for v in values)
        return sorted(values, key=int) if numeric else sorted(values)

    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    if not train:
        raise FalkitError(f"{path}: no train rows")
    classes = order({r["label"] for r in train})
    unknown = sorted({r["label"] for r in test} - set(classes))
    if unknown:
        raise FalkitError(f"{path}: test labels {', '.join(unknown[:5])} have no train row")
    index = {c: i for i, c in enumerate(classes)}
    base = path.parent
    paths = {k: [base / r["path"] for r in part] for k, part in (("train", train),
                                                                 ("test", test))}
    for p in paths["train"] + paths["test"]:
        if not p.is_file():
            raise FalkitError(f"{path}: {p} is not a file")
    mode = _mode_of(paths["train"] + paths["test"])
    x_train = _read_images(paths["train"], mode)
    x_test = (_read_images(paths["test"], mode) if test
              else np.empty((0, *x_train.shape[1:]), np.uint8))
    sites = order({r["site"] for r in train}) if has_site else None
    site_train = (np.array([sites.index(r["site"]) for r in train], np.int64)
                  if sites is not None else None)
    return _build(name, path, x_train, np.array([index[r["label"]] for r in train], np.int64),
                  x_test, np.array([index[r["label"]] for r in test], np.int64), classes,
                  None, None, hflip=False, crop_pad=0, site_train=site_train, sites=sites)


# -- digits --------------------------------------------------------------------------------

def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797×8×8, values 0–16) and targets, read from the
    file scikit-learn ships (what `sklearn.datasets.load_digits` reads) without importing
    scikit-learn, which takes seconds — every Flower ClientApp message starts a process."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = (Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" /
            "digits.csv.gz") if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target
    with gzip.open(path, "rt") as fh:
        data = np.loadtxt(fh, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def _load_digits(info: DatasetInfo) -> ImageDataset:
    images, target = digits_arrays()
    x = np.rint(images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = target.astype(np.int64)
    # every 5th image of each class is test: stratified, 80/20, and no RNG to drift
    rank = np.zeros(len(y), np.int64)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        rank[members] = np.arange(len(members))
    test = rank % 5 == 4
    return _build_named(info, "sklearn", x[~test], y[~test], x[test], y[test])


_LOADERS = {"idx": _load_idx, "cifar10": _load_cifar10, "cifar100": _load_cifar100,
            "svhn": _load_svhn, "tinyimagenet": _load_tinyimagenet}  # medmnist: load()


# -- download ------------------------------------------------------------------------------

def _url_name(url: str) -> str:
    return Path(urllib.parse.urlparse(url).path).name


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _writable_root(data_root: str | Path | None) -> Path:
    tried = _user_roots(data_root)
    for root in tried:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(root, os.W_OK | os.X_OK):
            return root
    raise FalkitError(f"no writable data root among {', '.join(map(str, tried))}; set "
                      f"FALKIT_DATA to a writable directory")


def _fetch(name: str, url: str, dest: Path, md5: str | None, copy_to: Path) -> None:
    """Download ``url`` to ``dest`` through a temporary file in the same directory, renamed
    only once complete and verified, so ``dest`` is never half-written."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, \
                urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if md5 is not None and digest.hexdigest() != md5:
            raise FalkitError(f"download of {name} from {url} is corrupt (md5 "
                              f"{digest.hexdigest()}, expected {md5}); retry, or copy the "
                              f"files to {copy_to} instead")
        os.replace(tmp, dest)
    except FalkitError:
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = e.reason if type(e) is urllib.error.URLError else e
        raise FalkitError(f"cannot download {name} from {url}: {reason}; copy the files to "
                          f"{copy_to} instead") from e
    finally:
        tmp.unlink(missing_ok=True)


def _extract(archive: Path, dest: Path) -> None:
    with _reading(archive):
        if archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as z:
                z.extractall(dest)  # zipfile drops absolute paths and '..' itself
        else:
            with tarfile.open(archive) as t:
                t.extractall(dest, filter="data")  # refuses paths escaping dest, links, devices


def _download_archive(info: DatasetInfo, root: Path, target: Path) -> None:
    """Fetch and unpack into a scratch directory inside ``root``, then rename the dataset
    directory into place: a failure at any point leaves nothing behind."""
    if target.exists() and any(target.iterdir()):
        raise FalkitError(f"{target} exists but lacks files of {info.name}; move it away and "
                          f"run `falkit data download {info.name}` again")
    url = info.urls[0]
    with tempfile.TemporaryDirectory(dir=root, prefix=".falkit-download-") as scratch:
        archive = Path(scratch) / _url_name(url)
        _fetch(info.name, url, archive, info.md5.get(archive.name), target)
        unpacked = Path(scratch) / "unpacked"
        _extract(archive, unpacked)
        archive.unlink()
        inner = unpacked / info.dirs[0]
        if not inner.is_dir():
            raise FalkitError(f"{url} does not contain {info.dirs[0]}/; copy the files to "
                              f"{target} instead")
        if target.exists():
            target.rmdir()  # empty, checked above
        os.replace(inner, target)
        shutil.rmtree(unpacked, ignore_errors=True)
