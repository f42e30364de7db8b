"""benchmarks/gpu.py, the one-command GPU check, in its CPU mode on sklearn's digits: the smoke
runs end up in the results file, a failing case makes it exit 1 and is still written down,
and it needs neither typer (the CLI) nor flwr (its Flower case is then skipped)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the GPU machine has torch, numpy, scipy, scikit-learn, rich, matplotlib, transformers but
# not falkit's CLI extras: make `import typer` and `import flwr` fail, as they would there
BLOCKED = "import sys; sys.modules.update({m: None for m in ('typer', 'flwr')}); "


def run_script(tmp_path, *args):
    out = tmp_path / "results.md"
    code = (BLOCKED + "import runpy; sys.argv = ['benchmarks/gpu.py', *sys.argv[1:]]; "
            "runpy.run_path('benchmarks/gpu.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, "--device", "cpu", "--only", "smoke",
                           "--data", "digits", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin",
                               "HOME": str(tmp_path)})
    return proc, out


def test_cpu_smoke_writes_its_results(tmp_path):
    proc, out = run_script(tmp_path, "--cases", "strategies,flower",
                           "--strategies", "random,fairfal")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.with_suffix(".json").read_text())
    status = {r["id"]: r["status"] for r in res["smoke"]}
    assert status == {"random": "ok", "fairfal": "ok",
                      "flower simulation fairfal (digits)": "skipped"}
    assert res["ok"] is True and "timing" not in res
    assert all(r["cycles"] == 2 and 0 <= r["accuracy"] <= 1 for r in res["smoke"]
               if r["status"] == "ok")
    md = out.read_text()
    assert "| random | strategies | ok |" in md and "| fairfal | strategies | ok |" in md
    assert "flwr is not installed" in md
    assert "benchmarks/gpu.py --device cpu" in md  # the exact command


def test_a_failing_case_exits_1_and_is_written_down(tmp_path):
    proc, out = run_script(tmp_path, "--cases", "strategies", "--strategies", "random,nope")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    res = json.loads(out.with_suffix(".json").read_text())
    by_id = {r["id"]: r for r in res["smoke"]}
    assert by_id["random"]["status"] == "ok"
    assert by_id["nope"]["status"] == "FAILED" and res["ok"] is False
    assert "unknown strategy 'nope'" in by_id["nope"]["error"]
    assert "Traceback" in by_id["nope"]["traceback"]
    md = out.read_text()
    assert "| nope | strategies | FAILED |" in md and "### Tracebacks" in md
    assert "FAILED" in proc.stdout
