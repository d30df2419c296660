"""``arcflow app`` in a real browser: headless Chromium (Debian's package, driven by selenium through
/usr/bin/chromedriver) loads the page, submits a prompt, and the student's and the teacher's images
come back with their timings; a screenshot of the page must not be blank."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arcflow.cli import main

REPO = Path(__file__).resolve().parents[1]
TEACHER_CONFIG = "configs/demo/teacher_arcflux_2nfe.py"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# Chromium on a machine without network: nothing of its own may reach out.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1000")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """Two training iterations on the shipped demo teacher, exported: the app's default base model."""
    root = tmp_path_factory.mktemp("app")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        main(["train", TEACHER_CONFIG, "--work-dir", str(root / "run"), "--cfg-options", "total_iters=2",
              "save_interval=2", "eval_interval=0", "train_cfg.batch_size=2"])
        main(["export", TEACHER_CONFIG, "--ckpt", str(root / "run"), "--out-dir", str(root / "adapter")])
    return root / "adapter"


@pytest.fixture(scope="module")
def app_url(adapter, tmp_path_factory):
    """``arcflow app --adapter ...`` (the demo teacher by default), started from another directory."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "arcflow.cli", "app", "--adapter", str(adapter), "--port",
                             str(port)], cwd=tmp_path_factory.mktemp("elsewhere"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, deadline = f"http://127.0.0.1:{port}/", time.time() + 180
    try:
        while True:
            assert proc.poll() is None, f"arcflow app exited:\n{proc.stdout.read()[-3000:]}"
            assert time.time() < deadline, "arcflow app did not answer within 180 s"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.is_file() and CHROMEDRIVER.exists()):
        pytest.fail("headless Chromium is needed: apt-get install -y chromium chromium-driver (.ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def _returned_image(driver, url: str) -> Image.Image:
    """The output image as the browser shows it (fetched from its src), once it has loaded."""
    from selenium.webdriver.support.ui import WebDriverWait

    loaded = "const i = document.querySelector('#image img'); return i && i.complete && i.naturalWidth > 0 ? i.src : null"
    src = WebDriverWait(driver, 300).until(lambda d: d.execute_script(loaded))
    if src.startswith("data:"):
        import base64

        return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")
    with urllib.request.urlopen(src if src.startswith("http") else url.rstrip("/") + src, timeout=30) as response:
        return Image.open(io.BytesIO(response.read())).convert("RGB")


def test_the_page_generates_with_student_and_teacher(app_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(app_url)
    box = WebDriverWait(browser, 120).until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
    box.clear()
    box.send_keys("a large blue square at the top on a white background")
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    student = _returned_image(browser, app_url)
    timing = WebDriverWait(browser, 300).until(
        lambda d: "NFE:" in d.find_element(By.CSS_SELECTOR, "#timing").text and
        d.find_element(By.CSS_SELECTOR, "#timing").text)
    assert "ArcFlow student, 2 NFE:" in timing and timing.rstrip().endswith("s")
    assert student.size == (64, 64) and np.asarray(student).std() > 5  # the adapter's size, not blank

    browser.save_screenshot(str(tmp_path / "page.png"))
    with Image.open(tmp_path / "page.png") as shot:
        pixels = np.asarray(shot.convert("L"), dtype=np.float32)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005, "the page is blank"

    browser.find_element(By.XPATH, "//label[.//span[normalize-space()='teacher'] or normalize-space()='teacher']"
                         ).click()
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    both = WebDriverWait(browser, 300).until(
        lambda d: "teacher, 50 steps:" in d.find_element(By.CSS_SELECTOR, "#timing").text and
        d.find_element(By.CSS_SELECTOR, "#timing").text)
    assert "ArcFlow student, 2 NFE:" in both  # both timings side by side
