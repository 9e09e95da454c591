"""Echo cancellation for the live chat: WebRTC's AEC3 (``pywebrtc-audio``) on Moshi's frames.

Through loudspeakers the microphone hears Moshi too, and Moshi takes its own voice for the
user's. ``EchoCanceller`` removes it: the far end is known exactly (the 24 kHz frames the app
handed to the speaker), and PortAudio's timestamps say when each was played relative to the
microphone block of the same callback (``dac - adc``). A delay line lines the far end up with
the microphone by that latency, so AEC3's own delay estimator only has to find the acoustic
path (plus a small headroom), well inside its range of about half a second.

AEC3 also suppresses whatever the microphone hears while the far end plays, echo or not: with
headphones it would cut the user's voice for nothing. ``EchoPath`` therefore watches for an
echo, and until it hears one the model gets the microphone untouched (AEC3 keeps running, so it
is adapted the moment an echo appears).

``MicStage`` is the thread between the audio callback and the compute thread: it converts each
microphone block to 24 kHz mono and cleans it, so the model's thread never waits for it.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque

import numpy as np

from .loop import FRAME, FRAME_S, SAMPLE_RATE

# The far end is lined up this much earlier than PortAudio's latency says: AEC3 can cancel an
# echo that comes later than its reference, never one that comes earlier.
HEADROOM_S = 0.04
MAX_DELAY_S = 2.0  # longest stream latency the delay line follows
# The delay line moves only when the latency changes by more than this: PortAudio's figure
# wanders by milliseconds around a path that does not move, and every move of the far end
# makes AEC3 adapt its filter again (single-talk ERLE 23 dB instead of 55 once, under load).
RETARGET_S = 0.02
SILENT = 1e-7  # mean square below which a frame counts as silence (-70 dBFS)
FLOOR = 1e-10  # added to energies so that a perfectly clean frame gives a finite ERLE


class EchoPath:
    """Is the far end heard in the microphone, within AEC3's reach?

    A generalized cross-correlation with smoothed-coherence weighting (GCC-SCOT) between the
    microphone and the aligned far end, on 8 kHz copies (the 200 Hz-4 kHz band where voices
    and loudspeakers meet): the cross-spectrum of the last 0.5 s of microphone against the last
    1 s of far end, averaged over frames with a time constant of ``TAU_S``, each frequency
    divided by its two averaged magnitudes. At the lag of an echo every frequency adds up in
    phase; for sounds that do not come from the far end the phases cancel out. ``score`` is
    the peak over lags of 0-0.5 s, scaled so that a far end heard alone through a pure delay
    gives 1: about the share of the band the echo dominates. Measured offline (see
    docs/echo.md): 0.5-0.7 for a reverberant echo alone, 0.2-0.25 with speech 10 dB over the
    echo, under 0.11 for speech or noise that is not the far end.

    ``heard`` turns on at ``ON`` and off only after ``HOLD_S`` of playing far end with the
    score under ``OFF``: an echo path does not vanish between two sentences, and a user
    talking over Moshi lowers the score without removing the echo. Frames whose far end or
    microphone is silent (under -70 dBFS) change nothing.
    """

    DECIMATE = 3  # 24 kHz -> 8 kHz
    WINDOW = 4000  # microphone samples at 8 kHz (0.5 s)
    LAGS = 4000  # echo delays searched (0.5 s, AEC3's reach)
    TAU_S = 1.0
    ON, OFF, HOLD_S = 0.3, 0.15, 10.0
    SIZE = 1 << 14  # FFT length, at least WINDOW + LAGS + WINDOW (no circular wrap)

    def __init__(self):
        rate = SAMPLE_RATE / self.DECIMATE
        self.mic = np.zeros(self.WINDOW)
        self.far = np.zeros(self.WINDOW + self.LAGS)
        bins = np.fft.rfftfreq(self.SIZE, 1 / rate)
        self.band = (bins > 200) & (bins < 4000)
        self.cross = np.zeros(self.band.sum(), complex)
        self.mic_power = np.zeros(self.band.sum())
        self.far_power = np.zeros(self.band.sum())
        self.keep = math.exp(-FRAME_S / self.TAU_S)
        self.score = 0.0
        self.lag_s: float | None = None  # the echo's delay behind the aligned far end
        self.heard = False
        self.quiet_s = 0.0  # far end playing with no echo evidence, since the last evidence

    def update(self, mic: np.ndarray, far: np.ndarray) -> None:
        """One 24 kHz frame of microphone and of the far end as AEC3 gets it."""
        n = len(mic) // self.DECIMATE
        self.mic = np.concatenate([self.mic[n:], mic.reshape(n, -1).mean(1)])  # box filter
        self.far = np.concatenate([self.far[n:], far.reshape(n, -1).mean(1)])
        # a silent far end teaches nothing; an echo under -70 dBFS is not worth cancelling
        if min(np.mean(self.far[-self.WINDOW :] ** 2), np.mean(self.mic**2)) < SILENT:
            return
        x = np.fft.rfft(self.mic, self.SIZE)[self.band]
        y = np.fft.rfft(self.far, self.SIZE)[self.band]
        k = self.keep
        self.cross = k * self.cross + x * np.conj(y)
        self.mic_power = k * self.mic_power + np.abs(x) ** 2
        self.far_power = k * self.far_power + np.abs(y) ** 2
        weighted = np.zeros(self.SIZE // 2 + 1, complex)
        weighted[self.band] = self.cross / np.sqrt(self.mic_power * self.far_power + FLOOR)
        # circular lag j holds sum_t mic[t + j] far[t]: an echo delayed by d far-end samples
        # behind the window's end peaks at j = d - LAGS
        c = np.fft.irfft(weighted, self.SIZE) * self.SIZE / (2 * self.band.sum())
        lags = c[(np.arange(self.LAGS + 1) - self.LAGS) % self.SIZE]
        best = int(np.argmax(lags))
        self.score = float(lags[best])
        if self.score >= self.ON:
            self.heard, self.quiet_s = True, 0.0
            self.lag_s = best * self.DECIMATE / SAMPLE_RATE
        elif self.score < self.OFF:
            self.quiet_s += FRAME_S
            if self.quiet_s >= self.HOLD_S:
                self.heard, self.lag_s = False, None


class EchoCanceller:
    """AEC3 on 24 kHz mono frames, with the far end delayed by the stream's latency, applied
    only while an echo is heard (``EchoPath``).

    Call ``process`` once per callback, in order, on one thread (AEC3 is not thread-safe).
    ``echo_heard`` says whether the last frame was cleaned (else it is the microphone as it
    came, or only noise-suppressed / gain-controlled when those were asked for). After each call
    ``erle_db`` holds the echo return loss enhancement of that frame (raw microphone energy over
    cleaned energy, in dB) when an echo is heard and the frame was single talk: Moshi audible in
    the aligned far end and no speech left in the cleaned microphone (WebRTC's voice probability
    below one half); otherwise None.
    """

    def __init__(self, noise_suppression: bool = False, auto_gain: bool = False):
        from pywebrtc_audio import AudioProcessor

        self.apm = AudioProcessor(
            sample_rate=SAMPLE_RATE,
            echo_cancellation=True,
            noise_suppression=noise_suppression,
            auto_gain_control=auto_gain,
            stream_delay_ms=int(HEADROOM_S * 1000),
        )
        # without echo the user still gets the noise suppressor and AGC2 asked for
        self.plain = None
        if noise_suppression or auto_gain:
            self.plain = AudioProcessor(
                sample_rate=SAMPLE_RATE,
                echo_cancellation=False,
                noise_suppression=noise_suppression,
                auto_gain_control=auto_gain,
            )
        self.path = EchoPath()
        self.echo_heard = False
        self.far = np.zeros(int(MAX_DELAY_S * SAMPLE_RATE) + FRAME, np.float32)
        self.latencies: deque[float] = deque(maxlen=25)
        self.delay: int | None = None  # samples the far end is held back
        self.erle_db: float | None = None

    def process(self, mic: np.ndarray, far: np.ndarray | None, latency_s: float) -> np.ndarray:
        """Clean one frame.

        mic: ``[1920]`` float32, the microphone block of a callback; far: the 24 kHz frame given
        to the speaker in that same callback (None for silence); latency_s: from the capture of
        the block's first sample to the playing of the frame's first sample (``dac - adc`` plus
        any conversion delays). Returns the cleaned ``[1920]`` float32.
        """
        self.far = np.roll(self.far, -FRAME)
        self.far[-FRAME:] = 0.0 if far is None else far
        if math.isfinite(latency_s):
            self.latencies.append(latency_s)
        if self.latencies:  # the median: the first callbacks' timestamps can be off
            delay_s = float(np.median(self.latencies)) - HEADROOM_S
            delay = min(max(0, round(delay_s * SAMPLE_RATE)), len(self.far) - FRAME)
            if self.delay is None or abs(delay - self.delay) > RETARGET_S * SAMPLE_RATE:
                self.delay = delay
        end = len(self.far) - (self.delay or 0)
        reference = self.far[end - FRAME : end]
        mic = np.asarray(mic, np.float32)
        clean = self.apm.process(mic, reference)  # always, so that AEC3 stays adapted
        plain = mic if self.plain is None else self.plain.process(mic)
        was = self.echo_heard
        self.path.update(mic, reference)
        self.echo_heard = self.path.heard
        self.erle_db = None
        if not self.echo_heard:
            out = plain
        else:
            out = clean
            if np.mean(reference**2) > SILENT and self.apm.speech_probability < 0.5:
                raw, left = np.mean(mic**2), np.mean(clean**2)
                if raw > SILENT:
                    self.erle_db = float(10 * np.log10((raw + FLOOR) / (left + FLOOR)))
        if was != self.echo_heard:  # a crossfade: AEC3's output lags the microphone by 9 ms
            fade = np.linspace(0.0, 1.0, FRAME, dtype=np.float32)
            out = (1 - fade) * (clean if was else plain) + fade * out
        return out


class MicStage(threading.Thread):
    """Takes the callback's ``MicBlock``s from ``source``, converts each to a 24 kHz mono frame
    (``block.raw``), cleans it when ``canceller`` is given (``block.pcm``, else ``raw`` itself)
    and puts it on ``out`` for the compute thread.

    It keeps up easily (AEC3 takes about 1 ms per 80 ms frame here) and never holds the model:
    if it ever falls behind, frames wait in the queues, where the compute thread's lag policy
    counts them and drops the oldest as it would any late frame. ``out`` is unbounded; the
    callback's bounded queue is the one that overflows.
    """

    def __init__(self, source: queue.Queue, convert, canceller: EchoCanceller | None):
        super().__init__(name="moshi-mic", daemon=True)
        self.source, self.convert, self.canceller = source, convert, canceller
        self.out: queue.Queue = queue.Queue()
        self.halt = threading.Event()
        self.error: BaseException | None = None
        self.process_s: list[float] = []  # canceller time per frame
        self.erle_db: list[float] = []  # single-talk frames' ERLE, while an echo is heard
        self.echo_heard = False  # the last frame's
        self.heard_frames = 0  # frames cleaned because an echo was heard

    def waiting(self) -> int:
        """Microphone frames not yet taken by the compute thread (both queues)."""
        return self.source.qsize() + self.out.qsize()

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                try:
                    block = self.source.get(timeout=0.05)
                except queue.Empty:
                    continue
                block.raw = block.pcm = self.convert(block.pcm)
                if self.canceller is not None:
                    t0 = time.perf_counter()
                    block.pcm = self.canceller.process(block.raw, block.far, block.roundtrip)
                    self.process_s.append(time.perf_counter() - t0)
                    self.echo_heard = self.canceller.echo_heard
                    self.heard_frames += self.echo_heard
                    if self.canceller.erle_db is not None:
                        self.erle_db.append(self.canceller.erle_db)
                self.out.put(block)
        except BaseException as e:  # handed to the main thread, which raises it
            self.error = e
