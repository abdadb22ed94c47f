"""The studio in a real browser (headless Chromium via Selenium) on the embedded default model
(models/demo, 64x64, 9 frames, 4 steps): type a 3-shot story, render it (each shot's video appears
while the render runs), see shot 3's memory frames, pin one, regenerate shot 3, and check that shots
1-2 were kept. Skipped when Chromium, its driver, Selenium or Gradio is missing (CI installs them:
apt-get install chromium chromium-driver; pip install -e '.[studio]')."""

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "demo"
CHROMIUM = next(
    (p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium") if p and Path(p).is_file()),
    None,
)
DRIVER = shutil.which("chromedriver") or next((p for p in ("/usr/bin/chromedriver",) if Path(p).is_file()), None)
CAPTIONS = [
    "A red square hops across a snowy field.",
    "A blue circle slides through a forest.",
    "The same square returns to a night city.",
]


def _missing() -> str | None:
    if CHROMIUM is None or DRIVER is None:
        return "needs Chromium and chromedriver (Debian: apt-get install -y chromium chromium-driver)"
    for module in ("selenium", "gradio"):  # found, not imported: gradio's import was 9 s of each worker's collection
        if importlib.util.find_spec(module) is None:
            return f"needs {module}: pip install -e '.[studio]'"
    if not (MODEL / "onestory").is_dir():
        return "needs the embedded default model models/demo"
    return None


MISSING = _missing()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """A studio process on models/demo serving an empty run folder: (url, out, log)."""
    tmp = tmp_path_factory.mktemp("studio")
    out, log_path, port = tmp / "out", tmp / "studio.log", _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu"}  # one CPU device
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "onestory_jax.studio", "--checkpoint", str(MODEL), "--out", str(out), "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, f"the studio exited:\n{log_path.read_text()}"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            assert time.time() < deadline, f"the studio did not start:\n{log_path.read_text()}"
            time.sleep(0.5)
        yield url, out, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1800"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


# Counts, in the page, the most shot videos shown while the status says "Rendering": an observer sees
# every DOM change, where polling from the test could miss a short window between two updates.
PREVIEW_WATCH = """
window.shotVideosWhileRendering = 0;
new MutationObserver(() => {
  const status = document.getElementById("status");
  if (status && status.innerText.includes("Rendering")) {
    const n = document.querySelectorAll("#shot-videos video").length;
    window.shotVideosWhileRendering = Math.max(window.shotVideosWhileRendering, n);
  }
}).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
"""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_write_render_pin_and_regenerate_in_a_browser(studio, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, out, log = studio
    d = browser
    wait = WebDriverWait(d, 240, poll_frequency=0.2)
    text = lambda element_id: d.find_element(By.ID, element_id).text  # noqa: E731
    count = lambda css: len(d.find_elements(By.CSS_SELECTOR, css))  # noqa: E731
    try:
        d.get(url)
        caption = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#new-caption textarea, #new-caption input"))
        for line in CAPTIONS:  # type the story, one shot at a time
            caption.send_keys(line)
            d.find_element(By.ID, "add-shot").click()
            wait.until(lambda d: caption.get_attribute("value") == "")
        steps = d.find_element(By.CSS_SELECTOR, "#steps input")
        steps.clear()
        steps.send_keys("4", Keys.TAB)
        wait.until(lambda d: all(c in text("shots-table") for c in CAPTIONS))

        d.execute_script(PREVIEW_WATCH)
        d.find_element(By.ID, "render").click()

        def rendered(d) -> bool:
            status = text("status")
            assert "Error" not in status, status
            return "Rendered" in status

        wait.until(rendered)
        previews = d.execute_script("return window.shotVideosWhileRendering")
        assert previews >= 1, "no shot's video appeared before the render finished"
        wait.until(lambda d: count("#shot-videos video") == 3)
        manifest = json.loads((out / "manifest.json").read_text())
        assert [s["caption"] for s in manifest["shots"]] == CAPTIONS
        assert manifest["story"]["settings"]["steps"] == 4 and manifest["latent_shape"] == [3, 8, 8, 16]
        n_memory = len(manifest["shots"][2]["memory"])
        assert n_memory >= 1
        wait.until(lambda d: count("#memory-gallery button.thumbnail-item img") == n_memory)  # shot 3's memory
        labels = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#memory-gallery .caption-label")]
        assert all("score" in label and label.startswith("shot ") for label in labels), labels
        assert count("#downloads a") >= 5  # 3 shots, story.mp4, contact sheet, ...

        before = {i: _digest(out / f"shot_{i:02d}.npy") for i in (1, 2, 3)}
        mtimes = {i: (out / f"shot_{i:02d}.npy").stat().st_mtime_ns for i in (1, 2)}
        last = manifest["shots"][2]["memory"][-1]  # pin the lowest-ranked frame shot 3 used
        item = f"{last['shot']}:{last['frame']}"
        d.find_elements(By.CSS_SELECTOR, "#memory-gallery button.thumbnail-item")[-1].click()
        wait.until(lambda d: f"Selected {item}" in text("picked"))
        d.find_element(By.ID, "pin").click()
        wait.until(lambda d: f"Pinned: {item}" in text("picked"))
        d.find_element(By.ID, "regenerate").click()
        wait.until(lambda d: "Kept 2 unchanged" in text("status") or "Error" in text("status"))
        assert "Error" not in text("status"), text("status")

        manifest = json.loads((out / "manifest.json").read_text())
        assert [s["resumed"] for s in manifest["shots"]] == [True, True, False]
        assert manifest["shots"][2]["memory_control"] == {"pin": [item], "exclude": []}
        assert any(m.get("pinned") and f"{m['shot']}:{m['frame']}" == item for m in manifest["shots"][2]["memory"])
        assert {i: _digest(out / f"shot_{i:02d}.npy") for i in (1, 2)} == {i: before[i] for i in (1, 2)}
        assert {i: (out / f"shot_{i:02d}.npy").stat().st_mtime_ns for i in (1, 2)} == mtimes
        assert yaml.safe_load((out / "story.yaml").read_text())["shots"][2]["memory"] == {"pin": [item]}
        wait.until(lambda d: count("#shot-videos video") == 3)
    except Exception:
        d.save_screenshot(str(tmp_path / "studio.png"))
        print(f"screenshot: {tmp_path / 'studio.png'}\nstudio log:\n{log.read_text()[-4000:]}")
        raise
