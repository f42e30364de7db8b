"""The tutorials run (issue 29): each is a script under docs/tutorials/ that its page shows
verbatim (pymdownx.snippets); here each runs as a reader would run it, and what it prints
and writes is checked, so a tutorial cannot rot."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_own_strategy_tutorial_checks_and_runs_its_strategy(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "docs" / "tutorials" / "own_strategy.py"),
                        str(tmp_path / "runs")], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert lines[0] == "contract: ok"
    cycles = [re.fullmatch(r"cycle (\d): ([\d.]+)% labeled, accuracy ([\d.]+)%", s)
              for s in lines[1:4]]
    assert all(cycles) and [int(m[1]) for m in cycles] == [1, 2, 3]
    pcts = [float(m[2]) for m in cycles]
    assert pcts == sorted(pcts) and pcts[0] < pcts[-1]  # every cycle labels more
    run_dir = Path(lines[4].removeprefix("results: "))
    assert run_dir.parent == tmp_path / "runs"
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [f"{100 * float(r['accuracy']):.2f}" for r in rows] == [m[3] for m in cycles]
    # a class of a script: recorded by where it is (`__main__:Class`), runs in this process
    assert 'strategy = "__main__:SmallestMargin"' in (run_dir / "config.toml").read_text()
