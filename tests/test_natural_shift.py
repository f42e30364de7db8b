"""The clients' own split (partition.method = natural: npz, image folders, CSV index) and
feature shift (partition.shift: falkit.data.shift), issue 27 item 3."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from falkit import config
from falkit.data import shift as shift_mod
from falkit.data import sources
from falkit.data.federation import build
from falkit.errors import ConfigError, FalkitError

SMALL = {"data.rho": "none", "budget.fraction": "0.05", "budget.cycles": "2", "fl.rounds": "1",
         "fl.local_epochs": "1", "model.backbone": "resnet8_preact16", "runtime.threads": "1",
         "strategy": "entropy@G"}


def digits_npz(path, site=None, names=None):
    ds = sources.load("digits")
    arrays = {"x_train": ds.x_train.numpy(), "y_train": ds.y_train,
              "x_test": ds.x_test.numpy(), "y_test": ds.y_test}
    if site is not None:
        arrays["site_train"] = site(ds)
    if names is not None:
        arrays["sites"] = np.array(names)
    np.savez(path, **arrays)
    return ds


def three_sites(ds):
    """Site 0: digits 0-3, site 1: 4-6, site 2: 7-9 (label skew the data itself has)."""
    return np.digitize(ds.y_train, [4, 7]).astype(np.int64)


def cfg_for(tmp_path, dataset, **over):
    return config.load(None, overrides={**SMALL, "data.dataset": dataset,
                                        "partition.method": "natural",
                                        "partition.num_clients": "3",
                                        "out_dir": str(tmp_path / "runs"), **over})


def test_natural_npz_clients_are_the_files_sites(tmp_path):
    f = tmp_path / "sites.npz"
    ds = digits_npz(f, three_sites, ["north", "east", "south"])
    got = sources.load(f"npz:{f}")
    assert got.sites == ["north", "east", "south"]
    data = build(cfg_for(tmp_path, f"npz:{f}"))
    want = three_sites(ds)
    assert [c.tolist() for c in data.clients] == [np.flatnonzero(want == k).tolist()
                                                  for k in range(3)]
    counts = data.partition_counts()
    assert counts[0, 4:].sum() == 0 and counts[2, :7].sum() == 0  # the sites' own label skew


def test_natural_refusals_are_one_line(tmp_path):
    f = tmp_path / "plain.npz"
    digits_npz(f)
    with pytest.raises(ConfigError, match="does not say which site"):
        build(cfg_for(tmp_path, f"npz:{f}"))
    g = tmp_path / "sites.npz"
    digits_npz(g, three_sites)
    with pytest.raises(ConfigError, match="has 3 sites .*set partition.num_clients = 3"):
        build(cfg_for(tmp_path, f"npz:{g}", **{"partition.num_clients": "4"}))
    h = tmp_path / "gap.npz"
    digits_npz(h, lambda ds: three_sites(ds) * 2)  # sites 0, 2, 4: 1 and 3 have nothing
    with pytest.raises(FalkitError, match="site 1 has no train sample"):
        sources.load(f"npz:{h}")
    b = tmp_path / "short.npz"
    digits_npz(b, lambda ds: three_sites(ds)[:-1])
    with pytest.raises(FalkitError, match="one integer site per train sample"):
        sources.load(f"npz:{b}")


def _png(path, value, mode="L"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((6, 6), value, np.uint8)
    Image.fromarray(arr, mode).save(path)


def test_imagefolder_with_a_folder_per_site(tmp_path):
    root = tmp_path / "clinics"
    layout = {"a": {"cat": 3, "dog": 1}, "b": {"dog": 2}}  # site b has no cat
    for site, classes in layout.items():
        for c, n in classes.items():
            for i in range(n):
                _png(root / "train" / site / c / f"{i}.png", 10 * i + (c == "dog") * 100)
    for c in ("cat", "dog"):
        _png(root / "test" / c / "0.png", 50)
    ds = sources.load(f"imagefolder:{root}")
    assert ds.classes == ["cat", "dog"] and ds.sites == ["a", "b"]
    assert ds.site_train.tolist() == [0, 0, 0, 0, 1, 1]
    assert ds.y_train.tolist() == [0, 0, 0, 1, 1, 1]
    plain = tmp_path / "plain"
    _png(plain / "train" / "cat" / "0.png", 1)
    _png(plain / "test" / "cat" / "0.png", 1)
    assert sources.load(f"imagefolder:{plain}").site_train is None


def write_index(tmp_path, rows, header=("path", "label", "split", "site")):
    f = tmp_path / "index.csv"
    with f.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return f


def test_csv_index_with_sites(tmp_path):
    rows = []
    for i in range(6):
        _png(tmp_path / "img" / f"{i}.png", 40 * i)
        rows.append((f"img/{i}.png", str(i % 3 * 5), "train" if i < 5 else "test",
                     "s2" if i % 2 else "s1"))
    f = write_index(tmp_path, rows)
    ds = sources.load(f"csv:{f}")
    assert ds.classes == ["0", "5", "10"]  # integer labels in numeric order
    assert ds.y_train.tolist() == [0, 1, 2, 0, 1] and ds.y_test.tolist() == [2]
    assert ds.sites == ["s1", "s2"] and ds.site_train.tolist() == [0, 1, 0, 1, 0]
    assert int(ds.x_train[3, 0, 0, 0]) == 120  # the 4th row's file
    assert sources.find(f"csv:{f}") == f
    bad = write_index(tmp_path, [("img/0.png", "0", "train")], header=("file", "label", "split"))
    with pytest.raises(FalkitError, match="no column path"):
        sources.load(f"csv:{bad}")
    gone = write_index(tmp_path, [("img/nope.png", "0", "train", "s1")])
    with pytest.raises(FalkitError, match="is not a file"):
        sources.load(f"csv:{gone}")
    split = write_index(tmp_path, [("img/0.png", "0", "val", "s1")])
    with pytest.raises(FalkitError, match="split must be train or test"):
        sources.load(f"csv:{split}")


def test_a_natural_run_in_process(tmp_path):
    from falkit.loop import run

    f = tmp_path / "sites.npz"
    digits_npz(f, three_sites)
    res = run(cfg_for(tmp_path, f"npz:{f}"))
    assert len(res.metrics) == 2
    part = (res.run_dir / "partition.csv").read_text()
    assert part.count("\n") >= 3


@pytest.mark.slow
def test_natural_and_shifted_in_process_equals_flower(tmp_path):
    pytest.importorskip("flwr")
    from tests.test_transports import same_in_process_and_on_flower

    f = tmp_path / "sites.npz"
    digits_npz(f, three_sites)
    same_in_process_and_on_flower(tmp_path, **{
        "data.dataset": f"npz:{f}", "data.rho": "none", "partition.method": "natural",
        "partition.shift": "rotate", "strategy": "entropy@L"})


# -- feature shift ---------------------------------------------------------------------------

def images(n=4, c=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)


def test_color_with_unit_gain_and_no_offset_is_the_identity_and_blur_keeps_a_flat_image():
    x = images()
    assert torch.equal(shift_mod.apply(x, "color", {"gain": [1.0], "offset": [0.0]}), x)
    flat = torch.full((2, 3, 8, 8), 77, dtype=torch.uint8)
    assert torch.equal(shift_mod.apply(flat, "blur", {"sigma": 1.5}), flat)
    y = shift_mod.apply(x, "blur", {"sigma": 1.5})
    assert y.float().std() < x.float().std()  # a blur smooths
    # contrast 2 around 128 and +10: 100 -> 2·(100 − 128) + 138 = 82; clipped at 0 and 255
    v = torch.tensor([100, 10, 250], dtype=torch.uint8).view(1, 1, 1, 3)
    assert shift_mod.apply(v, "color", {"gain": [2.0], "offset": [10.0]}).flatten().tolist() \
        == [82, 0, 255]


def test_rotate_by_180_degrees_flips_both_axes_and_noise_has_its_sigma():
    x = images(size=9)
    r = shift_mod.apply(x, "rotate", {"degrees": 180.0})
    assert torch.equal(r, x.flip(2).flip(3))
    big = torch.full((1, 1, 64, 64), 128, dtype=torch.uint8)
    d = shift_mod.apply(big, "noise", {"sigma": 20.0}, torch.Generator().manual_seed(0))
    assert abs(float((d.float() - 128).std()) - 20.0) < 1.5


@pytest.mark.parametrize("kind", ["rotate", "color", "noise", "blur"])
def test_shift_is_per_client_deterministic_and_spares_the_test_set(tmp_path, kind):
    over = {**SMALL, "data.dataset": "digits", "partition.num_clients": "3",
            "partition.shift": kind, "partition.shift_strength": "0.8"}
    plain = build(config.load(None, overrides={**SMALL, "data.dataset": "digits",
                                               "partition.num_clients": "3"}))
    a = build(config.load(None, overrides=over))
    b = build(config.load(None, overrides=over))
    assert torch.equal(a.dataset.x_train, b.dataset.x_train)  # deterministic per seed
    assert a.shifts == b.shifts and len({str(p) for p in a.shifts}) == 3  # one per client
    assert [c.tolist() for c in a.clients] == [c.tolist() for c in plain.clients]
    for k, pool in enumerate(a.clients):  # each pool through its own client's transform
        idx = torch.as_tensor(pool)
        want = shift_mod.apply(plain.dataset.x_train[idx], kind, a.shifts[k],
                               __import__("falkit.seeding").seeding.torch_generator(
                                   0, "feature_shift_noise", k))
        assert torch.equal(a.dataset.x_train[idx], want)
        assert not torch.equal(a.dataset.x_train[idx], plain.dataset.x_train[idx])
    assert torch.equal(a.dataset.x_test, plain.dataset.x_test)  # not the test set
    other = build(config.load(None, overrides={**over, "seed": "1"}))
    assert other.shifts != a.shifts
    with_test = build(config.load(None, overrides={**over, "partition.shift_test": "true"}))
    assert not torch.equal(with_test.dataset.x_test, plain.dataset.x_test)
    assert torch.equal(with_test.dataset.x_train, a.dataset.x_train)


def test_shift_settings_are_validated_and_keep_old_run_names():
    with pytest.raises(ConfigError, match="partition.shift"):
        config.load(None, overrides={"partition.shift": "warp"})
    with pytest.raises(ConfigError, match="partition.shift_strength"):
        config.load(None, overrides={"partition.shift": "blur", "partition.shift_strength": "0"})
    with pytest.raises(ConfigError, match="partition.method = sites"):
        config.load(None, overrides={"partition.shift": "blur", "partition.method": "sites"})
    base = config.load(None)
    assert base.run_name() == config.load(None, overrides={"partition.shift": "none"}).run_name()
    assert base.run_name() != config.load(None, overrides={"partition.shift": "blur"}).run_name()


def test_a_shifted_run_trains_on_the_shifted_images(tmp_path):
    from falkit.loop import run

    over = {**SMALL, "data.dataset": "digits", "partition.num_clients": "3",
            "partition.shift": "color", "out_dir": str(tmp_path)}
    res = run(config.load(None, overrides=over))
    plain = run(config.load(None, overrides={**over, "partition.shift": "none"}))
    assert res.run_dir != plain.run_dir
    assert res.metrics[-1]["accuracy"] != plain.metrics[-1]["accuracy"] or \
        res.metrics[-1]["auc"] != plain.metrics[-1]["auc"]
