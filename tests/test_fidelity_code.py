"""Issue 25: the protocol, FAST and the baselines as the papers and the authors' code do them;
each choice a named option, `paper` and `reference` set as the docs' fidelity table says
(hand-made inputs with known answers)."""

import numpy as np
import pytest
import torch

from falkit import config
from falkit.driver import lr_at


def test_lr_decay_paper_75_25_and_code_76_24():
    """FairFAL: lr x 0.1 after 75 % of 100 rounds; the authors' util/misc.py decays for
    `r > 75` with r from 0, so round 75 (the 76th) still trains at 0.01."""
    paper = config.load(None).fl
    code = config.load(None, overrides={"fl.lr_decay_rule": "code"}).fl
    lrs_paper = [lr_at(paper, r) for r in range(100)]
    lrs_code = [lr_at(code, r) for r in range(100)]
    assert lrs_paper == pytest.approx([0.01] * 75 + [0.001] * 25)
    assert lrs_code == pytest.approx([0.01] * 76 + [0.001] * 24)
    assert config.load(None, preset="reference").fl.lr_decay_rule == "code"
    # quick's 3 rounds: int(0.75 * 3) = 2; paper decays the last round, code none
    q = config.load(None, preset="quick").fl
    qc = config.load(None, preset="reference,quick").fl
    assert [lr_at(q, r) for r in range(3)] == pytest.approx([0.05, 0.05, 0.005])
    assert [lr_at(qc, r) for r in range(3)] == pytest.approx([0.05, 0.05, 0.05])


def test_partition_seed_fixes_the_partition_across_run_seeds():
    """The FairFAL code partitions with dir_balance(seed=0) for every run seed, while its
    long-tail subsample follows the run seed (NumPy): partition.seed = 0 gives every seed
    the same client x class matrix; which images are drawn still varies with the seed."""
    from falkit.data.federation import build
    from falkit.data.sources import load

    ds = load("digits")
    over = {"data.dataset": "digits", "partition.num_clients": "3", "data.rho": "5"}

    def build_with(**extra):
        return build(config.load(None, overrides={**over, **extra}), ds)

    a, b = build_with(seed="0"), build_with(seed="1")
    assert not np.array_equal(a.source_indices, b.source_indices)  # a new long tail per seed
    assert not np.array_equal(a.partition_counts(), b.partition_counts())  # ... and partition
    f0 = build_with(seed="0", **{"partition.seed": "0"})
    f1 = build_with(seed="1", **{"partition.seed": "0"})
    assert not np.array_equal(f0.source_indices, f1.source_indices)  # the images vary ...
    assert np.array_equal(f0.partition_counts(), f1.partition_counts())  # ... the matrix not
    assert np.array_equal(f0.partition_counts(), a.partition_counts())  # seed 0's partition
    assert all(np.array_equal(x, y) for x, y in zip(f0.clients, a.clients, strict=True))
    ref = config.load(None, preset="reference")
    assert ref.partition.seed == 0 and config.load(None).partition.seed is None
    # a run name tells the two apart; a default run keeps the name it had before
    plain = config.load(None, overrides={"seed": "1"})
    fixed = config.load(None, overrides={"seed": "1", "partition.seed": "0"})
    assert plain.run_name() != fixed.run_name()
    assert "partition.seed" not in config.identity(plain)
    with pytest.raises(config.ConfigError, match="partition.seed must be"):
        config.load(None, overrides={"partition.seed": "-1"})


def test_cifar100_normalisation_dataset_or_the_codes_imagenet():
    from falkit.data.sources import IMAGENET_MEAN, IMAGENET_STD, ImageDataset, normalization

    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    y = np.zeros(2, dtype=np.int64)

    def ds(name, mean, std):
        return ImageDataset(name, x, y, x, y, ["a"], mean, std, True, 0, "test")

    c100 = ds("cifar100", (0.507, 0.487, 0.441), (0.267, 0.256, 0.276))
    assert normalization(c100) == (c100.mean, c100.std)
    assert normalization(c100, "code") == (IMAGENET_MEAN, IMAGENET_STD)
    # where the code uses the dataset's own constants, `code` changes nothing
    c10 = ds("cifar10", IMAGENET_MEAN, IMAGENET_STD)
    fm = ds("fmnist", (0.286,), (0.353,))
    npz = ds("npz:site.npz", (0.1,), (0.2,))
    for d in (c10, fm, npz):
        assert normalization(d, "code") == (d.mean, d.std)
    assert config.load(None, preset="reference").data.normalization == "code"
    # the engine of a run normalises with it
    from falkit.loop import engine_for

    cfg = config.load(None, overrides={"data.normalization": "code", "model.backbone":
                                       "cnn4"})
    eng = engine_for(cfg, c100, 1, 1)
    assert tuple(eng.mean) == pytest.approx(IMAGENET_MEAN)


def test_fast_trains_with_its_own_recipe_uniform_paper_code_reference(tmp_path):
    import numpy as np

    from falkit.al.base import create
    from falkit.al.fast import training_config
    from falkit.data.sources import load
    from falkit.fl.algorithms import client_weight
    from falkit.site import site_engine

    paper = config.load(None, overrides={"strategy": "fast"})
    t = create("fast").training(paper)
    # FAST Eq. 2 / Algorithm 1 line 25: 1/|K_t|, whatever the pools; the rest is [fl]'s
    assert client_weight(t, 30) == client_weight(t, 3) == 1.0
    assert (t.fl.lr, t.fl.weight_decay, t.fl.batch_size) == (0.01, 1e-5, 64)
    assert paper.fast.budget_split == "even"
    ref = config.load(None, preset="reference", overrides={"strategy": "fast"})
    r = training_config(ref)
    assert client_weight(r, 30) == 30.0  # FAST-official: FedAvg by num_samples
    assert (r.fl.lr, r.fl.weight_decay, r.fl.batch_size) == (1e-3, 1e-4, 128)
    # ablation/utils.py: lr = 1e-3 · 0.1 ** int(rnd / 25) for Flower's rounds rnd = 1..100:
    # rounds 1-24 at 1e-3, 25-49 at 1e-4, 50-74 at 1e-5, 75-99 at 1e-6, round 100 at 1e-7
    lrs = [lr_at(r.fl, k) for k in range(100)]
    want = [1e-3 * 0.1 ** int(rnd / 25) for rnd in range(1, 101)]
    assert want[:3] == pytest.approx([1e-3] * 3) and want[24] == pytest.approx(1e-4)
    assert lrs == pytest.approx([1e-3] * 24 + [1e-4] * 25 + [1e-5] * 25 + [1e-6] * 25 + [1e-7])
    assert lrs == pytest.approx(want)
    assert ref.fast.initial == 0.05 and paper.fast.initial == 0.01
    assert ref.fl.lr == 0.01  # [fl] itself is untouched: other strategies train as before
    ds = load("digits")
    rows = np.arange(len(ds.y_train))
    over = {"strategy": "fast", "model.backbone": "resnet8_preact16",
            "fast.cache_dir": str(tmp_path)}
    # the site's engine FAST's hooks build: its recipe, its crop, its local steps
    eng, _ = site_engine(config.load(None, overrides=over), create("fast"), ds, ds, rows, 2)
    assert eng.crop_pad == 0 and eng.cfg.fl.weighting == "uniform" and eng.local_steps == 5
    ref_cfg = config.load(None, preset="reference", overrides=over)
    eng, _ = site_engine(ref_cfg, create("fast"), ds, ds, rows, 2)
    assert eng.crop_pad == 4 and eng.cfg.fl.batch_size == 128  # RandomCrop(padding 4)
    with pytest.raises(config.ConfigError, match="fast.lr_milestones takes fractions"):
        config.load(None, overrides={"fast.lr_milestones": "0.5,2"})


def test_fast_pooled_budget_all_or_the_codes_int_of_the_unlabeled():
    from falkit.fast import pooled_budget

    # 1 000 samples, 50 initial: ceil(0.05 · 1000) = 50 | int(0.05 · 950) = 47
    assert pooled_budget(0.05, 1000, 950) == 50
    assert pooled_budget(0.05, 1000, 950, "code") == 47
    assert pooled_budget(0.5, 10, 3) == 3  # never more than what is left
    assert config.load(None, preset="reference").fast.pooled_budget == "code"
    assert config.load(None).fast.pooled_budget == "all"


def test_readme_fidelity_table_names_every_reference_choice():
    """Each setting the `reference` preset changes has its row in the docs' fidelity table
    (docs/guide/running.md; so a new code choice cannot land without saying where text and
    code differ)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "running.md").read_text()
    table = text.split("### Fidelity", 1)[1].split("\n\n", 2)[2].split("\n\n", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) > 20
    for key in config.PRESETS["reference"]:
        name = key.split(".", 1)[1]
        assert any(key in row or (f"`{name}`" in row and key.split(".")[0] in row)
                   for row in rows), key
