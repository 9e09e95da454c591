"""Our page in a real browser: Debian's Chromium, headless, driven by Playwright (the system
browser, nothing downloaded), with a fake microphone playing a WAV, against ``moshi-mlx
serve`` on the fixture model. ``.ci/run`` installs Chromium."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_serve import Served, speech

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(autouse=True)
def chromium():
    """Outside CI the test skips without Chromium; in CI (which installs it) it fails."""
    if CHROMIUM is None:
        reason = "no Chromium: apt-get install chromium (.ci/run does)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)


def launch(playwright, mic: Path):
    """Headless Chromium whose microphone plays the WAV ``mic``."""
    return playwright.chromium.launch(
        executable_path=CHROMIUM,
        headless=True,
        args=[
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic}",
            "--use-fake-ui-for-media-stream",
            "--autoplay-policy=no-user-gesture-required",
            "--no-sandbox",  # CI runs as root
        ],
    )


def test_page_talks_through_the_browser(model_dir, tmp_path):
    from moshi_mlx.app.wavio import write_wav

    mic = tmp_path / "mic.wav"
    write_wav(mic, np.concatenate(speech(4.0)), 24000)
    server = Served(model_dir)
    url = server.http("/")
    errors = []
    try:
        with sync_api.sync_playwright() as p:
            browser = launch(p, mic)
            try:
                page = browser.new_page(viewport={"width": 720, "height": 760})
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(url)
                page.click("#talk")
                page.wait_for_function("window.moshi.state === 'live'", timeout=60_000)
                # The transcript fills and Moshi's audio reaches the page's output.
                page.wait_for_function(
                    "window.moshi.transcript.trim().length > 20 && window.moshi.maxOutputRms > 0.01"
                    " && window.moshi.latencyMs > 0",
                    timeout=90_000,
                )
                assert page.inner_text("#transcript").strip()
                assert page.inner_text("#latency").endswith("ms")

                # A second page while the first one talks: told the server is busy.
                other = browser.new_page()
                other.goto(url)
                other.click("#talk")
                other.wait_for_selector("#message:not([hidden])", timeout=30_000)
                assert "busy" in other.inner_text("#message")
                other.close()

                shot = tmp_path / "serve.png"
                page.screenshot(path=str(shot))
                if os.environ.get("MOSHI_MLX_SCREENSHOT"):  # to refresh docs/serve.png
                    shutil.copy(shot, Path(os.environ["MOSHI_MLX_SCREENSHOT"]))
                page.click("#talk")  # stop
                page.wait_for_function("window.moshi.state === 'idle'")
            finally:
                browser.close()
            # Without the fake permission prompt, headless Chromium refuses the microphone.
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--use-fake-device-for-media-stream",
                                              "--no-sandbox"])  # fmt: skip
            try:
                page = browser.new_page()
                page.goto(url)
                page.click("#talk")
                page.wait_for_selector("#message:not([hidden])", timeout=30_000)
                assert "microphone was refused" in page.inner_text("#message")
                assert page.evaluate("window.moshi.state") == "idle"
            finally:
                browser.close()
    finally:
        code, _, err = server.stop()
    assert errors == []
    assert code in (0, 130), err
