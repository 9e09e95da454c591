"""Helpers of the tests that run ``moshi-mlx chat`` against a virtual sound card
(``scripts/audio_env.sh``): the card itself, the chat as a subprocess, and signal matching.

Outside CI these tests skip when the card cannot be had; with ``CI=true`` they must run.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import MOSHI_MLX

ROOT = Path(__file__).resolve().parents[1]
AUDIO_ENV = ROOT / "scripts" / "audio_env.sh"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TOOLS = ("pulseaudio", "pactl", "pacat", "parecord")
REPORT = os.environ.get("MOSHI_MLX_AUDIO_REPORT")  # append measured figures here (JSON lines)


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"virtual sound card needed in CI: {reason}")
    pytest.skip(f"no virtual sound card: {reason}")


def card_env(folder: Path | None = None) -> dict[str, str]:
    """Environment of a virtual sound card started (if needed) in ``folder``."""
    env = dict(os.environ)
    if folder is not None:
        env["AUDIO_ENV_DIR"] = str(folder)
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if ctypes.util.find_library("portaudio") is None:
        missing.append("PortAudio")
    if missing:
        _unavailable(f"missing {', '.join(missing)} (scripts/audio_env.sh install)")
    r = subprocess.run([str(AUDIO_ENV), "start"], env=env, capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    if r.returncode != 0:
        _unavailable(f"scripts/audio_env.sh start failed: {r.stderr.strip()}")
    lines = subprocess.run([str(AUDIO_ENV), "env"], env=env, capture_output=True, text=True,
                           check=True, timeout=10).stdout  # fmt: skip
    for name, value in re.findall(r"^export (\w+)=(.*)$", lines, re.M):
        env[name] = value
    return env


def stop_card(env: dict[str, str]) -> None:
    subprocess.run([str(AUDIO_ENV), "stop"], env=env, capture_output=True, timeout=30)


class Chat:
    """``moshi-mlx chat`` in a subprocess, its output lines collected as they come."""

    def __init__(self, env, *args):
        cmd = [str(MOSHI_MLX), "chat", *map(str, args)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)  # fmt: skip
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream, lines):
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for(self, words: str, timeout: float = 300.0) -> None:
        """Until the chat prints ``words``: loading and warming the fixture model up took over
        90 s with the 2 cores at a load of 20, so only a chat that is surely stuck fails."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(words in line for line in self.out):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"chat never said {words!r}: {self.out} {self.err}")

    def interrupt(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.wait(timeout)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        for t in self._readers:
            t.join(timeout=5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def summary(self) -> dict[str, str]:
        line = next(line for line in self.out if line.startswith("summary "))
        return dict(kv.split("=", 1) for kv in line.split()[1:])


def locate(ref: np.ndarray, signal_: np.ndarray) -> tuple[int, float]:
    """Where ``ref`` (with its zeros) sits in ``signal_``: the lag of the cross-correlation
    peak, and the normalized correlation over the samples where ``ref`` is not zero."""
    n = 1 << int(np.ceil(np.log2(len(ref) + len(signal_))))
    c = np.fft.irfft(np.fft.rfft(signal_, n) * np.conj(np.fft.rfft(ref, n)), n)
    lag = int(np.argmax(c[: len(signal_)]))
    seg = signal_[lag : lag + len(ref)]
    r = ref[: len(seg)]
    mask = r != 0
    return lag, float(np.corrcoef(r[mask], seg[mask])[0, 1])


def report(name: str, figures: dict) -> None:
    print(f"\n{name}: " + json.dumps(figures))
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(json.dumps({"test": name, **figures}) + "\n")
