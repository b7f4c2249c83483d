"""End to end: ``flowalign demo`` starts in a subprocess on a free port of 127.0.0.1, headless Chromium (Debian's
``/usr/bin/chromium`` driven by Playwright; no browser download) opens it, finds a LoRA run written after start-up
("Rescan runs"), generates on the compare tab (the base and that run), checks that both images and the score table
appear, that an empty prompt gives a message in the page, that a noise-optimisation job streams to its end and that
Stop ends a long one; screenshots are saved as test artefacts
(``$FLOWALIGN_TEST_ARTIFACTS`` or ``test-artifacts/`` at the repository root)."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("FLOWALIGN_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                                 reason=f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does)")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _artifacts() -> Path:
    d = Path(os.environ.get("FLOWALIGN_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("playwright.sync_api", reason="pip install -e '.[demo]' (playwright)")
    pytest.importorskip("gradio", reason="pip install -e '.[demo]' (gradio)")
    from test_app import make_runs

    runs = tmp_path_factory.mktemp("browser_runs")  # empty at start: the LoRA run "finishes" after start-up
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "flowalign.cli", "demo", "--port", str(port), "--runs", str(runs),
                             "--threads", "1"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    url = f"http://127.0.0.1:{port}/"
    staged = make_runs(tmp_path_factory.mktemp("staged_runs"), full=False, bad=False)  # while the app starts
    deadline = time.time() + 240  # a loaded CI machine (pytest -n 2 beside it) starts it slowly
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                log.seek(0)
                pytest.fail(f"the demo did not start on {url}:\n{log.read()[-3000:]}")
            time.sleep(0.3)
    (staged / "lora_run").rename(runs / "lora_run")  # the app answers, so it scanned an empty folder
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(120_000)
        pg.goto(server)
        pg.wait_for_selector("#generate")
        yield pg
        browser.close()


def test_compare_tab_shows_both_images_and_their_scores(page):
    assert "lora_run" not in page.inner_text("#models")
    page.click("#rescan")  # the run written after start-up is found and preselected beside the base
    page.wait_for_function("document.querySelector('#models').innerText.includes('lora_run (lora)')")
    assert "base (shapeworld)" in page.inner_text("#models")
    page.locator("#prompt textarea").fill("a photo of a red circle")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery img').length >= 2")
    page.wait_for_function("document.querySelector('#scores').innerText.includes('shapeclip')")
    table = page.inner_text("#scores")
    assert "lora_run (lora)" in table and "base (shapeworld)" in table
    assert "verdict: held-out strict (headline)" in table and ("correct" in table or "wrong" in table)
    assert "detected (training judge)" in table and "jpeg_compressibility: size_kb" in table
    assert "benchmark record: task colors" in page.inner_text("#message")
    # the images are real PNGs served by the app
    src = page.locator("#gallery img").first.get_attribute("src")
    assert src and ("/file=" in src or src.startswith("data:image") or "gradio_api" in src)
    page.screenshot(path=str(_artifacts() / "demo_compare_test.png"), full_page=True)


def test_empty_prompt_is_a_message_in_the_page(page):
    page.locator("#prompt textarea").fill("")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#message').innerText.includes('prompt is empty')")
    assert "Traceback" not in page.content()
    page.locator("#prompt textarea").fill("a photo of a red circle")


def test_noise_tab_streams_a_job_to_its_end(page):
    page.get_by_role("tab", name="Noise optimisation").click()
    page.get_by_role("radio", name="best-of-N").check()
    page.locator("#noise_budget input").fill("160")  # 4 candidates x 20 steps x 2 (CFG)
    page.click("#noise_run")
    page.wait_for_function("document.querySelector('#noise_status').innerText.includes('done')")
    status = page.inner_text("#noise_status")
    assert "best-of-N done" in status and "160 NFE" in status
    page.wait_for_function("document.querySelector('#noise_scores').innerText.includes('after best-of-N')")
    assert page.locator("#noise_image img").count() == 1 and page.locator("#noise_curve img").count() == 1
    page.screenshot(path=str(_artifacts() / "demo_noise_test.png"), full_page=True)


def test_stop_button_ends_a_long_job_with_its_best_so_far(page):
    page.get_by_role("radio", name="ReNO").check()
    page.locator("#noise_budget input").fill("100000")  # thousands of iterations: only Stop ends it in time
    page.click("#noise_run")
    page.wait_for_function("document.querySelector('#noise_status').innerText.includes('iterate')")
    page.click("#noise_stop")
    page.wait_for_function("document.querySelector('#noise_status').innerText.includes('stopped early')",
                           timeout=30_000)
    assert "of a budget of 100000" in page.inner_text("#noise_status")
    page.screenshot(path=str(_artifacts() / "demo_noise_stopped_test.png"), full_page=True)
