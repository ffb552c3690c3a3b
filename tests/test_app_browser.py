"""End to end in a real browser: `esd app` on the testbed, driven by Playwright in headless Chromium.

Uses Debian's chromium (/usr/bin/chromium; `.ci/run` installs it), never a browser downloaded by Playwright.
Screenshots go to test-artifacts/; with ESD_UPDATE_SCREENSHOTS=1 also to docs/ for the README
(opt-in, so that a test run does not rewrite tracked files).
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                      "(apt-get install -y chromium; .ci/run does it)"),
]
pytest.importorskip("gradio", reason="the app needs Gradio: pip install -e '.[app]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright's Python package")
UPDATE_DOCS = os.environ.get("ESD_UPDATE_SCREENSHOTS") == "1"
# 8 iterations of a 5-step sampler test the plumbing; the README's screenshot uses 40 of a 10-step sampler,
# which do erase the testbed's circle.
ITERATIONS, DDIM_STEPS = (40, 10) if UPDATE_DOCS else (8, 5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`esd app` on a free localhost port, in its own process, with a fresh output folder."""
    port, out = _free_port(), tmp_path_factory.mktemp("app-runs")
    log = (tmp_path_factory.mktemp("app-log") / "app.log").open("w+")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "esd.cli", "app", "--port", str(port), "--output-dir", str(out),
                             "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            log.seek(0)
            pytest.fail(f"esd app did not start:\n{log.read()[-3000:]}")
        try:
            if _status(url) == 200:
                break
        except OSError:
            time.sleep(0.5)
    yield url, out
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)
    if UPDATE_DOCS:
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(ARTIFACTS / name, ROOT / "docs" / name)


def _fill(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} input, #{elem_id} textarea").first.fill(value)


def test_erase_then_compare_in_the_browser(server):
    url, out = server
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.locator("#erase-start").wait_for(timeout=30_000)
            # A short erase: a few iterations of a 5-step sampler, a small before/after grid.
            _fill(page, "cfg-concept", "circle")
            _fill(page, "cfg-iterations", str(ITERATIONS))
            _fill(page, "cfg-lr", "0.001")
            page.get_by_text("Advanced").click()
            _fill(page, "cfg-ddim-steps", str(DDIM_STEPS))
            _fill(page, "cfg-grid-steps", "5")
            page.locator("#erase-start").click()
            status = page.locator("#erase-status")
            sync_api.expect(status).to_contain_text("Finished", timeout=120_000)
            sync_api.expect(status).to_contain_text(f"{ITERATIONS} of {ITERATIONS} iterations")
            sync_api.expect(page.locator("#erase-progress")).to_contain_text(f"{ITERATIONS} / {ITERATIONS}")
            _screenshot(page, "app-erase.png")

            page.get_by_role("tab", name="Compare").click()
            sync_api.expect(page.locator("#compare-run")).to_contain_text("circle", timeout=30_000)
            # The run's arrival also sets the prompt to its concept; wait for that before typing, or the
            # late update overwrites what was typed (seen once in CI: the compare ran "circle").
            prompt = page.locator("#compare-prompt input, #compare-prompt textarea").first
            sync_api.expect(prompt).to_have_value("circle", timeout=30_000)
            _fill(page, "compare-prompt", "a red circle")
            sync_api.expect(prompt).to_have_value("a red circle")
            page.locator("#compare-button").click()
            original, erased = page.locator("#gallery-original img"), page.locator("#gallery-erased img")
            # The prompt and the model's unrelated prompts, same seeds, on each side.
            sync_api.expect(original.nth(1)).to_be_visible(timeout=120_000)
            sync_api.expect(erased.nth(1)).to_be_visible(timeout=30_000)
            sync_api.expect(original).to_have_count(erased.count())
            sync_api.expect(page.locator("#verdicts")).to_contain_text("a red circle")
            _screenshot(page, "app.png")

            page.get_by_role("tab", name="Save").click()  # the session's run is selected, its files offered
            files = page.locator("#run-files")
            sync_api.expect(files).to_contain_text("safetensors", timeout=30_000)
            sync_api.expect(files).to_contain_text("README")
        finally:
            browser.close()
    runs = [d for d in out.iterdir() if (d / "esd.safetensors").is_file()]
    assert len(runs) == 1 and (runs[0] / "README.md").is_file()


def test_server_serves_no_files_from_outside_the_output_folder(server):
    url, _ = server
    for path in ("/etc/hostname", str(ROOT / "pyproject.toml")):
        assert _status(f"{url}gradio_api/file={path}") in (403, 404)
