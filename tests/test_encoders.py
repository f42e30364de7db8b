"""Frozen encoders for FAST (falkit.models.encoders): the offline built-ins, the embedding
cache and its key, the errors a user meets, and tiny randomly initialised CLIP / SigLIP /
DINOv2 checkpoints loaded through exactly the `hf:<dir>` path a downloaded one takes."""

import json
import os
import sys

import numpy as np
import pytest
import torch

from falkit.errors import ConfigError
from falkit.models import encoders


def _images(n=12, c=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)


# -- built-ins ----------------------------------------------------------------------------------
def test_pixels_are_the_flattened_image_in_unit_range():
    x = _images(3, c=1, size=2)
    z = encoders.create("pixels").encode(x)
    np.testing.assert_allclose(z, x.reshape(3, -1).numpy() / 255.0, rtol=1e-6)
    assert z.dtype == np.float32


def test_pca_is_whitened_deterministic_and_batch_independent():
    x = _images(200, size=4)
    a, b = encoders.create("pca:5", batch_size=7), encoders.create("pca:5", batch_size=200)
    a.fit(x)
    b.fit(x)
    za, zb = a.encode(x), b.encode(x)
    np.testing.assert_allclose(za, zb, atol=1e-5)  # batches and refits change nothing
    np.testing.assert_allclose(za.mean(0), 0, atol=1e-4)  # centred ...
    np.testing.assert_allclose(np.cov(za.T), np.eye(5), atol=1e-3)  # ... and whitened
    assert encoders.create("pca").dim == 32


def test_pca_recovers_the_one_direction_the_data_varies_in():
    # x = t · v with one fixed pixel pattern v: the first component is ±v, fixed to the sign
    # whose largest entry is positive
    t = torch.linspace(0, 1, 50).view(-1, 1)
    v = torch.tensor([0.0, 1.0, 2.0, 0.5])
    x = (t * v * 100).round().to(torch.uint8).view(50, 1, 2, 2)
    enc = encoders.create("pca:1")
    enc.fit(x)
    z = enc.encode(x)[:, 0]
    assert np.corrcoef(z, t[:, 0].numpy())[0, 1] > 0.999
    assert enc.components[2, 0] > 0  # the largest-magnitude entry is positive


def test_unknown_and_malformed_specs_are_config_errors():
    for spec in ("clip", "pca:x", "hf:", "open_clip:ViT-B-16", "pixels:3"):
        with pytest.raises(ConfigError):
            encoders.create(spec)


# -- errors a user meets ------------------------------------------------------------------------
def test_missing_hf_checkpoint_says_where_to_put_it(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match="no model directory"):
        encoders.create(f"hf:{tmp_path / 'nothing'}")
    with pytest.raises(ConfigError, match="hf download"):
        encoders.create("hf:someone/not-in-the-cache")
    with pytest.raises(ConfigError, match="config.json"):
        encoders.create(f"hf:{tmp_path}")  # a directory, but not a checkpoint


def test_missing_extra_says_what_to_install(tmp_path, monkeypatch):
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"x")
    for module, spec, hint in (("timm", f"timm:vit_small_patch16_224:{ckpt}", "pip install timm"),
                               ("open_clip", f"open_clip:ViT-B-16:{ckpt}",
                                "pip install open_clip_torch"),
                               ("transformers", "hf:org/model", r"pip install 'falkit\[fm\]'")):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
        with pytest.raises(ConfigError, match=hint):
            encoders.create(spec)


def test_missing_checkpoint_file_is_a_config_error(tmp_path):
    for spec in (f"timm:resnet50:{tmp_path / 'no.pt'}", f"torchscript:{tmp_path / 'no.pt'}",
                 f"open_clip:ViT-B-16:{tmp_path / 'no.bin'}"):
        with pytest.raises(ConfigError, match="no checkpoint file"):
            encoders.create(spec)


# -- cache --------------------------------------------------------------------------------------
class Counting(encoders.PixelEncoder):
    calls = 0

    def encode_batch(self, x):
        Counting.calls += 1
        return super().encode_batch(x)


def test_cache_reuses_only_an_identical_key(tmp_path):
    x = _images(10)
    enc = Counting()
    Counting.calls = 0
    z1, hit1 = encoders.embed(enc, x, "toy", "train", tmp_path)
    z2, hit2 = encoders.embed(enc, x, "toy", "train", tmp_path)
    assert (hit1, hit2) == (False, True) and Counting.calls == 1
    np.testing.assert_array_equal(z1, z2)
    # a changed key never reuses the file: other images, split, dataset name, encoder
    x2 = x.clone()
    x2[0, 0, 0, 0] ^= 1
    assert not encoders.embed(enc, x2, "toy", "train", tmp_path)[1]
    assert not encoders.embed(enc, x, "toy", "test", tmp_path)[1]
    assert not encoders.embed(enc, x, "toy2", "train", tmp_path)[1]
    pca = encoders.create("pca:3")
    pca.fit(x)
    assert not encoders.embed(pca, x, "toy", "train", tmp_path)[1]
    pca4 = encoders.create("pca:4")
    pca4.fit(x)
    assert not encoders.embed(pca4, x, "toy", "train", tmp_path)[1]
    pca_other_fit = encoders.create("pca:3")
    pca_other_fit.fit(x2)  # fitted on other data: another encoder
    assert not encoders.embed(pca_other_fit, x, "toy", "train", tmp_path)[1]
    assert encoders.embed(pca, x, "toy", "train", tmp_path)[1]
    # atomic writes leave no temp files behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cache_ignores_an_entry_whose_stored_key_differs(tmp_path):
    x = _images(4)
    enc = encoders.create("pixels")
    encoders.embed(enc, x, "toy", "train", tmp_path)
    meta = next(tmp_path.glob("*.json"))
    key = json.loads(meta.read_text())
    key["images"] = "something else"  # as if two keys shared a file name
    meta.write_text(json.dumps(key, sort_keys=True))
    assert not encoders.embed(enc, x, "toy", "train", tmp_path)[1]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit: still the format
def test_torchscript_weights_change_invalidates_the_cache(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3 * 8 * 8, 5)

        def forward(self, x):
            return self.lin(x.flatten(1))

    file = tmp_path / "enc.pt"
    torch.manual_seed(0)
    torch.jit.script(Net()).save(str(file))
    x = _images(6)
    z, hit = encoders.embed(encoders.create(f"torchscript:{file}"), x, "toy", "train",
                            tmp_path / "c")
    assert z.shape == (6, 5) and not hit
    assert encoders.embed(encoders.create(f"torchscript:{file}"), x, "toy", "train",
                          tmp_path / "c")[1]
    torch.manual_seed(1)
    torch.jit.script(Net()).save(str(file))  # new weights, same path
    st = file.stat()
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # even within one tick
    z2, hit2 = encoders.embed(encoders.create(f"torchscript:{file}"), x, "toy", "train",
                              tmp_path / "c")
    assert not hit2 and not np.allclose(z, z2)


# -- transformers checkpoints ------------------------------------------------------------------
TINY = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)


def _save_tiny(kind, path):
    """A tiny randomly initialised model of `kind` with its image processor, saved the way
    a downloaded checkpoint is laid out (config.json, model.safetensors,
    preprocessor_config.json)."""
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=8, **TINY)
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                num_attention_heads=4, vocab_size=99)
    if kind == "clip_vision":  # CLIPVisionModelWithProjection: projected image_embeds
        model = tr.CLIPVisionModelWithProjection(tr.CLIPVisionConfig(projection_dim=16,
                                                                     **vision))
    elif kind == "clip":  # a full CLIP checkpoint (both towers), as openai/clip-* are
        model = tr.CLIPModel(tr.CLIPConfig(vision_config=vision, text_config=text,
                                           projection_dim=16))
    elif kind == "siglip":
        model = tr.SiglipVisionModel(tr.SiglipVisionConfig(**vision))
    else:
        model = tr.Dinov2Model(tr.Dinov2Config(**vision))
    model.save_pretrained(path)
    if kind.startswith("clip"):
        proc = tr.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                        crop_size={"height": 32, "width": 32})
    elif kind == "siglip":
        proc = tr.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    else:
        proc = tr.BitImageProcessorPil(size={"shortest_edge": 32},
                                       crop_size={"height": 32, "width": 32})
    proc.save_pretrained(path)
    return model.eval(), proc


@pytest.mark.parametrize("kind,dim", [("clip_vision", 16), ("clip", 16), ("siglip", 32),
                                      ("dinov2", 32)])
def test_tiny_hf_checkpoints_load_through_the_hf_dir_path(kind, dim, tmp_path):
    model, proc = _save_tiny(kind, tmp_path / kind)
    enc = encoders.create(f"hf:{tmp_path / kind}", batch_size=5)
    x = _images(7, c=1, size=28)  # FMNIST-like: grey 28 px, processed to 32 px RGB
    z, hit = encoders.embed(enc, x, "toy", "train", tmp_path / "cache")
    assert z.shape == (7, dim) and not hit and np.isfinite(z).all()
    # the same numbers as the model's own image embedding on the processor's pixels
    rgb = list(x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy())
    pixels = proc(images=rgb, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        if kind == "clip":
            ref = model.get_image_features(pixel_values=pixels)
            ref = ref if torch.is_tensor(ref) else ref.pooler_output
        elif kind == "clip_vision":
            ref = model(pixel_values=pixels).image_embeds
        else:
            ref = model(pixel_values=pixels).pooler_output
    np.testing.assert_allclose(z, ref.numpy(), atol=1e-4)
    assert encoders.embed(encoders.create(f"hf:{tmp_path / kind}"), x, "toy", "train",
                          tmp_path / "cache")[1]


def test_fast_runs_end_to_end_with_a_tiny_hf_encoder(tmp_path):
    """Done-when: FAST with an `hf:` encoder, the way a user's downloaded SigLIP would run."""
    from falkit import config as config_mod
    from falkit import fast

    _save_tiny("siglip", tmp_path / "siglip")
    cfg = config_mod.load(overrides={
        "strategy": "fast", "data.dataset": "digits", "data.rho": "none",
        "partition.method": "iid", "partition.num_clients": 3, "fl.rounds": 2,
        "fl.local_epochs": 1, "model.backbone": "linear", "fast.initial": 0.05,
        "fast.encoder": f"hf:{tmp_path / 'siglip'}", "fast.encode_batch": 256,
        "out_dir": str(tmp_path / "runs"), "fast.cache_dir": str(tmp_path / "cache")})
    row = fast.run(cfg).metrics[0]
    assert row["embedding_dim"] == 32 and not row["embeddings_cached"]
    assert row["weak_acc_after"] >= row["weak_acc_before"] > 0.1
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # train and test
