"""falkit.report on hand-made run directories with known numbers.

Two settings (alpha 0.1 and 100) x two methods x three seeds, 9 cycles at 5 % each. The
accuracy (%) of cycle t is 50 + 2t + ADJ[setting][method][seed], and labeled_pct is exactly
5(t + 1), so AULC = AULC(base) + 40 * ADJ and the paired deltas are 40 * (ADJ_A - ADJ_B).
"""

import base64
import csv
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from falkit import stats
from falkit.config import dumps, load
from falkit.errors import FalkitError
from falkit.report import accuracy_table, compare_text, load_runs, paired_table, write_report

C = 10
CYCLES = 9
ADJ = {  # setting (alpha) -> method -> per-seed accuracy offset
    0.1: {"random": [0.0, 1.0, 2.0], "fairfal": [3.0, 0.5, 5.0]},
    100.0: {"random": [0.0, 1.0, 2.0], "fairfal": [-1.0, 0.0, 1.0]},
}
GLOBAL = np.array([300, 250, 200, 150, 120, 100, 80, 60, 40, 20])  # descending: groups 3/4/3
PARTITION = np.stack([GLOBAL // 2, GLOBAL - GLOBAL // 2])
PNG = b"\x89PNG\r\n\x1a\n"


def queried(t: int) -> list[int]:
    """Cycle 0: 1 label per class; later: 3 from class 0 (majority) and 1 from class 9."""
    if t == 0:
        return [1] * C
    return [3] + [0] * (C - 2) + [1]


def make_run(root: Path, method: str, seed: int, alpha: float, adj: float,
             cycles: int = CYCLES, complete: bool = True) -> Path:
    cfg = load(None, overrides={"strategy": method, "seed": seed, "partition.alpha": alpha,
                                "data.dataset": "digits", "partition.num_clients": 2})
    d = root / cfg.run_name()
    d.mkdir(parents=True)
    (d / "config.toml").write_text(dumps(cfg))
    rows = []
    for t in range(cycles):
        row = {"cycle": t, "target_pct": 5.0 * (t + 1), "labeled": 10 * (t + 1),
               "labeled_pct": 5.0 * (t + 1), "accuracy": (50 + 2 * t + adj) / 100}
        row.update({f"acc_{c}": 0.5 for c in range(C)})
        row.update({f"queried_{c}": n for c, n in enumerate(queried(t))})
        row.update(comm_bytes=100, comm_mib=0.0001, time_query=0.1, time_local_model=0.0,
                   time_train=1.0, time_eval=0.1)
        rows.append(row)
    with (d / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with (d / "partition.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["client", *map(str, range(C)), "total"])
        for i, r in enumerate(PARTITION):
            w.writerow([i, *r.tolist(), int(r.sum())])
        w.writerow(["total", *GLOBAL.tolist(), int(GLOBAL.sum())])
    (d / "status.json").write_text(json.dumps({"complete": complete, "cycles_done": cycles,
                                               "cycles": CYCLES}))
    return d


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for alpha, methods in ADJ.items():
        for method, adjs in methods.items():
            for seed, adj in enumerate(adjs):
                make_run(tmp_path / "runs" / f"a{alpha:g}", method, seed, alpha, adj)
    return tmp_path / "runs"


def adj_of(run) -> float:
    return ADJ[run.config.partition.alpha][run.method][run.seed]


def setting_of(runs, alpha: float) -> str:
    return next(r.setting for r in runs if r.config.partition.alpha == alpha)


def test_load_runs_groups_settings(root):
    runs = load_runs([root])
    assert len(runs) == 12 and all(r.complete for r in runs)
    settings = {r.setting for r in runs}
    assert len(settings) == 2
    assert setting_of(runs, 0.1) == "digits, dirichlet_balanced α=0.1, ρ=20, K=2"
    r = runs[0]
    assert r.class_counts.tolist() == GLOBAL.tolist() and r.partition.shape == (2, C)
    assert r.aulc() == pytest.approx(stats.aulc(5.0 * np.arange(1, 10),
                                                50 + 2 * np.arange(9) + adj_of(r)))
    # a run dir given directly and again through its parent is loaded once
    assert len(load_runs([root, runs[0].dir])) == 12


def test_accuracy_table_means_stds_and_bold(root):
    runs = load_runs([root])
    table = accuracy_table(runs)
    sec = table.section(setting_of(runs, 0.1))
    assert sec.columns == ["method", "n", "15%", "25%", "35%", "45%", "AULC"]
    assert [r[0].text for r in sec.rows] == ["random", "fairfal"]
    for method in ("random", "fairfal"):
        for pct, t in ((15, 2), (25, 4), (35, 6), (45, 8)):
            cell = sec.cell(method, f"{pct}%")
            vals = 50 + 2 * t + np.array(ADJ[0.1][method])
            assert cell.value == pytest.approx(vals.mean())
            assert cell.std == pytest.approx(vals.std(ddof=1))
            assert cell.n == 3
    assert sec.cell("random", "15%").text == "55.00 ± 1.00"
    # fairfal has the larger mean in every column at alpha 0.1, random at alpha 100
    assert all(c.bold for c in sec.row("fairfal")[2:])
    assert not any(c.bold for c in sec.row("random")[2:])
    sec100 = table.section(setting_of(runs, 100.0))
    assert all(c.bold for c in sec100.row("random")[2:])
    assert sec100.cell("fairfal", "AULC").value == pytest.approx(
        np.mean([stats.aulc(5.0 * np.arange(1, 10), 50 + 2 * np.arange(9) + a)
                 for a in ADJ[100.0]["fairfal"]]))
    only = accuracy_table([r for r in runs if r.config.partition.alpha == 0.1])
    text, md, html = only.to_text(), only.to_markdown(), only.to_html()
    assert "56.83 ± 2.25*" in text and "55.00 ± 1.00*" not in text
    assert "**56.83 ± 2.25**" in md and "| random | 3 | 55.00 ± 1.00 |" in md
    assert "<b>56.83 ± 2.25</b>" in html and "<table" in html


def test_accuracy_table_falls_back_to_every_cycle(root):
    runs = load_runs([root])
    sec = accuracy_table(runs, pcts=(12, 13)).sections[0]
    assert sec.columns[2:-1] == [f"{5 * (t + 1)}%" for t in range(CYCLES)]
    sec = accuracy_table(runs, pcts=(15, 12)).sections[0]  # only some reached: every cycle
    assert sec.columns[2:-1] == [f"{5 * (t + 1)}%" for t in range(CYCLES)]
    sec = accuracy_table(runs, pcts=(15, 5)).sections[0]
    assert sec.columns[2:-1] == ["15%", "5%"]


def test_paired_table_matches_stats(root):
    runs = load_runs([root])
    table = paired_table(runs)
    # alpha 0.1: delta(fairfal - random) = 40 * [3, -0.5, 3] = [120, -20, 120]
    row = table.section(setting_of(runs, 0.1)).rows[0]
    cols = dict(zip(table.sections[0].columns, row, strict=True))
    assert (cols["A"].text, cols["B"].text, cols["winner"].text) == ("fairfal", "random",
                                                                       "fairfal")
    assert cols["π⁺"].value == pytest.approx(2 / 3)
    assert cols["HL"].value == pytest.approx(85.0)  # Walsh: -20, 50, 50, 120, 120, 120
    assert cols["p"].value == pytest.approx(0.25)  # midranks 1, 2.5, 2.5; T+ = 5: 2 of 8
    assert cols["mean Δ"].value == pytest.approx(220 / 3)
    assert cols["n"].value == 3
    # alpha 100: random beats fairfal on every seed by 40
    row = table.section(setting_of(runs, 100.0)).rows[0]
    cols = dict(zip(table.sections[0].columns, row, strict=True))
    assert (cols["A"].text, cols["B"].text) == ("random", "fairfal")
    assert cols["π⁺"].value == 1.0 and cols["HL"].value == pytest.approx(40.0)
    assert cols["p"].value == pytest.approx(1 / 8)
    # explicit orientation: fairfal vs random at alpha 100 has delta -40 on every seed
    fixed = paired_table(runs, "fairfal", "random").section(setting_of(runs, 100.0))
    assert fixed.cell("fairfal", "π⁺").value == 0.0
    assert fixed.cell("fairfal", "HL").value == pytest.approx(-40.0)
    assert fixed.cell("fairfal", "p").value == pytest.approx(1.0)
    assert fixed.cell("fairfal", "winner").text == "random"
    for text in (table.to_text(), table.to_markdown(), table.to_html()):
        assert "fairfal" in text and "0.25" in text
    with pytest.raises(FalkitError, match="badge"):
        paired_table(runs, "badge", "random")


def test_compare_text(root):
    runs = load_runs([root])
    out = compare_text(runs, "fairfal", "random")
    assert out.count("digits, dirichlet_balanced") == 2
    aulc0 = stats.aulc(5.0 * np.arange(1, 10), 50 + 2 * np.arange(9) + 3.0)
    assert f"{aulc0:.2f}" in out and "+120.00" in out and "-20.00" in out
    assert "p(A > B) = 0.25" in out and "winner: fairfal" in out and "winner: random" in out
    with pytest.raises(FalkitError, match="nosuch"):
        compare_text(runs, "nosuch", "random")


def test_query_shares_from_metrics(root):
    run = load_runs([root])[0]
    cycles, shares = run.query_shares()
    assert cycles.tolist() == list(range(1, CYCLES))
    np.testing.assert_allclose(shares, np.tile([0.75, 0.0, 0.25], (CYCLES - 1, 1)))
    _, with_init = run.query_shares(include_initial=True)
    np.testing.assert_allclose(with_init[0], [0.3, 0.4, 0.3])
    np.testing.assert_allclose(with_init[1], [6 / 14, 4 / 14, 4 / 14])


def test_incomplete_runs_count_in_accuracy_not_in_aulc(root):
    make_run(root / "a0.1", "entropy@G", 0, 0.1, 10.0, cycles=3, complete=False)
    with pytest.warns(UserWarning, match="incomplete"):
        runs = load_runs([root])
    ent = next(r for r in runs if r.method == "entropy@G")
    assert not ent.complete
    sec = accuracy_table(runs).section(setting_of(runs, 0.1))
    assert sec.cell("entropy@G", "15%").value == pytest.approx(64.0)
    assert sec.cell("entropy@G", "15%").bold  # 64 beats both complete methods at 15 %
    assert sec.cell("entropy@G", "25%").text == "–"
    assert sec.cell("entropy@G", "AULC").text == "–"
    assert "1 incomplete run" in " ".join(sec.notes)
    paired = paired_table(runs)
    assert all(r[0].text != "entropy@G" and r[1].text != "entropy@G"
               for s in paired.sections for r in s.rows)
    with pytest.raises(FalkitError):
        paired_table(runs, "entropy@G", "random")


def test_missing_and_empty_dirs(root, tmp_path):
    with pytest.raises(FalkitError, match="no such run directory"):
        load_runs([tmp_path / "nope"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FalkitError, match="no run directory"):
        load_runs([empty])
    with pytest.warns(UserWarning, match="no run directory"):
        assert len(load_runs([root, empty])) == 12
    # a run that has not finished a cycle: metrics.csv without rows is skipped
    started = make_run(tmp_path / "started", "random", 0, 0.1, 0.0, complete=False)
    (started / "metrics.csv").write_text("cycle,target_pct\n")
    with pytest.warns(UserWarning, match="no cycle yet"):
        assert len(load_runs([root, started])) == 12


def test_duplicate_run_keeps_complete_one(root, tmp_path):
    dup = make_run(tmp_path / "other", "random", 0, 0.1, 30.0, cycles=4, complete=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = load_runs([root, dup])
    assert len(runs) == 12 and all(r.dir != dup for r in runs)
    assert any("dropped" in str(w.message) for w in caught)


def test_write_report(root, tmp_path):
    out = tmp_path / "report"
    html_path = write_report([root], out)
    assert html_path == out / "report.html"
    pngs = sorted((out / "figures").glob("*.png"))
    names = [p.name for p in pngs]
    assert sum(n.startswith("accuracy_") for n in names) == 2
    assert sum(n.startswith("query_balance_") for n in names) == 2
    assert sum(n.startswith("partition_") for n in names) == 2  # one per distinct partition
    for p in pngs:
        assert p.read_bytes().startswith(PNG) and p.stat().st_size > 5000
    page = html_path.read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(pngs)
    assert all(base64.b64decode(b).startswith(PNG) for b in images)
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")
    assert "fairfal" in page and "Paired comparison" in page and "<b>" in page
    assert "**" in (out / "accuracy.md").read_text()
    assert "| fairfal | random | fairfal |" in (out / "paired.md").read_text()
    rows = list(csv.DictReader((out / "accuracy.csv").open()))
    assert len(rows) == 12 * CYCLES
    first = next(r for r in rows if r["method"] == "fairfal" and r["seed"] == "2"
                 and r["cycle"] == "0" and "0.1" in r["setting"])
    assert float(first["accuracy_pct"]) == pytest.approx(55.0)


def test_strategy_options_name_the_method_not_the_setting(tmp_path):
    """An ablation (fairfal.selector=global) or variant (kafal.kcfu) is a row of its own in
    the setting's table; another strategy's options never split settings."""
    from falkit import config
    from falkit.report import Run

    def run_of(**over):
        return Run(tmp_path, config.load(None, preset="quick", overrides=over), [], [], None,
                   None, True)

    plain, ablated = run_of(strategy="fairfal"), run_of(strategy="fairfal",
                                                        **{"fairfal.selector": "global"})
    kcfu, ifal = run_of(strategy="kafal", **{"kafal.kcfu": "true"}), run_of(strategy="ifal")
    assert plain.method == "fairfal" and ablated.method == "fairfal[selector=global]"
    assert kcfu.method == "kafal[kcfu=True]" and ifal.method == "ifal[kd_epochs=20]"
    assert len({r.setting_key() for r in (plain, ablated, kcfu, ifal, run_of())}) == 1


def test_vector_figures_and_per_round_curves(tmp_path):
    """`falkit report --formats png,pdf,svg` writes every figure in each format; runs with
    rounds.csv (runtime.eval_every) get a per-round accuracy figure (issue 18)."""
    from falkit.cli import main
    from falkit.loop import run

    over = {"data.dataset": "digits", "data.rho": "5", "partition.num_clients": "3",
            "partition.alpha": "1.0", "budget.fraction": "0.05", "budget.cycles": "2",
            "fl.rounds": "3", "fl.local_epochs": "1", "model.backbone": "resnet8_preact16",
            "runtime.threads": "1", "runtime.eval_every": "1", "out_dir": str(tmp_path / "r")}
    for strategy in ("random", "entropy@G"):
        run(load(None, overrides={**over, "strategy": strategy}))
    assert main(["report", str(tmp_path / "r"), "--out", str(tmp_path / "rep"),
                 "--formats", "png,pdf,svg"]) == 0
    figs = tmp_path / "rep" / "figures"
    stems = {p.stem for p in figs.glob("*.png")}
    assert any(s.startswith("rounds_") for s in stems)
    for stem in stems:
        assert (figs / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
        assert b"<svg" in (figs / f"{stem}.svg").read_bytes()[:2000]
    assert main(["report", str(tmp_path / "r"), "--out", str(tmp_path / "bad"),
                 "--formats", "png,gif"]) == 2
