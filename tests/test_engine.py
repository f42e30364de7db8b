"""Engine pieces with known answers: normalisation, augmentation, batching, inference."""

import numpy as np
import torch

from falkit import config
from falkit.fl.engine import Engine, ImageTensors


def make_engine(crop_pad=0, hflip=True, **over):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 1, 16, 16), generator=g, dtype=torch.uint8)
    y = torch.arange(40) % 4
    cfg = config.load(None, overrides={"model.backbone": "cnn4", "fl.batch_size": "8", **over})
    train = ImageTensors(x, y, (0.5,), (0.25,), hflip=hflip, crop_pad=crop_pad)
    return Engine(cfg, train, ImageTensors(x[:10], y[:10], (0.5,), (0.25,)), 4), x


def test_normalisation_is_mean_std():
    eng, x = make_engine()
    out = eng._inputs(x[:2])
    assert torch.allclose(out, (x[:2].float() / 255 - 0.5) / 0.25, atol=1e-5)


def test_random_crop_is_a_window_of_the_padded_image():
    eng, x = make_engine(crop_pad=2, hflip=False)
    xin = eng._inputs(x[:6])
    out = eng._augment(xin, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(xin, (2, 2, 2, 2))
    for i in range(6):
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.equal(padded[i, :, dy:dy + 16, dx:dx + 16], out[i])]
        assert hits, f"sample {i} is not a 16x16 window of its padded image"


def test_flip_flips_about_half_and_only_horizontally():
    eng, x = make_engine(hflip=True)
    xin = eng._inputs(x)
    out = eng._augment(xin, torch.Generator().manual_seed(3))
    same = [torch.equal(out[i], xin[i]) for i in range(40)]
    flipped = [torch.equal(out[i], xin[i].flip(2)) for i in range(40)]
    assert all(s or f for s, f in zip(same, flipped, strict=True))
    assert 10 <= sum(flipped) <= 30


def test_batches_cover_each_sample_once_and_drop_a_single_trailing_sample():
    eng, _ = make_engine()
    idx = torch.arange(17)  # batch 8: 8 + 8 + 1 -> the 1 is dropped (BatchNorm)
    batches = list(eng._batches(idx, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [8, 8]
    assert len(torch.cat(batches).unique()) == 16


def test_predict_matches_model_and_is_batch_size_independent():
    eng, x = make_engine()
    state = eng.init_state(0, 0)
    p1, f1 = eng.predict(state, np.arange(40))
    eng.cfg.runtime.eval_batch = 7
    p2, f2 = eng.predict(state, np.arange(40))
    assert torch.allclose(p1, p2, atol=1e-5) and torch.allclose(f1, f2, atol=1e-5)
    assert torch.allclose(p1.sum(1), torch.ones(40), atol=1e-5)
    eng.model.load_state_dict(state)
    eng.model.eval()
    with torch.no_grad():
        logits, _ = eng.model(eng._inputs(x[:5]))
    assert torch.allclose(p1[:5], torch.softmax(logits, 1), atol=1e-5)


def test_local_sgd_stops_early_once_training_accuracy_is_reached():
    eng, _ = make_engine(hflip=False)
    model = eng.new_model(0)
    idx = np.arange(8)  # one batch of 8 per epoch: memorised quickly
    steps, acc = eng.local_sgd(model, idx, 300, 0.05, torch.Generator().manual_seed(0),
                               stop_accuracy=0.99)
    assert acc >= 0.99 and steps < 300  # stopped before the epoch limit


def test_the_engine_leaves_process_settings_to_the_entry_point():
    """Building an Engine changes no process-wide setting; configure_process (called by
    loop.run, fast.run and the Flower apps) applies runtime.threads."""
    from falkit.fl.engine import configure_process

    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    try:
        eng, _ = make_engine(**{"runtime.threads": str(want)})
        assert torch.get_num_threads() == before
        configure_process(eng.cfg)
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)
