"""``moshi-mlx serve``'s web server, ``Server`` (aiohttp): the page, ``/api/voices``,
``/api/status`` and ``/api/chat``, the WebSocket of Kyutai's protocol; who may come in (the
access token, loopback host names, ``Origin``), and the Opus decoding and encoding of the
event loop's side of a conversation."""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import socket
import struct
import time
from pathlib import Path

import numpy as np

from moshi_mlx.errors import MoshiError

from .loop import FRAME, FRAME_S, SAMPLE_RATE
from .serve_session import Conversation, MicFrame, settings_from_query, voice_names
from .serve_tls import LOOPBACK_HOSTS
from .serve_worker import ComputeWorker
from .wavio import to_int16

WEB = Path(__file__).parent / "web"

# Message kinds of Kyutai's protocol.
HANDSHAKE, AUDIO, TEXT, CONTROL, METADATA, ERROR, PING = range(7)
PROTOCOL_VERSION, MODEL_VERSION = 0, 0

MAX_MESSAGE = 64 * 1024  # bytes: one Ogg page of 20-80 ms of Opus is well under 2 KiB
MAX_PCM_PER_MESSAGE = 25 * FRAME  # a message decoding to more than 2 s of audio is refused
SEND_TIMEOUT_S = 5.0  # a client that reads nothing for this long is dropped
# The kernel's send buffer of a conversation's socket (Linux doubles it): without a limit it
# grows to megabytes, minutes of Ogg Opus, before a client that stopped reading is noticed.
SEND_BUFFER = 64 * 1024
START_TIMEOUT_S = 120.0  # the compute thread's set-up of a conversation (persona prompt)
STATS_EVERY_S = 1.0
TOKEN_COOKIE = "moshi_mlx_token"
LOCAL_CLIENTS = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


# -- the web server ------------------------------------------------------------------------------


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
