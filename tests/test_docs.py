"""The maintainers' map shows real code: docs/architecture.md's worked example of a strategy
is al/bald.py itself, below its docstring (issue 26)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_worked_example_is_the_bald_file():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```\n", doc, flags=re.S)
    code = (ROOT / "src" / "falkit" / "al" / "bald.py").read_text()
    body = code[code.index('"""', 3) + 3:].lstrip("\n")
    assert body in blocks, "docs/architecture.md's BALD example differs from al/bald.py"


def test_the_options_example_is_real():
    """Each line of the options example stands in the file it names."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    block = doc[doc.index("class FedDynOptions"):].split("```")[0]
    for part in block.strip().split("\n\n"):
        first, *fields = part.strip().splitlines()
        if first.startswith("@dataclass"):
            first, *fields = fields
        src = (ROOT / "src" / "falkit" / re.search(r"# \[\w+\], (\S+)", first)[1]).read_text()
        assert first.split(":")[0].split("(")[0] in src
        for f in fields:
            assert f.split("#")[0].strip() in src, f
