"""Sound devices for the live chat: device choice, the duplex stream, its queues and the lag policy.

One PortAudio duplex stream (24 kHz mono float32, 1920-sample blocks) calls ``_callback`` every
80 ms from PortAudio's thread. The callback only copies numpy frames: the microphone block goes
into ``mic`` and the next Moshi frame comes out of ``speaker`` (silence when there is none);
both queues are bounded. All model work happens on the compute thread, which also applies the
``LagPolicy`` to what waits in the queues.
"""

from __future__ import annotations

import math
import os
import queue
import sys
import threading
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

from moshi_mlx.errors import MoshiError

from .loop import FRAME, SAMPLE_RATE

LIST_HINT = "see `moshi-mlx chat --list-devices`"


def import_sounddevice():
    """The ``sounddevice`` module, or a ``MoshiError`` saying how to install PortAudio."""
    try:
        import sounddevice
    except OSError:
        raise MoshiError(
            "PortAudio, the sound library, is not installed "
            "(macOS: brew install portaudio; Debian/Ubuntu: apt install libportaudio2)"
        ) from None
    return sounddevice


def list_devices(sd) -> str:
    """The device table, with the defaults marked as sounddevice prints it."""
    devices = sd.query_devices()
    if not len(devices):
        return "no sound devices found"
    return str(devices)


def parse_device(spec: str | None) -> int | str | None:
    """``--input-device`` / ``--output-device`` value: an index, a name (or part of one)."""
    if spec is None:
        return None
    spec = spec.strip()
    return int(spec) if spec.lstrip("-").isdigit() else spec


@dataclass
class Devices:
    input: int
    output: int
    input_name: str
    output_name: str


def choose_devices(sd, input_spec: str | None, output_spec: str | None) -> Devices:
    """Resolve the device flags (None: the system default) and check that both devices can do
    24 kHz mono float32; raises ``MoshiError`` with one line otherwise."""
    found = {}
    for kind, spec in (("input", input_spec), ("output", output_spec)):
        dev = parse_device(spec)
        try:
            info = sd.query_devices(dev, kind)
        except ValueError as e:  # no or several matches for a name
            first = str(e).splitlines()[0].rstrip(":")
            raise MoshiError(f"{first} ({LIST_HINT})") from None
        except sd.PortAudioError:
            if dev is None:
                raise MoshiError(
                    f"no {kind} device found (is a {'microphone' if kind == 'input' else 'speaker'}"
                    f" connected? {LIST_HINT})"
                ) from None
            raise MoshiError(f"there is no {kind} device {dev!r} ({LIST_HINT})") from None
        if info[f"max_{kind}_channels"] < 1:
            raise MoshiError(f"device {info['name']!r} has no {kind} channels ({LIST_HINT})")
        found[kind] = info
    check_device(sd, found["input"]["index"], "input")
    check_device(sd, found["output"]["index"], "output")
    return Devices(
        found["input"]["index"],
        found["output"]["index"],
        found["input"]["name"],
        found["output"]["name"],
    )


def check_device(sd, device: int | str, kind: str, samplerate: float = SAMPLE_RATE) -> None:
    """``MoshiError`` if ``device`` cannot stream mono float32 at ``samplerate`` for ``kind``."""
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    try:
        check(device=device, channels=1, dtype="float32", samplerate=samplerate)
    except (sd.PortAudioError, ValueError) as e:
        name = sd.query_devices(device)["name"]
        rate = f"{samplerate / 1000:g} kHz"
        raise MoshiError(
            f"{kind} device {name!r} cannot {'record' if kind == 'input' else 'play'} mono "
            f"{rate} audio ({one_line(e)}); pick another with --{kind}-device ({LIST_HINT})"
        ) from None


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class LagPolicy:
    """What to drop, decided by the compute thread just before it computes a microphone frame.

    Every frame waiting in the app (microphone frames not computed yet, Moshi frames not
    played yet) adds 80 ms between the user's voice and Moshi's answer, so:

    - hard bound: if more than ``max_waiting`` frames wait besides the one about to be
      computed, that frame (the oldest microphone audio) is skipped, which also saves its
      compute. Latency cannot grow past the bound however slow compute is.
    - catch-up: after a hiccup compute keeps up again but the frames it fell behind by still
      wait. Over the last ``settle`` frames: if the speaker queue never ran down to empty at a
      callback (``spare`` > 0: a frame of slack that was never needed), the oldest unplayed
      Moshi frame is dropped; if microphone frames were always waiting, the oldest one is
      skipped. So latency returns to the minimum, while slack that jitter keeps using stays.
    """

    RUN, DROP_MIC, DROP_SPEAKER = "run", "drop-mic", "drop-speaker"

    def __init__(self, max_waiting: int, settle: int = 50):
        if max_waiting < 1:
            raise ValueError("max_waiting must be at least one frame")
        self.max_waiting = max_waiting
        self.spares: deque[int] = deque(maxlen=settle)
        self.backlog: deque[int] = deque(maxlen=settle)

    def decide(self, mic_waiting: int, speaker_waiting: int, spare: int) -> str:
        """``mic_waiting``, ``speaker_waiting``: queue depths now; ``spare``: Moshi frames left
        in the speaker queue just after this frame's callback took one (-1: it found none)."""
        if mic_waiting + speaker_waiting > self.max_waiting:
            self.spares.clear()
            self.backlog.clear()
            return self.DROP_MIC
        self.spares.append(spare)
        self.backlog.append(mic_waiting)
        if len(self.spares) < self.spares.maxlen:
            return self.RUN
        if min(self.spares) > 0 and speaker_waiting:
            self.spares.clear()
            return self.DROP_SPEAKER
        if min(self.backlog) > 0:
            self.backlog.clear()
            return self.DROP_MIC
        return self.RUN


@dataclass
class MicBlock:
    """One callback's worth: what the microphone heard and what the speaker was given."""

    index: int  # callback number since the stream started
    pcm: np.ndarray  # [1920] float32
    adc: float  # stream time the block's first sample was captured (s)
    dac: float  # stream time the first sample given to the speaker in this callback plays (s)
    played: int  # index of the Moshi frame played in this callback, -1 for silence
    spare: int  # Moshi frames still queued after this callback took one (-1: none to take)
    played_latency: float  # dac - capture time of the mic frame it was computed from (s)


@dataclass
class MoshiFrame:
    """A computed frame on its way to the speaker."""

    step: int
    adc: float  # capture time of the microphone frame it answers
    pcm: np.ndarray


class DuplexAudio:
    """The duplex stream and its two bounded queues.

    ``mic``: ``MicBlock``s from the callback to the compute thread; ``speaker``: ``MoshiFrame``s
    from the compute thread to the callback. A full ``mic`` queue (compute thread stalled for
    seconds) loses the block (``overflows``); an empty ``speaker`` queue plays silence
    (``underruns``, counted once Moshi has started playing).
    """

    def __init__(self, sd, devices: Devices, max_waiting: int, latency: str | float = "low"):
        self.mic: queue.Queue[MicBlock] = queue.Queue(maxsize=max_waiting + 64)
        self.speaker: queue.Queue[MoshiFrame] = queue.Queue(maxsize=max_waiting + 4)
        self.blocks = 0
        self.overflows = 0
        self.underruns = 0
        self.started_playing = False
        self.flags: Counter[str] = Counter()
        self.failed = threading.Event()  # the stream ended without being asked to
        self.stuck = False  # PortAudio did not return from stopping the stream
        self._stopping = False
        try:
            self.stream = sd.Stream(
                samplerate=SAMPLE_RATE,
                blocksize=FRAME,
                device=(devices.input, devices.output),
                channels=1,
                dtype="float32",
                latency=latency,
                callback=self._callback,
                finished_callback=self._finished,
            )
        except (sd.PortAudioError, ValueError) as e:
            raise MoshiError(
                f"cannot open the sound devices: {one_line(e)} ({LIST_HINT})"
            ) from None
        self.in_latency, self.out_latency = self.stream.latency

    def start(self) -> None:
        self.stream.start()

    def stop(self, timeout: float = 3.0) -> bool:
        """Stop and close the stream (the last Moshi frames play out). False if PortAudio did
        not return within ``timeout`` s (a device that vanished can leave it blocked)."""
        self._stopping = True

        def close():
            for step in (self.stream.stop, self.stream.close):
                try:
                    step()
                except Exception:  # the device may be gone already; nothing left to save
                    pass

        closer = threading.Thread(target=close, name="close-audio", daemon=True)
        closer.start()
        closer.join(timeout)
        self.stuck = closer.is_alive()
        return not self.stuck

    @property
    def active(self) -> bool:
        return self.stream.active

    def _finished(self) -> None:
        if not self._stopping:
            self.failed.set()

    def _callback(self, indata, outdata, frames, time_info, status) -> None:
        if status:
            for flag in (
                "input_overflow",
                "input_underflow",
                "output_underflow",
                "output_overflow",
            ):
                if getattr(status, flag):
                    self.flags[flag] += 1
        now = time_info.currentTime
        adc = time_info.inputBufferAdcTime or now - self.in_latency
        dac = time_info.outputBufferDacTime or now + self.out_latency
        try:
            frame = self.speaker.get_nowait()
        except queue.Empty:
            outdata.fill(0)
            played, played_latency, spare = -1, math.nan, -1
            self.underruns += self.started_playing
        else:
            outdata[:, 0] = frame.pcm
            played, played_latency = frame.step, dac - frame.adc
            spare = self.speaker.qsize()
            self.started_playing = True
        block = MicBlock(self.blocks, indata[:, 0].copy(), adc, dac, played, spare, played_latency)
        self.blocks += 1
        try:
            self.mic.put_nowait(block)
        except queue.Full:
            self.overflows += 1


class NativeStderrFilter:
    """Hides the diagnostics that ALSA and PortAudio print straight to file descriptor 2
    (``ALSA lib ...``, ``Expression '...' failed in 'src/hostapi/...'``) while letting everything
    else through. Linux only; a no-op elsewhere or when fd 2 cannot be redirected."""

    NOISE = ("ALSA lib ", "Expression '", "Cannot connect to server", "jack server is not")

    def __init__(self):
        self._saved = None
        self._thread = None
        self.hidden = 0

    def __enter__(self) -> NativeStderrFilter:
        if not sys.platform.startswith("linux"):
            return self
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            read_fd, write_fd = os.pipe()
            os.dup2(write_fd, 2)
            os.close(write_fd)
        except OSError:
            self._saved = None
            return self
        self._thread = threading.Thread(target=self._pump, args=(read_fd,), daemon=True)
        self._thread.start()
        return self

    def _pump(self, read_fd: int) -> None:
        pending = b""
        while chunk := os.read(read_fd, 4096):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._forward(line + b"\n")
            if b"\r" in pending:  # progress bars redraw with \r: pass them on at once
                cut = pending.rindex(b"\r") + 1
                self._forward(pending[:cut])
                pending = pending[cut:]
        if pending:
            self._forward(pending)
        os.close(read_fd)

    def _forward(self, data: bytes) -> None:
        if data.lstrip(b"\r").decode(errors="replace").startswith(self.NOISE):
            self.hidden += 1
        else:
            os.write(self._saved, data)

    def __exit__(self, *exc) -> None:
        if self._saved is None:
            return
        sys.stderr.flush()
        os.dup2(self._saved, 2)  # closes the pipe's last write end: the pump sees EOF
        self._thread.join(timeout=2)
        os.close(self._saved)
        self._saved = None
