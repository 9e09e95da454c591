"""Echo cancellation for the live chat: WebRTC's AEC3 (``pywebrtc-audio``) on Moshi's frames.

Through loudspeakers the microphone hears Moshi too, and Moshi takes its own voice for the
user's. ``EchoCanceller`` removes it: the far end is known exactly (the 24 kHz frames the app
handed to the speaker), and PortAudio's timestamps say when each was played relative to the
microphone block of the same callback (``dac - adc``). A delay line lines the far end up with
the microphone by that latency, so AEC3's own delay estimator only has to find the acoustic
path (plus a small headroom), well inside its range of about half a second.

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

from .loop import FRAME, SAMPLE_RATE

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


class EchoCanceller:
    """AEC3 on 24 kHz mono frames, with the far end delayed by the stream's latency.

    Call ``process`` once per callback, in order, on one thread (AEC3 is not thread-safe). After
    each call ``erle_db`` holds the echo return loss enhancement of that frame (raw microphone
    energy over cleaned energy, in dB) when the frame was single talk: Moshi audible in the
    aligned far end and no speech left in the cleaned microphone (WebRTC's voice probability
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
        clean = self.apm.process(mic, reference)
        self.erle_db = None
        if np.mean(reference**2) > SILENT and self.apm.speech_probability < 0.5:
            raw, left = np.mean(mic**2), np.mean(clean**2)
            if raw > SILENT:
                self.erle_db = float(10 * np.log10((raw + FLOOR) / (left + FLOOR)))
        return clean


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
        self.erle_db: list[float] = []  # single-talk frames' ERLE

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
                    if self.canceller.erle_db is not None:
                        self.erle_db.append(self.canceller.erle_db)
                self.out.put(block)
        except BaseException as e:  # handed to the main thread, which raises it
            self.error = e
