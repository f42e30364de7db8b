"""Frozen encoders for FAST (ALGORITHMS.md §6): image → embedding, computed in batches and
cached on disk.

Registry by spec string (timm style, `create("hf:/models/siglip")`):

* `pixels` — the flattened image in [0, 1]. Offline, no weights.
* `pca` / `pca:<dim>` — whitened PCA of the pixels (default 32 components: whitening
  amplifies the low-variance ones, which costs kNN accuracy at 64 or more), fitted on the
  train split of the dataset (at most 20 000 images, a seeded draw). Offline, no weights: it
  stands in for a foundation model in tests and in the offline demo, nothing more.
* `hf:<model dir or hub id>` — a transformers CLIP, SigLIP or DINOv2 checkpoint (full model or
  vision tower) with its image processor. A hub id is only looked up in the local Hugging Face
  cache: weights are never downloaded at run time.
* `open_clip:<arch>:<checkpoint file>` — open_clip's `create_model_and_transforms`.
* `timm:<name>:<checkpoint file>` — a timm model without its classifier, with timm's
  transform for that model.
* `torchscript:<file>` — a scripted module taking float images in [0, 1], N×3×H×W at the
  dataset's resolution, returning N×D (resizing and normalisation are the module's job).

transformers is the `[fm]` extra (open_clip and timm are installed by hand: they need a
torchvision built for the installed torch); a missing library or checkpoint is a ConfigError
that says what to install or where to put the file.

Device: `create(spec, device=...)` (FAST passes `runtime.device`) runs the encoder there:
its module and each batch of inputs are moved to the device, the embeddings come back to the
CPU as float32 NumPy. The pca fit itself stays on the CPU (float64, the same on every
machine); only its projection runs on the device.

Cache: `embed()` stores one `.npy` per (dataset, split, images, encoder identity,
preprocessing) under a key that hashes all of them — the image bytes themselves, the weights'
path, size and modification time, the processor's settings — so a changed input never reuses
a stale file. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from falkit.errors import ConfigError
from falkit.results import write_atomic

__all__ = ["ENCODERS", "Encoder", "create", "default_cache_dir", "describe", "embed",
           "fingerprint"]

CACHE_FORMAT = 1  # bump when the cache layout or an encoder's arithmetic changes
FM_HINT = "pip install 'falkit[fm]'"


class Encoder:
    """A frozen image encoder. `encode` takes uint8 N×C×H×W (on the CPU) and returns float32
    N×D (NumPy); it computes on `device`."""

    spec: str = ""
    batch_size: int = 64
    device: torch.device = torch.device("cpu")

    def identity(self) -> dict[str, Any]:
        """What determines the weights (for the cache key)."""
        return {"spec": self.spec}

    def preprocessing(self) -> dict[str, Any]:
        """What determines the input transform (for the cache key)."""
        return {}

    def fit(self, x_train: torch.Tensor) -> None:
        """Encoders fitted on data (pca) are fitted on the train split; others ignore it."""

    def encode_batch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def encode(self, x: torch.Tensor, progress: Callable[[int], None] | None = None
               ) -> np.ndarray:
        out = []
        for b in range(0, len(x), self.batch_size):
            z = self.encode_batch(x[b:b + self.batch_size])
            out.append(z.detach().float().reshape(len(z), -1).cpu())
            if progress is not None:
                progress(len(z))
        if not out:
            return np.zeros((0, 0), dtype=np.float32)
        return torch.cat(out).numpy().astype(np.float32, copy=False)


# -- offline built-ins ------------------------------------------------------------------------
class PixelEncoder(Encoder):
    spec = "pixels"

    def preprocessing(self) -> dict[str, Any]:
        return {"scale": "x/255", "layout": "flatten CHW"}

    def encode_batch(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device).reshape(len(x), -1).to(torch.float32) / 255.0


class PCAEncoder(Encoder):
    """Whitened PCA of the pixels (ALGORITHMS.md §6 "offline built-ins"): eigenvectors of the
    covariance of at most `fit_samples` train images (a draw seeded by `seed`), in float64,
    each with the sign that makes its largest-magnitude entry positive, so the fit is the same
    on any machine. z = (x/255 − μ) V / sqrt(λ)."""

    def __init__(self, dim: int = 32, seed: int = 0, fit_samples: int = 20000):
        if dim < 1:
            raise ConfigError(f"pca dimension must be >= 1, got {dim}")
        self.dim, self.seed, self.fit_samples = dim, seed, fit_samples
        self.spec = f"pca:{dim}"
        self._fit_on: str | None = None  # fingerprint of the fit data
        self._x_fit: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.components: torch.Tensor | None = None  # D_in × dim, scaled by 1/sqrt(λ)

    def identity(self) -> dict[str, Any]:
        if self._fit_on is None:
            raise RuntimeError("pca encoder: call fit(x_train) before encoding")
        return {"spec": self.spec, "seed": self.seed, "fit_samples": self.fit_samples,
                "fit_on": self._fit_on}

    def preprocessing(self) -> dict[str, Any]:
        return {"scale": "x/255", "layout": "flatten CHW", "whiten": True}

    def fit(self, x_train: torch.Tensor) -> None:
        # lazy: only the fingerprint now (the cache key); the fit itself when encoding
        self._fit_on = fingerprint(x_train)
        self._x_fit = x_train
        self.mean = self.components = None

    def _ensure_fitted(self) -> None:
        if self.components is not None:
            return
        if self._x_fit is None:
            raise RuntimeError("pca encoder: call fit(x_train) before encoding")
        x = self._x_fit
        n = len(x)
        if n > self.fit_samples:
            pick = np.sort(np.random.default_rng(self.seed).choice(n, self.fit_samples,
                                                                   replace=False))
            x = x[torch.as_tensor(pick)]
        xf = x.reshape(len(x), -1).to(torch.float64) / 255.0
        d_in = xf.shape[1]
        if self.dim > min(d_in, len(xf)):
            raise ConfigError(f"pca:{self.dim} needs at most min(pixels, samples) = "
                              f"{min(d_in, len(xf))} components")
        mean = xf.mean(0)
        xc = xf - mean
        cov = xc.T @ xc / max(len(xf) - 1, 1)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(0)[:self.dim], evecs.flip(1)[:, :self.dim]
        sign = torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True)))
        evecs = evecs * sign
        scale = 1.0 / torch.sqrt(evals.clamp_min(1e-12))
        # fitted on the CPU (float64, machine-independent); projected on the device
        self.mean = mean.to(torch.float32).to(self.device)
        self.components = (evecs * scale).to(torch.float32).to(self.device)
        self._x_fit = None

    def encode_batch(self, x: torch.Tensor) -> torch.Tensor:
        self._ensure_fitted()
        assert self.mean is not None and self.components is not None
        xf = x.to(self.device).reshape(len(x), -1).to(torch.float32) / 255.0
        return (xf - self.mean) @ self.components


# -- foundation models ------------------------------------------------------------------------
INSTALL = {"transformers": FM_HINT,
           # both import torchvision, which must match the installed torch
           "open_clip": "pip install open_clip_torch (with the torchvision of your torch)",
           "timm": "pip install timm (with the torchvision of your torch)"}


def _require(module: str, spec: str):
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(f"encoder {spec!r} needs the Python package {module!r}: "
                          f"{INSTALL.get(module, FM_HINT)}") from None


def _file_identity(path: Path) -> dict[str, Any]:
    """Weights: path, size and modification time (hashing GBs on every run would cost more
    than the embeddings); small text files (configs): their content hash."""
    st = path.stat()
    out: dict[str, Any] = {"path": str(path.resolve()), "size": st.st_size,
                           "mtime_ns": st.st_mtime_ns}
    if st.st_size <= 1 << 20 and path.suffix in (".json", ".txt", ".yaml", ".yml"):
        out["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _dir_identity(path: Path) -> dict[str, Any]:
    return {"dir": str(path.resolve()),
            "files": {str(p.relative_to(path)): _file_identity(p)
                      for p in sorted(path.rglob("*")) if p.is_file()}}


def _checkpoint_file(spec: str, file: str) -> Path:
    p = Path(file).expanduser()
    if not file or not p.is_file():
        raise ConfigError(f"encoder {spec!r}: no checkpoint file at {file!r}; weights are "
                          "never downloaded at run time: download the checkpoint where there "
                          "is internet and give its path")
    return p


def _rgb_uint8(x: torch.Tensor) -> torch.Tensor:
    """N×C×H×W uint8 with C = 1 or 3 → N×3×H×W (grey repeated)."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers prints a load report per checkpoint (e.g. the text tower's weights a
    vision encoder does not use); keep the CLI's output to falkit's own lines."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


class HFEncoder(Encoder):
    """A transformers checkpoint (a directory, or a hub id already in the local cache).
    The embedding is what the model family calls its image embedding: CLIP's projected
    `image_embeds` (`get_image_features` for a full CLIP/SigLIP checkpoint), SigLIP's pooled
    output, DINOv2's pooled CLS token; otherwise `pooler_output`, else the mean token."""

    def __init__(self, ref: str):
        self.spec = f"hf:{ref}"
        _require("transformers", self.spec)
        self.dir = self._resolve(ref)
        self._model = None
        self._processor = None

    def _resolve(self, ref: str) -> Path:
        p = Path(ref).expanduser()
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise ConfigError(f"encoder {self.spec!r}: {p} has no config.json; give the "
                                  "directory written by save_pretrained (or `hf download`)")
            return p
        if p.is_absolute() or ref.startswith((".", "~")) or ref.count("/") > 1:
            raise ConfigError(f"encoder {self.spec!r}: no model directory at {ref}")
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(ref, local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure means: not in the local cache
            raise ConfigError(f"encoder {self.spec!r}: {ref} is neither a directory nor in the "
                              f"local Hugging Face cache; weights are never downloaded at run "
                              f"time: run `hf download {ref}` where there is internet (or copy "
                              f"a save_pretrained directory here) and pass hf:<that dir>"
                              ) from None

    def identity(self) -> dict[str, Any]:
        return {"spec": "hf", **_dir_identity(self.dir)}

    def _load(self) -> None:
        if self._model is not None:
            return
        import transformers

        with _quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(self.dir, local_files_only=True)
            cls = self._model_class(transformers, config)
            model = cls.from_pretrained(self.dir, local_files_only=True)
            # the PIL backend always: torchvision's resize differs slightly, and the cache
            # key must name what produced the pixels
            self._processor = transformers.AutoImageProcessor.from_pretrained(
                self.dir, local_files_only=True, backend="pil")
        self._model = model.eval().to(self.device)

    @staticmethod
    def _model_class(transformers: Any, config: Any) -> Any:
        kind = getattr(config, "model_type", "")
        archs = list(getattr(config, "architectures", None) or [])
        # a vision tower saved with its projection (CLIPVisionModelWithProjection): that class
        for name in archs:
            if name.endswith("VisionModelWithProjection") and hasattr(transformers, name):
                return getattr(transformers, name)
        known = {"clip": "CLIPModel", "siglip": "SiglipModel", "siglip2": "Siglip2Model",
                 "clip_vision_model": "CLIPVisionModel", "siglip_vision_model":
                 "SiglipVisionModel", "dinov2": "Dinov2Model"}
        name = known.get(kind) or next((a for a in archs if hasattr(transformers, a)), None)
        return getattr(transformers, name) if name else transformers.AutoModel

    def preprocessing(self) -> dict[str, Any]:
        self._load()
        proc = self._processor
        return {"processor": type(proc).__name__,
                "settings": json.loads(proc.to_json_string()), "input": "uint8 RGB, grey x3"}

    def encode_batch(self, x: torch.Tensor) -> torch.Tensor:
        self._load()
        assert self._model is not None and self._processor is not None
        images = list(_rgb_uint8(x).permute(0, 2, 3, 1).contiguous().numpy())
        pixels = self._processor(images=images, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, next(self._model.parameters()).dtype)
        if hasattr(self._model, "get_image_features"):  # full CLIP / SigLIP: image tower
            out = self._model.get_image_features(pixel_values=pixels)
            return out if torch.is_tensor(out) else out.pooler_output
        out = self._model(pixel_values=pixels)
        for name in ("image_embeds", "pooler_output"):
            z = getattr(out, name, None)
            if z is not None:
                return z
        return out.last_hidden_state.mean(1)


class _PilCheckpointEncoder(Encoder):
    """An encoder from a library (`kind`: open_clip, timm) that builds `<name>` with the
    weights in `<checkpoint file>` and a PIL eval transform; subclasses implement `_build`
    (-> model, transform) and `_forward`."""

    kind = ""

    def __init__(self, name: str, checkpoint: str):
        self.spec = f"{self.kind}:{name}:{checkpoint}"
        self.name = name
        self.file = _checkpoint_file(self.spec, checkpoint)
        self.lib = _require(self.kind, self.spec)
        self._model = self._transform = None

    def identity(self) -> dict[str, Any]:
        return {"spec": self.kind, "name": self.name, "weights": _file_identity(self.file)}

    def _build(self) -> tuple[Any, Callable[[Any], torch.Tensor]]:
        raise NotImplementedError

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _load(self) -> None:
        if self._model is None:
            model, transform = self._build()
            self._model, self._transform = model.eval().to(self.device), transform

    def preprocessing(self) -> dict[str, Any]:
        self._load()
        return {"transform": repr(self._transform), "input": "PIL RGB, grey x3"}

    def encode_batch(self, x: torch.Tensor) -> torch.Tensor:
        self._load()
        assert self._model is not None and self._transform is not None
        return self._forward(_pil_batch(x, self._transform).to(self.device))


class OpenClipEncoder(_PilCheckpointEncoder):
    """open_clip `<arch>` with the weights in `<checkpoint file>`; its eval transform."""

    kind = "open_clip"

    def _build(self) -> tuple[Any, Callable[[Any], torch.Tensor]]:
        model, _, transform = self.lib.create_model_and_transforms(
            self.name, pretrained=str(self.file))
        return model, transform

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._model.encode_image(pixels)


class TimmEncoder(_PilCheckpointEncoder):
    """timm `<name>` (classifier removed, `num_classes=0`) with `<checkpoint file>` and the
    eval transform timm resolves for that model."""

    kind = "timm"

    def _build(self) -> tuple[Any, Callable[[Any], torch.Tensor]]:
        model = self.lib.create_model(self.name, pretrained=False, num_classes=0,
                                      checkpoint_path=str(self.file))
        cfg = self.lib.data.resolve_data_config({}, model=model)
        return model, self.lib.data.create_transform(**cfg)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._model(pixels)


def _pil_batch(x: torch.Tensor, transform: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    from PIL import Image

    rgb = _rgb_uint8(x).permute(0, 2, 3, 1).contiguous().numpy()
    return torch.stack([transform(Image.fromarray(img)) for img in rgb])


class TorchScriptEncoder(Encoder):
    def __init__(self, file: str):
        self.spec = f"torchscript:{file}"
        self.file = _checkpoint_file(self.spec, file)
        try:  # now, so that a wrong file is refused before a run writes anything
            self._model = torch.jit.load(str(self.file), map_location="cpu").eval()
            self._on = torch.device("cpu")
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, ValueError, ...
            raise ConfigError(f"encoder {self.spec!r}: {self.file} is not a TorchScript "
                              f"archive ({type(e).__name__}); save one with "
                              "torch.jit.script(model).save(path)") from None

    def identity(self) -> dict[str, Any]:
        return {"spec": "torchscript", "weights": _file_identity(self.file)}

    def preprocessing(self) -> dict[str, Any]:
        return {"input": "float x/255, N×3×H×W at the dataset's resolution, grey x3"}

    def encode_batch(self, x: torch.Tensor) -> torch.Tensor:
        if self._on != self.device:  # loaded onto the CPU; moved once, when first used
            self._model, self._on = self._model.to(self.device), self.device
        return self._model(_rgb_uint8(x).to(self.device).to(torch.float32) / 255.0)


ENCODERS: dict[str, str] = {
    "pixels": "flattened pixels in [0, 1] (offline)",
    "pca[:dim]": "whitened PCA of the pixels, fitted on the train split (offline, default 32)",
    "hf:<dir or id>": "transformers CLIP / SigLIP / DINOv2 (needs falkit[fm])",
    "open_clip:<arch>:<file>": "open_clip model and checkpoint file (needs open_clip_torch)",
    "timm:<name>:<file>": "timm model and checkpoint file (needs timm)",
    "torchscript:<file>": "a scripted module: float [0,1] N×3×H×W -> N×D",
}


def describe() -> list[tuple[str, str]]:
    return list(ENCODERS.items())


def check_spec(spec: str) -> None:
    """ConfigError unless `spec` names an encoder `create` knows (its files are not read)."""
    kind, _, rest = spec.partition(":")
    ok = ((kind == "pixels" and not rest) or kind == "pca" or (kind in ("hf", "torchscript")
          and rest) or (kind in ("open_clip", "timm") and rest.count(":") >= 1))
    if not ok:
        raise ConfigError(f"unknown encoder {spec!r} (valid: {', '.join(ENCODERS)})")
    if kind == "pca" and rest and not rest.isdigit():
        raise ConfigError(f"encoder {spec!r}: pca:<dim> needs an integer dim")


def create(spec: str, batch_size: int = 64, seed: int = 0,
           device: str | torch.device = "cpu") -> Encoder:
    """The encoder named by `spec` (see the module docstring), computing on `device`.
    `seed` is the pca fit's."""
    kind, _, rest = spec.partition(":")
    enc: Encoder
    if kind == "pixels" and not rest:
        enc = PixelEncoder()
    elif kind == "pca":
        try:
            dim = int(rest) if rest else 32
        except ValueError:
            raise ConfigError(f"encoder {spec!r}: pca:<dim> needs an integer dim") from None
        enc = PCAEncoder(dim, seed=seed)
    elif kind == "hf" and rest:
        enc = HFEncoder(rest)
    elif kind in ("open_clip", "timm") and rest.count(":") >= 1:
        name, _, ckpt = rest.partition(":")
        enc = OpenClipEncoder(name, ckpt) if kind == "open_clip" else TimmEncoder(name, ckpt)
    elif kind == "torchscript" and rest:
        enc = TorchScriptEncoder(rest)
    else:
        raise ConfigError(f"unknown encoder {spec!r} (valid: {', '.join(ENCODERS)})")
    if batch_size < 1:
        raise ConfigError(f"encoder batch size must be >= 1, got {batch_size}")
    enc.batch_size = batch_size
    enc.device = torch.device(device)
    return enc


# -- cache ------------------------------------------------------------------------------------
def fingerprint(x: torch.Tensor) -> str:
    """sha256 of a tensor's shape, dtype and bytes: the images an embedding was made from."""
    h = hashlib.sha256(f"{tuple(x.shape)}:{x.dtype}".encode())
    h.update(x.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def default_cache_dir() -> Path:
    env = os.environ.get("FALKIT_CACHE")
    return Path(env) / "embeddings" if env else Path.home() / ".cache" / "falkit" / "embeddings"


def cache_key(encoder: Encoder, x: torch.Tensor, dataset: str, split: str) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "dataset": dataset, "split": split,
            "images": fingerprint(x), "encoder": encoder.identity(),
            "preprocessing": encoder.preprocessing()}


def embed_splits(encoder: Encoder, ds: Any, splits: tuple[str, ...] = ("train",),
                 cache_dir: str | Path | None = None) -> tuple[dict[str, np.ndarray], bool]:
    """The encoder (fitted on the train split: pca; others need nothing) on the named splits
    of dataset `ds`, through the cache; whether every split came from it."""
    encoder.fit(ds.x_train)
    out, hits = {}, []
    for split in splits:
        x = ds.x_train if split == "train" else ds.x_test
        out[split], hit = embed(encoder, x, ds.name, split, cache_dir)
        hits.append(hit)
    return out, all(hits)


def embed(encoder: Encoder, x: torch.Tensor, dataset: str, split: str,
          cache_dir: str | Path | None = None, use_cache: bool = True,
          progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, bool]:
    """Embeddings of the uint8 images `x` (float32 N×D) and whether they came from the cache.
    The file name carries a hash of the full key; the key is also stored beside it and must
    match exactly, so neither a changed input nor a hash prefix collision reuses a file."""
    key = cache_key(encoder, x, dataset, split)
    text = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:20]
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in
                   f"{dataset}_{split}_{encoder.spec}")[-80:]
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    npy, meta = base / f"{slug}_{digest}.npy", base / f"{slug}_{digest}.json"
    if use_cache and npy.is_file() and meta.is_file():
        with contextlib.suppress(OSError, ValueError):
            if meta.read_text() == text:
                z = np.load(npy)
                if z.ndim == 2 and len(z) == len(x):
                    return z, True
    z = encoder.encode(x, progress)
    if use_cache:
        buf = io.BytesIO()
        np.save(buf, z)
        write_atomic(meta, text.encode())
        write_atomic(npy, buf.getvalue())  # last: its presence means a complete entry
    return z, False
