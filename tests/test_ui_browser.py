"""End to end in a real browser: `aceturbo ui` in a temp copy of the project, driven by headless
Chromium through Selenium.

Upload demo songs (triplet files + the single-audio form), Convert (ingest + dvc repro of the encode
stages on the tiny random checkpoint), start a training, watch the loss graph fill, Stop (the
trainer saves a checkpoint on SIGTERM), find the checkpoint in the Checkpoints tab. Screenshots of
the three tabs go to $ACETURBO_SCREENSHOT_DIR (docs/screenshots/ to refresh the docs), else to
the test's tmp folder.

Needs Debian's chromium and chromium-driver (scripts/install_browser.sh); skipped without them.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                       reason="headless browser test needs Debian's chromium + chromium-driver "
                              "(run scripts/install_browser.sh)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_project(dest: Path) -> None:
    """The tracked files of this checkout, as they are in the working tree (+ a fresh git repo:
    DVC wants one)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, listed.decode().split("\0")):
        src = REPO / rel
        if src.is_file() and not rel.startswith(("tests/", "docs/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from pipeline.tiny.demo import build_demo_checkpoint
    from pipeline.tiny.songs import make_demo_songs
    from pipeline.ui.actions import command_env

    root = tmp_path_factory.mktemp("project")
    _copy_project(root)
    songs = tmp_path_factory.mktemp("songs")
    make_demo_songs(songs, n=2, seconds=4.0)
    lyrics = [p.read_text(encoding="utf-8") for p in sorted(songs.glob("*_lyrics.txt"))]
    build_demo_checkpoint(root / "workspace/checkpoints/demo", lyrics)
    params = (root / "params.yaml").read_text(encoding="utf-8")
    # Long enough that Stop comes first; a checkpoint every 2 steps.
    params = re.sub(r"(?m)^  experiment: .*$", "  experiment: uitest", params)
    params = re.sub(r"(?m)^  max_steps: .*$", "  max_steps: 400", params)
    params = re.sub(r"(?m)^  save_every: .*$", "  save_every: 2", params)
    params = re.sub(r"(?m)^  max_seconds: .*$", "  max_seconds: 4", params)
    (root / "params.yaml").write_text(params, encoding="utf-8")
    port = _free_port()
    log = (root / "ui_server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "stages", "ui", "--port", str(port)], cwd=root,
                            stdout=log, stderr=subprocess.STDOUT, env=command_env(), start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("the UI server did not start:\n" + (root / "ui_server.log").read_text()[-3000:])
            time.sleep(0.5)
    yield {"url": url, "root": root, "songs": songs}
    # Whatever is still running (a training the test failed to stop) goes first, then the server.
    from pipeline.ui import actions

    cwd = os.getcwd()
    os.chdir(root)
    try:
        for kind in ("train", "convert"):
            actions.stop_job(actions.project(), kind, whole_group=True)
    finally:
        os.chdir(cwd)
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--disable-background-networking", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _wait(what: str, condition, timeout: float, server=None, every: float = 0.5):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = condition()
            if last:
                return last
        except Exception as exc:  # stale elements while gradio re-renders
            last = exc
        time.sleep(every)
    extra = ""
    if server is not None:
        extra = "\nserver log:\n" + (server["root"] / "ui_server.log").read_text(errors="replace")[-3000:]
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r}){extra}")


def _text(driver, elem_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, elem_id).text


def _value(driver, elem_id: str) -> str:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, elem_id).find_element(By.CSS_SELECTOR, "textarea, input")
    return box.get_attribute("value") or ""


def _click(driver, elem_id: str) -> None:
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.ID, elem_id)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    element.click()


def _tab(driver, label: str) -> None:
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]"):
        if button.text.strip() == label and button.is_displayed():
            button.click()
            time.sleep(0.5)
            return
    raise AssertionError(f"no tab {label!r}")


def _upload(driver, elem_id: str, paths: list[Path]) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, elem_id).find_element(By.CSS_SELECTOR, "input[type=file]")
    field.send_keys("\n".join(str(p) for p in paths))


def _screenshot(driver, name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("ACETURBO_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0);")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, max(900, min(int(height) + 40, 2600)))
    time.sleep(0.8)
    path = folder / name
    driver.save_screenshot(str(path))
    driver.set_window_size(1400, 1000)
    return path


def test_upload_convert_train_stop_checkpoint(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    d = browser
    d.get(server["url"])
    _wait("the app", lambda: d.find_elements(By.ID, "songs-table"), 60, server)

    # --- Dataset: one song as triplet files, one through the single-audio form
    songs = server["songs"]
    _tab(d, "Triplet files")
    _upload(d, "triplet-files", sorted(songs.glob("demo_01_*")))
    _wait("the 3 uploads", lambda: len(d.find_element(By.ID, "triplet-files").find_elements(
        By.XPATH, ".//*[contains(text(), 'demo_01_neon_drive')]")) >= 3, 30, server)
    _click(d, "add-files")
    _wait("files added", lambda: "added 3 file(s)" in _text(d, "upload-msg"), 30, server)
    _tab(d, "Add a song")
    _upload(d, "new-audio", [songs / "demo_02_slow_morning.mp3"])
    _wait("audio uploaded", lambda: d.find_element(By.ID, "new-audio").find_elements(
        By.XPATH, ".//*[contains(text(), 'demo_02_slow_morning')]"), 30, server)
    prompt = d.find_element(By.ID, "new-prompt").find_element(By.CSS_SELECTOR, "textarea, input")
    prompt.send_keys("ambient, piano, 70 bpm")
    lyrics = d.find_element(By.ID, "new-lyrics").find_element(By.CSS_SELECTOR, "textarea")
    lyrics.send_keys("[verse]\nslow morning light")
    _click(d, "add-song")
    _wait("song added", lambda: "added demo_02_slow_morning" in _text(d, "upload-msg"), 30, server)
    table = _wait("both songs listed", lambda: (lambda t: "demo_01_neon_drive" in t and "demo_02_slow_morning" in t
                                                and t)(_text(d, "songs-table")), 30, server)
    assert "ok" in table
    assert (server["root"] / "workspace/data/demo_02_slow_morning_prompt.txt").read_text() == "ambient, piano, 70 bpm\n"
    _wait("the editor shows a song", lambda: "ambient, piano" in _value(d, "edit-prompt"), 20, server)

    # --- Convert: ingest + dvc repro of the encode stages, as a process, with progress
    _click(d, "convert")
    _wait("convert to start", lambda: "started" in _text(d, "convert-status") or "running" in _text(d, "convert-status"),
          20, server)
    _wait("convert to finish", lambda: "Convert finished successfully" in _text(d, "convert-status")
          or ("FAILED" in _text(d, "convert-status") and pytest.fail(_value(d, "convert-log"))), 200, server, every=1)
    assert "Running stage 'encode-text'" in _value(d, "convert-log")
    assert "100%" in _text(d, "convert-progress")
    assert (server["root"] / "workspace/cache/features/text").is_dir()
    _screenshot(d, "dataset.png", tmp_path)

    # --- Train: start, see metrics arrive in the graph, stop (checkpoint saved)
    _tab(d, "Train")
    _wait("form filled from the preset", lambda: _value(d, "field-experiment") == "uitest", 20, server)
    _click(d, "train-start")
    _wait("training to start", lambda: "started" in _text(d, "train-msg"), 20, server)
    assert "aceturbo train --preset balanced --experiment uitest" in _text(d, "train-msg")
    _click(d, "train-start")  # a second start is refused while one runs
    _wait("second start refused", lambda: "already running" in _text(d, "train-msg"), 20, server)
    step = lambda: int((re.search(r"step (\d+) / 400", _text(d, "train-speed")) or [0, 0])[1])  # noqa: E731
    _wait("metrics in the graph (step ≥ 3)", lambda: step() >= 3, 120, server)
    assert "s/step" in _text(d, "train-speed") and "ETA" in _text(d, "train-speed")
    # the speed line and the graph refresh on the same timer tick, but the chart draws a moment later
    _wait("the loss graph drawn", lambda: d.find_element(By.ID, "loss-plot").find_elements(By.CSS_SELECTOR, "canvas, svg"),
          30, server)
    _click(d, "train-stop")
    _wait("stop requested", lambda: "stop requested" in _text(d, "train-msg"), 20, server)
    _wait("training stopped", lambda: "stopped" in _text(d, "train-status"), 60, server)
    assert "experiment uitest" in _value(d, "train-log")
    _screenshot(d, "train.png", tmp_path)

    # --- Checkpoints: the run and its checkpoints (the one saved on Stop included)
    run = server["root"] / "workspace/exps/logs/uitest"
    saved = sorted((run / "checkpoints").glob("epoch=*-step=*_lora"))
    assert saved, "Stop saved no checkpoint"
    _tab(d, "Checkpoints")
    _click(d, "refresh-runs")
    table = _wait("checkpoints listed", lambda: (lambda t: saved[-1].name in t and t)(_text(d, "ckpt-table")), 30, server)
    # every checkpoint still on disk is listed (keep_last may have pruned the earliest ones)
    assert all(p.name in table for p in saved)
    # Download the official (unbaked) LoRA (aceturbo export-lora --format official, zipped).
    d.find_element(By.ID, "dl-kind").find_element(By.XPATH, ".//label[contains(., 'official')]").click()
    _click(d, "prepare-download")
    _wait("the LoRA zip", lambda: "_official.zip" in _text(d, "dl-msg"), 60, server)
    assert "lora_official" in _text(d, "dl-file")  # the file widget offers it for download
    # A short sample with the chosen checkpoint (aceturbo generate --lora ...).
    for elem_id, value in (("gen-seconds", "2"), ("gen-steps", "4")):
        box = d.find_element(By.ID, elem_id).find_element(By.CSS_SELECTOR, "input")
        box.clear()
        box.send_keys(value)
    _click(d, "generate")
    _wait("the sample", lambda: "wrote " in _value(d, "gen-log") or "Error" in _value(d, "gen-log"), 120, server)
    assert "aceturbo generate --lora" in _value(d, "gen-log") and "wrote " in _value(d, "gen-log")
    samples = list((server["root"] / "workspace/exps/samples").glob("uitest_*.wav"))
    assert samples
    _screenshot(d, "checkpoints.png", tmp_path)
