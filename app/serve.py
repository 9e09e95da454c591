"""``moshi-mlx serve``: talk with Moshi from a web page, over Kyutai's WebSocket protocol.

``GET /`` serves our page (``app/web``, or ``--static DIR``), ``GET /api/voices`` lists the
voices of ``--voices DIR`` (``{"voices": [NAME, ...]}``), ``GET /api/status`` says whether a
conversation is running (``{"busy": true}``), and ``GET /api/chat`` upgrades to the WebSocket
of Kyutai's protocol: binary messages, one kind byte then the payload (0 handshake, 1 Ogg Opus audio
both ways at 24 kHz mono, 2 text, 3 control, 4 metadata JSON, 5 error, 6 ping).

Two threads: the event loop (main thread) speaks HTTP and WebSocket and does the Opus
decoding and encoding; one compute thread owns every MLX array (it loads the model, warms it
up, then runs ``loop.drive`` for one conversation at a time). Only numpy frames cross, through
bounded queues. The client's audio is the clock: chat's ``LagPolicy`` drops microphone frames
when compute falls behind, so latency stays bounded; drops are counted and sent as metadata.

Safety: 127.0.0.1 by default; the WebSocket refuses an ``Origin`` other than the page's own
(and ``--allow-origin``); a non-loopback ``--host`` serves https and wants the access token
from every client that is not this machine; messages, queues, sessions and idle clients are
bounded; any misbehaving client gets an error message and is closed, the server goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import ipaddress
import json
import math
import os
import queue
import re
import secrets
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moshi_mlx.errors import MoshiError

from .audio import LagPolicy
from .loop import FRAME, FRAME_S, SAMPLE_RATE, Prompt, Step
from .options import (
    add_engine_arguments,
    add_model_arguments,
    add_persona_arguments,
    add_sampling_arguments,
    check_persona_args,
    model_choice,
    sampling_from_args,
)
from .wavio import to_int16

HELP = (
    "serve Moshi to a web page (ours, or Kyutai's/PersonaPlex's with --static) and to any "
    "client of Kyutai's WebSocket protocol"
)
DEFAULT_PORT = 8998
DEFAULT_MAX_LAG_MS = 400.0
WEB = Path(__file__).parent / "web"

# Message kinds of Kyutai's protocol.
HANDSHAKE, AUDIO, TEXT, CONTROL, METADATA, ERROR, PING = range(7)
PROTOCOL_VERSION, MODEL_VERSION = 0, 0

MAX_MESSAGE = 64 * 1024  # bytes: one Ogg page of 20-80 ms of Opus is well under 2 KiB
MAX_PCM_PER_MESSAGE = 25 * FRAME  # a message decoding to more than 2 s of audio is refused
OUTBOX_FRAMES = 50  # answers waiting to be sent (4 s); the lag policy keeps it near empty
SEND_TIMEOUT_S = 5.0  # a client that reads nothing for this long is dropped
# The kernel's send buffer of a conversation's socket (Linux doubles it): without a limit it
# grows to megabytes, minutes of Ogg Opus, before a client that stopped reading is noticed.
SEND_BUFFER = 64 * 1024
START_TIMEOUT_S = 120.0  # the compute thread's set-up of a conversation (persona prompt)
STATS_EVERY_S = 1.0
MAX_TEXT_PROMPT = 4000  # characters
TOKEN_COOKIE = "moshi_mlx_token"
LOCAL_CLIENTS = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
VOICE_SUFFIX = ".safetensors"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p)
    add_persona_arguments(p)
    add_engine_arguments(p.add_argument_group("compute"))
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 "
                   "opens it to other devices, over https and with the access token)")  # fmt: skip
    g.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")  # fmt: skip
    g.add_argument("--voices", metavar="DIR",
                   help="folder of voice prompts saved by `moshi-mlx persona save` (NAME"
                   f"{VOICE_SUFFIX}); clients choose one by NAME (voice_prompt=NAME)")  # fmt: skip
    g.add_argument("--ssl-cert", metavar="PEM", help="TLS certificate: serve https")
    g.add_argument("--ssl-key", metavar="PEM", help="the certificate's private key")
    g.add_argument("--token", help="the access token other devices must give (?token=...; "
                   "default: a new random one at each start)")  # fmt: skip
    g.add_argument("--record-dir", metavar="DIR",
                   help="keep each conversation there as chat --record does (WAV: 1 the "
                   "client's microphone, 2 Moshi; and a timestamped transcript)")  # fmt: skip
    g.add_argument("--static", metavar="DIR",
                   help="serve this page build at / instead of ours (a folder with index.html, "
                   "e.g. Kyutai's web client or PersonaPlex's page)")  # fmt: skip
    g.add_argument("--allow-origin", metavar="ORIGIN", action="append", default=[],
                   help="a foreign page (scheme://host[:port]) allowed to connect to the "
                   "WebSocket (repeatable; none by default)")  # fmt: skip
    g.add_argument("--max-lag-ms", type=float, default=DEFAULT_MAX_LAG_MS,
                   help="most client audio that may wait when compute falls behind; older "
                   f"frames are dropped (default {DEFAULT_MAX_LAG_MS:g}, at least 80)")  # fmt: skip
    g.add_argument("--max-session-s", type=float, default=1800.0,
                   help="end a conversation after this long (default 1800)")  # fmt: skip
    g.add_argument("--idle-timeout-s", type=float, default=10.0,
                   help="end a conversation when the client sends no audio for this long "
                   "(default 10)")  # fmt: skip
    # For tests: one npz per conversation with the frames in and out and the codes.
    g.add_argument("--debug-dump", metavar="DIR", help=argparse.SUPPRESS)


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


class ComputeWorker(threading.Thread):
    """The one thread that touches MLX: loads the model, warms it up, then runs each
    conversation handed to ``jobs`` (None stops it)."""

    def __init__(self, args: argparse.Namespace, sampling, max_waiting: int):
        super().__init__(name="moshi-compute", daemon=True)
        self.args, self.sampling, self.max_waiting = args, sampling, max_waiting
        self.jobs: queue.Queue[Conversation | None] = queue.Queue()
        self.ready = threading.Event()
        self.ended = threading.Event()
        self.error: BaseException | None = None
        self.driver = None
        self.messages: queue.Queue[str] = queue.Queue()

    def run(self) -> None:
        from moshi_mlx.engine import finish_thread

        from .options import load_model, prompt_from_args

        try:
            self.lm, self.mimi, self.tokenizer = load_model(self.args, report=self.messages.put)
            self.default_prompt = prompt_from_args(self.args, self.mimi, self.tokenizer,
                                                   report=self.messages.put)  # fmt: skip
            self._driver_for(self.sampling)
            self.messages.put(f"warm-up done ({self.args.engine} engine)")
            self.ready.set()
            while (conv := self.jobs.get()) is not None:
                self._converse(conv)
        except BaseException as e:  # handed to the main thread
            self.error = e
        finally:
            if self.driver is not None:
                self.driver.close()
            finish_thread()
            self.ended.set()

    def _driver_for(self, sampling):
        """A warm ``FrameDriver`` sampling as ``sampling`` asks (the seed aside, which is set
        per conversation): the current one, or a new one when the settings differ (their
        samplers are compiled into the generator)."""
        from .loop import FrameDriver

        key = sampling.replace(seed=None)
        if self.driver is None or self.driver_key != key:
            if self.driver is not None:
                self.driver.close()
                self.driver = None
            self.driver = FrameDriver(self.lm, self.mimi, self.tokenizer, sampling,
                                      engine=self.args.engine)  # fmt: skip
            self.driver_key = key
            self.driver.warmup()
        return self.driver

    def _prompt(self, settings: Settings) -> Prompt | None:
        from moshi_mlx import persona

        if settings.text_prompt is None and settings.voice is None:
            return self.default_prompt
        base = self.default_prompt or Prompt()
        voice, text = base.voice_codes, base.text_tokens
        if settings.voice is not None:
            voice = persona.load_voice_prompt(settings.voice, self.mimi)
        if settings.text_prompt is not None:
            text = persona.text_prompt_tokens(self.tokenizer, settings.text_prompt)
        return Prompt(None if voice is None else np.array(voice), text)

    def _converse(self, conv: Conversation) -> None:
        from .loop import drive

        recorder = dump = None
        try:
            try:
                sampling = conv.settings.sampling
                driver = self._driver_for(sampling)
                seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
                driver.engine.lm_call(lambda gen: setattr(gen, "seed", seed))
                driver.prompt = self._prompt(conv.settings)
                driver.reset()  # fresh caches, random state from the seed, persona prompt
                recorder = self._recorder(conv)
            except MoshiError as e:
                conv.resolve(conv.started, e)
                return
            conv.resolve(conv.started, None)
            dump = {k: [] for k in DUMP_KEYS} if self.args.debug_dump else None
            policy = LagPolicy(self.max_waiting)

            def source():
                while not conv.ended.is_set():
                    try:
                        frame = conv.mic.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    waiting = conv.mic.qsize()
                    decision = policy.decide(waiting, conv.waiting_out(), -1, driver.in_flight)
                    if decision == LagPolicy.DROP_MIC:
                        conv.dropped_mic += 1
                        continue
                    yield frame

            def sink(frame: MicFrame, step: Step) -> None:
                conv.compute_s.append(step.compute_s)
                del conv.compute_s[:-50]
                conv.answer((frame, step))
                if recorder is not None:
                    recorder.block(frame.index, frame.pcm, step.pcm, 0.0)
                    if step.text:
                        recorder.text(frame.index, step.text)
                if dump is not None:
                    dump["frame_index"].append(frame.index)
                    dump["pcm_in"].append(frame.pcm)
                    dump["pcm_out"].append(step.pcm)
                    dump["user_codes"].append(step.user_codes)
                    dump["codes"].append(step.codes if step.codes is not None
                                         else np.full(self.lm.cfg.dep_q, -1))  # fmt: skip
                    dump["text"].append(-1 if step.text_id is None else step.text_id)

            drive(driver, source(), sink)
        except BaseException as e:
            self.error = e
            raise
        finally:
            conv.answer(None)
            if recorder is not None:
                try:
                    wav, txt = recorder.close()
                    self.messages.put(f"recorded conversation {conv.number}: {wav} ({txt})")
                except MoshiError as e:
                    self.messages.put(str(e))
            if dump is not None:
                self._write_dump(conv, dump)
            conv.resolve(conv.done, None)

    def _recorder(self, conv: Conversation):
        from .recording import Recorder

        if not self.args.record_dir:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        folder = Path(self.args.record_dir)
        for n in range(1, 100):
            name = f"conversation-{stamp}" + ("" if n == 1 else f"-{n}")
            path = folder / f"{name}.wav"
            if not path.exists() and not (folder / f"{name}.transcript.txt").exists():
                return Recorder(path, settle=1)
        raise MoshiError(f"--record-dir {folder}: too many recordings named {stamp}")

    def _write_dump(self, conv: Conversation, dump: dict) -> None:
        from .wavio import temp_beside

        arrays = {k: np.asarray(v) for k, v in dump.items()}
        arrays["dropped"] = np.asarray(conv.dropped())
        arrays["seed"] = np.asarray(self.driver.gen.seed, np.uint64)
        path = Path(self.args.debug_dump) / f"conversation-{conv.number}.npz"
        tmp = temp_beside(path)
        with open(tmp, "xb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)


DUMP_KEYS = ("frame_index", "pcm_in", "pcm_out", "user_codes", "codes", "text")


# -- the web server ------------------------------------------------------------------------------


def _is_loopback_bind(host: str) -> bool:
    return host in LOOPBACK_HOSTS


def _host_name(host_header: str) -> str:
    """The name part of a ``Host`` header (``[::1]:8998`` -> ``::1``)."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class Server:
    def __init__(self, args: argparse.Namespace, worker: ComputeWorker, tls: bool, token: str):
        self.args, self.worker, self.tls, self.token = args, worker, tls, token
        self.scheme = "https" if tls else "http"
        self.voices = Path(args.voices) if args.voices else None
        self.page = Path(args.static) if args.static else WEB
        self.base_sampling = worker.sampling
        self.max_waiting = worker.max_waiting
        self.allowed_origins = {o.rstrip("/").lower() for o in args.allow_origin}
        self.busy: Conversation | None = None
        self.count = 0
        self.sockets: set = set()

    def app(self):
        from aiohttp import web

        app = web.Application(client_max_size=MAX_MESSAGE, middlewares=[self._guard])
        app.router.add_get("/api/chat", self.chat)
        app.router.add_get("/api/voices", self.list_voices)
        app.router.add_get("/api/status", self.status)
        app.router.add_get("/", self.index)
        app.router.add_static("/", self.page, follow_symlinks=False, show_index=False)
        return app

    # -- who may come in ---------------------------------------------------------------------

    def _token_ok(self, request) -> bool:
        given = request.query.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _local(self, request) -> bool:
        return (request.remote or "") in LOCAL_CLIENTS

    def _allowed(self, request) -> str | None:
        """Why ``request`` is refused, or None. Another device needs the token; this machine
        needs it too unless it names the server by a loopback name (a page of another site
        reaching us through DNS rebinding names its own)."""
        if self._token_ok(request):
            return None
        if not self._local(request):
            return "this server wants its access token (?token=... in the URL it printed)"
        if _host_name(request.host) not in (*LOOPBACK_HOSTS, self.args.host):
            return "unknown host name (open the URL the server printed)"
        return None

    @property
    def _guard(self):
        from aiohttp import web

        @web.middleware
        async def guard(request, handler):
            why = self._allowed(request)
            if why is not None:
                raise web.HTTPForbidden(text=f"forbidden: {why}\n")
            response = await handler(request)
            given = request.query.get("token")
            if (
                given
                and self._token_ok(request)
                and not isinstance(response, web.WebSocketResponse)
            ):
                response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="Strict",
                                    secure=self.tls)  # fmt: skip
            if isinstance(response, web.StreamResponse) and not response.prepared:
                response.headers.setdefault("X-Content-Type-Options", "nosniff")
                response.headers.setdefault("Referrer-Policy", "no-referrer")
            return response

        return guard

    def _origin_ok(self, request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:  # not a browser: Kyutai's command-line client, our tests
            return True
        origin = origin.rstrip("/").lower()
        return origin == f"{self.scheme}://{request.host}".lower() or origin in self.allowed_origins

    # -- pages ---------------------------------------------------------------------------------

    async def index(self, request):
        from aiohttp import web

        index = self.page / "index.html"
        if not index.is_file():
            raise web.HTTPNotFound(text="no index.html in the page folder\n")
        return web.FileResponse(index, headers={"Cache-Control": "no-store"})

    async def list_voices(self, request):
        from aiohttp import web

        return web.json_response({"voices": voice_names(self.voices)})

    async def status(self, request):
        from aiohttp import web

        return web.json_response({"busy": self.busy is not None})

    # -- the WebSocket -------------------------------------------------------------------------

    async def chat(self, request):
        from aiohttp import web

        if not self._origin_ok(request):
            raise web.HTTPForbidden(text="forbidden: this page's origin may not connect\n")
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:  # a fixed buffer: a client that reads nothing blocks us soon
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, autoping=True, heartbeat=None)
        await ws.prepare(request)
        self.sockets.add(ws)
        try:
            try:
                settings = settings_from_query(request.query, self.base_sampling, self.voices)
            except MoshiError as e:
                return await self._refuse(ws, str(e))
            if self.busy is not None:
                return await self._refuse(ws, "busy: another conversation is running; try later")
            self.count += 1
            loop = asyncio.get_running_loop()
            conv = self.busy = Conversation(self.count, settings, loop, self.max_waiting)
            try:
                await self._converse(ws, conv)
            finally:
                conv.ended.set()
                try:  # the compute thread ends the conversation within a frame or two
                    await asyncio.wait_for(asyncio.shield(conv.done), START_TIMEOUT_S)
                finally:
                    self.busy = None
        finally:
            self.sockets.discard(ws)
            await self._close(ws, request)
        return ws

    async def _close(self, ws, request) -> None:
        """Close the WebSocket; a client that reads nothing cannot take the close message
        either: its connection is cut."""
        transport = request.transport
        try:
            if transport is None or not transport.get_write_buffer_size():
                await asyncio.wait_for(ws.close(), SEND_TIMEOUT_S)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        # Data it never took would keep the connection open for good (a transport closes once
        # its buffer is sent).
        if transport is not None and transport.get_write_buffer_size():
            transport.abort()

    async def _refuse(self, ws, message: str):
        try:
            await self._send(ws, ERROR, message.encode())
        except (asyncio.TimeoutError, ConnectionError):
            pass  # closed below
        return ws

    async def _send(self, ws, kind: int, payload: bytes = b"") -> None:
        await asyncio.wait_for(ws.send_bytes(bytes([kind]) + payload), SEND_TIMEOUT_S)

    async def _converse(self, ws, conv: Conversation) -> None:
        import sphn

        self.worker.jobs.put(conv)
        try:
            failure = await asyncio.wait_for(asyncio.shield(conv.started), START_TIMEOUT_S)
        except asyncio.TimeoutError:
            failure = MoshiError("the conversation did not start in time")
        if failure is not None:
            await self._send(ws, ERROR, str(failure).encode())
            return
        s = conv.settings
        meta = {"sampling": s.sampling.replace(seed=None).as_dict(), "engine": self.args.engine,
                "frame_ms": FRAME_S * 1000, "max_lag_ms": self.args.max_lag_ms,
                "ignored": s.ignored, "conversation": conv.number}  # fmt: skip
        # The handshake first: clients written against Kyutai's Python server take the first
        # message for it.
        await self._send(ws, HANDSHAKE, struct.pack("<II", PROTOCOL_VERSION, MODEL_VERSION))
        await self._send(ws, METADATA, json.dumps(meta).encode())
        reader, writer = sphn.OpusStreamReader(SAMPLE_RATE), sphn.OpusStreamWriter(SAMPLE_RATE)
        tasks = [
            asyncio.ensure_future(self._receive(ws, conv, reader)),
            asyncio.ensure_future(self._answer(ws, conv, writer)),
        ]
        try:
            done, _ = await asyncio.wait(
                tasks, timeout=self.args.max_session_s, return_when=asyncio.FIRST_COMPLETED
            )
            reason = None
            for task in done:
                reason = task.result() or reason
            if not done:
                reason = f"the session reached its time limit ({self.args.max_session_s:g} s)"
            if reason and not ws.closed:
                await self._send(ws, ERROR, reason.encode())
        except (ConnectionError, asyncio.TimeoutError):
            pass  # the client vanished or stopped reading: nothing more to tell it
        finally:
            conv.ended.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _receive(self, ws, conv: Conversation, reader) -> str | None:
        """The client's messages until it leaves (None) or misbehaves (why)."""
        from aiohttp import WSMsgType

        pending = np.zeros(0, np.float32)
        last_audio = time.monotonic()
        while True:
            wait = last_audio + self.args.idle_timeout_s - time.monotonic()
            try:
                msg = await ws.receive(timeout=max(wait, 0.001))
            except asyncio.TimeoutError:
                return f"no audio for {self.args.idle_timeout_s:g} s: closing"
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return None
            if msg.type == WSMsgType.ERROR:
                return f"bad message: {msg.data}" if msg.data else None
            if msg.type != WSMsgType.BINARY:
                return "binary messages only (a kind byte, then the payload)"
            data = msg.data
            if not data:
                return "empty message"
            kind = data[0]
            if kind in (CONTROL, PING):
                continue  # defined by the protocol, without use in full duplex
            if kind != AUDIO:
                return f"unexpected message kind {kind} (clients send 1: Ogg Opus audio)"
            last_audio = time.monotonic()
            if conv.settings.pcm16:
                if len(data) % 2 == 0:
                    return "malformed audio: 16-bit samples expected"
                pcm = np.frombuffer(data, "<i2", offset=1).astype(np.float32) / 32768
            else:
                try:
                    pcm = reader.append_bytes(data[1:])
                except Exception:  # sphn raises ValueError (maybe others) on bad Ogg/Opus
                    return "malformed audio: Ogg Opus pages at 24 kHz mono expected"
            if len(pcm) > MAX_PCM_PER_MESSAGE:
                return "too much audio in one message"
            pending = np.concatenate([pending, np.asarray(pcm, np.float32).reshape(-1)])
            now = time.monotonic()
            while len(pending) >= FRAME:
                conv.put_mic(MicFrame(conv.frames_in, pending[:FRAME].copy(), now))
                conv.frames_in += 1
                pending = pending[FRAME:]

    async def _answer(self, ws, conv: Conversation, writer) -> str | None:
        """Moshi's frames as Ogg Opus and text, and the stats as metadata, until the end."""
        last_stats, last_sent = time.monotonic(), None
        while True:
            item = await conv.outbox.get()
            if item is None:
                return "the conversation ended" if not conv.ended.is_set() else None
            frame, step = item
            if conv.settings.pcm16:
                await self._send(ws, AUDIO, to_int16(step.pcm).tobytes())
            else:
                await self._send(ws, AUDIO, writer.append_pcm(step.pcm))
            if step.text:
                await self._send(ws, TEXT, step.text.encode())
            conv.latency_s.append(time.monotonic() - frame.received)
            del conv.latency_s[:-50]
            now = time.monotonic()
            stats = conv.stats()
            if now - last_stats >= STATS_EVERY_S or stats["dropped"] != last_sent:
                stats["answered"] = frame.index  # the client frame the audio just sent answers
                await self._send(ws, METADATA, json.dumps(stats).encode())
                last_stats, last_sent = now, stats["dropped"]


# -- https for other devices --------------------------------------------------------------------


def cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or (
        Path.home() / ("Library/Caches" if sys.platform == "darwin" else ".cache")
    )
    return Path(base) / "moshi-mlx" / "serve"


def self_signed_certificate() -> tuple[Path, Path]:
    """A self-signed certificate for this machine, made once (with the ``openssl`` command,
    on every Mac and Linux; EC P-256, ten years) and kept in the user's cache folder."""
    folder = cache_folder()
    cert, key = folder / "cert.pem", folder / "key.pem"
    if cert.is_file() and key.is_file():
        return cert, key
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = socket.gethostname() or "localhost"
    tmp_cert, tmp_key = folder / f".cert.{os.getpid()}.pem", folder / f".key.{os.getpid()}.pem"
    command = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
               "ec_paramgen_curve:prime256v1", "-nodes", "-days", "3650",
               "-subj", f"/CN={name}", "-keyout", str(tmp_key), "-out", str(tmp_cert)]  # fmt: skip
    try:
        r = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise MoshiError(
            "a non-loopback --host serves https and making its certificate needs the openssl "
            "command; install it, or give --ssl-cert and --ssl-key"
        ) from None
    if r.returncode != 0:
        for p in (tmp_cert, tmp_key):
            p.unlink(missing_ok=True)
        raise MoshiError(f"openssl could not make a certificate: {' '.join(r.stderr.split())}")
    os.chmod(tmp_key, 0o600)
    os.replace(tmp_key, key)
    os.replace(tmp_cert, cert)
    return cert, key


def fingerprint(cert: Path) -> str:
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def tls_context(args: argparse.Namespace) -> tuple[ssl.SSLContext | None, Path | None]:
    if (args.ssl_cert is None) != (args.ssl_key is None):
        raise MoshiError("--ssl-cert and --ssl-key go together")
    if args.ssl_cert is None and _is_loopback_bind(args.host):
        return None, None
    cert, key = (
        (Path(args.ssl_cert), Path(args.ssl_key)) if args.ssl_cert else self_signed_certificate()
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise MoshiError(f"cannot use the certificate {cert} with key {key}: {e}") from None
    return context, cert


# -- the command ----------------------------------------------------------------------------------


def _check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise MoshiError("--port must be from 0 to 65535")
    if not FRAME_S * 1000 <= args.max_lag_ms < math.inf:
        raise MoshiError(f"--max-lag-ms must be a finite number of ms, at least {FRAME_S * 1000:g}")
    for flag in ("max_session_s", "idle_timeout_s"):
        if not 0 < getattr(args, flag) < math.inf:
            raise MoshiError(f"--{flag.replace('_', '-')} must be a positive number of seconds")
    for flag in ("voices", "static"):
        folder = getattr(args, flag)
        if folder is not None and not Path(folder).is_dir():
            raise MoshiError(f"--{flag}: no such folder: {folder}")
    if args.static and not (Path(args.static) / "index.html").is_file():
        raise MoshiError(f"--static {args.static} has no index.html")
    if args.record_dir:
        Path(args.record_dir).mkdir(parents=True, exist_ok=True)
    if args.debug_dump:
        Path(args.debug_dump).mkdir(parents=True, exist_ok=True)
    if args.token is not None and not re.fullmatch(r"[A-Za-z0-9_.~-]{8,128}", args.token):
        raise MoshiError("--token must be 8 to 128 letters, digits or -._~")
    for origin in args.allow_origin:
        if not re.fullmatch(r"https?://[^/\s]+", origin.rstrip("/")):
            raise MoshiError(f"--allow-origin wants scheme://host[:port], got {origin!r}")
    try:
        ipaddress.ip_address(args.host)
    except ValueError:
        if args.host != "localhost" and not re.fullmatch(r"[A-Za-z0-9.-]+", args.host):
            raise MoshiError(f"--host: not an address or a host name: {args.host!r}") from None


def _say(message: str) -> None:
    print(f"moshi-mlx serve: {message}", file=sys.stderr, flush=True)


def _lan_address() -> str:
    """This machine's address on its network (no packet is sent), for the printed URL."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the route
            return s.getsockname()[0]
    except OSError:
        return socket.gethostname()


def main(args: argparse.Namespace) -> int:
    _check_args(args)
    sampling = sampling_from_args(args)
    model_choice(args)
    check_persona_args(args)
    context, cert = tls_context(args)
    token = args.token or secrets.token_urlsafe(16)
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            os.write(2, b"moshi-mlx serve: stopped\n")
            os._exit(130)
        stop.set()

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    max_waiting = int(args.max_lag_ms // (FRAME_S * 1000))
    worker = ComputeWorker(args, sampling, max_waiting)
    worker.start()
    while not worker.ready.wait(0.1):
        _drain(worker)
        if worker.error is not None:
            raise worker.error
        if stop.is_set():  # the model thread may be deep inside a load: leave at once
            _say("stopped before the server started")
            os._exit(130)
    _drain(worker)
    server = Server(args, worker, context is not None, token)
    try:
        code = asyncio.run(_serve(server, context, cert, token, stop))
    finally:
        worker.jobs.put(None)
        if not worker.ended.wait(30):
            os._exit(130)
        _drain(worker)
    return code


def _drain(worker: ComputeWorker) -> None:
    while True:
        try:
            _say(worker.messages.get_nowait())
        except queue.Empty:
            return


async def _serve(server: Server, context, cert, token: str, stop: threading.Event) -> int:
    from aiohttp import web

    args = server.args
    runner = web.AppRunner(server.app(), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, ssl_context=context, backlog=16)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise MoshiError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    port = site._server.sockets[0].getsockname()[1]
    scheme = server.scheme
    local = "localhost" if args.host in ("127.0.0.1", "0.0.0.0", "::", "localhost") else args.host
    if _is_loopback_bind(args.host):
        print(f"open {scheme}://{local}:{port}/ (Ctrl-C to stop)", flush=True)
    else:
        shown = _lan_address() if args.host in ("0.0.0.0", "::") else args.host
        if ":" in shown:
            shown = f"[{shown}]"
        if cert is not None:
            print(f"certificate {cert} sha256 {fingerprint(cert)}", flush=True)
        print(f"on this machine: {scheme}://localhost:{port}/", flush=True)
        print(f"open {scheme}://{shown}:{port}/?token={token} (Ctrl-C to stop)", flush=True)
    try:
        while not stop.is_set():
            await asyncio.sleep(0.1)
            _drain(server.worker)
            if server.worker.error is not None:
                raise server.worker.error
    finally:
        if server.busy is not None:
            server.busy.ended.set()
        for ws in list(server.sockets):
            await ws.close()
        await runner.cleanup()
    _say("stopped")
    return 0
