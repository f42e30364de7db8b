"""A real Label Studio round trip (issue 23.12): Label Studio's own SDK (label-studio-sdk
2.1.2, in a venv of its own that `make test` installs: it pins numpy and opencv differently)
parses and validates the labeling config falkit exports (class names with & " <), accepts
each exported task, accepts an answer of every choice and refuses one outside them; its
converter turns a JSON export of those tasks into JSON_MIN, and falkit imports both to the
same answers."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from falkit import labeling
from falkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
LS_PYTHON = Path(os.environ.get("FALKIT_LS_PYTHON",
                                ROOT / ".venv" / "label-studio" / "bin" / "python"))
pytestmark = pytest.mark.skipif(not LS_PYTHON.is_file(),
                                reason="label-studio-sdk's venv is missing (make test makes "
                                       "it; it did not install here)")

SCRIPT = r'''
import json, sys
from label_studio_sdk.converter import Converter
from label_studio_sdk.label_interface import LabelInterface

config, tasks_file, answers_file, out = sys.argv[1:5]
config = open(config).read()
tasks = json.load(open(tasks_file))
answers = json.load(open(answers_file))  # sample -> the choice an annotator makes
li = LabelInterface(config)
li.validate()  # raises on an invalid config
report = {"labels": li.get_control("label").labels, "tasks_ok": [], "errors": {}}
for t in tasks:
    report["tasks_ok"].append(li.validate_task(t))
def result(choice):
    return [{"from_name": "label", "to_name": "image", "type": "choices",
             "value": {"choices": [choice]}}]
for choice in report["labels"] + ["zebra"]:
    report["errors"][choice] = li.validate_prediction({"result": result(choice)},
                                                      return_errors=True)
export = [{"id": 100 + n, "data": t["data"], "predictions": [],
           "annotations": [{"id": 500 + n, "completed_by": 1, "was_cancelled": False,
                            "created_at": "2026-12-01T10:00:00.000000Z",
                            "updated_at": "2026-12-01T10:00:00.000000Z", "lead_time": 1.5,
                            "result": [dict(r, id="r%d" % n, origin="manual")
                                       for r in result(answers[str(t["data"]["sample"])])]}]}
          for n, t in enumerate(tasks)]
json.dump(export, open(out + "/export.json", "w"))
Converter(config=config, project_dir=out, download_resources=False).convert(
    out + "/export.json", out + "/min", "JSON_MIN", is_dir=False)
json.dump(report, open(out + "/report.json", "w"))
'''


def test_label_studio_validates_the_export_and_its_exports_import(tmp_path, capsys):
    classes = ['T-shirt & top', 'say "hi"', "<b>old</b>", "plain"]
    images = np.random.default_rng(0).integers(0, 256, (8, 1, 6, 4), dtype=np.uint8)
    ids = np.array([1, 3, 4, 6])
    runs = {}
    for name in ("json", "json_min"):
        run_dir = tmp_path / name
        labeling.ensure_queue(labeling.queue_folder(run_dir / "labeling", 0, 0), 0, 0, ids,
                              images, classes)
        runs[name] = run_dir
    tasks = tmp_path / "tasks.json"
    assert main(["label", str(runs["json"]), "--export-label-studio", str(tasks)]) == 0
    choice = {1: classes[0], 3: classes[1], 4: classes[2], 6: "unsure"}
    (tmp_path / "answers.json").write_text(json.dumps({str(k): v for k, v in choice.items()}))
    res = subprocess.run([str(LS_PYTHON), "-c", SCRIPT, str(tasks.with_suffix(".xml")),
                          str(tasks), str(tmp_path / "answers.json"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["labels"] == [*classes, "unsure"]  # the names survive the XML
    assert report["tasks_ok"] == [True] * 4
    assert all(report["errors"][c] == [] for c in report["labels"])
    assert report["errors"]["zebra"]  # Label Studio refuses a choice outside the classes
    minimal = tmp_path / "min" / "result.json"
    assert minimal.is_file()
    for name, export in (("json", tmp_path / "export.json"), ("json_min", minimal)):
        assert main(["label", str(runs[name]), "--import-label-studio", str(export)]) == 0
        assert "4 new answers" in capsys.readouterr().out
        folder = labeling.latest_queue(runs[name], 0)
        got = {a["id"]: a["label"] for a in labeling.read_answers(folder)}
        assert got == {1: 0, 3: 1, 4: 2, 6: labeling.UNSURE}, name
