"""``moshi-mlx serve`` on the fixture model, through a client of Kyutai's protocol
(tests/serve_client.py: sphn + aiohttp as Kyutai's ``moshi/client.py``)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import MOSHI_MLX, moshi_mlx_cmd
from serve_client import FRAME, WEB_CLIENT_QUERY, talk

pytest.importorskip("sphn")
pytest.importorskip("aiohttp")

SEED_QUERY = {**WEB_CLIENT_QUERY, "text_seed": "7", "audio_seed": "7"}


class Served:
    """A ``moshi-mlx serve`` process started on a free port, stopped by ``stop``."""

    def __init__(self, model_dir: Path, *flags, env=None):
        cmd = [
            str(MOSHI_MLX),
            "serve",
            "--hf-path",
            str(model_dir),
            "--port",
            "0",
            *map(str, flags),
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)  # fmt: skip
        self.lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.match(r"open (https?)://([^/]+)/(\?token=(\S+))?", line)
            if m:
                self.scheme, self.netloc, self.token = m[1], m[2], m[4]
                break
        else:
            self.stop()
            pytest.fail("the server did not start")
        if not hasattr(self, "netloc"):
            self.stop()
            pytest.fail(f"the server did not start: {self.proc.stderr.read()}")
        self.port = int(self.netloc.rsplit(":", 1)[1])

    def ws(self, host: str | None = None) -> str:
        scheme = "wss" if self.scheme == "https" else "ws"
        return f"{scheme}://{host or self.netloc}/api/chat"

    def http(self, path: str = "/", host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.netloc}{path}"

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self, sig=signal.SIGINT) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return self.proc.returncode, out, err


@pytest.fixture(scope="module")
def voices(tmp_path_factory, model_dir) -> Path:
    """A --voices folder with one voice saved by `moshi-mlx persona save`."""
    folder = tmp_path_factory.mktemp("voices")
    wav = folder.parent / "voice.wav"
    from moshi_mlx.app.wavio import write_wav

    t = np.arange(24000 * 2) / 24000
    write_wav(wav, 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2, 24000)
    r = moshi_mlx_cmd("persona", "save", wav, "-o", folder / "alice.safetensors",
                      "--hf-path", model_dir)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return folder


@pytest.fixture(scope="module")
def server(model_dir, voices, tmp_path_factory):
    dump = tmp_path_factory.mktemp("dump")
    s = Served(model_dir, "--voices", voices, "--debug-dump", dump, "--max-lag-ms", "20000")
    s.dump = dump
    yield s
    s.stop()


def speech(seconds: float, seed: int = 0) -> list[np.ndarray]:
    """Voice-like test audio: a gliding tone with a syllable rhythm, in 1920-sample frames."""
    t = np.arange(int(seconds * 24000)) / 24000
    f = 180 + 60 * np.sin(2 * np.pi * 0.7 * t + seed)
    x = 0.3 * np.sin(2 * np.pi * np.cumsum(f) / 24000) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    n = len(x) // FRAME
    return list(x[: n * FRAME].astype(np.float32).reshape(n, FRAME))


def converse(url, frames, **kw):
    return asyncio.run(talk(url, frames, **kw))


def test_handshake_audio_and_text_come_back(server):
    frames = speech(2.0)
    reply = converse(server.ws(), frames, query=SEED_QUERY, pace_s=0.02)
    assert reply.errors == []
    assert reply.handshake == b"\x00" * 8  # Rust's form: protocol 0, model 0 (u32 LE)
    assert len(reply.audio) >= len(frames)
    assert all(len(a) == FRAME for a in reply.audio[1:])
    assert reply.audio_bytes[0].startswith(b"OggS")
    assert "".join(reply.text).strip(), "the fixture model says something"
    assert reply.metadata and reply.metadata[0]["sampling"]["temp_text"] == 0.7
