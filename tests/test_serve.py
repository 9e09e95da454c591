"""``moshi-mlx serve`` on the fixture model, through a client of Kyutai's protocol
(tests/serve_client.py: sphn + aiohttp as Kyutai's ``moshi/client.py``)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import MOSHI_MLX, moshi_mlx_cmd
from serve_client import FRAME, WEB_CLIENT_QUERY, talk

pytest.importorskip("sphn")
pytest.importorskip("aiohttp")

SEED_QUERY = {**WEB_CLIENT_QUERY, "text_seed": "7", "audio_seed": "7"}


class Served:
    """A ``moshi-mlx serve`` process started on a free port, stopped by ``stop``."""

    def __init__(self, model_dir: Path, *flags, env=None):
        cmd = [
            str(MOSHI_MLX),
            "serve",
            "--hf-path",
            str(model_dir),
            "--port",
            "0",
            *map(str, flags),
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)  # fmt: skip
        self.lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.match(r"open (https?)://([^/]+)/(\?token=(\S+))?", line)
            if m:
                self.scheme, self.netloc, self.token = m[1], m[2], m[4]
                break
        else:
            self.stop()
            pytest.fail("the server did not start")
        if not hasattr(self, "netloc"):
            self.stop()
            pytest.fail(f"the server did not start: {self.proc.stderr.read()}")
        self.port = int(self.netloc.rsplit(":", 1)[1])

    def ws(self, host: str | None = None) -> str:
        scheme = "wss" if self.scheme == "https" else "ws"
        return f"{scheme}://{host or self.netloc}/api/chat"

    def http(self, path: str = "/", host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.netloc}{path}"

    def wait_idle(self) -> None:
        """Until the last conversation is over on the server's side too."""
        import json
        import urllib.request

        def idle():
            with urllib.request.urlopen(self.http("/api/status"), timeout=5) as r:
                return not json.load(r)["busy"]

        assert wait_for(idle), "the server stays busy"

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self, sig=signal.SIGINT) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return self.proc.returncode, out, err


@pytest.fixture(scope="module")
def voices(tmp_path_factory, model_dir) -> Path:
    """A --voices folder with one voice saved by `moshi-mlx persona save`."""
    folder = tmp_path_factory.mktemp("voices")
    wav = folder.parent / "voice.wav"
    from moshi_mlx.app.wavio import write_wav

    t = np.arange(24000 * 2) / 24000
    write_wav(wav, 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2, 24000)
    r = moshi_mlx_cmd("persona", "save", wav, "-o", folder / "alice.safetensors",
                      "--hf-path", model_dir)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return folder


@pytest.fixture(scope="module")
def served(model_dir, voices, tmp_path_factory):
    dump = tmp_path_factory.mktemp("dump")
    s = Served(model_dir, "--voices", voices, "--debug-dump", dump, "--max-lag-ms", "20000",
               "--allow-origin", "http://friend.example:3000", "--idle-timeout-s", 4)  # fmt: skip
    s.dump = dump
    yield s
    s.stop()


def speech(seconds: float, seed: int = 0) -> list[np.ndarray]:
    """Voice-like test audio: a gliding tone with a syllable rhythm, in 1920-sample frames."""
    t = np.arange(int(seconds * 24000)) / 24000
    f = 180 + 60 * np.sin(2 * np.pi * 0.7 * t + seed)
    x = 0.3 * np.sin(2 * np.pi * np.cumsum(f) / 24000) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    n = len(x) // FRAME
    return list(x[: n * FRAME].astype(np.float32).reshape(n, FRAME))


def wait_for(condition, timeout_s: float = 30.0):
    """``condition()``'s first true value, polled (what the server does after a client left)."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def converse(url, frames, **kw):
    return asyncio.run(talk(url, frames, **kw))


@pytest.fixture
def server(served):
    """The module's server, its previous conversation over."""
    served.wait_idle()
    return served


def test_handshake_audio_and_text_come_back(server):
    frames = speech(2.0)
    reply = converse(server.ws(), frames, query=SEED_QUERY, pace_s=0.02)
    assert reply.errors == []
    assert reply.handshake == b"\x00" * 8  # Rust's form: protocol 0, model 0 (u32 LE)
    assert len(reply.audio) >= len(frames)
    assert all(len(a) == FRAME for a in reply.audio[1:])
    assert reply.audio_bytes[0].startswith(b"OggS")
    assert "".join(reply.text).strip(), "the fixture model says something"
    assert reply.metadata and reply.metadata[0]["sampling"]["temp_text"] == 0.7


def test_codes_are_those_of_run_on_the_same_audio(server, model_dir, tmp_path):
    """The server's frames are exactly what `run` computes from the audio the server decoded
    (same seed): the codes it encoded, and the text; the audio the client decodes from the
    Ogg Opus answer is the server's within Opus's loss."""
    import json

    from moshi_mlx.app.wavio import read_wav, write_wav

    def dumps():  # finished ones: a dump is written under a temporary name, then renamed
        return set(server.dump.glob("conversation-*.npz"))

    before = dumps()
    reply = converse(server.ws(), speech(2.0, seed=1), query=SEED_QUERY, pace_s=0.02)
    assert reply.errors == []
    new = wait_for(lambda: dumps() - before).pop()
    d = np.load(new)
    n_sent = len(speech(2.0))
    assert list(d["frame_index"][:n_sent]) == list(range(n_sent))  # all of the speech

    # In process, as `run` drives it: the same frames, the same engine and seed.
    import moshi_mlx
    from moshi_mlx.app.loop import FrameDriver, drive
    from moshi_mlx.sampling import Sampling

    model = moshi_mlx.load(str(model_dir))
    sampling = Sampling(temp=0.8, temp_text=0.7, top_k=250, top_k_text=25, seed=7)
    driver = FrameDriver(model.lm, model.mimi, model.tokenizer, sampling)
    driver.warmup()
    steps = []
    drive(driver, list(d["pcm_in"]), lambda _, step: steps.append(step))
    driver.close()
    codes = np.stack([s.codes if s.codes is not None else np.full(d["codes"].shape[1], -1)
                      for s in steps])  # fmt: skip
    np.testing.assert_array_equal(codes, d["codes"])
    np.testing.assert_array_equal(
        [-1 if s.text_id is None else s.text_id for s in steps], d["text"]
    )
    np.testing.assert_array_equal(np.stack([s.pcm for s in steps]), d["pcm_out"])

    # `moshi-mlx run` on that audio (a 16-bit WAV of it) gives the same text and audio.
    wav_in, wav_out = tmp_path / "in.wav", tmp_path / "out.wav"
    write_wav(wav_in, np.concatenate(d["pcm_in"]), 24000)
    r = moshi_mlx_cmd("run", wav_in, wav_out, "--hf-path", model_dir, "--seed", 7, "--json")
    assert r.returncode == 0, r.stderr
    ran = json.loads(r.stdout)
    assert [-1 if t is None else t for t in ran["text_ids"]] == list(d["text"])
    out, _ = read_wav(wav_out)
    np.testing.assert_allclose(out[:, 0], np.concatenate(d["pcm_out"]), atol=1.5 / 32767)

    # The Ogg Opus the client got is sphn's encoding of exactly those frames; decoded, it is
    # the server's audio within Opus's loss: Opus drops DC (the fixture model's output has a
    # large offset) and codes this noise-like signal perceptually, so the waveform is compared
    # above 100 Hz, after Opus's pre-skip (312 samples at 48 kHz = 156 at 24 kHz).
    import sphn

    writer = sphn.OpusStreamWriter(24000)
    local = [writer.append_pcm(pcm) for pcm in d["pcm_out"][: len(reply.audio_bytes)]]
    assert reply.audio_bytes == local
    server_pcm, client_pcm = np.concatenate(d["pcm_out"]), reply.pcm
    n = min(len(server_pcm), len(client_pcm) - PRE_SKIP)
    a, b = above_100_hz(server_pcm[:n]), above_100_hz(client_pcm[PRE_SKIP : PRE_SKIP + n])
    snr = 10 * np.log10(np.sum(a**2) / np.sum((b - a) ** 2))
    assert snr > 6, f"Opus round trip: {snr:.1f} dB above 100 Hz"


PRE_SKIP = 156


def above_100_hz(x: np.ndarray) -> np.ndarray:
    spectrum = np.fft.rfft(x)
    spectrum[np.fft.rfftfreq(len(x), 1 / 24000) < 100] = 0
    return np.fft.irfft(spectrum, len(x))


async def exchange(url: str, messages: list, query=None, headers=None, wait_s: float = 15.0):
    """Connect, wait for the handshake, send ``messages`` (bytes, or str for a text frame),
    then collect the server's error messages until it closes (or ``wait_s``).
    Returns ``(errors, closed)``."""
    import aiohttp

    errors, closed = [], False
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, params=query, headers=headers) as ws:
            shaken = False
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                try:
                    msg = await ws.receive(timeout=deadline - time.monotonic())
                except asyncio.TimeoutError:
                    break
                if msg.type != aiohttp.WSMsgType.BINARY:
                    closed = True
                    break
                if msg.data[0] == 5:
                    errors.append(msg.data[1:].decode())
                if msg.data[0] == 0 and not shaken:
                    shaken = True
                    for m in messages:
                        await (ws.send_str(m) if isinstance(m, str) else ws.send_bytes(m))
    return errors, closed


def ogg_opus(frames) -> list[bytes]:
    import sphn

    writer = sphn.OpusStreamWriter(24000)
    return [b"\x01" + writer.append_pcm(f) for f in frames]


def test_second_client_is_told_busy_at_once(server):
    async def both():
        first = asyncio.ensure_future(
            talk(server.ws(), speech(3.0), query=SEED_QUERY, pace_s=0.08, timeout_s=30)
        )
        await asyncio.sleep(2.0)  # the first one is talking
        t0 = time.monotonic()
        second = await exchange(server.ws(), [], wait_s=10)
        waited = time.monotonic() - t0
        return await first, second, waited

    first, (errors, closed), waited = asyncio.run(both())
    assert first.errors == [] and len(first.audio) > 0
    assert closed and len(errors) == 1 and errors[0].startswith("busy")
    assert waited < 5  # not made to wait for the first conversation to end


def test_a_client_that_sends_no_audio_is_closed(server):
    t0 = time.monotonic()
    errors, closed = asyncio.run(exchange(server.ws(), [b"\x06", b"\x03\x00"], wait_s=30))
    assert closed and errors == ["no audio for 4 s: closing"]  # pings are not audio
    assert time.monotonic() - t0 < 25


def test_websocket_refuses_a_foreign_origin(server):
    import aiohttp

    port = server.port
    for origin, host in [
        ("http://evil.example", f"localhost:{port}"),
        (f"http://localhost:{port + 1}", f"localhost:{port}"),
        (f"https://localhost:{port}", f"localhost:{port}"),  # not this page's scheme
        # DNS rebinding: a foreign site whose name now points at 127.0.0.1
        (f"http://evil.example:{port}", f"evil.example:{port}"),
    ]:
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            asyncio.run(exchange(server.ws(), [], headers={"Origin": origin, "Host": host}))
        assert e.value.status == 403, origin
    # The page's own origin is welcome, and so is --allow-origin's.
    for origin in (f"http://localhost:{port}", "http://friend.example:3000"):
        server.wait_idle()
        own = {"Origin": origin, "Host": f"localhost:{port}"}
        errors, _ = asyncio.run(exchange(server.ws(), [b"\x06"], headers=own, wait_s=1))
        assert errors == []


def test_bad_clients_get_an_error_and_the_server_goes_on(server):
    """Malformed Opus, unknown kinds, text frames, oversized and empty messages, bad query
    values, a voice given as a path, a client vanishing mid-message: each gets an error
    message or a close; afterwards the server has the threads and open files it had, and
    talks as before."""
    import aiohttp

    converse(server.ws(), speech(0.5), query=SEED_QUERY, pace_s=0.02)  # all warm
    time.sleep(0.5)
    threads, fds = server.threads(), server.fds()
    good = ogg_opus(speech(0.4))
    cases = [
        ([b"\x01" + b"not an ogg page" * 10], {}, "malformed audio"),
        ([good[0], b"\x01OggS" + os.urandom(200)], {}, "malformed audio"),
        ([b"\x09hello"], {}, "unexpected message kind 9"),
        ([b"\x00"], {}, "unexpected message kind 0"),
        (["hello"], {}, "binary messages only"),
        ([b""], {}, "empty message"),
        ([b"\x01abc"], {"audio_format": "pcm_s16le"}, "16-bit samples expected"),
        ([], {"audio_format": "mp3"}, "audio_format must be one of"),
        ([b"\x01" + os.urandom(70_000)], {}, None),  # over the size limit: closed
        ([], {"text_temperature": "hot"}, "text_temperature must be a number"),
        ([], {"audio_topk": "-1"}, "audio_topk must be an integer"),
        ([], {"text_seed": "1e99"}, "text_seed must be an integer"),
        ([], {"voice_prompt": "../voices/alice"}, "voice_prompt must be the name"),
        ([], {"voice_prompt": "/etc/passwd"}, "voice_prompt must be the name"),
        ([], {"voice_prompt": "bob"}, "no voice named 'bob'"),
        ([], {"surprise": "1"}, "unknown query parameter"),
    ]
    for messages, query, expected in cases:
        server.wait_idle()
        errors, closed = asyncio.run(exchange(server.ws(), messages, query=query))
        assert closed, (messages, query)
        if expected is not None:
            assert len(errors) == 1 and expected in errors[0], (expected, errors)

    async def vanish():  # half a page, then the connection drops without a close
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(server.ws())
        await ws.receive()  # handshake
        await ws.receive()  # metadata
        await ws.send_bytes(good[0][: len(good[0]) // 2])
        ws._response.connection.transport.abort()
        await session.close()

    server.wait_idle()
    asyncio.run(vanish())
    server.wait_idle()
    reply = converse(server.ws(), speech(1.0), query={**SEED_QUERY, "voice_prompt": "alice"},
                     pace_s=0.02)  # fmt: skip
    assert reply.errors == [] and len(reply.audio) >= 12
    assert wait_for(lambda: server.threads() == threads and server.fds() == fds, 10), (
        f"threads {threads} -> {server.threads()}, open files {fds} -> {server.fds()}"
    )
    assert server.proc.poll() is None


def test_token_rule_on_a_non_loopback_bind(model_dir, tmp_path):
    """Bound to 127.0.0.2 (standing for a network address): https with a self-signed
    certificate made once in the cache folder, and the token from every client that is not
    this machine (127.0.0.2 as the client's address stands for another device)."""
    import ssl

    import aiohttp
    from serve_client import no_verify

    try:
        socket.create_server(("127.0.0.2", 0)).close()
    except OSError:
        pytest.skip("127.0.0.2 is not a loopback address here")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    s = Served(model_dir, "--host", "127.0.0.2", "--token", "my-own-token", env=env)
    try:
        assert s.scheme == "https" and s.token == "my-own-token"
        cert = tmp_path / "moshi-mlx" / "serve" / "cert.pem"
        key = cert.with_name("key.pem")
        assert (key.stat().st_mode & 0o777) == 0o600
        der = ssl.PEM_cert_to_DER_cert(cert.read_text())
        import hashlib

        digest = hashlib.sha256(der).hexdigest().upper()
        assert any(digest[:8] in line.replace(":", "") for line in s.lines)

        async def get(path, local_addr, cookies=None):
            connector = aiohttp.TCPConnector(local_addr=local_addr, ssl=no_verify())
            async with aiohttp.ClientSession(connector=connector, cookies=cookies) as session:
                async with session.get(s.http(path)) as r:
                    return r.status, {k: c.value for k, c in r.cookies.items()}

        other = ("127.0.0.2", 0)
        assert asyncio.run(get("/", other))[0] == 403
        assert asyncio.run(get("/?token=wrong-token", other))[0] == 403
        status, cookies = asyncio.run(get(f"/?token={s.token}", other))
        assert status == 200 and cookies.get("moshi_mlx_token") == s.token
        assert asyncio.run(get("/api/voices", other, cookies))[0] == 200
        assert asyncio.run(get("/", ("127.0.0.1", 0)))[0] == 200  # this machine
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            asyncio.run(talk(s.ws(), speech(0.2), local_addr=other))
        assert e.value.status == 403
        reply = asyncio.run(talk(s.ws(), speech(0.5), query={"token": s.token, **SEED_QUERY},
                                 local_addr=other, pace_s=0.02))  # fmt: skip
        assert reply.errors == [] and reply.handshake is not None
    finally:
        code, _, err = s.stop()
    assert code in (0, 130), err
    # The certificate is made once: the next start keeps it.
    from moshi_mlx.app import serve_tls

    mtime = cert.stat().st_mtime_ns
    os.environ["XDG_CACHE_HOME"], saved = str(tmp_path), os.environ.get("XDG_CACHE_HOME")
    try:
        assert serve_tls.self_signed_certificate() == (cert, key)
    finally:
        if saved is None:
            del os.environ["XDG_CACHE_HOME"]
        else:
            os.environ["XDG_CACHE_HOME"] = saved
    assert cert.stat().st_mtime_ns == mtime


def test_ctrl_c_during_a_conversation_stops_cleanly_and_keeps_the_recording(model_dir, tmp_path):
    from moshi_mlx.app.wavio import read_wav

    static = tmp_path / "kyutai-client-build"
    (static / "assets").mkdir(parents=True)
    (static / "index.html").write_text("<title>their page</title>")
    (static / "assets" / "app.js").write_text("// their code")
    (tmp_path / "secret.txt").write_text("not served")
    s = Served(model_dir, "--record-dir", tmp_path / "rec", "--static", static)
    import urllib.error
    import urllib.request

    def get(path):
        try:
            with urllib.request.urlopen(s.http(path), timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, ""

    assert get("/") == (200, "<title>their page</title>")
    assert get("/assets/app.js") == (200, "// their code")
    assert get("/../secret.txt")[0] in (403, 404)
    assert get("/%2e%2e/secret.txt")[0] in (403, 404)
    stopped = {}

    async def talk_then_stop():
        conversation = asyncio.ensure_future(
            talk(s.ws(), speech(8.0), query=SEED_QUERY, pace_s=0.08, timeout_s=60)
        )
        await asyncio.sleep(3.0)
        s.proc.send_signal(signal.SIGINT)
        return await conversation

    try:
        reply = asyncio.run(talk_then_stop())
        code = s.proc.wait(timeout=60)  # from the one Ctrl-C
    finally:
        _, _, stopped["err"] = s.stop()
    assert code in (0, 130), stopped["err"]
    assert reply.closed_by_server and len(reply.audio) > 0
    (wav,) = (tmp_path / "rec").glob("conversation-*.wav")
    x, rate = read_wav(wav)
    assert rate == 24000 and x.shape[1] == 2 and len(x) >= 10 * FRAME
    assert wav.with_name(wav.stem + ".transcript.txt").is_file()


def test_query_string_becomes_the_conversation_settings(tmp_path):
    from moshi_mlx.app.serve_session import settings_from_query, voice_names
    from moshi_mlx.errors import MoshiError
    from moshi_mlx.sampling import PRESETS

    base = PRESETS["top-k"].replace(seed=3)
    s = settings_from_query({**WEB_CLIENT_QUERY, "text_temperature": "0.5", "audio_topk": "100",
                             "text_seed": "11"}, base, None)  # fmt: skip
    assert (s.sampling.temp_text, s.sampling.top_k, s.sampling.seed) == (0.5, 100, 11)
    assert s.ignored == {"pad_mult": 0.0, "repetition_penalty_context": 64.0,
                         "repetition_penalty": 1.0}  # fmt: skip
    assert settings_from_query({}, base, None).sampling == base
    same = settings_from_query({"text_seed": "5", "audio_seed": "5"}, base, None)
    assert same.sampling.seed == 5
    mixed = [settings_from_query({"text_seed": "5", "audio_seed": a}, base, None).sampling.seed
             for a in ("6", "6", "7")]  # fmt: skip
    assert mixed[0] == mixed[1] != mixed[2] and 0 <= mixed[0] < 2**63
    for query, message in [
        ({"text_temperature": "nan"}, "text_temperature must be a number"),
        ({"text_topk": "2.5"}, "text_topk must be an integer"),
        ({"text_prompt": "x" * 4001}, "text_prompt is longer"),
        ({"voice_prompt": "alice"}, "this server has no voices"),
    ]:
        with pytest.raises(MoshiError, match=message):
            settings_from_query(query, base, None)
    (tmp_path / "alice.safetensors").write_bytes(b"")
    (tmp_path / ".hidden.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_bytes(b"")
    assert voice_names(tmp_path) == ["alice"]
    s = settings_from_query({"voice_prompt": "alice", "text_prompt": " a pirate "}, base, tmp_path)
    assert s.voice == tmp_path / "alice.safetensors" and s.text_prompt == "a pirate"


def test_a_client_that_stops_reading_is_dropped(server):
    """A client that sends audio but reads nothing (a tiny receive window, so the server's
    buffers fill within seconds with 16-bit PCM answers) is dropped; the server goes on."""
    import base64

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (f"GET /api/chat?audio_format=pcm_s16le HTTP/1.1\r\nHost: localhost:{server.port}\r\n"
         f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
         "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    )  # fmt: skip
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101")
    payload = b"\x01" + bytes(2 * FRAME)  # kind 1, 80 ms of silence
    # a masked binary frame (mask key zero: the payload goes as is)
    frame = b"\x82\xfe" + len(payload).to_bytes(2, "big") + b"\0\0\0\0" + payload
    t0 = time.monotonic()
    dropped = False
    try:
        while time.monotonic() - t0 < 60:
            sock.sendall(frame)
            time.sleep(0.08)
    except (BrokenPipeError, ConnectionResetError):
        dropped = True
    finally:
        sock.close()
    assert dropped, "the server kept a client that reads nothing for 60 s"
    server.wait_idle()
    assert server.proc.poll() is None
