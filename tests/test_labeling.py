"""People label the queries (issue 17): the human oracle's queues, runs that wait, the
labeling page (its security, concurrent annotators), Label Studio, and a real browser."""

import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from falkit import config, labeling
from falkit.cli import main
from falkit.data.federation import build
from falkit.loop import run
from falkit.oracle import UNSURE, WaitingForLabels

starlette = pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from falkit import labelpage  # noqa: E402
from falkit.labelpage import create_app  # noqa: E402

SMALL = ["data.dataset=digits", "data.rho=5", "partition.num_clients=3",
         "partition.alpha=1.0", "budget.fraction=0.05", "budget.cycles=2", "fl.rounds=2",
         "fl.local_epochs=1", "model.backbone=resnet8_preact16", "runtime.threads=1",
         "strategy=entropy@G"]


def _cfg(out: Path, *extra: str):
    return config.load(None, overrides=config.parse_overrides([*SMALL, f"out_dir={out}",
                                                                *extra]))


# the true labels the annotators in these tests know: the run's (long-tailed) train split
Y = build(_cfg(Path("unused"))).dataset.y_train


def _only(parent: Path) -> Path:
    (d,) = [p for p in parent.iterdir() if p.is_dir()]
    return d


def _page_client(folder: Path, token: str, annotator: str = "annotator-a-0123456789"):
    """A client of the page as a browser tab is one: the served host name, the page's CSRF
    token and its annotator id (the headers every POST needs)."""
    http = TestClient(create_app(folder, token), base_url="http://127.0.0.1:8765")
    page = http.get(f"/?token={token}").text
    csrf = re.search(r'name="csrf" content="([^"]+)"', page).group(1)
    return http, {"X-CSRF-Token": csrf, "X-Annotator": annotator}


def _label_all(run_dir: Path, answer=lambda sid: int(Y[sid])) -> int:
    """Answer every queued sample of every client through the page's HTTP API."""
    n = 0
    for client in sorted(run_dir.glob("labeling/client_*")):
        folder = labeling.latest_queue(run_dir, int(client.name.split("_")[1]))
        http, ok = _page_client(folder, "tok")
        while (state := http.get("/api/queue?token=tok").json())["next"]:
            sid = state["next"][0]
            r = http.post("/api/answer?token=tok", json={"id": sid, "label": answer(sid)},
                          headers=ok)
            assert r.status_code == 200, r.text
            n += 1
    return n


def test_a_human_run_waits_then_equals_the_simulated_run(tmp_path, capsys):
    ref = run(_cfg(tmp_path / "sim")).run_dir
    args = ["run", *SMALL, f"out_dir={tmp_path / 'human'}", "oracle=human", "--quiet"]
    asked = []
    while (code := main(args)) == 3:  # documented: 3 = waiting for labels
        err = capsys.readouterr().err
        assert "waiting for" in err and "falkit label" in err
        run_dir = _only(tmp_path / "human")
        status = json.loads((run_dir / "status.json").read_text())
        assert status["complete"] is False and status["waiting"]["labels"] > 0
        asked.append(_label_all(run_dir))
        assert len(asked) <= 2
    assert code == 0 and asked == [33, 33]  # b_k = 11 per client, cycle 0 and cycle 1
    got = _only(tmp_path / "human")
    assert (got / "queries.jsonl").read_bytes() == (ref / "queries.jsonl").read_bytes()
    keep = ("cycle", "accuracy", "labeled", "comm_bytes")
    rows = [[r[k] for k in keep] for r in csv_rows(got)]
    assert rows == [[r[k] for k in keep] for r in csv_rows(ref)]


def csv_rows(d: Path) -> list[dict]:
    import csv

    return list(csv.DictReader((d / "metrics.csv").open()))


def test_a_partial_answer_set_is_never_used_and_unsure_goes_back_to_the_pool(tmp_path):
    cfg = _cfg(tmp_path, "oracle=human", "budget.cycles=3")
    with pytest.raises(WaitingForLabels):
        run(cfg)
    run_dir = _only(tmp_path)
    folder = labeling.latest_queue(run_dir, 0)
    ids = labeling.read_queue(folder)["ids"]
    labeling.answer(folder, ids[0], int(Y[ids[0]]))
    _label_all(run_dir)  # the rest of client 0 and clients 1, 2
    labeling.undo(folder)  # client 0's last answer taken back: its queue is short again
    with pytest.raises(WaitingForLabels) as e:
        run(cfg)
    assert [p.client for p in e.value.pending] == [0] and e.value.left == 1
    assert not (run_dir / "checkpoint").exists()  # nothing was trained on a partial set
    remaining = [i for i in ids if i not in {a["id"] for a in labeling.read_answers(folder)}]
    labeling.answer(folder, remaining[0], "unsure")
    with pytest.raises(WaitingForLabels):  # cycle 1's queues now
        run(cfg)
    records = [json.loads(x) for x in (run_dir / "queries.jsonl").read_text().splitlines()]
    first = next(r for r in records if r["client"] == 0)
    assert first["labels"][first["indices"].index(remaining[0])] == UNSURE
    rows = csv_rows(run_dir)
    assert int(rows[0]["labeled"]) == 32  # 33 asked, one "unsure": back in the pool
    _label_all(run_dir)
    with pytest.raises(WaitingForLabels):  # cycle 2's: resumed from the checkpoint, with
        run(cfg)  # the "unsure" answer still counted against the budget (audited)
    _label_all(run_dir)
    assert run(cfg).metrics[-1]["cycle"] == 2



@pytest.mark.parametrize("transport", ["inprocess", "flower"])
def test_the_labels_a_run_uses_are_the_labels_on_disk_whatever_comes_between(
        tmp_path, monkeypatch, transport):
    """Issue 23.1: at every point where the run takes or gives back a queue's lock, an
    annotator undoes an answer of every queue and answers it again with another class.
    Before the run read a queue the change is what the run uses; once it read it, the
    queue is closed (409). Either way the labels the run used are the labels on disk
    (the old code read the answers, let go of the lock and closed the queue later: an undo
    in between was accepted and the run trained on labels the files no longer showed).
    On Flower each site reads its own queue (the ClientApp's oracle), in the same way."""
    import contextlib

    if transport == "flower":
        pytest.importorskip("flwr")
        from tests.test_transports import MemoryGrid, flower_run, run_config

        from falkit.flower import client_app

        def go():
            client_app._SITES.clear()  # new SuperNodes each time: state only on their disks
            over = {"strategy": "entropy@G", "oracle": "human"}
            flower_run(tmp_path, grid=MemoryGrid(run_config(tmp_path, **over)), **over)
    else:
        cfg = _cfg(tmp_path, "oracle=human")

        def go():
            run(cfg)
    real = labeling._locked
    active, seen = [], {"changed": 0, "refused": 0}

    def tamper(folder: Path) -> None:
        if not active or len(active) > 1:
            return
        active.append("tampering")  # the annotator's own calls take the lock too
        try:
            for _, queue in labeling._queues(folder.parent.parent):
                answers = labeling.read_answers(queue)
                if not answers:
                    continue
                a = answers[(seen["changed"] + seen["refused"]) % len(answers)]
                try:
                    labeling.undo(queue, a["id"], a["by"])
                except labeling.QueueError as e:
                    assert e.status == 409  # the run read it: closed
                    seen["refused"] += 1
                    continue
                labeling.answer(queue, a["id"], (max(a["label"], 0) + 1) % 10)
                seen["changed"] += 1
        finally:
            active.pop()

    @contextlib.contextmanager
    def locked(folder):
        tamper(folder)
        with real(folder):
            yield
        tamper(folder)

    monkeypatch.setattr(labeling, "_locked", locked)
    for _ in range(3):
        active.append("run")
        try:
            go()
            break
        except WaitingForLabels:
            pass
        finally:
            active.clear()
        _label_all(_only(tmp_path))
    else:
        raise AssertionError("the run never finished")
    run_dir = _only(tmp_path)
    assert json.loads((run_dir / "status.json").read_text())["complete"] is True
    assert seen["changed"] > 0 and seen["refused"] > 0  # both kinds of point were reached
    records = [json.loads(x) for x in (run_dir / "queries.jsonl").read_text().splitlines()]
    assert len(records) == 6  # 3 clients x 2 cycles
    for r in records:
        on_disk = {a["id"]: a["label"] for a in labeling.read_answers(
            labeling.queue_folder(run_dir / "labeling", r["client"], r["cycle"]))}
        assert dict(zip(r["indices"], r["labels"], strict=True)) == on_disk, r["client"]

# -- the page's security -----------------------------------------------------------------------
@pytest.fixture
def queue(tmp_path):
    images = np.arange(5 * 1 * 4 * 4, dtype=np.uint8).reshape(5, 1, 4, 4)
    folder = labeling.queue_folder(tmp_path / "labeling", 0, 1)
    labeling.ensure_queue(folder, 0, 1, np.array([1, 3, 4]), images, ["a", "b"])
    http, ok = _page_client(folder, "secret")
    return folder, http, ok


def test_every_request_needs_the_token(queue):
    folder, http, ok = queue
    for path in ("/", "/api/queue", "/image/1"):
        assert http.get(path).status_code == 401
        assert http.get(path + "?token=wrong").status_code == 403
        assert http.get(path, headers={"X-Token": "secret"}).status_code == 200
    assert http.post("/api/answer", json={"id": 1, "label": 0},
                     headers=ok).status_code == 401
    assert labeling.read_answers(folder) == []


def test_posts_need_the_csrf_token_and_valid_answers(queue):
    folder, http, ok = queue
    post = "/api/answer?token=secret"
    assert http.post(post, json={"id": 1, "label": 0}).status_code == 403  # no CSRF token
    assert http.post(post, json={"id": 1, "label": 0},
                     headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert http.post(post, json={"id": 2, "label": 0}, headers=ok).status_code == 404  # foreign
    assert http.post(post, json={"id": 1, "label": 2}, headers=ok).status_code == 400  # class
    assert http.post(post, json={"id": 1, "label": "b"}, headers=ok).status_code == 400
    assert http.post(post, json={"id": 1, "label": True}, headers=ok).status_code == 400
    assert http.post(post, content=b"[1]", headers=ok).status_code == 400
    assert http.post(post, content=b"{x", headers=ok).status_code == 400
    assert labeling.read_answers(folder) == []
    assert http.post(post, json={"id": 1, "label": 1}, headers=ok).json()["answered"] == 1
    assert http.post("/api/undo?token=secret").status_code == 403
    assert http.post("/api/undo?token=secret", headers=ok).json()["answered"] == 0


def test_no_path_reaches_the_file_system(queue):
    folder, http, _ = queue
    (folder.parent / "secret.txt").write_text("nope")
    for bad in ("../secret.txt", "..%2Fsecret.txt", "1.png", "%2e%2e", "-1", "0x1", "2",
                "/etc/passwd"):
        r = http.get(f"/image/{bad}?token=secret")
        assert r.status_code in (404, 400), (bad, r.status_code)
        assert b"nope" not in r.content
    r = http.get("/image/3?token=secret")
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    assert http.get("/labeling/client_0/cycle_1/queue.json?token=secret").status_code == 404


def test_two_annotators_never_lose_or_duplicate_an_answer(queue):
    folder, http, ok = queue
    codes = []

    def give(label):
        codes.append(http.post("/api/answer?token=secret", json={"id": 4, "label": label},
                               headers=ok).status_code)

    threads = [threading.Thread(target=give, args=(i % 2,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200] + [409] * 7
    assert [a["id"] for a in labeling.read_answers(folder)] == [4]
    # and in parallel on different samples, every answer is kept
    threads = [threading.Thread(target=lambda s=s: http.post(
        "/api/answer?token=secret", json={"id": s, "label": 0},
        headers=ok)) for s in (1, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(a["id"] for a in labeling.read_answers(folder)) == [1, 3, 4]


def test_png_images_decode_to_the_sample():
    import io

    from PIL import Image

    img = np.random.default_rng(0).integers(0, 256, (3, 5, 7), dtype=np.uint8)
    png = Image.open(io.BytesIO(labeling.png_bytes(img, min_side=14)))
    arr = np.asarray(png)
    assert arr.shape == (10, 14, 3)  # scaled by 2
    assert (arr[::2, ::2].transpose(2, 0, 1) == img).all()
    gray = np.asarray(Image.open(io.BytesIO(labeling.png_bytes(img[:1], min_side=1))))
    assert (gray == img[0]).all()


def _ls_task(sample: int, *choices: str, when: list[str] | None = None) -> dict:
    """A task as Label Studio's JSON export writes it (labelstud.io/guide/export, the
    `annotations[].result[]` of a Choices control named "label" on "image")."""
    return {"id": 100 + sample, "data": {"image": "data:image/png;base64,", "sample": sample},
            "annotations": [{"id": 7 + n, "completed_by": 1, "was_cancelled": False,
                             "created_at": (when or [""] * len(choices))[n],
                             "updated_at": (when or [""] * len(choices))[n],
                             "result": [{"id": "r1", "from_name": "label",
                                         "to_name": "image", "type": "choices",
                                         "origin": "manual", "value": {"choices": [c]}}]}
                            for n, c in enumerate(choices)], "predictions": []}


def test_label_studio_config_is_valid_xml_with_the_page_keys(tmp_path):
    """Issue 23.9-10: each choice's hotkey is its class key (without, Label Studio numbers
    choices from 1: pressing 2 chose class "1"), "unsure" is a choice on u, and names
    with & " < > are escaped: the config parses as XML and gives the names back."""
    import xml.etree.ElementTree as ET

    classes = ['T-shirt & top', 'say "hi"', "<b>old</b>", "it's"] + [f"c{i}" for i in range(9)]
    root = ET.fromstring(labeling.label_studio_config(classes))
    (control,) = root.iter("Choices")
    assert (control.get("name"), control.get("toName"), control.get("choice")) == \
        ("label", "image", "single")
    got = [(c.get("value"), c.get("hotkey")) for c in control.iter("Choice")]
    assert got == [*zip(classes, labeling.class_keys(13), strict=True), ("unsure", "u")]
    assert got[2] == ("<b>old</b>", "2") and got[10] == ("c6", "a")
    assert labeling.unsure_choice(["unsure", "b"]) != "unsure"


def test_label_studio_import_is_all_or_nothing_and_follows_its_rule(queue, tmp_path, capsys):
    """Issue 23.11: a bad choice or a malformed file writes nothing (one line, exit 2);
    JSON and JSON_MIN exports both import; a label corrected in Label Studio after a first
    import updates it, the page's own answers are kept over Label Studio's, and of two
    disagreeing annotations the newest counts; the CLI says each count."""
    folder, http, ok = queue
    run_dir = folder.parent.parent.parent
    tasks = labeling.export_label_studio(folder)
    assert [t["data"]["sample"] for t in tasks] == [1, 3, 4]
    assert tasks[0]["data"]["image"].startswith("data:image/png;base64,")
    path = tmp_path / "export.json"

    def imported(data) -> int:
        path.write_text(json.dumps(data) if not isinstance(data, str) else data)
        return main(["label", str(run_dir), "--client", "0", "--import-label-studio",
                     str(path)])

    bad = [_ls_task(1, "a"), _ls_task(3, "b"), _ls_task(4, "zebra")]
    assert imported(bad) == 2 and "'zebra' is not one of the run's classes" in \
        capsys.readouterr().err
    for malformed in ({"tasks": []}, ["a", "b"], [1, 2],
                      [{**_ls_task(1, "a"), "annotations": [{"result": [
                          {"type": "choices", "value": {"choices": []}}]}]}],
                      [{**_ls_task(1, "a"), "annotations": [{"result": [
                          {"type": "choices", "val": {"choices": ["a"]}}]}]}],
                      [{"data": {"image": "x"}, "annotations": []}],
                      [{"data": {"sample": 2}, "annotations": []}],  # not in this queue
                      [{"image": "x", "id": 1, "label": "a"}], "{" * 5, "[" * 50000):
        assert imported(malformed) == 2, malformed
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("falkit: error:"), err
    assert labeling.read_answers(folder) == []  # nothing half-written
    minimal = [{"image": "x", "sample": 1, "id": 101, "label": "a", "annotator": 1,
                "annotation_id": 7, "created_at": "2026-01-01T00:00:00Z",
                "updated_at": "2026-01-01T00:00:00Z", "lead_time": 2.0}]  # JSON_MIN
    assert imported(minimal) == 0
    assert "1 new answers" in capsys.readouterr().out and _given(folder) == [(1, 0)]
    assert http.post("/api/answer?token=secret", json={"id": 4, "label": 1},
                     headers=ok).status_code == 200  # sample 4 answered on the page
    again = [_ls_task(1, "b"), _ls_task(3, "a", "unsure", when=["2026-01-02", "2026-01-03"]),
             _ls_task(4, "a"), {**_ls_task(9, "a"), "data": {"sample": 3},
                                "annotations": []}]
    assert imported(again) == 0
    out = capsys.readouterr().out
    assert "1 updated (corrected in Label Studio) (sample 1)" in out
    assert "1 tasks with disagreeing annotations took the newest (sample 3)" in out
    assert "1 answers given on the page kept over Label Studio's (sample 4)" in out
    assert _given(folder) == [(1, 1), (4, 1), (3, UNSURE)]  # 3: the newest, "unsure"
    labeling.close(folder)
    assert imported([_ls_task(1, "a")]) == 2  # a used queue cannot change
    assert imported([_ls_task(1, "b")]) == 0  # unchanged is fine
    out = tmp_path / "tasks.json"
    assert main(["label", str(run_dir), "--export-label-studio", str(out)]) == 0
    assert json.loads(out.read_text()) == []
    assert out.with_suffix(".xml").is_file()


def test_on_flower_each_site_keeps_its_queue_and_the_run_pauses(tmp_path):
    """oracle=human on Flower: each ClientApp writes its queue on its site's disk, the
    ServerApp pauses the run (status.json says how many labels it waits for), and the same
    run submitted again continues; only counts reach the server without simulation
    metrics; with the true labels the results equal the simulated in-process run's."""
    pytest.importorskip("flwr")
    from tests.test_transports import SMALL as FLOWER_SMALL
    from tests.test_transports import MemoryGrid, flower_run, run_config

    from falkit.flower import client_app

    over = {"strategy": "entropy@G"}  # on test_transports' small config
    ref = run(config.load(None, overrides={**FLOWER_SMALL, **over,
                                           "out_dir": str(tmp_path / "sim")})).run_dir
    out = tmp_path / "flower"
    rounds = 0
    while True:
        client_app._SITES.clear()  # new SuperNodes each time: state only on their disks
        grid = MemoryGrid(run_config(out, **over, oracle="human"))
        try:
            got = flower_run(out, grid=grid, **over, oracle="human")
            break
        except WaitingForLabels as e:
            run_dir = _only(out)
            status = json.loads((run_dir / "status.json").read_text())
            assert status["waiting"]["labels"] == e.left == 33
            assert _label_all(run_dir) == 33
            rounds += 1
            assert rounds <= 2
    assert rounds == 2
    assert (got / "queries.jsonl").read_bytes() == (ref / "queries.jsonl").read_bytes()
    keep = ("cycle", "accuracy", "labeled", "comm_bytes")
    assert [[r[k] for k in keep] for r in csv_rows(got)] == \
        [[r[k] for k in keep] for r in csv_rows(ref)]


def test_run_wait_polls_until_people_answer(tmp_path):
    """`falkit run ... --wait` does not stop: it waits for the answers, then goes on."""
    import subprocess
    import sys
    import time

    falkit = str(Path(sys.executable).parent / "falkit")
    proc = subprocess.Popen([falkit, "run", *SMALL, f"out_dir={tmp_path}", "oracle=human",
                             "--wait", "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        answered = 0
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            runs = [p for p in tmp_path.iterdir() if p.is_dir()]
            queues = list(runs[0].glob("labeling/client_*/cycle_*/queue.json")) if runs else []
            for q in queues:  # answer whatever is queued, as annotators would
                folder = q.parent
                have = {a["id"] for a in labeling.read_answers(folder)}
                for sid in labeling.read_queue(folder)["ids"]:
                    if sid not in have:
                        labeling.answer(folder, sid, int(Y[sid]))
                        answered += 1
            time.sleep(0.5)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert answered == 66 and err.count("waiting for 33 labels") == 2
    assert "results:" in out


def test_labels_never_leave_a_site(tmp_path):
    """oracle=human on Flower without simulation metrics: what the sites send the server
    holds no sample id, label or image — model arrays and declared counts only."""
    pytest.importorskip("flwr")
    from flwr.app import ArrayRecord, ConfigRecord
    from tests.test_transports import MemoryGrid, flower_run, run_config

    from falkit.flower import client_app

    class Recording(MemoryGrid):
        def pull_messages(self, message_ids):
            replies = super().pull_messages(message_ids)
            self.replies += [(r.metadata.message_type, r.content) for r in replies]
            return replies

    over = {"strategy": "entropy@G", "oracle": "human"}
    rc = {**run_config(tmp_path, **over), "simulation-metrics": False}
    for _ in range(3):
        client_app._SITES.clear()
        grid = Recording(rc)
        grid.replies = []
        try:
            flower_run(tmp_path, grid=grid, **over)
            break
        except WaitingForLabels:
            _label_all(_only(tmp_path))
        for kind, content in grid.replies:
            for name, record in content.items():
                if (kind, name) == ("query.info", "site"):  # versions, dataset name, digests
                    assert set(record) == {"falkit", "schema", "kind", "dataset", "train",
                                           "test"}, dict(record)
                    continue
                assert not isinstance(record, ConfigRecord), (kind, name)
                if isinstance(record, ArrayRecord):
                    assert kind == "train" and name == "model", (kind, name)
                else:
                    assert set(record) <= {"labeled", "queried", "waiting", "num-examples",
                                           "correct", "total", "partition-id", "pool",
                                           "num-train", "num-classes", "in-channels",
                                           "image-size", "test"}, (kind, dict(record))
    records = [json.loads(x) for x in (_only(tmp_path) / "queries.jsonl").read_text()
               .splitlines()]
    assert records and all("labels" not in r and "indices" not in r for r in records)


def test_serving_beyond_loopback_warns(tmp_path, monkeypatch, capsys):
    images = np.zeros((3, 1, 2, 2), dtype=np.uint8)
    run_dir = tmp_path / "r"
    labeling.ensure_queue(labeling.queue_folder(run_dir / "labeling", 0, 0), 0, 0,
                          np.array([0, 2]), images, ["a", "b"])
    served = []
    import falkit.labelpage

    monkeypatch.setattr(falkit.labelpage, "serve", lambda *a: served.append(a))
    assert main(["label", str(run_dir), "--host", "0.0.0.0"]) == 0
    assert "warning: serving on 0.0.0.0" in capsys.readouterr().err
    assert main(["label", str(run_dir)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert [a[1] for a in served] == ["0.0.0.0", "127.0.0.1"]


def _given(folder: Path) -> list[tuple[int, int]]:
    return [(a["id"], a["label"]) for a in labeling.read_answers(folder)]


def test_undo_takes_back_only_what_that_page_answered(queue):
    """Issue 23.4: a page (an annotator id, kept across reloads of the tab) undoes only its
    own answers, by name or its last; another page's undo of them is refused (409), also
    `undo {}`; the queue API tells each page its own answers only, so the page can show
    the answer just given; a queue the run used can no longer change (409)."""
    folder, a, ok_a = queue
    b, ok_b = _page_client(folder, "secret", annotator="annotator-b-0123456789")
    post, undo = "/api/answer?token=secret", "/api/undo?token=secret"
    assert a.post(post, json={"id": 3, "label": 0}, headers=ok_a).status_code == 200
    r = b.post(post, json={"id": 4, "label": 1}, headers=ok_b)
    assert r.json()["mine"] == [{"id": 4, "label": 1}]  # B sees its own answer, not A's
    assert b.post(undo, json={"id": 3}, headers=ok_b).status_code == 409  # A's
    assert b.post(undo, json={}, headers=ok_b).json()["mine"] == []  # B's last: its own 4
    assert b.post(undo, json={}, headers=ok_b).status_code == 409  # nothing of B's left
    assert _given(folder) == [(3, 0)]
    missing = {"X-CSRF-Token": ok_a["X-CSRF-Token"]}
    assert a.post(undo, json={"id": 3}, headers=missing).status_code == 400  # no annotator
    reloaded, _ = _page_client(folder, "secret")  # A's tab reloaded: the same annotator id
    assert reloaded.get("/api/queue?token=secret", headers={"X-Annotator": ok_a[
        "X-Annotator"]}).json()["mine"] == [{"id": 3, "label": 0}]
    assert reloaded.post(undo, json={"id": 3}, headers=ok_a).status_code == 200
    assert _given(folder) == []
    assert a.post(post, json={"id": 1, "label": 1}, headers=ok_a).status_code == 200
    assert ok_a["X-Annotator"] not in (folder / labeling.ANSWERS).read_text()  # hashed
    images = np.zeros((5, 1, 4, 4), dtype=np.uint8)
    labeling.ensure_queue(folder, 0, 1, np.array([4, 1, 3]), images, ["a", "b"])  # reordered
    assert _given(folder) == [(1, 1)]
    labeling.close(folder)
    assert a.post(post, json={"id": 3, "label": 0}, headers=ok_a).status_code == 409
    assert a.post(undo, json={"id": 1}, headers=ok_a).status_code == 409
    assert a.get("/api/queue?token=secret").json()["closed"] is True
    assert a.post(post, json={"id": 9.7, "label": 0}, headers=ok_a).status_code in (404, 409)
    assert a.get("/api/queue?token=s\u00e9cret").status_code == 403  # not a 500


def test_bodies_json_headers_and_host_names(queue):
    """Issue 23.5-6: bodies over 4 KiB 413 (whatever Content-Length says), deeply nested or
    malformed JSON 400 (was a 500); every response has the security headers (the page a
    CSP with a nonce for its own script); a Host that is not a served name 400."""
    folder, http, ok = queue
    post = "/api/answer?token=secret"
    assert http.post(post, content=b"[" * 2000 + b"]" * 2000, headers=ok).status_code == 400
    assert http.post(post, content=b"{" * 100, headers=ok).status_code == 400
    big = b'{"id": 1, "label": 0, "pad": "' + b"x" * 5000 + b'"}'
    assert http.post(post, content=big, headers=ok).status_code == 413

    def chunks():  # no Content-Length: the size is counted as the body streams in
        for _ in range(100):
            yield b"x" * 100

    assert http.post(post, content=chunks(), headers=ok).status_code == 413
    assert labeling.read_answers(folder) == []
    for path in ("/?token=secret", "/api/queue?token=secret", "/image/1?token=secret",
                 "/api/queue", "/nowhere"):
        h = http.get(path).headers
        assert h["x-frame-options"] == "DENY" and h["x-content-type-options"] == "nosniff"
        assert h["referrer-policy"] == "no-referrer" and h["cache-control"] == "no-store"
        assert "frame-ancestors 'none'" in h["content-security-policy"]
    page = http.get("/?token=secret")
    nonce = re.search(r"'nonce-([^']+)'", page.headers["content-security-policy"])[1]
    assert page.text.count(f'nonce="{nonce}"') == 2 and "unsafe-inline" not in \
        page.headers["content-security-policy"]
    assert http.get("/api/queue?token=secret", headers={"Host": "evil.example"}
                    ).status_code == 400  # DNS rebinding: the attacker's name
    assert http.get("/api/queue?token=secret", headers={"Host": "localhost:8765"}
                    ).status_code == 200
    assert http.get("/api/queue?token=secret", headers={"Host": "[::1]:8765"}
                    ).status_code == 200
    assert http.get("/api/queue?token=secret", headers={"Host": "10.0.0.7:8765"}
                    ).status_code == 400  # loopback-only: not another address either
    lan = TestClient(create_app(folder, "secret", labelpage.served_hosts("0.0.0.0")),
                     base_url="http://10.0.0.7:8765")
    assert lan.get("/api/queue?token=secret").status_code == 200  # 0.0.0.0: any address
    assert lan.get("/api/queue?token=secret", headers={"Host": "evil.example"}
                   ).status_code == 400


def test_a_restarted_server_with_the_same_token_keeps_open_pages(queue, tmp_path, monkeypatch,
                                                                  capsys):
    """Issue 23.7: --token-file keeps the token across restarts (made 0600 the first time);
    the CSRF token follows from it, so a tab served by the first server posts to the
    second; --port outside 1..65535 is a one-line error (exit 2)."""
    import os

    import falkit.labelpage

    folder, first, ok = queue
    again = TestClient(create_app(folder, "secret"), base_url="http://127.0.0.1:8765")
    assert again.post("/api/answer?token=secret", json={"id": 1, "label": 0},
                      headers=ok).status_code == 200  # the old tab's CSRF token
    served = []
    monkeypatch.setattr(falkit.labelpage, "serve", lambda *a: served.append(a))
    run_dir = folder.parent.parent.parent
    tf = tmp_path / "token"
    assert main(["label", str(run_dir), "--client", "0", "--token-file", str(tf)]) == 0
    assert main(["label", str(run_dir), "--client", "0", "--token-file", str(tf)]) == 0
    assert served[0][3] == served[1][3] == tf.read_text().strip()
    assert os.stat(tf).st_mode & 0o777 == 0o600
    assert main(["label", str(run_dir), "--token", "short"]) == 2
    assert main(["label", str(run_dir), "--token", "x" * 20, "--token-file", str(tf)]) == 2
    for port in ("-1", "70000", "http"):
        with pytest.raises(SystemExit) as e:
            main(["label", str(run_dir), "--port", port])
        assert e.value.code == 2
    assert "a port is 1..65535" in capsys.readouterr().err
    assert len(served) == 2


def test_more_than_ten_classes_each_get_a_key_and_a_filter(tmp_path):
    """Issue 23.8: 0-9, then the letters but u, one per class; the page shows each class's
    key, a filter for every class, and the queue API hands the keys to the page."""
    classes = [f"class {i}" for i in range(40)]
    keys = labeling.class_keys(40)
    assert keys[:12] == [*"0123456789", "a", "b"] and "u" not in keys
    assert len(set(k for k in keys if k)) == 35 and keys[35:] == [""] * 5
    images = np.zeros((3, 1, 3, 5), dtype=np.uint8)  # not square
    folder = labeling.queue_folder(tmp_path / "labeling", 0, 0)
    labeling.ensure_queue(folder, 0, 0, np.array([0, 2]), images, classes)
    http, ok = _page_client(folder, "secret")
    page = http.get("/?token=secret").text
    assert '<kbd>z</kbd> class 34' in page and '<kbd>a</kbd> class 10' in page
    assert 'id="filter"' in page and "object-fit: contain" in page
    assert http.get("/api/queue?token=secret").json()["keys"] == keys
    r = http.post("/api/answer?token=secret", json={"id": 2, "label": 39}, headers=ok)
    assert r.status_code == 200 and _given(folder) == [(2, 39)]


def test_overwrite_of_a_human_run_keeps_the_new_queues(tmp_path):
    cfg = _cfg(tmp_path, "oracle=human")
    with pytest.raises(WaitingForLabels):
        run(cfg)
    _label_all(_only(tmp_path))
    with pytest.raises(WaitingForLabels):
        run(cfg)  # cycle 0 done; cycle 1's queues
    with pytest.raises(WaitingForLabels):
        run(cfg, overwrite=True)  # starts again: it waits for cycle 0's labels
    run_dir = _only(tmp_path)
    assert not (run_dir / "checkpoint").exists()  # the old run was not put back
    assert json.loads((run_dir / "status.json").read_text())["cycles_done"] == 0


def test_https_with_a_certificate_and_a_one_line_error_for_a_bad_one(tmp_path):
    """Issue 23.6: --certfile/--keyfile serve the page over HTTPS (the URL says https);
    a certificate that cannot be used is one line, exit 2."""
    import shutil
    import ssl
    import subprocess
    import sys
    import urllib.request

    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    run_dir = tmp_path / "r"
    labeling.ensure_queue(labeling.queue_folder(run_dir / "labeling", 0, 0), 0, 0,
                          np.array([0, 2]), np.zeros((3, 1, 2, 2), dtype=np.uint8), ["a", "b"])
    falkit = str(Path(sys.executable).parent / "falkit")
    proc = subprocess.Popen([falkit, "label", str(run_dir), "--port", "8793", "--certfile",
                             str(cert), "--keyfile", str(key)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        url = re.search(r"open (https://\S+)", "".join(lines))[1]
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.check_hostname = False
        with urllib.request.urlopen(url.replace("/?", "/api/queue?"), context=ctx) as r:
            assert json.loads(r.read())["total"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    key.write_text("not a key")
    res = subprocess.run([falkit, "label", str(run_dir), "--port", "8794", "--certfile",
                          str(cert), "--keyfile", str(key)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and res.stderr.startswith("falkit: error: cannot use "), res.stderr
    assert res.stderr.count("\n") == 1
