"""The frame loop shared by ``chat`` (live audio) and ``run`` (files).

``FrameDriver`` wraps the library's ``DuplexSession`` (Mimi ``encode_step`` -> ``LmGen.step`` ->
Mimi ``decode_step``) with the text streamer and timing; ``drive(driver, source, sink)`` is the
one loop: it pulls input frames from ``source``, runs each through the driver and hands the
result to ``sink``. Only the source and the sink differ between the live chat and a file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 24000
FRAME = 1920  # samples per frame: 80 ms at 24 kHz
FRAME_S = FRAME / SAMPLE_RATE


@dataclass
class Prompt:
    """PersonaPlex's system prompt (``LmGen.system_prompt``): Mimi codes of a recording of the
    voice ``[1, 8, F]`` and/or the token ids of the role's text."""

    voice_codes: object | None = None
    text_tokens: list[int] | None = None


@dataclass
class Step:
    """What one frame of compute produced."""

    index: int  # frame number since the conversation started
    pcm: np.ndarray  # Moshi's 1920 samples, float32 (silence while the delays fill)
    text_id: int | None  # text token of this frame (None while the delays fill)
    text: str  # what to display for it ("" for padding)
    user_codes: np.ndarray  # Mimi codes of the user's frame, [n_user] int
    codes: np.ndarray | None  # Moshi's audio codes decoded into ``pcm``, [dep_q] int
    compute_s: float  # wall time of the step


class FrameDriver:
    """One conversation with Moshi, one 80 ms frame at a time.

    Create it and call it on one thread: MLX work (including the arrays inside the session)
    belongs to the thread that runs it. ``slow_s`` adds a sleep to every step, to test how the
    live chat copes with compute that cannot keep up.
    """

    def __init__(self, lm, mimi, tokenizer, sampling, slow_s: float = 0.0, prompt=None):
        from moshi_mlx.generate import LmGen
        from moshi_mlx.session import DuplexSession
        from moshi_mlx.text import TextStreamer

        self.gen = LmGen(lm, sampling)
        self.session = DuplexSession(lm, mimi, self.gen)
        self.streamer = TextStreamer(tokenizer) if tokenizer is not None else None
        self.slow_s = slow_s
        self.prompt = prompt
        self.index = 0

    def reset(self) -> None:
        """Start the conversation over, with the system prompt when there is one (its time in
        ``prompt_s``); with a seed, sampling restarts from the same state."""
        self.session.reset()
        self.index = 0
        if self.prompt is not None:
            t0 = time.perf_counter()
            self.gen.system_prompt(self.prompt.voice_codes, self.prompt.text_tokens)
            self.prompt_s = time.perf_counter() - t0

    def warmup(self, frames: int = 2) -> float:
        """Run ``frames`` frames of silence (compiling and allocating what the first real frames
        need), then ``reset``. Returns the seconds it took."""
        t0 = time.perf_counter()
        silence = np.zeros(FRAME, np.float32)
        for _ in range(max(frames, self.gen.cfg.max_delay + 1)):
            self.session.step(silence)
        self.reset()
        return time.perf_counter() - t0

    def step(self, pcm: np.ndarray) -> Step:
        """Process one frame of user audio: ``[1920]`` float32 at 24 kHz."""
        t0 = time.perf_counter()
        r = self.session.step(pcm)
        if self.slow_s:
            time.sleep(self.slow_s)
        text = ""
        if r.text_id is not None and self.streamer is not None:
            text = self.streamer.piece(r.text_id)
        out = Step(
            index=self.index,
            pcm=r.pcm if r.pcm is not None else np.zeros(FRAME, np.float32),
            text_id=r.text_id,
            text=text,
            user_codes=r.user_codes,
            codes=r.codes,
            compute_s=time.perf_counter() - t0,
        )
        self.index += 1
        return out


def drive(driver: FrameDriver, source: Iterable, sink: Callable[[object, Step], None]) -> int:
    """The frame loop: for each item of ``source`` (anything with a ``pcm`` attribute, or a
    bare ``[1920]`` array), run one step and call ``sink(item, step)``. Returns the number of
    steps. The source decides when to stop, and what to skip when the loop falls behind."""
    n = 0
    for item in source:
        pcm = item.pcm if hasattr(item, "pcm") else item
        sink(item, driver.step(pcm))
        n += 1
    return n


def split_frames(pcm: np.ndarray) -> list[np.ndarray]:
    """Mono 24 kHz audio as 1920-sample frames; the last one is padded with silence."""
    pcm = np.asarray(pcm, np.float32).reshape(-1)
    n = -(-len(pcm) // FRAME)
    padded = np.zeros(n * FRAME, np.float32)
    padded[: len(pcm)] = pcm
    return list(padded.reshape(n, FRAME))
