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

The parts: ``serve_session`` (the query string's ``Settings``, one ``Conversation``),
``serve_worker`` (the compute thread), ``serve_web`` (the HTTP and WebSocket server) and
``serve_tls`` (https); this module is the command.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import math
import os
import queue
import re
import secrets
import signal
import socket
import sys
import threading
from pathlib import Path

from moshi_mlx.errors import MoshiError

from .loop import FRAME_S
from .options import (
    add_engine_arguments,
    add_model_arguments,
    add_persona_arguments,
    add_sampling_arguments,
    check_persona_args,
    model_choice,
    sampling_from_args,
)
from .serve_session import VOICE_SUFFIX
from .serve_tls import fingerprint, is_loopback_bind, tls_context
from .serve_web import Server
from .serve_worker import ComputeWorker

HELP = (
    "serve Moshi to a web page (ours, or Kyutai's/PersonaPlex's with --static) and to any "
    "client of Kyutai's WebSocket protocol"
)
DEFAULT_PORT = 8998
DEFAULT_MAX_LAG_MS = 400.0


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
    if is_loopback_bind(args.host):
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
            try:
                await asyncio.wait_for(ws.close(), 2.0)
            except (asyncio.TimeoutError, ConnectionError):
                pass  # the runner's clean-up cuts it
        await runner.cleanup()
    _say("stopped")
    return 0
