"""The docs' "Label with people" (docs/guide/labeling.md), followed verbatim in a real headless
browser (Debian's chromium and chromedriver, through Selenium): a digits run with oracle=human
waits, every queued sample is labeled with the keyboard using the true labels (one wrong key taken
back with Backspace), the same command continues, and the results equal the simulated-oracle run's.
Leaves docs/labeling.png and docs/labeling-phone.png, screenshots of the page on a desktop and on a
phone's viewport."""

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
# the docs' command, with a small digits setting instead of its dataset
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
            browser.set_window_size(390, 844)  # a phone's viewport
            time.sleep(0.3)
            browser.save_screenshot(str(shot.with_name("labeling-phone.png")))
            browser.set_window_size(900, 900)
            time.sleep(0.3)
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
    assert shot.with_name("labeling-phone.png").stat().st_size > 10_000


# -- the page's input rules, against a slow network (issue 23.2-4, 7) -------------------------
class _Served:
    """The page's app on a port of this process (uvicorn in a thread), its image route
    delayed as a slow network would: a new sample's image arrives `delay` s after it is
    asked for."""

    def __init__(self, folder: Path, token: str, port: int, delay: float):
        import asyncio
        import threading

        import uvicorn

        from falkit.labelpage import create_app

        app = create_app(folder, token)

        async def slow(scope, receive, send):
            if scope["type"] == "http" and scope["path"].startswith("/image/"):
                await asyncio.sleep(delay)
            await app(scope, receive, send)

        self.server = uvicorn.Server(uvicorn.Config(slow, host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        _until(lambda: self.server.started, "the server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _until(cond, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < deadline, what
        time.sleep(0.02)
    return got


def test_keys_answer_only_the_sample_on_screen_once(tmp_path):
    """Item 2: with images 1.5 s late, a key pressed after an answer while the old image is
    still on screen answers nothing (it stored {66: 0, 102: 0} before, 102 an 8: the page
    sent the *next* sample's id); only the displayed sample is answered, once its image has
    loaded. Item 3: Enter and Space after a click answer nothing, nor does a held key's
    auto-repeat. Item 4: the page shows the answer just given; Backspace undoes it, also
    after a reload. Item 7: a stopped server is said on the page; one restarted with the
    same token takes the open page's answers."""
    from selenium.webdriver.common.keys import Keys
    from sklearn.datasets import load_digits

    from falkit import labeling

    digits = load_digits()
    images = (digits.images * 15).astype("uint8")[:, None]
    ids = [66, 102, 5, 7, 11, 13]
    folder = labeling.queue_folder(tmp_path / "labeling", 0, 0)
    labeling.ensure_queue(folder, 0, 0, ids, images, [str(i) for i in range(10)])
    token, port = labeling.new_token(), 8791
    url = f"http://127.0.0.1:{port}/?token={token}"
    served = _Served(folder, token, port, delay=1.5)
    browser = _browser()

    def given():
        return {a["id"]: a["label"] for a in labeling.read_answers(folder)}

    def on_screen():
        return browser.find_element(By.ID, "img").get_attribute("data-sample")

    try:
        browser.get(url)
        body = browser.find_element(By.TAG_NAME, "body")
        assert _until(on_screen, "no image shown", 15) == "66"
        body.send_keys("0")
        _until(lambda: given() == {66: 0}, "the first answer was not stored")
        body.send_keys("0")  # the old image (66) still on screen, 102's on its way
        time.sleep(0.3)
        assert given() == {66: 0} and not on_screen()
        assert _until(on_screen, "102's image never came", 15) == "102"
        assert given() == {66: 0}
        assert "sample 66" in browser.find_element(By.ID, "last").text
        # a click answers the sample on screen; Enter / Space afterwards answer nothing
        browser.find_element(By.CSS_SELECTOR, 'button.cls[data-label="8"]').click()
        _until(lambda: given() == {66: 0, 102: 8}, "the click was not stored")
        assert _until(on_screen, "5's image never came", 15) == "5"
        for key in (Keys.ENTER, Keys.SPACE, Keys.ENTER):
            browser.switch_to.active_element.send_keys(key)
            body.send_keys(key)
        time.sleep(0.5)
        assert given() == {66: 0, 102: 8}
        # a held key: the browser's auto-repeat events carry repeat = true
        browser.execute_script("for (let i = 0; i < 5; i++) document.dispatchEvent("
                               "new KeyboardEvent('keydown', {key: '3', repeat: true, "
                               "bubbles: true}));")
        time.sleep(0.5)
        assert given() == {66: 0, 102: 8}
        body.send_keys("3")
        _until(lambda: given().get(5) == 3, "a plain key press was not stored")
        _until(lambda: "sample 5" in browser.find_element(By.ID, "last").text,
               "the page does not show the answer just given")
        body.send_keys(Keys.BACKSPACE)  # undo: the answer just given
        _until(lambda: 5 not in given(), "undo did not take the answer back")
        browser.refresh()  # the same tab: its annotator id and its answers stay its own
        _until(lambda: "sample 102" in browser.find_element(By.ID, "last").text,
               "after a reload the page lost its answers")
        _until(lambda: on_screen() == "5", "5's image never came", 15)
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.BACKSPACE)
        _until(lambda: given() == {66: 0}, "undo after a reload failed")
        # the server goes away, then comes back with the same token
        _until(lambda: on_screen() == "102", "102's image never came", 15)
        served.stop()
        browser.find_element(By.TAG_NAME, "body").send_keys("8")
        _until(lambda: "cannot be reached" in browser.find_element(By.ID, "msg").text,
               "the page did not say the server is gone")
        assert given() == {66: 0}
        served = _Served(folder, token, port, delay=0.1)
        _until(lambda: browser.find_element(By.ID, "msg").text == "",
               "the page did not reconnect", 15)
        _until(lambda: on_screen() == "102", "102's image never came", 15)
        browser.find_element(By.TAG_NAME, "body").send_keys("8")
        _until(lambda: given() == {66: 0, 102: 8}, "the restarted server took no answer")
    finally:
        browser.quit()
        served.stop()


def test_forty_classes_each_reachable_and_the_controls_on_screen(tmp_path):
    """Item 8: with 40 classes, key z answers class 34 and the filter (/, type, Enter)
    class 39, which has no key; a non-square image keeps its aspect ratio; unsure and undo
    stay inside the window although the buttons run below it."""
    import numpy as np
    from selenium.webdriver.common.keys import Keys

    from falkit import labeling

    images = np.random.default_rng(0).integers(0, 256, (5, 3, 20, 40), dtype=np.uint8)
    folder = labeling.queue_folder(tmp_path / "labeling", 0, 0)
    labeling.ensure_queue(folder, 0, 0, [0, 1, 2], images, [f"class {i}" for i in range(40)])
    token = labeling.new_token()
    served = _Served(folder, token, 8792, delay=0.0)
    browser = _browser()

    def given():
        return {a["id"]: a["label"] for a in labeling.read_answers(folder)}

    try:
        browser.get(f"http://127.0.0.1:8792/?token={token}")
        img = browser.find_element(By.ID, "img")
        _until(lambda: img.get_attribute("data-sample") == "0", "no image shown")
        w, h = browser.execute_script("return [arguments[0].naturalWidth, "
                                      "arguments[0].naturalHeight]", img)
        assert w == 2 * h  # 40 x 20, scaled evenly; shown with object-fit: contain
        inner = browser.execute_script("return window.innerHeight")
        for control in ("unsure", "undo"):
            rect = browser.find_element(By.ID, control).rect
            assert rect["y"] + rect["height"] <= inner, control
        browser.find_element(By.TAG_NAME, "body").send_keys("z")
        _until(lambda: given() == {0: 34}, "key z did not answer class 34")
        _until(lambda: img.get_attribute("data-sample") == "1", "no next image")
        browser.find_element(By.TAG_NAME, "body").send_keys("/")
        browser.switch_to.active_element.send_keys("class 39")
        browser.switch_to.active_element.send_keys(Keys.ENTER)
        _until(lambda: given() == {0: 34, 1: 39}, "the filter did not answer class 39")
    finally:
        browser.quit()
        served.stop()
