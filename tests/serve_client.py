"""A client of Kyutai's Moshi WebSocket protocol, behaving as Kyutai's ``moshi/client.py``:
aiohttp's WebSocket, ``sphn`` Ogg Opus both ways (one 1920-sample frame per message), the
web client's query string, kind bytes. Used by tests/test_serve.py and scripts/serve_latency.py.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode

import numpy as np

FRAME, RATE = 1920, 24000
WEB_CLIENT_QUERY = {  # what Kyutai's web client sends (its defaults)
    "text_temperature": "0.7",
    "text_topk": "25",
    "audio_temperature": "0.8",
    "audio_topk": "250",
    "pad_mult": "0",
    "repetition_penalty_context": "64",
    "repetition_penalty": "1.0",
}


@dataclass
class Reply:
    handshake: bytes | None = None
    audio: list[np.ndarray] = field(default_factory=list)  # decoded pcm per audio message
    audio_bytes: list[bytes] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    metadata: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)  # frame k sent -> answer k received
    # from the server's stats ("answered": the frame the last audio answers), exact with drops
    answered_latency_s: list[float] = field(default_factory=list)
    audio_at: list[float] = field(default_factory=list)
    closed_by_server: bool = False

    @property
    def pcm(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, np.float32)


def no_verify() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def talk(
    url: str,
    frames: list[np.ndarray],
    query: dict | None = None,
    pace_s: float = 0.08,
    extra_frames: int = 4,
    headers: dict | None = None,
    local_addr: tuple | None = None,
    timeout_s: float = 60.0,
) -> Reply:
    """Connect to ``url`` (``ws[s]://host:port/api/chat``), wait for the handshake, send
    ``frames`` (then ``extra_frames`` of silence, which push the last answers out) one every
    ``pace_s`` seconds, then silence in real time, and collect what comes back until every
    frame is answered, the server closes, or ``timeout_s``."""
    import aiohttp
    import sphn

    reply = Reply()
    writer, reader = sphn.OpusStreamWriter(RATE), sphn.OpusStreamReader(RATE)
    sent: list[float] = []
    full = url + ("?" + urlencode(query) if query else "")
    connector = aiohttp.TCPConnector(local_addr=local_addr, ssl=no_verify())
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.ws_connect(full, headers=headers or {}) as ws:
            shaken = asyncio.Event()

            async def receive():
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        break
                    kind, payload = msg.data[0], msg.data[1:]
                    if kind == 0:
                        reply.handshake = payload
                        shaken.set()
                    elif kind == 1:
                        reply.audio_at.append(time.monotonic())
                        reply.audio_bytes.append(payload)
                        reply.audio.append(np.asarray(reader.append_bytes(payload), np.float32))
                        k = len(reply.audio) - 1
                        if k < len(sent):
                            reply.latency_s.append(time.monotonic() - sent[k])
                        if len(reply.audio) >= len(frames):
                            return
                    elif kind == 2:
                        reply.text.append(payload.decode())
                    elif kind == 4:
                        meta = json.loads(payload)
                        reply.metadata.append(meta)
                        k = meta.get("answered")
                        if k is not None and k < len(sent) and reply.audio_at:
                            reply.answered_latency_s.append(reply.audio_at[-1] - sent[k])
                    elif kind == 5:
                        reply.errors.append(payload.decode())
                reply.closed_by_server = True

            async def send():
                await shaken.wait()
                silence = np.zeros(FRAME, np.float32)
                for pcm in [*frames, *[silence] * extra_frames]:
                    sent.append(time.monotonic())
                    await ws.send_bytes(b"\x01" + writer.append_pcm(pcm))
                    await asyncio.sleep(pace_s)
                while True:  # then silence in real time, as a microphone goes on
                    sent.append(time.monotonic())
                    await ws.send_bytes(b"\x01" + writer.append_pcm(silence))
                    await asyncio.sleep(0.08)

            receiver = asyncio.ensure_future(receive())
            sender = asyncio.ensure_future(send())
            try:
                await asyncio.wait_for(receiver, timeout_s)
            except asyncio.TimeoutError:
                pass
            finally:
                sender.cancel()
                receiver.cancel()
                await asyncio.gather(sender, receiver, return_exceptions=True)
    return reply
