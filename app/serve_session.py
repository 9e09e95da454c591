"""``moshi-mlx serve``'s conversations: what a client asks for in ``/api/chat``'s query string
(``Settings``, ``settings_from_query``, the voices of ``--voices``), and ``Conversation``, what
the event loop and the compute thread share for one client."""

from __future__ import annotations

import asyncio
import hashlib
import math
import queue
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moshi_mlx.errors import MoshiError

OUTBOX_FRAMES = 50  # answers waiting to be sent (4 s); the lag policy keeps it near empty
MAX_TEXT_PROMPT = 4000  # characters
VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
VOICE_SUFFIX = ".safetensors"


# -- what a client asks for: the query string ---------------------------------------------------


@dataclass
class Settings:
    """One conversation's settings from ``/api/chat``'s query string."""

    sampling: object  # moshi_mlx.Sampling
    text_prompt: str | None = None
    voice: Path | None = None  # a voice prompt inside --voices
    ignored: dict = field(default_factory=dict)  # accepted but without effect here
    pcm16: bool = False  # our page's framing: kind 1 carries 16-bit PCM instead of Ogg Opus


# query key -> (Sampling field, type, lowest, highest)
SAMPLING_KEYS = {
    "text_temperature": ("temp_text", float, 0.0, 100.0),
    "text_topk": ("top_k_text", int, 0, 1 << 20),
    "audio_temperature": ("temp", float, 0.0, 100.0),
    "audio_topk": ("top_k", int, 0, 1 << 20),
}
SEED_KEYS = ("text_seed", "audio_seed")
ACCEPTED_KEYS = ("pad_mult", "repetition_penalty_context", "repetition_penalty")
# Kyutai's Ogg Opus (the default), or our page's raw 16-bit little-endian PCM at 24 kHz mono:
# no codec to ship in the page, every browser plays it, 48 kB/s each way on a local network.
AUDIO_FORMATS = ("ogg_opus", "pcm_s16le")
# Other keys of Kyutai's and PersonaPlex's pages, accepted and ignored.
OTHER_KEYS = ("worker_auth_id", "email", "image_url", "image_resolution", "token")


def _number(key: str, text: str, kind, lo, hi):
    try:
        value = kind(text)
    except ValueError:
        value = math.nan
    if not lo <= value <= hi:  # NaN fails too
        what = "an integer" if kind is int else "a number"
        raise MoshiError(f"{key} must be {what} from {lo:g} to {hi:g}, got {text[:40]!r}")
    return value


def settings_from_query(query, base, voices: Path | None) -> Settings:
    """The conversation's ``Settings`` from ``query`` (a mapping of the query string) over the
    server's own sampling ``base``. Sampling keys are honoured; ``text_seed`` and
    ``audio_seed`` seed the one random stream (the same seed given once, or twice the same,
    is ``--seed``'s; two different seeds are mixed into one); ``pad_mult`` and the
    repetition penalties are checked and have no effect. A bad value: ``MoshiError``."""
    known = set(SAMPLING_KEYS) | set(SEED_KEYS) | set(ACCEPTED_KEYS) | set(OTHER_KEYS)
    known |= {"text_prompt", "voice_prompt", "audio_format"}
    unknown = sorted(k for k in query if k not in known)
    if unknown:
        raise MoshiError(f"unknown query parameter {unknown[0][:40]!r}")
    changes = {}
    for key, (name, kind, lo, hi) in SAMPLING_KEYS.items():
        if key in query:
            changes[name] = _number(key, query[key], kind, lo, hi)
    seeds = [_number(k, query[k], int, 0, 2**63 - 1) for k in SEED_KEYS if k in query]
    if seeds:
        changes["seed"] = seeds[0] if len(set(seeds)) == 1 else _mix(seeds)
    ignored = {}
    for key in ACCEPTED_KEYS:
        if key in query:
            ignored[key] = _number(key, query[key], float, -1e6, 1e6)
    text_prompt = query.get("text_prompt")
    if text_prompt is not None:
        if len(text_prompt) > MAX_TEXT_PROMPT:
            raise MoshiError(f"text_prompt is longer than {MAX_TEXT_PROMPT} characters")
        text_prompt = text_prompt.strip() or None
    voice = None
    if query.get("voice_prompt"):
        voice = voice_path(voices, query["voice_prompt"])
    audio_format = query.get("audio_format", "ogg_opus")
    if audio_format not in AUDIO_FORMATS:
        raise MoshiError(f"audio_format must be one of {', '.join(AUDIO_FORMATS)}")
    pcm16 = audio_format == "pcm_s16le"
    return Settings(base.replace(**changes), text_prompt, voice, ignored, pcm16)


def _mix(seeds: list[int]) -> int:
    digest = hashlib.sha256(repr(seeds).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def voice_path(voices: Path | None, name: str) -> Path:
    """The voice prompt ``name`` (``NAME`` or ``NAME.safetensors``) of the folder ``voices``:
    a plain name of a file directly inside it, never a path."""
    if voices is None:
        raise MoshiError("voice_prompt: this server has no voices (start it with --voices DIR)")
    stem = name[: -len(VOICE_SUFFIX)] if name.endswith(VOICE_SUFFIX) else name
    if not VOICE_NAME.fullmatch(stem) or stem.startswith("."):
        raise MoshiError(f"voice_prompt must be the name of a voice, got {name[:70]!r}")
    path = voices / (stem + VOICE_SUFFIX)
    if not path.is_file() or path.resolve().parent != voices.resolve():
        raise MoshiError(f"voice_prompt: no voice named {stem!r} (see /api/voices)")
    return path


def voice_names(voices: Path | None) -> list[str]:
    if voices is None:
        return []
    names = (p.name[: -len(VOICE_SUFFIX)] for p in voices.iterdir()
             if p.name.endswith(VOICE_SUFFIX) and p.is_file())  # fmt: skip
    return sorted(n for n in names if VOICE_NAME.fullmatch(n))


# -- one conversation, between the event loop and the compute thread --------------------------


@dataclass
class MicFrame:
    index: int  # frame number in the client's audio
    pcm: np.ndarray  # [1920] float32
    received: float  # time.monotonic() when its last sample arrived


class Conversation:
    """What the event loop and the compute thread share for one client. The event loop puts
    decoded microphone frames in ``mic`` (bounded: the oldest is dropped when full) and
    reads answers from ``outbox``; the compute thread reads ``mic`` and puts answers with
    ``answer`` (which crosses to the event loop)."""

    def __init__(self, number: int, settings: Settings, loop, max_waiting: int):
        self.number = number
        self.settings = settings
        self.loop = loop
        self.mic: queue.Queue[MicFrame] = queue.Queue(maxsize=max_waiting + 2)
        self.outbox: asyncio.Queue = asyncio.Queue(maxsize=OUTBOX_FRAMES)
        self.ended = threading.Event()  # the client is gone, or the session is over
        self.started = loop.create_future()  # set by the compute thread: None or an error
        self.done = loop.create_future()  # set when the compute thread is through with it
        self.frames_in = 0
        self.dropped_mic = 0  # skipped by the lag policy (compute thread)
        self.lost_mic = 0  # pushed out of a full queue (event loop)
        self.dropped_out = 0  # answers the client was too slow to take
        self.latency_s: list[float] = []  # frame received -> its answer sent (last few)
        self.compute_s: list[float] = []

    def put_mic(self, frame: MicFrame) -> None:
        while True:
            try:
                self.mic.put_nowait(frame)
                return
            except queue.Full:
                try:
                    self.mic.get_nowait()
                    self.lost_mic += 1
                except queue.Empty:
                    pass

    def waiting_out(self) -> int:
        return self.outbox.qsize()

    def answer(self, item) -> None:
        """From the compute thread: hand an answer (or None, the end) to the event loop."""
        self.loop.call_soon_threadsafe(self._put, item)

    def _put(self, item) -> None:
        try:
            self.outbox.put_nowait(item)
        except asyncio.QueueFull:
            self.dropped_out += 1

    def resolve(self, fut, value) -> None:
        def set_value():
            if not fut.done():
                fut.set_result(value)

        self.loop.call_soon_threadsafe(set_value)

    def dropped(self) -> int:
        return self.dropped_mic + self.lost_mic + self.dropped_out

    def stats(self) -> dict:
        latency = self.latency_s[-25:]
        compute = self.compute_s[-25:]
        return {
            "frames": self.frames_in,
            "dropped": self.dropped(),
            "server_latency_ms": round(float(np.median(latency)) * 1000, 1) if latency else None,
            "compute_ms": round(float(np.median(compute)) * 1000, 1) if compute else None,
        }
