"""People label the queries (issue 17): the per-client label queues on disk, the labeling
page (`falkit label`), and Label Studio import/export.

A queue lives on the client's own disk, `runs/<name>/labeling/client_<k>/cycle_<c>/`:
`queue.json` (the queued sample ids, the class names), `img_<id>.png` (each sample, scaled
up to be judged), `answers.json` (the answers so far, in the order given). Every write is
atomic and made under a file lock, so answers survive a crash of the server or the
browser, and two annotators on one queue never lose or duplicate an answer: the second
answer to a sample is refused (409).

The page is a Starlette app served by uvicorn on 127.0.0.1 by default. Every request needs
the run's random access token (printed in the URL at start); answers and undo are POSTs
that also need the page's CSRF token; a label must be one of the run's classes or
"unsure"; a sample id must be in the queue, and images are looked up by that id only (no
path from the request ever reaches the file system).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import secrets
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from falkit.errors import FalkitError
from falkit.oracle import UNSURE
from falkit.results import write_atomic

QUEUE, ANSWERS, LOCK, CLOSED = "queue.json", "answers.json", ".lock", "closed"
MIN_SIDE = 192  # images are scaled up (nearest neighbour) to at least this many pixels


class QueueError(FalkitError):
    """A request the queue refuses (unknown sample, label outside the classes, ...)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# -- the queue on disk ----------------------------------------------------------------------
def queue_folder(root: Path, client: int, cycle: int) -> Path:
    return Path(root) / f"client_{client}" / f"cycle_{cycle}"


def png_bytes(image: np.ndarray, min_side: int = MIN_SIDE) -> bytes:
    """A PNG of one uint8 image (C×H×W, C = 1 or 3), scaled up by an integer factor."""
    img = np.asarray(image, dtype=np.uint8)
    c, h, w = img.shape
    s = max(1, -(-min_side // max(h, w)))
    img = img.repeat(s, 1).repeat(s, 2)
    pixels = img[0] if c == 1 else img[:3].transpose(1, 2, 0)
    rows = b"".join(b"\0" + row.tobytes() for row in pixels.reshape(h * s, -1))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w * s, h * s, 8, 0 if c == 1 else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b""))


@contextlib.contextmanager
def _locked(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK).open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_queue(folder: Path) -> dict[str, Any]:
    return json.loads((folder / QUEUE).read_text())


def read_answers(folder: Path) -> list[dict[str, Any]]:
    """The answers so far, in the order given: [{"id": sample, "label": class or -1}]."""
    try:
        return json.loads((folder / ANSWERS).read_text())["answers"]
    except FileNotFoundError:
        return []


def _write_answers(folder: Path, answers: list[dict[str, Any]]) -> None:
    write_atomic(folder / ANSWERS, json.dumps({"answers": answers}, indent=1) + "\n")


def ensure_queue(folder: Path, client: int, cycle: int, ids: np.ndarray, images,
                 classes: list[str]) -> dict[int, int]:
    """Client k's queue of cycle c holds exactly `ids` (written now if it did not, images
    first, queue.json last); the answers given so far, by sample id."""
    with _locked(folder):
        return _ensure(folder, client, cycle, [int(i) for i in ids], images, classes)


def take(folder: Path, client: int, cycle: int, ids: np.ndarray, images,
         classes: list[str]) -> dict[int, int]:
    """What a run reads: `ensure_queue`'s answers, and if every queued sample has one, the
    queue closes in the same step, under the same lock, so the answers the run uses are
    the answers on disk: no undo or new answer can come between the read and the close."""
    ids = [int(i) for i in ids]
    with _locked(folder):
        answers = _ensure(folder, client, cycle, ids, images, classes)
        if all(i in answers for i in ids):
            _seal(folder)
        return answers


def _ensure(folder: Path, client: int, cycle: int, ids: list[int], images,
            classes: list[str]) -> dict[int, int]:
    try:
        queue = read_queue(folder)
    except (FileNotFoundError, ValueError):
        queue = None
    if queue is None or sorted(queue.get("ids", [])) != sorted(ids):
        for i in ids:
            write_atomic(folder / f"img_{i}.png", png_bytes(_image(images, i)))
        old = read_answers(folder)
        if old:  # another query: the answers to samples still queued are kept, all of
            # them are kept aside
            write_atomic(folder / f"answers.{len(list(folder.glob('answers.*.json')))}"
                         ".json", (folder / ANSWERS).read_bytes())
            queued = set(ids)
            _write_answers(folder, [a for a in old if a["id"] in queued])
        (folder / CLOSED).unlink(missing_ok=True)
        write_atomic(folder / QUEUE, json.dumps(
            {"client": client, "cycle": cycle, "classes": list(classes), "ids": ids},
            indent=1) + "\n")
    return {a["id"]: a["label"] for a in read_answers(folder)}


def close(folder: Path) -> None:
    """The run used this queue's answers: from now on they cannot change (409)."""
    with _locked(folder):
        _seal(folder)


def _seal(folder: Path) -> None:
    write_atomic(folder / CLOSED, "the run used these answers\n")


def _check_open(folder: Path) -> None:
    if (folder / CLOSED).exists():
        raise QueueError("this queue's answers were used by the run; they can no longer "
                         "change", 409)


def _image(images, i: int) -> np.ndarray:
    x = images[i]
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def answer(folder: Path, sample: Any, label: Any) -> dict[str, Any]:
    """Record one answer (a class index, or "unsure"); the queue's progress."""
    with _locked(folder):
        _check_open(folder)
        queue = read_queue(folder)
        sid = sample_id(queue, sample)
        if label == "unsure":
            value = UNSURE
        elif isinstance(label, int) and not isinstance(label, bool) \
                and 0 <= label < len(queue["classes"]):
            value = label
        else:
            raise QueueError(f"label must be a class index 0..{len(queue['classes']) - 1} "
                             f"or \"unsure\", got {label!r}")
        answers = read_answers(folder)
        if any(a["id"] == sid for a in answers):
            raise QueueError(f"sample {sid} is already answered", 409)
        answers.append({"id": sid, "label": value})
        _write_answers(folder, answers)
        return progress(queue, answers)


def undo(folder: Path, sample: Any = None) -> dict[str, Any]:
    """Take back the answer to `sample` (a page undoes its own last answer, so two
    annotators never undo each other's), or the last answer given."""
    with _locked(folder):
        _check_open(folder)
        queue, answers = read_queue(folder), read_answers(folder)
        if sample is None:
            if answers:
                answers.pop()
        else:
            sid = sample_id(queue, sample)
            if not any(a["id"] == sid for a in answers):
                raise QueueError(f"sample {sid} has no answer to undo", 409)
            answers = [a for a in answers if a["id"] != sid]
        _write_answers(folder, answers)
        return progress(queue, answers)


def sample_id(queue: dict[str, Any], sample: Any) -> int:
    """The queued sample a request names (404 if none)."""
    if isinstance(sample, float) and not sample.is_integer():
        raise QueueError(f"unknown sample {sample!r}", 404)
    try:
        sid = int(sample)
    except (TypeError, ValueError):
        raise QueueError(f"unknown sample {sample!r}", 404) from None
    if isinstance(sample, bool) or sid not in queue["ids"]:
        raise QueueError(f"sample {sample!r} is not in this queue", 404)
    return sid


def progress(queue: dict[str, Any], answers: list[dict[str, Any]]) -> dict[str, Any]:
    done = {a["id"] for a in answers}
    left = [i for i in queue["ids"] if i not in done]
    return {"client": queue["client"], "cycle": queue["cycle"], "classes": queue["classes"],
            "total": len(queue["ids"]), "answered": len(done), "next": left[:1],
            "last": answers[-1] if answers else None}


def _queues(root: Path, client: int | None = None) -> list[tuple[int, Path]]:
    """(cycle, folder) of the queues under a labeling root (of every client, or of
    `client`), in numeric cycle order (cycle 10 after cycle 2)."""
    found = []
    for folder in Path(root).glob(f"client_{'*' if client is None else client}/cycle_*"):
        c = folder.name[len("cycle_"):]
        if c.isdigit():
            found.append((int(c), folder))
    return sorted(found)


def latest_queue(run_dir: Path, client: int) -> Path:
    """The newest queue of client k in a run directory."""
    cycles = [f for _, f in _queues(Path(run_dir) / "labeling", client)
              if (f / QUEUE).is_file()]
    if not cycles:
        raise FalkitError(f"{run_dir} has no label queue for client {client} (run it with "
                          "oracle=human first)")
    return cycles[-1]


def all_answers(root: Path) -> dict[int, int]:
    """Every answer in every queue under `root` (sample id -> label)."""
    out: dict[int, int] = {}
    for _, folder in _queues(root):
        out.update({a["id"]: a["label"] for a in read_answers(folder)})
    return out


def count_unsure(root: Path, cycle: int, client: int | None = None) -> int:
    """"unsure" answers in the queues of the cycles up to `cycle` (of every client, or of
    `client`)."""
    return sum(1 for c, folder in _queues(root, client) if c <= cycle
               for a in read_answers(folder) if a["label"] == UNSURE)


# -- Label Studio ---------------------------------------------------------------------------
def label_studio_config(classes: list[str]) -> str:
    """The labeling interface to paste into a Label Studio project."""
    choices = "".join(f'    <Choice value="{c}"/>\n' for c in classes)
    return ('<View>\n  <Image name="image" value="$image"/>\n'
            '  <Choices name="label" toName="image" choice="single">\n'
            f"{choices}  </Choices>\n</View>\n")


def export_label_studio(folder: Path) -> list[dict[str, Any]]:
    """The unanswered samples of a queue as Label Studio tasks (images inline)."""
    queue = read_queue(folder)
    done = {a["id"] for a in read_answers(folder)}
    return [{"data": {"image": "data:image/png;base64," + base64.b64encode(
                (folder / f"img_{i}.png").read_bytes()).decode(), "sample": i}}
            for i in queue["ids"] if i not in done]


def import_label_studio(folder: Path, tasks: list[dict[str, Any]]) -> int:
    """Answers from a Label Studio JSON export (one choice per task); how many were new."""
    queue = read_queue(folder)
    names = {c: i for i, c in enumerate(queue["classes"])}
    new = 0
    for task in tasks:
        sample = task.get("data", {}).get("sample")
        anns = [r for a in task.get("annotations", []) if not a.get("was_cancelled")
                for r in a.get("result", []) if r.get("type") == "choices"]
        if sample is None or not anns:
            continue
        choice = anns[-1]["value"]["choices"][0]
        if choice not in names:
            raise QueueError(f"sample {sample}: {choice!r} is not one of the run's classes")
        try:
            answer(folder, sample, names[choice])
            new += 1
        except QueueError as e:
            if e.status != 409:  # already answered: the queue keeps the first answer
                raise
    return new


def new_token() -> str:
    return secrets.token_urlsafe(24)
