"""The README's "Label with people", followed verbatim in a real headless browser
(Debian's chromium and chromedriver, through Selenium): a digits run with oracle=human
waits, every queued sample is labeled with the keyboard using the true labels (one wrong
key taken back with Backspace), the same command continues, and the results equal the
simulated-oracle run's. Leaves docs/labeling.png, a screenshot of the page."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402

from falkit import config  # noqa: E402
from falkit.data.federation import build  # noqa: E402
from falkit.loop import run  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                 reason="chromium and chromedriver are not installed "
                                        "(make test installs them)")]
ROOT = Path(__file__).resolve().parents[1]
FALKIT = str(Path(sys.executable).parent / "falkit")
# the README's command, with a small digits setting instead of its dataset
ARGS = ["data.dataset=digits", "data.rho=5", "partition.num_clients=3", "partition.alpha=1.0",
        "budget.fraction=0.05", "budget.cycles=2", "fl.rounds=2", "fl.local_epochs=1",
        "model.backbone=resnet8_preact16", "runtime.threads=1", "strategy=entropy@G"]


def _browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
              "--window-size=900,900", "--disable-gpu"):
        opts.add_argument(a)
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(DRIVER))


def _serve(run_dir: str, client: int, port: int):
    proc = subprocess.Popen([FALKIT, "label", run_dir, "--client", str(client), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"open (http://\S+)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise AssertionError("falkit label printed no URL")


def _label_queue(browser, url: str, y, shot: Path | None) -> int:
    browser.get(url)
    done = 0
    wrong_once = True
    while True:
        if browser.find_element(By.ID, "done").is_displayed():
            return done
        img = browser.find_element(By.ID, "img")
        sid = img.get_attribute("data-sample")
        if not sid:  # the next image is loading
            time.sleep(0.02)
            continue
        progress = browser.find_element(By.ID, "progress").text
        body = browser.find_element(By.TAG_NAME, "body")
        label = int(y[int(sid)])
        if wrong_once:  # a wrong key, taken back with Backspace (undo)
            wrong_once = False
            body.send_keys(str((label + 1) % 10))
            _wait_change(browser, progress)
            progress = browser.find_element(By.ID, "progress").text
            body.send_keys("\ue003")  # Backspace
            _wait_change(browser, progress)
            continue
        if shot is not None and done == 5:
            browser.save_screenshot(str(shot))
        body.send_keys(str(label))
        _wait_change(browser, progress)
        done += 1


def _wait_change(browser, before: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while browser.find_element(By.ID, "progress").text == before:
        if browser.find_element(By.ID, "done").is_displayed():
            return
        assert time.monotonic() < deadline, "the page did not take the answer"
        time.sleep(0.02)


def test_label_with_people_in_a_real_browser(tmp_path):
    out = tmp_path / "runs"
    cmd = [FALKIT, "run", *ARGS, f"out_dir={out}", "oracle=human"]
    cfg = config.load(None, overrides=config.parse_overrides([*ARGS, f"out_dir={out}"]))
    y = build(cfg).dataset.y_train  # the annotator knows the truth
    shot = ROOT / "docs" / "labeling.png"
    browser = _browser()
    labeled, rounds = 0, 0
    try:
        while True:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            if res.returncode == 0:
                break
            assert res.returncode == 3, res.stderr  # waiting for labels
            rounds += 1
            assert rounds <= 2, res.stderr
            asks = re.findall(r"falkit label (\S+) --client (\d+)", res.stderr)
            assert len(asks) == 3, res.stderr
            for run_dir, client in asks:
                proc, url = _serve(run_dir, int(client), 8700 + int(client))
                try:
                    labeled += _label_queue(browser, url, y,
                                            shot if (rounds, client) == (1, "0") else None)
                finally:
                    proc.terminate()
                    proc.wait(timeout=10)
    finally:
        browser.quit()
    assert rounds == 2 and labeled == 66
    (got,) = [p for p in out.iterdir() if p.is_dir()]
    cfg.out_dir = str(tmp_path / "simulated")
    ref = run(cfg).run_dir
    assert (got / "queries.jsonl").read_bytes() == (ref / "queries.jsonl").read_bytes()
    assert shot.is_file() and shot.stat().st_size > 10_000
