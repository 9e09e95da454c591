"""A room for the virtual sound card of ``scripts/audio_env.sh``, and the speech-like test signal.

The card's microphone and speaker never hear each other. The room adds what a laptop's
loudspeakers do: it records what the app plays (``speaker.monitor``), passes it through an echo
path (a delay, a direct sound, a decaying reverberation tail, an attenuation) and plays the
result, plus near-end speech at chosen times, into ``micfeed``, which the app's microphone
hears. Its own input and output buffering add to the echo delay (the tests measure the total).

    python tests/room.py --delay-ms 150 --near near.f32 --near-at 7 --jump-at 11 --far far.f32

runs until SIGINT or SIGTERM. Times count from the room's start, or with ``--far`` (the signal
the app plays) from the far end's first sample as the room hears it, found by matching what
it hears against that signal: the near end then always overlaps the same far-end speech,
however late the room started on a busy machine. ``synthetic_speech`` is the one speech-like
signal of the tests.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RATE = 24000
CHUNK = 480  # 20 ms
LOCK = RATE // 2  # heard samples matched against the far end to set the clock
# the far end's first seconds, where the room starts hearing it: a short search, because a
# stall longer than the output buffered so far would lengthen the echo path
LOCK_REACH = 4 * RATE


def synthetic_speech(
    seconds: float, seed: int = 0, f0: float = 120.0, rate: int = RATE, level: float = 0.1
) -> np.ndarray:
    """Speech-like audio: voiced harmonics of a pitch that moves (intonation and vibrato around
    ``f0``), shaped by three formant-like bumps, in syllables at about 4 Hz grouped into words
    with pauses, plus a little breath noise. RMS ``level`` over the voiced parts."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = f0 * (1 + 0.15 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)))
    pitch *= 1 + 0.04 * np.sin(2 * np.pi * 3.1 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    x = np.zeros_like(t)
    for k in range(1, int(4000 / f0)):
        f = k * f0
        amp = sum(a * np.exp(-(((f - c) / w) ** 2)) for a, c, w in _FORMANTS) + 0.02
        x += amp * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    syllables = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6)), 0, None) ** 1.5
    words = np.sin(2 * np.pi * 0.5 * t + rng.uniform(0, 6)) > -0.6
    envelope = syllables * words
    x = (x + 0.05 * rng.standard_normal(t.size)) * envelope
    voiced = envelope > 0.1
    return (x * level / np.sqrt(np.mean(x[voiced] ** 2))).astype(np.float32)


_FORMANTS = ((1.0, 500.0, 400.0), (0.5, 1500.0, 600.0), (0.2, 2500.0, 800.0))


def echo_path(
    delay_ms: float,
    tail_ms: float = 200.0,
    drr_db: float = 6.0,
    attenuation_db: float = 10.0,
    seed: int = 1,
    rate: int = RATE,
) -> np.ndarray:
    """Impulse response: silence for ``delay_ms``, a direct sound, then a noise tail decaying
    by 60 dB over ``tail_ms`` whose energy is ``drr_db`` below the direct sound's; scaled so
    that its total energy gain is ``-attenuation_db``."""
    rng = np.random.default_rng(seed)
    d, n = round(delay_ms * rate / 1000), max(1, round(tail_ms * rate / 1000))
    tail = rng.standard_normal(n) * np.exp(-np.arange(n) * 6.9 / n)
    tail[0] = 0.0
    tail *= np.sqrt(10 ** (-drr_db / 10) / np.sum(tail**2))
    h = np.zeros(d + n)
    h[d] = 1.0
    h[d + 1 :] = tail[1:]
    return h * 10 ** (-attenuation_db / 20) / np.sqrt(np.sum(h**2))


class FarClock:
    """Where the room is in the far end: feed it every heard chunk until it returns the room
    sample at which the far end's first sample was heard."""

    def __init__(self, far: np.ndarray):
        self.n = 1 << int(np.ceil(np.log2(LOCK_REACH + LOCK)))
        self.far = far[:LOCK_REACH]
        self.spectrum = np.fft.rfft(self.far, self.n)
        self.heard = np.zeros(0)

    def __call__(self, x: np.ndarray, n: int) -> int | None:
        """``x``: the heard chunk that starts at room sample ``n``."""
        self.heard = np.concatenate([self.heard, x])
        if len(self.heard) < LOCK:
            return None
        heard, self.heard = self.heard[-LOCK:], np.zeros(0)  # one try per LOCK samples
        if np.mean(heard**2) < 1e-4:  # a pause matches nothing
            return None
        c = np.fft.irfft(self.spectrum * np.conj(np.fft.rfft(heard, self.n)), self.n)
        at = int(np.argmax(c[: len(self.far) - LOCK]))
        if np.corrcoef(self.far[at : at + LOCK], heard)[0, 1] < 0.9:
            return None
        return n + len(x) - LOCK - at


class Convolver:
    """Streaming convolution (overlap-save with FFTs) whose impulse response can change."""

    def __init__(self, h: np.ndarray, chunk: int = CHUNK):
        self.chunk = chunk
        self.history = np.zeros(0)
        self.set(h)

    def set(self, h: np.ndarray) -> None:
        self.taps = len(h)
        self.n = 1 << int(np.ceil(np.log2(self.taps + self.chunk)))
        self.H = np.fft.rfft(h, self.n)
        self.history = np.concatenate([np.zeros(self.taps - 1), self.history])[-(self.taps - 1) :]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        buf = np.concatenate([self.history, x])
        self.history = buf[len(x) :]
        y = np.fft.irfft(np.fft.rfft(buf, self.n) * self.H, self.n)
        return y[self.taps - 1 : self.taps - 1 + len(x)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--delay-ms", type=float, default=150.0)
    p.add_argument("--tail-ms", type=float, default=200.0)
    p.add_argument("--drr-db", type=float, default=6.0)
    p.add_argument("--attenuation-db", type=float, default=10.0)
    p.add_argument("--near", help="near-end speech, raw float32 at 24 kHz")
    p.add_argument("--near-at", type=float, nargs="*", default=[], help="seconds from start")
    p.add_argument("--jump-at", type=float, help="seconds from start: the delay jumps")
    p.add_argument("--far", help="the far end, raw float32 at 24 kHz: start at its first sample")
    p.add_argument("--jump-ms", type=float, default=50.0)
    p.add_argument("--latency-ms", type=int, default=150, help="output buffering")
    args = p.parse_args(argv)

    near = np.fromfile(args.near, "<f4").astype(np.float64) if args.near else np.zeros(0)
    clock = FarClock(np.fromfile(args.far, "<f4").astype(np.float64)) if args.far else None

    def schedule(origin: int) -> tuple[list[int], int | None]:
        """The near end's start samples and the jump's, from the start's room sample."""
        at = [origin + round(s * RATE) for s in args.near_at]
        return at, None if args.jump_at is None else origin + round(args.jump_at * RATE)

    starts, jump = ([], None) if clock else schedule(0)
    shape = dict(tail_ms=args.tail_ms, drr_db=args.drr_db, attenuation_db=args.attenuation_db)
    conv = Convolver(echo_path(args.delay_ms, **shape))
    fmt = ["--raw", "--format=float32le", f"--rate={RATE}", "--channels=1"]
    listen = ["parecord", *fmt, "-d", "speaker.monitor", "--latency-msec=20"]
    speak = ["pacat", "--playback", *fmt, "-d", "micfeed", f"--latency-msec={args.latency_ms}"]
    try:  # a stall longer than the output buffer would shift the echo path (and the clients
        os.nice(-10)  # that move the room's sound inherit the priority)
    except OSError:
        pass
    rec = subprocess.Popen(listen, stdout=subprocess.PIPE)
    play = subprocess.Popen(speak, stdin=subprocess.PIPE)
    stop = []
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.append(1))
    n = 0  # room samples so far
    try:
        print("room ready", flush=True)
        while not stop:
            raw = rec.stdout.read(CHUNK * 4)
            if not raw:
                break
            x = np.frombuffer(raw, "<f4").astype(np.float64)
            if clock is not None and (origin := clock(x, n)) is not None:
                print(f"room clock {origin}", flush=True)
                clock = None
                starts, jump = schedule(origin)
                if min([*starts, n if jump is None else jump]) < n:
                    print("room late: an event's time passed before the clock was set")
                    return 1
            if jump is not None and n >= jump:
                conv.set(echo_path(args.delay_ms + args.jump_ms, **shape))
                print(f"room jump {n}", flush=True)
                jump = None
            y = conv(x)
            for s in starts:  # near-end speech overlapping this chunk
                a, b = max(n, s), min(n + len(x), s + len(near))
                if a < b:
                    y[a - n : b - n] += near[a - s : b - s]
            play.stdin.write(y.astype("<f4").tobytes())
            play.stdin.flush()
            n += len(x)
    except BrokenPipeError:
        pass
    finally:
        for proc in (rec, play):
            proc.terminate()
        for proc in (rec, play):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


class Room:
    """``tests/room.py`` as a subprocess on the card ``env``; ``stop()`` it in a ``finally``."""

    def __init__(self, env: dict, *args):
        cmd = [sys.executable, str(Path(__file__)), *map(str, args)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "room ready" not in line:
            self.stop()
            raise RuntimeError(f"the room did not start: {line!r}")
        self.started = time.monotonic()

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stdout.read() if self.proc.stdout else ""


if __name__ == "__main__":
    sys.exit(main())
