"""Echo cancellation through the real app: ``moshi-mlx chat`` on the virtual sound card, in a
room (``tests/room.py``) that sends what the app plays back into its microphone, with
near-end speech at chosen times.

The chat's debug dump holds, for every frame the model computed, the raw microphone and the
frame the model got (cleaned), and what the speaker played: the figures below come from it.
``MOSHI_MLX_AUDIO_REPORT=file`` appends them as JSON lines (docs/echo.md's figures).

What these tests assert holds on any machine, however busy: the chat runs and stops cleanly,
it hears the room's echo, and the model got exactly what ``EchoCanceller`` makes of the dumped
microphone blocks, far-end frames and latencies replayed block by block (so the app runs the
canceller as ``tests/test_canceller.py`` measures it, each far-end frame with its own
callback). The quality figures (ERLE, near end kept, recovery after the jump) depend on how
well a loaded machine kept the room's timing: they are measured and reported here, and held
deterministically, with no sound card and no clock, in ``tests/test_canceller.py``.
"""

from __future__ import annotations

import subprocess
import time

import mlx.core as mx
import numpy as np
import pytest
from audio_card import Chat, locate, report
from room import Room, echo_path, synthetic_speech

import moshi_mlx
from moshi_mlx.app.echo import EchoCanceller
from moshi_mlx.app.loop import FRAME, SAMPLE_RATE
from moshi_mlx.app.wavio import write_wav

SHAPE = dict(tail_ms=200.0, drr_db=6.0, attenuation_db=10.0)
ROOM = ("--delay-ms", 150, *(x for k, v in SHAPE.items() for x in (f"--{k[:-3]}-{k[-2:]}", v)))
# Seconds into the far end (the room's clock), and samples (50 ms). AEC3 lets the near end
# through mostly in the far end's pauses, so what it keeps hangs on how the two voices'
# syllables interleave: offline, 0.48 to 0.89 correlation over 50 ms steps of NEAR_AT. At 6.9 s
# it stays within 0.72 to 0.86 100 ms either way, so the test measures the canceller.
NEAR_AT, JUMP_AT, JUMP = 6.9, 11.5, 1200
NEAR_S = 3.0
ECHO_PRESENT = 1e-6  # mean square of a frame that holds echo (-60 dBFS)


@pytest.fixture(scope="module")
def signals(tmp_path_factory):
    """The far end the app plays (``--debug-play``, and the room's clock) and the near-end
    speech the room adds, as loud as the echo of the far end (the room attenuates by 10 dB)."""
    folder = tmp_path_factory.mktemp("echo-signals")
    far = synthetic_speech(30.0, seed=3, f0=120.0, level=0.1)
    write_wav(folder / "far.wav", far, SAMPLE_RATE)
    far.astype("<f4").tofile(folder / "far.f32")
    near = synthetic_speech(NEAR_S, seed=9, f0=210.0, level=0.1 * 10 ** (-10 / 20))
    near.astype("<f4").tofile(folder / "near.f32")
    return folder, near


def converse(card, repo, folder, name, seconds, room_args, *chat_args):
    """Chat on the fixture model while the room runs; returns the dump and the summary."""
    dump = folder / f"{name}.npz"
    chat = Chat(card, "--hf-path", repo, "--dtype", "float32", "--seed", 5, "--debug-dump", dump,
                "--status-every", 1, *chat_args)  # fmt: skip
    room, log = None, ""
    try:
        chat.wait_for("speak now")
        room = Room(card, *ROOM, *room_args)
        time.sleep(seconds)
        rc = chat.interrupt()
    finally:
        chat.kill()
        if room is not None:
            log = room.stop()
    assert rc == 0, (chat.out, chat.err)
    if "--far" in room_args and ("room clock" not in log or "late" in log):  # a busy machine
        report("echo_room_missed_its_cue", {"name": name, "log": log})
    return np.load(dump), chat.summary()


def replay(d) -> np.ndarray:
    """The dumped microphone blocks, far-end frames and latencies through a fresh canceller,
    block by block as the microphone stage ran them."""
    aec = EchoCanceller()
    out = []
    for raw, s, latency in zip(d["block_pcm_raw"], d["block_played"], d["block_roundtrip"],
                               strict=True):  # fmt: skip
        out.append(aec.process(raw, None if s < 0 else d["step_pcm_out"][s], float(latency)))
    return np.stack(out)


def assert_replays(d, summary, heard: bool = True) -> None:
    """The model got what the canceller makes of the dump, and the echo was heard."""
    assert summary["echo_cancel"] == "on" and (float(summary["echo_heard_s"]) > 0) >= heard
    np.testing.assert_array_equal(replay(d), d["block_pcm_in"])


def timelines(d) -> dict[str, np.ndarray]:
    """Block timelines of the raw microphone, what the canceller made of it for the model
    (every block, also those the lag policy dropped on a busy machine) and what the speaker
    played."""
    n = int(d["block_index"].max()) + 1
    out = {k: np.zeros(n * FRAME) for k in ("raw", "model", "played")}
    for i, b in enumerate(d["block_index"]):
        out["raw"][b * FRAME : (b + 1) * FRAME] = d["block_pcm_raw"][i]
        out["model"][b * FRAME : (b + 1) * FRAME] = d["block_pcm_in"][i]
    for b, s in zip(d["block_index"], d["block_played"], strict=True):
        if s >= 0:
            out["played"][b * FRAME : (b + 1) * FRAME] = d["step_pcm_out"][s]
    return out


def frame_erle(t) -> np.ndarray:
    """ERLE of every block in dB (NaN where the raw microphone holds no echo)."""
    raw = (t["raw"].reshape(-1, FRAME) ** 2).mean(1)
    clean = (t["model"].reshape(-1, FRAME) ** 2).mean(1)
    erle = 10 * np.log10((raw + 1e-12) / (clean + 1e-12))
    return np.where(raw > ECHO_PRESENT, erle, np.nan)


def first_played(t) -> int:
    return int(np.flatnonzero(np.abs(t["played"]) > 0)[0]) // FRAME


def echo_delay(t, start: int, stop: int, reach: int = 12) -> int:
    """Samples from the speaker's timeline to the echo in the raw microphone over blocks
    ``start:stop`` (single talk), looking up to ``reach`` blocks back."""
    raw = t["raw"][start * FRAME : stop * FRAME]
    played = t["played"][(start - reach) * FRAME : stop * FRAME]
    n = 1 << int(np.ceil(np.log2(len(played) + len(raw))))
    c = np.fft.irfft(np.fft.rfft(played, n) * np.conj(np.fft.rfft(raw, n)), n)
    return reach * FRAME - int(np.argmax(c[: reach * FRAME + 1]))


def near_end(t, near: np.ndarray, key: str) -> tuple[int, float]:
    """Where the near-end speech sits in timeline ``key``, and its correlation there."""
    padded = np.concatenate([near, np.zeros(FRAME)])
    return locate(padded, t[key])


def first_codes(repo, t, d, near, at: int) -> np.ndarray:
    """First-level Mimi codes of the blocks the model computed, had it heard the near-end
    speech alone (placed at sample ``at`` of its input) with no echo at all."""
    _, mimi, _ = moshi_mlx.load(repo, dtype="float32")
    clean = np.zeros_like(t["model"])
    clean[at : at + len(near)] = near[: len(clean) - at]
    mimi.reset()
    codes = []
    for b in d["step_block"]:
        frame = mx.array(clean[b * FRAME : (b + 1) * FRAME][None, None].astype(np.float32))
        codes.append(int(np.array(mimi.encode_step(frame))[0, 0, 0]))
    return np.array(codes)


def code_match(repo, d, t, near, key) -> tuple[float, int]:
    """Share of the frames holding near-end speech whose first-level code, as the model got
    it, equals the code of the same speech without echo; and how many frames that is."""
    at, _ = near_end(t, near, key)
    reference = first_codes(repo, t, d, near, at)
    blocks = d["step_block"]
    inside = (blocks * FRAME >= at) & ((blocks + 1) * FRAME <= at + len(near))
    got = d["step_user_codes"][:, 0]
    return float(np.mean(got[inside] == reference[inside])), int(inside.sum())


def jump_block(t, delay: int, after: int) -> int | None:
    """The first block from ``after`` on whose echo the room's path explains with the delay
    ``delay + JUMP`` at least 20 dB better than with ``delay`` (the bus is sample-exact)."""
    pred = np.convolve(t["played"], echo_path(0.0, **SHAPE))[: len(t["raw"])]

    def misfit(k):
        shifted = np.concatenate([np.zeros(k), pred[: len(pred) - k]])
        return ((t["raw"] - shifted).reshape(-1, FRAME) ** 2).sum(1)

    better = np.flatnonzero((100 * misfit(delay + JUMP) < misfit(delay))[after:])
    return after + int(better[0]) if len(better) else None


def recovery_s(erle: np.ndarray, jump: int, target: float = 20.0, window: int = 5) -> float:
    """Seconds from block ``jump`` until the median ERLE over ``window`` frames first reaches
    ``target`` (``inf`` if not within 4 s)."""
    for b in range(jump, min(len(erle), jump + 50) - window + 1):
        frames = erle[b : b + window]  # all NaN where the far end fell silent
        if np.isfinite(frames).any() and np.nanmedian(frames) >= target:
            return (b + window - jump) * FRAME / SAMPLE_RATE
    return float("inf")


@pytest.fixture(scope="module")
def speech_talk(card, pytorch_repo, signals, tmp_path_factory):
    """One conversation with the canceller on and a speech-like far end: single talk, then
    double talk from ``NEAR_AT``, then the echo path's delay jumps at ``JUMP_AT`` (the room's
    clock starts when it first hears the far end, and the chat ends 4 s after the jump even
    when that is 2 s late)."""
    folder, near = signals
    d, summary = converse(card, pytorch_repo, tmp_path_factory.mktemp("echo-on"), "on",
                          JUMP_AT + 6.0, ("--near", folder / "near.f32", "--near-at", NEAR_AT,
                                          "--jump-at", JUMP_AT, "--far", folder / "far.f32"),
                          "--debug-play", folder / "far.wav")  # fmt: skip
    t = timelines(d)
    at, corr = near_end(t, near, "raw")  # under 0.5: the room's near end was broken up
    start = first_played(t) + 25  # after 2 s of convergence
    return {"d": d, "summary": summary, "t": t, "erle": frame_erle(t), "near_at": at,
            "near_corr": corr, "converged": start,
            "delay": echo_delay(t, start, at // FRAME)}  # fmt: skip


def test_echo_cancel_runs_in_the_app_as_offline_and_hears_the_rooms_echo(speech_talk):
    assert_replays(speech_talk["d"], speech_talk["summary"])


def test_echo_figures_single_talk(speech_talk):
    s = speech_talk
    single = s["erle"][s["converged"] : s["near_at"] // FRAME]
    erle = float(np.nanmedian(single)) if np.isfinite(single).any() else float("nan")
    cost = float(s["summary"]["echo_ms_median"])
    report("echo_single_talk_speech", {
        "erle_db": round(erle, 1),
        "erle_db_median_app": s["summary"]["erle_db_median"],
        "echo_heard_s": s["summary"]["echo_heard_s"],
        "echo_delay_ms": round(s["delay"] / SAMPLE_RATE * 1000, 1),
        "device_roundtrip_ms": round(float(np.median(s["d"]["block_roundtrip"])) * 1000, 1),
        "echo_ms_per_frame": cost,
    })  # fmt: skip


def test_echo_figures_double_talk(speech_talk, signals):
    s, (_, near) = speech_talk, signals
    t, at = s["t"], s["near_at"]
    win = slice(at, at + len(near))
    echo = t["raw"][win] - near  # the bus is sample-exact at 24 kHz: raw = echo + near
    near_to_echo_db = 10 * np.log10(np.sum(near**2) / np.sum(echo**2))
    lag = max(range(1200), key=lambda k: np.dot(t["model"][at + k : at + k + len(near)], near))
    cleaned = t["model"][at + lag : at + lag + len(near)]
    corr = float(np.corrcoef(cleaned, near)[0, 1])
    kept_db = 20 * np.log10(np.dot(cleaned, near) / np.dot(near, near))
    raw_db = 20 * np.log10(np.dot(t["raw"][win], near) / np.dot(near, near))
    figures = {
        "near_corr_in_raw": round(s["near_corr"], 3),
        "near_to_echo_db": round(near_to_echo_db, 1),
        "corr": round(corr, 3),
        "near_kept_db": round(kept_db - raw_db, 2),
        "canceller_delay_samples": lag,
    }
    report("echo_double_talk", figures)


def test_echo_figures_when_the_echo_path_jumps(speech_talk):
    s = speech_talk
    after = (s["near_at"] + int(NEAR_S * SAMPLE_RATE)) // FRAME
    jump = jump_block(s["t"], s["delay"], after)
    if jump is None:  # the room's clock was set too late for the jump to fall in the talk
        report("echo_jump", {"jump_ms": JUMP / SAMPLE_RATE * 1000, "seen": False})
        return
    recovery = recovery_s(s["erle"], jump)
    later = s["erle"][jump + 25 : jump + 50]  # from 2 s to 4 s after
    later = float(np.nanmedian(later)) if np.isfinite(later).any() else float("nan")
    report("echo_jump", {"jump_ms": JUMP / SAMPLE_RATE * 1000, "recovery_s": round(recovery, 2),
                         "erle_db_2_to_4_s_after": round(later, 1)})  # fmt: skip


def test_echo_cancelled_on_a_noise_like_far_end(card, pytorch_repo, tmp_path):
    """The issue's "model output, noise-like" case as a noise-like far end: a random-weight
    model's voice is noise-like, but the fixture codec decodes every frame to nearly the same
    waveform (measured and reported below, not held: AEC3 cannot place an exactly periodic
    echo in time)."""
    noise = np.random.default_rng(4).standard_normal(30 * SAMPLE_RATE) * 0.05
    write_wav(tmp_path / "noise.wav", noise.astype(np.float32), SAMPLE_RATE)
    figures = {}
    for name, args in (("noise", ("--debug-play", tmp_path / "noise.wav")), ("model", ())):
        d, summary = converse(card, pytorch_repo, tmp_path, name, 8.0, (), *args)
        # the fixture's exactly periodic voice (80 ms) puts its echo at every multiple of the
        # period: EchoPath does not hear it, as AEC3 cannot place it (3-4 dB, docs/echo.md)
        assert_replays(d, summary, heard=name == "noise")
        t = timelines(d)
        erle = frame_erle(t)[first_played(t) + 25 :]
        played = d["step_pcm_out"][-20:]
        periodic = min(np.corrcoef(played[i], played[i + 1])[0, 1] for i in range(19)) > 0.999
        figures[name] = {"erle_db": round(float(np.nanmedian(erle)), 1)
                         if np.isfinite(erle).any() else None, "periodic": bool(periodic),
                         "erle_db_median_app": summary["erle_db_median"],
                         "echo_heard_s": summary["echo_heard_s"]}  # fmt: skip
    report("echo_single_talk_noise_and_model", figures)
    assert not figures["noise"]["periodic"], figures


def test_echo_cancel_on_without_an_echo_gives_the_model_the_microphone_untouched(
    card, pytorch_repo, signals, tmp_path
):
    """The virtual card without a room, as with headphones: Moshi's far end plays, the user
    speaks into the microphone, nothing of Moshi comes back. The model gets the microphone as
    it came, every frame, and the status line says no echo is heard."""
    folder, near = signals
    chat = Chat(card, "--hf-path", pytorch_repo, "--dtype", "float32", "--seed", 5,
                "--debug-dump", tmp_path / "none.npz", "--status-every", 1,
                "--debug-play", folder / "far.wav")  # fmt: skip
    try:
        chat.wait_for("speak now")
        subprocess.run(["pacat", "--playback", "--raw", "-d", "micfeed", "--format=float32le",
                        f"--rate={SAMPLE_RATE}", "--channels=1", str(folder / "near.f32")],
                       env=card, check=True, timeout=60)  # fmt: skip
        time.sleep(1.0)
        rc = chat.interrupt()
    finally:
        chat.kill()
    assert rc == 0, (chat.out, chat.err)
    summary, d = chat.summary(), np.load(tmp_path / "none.npz")
    assert summary["echo_heard_s"] == "0.0" and summary["erle_db_median"] == "-", summary
    status = [line for line in chat.out if line.startswith("status ")]
    assert status and all("erle_db=none" in line for line in status), status
    t = timelines(d)
    np.testing.assert_array_equal(t["raw"], t["model"])
    assert np.abs(t["raw"]).max() > 0.01  # the user was heard


def test_echo_cancel_off_leaves_the_microphone_untouched_and_codes_are_compared(
    card, pytorch_repo, signals, speech_talk, tmp_path
):
    """The issue sets no threshold on the code match (the random codec's codes are fragile):
    both shares are measured and reported (over fewer frames when a busy machine broke the
    room's near end up); what must hold is that ``off`` changes nothing."""
    folder, near = signals
    # the room's clock can start a second after the room: the chat runs on 2.5 s after the near end
    d, summary = converse(card, pytorch_repo, tmp_path, "off", NEAR_AT + NEAR_S + 2.5,
                          ("--near", folder / "near.f32", "--near-at", NEAR_AT, "--far",
                           folder / "far.f32"),
                          "--debug-play", folder / "far.wav", "--echo-cancel", "off")  # fmt: skip
    assert summary["echo_cancel"] == "off" and "erle_db_median" not in summary
    t = timelines(d)
    np.testing.assert_array_equal(t["raw"], t["model"])  # off means untouched
    match_off, frames_off = code_match(pytorch_repo, d, t, near, "raw")
    match_on, frames_on = code_match(pytorch_repo, speech_talk["d"], speech_talk["t"], near,
                                     "model")  # fmt: skip
    report("echo_codes", {"first_level_code_match_on": round(match_on, 3),
                          "first_level_code_match_off": round(match_off, 3),
                          "frames_on": frames_on, "frames_off": frames_off})  # fmt: skip
