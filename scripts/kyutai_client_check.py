"""Kyutai's web client, unchanged, against ``moshi-mlx serve --static``: the browser half of
``scripts/kyutai_client_check.sh`` (read its header first).

Starts ``moshi-mlx serve --static CLIENT --hf-path MODEL``, opens the page in headless Chromium
(Playwright driving the system browser) with a fake microphone playing a voice-like WAV, presses
its Connect button, and checks, from inside the page:

- the WebSocket URL it built (``/api/chat`` with its query string) and the sampling the server
  says it uses for that conversation (the page's own settings, put in its localStorage, must
  come back in the server's first metadata);
- the handshake arrives, the page sends Ogg Opus pages (``0x01`` + ``OggS``...);
- Moshi's Ogg Opus audio arrives and is heard: the RMS of what the page connects to its
  ``AudioContext``'s destination (measured with an analyser tapped beside it);
- Moshi's text arrives and shows in the page's transcript;
- no uncaught error in the page.

Prints one ``key=value`` line per figure, saves a screenshot, exits 0 when every check passes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

# Runs before the page's own scripts: counts what crosses the WebSocket by kind, and taps every
# connection to an AudioContext's destination with an analyser whose RMS is polled (the level
# of what the page actually plays).
PROBE = """
(() => {
  const probe = window.__probe = {url: null, sent: {}, received: {}, firstSentAudio: null,
    handshake: null, closed: null, metadata: [], errors: [], text: "", maxOutputRms: 0, taps: 0};
  const count = (table, kind) => { table[kind] = (table[kind] || 0) + 1; };
  const Native = window.WebSocket;
  window.WebSocket = function (url, protocols) {
    const ws = protocols === undefined ? new Native(url) : new Native(url, protocols);
    probe.url = String(url);
    const send = ws.send.bind(ws);
    ws.send = (data) => {
      const bytes = new Uint8Array(data.buffer ? data.buffer.slice(data.byteOffset,
        data.byteOffset + data.byteLength) : data);
      count(probe.sent, bytes[0]);
      if (bytes[0] === 1 && probe.firstSentAudio === null)
        probe.firstSentAudio = String.fromCharCode(...bytes.slice(1, 5));
      send(data);
    };
    ws.addEventListener("message", (e) => {
      const bytes = new Uint8Array(e.data);
      count(probe.received, bytes[0]);
      const rest = new TextDecoder().decode(bytes.slice(1));
      if (bytes[0] === 0 && probe.handshake === null) probe.handshake = Array.from(bytes);
      if (bytes[0] === 2) probe.text += rest;
      if (bytes[0] === 4) probe.metadata.push(JSON.parse(rest));
      if (bytes[0] === 5) probe.errors.push(rest);
    });
    ws.addEventListener("close", (e) => { probe.closed = e.code; });
    return ws;
  };
  window.WebSocket.prototype = Native.prototype;
  Object.assign(window.WebSocket, {CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3});

  const connect = AudioNode.prototype.connect;
  AudioNode.prototype.connect = function (target, ...rest) {
    if (target instanceof AudioDestinationNode) {
      const analyser = this.context.createAnalyser();
      analyser.fftSize = 2048;
      connect.call(this, analyser);
      probe.taps += 1;
      const buffer = new Float32Array(analyser.fftSize);
      setInterval(() => {
        analyser.getFloatTimeDomainData(buffer);
        let sum = 0;
        for (const v of buffer) sum += v * v;
        probe.maxOutputRms = Math.max(probe.maxOutputRms, Math.sqrt(sum / buffer.length));
      }, 40);
    }
    return connect.call(this, target, ...rest);
  };
})();
"""

# The page's settings as a user would have saved them (its Settings dialog keeps them in
# localStorage); the page puts them in the WebSocket's query string.
PAGE_SETTINGS = {"textTemperature": "0.6", "textTopk": "20", "audioTemperature": "0.75",
                 "audioTopk": "200"}  # fmt: skip
EXPECTED_SAMPLING = {"temp_text": 0.6, "top_k_text": 20, "temp": 0.75, "top_k": 200}


def voice_like_wav(path: Path, seconds: float) -> None:
    """A gliding tone with a syllable rhythm at 24 kHz (the tests' ``speech``), 16-bit mono."""
    t = np.arange(int(seconds * 24000)) / 24000
    f = 180 + 60 * np.sin(2 * np.pi * 0.7 * t)
    x = 0.3 * np.sin(2 * np.pi * np.cumsum(f) / 24000) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes((x * 32767).astype("<i2").tobytes())


def start_server(moshi_mlx: str, client: Path | None, model: Path, flags: list[str], env=None):
    """``moshi-mlx serve`` on a free port (``--static client`` unless None): (process, URL)."""
    static = [] if client is None else ["--static", str(client)]
    cmd = [moshi_mlx, "serve", *static, "--hf-path", str(model), "--port", "0", *flags]
    print("server: " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.match(r"open (https?://\S+/(\?token=\S+)?)", line)
        if m:
            return proc, m[1]
    proc.kill()
    sys.exit("kyutai_client_check: the server did not start")


def stop_server(proc) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def serve_page(folder: Path) -> int:
    """Serves ``folder`` over http on another port of this machine (a page of another origin,
    as Kyutai's development server would be); returns the port."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd.server_address[1]


def relay(server_port: int) -> int:
    """A TCP relay on 127.0.0.3 whose connections reach the server (bound to 127.0.0.2) from
    127.0.0.2: to the server, a client that is not this machine (whose connections come from
    127.0.0.1). Returns its port."""
    import asyncio
    import threading

    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def connection(reader, writer):
        upstream = await asyncio.open_connection("127.0.0.2", server_port,
                                                 local_addr=("127.0.0.2", 0))  # fmt: skip
        await asyncio.gather(pipe(reader, upstream[1]), pipe(upstream[0], writer))

    ports = []

    async def run():
        server = await asyncio.start_server(connection, "127.0.0.3", 0)
        ports.append(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    threading.Thread(target=asyncio.run, args=(run(),), daemon=True).start()
    while not ports:
        time.sleep(0.02)
    return ports[0]


def drive(url: str, chromium: str, mic: Path, shot: Path, seconds: float, refused: bool) -> dict:
    from playwright.sync_api import sync_playwright

    page_errors, console_errors, failed_requests = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            headless=True,
            args=[
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={mic}",
                "--use-fake-ui-for-media-stream",
                "--autoplay-policy=no-user-gesture-required",
                "--no-sandbox",  # CI and containers run as root
                "--ignore-certificate-errors",  # the server's self-signed one (--other-device)
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1024, "height": 900},
                                    ignore_https_errors=True)  # fmt: skip
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.on("console", lambda m: m.type == "error" and console_errors.append(m.text))
            page.on("response", lambda r: r.status >= 400 and failed_requests.append(
                f"{r.status} {r.url}"))  # fmt: skip
            page.add_init_script(PROBE)
            settings = json.dumps(PAGE_SETTINGS)
            page.add_init_script(
                f"for (const [k, v] of Object.entries({settings})) localStorage.setItem(k, v);"
            )
            if "?token=" in url:  # without it the page is refused
                refusal = page.goto(url.split("?token=")[0]).status
            page.goto(url)
            page.get_by_role("button", name="Connect").click()
            if refused:  # the WebSocket closes without a handshake
                page.wait_for_function("window.__probe.closed !== null", timeout=60_000)
                page.wait_for_timeout(1000)
                page.screenshot(path=str(shot))
                probe = page.evaluate("window.__probe")
                probe.update(page_text="", disconnect_button=0)
            else:
                page.wait_for_function("window.__probe.handshake !== null", timeout=120_000)
                # Moshi's text shows in the page and its audio reaches the page's output.
                page.wait_for_function(
                    "window.__probe.text.trim().length > 20 && window.__probe.maxOutputRms > 0.01",
                    timeout=120_000,
                )
                time.sleep(seconds)  # let the conversation run (and the page's visualisers fill)
                page.screenshot(path=str(shot))
                probe = page.evaluate("window.__probe")
                probe["page_text"] = page.inner_text(".player-text")
                probe["disconnect_button"] = page.get_by_role("button", name="Disconnect").count()
            if "?token=" in url:
                probe["without_token"] = refusal
        finally:
            browser.close()
    probe["page_errors"] = page_errors
    probe["console_errors"] = console_errors
    probe["failed_requests"] = failed_requests
    return probe


def check(probe: dict, refused: bool) -> list[str]:
    """What failed, in words (empty: all passed)."""
    if refused:
        if probe["handshake"] is not None or probe["closed"] is None:
            return ["the page of another origin was let in"]
        return []
    failed = []
    url = probe["url"] or ""
    if "/api/chat?" not in url:
        failed.append(f"the page's WebSocket URL: {url!r}")
    first = probe["metadata"][0] if probe["metadata"] else {}
    sampling = first.get("sampling", {})
    for key, value in EXPECTED_SAMPLING.items():
        if sampling.get(key) != value:
            failed.append(f"the page's setting {key}={value} not honoured: {sampling}")
    if probe["handshake"] is None or probe["handshake"][0] != 0:
        failed.append("no handshake")
    if probe["firstSentAudio"] != "OggS" or probe["sent"].get("1", 0) < 10:
        failed.append(f"the page sent no Ogg Opus audio: {probe['sent']}")
    if probe["received"].get("1", 0) < 10:
        failed.append(f"little audio from the server: {probe['received']}")
    if probe["maxOutputRms"] <= 0.01:
        failed.append(f"Moshi's audio not heard in the page (rms {probe['maxOutputRms']:.4f})")
    words = probe["text"].split()
    if not words or words[0] not in probe["page_text"]:
        failed.append("Moshi's text does not show in the page")
    if probe["errors"]:
        failed.append(f"the server sent errors: {probe['errors']}")
    if probe["page_errors"]:
        failed.append(f"errors in the page: {probe['page_errors']}")
    if probe["disconnect_button"] != 1:
        failed.append("the page does not show itself connected (no Disconnect button)")
    return failed


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s CLIENT MODEL [options] [-- SERVER FLAGS]",
    )
    ap.add_argument("client", type=Path, help="Kyutai's built web client (client/dist)")
    ap.add_argument("model", type=Path, help="a model folder `moshi-mlx serve --hf-path` takes")
    ap.add_argument("--screenshot", type=Path, default=Path("kyutai-client.png"))
    ap.add_argument("--moshi-mlx", default=shutil.which("moshi-mlx") or "moshi-mlx")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    ap.add_argument("--chromium", default=chromium)
    ap.add_argument("--seconds", type=float, default=4.0, help="talk this long once it answers")
    ap.add_argument("--foreign-page", choices=("allowed", "refused"),
                    help="serve the page from another port (as Kyutai's development server "
                    "would) and point it at the server with its ?worker_addr=: the server is "
                    "given --allow-origin for it (allowed) or not (refused: the page must not "
                    "get in)")  # fmt: skip
    ap.add_argument("--other-device", action="store_true",
                    help="the page as another device opens it: the server on 127.0.0.2 (https, "
                    "a self-signed certificate made in a temporary cache folder), reached "
                    "through a relay whose connections come from 127.0.0.2, the token only in "
                    "the first URL (the page must then be refused without it)")  # fmt: skip
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    args.server_flags = argv[cut + 1 :]  # more flags for the server, after --
    if not (args.client / "index.html").is_file():
        sys.exit(f"kyutai_client_check: {args.client} has no index.html (npm run build in client/)")
    if args.chromium is None:
        sys.exit("kyutai_client_check: no chromium (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        mic = Path(tmp) / "mic.wav"
        voice_like_wav(mic, 30.0)  # Chromium loops it
        flags = args.server_flags
        if args.foreign_page:
            page_port = serve_page(args.client)
            if args.foreign_page == "allowed":
                flags = [*flags, "--allow-origin", f"http://localhost:{page_port}"]
        env = None
        if args.other_device:
            flags = [*flags, "--host", "127.0.0.2"]
            env = {**os.environ, "XDG_CACHE_HOME": str(Path(tmp) / "cache")}
        proc, url = start_server(args.moshi_mlx, args.client, args.model, flags, env=env)
        if args.other_device:
            port, token = re.match(r"https://127.0.0.2:(\d+)/\?token=(\S+)", url).groups()
            url = f"https://127.0.0.3:{relay(int(port))}/?token={token}"
        if args.foreign_page:
            server = url.split("//", 1)[1].rstrip("/")
            url = f"http://localhost:{page_port}/?worker_addr={server}"
        print(f"page: {url}", flush=True)
        refused = args.foreign_page == "refused"
        try:
            probe = drive(url, args.chromium, mic, args.screenshot, args.seconds, refused)
        finally:
            code = stop_server(proc)
    print(f"url={probe['url']}")
    print(f"first_metadata={json.dumps(probe['metadata'][:1])}")
    print(f"last_metadata={json.dumps(probe['metadata'][-1:])}")
    print(f"handshake={probe['handshake']} closed={probe['closed']}")
    print(f"sent_by_kind={json.dumps(probe['sent'])} first_sent_audio={probe['firstSentAudio']}")
    print(f"received_by_kind={json.dumps(probe['received'])}")
    print(f"max_output_rms={probe['maxOutputRms']:.4f} output_taps={probe['taps']}")
    print(f"text={probe['text'][:200]!r}")
    print(f"failed_requests={probe['failed_requests']}")
    errors = sorted(
        set(e if len(e) < 160 else e[:60] + " ... " + e[-90:] for e in probe["console_errors"])
    )
    print(f"console_errors={len(probe['console_errors'])} distinct={json.dumps(errors)}")
    print(f"server_exit={code} screenshot={args.screenshot}")
    failed = check(probe, refused)
    if "?token=" in url:
        print(f"page without the token: HTTP {probe['without_token']}")
        if probe["without_token"] != 403:
            failed.append("the page was served to another device without the token")
    if code not in (0, 130):
        failed.append(f"the server exited with {code}")
    for line in failed:
        print(f"FAILED: {line}")
    print("kyutai_client_check: " + ("FAILED" if failed else "all checks passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
