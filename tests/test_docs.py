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


# Every section of the README before it became a front page (issue 29), and every bold lead
# of its paragraphs: each lives on in the docs.
README_SECTIONS = [
    "Running experiments", "Sweeps on a cluster", "Results (`runs/<name>/`)", "Presets",
    "Fidelity: the papers' text, the authors' code, the presets", "Data", "Methods",
    "Your own methods: plug-ins", "FairFAL", "FAST", "Reports", "Speed", "Python API",
    "Label with people", "Run across machines", "Development"]
README_LEADS = [
    "Resuming.", "Parallel sweeps.", "Run directories are safe.", "Randomness.", "Ray.",
    "Slurm (no Ray).", "Why `paper` corrects two of the code's choices.",
    "What `quick` shows, and where it departs from the paper", "MedMNIST", "On a GPU",
    "Trackers.", "Models.", "Label Studio.", "Security.", "On Flower.",
    "First: Flower's own local SuperLink.", "Across machines.", "A site that fails.",
    "What differs from `falkit run`'s directory.", "Resume.", "FAST on Flower.",
    "Try it on one machine (loopback, no TLS)."]


def _outside_code(text: str) -> list[str]:
    lines, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence:
            lines.append(line)
    return lines


def test_the_readme_is_a_front_page_and_every_old_section_has_a_home():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert readme.split("```", 2)[1].split("\n")[1:3] == [
        "make demo   # creates .venv, installs, gets Fashion-MNIST, runs the quick FMNIST-LT demo",
        "make test   # creates .venv, installs dev deps, gets Fashion-MNIST, runs the test suite"]
    lines = [line for page in sorted((ROOT / "docs").rglob("*.md"))
             for line in _outside_code(page.read_text())]
    headings = {re.sub(r"^#+ ", "", line).strip() for line in lines if line.startswith("#")}
    assert not [s for s in README_SECTIONS if s not in headings]
    leads = {m[1].strip() for line in lines if (m := re.match(r"^\*\*([^*]+)\*\*", line))}
    assert not [s for s in README_LEADS if s not in leads]
    for link in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)", readme):
        assert (ROOT / link).exists(), link
