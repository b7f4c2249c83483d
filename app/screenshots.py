"""Regenerate the README's demo screenshots: start the demo, drive it in headless Chromium, save PNGs.

    python app/screenshots.py [--runs runs] [--out docs/img] [--chromium /usr/bin/chromium]

Compare tab: the shipped model vs the main job's trained weights (``runs/main_s0``) on a position prompt of the test
split; noise tab: ReNO with the shapeclip reward on the same prompt. Needs the ``demo`` extra and Debian's
``chromium`` (Playwright drives it through ``executable_path``; it downloads no browser).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
TASK, PROMPT, SEED = "position", "a photo of a square left of a triangle", 2


def _pick(page, elem_id: str, value: str) -> None:
    """Choose a value in a Gradio dropdown: type it, then press Enter."""
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(value)
    page.keyboard.press("Enter")
    page.wait_for_timeout(400)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    a = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "flowalign.cli", "demo", "--port", str(port), "--runs", a.runs],
                            env=env)
    url = f"http://127.0.0.1:{port}/"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=a.chromium, args=ARGS)
            page = browser.new_page(viewport={"width": 1360, "height": 1240}, device_scale_factor=1)
            page.set_default_timeout(120_000)
            page.goto(url)
            page.wait_for_selector("#generate")
            _pick(page, "task", TASK)
            _pick(page, "pick", PROMPT)
            page.locator("#seed input").fill(str(SEED))
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('#gallery img').length >= 2")
            page.wait_for_function("document.querySelector('#scores').innerText.includes('shapeclip')")
            page.wait_for_timeout(800)
            page.screenshot(path=str(out / "demo_compare.png"), full_page=False)
            page.get_by_role("tab", name="Noise optimisation").click()
            _pick(page, "noise_task", TASK)
            _pick(page, "noise_pick", PROMPT)
            page.locator("#noise_seed input").fill(str(SEED))
            page.click("#noise_run")
            page.wait_for_function("document.querySelector('#noise_status').innerText.includes('done')")
            page.wait_for_timeout(800)
            page.screenshot(path=str(out / "demo_noise.png"), full_page=False)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"wrote {out / 'demo_compare.png'} and {out / 'demo_noise.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
