"""Does a refactor change any result? (issue 26). The same small runs (scikit-learn's digits,
3 clients, 2 cycles, one thread) with this checkout's falkit and with another checkout's
(e.g. the commit before the change), compared file by file:

* `queries.jsonl` byte for byte;
* `metrics.csv`: the same columns, every value equal except the wall-clock `time_*` ones;
* every other CSV the run writes (`partition.csv`, FAST's `clients.csv`, `comm.csv`) byte
  for byte.

    git worktree add /tmp/old HEAD~1
    python benchmarks/identity.py --old /tmp/old/src            # prints one line per config

Exit status 1 if any config differs. Each run is a fresh `falkit run` process with
PYTHONPATH on one checkout's `src`.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.dataset=digits", "data.rho=5", "partition.num_clients=3", "partition.alpha=1.0",
         "budget.fraction=0.05", "budget.cycles=2", "fl.rounds=2", "fl.local_epochs=1",
         "fl.lr=0.05", "local_model.epochs=2", "model.backbone=resnet8_preact16",
         "runtime.threads=1"]
FAST = ["strategy=fast", "fast.encoder=pixels", "fl.rounds=3", "fast.local_steps=2"]
# name -> overrides of SMALL: a strategy of every kind (global/local model, distilled, two
# phases, own objective, own model module, gradient embeddings with SCAFFOLD, MC dropout,
# graph) and FAST's variants (client and pooled passes, linear probe, no weak labels)
CONFIGS: dict[str, list[str]] = {
    "random": ["strategy=random"],
    "entropy_L": ["strategy=entropy@L"],
    "fairfal": ["strategy=fairfal"],
    "kafal_kcfu": ["strategy=kafal", "kafal.kcfu=true"],
    "ifal": ["strategy=ifal"],
    "ll4al": ["strategy=ll4al"],
    "badge_G_scaffold": ["strategy=badge@G", "fl.algorithm=scaffold"],
    "logo": ["strategy=logo"],
    "bald": ["strategy=bald", "model.dropout=0.2", "bald.passes=4"],
    "gcnal": ["strategy=gcnal"],
    "fast": FAST,
    "fast_pooled": [*FAST, "fast.scope=pooled"],
    "fast_linear": [*FAST, "model.backbone=linear"],
    "fast_no_weak": [*FAST, "fast.weak_labels=false"],
}


def run(src: Path, name: str, over: list[str], out: Path) -> Path:
    # its own embedding cache (FAST): each side encodes afresh, `embeddings_cached` alike
    env = {**os.environ, "PYTHONPATH": str(src), "FALKIT_CACHE": str(out / "cache")}
    cmd = [sys.executable, "-c", "import sys; from falkit.cli import main; sys.exit(main())",
           "run", *SMALL, *over, f"out_dir={out}", f"name={name}", "--quiet"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out)
    if p.returncode:
        raise SystemExit(f"{name} on {src}: exit {p.returncode}\n{p.stderr[-2000:]}")
    return out / name


def metrics(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    cols = list(rows[0]) if rows else []
    return cols, [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def differences(old: Path, new: Path) -> list[str]:
    out = []
    if (old / "queries.jsonl").read_bytes() != (new / "queries.jsonl").read_bytes():
        out.append("queries.jsonl")
    (oc, orows), (nc, nrows) = metrics(old / "metrics.csv"), metrics(new / "metrics.csv")
    if oc != nc:
        out.append(f"metrics.csv columns ({sorted(set(oc) ^ set(nc))})")
    elif orows != nrows:
        out.append("metrics.csv values")
    for f in sorted({p.name for p in old.glob("*.csv")} | {p.name for p in new.glob("*.csv")}):
        if f in ("metrics.csv", "rounds.csv"):  # rounds.csv holds wall-clock seconds
            continue
        a, b = old / f, new / f
        if not (a.exists() and b.exists()) or a.read_bytes() != b.read_bytes():
            out.append(f)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, type=Path, help="the other checkout's src/")
    ap.add_argument("--only", help="comma-separated config names (default: all)")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(CONFIGS)
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            sides = {}
            for side, src in (("old", args.old.resolve()), ("new", ROOT / "src")):
                d = Path(tmp) / side
                d.mkdir(exist_ok=True)
                sides[side] = run(src, name, CONFIGS[name], d)
            diff = differences(sides["old"], sides["new"])
            bad += bool(diff)
            print(f"{name:18s} {'identical' if not diff else 'DIFFERS: ' + ', '.join(diff)}",
                  flush=True)
    print(f"{len(names) - bad} of {len(names)} configs identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
