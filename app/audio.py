"""Sound devices for the live chat: device choice, the duplex stream, its queues and the lag policy.

One PortAudio duplex stream calls ``_callback`` every 80 ms from PortAudio's thread, at 24 kHz
mono when the devices can, otherwise at a rate and channel count they do support (``Format``;
``Conversion`` turns blocks into Moshi's 24 kHz mono frames and back, off the callback). The
callback only copies numpy frames: the microphone block goes into ``mic`` and the next Moshi
frame comes out of ``speaker`` (silence when there is none); both queues are bounded. All model
work happens on the compute thread, which also applies the ``LagPolicy`` to what waits.
"""

from __future__ import annotations

import math
import os
import queue
import sys
import threading
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from moshi_mlx.errors import MoshiError

from .loop import FRAME, FRAME_S, SAMPLE_RATE
from .resample import StreamResampler

LIST_HINT = "see `moshi-mlx chat --list-devices`"
# Rates tried when a device cannot do 24 kHz, after its own default rate: each gives whole
# 80 ms blocks, which resample to exactly one 1920-sample frame.
FALLBACK_RATES = (48000, 44100, 32000, 16000)


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
class Format:
    """How the duplex stream runs: its sample rate and each direction's channel count."""

    rate: int = SAMPLE_RATE
    in_channels: int = 1
    out_channels: int = 1

    @property
    def block(self) -> int:
        """Device samples per 80 ms callback."""
        return round(self.rate * FRAME_S)

    def __str__(self) -> str:
        return f"{self.rate / 1000:g} kHz, {self.in_channels} in / {self.out_channels} out"


@dataclass
class Devices:
    input: int
    output: int
    input_name: str
    output_name: str
    format: Format = field(default_factory=Format)


def choose_devices(
    sd, input_spec: str | None, output_spec: str | None, forced: Format | None = None
) -> Devices:
    """Resolve the device flags (None: the system default) and pick the stream's format: 24 kHz
    mono when both devices can, else the first rate both support (the devices' own default
    rates first, then ``FALLBACK_RATES``), each in mono or, if a device refuses mono, in
    stereo; ``forced`` (tests) if both accept it. Raises ``MoshiError`` with one line when
    there is no device or no such format."""
    found = {}
    for kind, spec in (("input", input_spec), ("output", output_spec)):
        dev = parse_device(spec)
        try:
            info = sd.query_devices(dev, kind)
        except ValueError as e:  # no or several matches for a name
            first = str(e).splitlines()[0].rstrip(":")
            raise MoshiError(f"{first} ({LIST_HINT})") from None
        except (sd.PortAudioError, OverflowError):  # OverflowError: an index past C's int
            if dev is None:
                raise MoshiError(
                    f"no {kind} device found (is a {'microphone' if kind == 'input' else 'speaker'}"
                    f" connected? {LIST_HINT})"
                ) from None
            raise MoshiError(f"there is no {kind} device {dev!r} ({LIST_HINT})") from None
        if info[f"max_{kind}_channels"] < 1:
            raise MoshiError(f"device {info['name']!r} has no {kind} channels ({LIST_HINT})")
        found[kind] = info
    if forced is not None:
        check_device(sd, found["input"]["index"], "input", forced.rate, forced.in_channels)
        check_device(sd, found["output"]["index"], "output", forced.rate, forced.out_channels)
    fmt = forced or choose_format(sd, found["input"], found["output"])
    return Devices(
        found["input"]["index"],
        found["output"]["index"],
        found["input"]["name"],
        found["output"]["name"],
        fmt,
    )


def choose_format(sd, input_info: dict, output_info: dict) -> Format:
    """The first format (see ``choose_devices``) that both devices accept."""
    rates = [SAMPLE_RATE, *(int(i["default_samplerate"]) for i in (input_info, output_info))]
    rates = [r for r in dict.fromkeys([*rates, *FALLBACK_RATES]) if (r * FRAME) % SAMPLE_RATE == 0]
    first_error = None
    for rate in rates:
        channels = []
        for kind, info in (("input", input_info), ("output", output_info)):
            for n in sorted({1, min(2, info[f"max_{kind}_channels"])}):
                try:
                    check_device(sd, info["index"], kind, rate, n)
                except MoshiError as e:
                    first_error = first_error or e
                else:
                    channels.append(n)
                    break
        if len(channels) == 2:
            return Format(rate, *channels)
    tried = ", ".join(f"{r / 1000:g}" for r in rates)
    raise MoshiError(
        f"{first_error}; no common format either (tried {tried} kHz, mono and stereo)"
    ) from None


def check_device(
    sd, device: int | str, kind: str, samplerate: float = SAMPLE_RATE, channels: int = 1
) -> None:
    """``MoshiError`` if ``device`` cannot stream float32 at ``samplerate`` with ``channels``
    channels for ``kind``."""
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    try:
        check(device=device, channels=channels, dtype="float32", samplerate=samplerate)
    except (sd.PortAudioError, ValueError) as e:
        name = sd.query_devices(device)["name"]
        rate = f"{samplerate / 1000:g} kHz"
        layout = {1: "mono", 2: "stereo"}.get(channels, f"{channels}-channel")
        raise MoshiError(
            f"{kind} device {name!r} cannot {'record' if kind == 'input' else 'play'} {layout} "
            f"{rate} audio ({one_line(e)}); pick another with --{kind}-device ({LIST_HINT})"
        ) from None


class Conversion:
    """Between the stream's ``Format`` and Moshi's 24 kHz mono frames: microphone blocks are
    mixed down to mono and resampled, Moshi's frames resampled and copied to every output
    channel. ``mic`` and ``speaker`` each keep a resampler's state: call each from one thread.
    ``delay_s``: what both resamplers add between a sound and its playback (0 at 24 kHz)."""

    def __init__(self, fmt: Format):
        self.format = fmt
        self._mic = StreamResampler(fmt.rate, SAMPLE_RATE)
        self._speaker = StreamResampler(SAMPLE_RATE, fmt.rate)
        self.delay_s = self._mic.delay_s + self._speaker.delay_s

    def mic(self, block: np.ndarray) -> np.ndarray:
        """``[block, in_channels]`` device samples -> ``[1920]`` float32 at 24 kHz."""
        mono = block[:, 0] if block.shape[1] == 1 else block.mean(axis=1, dtype=np.float32)
        return self._mic(mono)

    def speaker(self, pcm: np.ndarray) -> np.ndarray:
        """``[1920]`` float32 at 24 kHz -> ``[block, out_channels]`` device samples."""
        y = self._speaker(pcm)
        return np.repeat(y[:, None], self.format.out_channels, axis=1)


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

    def decide(self, mic_waiting: int, speaker_waiting: int, spare: int, in_flight: int = 0) -> str:
        """``mic_waiting``, ``speaker_waiting``: queue depths now; ``spare``: Moshi frames left
        in the speaker queue just after this frame's callback took one (-1: it found none);
        ``in_flight``: frames inside the engine whose answers have not come back (the
        pipelined engine's one), which count towards the hard bound like waiting frames."""
        if mic_waiting + speaker_waiting + in_flight > self.max_waiting:
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
    """One callback's worth: what the microphone heard and what the speaker was given.

    The callback fills it with the device's samples; ``echo.MicStage`` then sets ``raw`` (the
    microphone as a 24 kHz mono frame) and ``pcm`` (what the model gets: ``raw`` cleaned of
    Moshi's echo, or ``raw`` itself without echo cancellation).
    """

    index: int  # callback number since the stream started
    pcm: np.ndarray  # [block, in_channels] device samples, then [1920] float32 for the model
    adc: float  # stream time the block's first sample was captured (s)
    dac: float  # stream time the first sample given to the speaker in this callback plays (s)
    played: int  # index of the Moshi frame played in this callback, -1 for silence
    spare: int  # Moshi frames still queued after this callback took one (-1: none to take)
    played_latency: float  # dac - capture time of the mic frame it was computed from (s)
    far: np.ndarray | None  # the played Moshi frame at 24 kHz (None: silence)
    roundtrip: float  # dac - adc plus the conversion delays: when the mic hears ``far`` (s)
    raw: np.ndarray | None = None  # [1920] float32 microphone at 24 kHz


@dataclass
class MoshiFrame:
    """A computed frame on its way to the speaker."""

    step: int
    adc: float  # capture time of the microphone frame it answers
    pcm: np.ndarray  # [1920] float32 at 24 kHz
    out: np.ndarray  # the same as device samples, [block, out_channels]


class DuplexAudio:
    """The duplex stream and its two bounded queues.

    ``mic``: ``MicBlock``s from the callback to the compute thread; ``speaker``: ``MoshiFrame``s
    from the compute thread to the callback. A full ``mic`` queue (compute thread stalled for
    seconds) loses the block (``overflows``); an empty ``speaker`` queue plays silence
    (``underruns``, counted once Moshi has started playing).
    """

    def __init__(self, sd, devices: Devices, max_waiting: int, latency: str | float = "low"):
        self.format = fmt = devices.format
        self.conversion = Conversion(fmt)
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
                samplerate=fmt.rate,
                blocksize=fmt.block,
                device=(devices.input, devices.output),
                channels=(fmt.in_channels, fmt.out_channels),
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
            played, played_latency, spare, far = -1, math.nan, -1, None
            self.underruns += self.started_playing
        else:
            outdata[:] = frame.out
            played, played_latency = frame.step, dac - frame.adc + self.conversion.delay_s
            spare, far = self.speaker.qsize(), frame.pcm
            self.started_playing = True
        roundtrip = dac - adc + self.conversion.delay_s
        block = MicBlock(
            self.blocks, indata.copy(), adc, dac, played, spare, played_latency, far, roundtrip
        )
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
    _active: NativeStderrFilter | None = None

    @classmethod
    def original_stderr(cls) -> int:
        """The file descriptor of the real stderr while a filter is active (else 2), for
        writing when the filter's thread may not get to forward it (signal handlers)."""
        active = cls._active
        return active._saved if active is not None and active._saved is not None else 2

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
        NativeStderrFilter._active = self
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
        NativeStderrFilter._active = None
        sys.stderr.flush()
        os.dup2(self._saved, 2)  # closes the pipe's last write end: the pump sees EOF
        self._thread.join(timeout=2)
        os.close(self._saved)
        self._saved = None
