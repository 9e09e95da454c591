"""``chat --record``: the conversation as a WAV plus a timestamped transcript.

Channel 1 (left): what the microphone heard; channel 2 (right): what the speaker played
(Moshi), placed on the same timeline; with echo cancellation, channel 3: the microphone as
cleaned for the model, on the microphone's timeline. Both files are written as the
conversation goes, at their final names (the output rule of ``moshi_mlx.outputs`` but for its
temporary): the WAV's header is kept valid as it grows and each transcript piece is written
(flushed) as it comes, so a chat killed mid-conversation leaves a playable recording missing
at most its last second, and its transcript up to the last word. Neither replaces an existing
file unless forced.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from moshi_mlx.errors import MoshiError

from .loop import FRAME, SAMPLE_RATE
from .wavio import WavWriter, create


class Transcript:
    """Text pieces with times, grouped into lines at pauses of ``pause_s`` or more. What each
    piece adds to the rendered text is handed to ``on_text`` at once (a line's start with its
    time, then its pieces, its newline when the next line starts or at ``finish``), so a
    file written from it is never more than a piece behind."""

    def __init__(self, pause_s: float = 1.0, on_text=None):
        self.pause_s = pause_s
        self.on_text = on_text
        self.lines: list[tuple[float, str]] = []
        self._last_t = -np.inf
        self._open = False  # a line was started and not ended yet

    def add(self, t: float, piece: str) -> None:
        if not piece:
            return
        if not self.lines or t - self._last_t >= self.pause_s:
            self.finish()
            self.lines.append((t, piece.lstrip()))
            self._emit(f"[{_clock(t)}] {piece.lstrip()}")
            self._open = True
        else:
            start, text = self.lines[-1]
            self.lines[-1] = (start, text + piece)
            self._emit(piece)
        self._last_t = t

    def finish(self) -> None:
        """End the current line, if any."""
        if self._open:
            self._open = False
            self._emit("\n")

    def _emit(self, text: str) -> None:
        if self.on_text is not None:
            self.on_text(text)

    def render(self) -> str:
        return "".join(_line(t, text) for t, text in self.lines)


def _line(t: float, text: str) -> str:
    return f"[{_clock(t)}] {text.strip()}\n"


def transcript_path(path: Path) -> Path:
    """The transcript beside recording ``path``: ``talk.wav`` -> ``talk.transcript.txt``
    (never the recording's own name, whatever it is)."""
    return path.with_name(f"{path.stem}.transcript.txt")


def _clock(t: float) -> str:
    minutes, seconds = divmod(max(t, 0.0), 60)
    return f"{int(minutes):02d}:{seconds:06.3f}"


SETTLE = 12  # blocks (0.96 s) held before the speaker channel's offset is fixed


def settled_latency(latencies: list[float]) -> float:
    """The stream's latency from the first callbacks' ``dac - adc`` (seconds): the median of
    their later half, since PortAudio's first reports, made while the streams start, can be
    off (measured on PulseAudio under load: 237 ms for six callbacks, then 299 ms)."""
    if not latencies:
        return 0.0
    return float(np.median(latencies[len(latencies) // 2 :]))


class Recorder:
    """Writes callback block ``i`` of the stream at sample ``i * 1920`` of the recording.

    The speaker channel is shifted later by ``offset`` samples: the stream's input plus output
    latency (a callback's ``dac - adc``, as ``settled_latency`` takes it from the first
    ``settle`` blocks, which are held until then), so that the right channel shows Moshi's
    audio when it was heard relative to when the microphone heard the user. With
    ``cleaned``, a third channel holds the cleaned microphone. Thread-safe.
    """

    def __init__(self, path: str | Path, settle: int = SETTLE, cleaned: bool = False,
                 force: bool = False, **rule):  # fmt: skip
        self.path = Path(path)
        self.transcript_path = transcript_path(self.path)
        wav = create(self.path, force, suffix=".wav", kind="the recording", **rule)
        try:
            self._text = create(self.transcript_path, force, **rule)
        except BaseException:
            wav.close()
            self.path.unlink()
            raise
        self.transcript = Transcript(on_text=self._write_text)
        self.offset: int | None = None
        self.blocks = 0
        self.settle = settle
        self._early: list[tuple] = []  # blocks held until the offset is known
        self._early_text: list[tuple[int, str]] = []
        self.cleaned = cleaned
        self._wav = WavWriter(wav, 3 if cleaned else 2, SAMPLE_RATE)
        self._pending_right = np.zeros(0, np.float32)
        self._lock = threading.Lock()
        self.closed = False

    def block(
        self,
        index: int,
        mic: np.ndarray,
        speaker: np.ndarray | None,
        latency_s: float,
        clean: np.ndarray | None = None,
    ):
        """Callback ``index``: the microphone block, the Moshi frame played in it (None for
        silence), the time from the block's capture to the frame's playing in seconds (the
        callback's ``dac - adc``) and, with ``cleaned``, the cleaned microphone block. Missing
        indices (blocks lost to a stalled compute thread) become silence."""
        with self._lock:
            if self.closed:
                return
            if self.offset is None:
                self._early.append((index, mic, speaker, latency_s, clean))
                if len(self._early) >= self.settle:
                    self._settle()
                return
            self._block(index, mic, speaker, clean)

    def _settle(self) -> None:
        latency = settled_latency([b[3] for b in self._early])
        self.offset = max(0, int(round(latency * SAMPLE_RATE)))
        self._pending_right = np.zeros(self.offset, np.float32)
        for index, mic, speaker, _, clean in self._early:
            self._block(index, mic, speaker, clean)
        for index, piece in self._early_text:
            self.transcript.add(self.time_of(index), piece)
        self._early, self._early_text = [], []

    def _block(self, index: int, mic, speaker, clean) -> None:
        silence = np.zeros(FRAME, np.float32)
        while self.blocks < index:
            self._write(silence, silence, silence)
        if index < self.blocks:
            return
        self._write(
            np.asarray(mic, np.float32),
            silence if speaker is None else speaker,
            silence if clean is None else np.asarray(clean, np.float32),
        )

    def _write(self, mic: np.ndarray, speaker: np.ndarray, clean: np.ndarray) -> None:
        right = np.concatenate([self._pending_right, np.asarray(speaker, np.float32)])
        self._pending_right = right[FRAME:]
        channels = [mic, right[:FRAME], clean] if self.cleaned else [mic, right[:FRAME]]
        with self._failing_writes():
            self._wav.write(np.stack(channels, axis=1))
        self.blocks += 1

    @contextmanager
    def _failing_writes(self):
        """A write that fails (a full disk) ends the recording with one line; what was
        written before stays, and nothing more is tried."""
        try:
            yield
        except OSError as e:
            self.closed = True
            self._close_quietly()
            raise MoshiError(
                f"cannot write the recording {self.path}: {e.strerror or e} (what was recorded "
                "before is kept)"
            ) from None

    def _close_quietly(self) -> None:
        # The header first (the recording stays playable), then the files whatever happens.
        for close in (self._wav.close, self._wav.file.close, self._text.close):
            try:
                close()
            except (OSError, ValueError):
                pass

    def time_of(self, index: int) -> float:
        """Recording time (s) at which Moshi's frame played in callback ``index`` is heard."""
        return (index * FRAME + (self.offset or 0)) / SAMPLE_RATE

    def text(self, index: int, piece: str) -> None:
        with self._lock:
            if self.closed:
                return
            if self.offset is None:
                self._early_text.append((index, piece))
            else:
                self.transcript.add(self.time_of(index), piece)

    def _write_text(self, text: str) -> None:
        with self._failing_writes():  # flushed: a killed chat keeps every word written
            self._text.write(text.encode())
            self._text.flush()

    def close(self) -> tuple[Path, Path]:
        """Write the delayed speaker audio and the last transcript line, and close both."""
        with self._lock:
            if not self.closed:
                if self.offset is None:
                    self._settle()
                tail = self._pending_right
                with self._failing_writes():
                    if len(tail):
                        columns = np.zeros((len(tail), 3 if self.cleaned else 2), np.float32)
                        columns[:, 1] = tail
                        self._wav.write(columns)
                    self._wav.close()
                    self.transcript.finish()
                    self._text.close()
                self.closed = True
        return self.path, self.transcript_path
