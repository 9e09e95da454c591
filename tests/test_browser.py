"""Our page in a real browser: Debian's Chromium, headless, driven by Playwright (the system
browser, nothing downloaded), with a fake microphone playing a WAV, against ``moshi-mlx
serve`` on the fixture model. ``.ci/run`` installs Chromium."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from test_serve import Served, speech

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium: apt-get install chromium (.ci/run does)"
)


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


KYUTAI_CLIENT = os.environ.get("MOSHI_MLX_KYUTAI_CLIENT")


@pytest.mark.skipif(
    not KYUTAI_CLIENT,
    reason="opt-in: MOSHI_MLX_KYUTAI_CLIENT=DIR, a build of Kyutai's web client (their client/ "
    "folder: npm ci && npx vite build -> dist/)",
)
def test_kyutai_web_client_talks_through_the_browser(model_dir, tmp_path):
    """Kyutai's own page, unchanged, served with --static: it connects, sends Ogg Opus from
    the microphone and gets Moshi's audio and text back (watched on its WebSocket)."""
    from moshi_mlx.app.wavio import write_wav

    mic = tmp_path / "mic.wav"
    write_wav(mic, np.concatenate(speech(4.0)), 24000)
    server = Served(model_dir, "--static", KYUTAI_CLIENT)
    sent, received = [], []
    try:
        with sync_api.sync_playwright() as p:
            browser = launch(p, mic)
            try:
                page = browser.new_page()

                def watch(ws):
                    ws.on("framesent", lambda payload: sent.append(payload))
                    ws.on("framereceived", lambda payload: received.append(payload))

                page.on("websocket", watch)
                page.goto(server.http("/"))
                page.click("text=Connect")
                start = time.monotonic()
                while time.monotonic() - start < 90:
                    audio = [m for m in received if isinstance(m, bytes) and m[:1] == b"\x01"]
                    text = [m for m in received if isinstance(m, bytes) and m[:1] == b"\x02"]
                    if len(audio) > 20 and text:
                        break
                    page.wait_for_timeout(250)
            finally:
                browser.close()
    finally:
        server.stop()
    kinds = [m[0] for m in received if isinstance(m, bytes) and m]
    assert kinds[0] == 0 and 5 not in kinds
    assert any(m[:1] == b"\x01" and b"OggS" in m[:8] for m in sent if isinstance(m, bytes))
    assert kinds.count(1) > 20 and kinds.count(2) > 0
