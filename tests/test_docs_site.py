"""The documentation site (issue 29): `mkdocs build --strict` passes (a broken link, a
missing page or a docstring MkDocs cannot render fails it), the site opens from the file
system, and the generated reference holds every command, flag and config key of the code."""

from __future__ import annotations

import argparse
import dataclasses
import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("mkdocs")


def _text(path: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", path.read_text(encoding="utf-8")))


def test_the_docs_build_strictly_and_the_reference_covers_the_code(tmp_path):
    site = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                        str(site)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "WARNING" not in p.stderr, p.stderr[-4000:]
    index = (site / "index.html").read_text(encoding="utf-8")
    assert 'href="getting-started.html"' in index  # file:// links, no server needed

    from falkit import config as config_mod
    from falkit import registry
    from falkit.cli import build_parser

    cli = _text(site / "reference" / "cli.html")
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sp in sub.choices.items():
        assert f"falkit {name}" in cli, name
        for a in sp._actions:
            for flag in a.option_strings:
                assert flag in cli, f"falkit {name} {flag}"
    assert "--gpus-per-run" in cli and "--shard" in cli

    conf = _text(site / "reference" / "config.html")
    registry.load()
    keys = [f.name for f in dataclasses.fields(config_mod.Config)
            if f.default_factory is dataclasses.MISSING]
    for f in dataclasses.fields(config_mod.Config):
        if f.default_factory is not dataclasses.MISSING:
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(f.default_factory())]
    for section, cls in registry.option_sections().items():
        keys += [f"{section}.{g.name}" for g in dataclasses.fields(cls)]
    missing = [k for k in keys if k not in conf]
    assert not missing, missing
    # and every key says what it means (the comment beside its field)
    rows = [r for r in (ROOT / "docs" / "reference" / "config.md").read_text().splitlines()
            if re.match(r"\| `[a-z_.0-9]+` \|", r)]
    assert len(rows) == len(keys)
    silent = [r.split("|")[1].strip() for r in rows if not r.rstrip("| ").split("|")[-1].strip()]
    assert not silent, f"config keys without a comment beside their field: {silent}"
    assert "alpha" in conf and "dirichlet_balanced" in conf

    flower = _text(site / "reference" / "flower.html")
    from falkit.flower.common import CONVENIENCE_KEYS, FLOWER_KEYS

    for key in (*FLOWER_KEYS, *CONVENIENCE_KEYS):
        assert f"{key} = " in flower, key

    api = _text(site / "reference" / "api.html")
    for name in ("falkit.api.run", "falkit.api.Result", "falkit.api.load_runs",
                 "falkit.al.base.Strategy", "falkit.fl.algorithms.base.FedAvg",
                 "check_strategy", "check_options", "falkit.data.federation.FederatedData"):
        assert name in api, name
    assert "Raises:" in api and "Returns:" in api  # the docstrings' sections rendered
