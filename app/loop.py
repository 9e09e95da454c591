"""The frame loop shared by ``chat`` (live audio) and ``run`` (files).

``FrameDriver`` wraps the library's duplex engine (Mimi ``encode_step`` -> ``LmGen.step`` ->
Mimi ``decode_step``, pipelined or serial) with the text streamer, the persona prompt and
timing; ``drive(driver, source, sink)`` is the one loop: it pulls input frames from
``source``, runs each through the driver and hands each answer, with the frame it answers, to
``sink``. Only the source and the sink differ between the live chat and a file.
"""

from __future__ import annotations

import time
from collections import deque
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
    """One conversation with Moshi, one 80 ms frame at a time, through a duplex engine
    (``moshi_mlx.engine``: ``pipelined`` overlaps Mimi with the LM and answers each frame one
    ``step`` later; ``serial`` answers it from the same ``step``).

    Create it, call it and ``close`` it on one thread: Mimi's arrays belong to the thread that
    runs them (the pipelined engine keeps the LM's on a thread of its own). ``slow_s`` adds a
    sleep to every step, to test how the live chat copes with compute that cannot keep up.
    """

    def __init__(self, lm, mimi, tokenizer, sampling, slow_s=0.0, prompt=None, engine=None):
        from moshi_mlx.engine import DEFAULT_ENGINE, make_engine
        from moshi_mlx.generate import LmGen
        from moshi_mlx.text import TextStreamer

        self.gen = LmGen(lm, sampling)
        self.engine = make_engine(engine or DEFAULT_ENGINE, lm, mimi, self.gen)
        self.streamer = TextStreamer(tokenizer) if tokenizer is not None else None
        self.slow_s = slow_s
        if prompt is not None and prompt.voice_codes is not None:  # crosses to the LM thread
            prompt = Prompt(np.array(prompt.voice_codes), prompt.text_tokens)
        self.prompt = prompt
        self.prompt_s = 0.0

    @property
    def in_flight(self) -> int:
        """Frames taken whose answers have not come back yet (each is 80 ms of latency)."""
        return self.engine.in_flight

    def reset(self) -> None:
        """Start the conversation over (frames in flight are dropped), with the system prompt
        when there is one (its time in ``prompt_s``); with a seed, sampling restarts from the
        same state."""
        self.engine.reset()
        if self.prompt is not None:
            t0 = time.perf_counter()
            self.engine.lm_call(_system_prompt(self.prompt))
            self.prompt_s = time.perf_counter() - t0

    def warmup(self, frames: int = 2) -> float:
        """Run ``frames`` frames of silence (compiling and allocating what the first real frames
        need), then ``reset``. Returns the seconds it took."""
        t0 = time.perf_counter()
        silence = np.zeros(FRAME, np.float32)
        for _ in range(max(frames, self.gen.cfg.max_delay + 1)):
            self.engine.push(silence)
        self.engine.flush()
        self.reset()
        return time.perf_counter() - t0

    def step(self, pcm: np.ndarray) -> list[Step]:
        """Take one frame of user audio (``[1920]`` float32 at 24 kHz); returns the frames
        answered meanwhile, oldest first (this one's with the serial engine, the previous
        one's with the pipelined engine)."""
        t0 = time.perf_counter()
        results = self.engine.push(pcm)
        if self.slow_s:
            time.sleep(self.slow_s)
        return [self._step(r, time.perf_counter() - t0) for r in results]

    def flush(self) -> list[Step]:
        """The answers still in flight (at the end of the input)."""
        t0 = time.perf_counter()
        results = self.engine.flush()
        each = (time.perf_counter() - t0) / max(len(results), 1)
        return [self._step(r, each) for r in results]

    def close(self) -> None:
        """Stop the engine (the pipelined engine's LM thread). Idempotent."""
        self.engine.close()

    def _step(self, r, compute_s: float) -> Step:
        text = ""
        if r.text_id is not None and self.streamer is not None:
            text = self.streamer.piece(r.text_id)
        return Step(
            index=r.index,
            pcm=r.pcm if r.pcm is not None else np.zeros(FRAME, np.float32),
            text_id=r.text_id,
            text=text,
            user_codes=r.user_codes,
            codes=r.codes,
            compute_s=compute_s,
        )


def _system_prompt(prompt: Prompt):
    """``LmGen.system_prompt`` for ``engine.lm_call``: the voice's codes become an MLX array
    there, on the LM's thread."""

    def apply(gen) -> None:
        import mlx.core as mx

        voice = None if prompt.voice_codes is None else mx.array(prompt.voice_codes)
        gen.system_prompt(voice_codes=voice, text_tokens=prompt.text_tokens)

    return apply


def drive(driver: FrameDriver, source: Iterable, sink: Callable[[object, Step], None]) -> int:
    """The frame loop: for each item of ``source`` (anything with a ``pcm`` attribute, or a
    bare ``[1920]`` array), run one step and call ``sink(item, step)`` for each frame answered,
    with the item it answers; at the end of the source, the frames still in flight are
    answered too. Returns the number of frames answered. The source decides when to stop,
    and what to skip when the loop falls behind."""
    waiting: deque = deque()  # items whose answers are in flight
    n = 0
    for item in source:
        waiting.append(item)
        for step in driver.step(item.pcm if hasattr(item, "pcm") else item):
            sink(waiting.popleft(), step)
            n += 1
    for step in driver.flush():
        sink(waiting.popleft(), step)
        n += 1
    return n


def split_frames(pcm: np.ndarray) -> list[np.ndarray]:
    """Mono 24 kHz audio as 1920-sample frames; the last one is padded with silence."""
    pcm = np.asarray(pcm, np.float32).reshape(-1)
    n = -(-len(pcm) // FRAME)
    padded = np.zeros(n * FRAME, np.float32)
    padded[: len(pcm)] = pcm
    return list(padded.reshape(n, FRAME))
