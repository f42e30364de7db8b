"""Run directories with damaged result files (issue 23.19): `falkit show`, `falkit report` and
`falkit compare` over a run whose metrics.csv, partition.csv, rounds.csv or status.json is
garbage, truncated, not UTF-8, has a short row, an extra field, a missing column, text where a
number belongs or the wrong JSON type give one line on stderr beginning `falkit: error:` that
names the file, exit code 2, no traceback, and write nothing (`falkit report`: nothing in its
report folder). `falkit.load_runs`, the same loader, raises the same FalkitError."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.test_bad_input_config import fail  # exactly one stderr line, exit 2

import falkit
from falkit import config
from falkit.cli import main
from falkit.errors import FalkitError

SMALL = ["data.dataset=digits", "data.rho=5", "partition.num_clients=3", "partition.alpha=1",
         "budget.cycles=2", "fl.rounds=1", "fl.local_epochs=1", "model.backbone=resnet8_preact16",
         "runtime.eval_every=1", "runtime.save_models=none", "runtime.threads=1"]
FILES = ("config.toml", "metrics.csv", "partition.csv", "rounds.csv", "status.json")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Two finished runs (random, and a copy relabelled entropy@G) with every result file,
    rounds.csv included; each test copies them and damages one file of the first."""
    tmp = tmp_path_factory.mktemp("results")
    assert main(["run", *SMALL, f"out_dir={tmp / 'full'}", "name=a", "--quiet"]) == 0
    runs = tmp / "runs"
    for name, strategy in (("a", "random"), ("b", "entropy@G")):
        (runs / name).mkdir(parents=True)
        for f in FILES:
            shutil.copy(tmp / "full" / "a" / f, runs / name / f)
        cfg = config.loads((runs / name / "config.toml").read_text())
        cfg.strategy = strategy
        (runs / name / "config.toml").write_text(config.dumps(cfg))
    return runs


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else
            hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))}


# -- ways to damage a file ----------------------------------------------------------------------
def _rows(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode(), newline="")))


def _csv(rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode()


def cell(column: str, value: str, row: int = 0) -> Callable[[bytes], bytes]:
    def f(data: bytes) -> bytes:
        rows = _rows(data)
        rows[1 + row][rows[0].index(column)] = value
        return _csv(rows)
    return f


def drop_columns(*columns: str) -> Callable[[bytes], bytes]:
    def f(data: bytes) -> bytes:
        rows = _rows(data)
        keep = [i for i, c in enumerate(rows[0]) if c not in columns]
        return _csv([[r[i] for i in keep] for r in rows])
    return f


def rename(old: str, new: str) -> Callable[[bytes], bytes]:
    def f(data: bytes) -> bytes:
        rows = _rows(data)
        rows[0][rows[0].index(old)] = new
        return _csv(rows)
    return f


def short_row(data: bytes) -> bytes:
    rows = _rows(data)
    rows[1] = rows[1][:-1]
    return _csv(rows)


def extra_field(data: bytes) -> bytes:
    rows = _rows(data)
    rows[1].append("7")
    return _csv(rows)


def drop_last_row(data: bytes) -> bytes:
    return _csv(_rows(data)[:-1])


def header_only(data: bytes) -> bytes:
    return _csv(_rows(data)[:1])


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def cut_last_field(data: bytes) -> bytes:
    """A write cut short: the file ends inside its last row, which lacks its last field."""
    return data[: data.rindex(b",")]


def const(content: bytes) -> Callable[[bytes], bytes]:
    return lambda data: content


def not_utf8(data: bytes) -> bytes:
    return data.replace(b"0", b"\xe9", 1)  # a Latin-1 "é"


def status(**changes) -> Callable[[bytes], bytes]:
    def f(data: bytes) -> bytes:
        s = json.loads(data)
        for k, v in changes.items():
            if v is None:
                del s[k]
            else:
                s[k] = v
        return json.dumps(s).encode()
    return f


# (id, file, damage, words the one-line error holds besides the file's path)
CASES = [
    # metrics.csv
    ("metrics-not-utf8", "metrics.csv", not_utf8, ["not UTF-8"]),
    ("metrics-binary", "metrics.csv", const(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe"), ["not UTF-8"]),
    ("metrics-garbage", "metrics.csv", const(b"this is not\na results file\n"),
     ["missing column", "accuracy"]),
    ("metrics-nul", "metrics.csv", lambda d: d.replace(b"0.0", b"0\x00.0", 1), ["NUL"]),
    ("metrics-truncated", "metrics.csv", cut_last_field, ["fields", "the header has"]),
    ("metrics-last-cycle-lost", "metrics.csv", drop_last_row, ["1 cycle", "status.json"]),
    ("metrics-short-row", "metrics.csv", short_row, ["line 2", "fields", "the header has"]),
    ("metrics-extra-field", "metrics.csv", extra_field, ["line 2", "fields", "the header has"]),
    ("metrics-missing-accuracy", "metrics.csv", drop_columns("accuracy"),
     ["missing column", "accuracy"]),
    ("metrics-missing-labeled-pct", "metrics.csv", drop_columns("labeled_pct"),
     ["missing column", "labeled_pct"]),
    ("metrics-text-accuracy", "metrics.csv", cell("accuracy", "high"),
     ["line 2", "accuracy", "'high'", "not a number"]),
    ("metrics-empty-accuracy", "metrics.csv", cell("accuracy", ""), ["accuracy", "not a number"]),
    ("metrics-nan-accuracy", "metrics.csv", cell("accuracy", "nan", 1), ["line 3", "accuracy"]),
    ("metrics-accuracy-in-percent", "metrics.csv", cell("accuracy", "10.14"),
     ["accuracy", "[0, 1]"]),
    ("metrics-text-target-pct", "metrics.csv", cell("target_pct", "five"),
     ["target_pct", "not a number"]),
    ("metrics-text-labeled-pct", "metrics.csv", cell("labeled_pct", "4.5%", 1),
     ["line 3", "labeled_pct", "not a number"]),
    ("metrics-text-cycle", "metrics.csv", cell("cycle", "first"), ["cycle", "whole number"]),
    ("metrics-cycles-out-of-order", "metrics.csv", cell("cycle", "0", 1), ["line 3", "cycle"]),
    ("metrics-float-labeled", "metrics.csv", cell("labeled", "33.5"), ["labeled", "whole number"]),
    ("metrics-text-queried", "metrics.csv", cell("queried_3", "three"),
     ["queried_3", "whole number"]),
    ("metrics-negative-queried", "metrics.csv", cell("queried_3", "-2"),
     ["queried_3", "whole number"]),
    ("metrics-text-class-accuracy", "metrics.csv", cell("acc_2", "n/a"),
     ["acc_2", "not a number"]),
    ("metrics-text-auc", "metrics.csv", cell("auc", "good"), ["auc", "not a number"]),
    ("metrics-text-time", "metrics.csv", cell("time_train", "1 s"), ["time_train", "not a number"]),
    ("metrics-duplicate-column", "metrics.csv", rename("acc_1", "acc_0"), ["acc_0", "twice"]),
    ("metrics-class-missing", "metrics.csv", drop_columns("acc_9", "queried_9"),
     ["9 classes", "partition.csv", "10"]),
    ("metrics-class-gap", "metrics.csv", rename("acc_9", "acc_12"), ["acc_", "0 to 9"]),
    ("metrics-class-not-a-number", "metrics.csv", rename("acc_9", "acc_nine"), ["'acc_nine'"]),
    # partition.csv
    ("partition-not-utf8", "partition.csv", not_utf8, ["not UTF-8"]),
    ("partition-empty", "partition.csv", const(b""), ["empty"]),
    ("partition-garbage", "partition.csv", const(b"<html>\n<body>oops</body>\n"), ["header"]),
    ("partition-truncated", "partition.csv", cut_last_field, ["fields", "the header has"]),
    ("partition-short-row", "partition.csv", short_row, ["line 2", "fields"]),
    ("partition-extra-field", "partition.csv", extra_field, ["line 2", "fields"]),
    ("partition-text-count", "partition.csv", cell("3", "many"), ["line 2", "many", "count"]),
    ("partition-negative-count", "partition.csv", cell("3", "-5"), ["line 2", "-5", "count"]),
    ("partition-no-total-column", "partition.csv", drop_columns("total"), ["header"]),
    ("partition-no-client", "partition.csv", header_only, ["no client"]),
    ("partition-wrong-total", "partition.csv", cell("3", "1000"), ["line 2", "total", "sum"]),
    ("partition-text-client", "partition.csv", cell("client", "alice"), ["line 2", "client"]),
    # rounds.csv
    ("rounds-not-utf8", "rounds.csv", not_utf8, ["not UTF-8"]),
    ("rounds-garbage", "rounds.csv", const(b"\x00\x01\x02\xff"), ["not UTF-8"]),
    ("rounds-truncated", "rounds.csv", cut_last_field, ["fields", "the header has"]),
    ("rounds-short-row", "rounds.csv", short_row, ["line 2", "fields"]),
    ("rounds-extra-field", "rounds.csv", extra_field, ["line 2", "fields"]),
    ("rounds-missing-accuracy", "rounds.csv", drop_columns("accuracy"),
     ["missing column", "accuracy"]),
    ("rounds-text-accuracy", "rounds.csv", cell("accuracy", "ok"), ["accuracy", "not a number"]),
    ("rounds-text-round", "rounds.csv", cell("round", "one"), ["round", "whole number"]),
    # status.json
    ("status-not-utf8", "status.json", const(b'{"complete": true, "n\xe9": 1}'), ["not UTF-8"]),
    ("status-empty", "status.json", const(b""), ["not valid JSON"]),
    ("status-garbage", "status.json", const(b"complete: yes\n"), ["not valid JSON"]),
    ("status-truncated", "status.json", half, ["not valid JSON"]),
    ("status-list", "status.json", const(b'[{"complete": true}]'), ["JSON object", "an array"]),
    ("status-string", "status.json", const(b'"complete"'), ["JSON object", "a string"]),
    ("status-null", "status.json", const(b"null"), ["JSON object", "null"]),
    ("status-complete-string", "status.json", status(complete="false"),
     ["complete", "true or false", "a string"]),
    ("status-complete-missing", "status.json", status(complete=None), ["complete"]),
    ("status-count-string", "status.json", status(cycles_done="2"),
     ["cycles_done", "whole number", "a string"]),
    ("status-count-float", "status.json", status(cycles=2.5), ["cycles", "whole number"]),
    ("status-count-bool", "status.json", status(cycles=True), ["cycles", "whole number"]),
    ("status-count-negative", "status.json", status(cycles_done=-1), ["cycles_done", ">= 0"]),
    ("status-count-object", "status.json", status(cycles={"n": 2}),
     ["cycles", "whole number", "an object"]),
    ("status-done-beyond-cycles", "status.json", status(complete=False, cycles_done=5),
     ["cycles_done", "5", "2"]),
    ("status-complete-too-early", "status.json", status(cycles_done=1),
     ["complete", "cycles_done"]),
    ("status-error-list", "status.json", status(complete=False, error=["x"]), ["error"]),
]
COMMANDS = {
    "show": lambda runs, out: ["show", str(runs)],
    "report": lambda runs, out: ["report", str(runs), "--out", str(out)],
    "compare": lambda runs, out: ["compare", "random", "entropy@G", str(runs)],
}


def damaged(base: Path, tmp_path: Path, file: str, damage) -> Path:
    runs = tmp_path / "runs"
    shutil.copytree(base, runs)
    path = runs / "a" / file
    path.write_bytes(damage(path.read_bytes()))
    return runs


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("file, damage, words", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_damaged_result_file_is_one_line(base, tmp_path, capsys, command, file, damage, words):
    runs = damaged(base, tmp_path, file, damage)
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    fail(capsys, COMMANDS[command](runs, out), str(runs / "a" / file), *words)
    assert snapshot(tmp_path) == before  # nothing written: no partial report, no run touched


@pytest.mark.parametrize("file, damage, words", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_load_runs_raises_the_same_error(base, tmp_path, file, damage, words):
    pytest.importorskip("pandas")
    runs = damaged(base, tmp_path, file, damage)
    with pytest.raises(FalkitError) as e:
        falkit.load_runs(runs)
    assert str(runs / "a" / file) in str(e.value) and "\n" not in str(e.value)
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("method", ["random", "entropy@G"])
def test_compare_a_method_with_itself_is_refused(base, capsys, method):
    fail(capsys, ["compare", method, method, str(base)], "two different methods", method)


def test_undamaged_runs_still_load(base, tmp_path, capsys):
    """The fixture is sound: the same commands succeed on the runs as they are."""
    out = tmp_path / "report"
    for command in COMMANDS.values():
        assert main(command(base, out)) == 0
    capsys.readouterr()
    assert (out / "report.html").is_file()
    assert len(falkit.load_runs(base)) == 4


def test_report_of_runs_without_a_cycle_writes_nothing(base, tmp_path, capsys):
    """Every run skipped (no cycle yet): the report says so before it writes a file."""
    runs = tmp_path / "runs"
    shutil.copytree(base, runs)
    for run in ("a", "b"):
        path = runs / run / "metrics.csv"
        path.write_bytes(header_only(path.read_bytes()))
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("falkit: error:")]
    assert len(errors) == 1 and "no falkit run" in errors[0] and "Traceback" not in err, err
    assert not out.exists()


def test_optional_files_may_be_absent(base, tmp_path):
    """No partition.csv, rounds.csv or status.json (an unfinished or older run) is no damage."""
    runs = tmp_path / "runs"
    shutil.copytree(base, runs)
    for name in ("partition.csv", "rounds.csv", "status.json"):
        (runs / "a" / name).unlink()
    with pytest.warns(UserWarning, match="incomplete run"):
        assert main(["show", str(runs)]) == 0
