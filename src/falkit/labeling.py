"""People label the queries (issue 17): the per-client label queues on disk, the labeling
page (`falkit label`), and Label Studio import/export.

A queue lives on the client's own disk, `runs/<name>/labeling/client_<k>/cycle_<c>/`:
`queue.json` (the queued sample ids, the class names), `img_<id>.png` (each sample, scaled
up to be judged), `answers.json` (the answers so far, in the order given). Every write is
atomic and made under a file lock, so answers survive a crash of the server or the
browser, and two annotators on one queue never lose or duplicate an answer: the second
answer to a sample is refused (409). Each answer records who gave it (`by`: a page's hashed
annotator id, "label-studio" or "local"), and an undo takes back only its giver's answers.
A run reads a queue with `take`: the answers and, once every queued sample has one, the
queue's closing (`closed`; 409 from then on) are one step under the queue's lock, so the
labels a run uses are the labels on disk.

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
from xml.sax.saxutils import quoteattr

import numpy as np

from falkit.errors import FalkitError
from falkit.oracle import UNSURE
from falkit.results import write_atomic

QUEUE, ANSWERS, LOCK, CLOSED = "queue.json", "answers.json", ".lock", "closed"
LOCAL, LABEL_STUDIO = "local", "label-studio"  # who answered, besides the pages' annotators
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


def answer(folder: Path, sample: Any, label: Any, by: str = LOCAL) -> dict[str, Any]:
    """Record one answer (a class index, or "unsure") given by annotator `by` (the page's
    hashed annotator id; LOCAL for Python callers); the queue's progress as `by` sees it."""
    with _locked(folder):
        _check_open(folder)
        queue = read_queue(folder)
        sid = sample_id(queue, sample)
        value = check_label(queue, label)
        answers = read_answers(folder)
        if any(a["id"] == sid for a in answers):
            raise QueueError(f"sample {sid} is already answered", 409)
        answers.append({"id": sid, "label": value, "by": by})
        _write_answers(folder, answers)
        return progress(queue, answers, by)


def check_label(queue: dict[str, Any], label: Any) -> int:
    """A class index of the queue, or "unsure" (-> UNSURE); anything else is refused."""
    if label == "unsure":
        return UNSURE
    if isinstance(label, int) and not isinstance(label, bool) \
            and 0 <= label < len(queue["classes"]):
        return label
    raise QueueError(f"label must be a class index 0..{len(queue['classes']) - 1} "
                     f"or \"unsure\", got {label!r}")


def undo(folder: Path, sample: Any = None, by: str = LOCAL) -> dict[str, Any]:
    """Take back one of annotator `by`'s answers: the one to `sample`, or `by`'s last. Another
    annotator's answer is never taken back (409), so two pages never undo each other's."""
    with _locked(folder):
        _check_open(folder)
        queue, answers = read_queue(folder), read_answers(folder)
        own = [a for a in answers if a.get("by", LOCAL) == by]
        if sample is None:
            if not own:
                raise QueueError("this page has no answer to undo", 409)
            sid = own[-1]["id"]
        else:
            sid = sample_id(queue, sample)
            if not any(a["id"] == sid for a in own):
                raise QueueError(f"sample {sid} has no answer of this page to undo", 409)
        answers = [a for a in answers if a["id"] != sid]
        _write_answers(folder, answers)
        return progress(queue, answers, by)


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


def progress(queue: dict[str, Any], answers: list[dict[str, Any]], by: str | None = None
             ) -> dict[str, Any]:
    """What a page shows: counts, the next sample, and `by`'s own answers (oldest first; no
    page sees what another annotator answered)."""
    done = {a["id"] for a in answers}
    left = [i for i in queue["ids"] if i not in done]
    return {"client": queue["client"], "cycle": queue["cycle"], "classes": queue["classes"],
            "keys": class_keys(len(queue["classes"])), "total": len(queue["ids"]),
            "answered": len(done), "next": left[:1],
            "mine": [{"id": a["id"], "label": a["label"]} for a in answers
                     if by is not None and a.get("by", LOCAL) == by]}


def class_keys(n: int) -> list[str]:
    """The key that answers each of n classes: 0-9, then the letters but u (unsure), one
    each (35 classes); classes beyond have none (the page's filter reaches every class).
    The labeling page and the exported Label Studio config use the same keys."""
    keys = [*"0123456789", *(c for c in "abcdefghijklmnopqrstvwxyz")]
    return keys[:n] + [""] * max(0, n - len(keys))


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
def unsure_choice(classes: list[str]) -> str:
    """The Label Studio choice that means "unsure" ("unsure", unless a class has that
    name)."""
    return "unsure" if "unsure" not in classes else "unsure (not a class)"


def label_studio_config(classes: list[str]) -> str:
    """The labeling interface to paste into a Label Studio project: each class a choice
    whose hotkey is the page's key for it (without one, Label Studio numbers the choices
    from 1, so pressing 2 would choose class 1), and an "unsure" choice on `u`. Names are
    XML-escaped (a class named `a & "b"` is a valid attribute)."""
    keys = class_keys(len(classes))
    choices = "".join(
        f"    <Choice value={quoteattr(c)}{f' hotkey={quoteattr(k)}' if k else ''}/>\n"
        for c, k in zip(classes, keys, strict=True))
    choices += f'    <Choice value={quoteattr(unsure_choice(classes))} hotkey="u"/>\n'
    return ('<View>\n  <Image name="image" value="$image"/>\n'
            '  <Choices name="label" toName="image" choice="single" showInline="true">\n'
            f"{choices}  </Choices>\n</View>\n")


def export_label_studio(folder: Path) -> list[dict[str, Any]]:
    """The unanswered samples of a queue as Label Studio tasks (images inline)."""
    queue = read_queue(folder)
    done = {a["id"] for a in read_answers(folder)}
    return [{"data": {"image": "data:image/png;base64," + base64.b64encode(
                (folder / f"img_{i}.png").read_bytes()).decode(), "sample": i}}
            for i in queue["ids"] if i not in done]


def _ls_choice(where: str, value: Any, names: dict[str, int]) -> int:
    """One annotation's class (or UNSURE) from its choices; a malformed one is refused."""
    choices = value.get("choices") if isinstance(value, dict) else value
    if isinstance(choices, str):
        choices = [choices]
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], str):
        raise QueueError(f"{where}: expected exactly one choice, got {choices!r}")
    if choices[0] not in names:
        raise QueueError(f"{where}: {choices[0]!r} is not one of the run's classes")
    return names[choices[0]]


def _ls_annotations(tasks: Any, names: dict[str, int]) -> list[tuple[Any, list[int]]]:
    """(sample, its annotations' labels, oldest first) of every task of a Label Studio
    export: the JSON export (tasks with `data` and `annotations`) or JSON_MIN (one flat row
    per annotation: the task's data fields and the choice under the control's name,
    `label`). Anything else is refused in one line, before anything is written."""
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise QueueError("not a Label Studio export: expected a JSON list of tasks (export "
                         "the project as JSON or JSON_MIN)")
    out: dict[Any, list[tuple[tuple[str, int], int]]] = {}
    for n, task in enumerate(tasks):
        where = f"task {task.get('id', n + 1)}"
        if "data" in task or "annotations" in task:  # the JSON export
            data, anns = task.get("data"), task.get("annotations", [])
            if not isinstance(data, dict) or not isinstance(anns, list):
                raise QueueError(f"{where}: 'data' must be an object and 'annotations' a list")
            sample = data.get("sample")
            labels = []
            for m, a in enumerate(anns):
                if not isinstance(a, dict) or not isinstance(a.get("result", []), list):
                    raise QueueError(f"{where}: annotation {m + 1} is not a Label Studio "
                                     "annotation")
                if a.get("was_cancelled"):
                    continue
                for r in a.get("result", []):
                    if isinstance(r, dict) and r.get("type") == "choices":
                        if "value" not in r:
                            raise QueueError(f"{where}: a choices result without 'value'")
                        when = str(a.get("updated_at") or a.get("created_at") or "")
                        labels.append(((when, m), _ls_choice(where, r["value"], names)))
        elif "sample" in task:  # JSON_MIN: the choice under the control's name
            sample = task["sample"]
            when = str(task.get("updated_at") or task.get("created_at") or "")
            labels = ([((when, n), _ls_choice(where, task["label"], names))]
                      if task.get("label") not in (None, "", []) else [])
        else:
            raise QueueError(f"{where}: no data.sample: not a task falkit exported (export "
                             "the Label Studio project as JSON or JSON_MIN)")
        if sample is None:
            raise QueueError(f"{where}: no data.sample: not a task falkit exported")
        out.setdefault(sample, []).extend(labels)
    return [(s, [label for _, label in sorted(got)]) for s, got in out.items()]


def import_label_studio(folder: Path, tasks: Any) -> dict[str, list[int]]:
    """Answers from a Label Studio export, all or nothing: every task is checked first, the
    answers are written in one step. The rule, per sample: of its annotations the newest
    (Label Studio's `updated_at`, else `created_at`, else the order in the file) counts,
    and if they disagree the sample is reported `conflicting`; a new answer is `new`; an
    answer an earlier import gave and Label Studio now corrects is `updated` (while the
    queue is open); the same label is `unchanged`; an answer given on the page that Label
    Studio contradicts is `kept` (the page's stands); tasks without an annotation are
    `unannotated`. Returns the sample ids of each."""
    with _locked(folder):
        queue = read_queue(folder)
        names = {c: i for i, c in enumerate(queue["classes"])}
        names.setdefault(unsure_choice(queue["classes"]), UNSURE)
        found = [(sample_id(queue, s), labels) for s, labels in _ls_annotations(tasks, names)]
        answers = read_answers(folder)
        given = {a["id"]: a for a in answers}
        out: dict[str, list[int]] = {k: [] for k in (
            "new", "updated", "unchanged", "kept", "conflicting", "unannotated")}
        for sid, labels in found:
            if not labels:
                out["unannotated"].append(sid)
                continue
            if len(set(labels)) > 1:
                out["conflicting"].append(sid)
            label, old = labels[-1], given.get(sid)
            if old is None:
                out["new"].append(sid)
                answers.append({"id": sid, "label": label, "by": LABEL_STUDIO})
            elif old["label"] == label:
                out["unchanged"].append(sid)
            elif old.get("by") == LABEL_STUDIO:
                out["updated"].append(sid)
                old["label"] = label
            else:
                out["kept"].append(sid)
        if out["new"] or out["updated"]:
            _check_open(folder)
            _write_answers(folder, answers)
        return out


def new_token() -> str:
    return secrets.token_urlsafe(24)
