"""The package as a user gets it (issue 29): `python -m build` makes an sdist and a wheel
that `twine check` accepts; the wheel holds what falkit reads at run time besides its code
(the Flower app's pyproject.toml) and the licence; installed in a fresh venv beside the
CPU torch, it runs `falkit --version`, `falkit demo --help`, `falkit list` and a two-cycle
digits run, away from this checkout (nothing imported from src/)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import falkit

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the Makefile's CPU wheel


# a fresh environment: no PYTHONPATH (Flower's Ray backend puts this venv's sys.path there,
# in os.environ, when a simulation test ran in this process before) nor PYTHONHOME
ENV = {k: v for k, v in os.environ.items()
       if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}


def _run(*cmd: str | Path, cwd: Path | None = None, timeout: float = 900) -> str:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd,
                       timeout=timeout, env=ENV)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))}:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p.stdout + p.stderr


@pytest.mark.slow
def test_the_built_wheel_installs_in_a_fresh_venv_and_runs(tmp_path):
    dist = tmp_path / "dist"
    # --no-isolation: the build backend (setuptools) of this venv, no download
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, ROOT)
    (wheel,) = dist.glob("falkit-*.whl")
    (sdist,) = dist.glob("falkit-*.tar.gz")
    assert wheel.name.startswith(f"falkit-{falkit.__version__}-")
    assert "PASSED" in _run(sys.executable, "-m", "twine", "check", "--strict", wheel, sdist)
    names = zipfile.ZipFile(wheel).namelist()
    assert "falkit/flower/app/pyproject.toml" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]
    with tarfile.open(sdist) as t:
        members = {Path(m).relative_to(Path(m).parts[0]).as_posix() for m in t.getnames()
                   if len(Path(m).parts) > 1}
    assert {"LICENSE", "README.md", "pyproject.toml", "CHANGELOG.md", "CITATION.cff",
            "src/falkit/flower/app/pyproject.toml"} <= members

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    py, fk = venv / "bin" / "python", venv / "bin" / "falkit"
    _run(py, "-m", "pip", "install", "-q", TORCH, wheel)
    work = tmp_path / "work"  # not the checkout: the installed package, not src/
    work.mkdir()
    where = _run(py, "-c", "import falkit; print(falkit.__file__)", cwd=work)
    assert str(venv) in where and str(ROOT) not in where
    assert _run(fk, "--version", cwd=work).strip() == f"falkit {falkit.__version__}"
    assert "usage: falkit demo" in _run(fk, "demo", "--help", cwd=work)
    listed = _run(fk, "list", cwd=work)
    assert "fairfal" in listed and "fedavg" in listed and "digits" in listed
    _run(fk, "run", "data.dataset=digits", "data.rho=none", "partition.num_clients=3",
         "budget.cycles=2", "fl.rounds=2", "model.backbone=resnet8_preact16", "out_dir=runs",
         "name=smoke", "--quiet", cwd=work)
    with (work / "runs" / "smoke" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["cycle"] for r in rows] == ["0", "1"] and all(0 <= float(r["accuracy"]) <= 1
                                                            for r in rows)
