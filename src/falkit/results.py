"""Run directories (DESIGN.md §6): config.toml, metrics.csv, queries.jsonl, partition.csv,
status.json and checkpoint/. Every file is written atomically (temp file + rename), so a
killed run never leaves a half-written result."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from falkit.errors import FalkitError

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomic(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # disk full, ...: name the file the user would look for
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def csv_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    write_atomic(path, csv_text(rows))


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))


def save_torch(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


def _text(path: Path) -> str:
    """A result file's text; FalkitError (naming the file) if it is not UTF-8 text."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # (a BOM, as a spreadsheet saves it, is fine)
    except UnicodeDecodeError as e:
        bad = data[e.start:e.start + 1]
        raise FalkitError(f"{path}: not UTF-8 text (byte {e.start} is {bad!r}); the file is "
                          "damaged") from None
    if "\x00" in text:
        raise FalkitError(f"{path}: contains NUL bytes, not a text file; the file is damaged")
    return text


def read_csv_table(path: str | Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """A CSV file's header and rows, each row with its line number, checked: UTF-8 text,
    CSV syntax, and every row as many fields as the header (a short row is a cut write, an
    extra field a damaged one). Blank lines are skipped; an empty file is ([], []). Every
    problem is a FalkitError that names the file and the line."""
    path = Path(path)
    reader = csv.reader(io.StringIO(_text(path), newline=""))
    header: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    try:
        for row in reader:
            if not row:
                continue
            if header is None:
                header = row
                continue
            if len(row) != len(header):
                raise FalkitError(f"{path}: line {reader.line_num}: {len(row)} fields where "
                                  f"the header has {len(header)} ("
                                  + ("a short row: the file was cut or edited)"
                                     if len(row) < len(header) else "an extra field)"))
            rows.append((reader.line_num, row))
    except csv.Error as e:
        raise FalkitError(f"{path}: line {reader.line_num}: not CSV ({e})") from None
    return header or [], rows


def read_csv_records(path: str | Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """:func:`read_csv_table` as one dict per row (column -> text); a column named twice or
    not at all is a FalkitError."""
    header, rows = read_csv_table(path)
    for i, name in enumerate(header):
        if not name.strip():
            raise FalkitError(f"{path}: column {i + 1} of the header has no name")
        if name in header[:i]:
            raise FalkitError(f"{path}: column {name!r} appears twice in the header")
    return header, [(n, dict(zip(header, r, strict=True))) for n, r in rows]


def parse_value(text: str) -> Any:
    """A metrics.csv value: an int, else a float, else the text as it is."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.csv as a list of dicts with numbers parsed ([] if there is none yet). A damaged
    file (not UTF-8, a short row, an extra field, ...) is a FalkitError naming it."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return []
    return [{k: parse_value(v) for k, v in r.items()} for _, r in read_csv_records(path)[1]]


def json_kind(value: Any) -> str:
    """What a JSON value is, for an error message: "a string ('2')", "an array", "null"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    return "an array" if isinstance(value, list) else "an object"


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_status(run_dir: str | Path) -> dict[str, Any]:
    """status.json as a dict ({} if there is none), checked: a JSON object with `complete`
    (true or false), whole numbers `cycles_done` >= 0 and `cycles` >= 1 where present
    (`cycles_done` at most `cycles`, and equal to it in a complete run), `error` a string and
    `waiting` an object where present. Anything else is a FalkitError naming the file."""
    path = Path(run_dir) / "status.json"
    if not path.is_file():
        return {}
    try:
        status = json.loads(_text(path))
    except json.JSONDecodeError as e:
        raise FalkitError(f"{path}: not valid JSON ({e.msg}: line {e.lineno}, column "
                          f"{e.colno}); the file is damaged") from None
    if not isinstance(status, dict):
        raise FalkitError(f"{path}: must hold a JSON object, not {json_kind(status)}")
    if "complete" not in status:
        raise FalkitError(f"{path}: no \"complete\" (true or false): not falkit's status file")
    if not isinstance(status["complete"], bool):
        raise FalkitError(f"{path}: \"complete\" must be true or false, not "
                          f"{json_kind(status['complete'])}")
    for key, least in (("cycles_done", 0), ("cycles", 1)):
        if key in status:
            if not _whole(status[key]):
                raise FalkitError(f"{path}: \"{key}\" must be a whole number, not "
                                  f"{json_kind(status[key])}")
            if status[key] < least:
                raise FalkitError(f"{path}: \"{key}\" must be >= {least}, not {status[key]}")
    done, cycles = status.get("cycles_done"), status.get("cycles")
    if done is not None and cycles is not None:
        if done > cycles:
            raise FalkitError(f"{path}: \"cycles_done\" {done} is more than \"cycles\" "
                              f"{cycles}")
        if status["complete"] and done != cycles:
            raise FalkitError(f"{path}: \"complete\" is true but \"cycles_done\" is {done} "
                              f"of {cycles}")
    for key, kind, what in (("error", str, "a string"), ("waiting", dict, "an object")):
        if key in status and not isinstance(status[key], kind):
            raise FalkitError(f"{path}: \"{key}\" must be {what}, not {json_kind(status[key])}")
    return status


def is_complete(run_dir: str | Path) -> bool:
    return bool(read_status(run_dir).get("complete"))
