"""The echo canceller, the streaming resampler and the device format choice, without a sound
card: simulated rooms and a stand-in for sounddevice."""

from __future__ import annotations

import numpy as np
import pytest
from audio_card import report
from pywebrtc_audio import AudioProcessor
from room import CHUNK, Convolver, FarClock, echo_path, synthetic_speech

from moshi_mlx.app.audio import Conversion, Format, choose_format
from moshi_mlx.app.echo import HEADROOM_S, EchoCanceller, EchoPath
from moshi_mlx.app.loop import FRAME, SAMPLE_RATE
from moshi_mlx.app.resample import StreamResampler
from moshi_mlx.app.wavio import resample
from moshi_mlx.errors import MoshiError


def room_echo(far: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``far`` through the impulse response ``h`` (an FFT convolution: ``np.convolve`` takes
    seconds on these lengths)."""
    n = 1 << int(np.ceil(np.log2(len(far) + len(h))))
    return np.fft.irfft(np.fft.rfft(far, n) * np.fft.rfft(h, n), n)[: len(far) + len(h) - 1]


def cancel(far: np.ndarray, mic: np.ndarray, latency_s: float, **kw) -> tuple[np.ndarray, list]:
    """Run the canceller as the mic stage does: far frame ``i`` is played in callback ``i``."""
    out, erle, _ = cancel_traced(far, mic, latency_s, **kw)
    return out, erle


def cancel_traced(far, mic, latency_s, **kw) -> tuple[np.ndarray, list, np.ndarray]:
    """``cancel``, and whether an echo was heard after each frame."""
    aec = EchoCanceller(**kw)
    out, erle, heard = [], [], []
    for i in range(len(mic) // FRAME):
        s = slice(i * FRAME, (i + 1) * FRAME)
        out.append(aec.process(mic[s], far[s], latency_s))
        erle.append(aec.erle_db)
        heard.append(aec.echo_heard)
    return np.concatenate(out), erle, np.array(heard)


def aec3_alone(far: np.ndarray, mic: np.ndarray, latency_s: float) -> np.ndarray:
    """AEC3 applied to every frame, with the far end delayed as ``EchoCanceller`` does for a
    constant latency: what the canceller gave before it listened for an echo."""
    apm = AudioProcessor(sample_rate=SAMPLE_RATE, echo_cancellation=True,
                         stream_delay_ms=int(HEADROOM_S * 1000))  # fmt: skip
    delay = max(0, round((latency_s - HEADROOM_S) * SAMPLE_RATE))
    reference = np.concatenate([np.zeros(delay, np.float32), far])
    return np.concatenate([apm.process(mic[i : i + FRAME], reference[i : i + FRAME])
                           for i in range(0, len(mic) // FRAME * FRAME, FRAME)])  # fmt: skip


def frame_db(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Level of each frame of ``a`` against the same frame of ``b``, in dB."""
    ea, eb = ((x[: len(a) // FRAME * FRAME].reshape(-1, FRAME) ** 2).sum(1) for x in (a, b))
    return 10 * np.log10((ea + 1e-20) / (eb + 1e-20))


def frame_erle(echo: np.ndarray, out: np.ndarray, skip_s: float = 2.0) -> float:
    e = (echo.reshape(-1, FRAME) ** 2).mean(1)
    o = (out.reshape(-1, FRAME) ** 2).mean(1)
    keep = np.arange(len(e)) >= skip_s / 0.08
    keep &= e > 1e-6
    return float(np.median(10 * np.log10(e[keep] / (o[keep] + 1e-12))))


@pytest.mark.parametrize("roundtrip_s", [0.0, 0.3])
def test_canceller_removes_a_delayed_reverberant_echo(roundtrip_s):
    far = synthetic_speech(8.0, seed=3)
    # the stream's own latency plus a 150 ms room: 450 ms, near the edge of AEC3's own reach
    h = echo_path(150.0 + roundtrip_s * 1000)
    echo = room_echo(far, h)[: len(far)]
    out, erle = cancel(far, echo.astype(np.float32), roundtrip_s)
    assert frame_erle(echo, out) > 25
    measured = [e for e in erle[25:] if e is not None]
    assert len(measured) > 20 and np.median(measured) > 25  # the app's meter agrees


def test_canceller_needs_the_stream_latency_beyond_aec3s_reach():
    far = synthetic_speech(8.0, seed=3)
    echo = room_echo(far, echo_path(150.0 + 600.0))[: len(far)].astype(np.float32)
    told, _ = cancel(far, echo, 0.6)
    untold, _ = cancel(far, echo, float("nan"))  # no timestamps: AEC3 alone
    assert frame_erle(echo, told) > 25 > frame_erle(echo, untold) + 10


def test_canceller_holds_its_delay_line_while_the_latency_wanders_and_follows_a_jump():
    """PortAudio's latency figure wanders around a path that does not move (down 1 ms every 3
    callbacks for 11 ms, then back): the far end stays put, so AEC3 keeps its filter. Then the
    output's latency really grows by 1.4 s (as it did once on PulseAudio under load): the far
    end follows, and the echo is cancelled again."""
    far = synthetic_speech(16.0, seed=3)
    jump, late = 80, round(1.4 * SAMPLE_RATE)
    echo = room_echo(far, echo_path(450.0))[: len(far)]
    echo[jump * FRAME :] = np.concatenate([np.zeros(late), echo])[jump * FRAME : len(far)]
    echo = echo.astype(np.float32)
    aec, delays, out = EchoCanceller(), [], []
    for i in range(len(far) // FRAME):
        latency_s = 0.3 - 0.001 * ((i // 3) % 12) + (1.4 if i >= jump else 0.0)
        out.append(aec.process(echo[i * FRAME : (i + 1) * FRAME], far[i * FRAME : (i + 1) * FRAME],
                               latency_s))  # fmt: skip
        delays.append(aec.delay)
    out = np.concatenate(out)
    assert len(set(delays[:jump])) == 1
    assert frame_erle(echo[: jump * FRAME], out[: jump * FRAME]) > 40
    assert delays[-1] - delays[0] == pytest.approx(late, abs=0.012 * SAMPLE_RATE)
    assert frame_erle(echo[(jump + 38) * FRAME :], out[(jump + 38) * FRAME :]) > 25


def test_canceller_lets_the_near_end_through_without_far_end():
    near = synthetic_speech(3.0, seed=9, f0=210.0)
    out, erle = cancel(np.zeros_like(near), near, 0.1)
    np.testing.assert_array_equal(out, near[: len(out)])
    assert all(e is None for e in erle)  # no far end, no ERLE


NOISE = np.random.default_rng(0).standard_normal(20 * SAMPLE_RATE).astype(np.float32) * 1e-3


@pytest.mark.parametrize("f0, near_db", [(120.0, -10.0), (120.0, 0.0), (210.0, 0.0), (210.0, 20.0)])
def test_canceller_passes_the_microphone_untouched_while_no_echo_is_heard(f0, near_db):
    """Headphones, or the virtual card: Moshi speaks all along, the microphone hears the user
    (a voice at Moshi's own pitch, or another; quieter or louder than Moshi) and room noise,
    never Moshi. The model gets the microphone as it came, frame for frame; AEC3 alone cuts
    frames by far more than 0.5 dB (what the issue measured: 26-58 dB)."""
    far = synthetic_speech(12.0, seed=3)
    near = synthetic_speech(12.0, seed=11, f0=f0, level=0.1 * 10 ** (near_db / 20))
    mic = near + NOISE[: len(near)]
    out, erle, heard = cancel_traced(far, mic, 0.3)
    change = np.abs(frame_db(out, mic))
    before = frame_db(aec3_alone(far, mic, 0.3), mic)
    report("echo_none_heard", {"voice_f0": f0, "near_db": near_db,
                               "max_frame_change_db": float(change.max()),
                               "aec3_alone_worst_db": round(float(before.min()), 1)})  # fmt: skip
    assert not heard.any() and all(e is None for e in erle)
    assert change.max() <= 0.5 < -before.min()
    np.testing.assert_array_equal(out, mic[: len(out)])


def test_canceller_without_echo_still_applies_the_noise_suppressor_asked_for():
    far = synthetic_speech(6.0, seed=3)
    mic = synthetic_speech(6.0, seed=9, f0=210.0) + NOISE[: len(far)] * 10
    out, _, heard = cancel_traced(far, mic, 0.3, noise_suppression=True)
    ns = AudioProcessor(sample_rate=SAMPLE_RATE, echo_cancellation=False, noise_suppression=True)
    alone = np.concatenate([ns.process(mic[i : i + FRAME]) for i in range(0, len(out), FRAME)])
    assert not heard.any()
    np.testing.assert_array_equal(out, alone)


@pytest.mark.parametrize("path_ms, latency_s", [(150.0, 0.0), (450.0, 0.3), (150.0, 0.3)])
def test_canceller_engages_as_soon_as_an_echo_appears_and_is_then_aec3_itself(path_ms, latency_s):
    """Moshi speaks from the start into headphones; at 4 s the loudspeakers take over (the
    echo path: the stream's latency plus ``path_ms`` of room), while the user talks from 5 s
    to 8 s. The echo is heard within 1 s (measured: 640-960 ms), and from then on the
    model gets exactly what AEC3 alone makes, double talk included."""
    far = synthetic_speech(12.0, seed=3)
    echo = room_echo(far, echo_path(path_ms + latency_s * 1000))[: len(far)]
    echo[: 4 * SAMPLE_RATE] = 0.0
    near = np.zeros_like(far)
    near[5 * SAMPLE_RATE : 8 * SAMPLE_RATE] = synthetic_speech(3.0, seed=9, f0=210.0, level=0.03)
    mic = (echo + near + NOISE[: len(far)]).astype(np.float32)
    out, erle, heard = cancel_traced(far, mic, latency_s)
    appears = 4 * SAMPLE_RATE // FRAME
    engaged = appears + int(np.argmax(heard[appears:]))
    engage_ms = (engaged + 1 - appears) * FRAME * 1000 / SAMPLE_RATE
    report("echo_engage", {"path_ms": path_ms, "latency_s": latency_s, "engage_ms": engage_ms})
    assert not heard[:appears].any() and heard[engaged:].all()
    assert engage_ms <= 1000, engage_ms
    alone = aec3_alone(far, mic, latency_s)
    np.testing.assert_array_equal(out[(engaged + 1) * FRAME :], alone[(engaged + 1) * FRAME :])


def test_canceller_stops_cleaning_when_the_echo_goes_away():
    """Loudspeakers for 6 s, then headphones: once the far end has played for ``HOLD_S``
    without an echo, the microphone passes untouched again."""
    far = synthetic_speech(24.0, seed=3)
    echo = room_echo(far, echo_path(150.0))[: len(far)]
    echo[6 * SAMPLE_RATE :] = 0.0
    mic = (echo + NOISE[: len(far)].repeat(2)[: len(far)]).astype(np.float32)
    out, _, heard = cancel_traced(far, mic, 0.0)
    gone = 6 * SAMPLE_RATE // FRAME
    released = gone + int(np.argmin(heard[gone:]))
    assert heard[gone - 1] and not heard[released:].any()
    released_s = (released - gone) * FRAME / SAMPLE_RATE
    # the averaged spectra forget the echo over a few seconds first (measured: 15.1 s)
    assert EchoPath.HOLD_S <= released_s <= EchoPath.HOLD_S + 6, released_s
    np.testing.assert_array_equal(
        out[(released + 1) * FRAME :], mic[(released + 1) * FRAME : len(out)]
    )


@pytest.mark.parametrize("rate", [48000, 44100, 16000, 32000])
def test_stream_resampler_gives_whole_frames_and_matches_the_batch_one(rate):
    block = round(rate * 0.08)
    x = synthetic_speech(2.0, seed=1, rate=rate)[: 20 * block]
    down = StreamResampler(rate, SAMPLE_RATE)
    frames = [down(x[i : i + block]) for i in range(0, len(x), block)]
    assert all(len(f) == FRAME for f in frames)
    y = np.concatenate(frames)
    assert 0 < down.delay_s < 0.002
    late = np.concatenate([np.zeros(down.delay), x])  # the stream is late by its delay
    batch = resample(late, rate, SAMPLE_RATE, half_taps=16)[: len(y)]
    np.testing.assert_allclose(y[:-200], batch[:-200], atol=1e-5)
    up = StreamResampler(SAMPLE_RATE, rate)
    back = np.concatenate([up(f) for f in frames])
    assert len(back) == len(x)


def test_stream_resampler_passes_24_khz_through():
    x = np.arange(FRAME, dtype=np.float32)
    r = StreamResampler(SAMPLE_RATE, SAMPLE_RATE)
    assert r.delay_s == 0 and np.array_equal(r(x), x)


def test_conversion_mixes_down_and_copies_to_every_channel():
    conv = Conversion(Format(48000, 2, 2))
    t = np.arange(3840 * 10) / 48000
    tone = 0.4 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([tone, np.zeros_like(tone)], 1).astype(np.float32)  # one side only
    mono = np.concatenate([conv.mic(stereo[i : i + 3840]) for i in range(0, len(t), 3840)])
    assert len(mono) == 10 * FRAME
    assert abs(np.sqrt(np.mean(mono[FRAME:] ** 2)) - 0.2 / np.sqrt(2)) < 0.01  # the mean
    out = conv.speaker(mono[:FRAME])
    assert out.shape == (3840, 2) and np.array_equal(out[:, 0], out[:, 1])


class FakeSd:
    """sounddevice as far as ``choose_format`` asks: devices that take only some formats."""

    class PortAudioError(Exception):
        pass

    def __init__(self, inputs: set, outputs: set):
        self.ok = {"input": inputs, "output": outputs}

    def _check(self, kind, device, channels, dtype, samplerate):
        if (int(samplerate), channels) not in self.ok[kind]:
            raise self.PortAudioError("Invalid sample rate")

    def check_input_settings(self, **kw):
        self._check("input", **kw)

    def check_output_settings(self, **kw):
        self._check("output", **kw)

    def query_devices(self, device):
        return {"name": f"dev{device}"}


def info(index, rate, channels, kind):
    return {"index": index, "default_samplerate": rate, f"max_{kind}_channels": channels}


def test_format_prefers_24_khz_mono_then_the_devices_own_rate_and_channels():
    both = {(r, c) for r in (24000, 48000) for c in (1, 2)}
    sd = FakeSd(both, both)
    assert choose_format(sd, info(0, 48000, 2, "input"), info(1, 48000, 2, "output")) == Format()
    sd = FakeSd({(48000, 2)}, {(44100, 1), (48000, 1), (48000, 2)})  # a stereo-only USB mic
    fmt = choose_format(sd, info(0, 48000, 2, "input"), info(1, 44100, 2, "output"))
    assert fmt == Format(48000, 2, 1) and fmt.block == 3840
    sd = FakeSd({(44100, 1)}, {(44100, 2)})
    assert choose_format(sd, info(0, 44100, 1, "input"), info(1, 44100, 2, "output")) == Format(
        44100, 1, 2
    )


def test_format_without_a_common_rate_is_one_line():
    sd = FakeSd({(48000, 1)}, {(44100, 1)})
    with pytest.raises(MoshiError) as e:
        choose_format(sd, info(0, 48000, 1, "input"), info(1, 44100, 1, "output"))
    message = str(e.value)
    assert "\n" not in message and "cannot record mono 24 kHz" in message
    assert "tried 24, 48, 44.1, 32, 16 kHz" in message


def test_room_convolver_streams_like_a_batch_convolution():
    x = np.random.default_rng(0).standard_normal(4800)
    h = echo_path(10.0, tail_ms=20.0)
    conv = Convolver(h)
    y = np.concatenate([conv(x[i : i + 480]) for i in range(0, len(x), 480)])
    np.testing.assert_allclose(y, np.convolve(x, h)[: len(x)], atol=1e-9)


@pytest.mark.parametrize("late_s", [-0.3, 0.0, 1.7])
def test_room_far_clock_finds_the_far_ends_start_in_what_it_hears(late_s):
    """The room started ``late_s`` after the far end (before it when negative: it hears
    silence first); the clock gives the room sample of the far end's first sample."""
    far = synthetic_speech(8.0, seed=3)
    shift = round(late_s * SAMPLE_RATE)
    heard = far[shift:] if shift >= 0 else np.concatenate([np.zeros(-shift), far])
    clock = FarClock(far.astype(np.float64))
    origin = next(
        o
        for n in range(0, len(heard) - CHUNK, CHUNK)
        if (o := clock(heard[n : n + CHUNK].astype(np.float64), n)) is not None
    )
    assert origin == -shift


def test_room_far_clock_never_sets_on_another_signal():
    clock = FarClock(synthetic_speech(8.0, seed=3).astype(np.float64))
    other = synthetic_speech(4.0, seed=4).astype(np.float64)
    assert all(clock(other[n : n + CHUNK], n) is None for n in range(0, len(other), CHUNK))


def test_canceller_in_the_echo_tests_room_single_talk_double_talk_and_a_jump():
    """The conversation of ``tests/test_echo.py`` without the sound card: a speech-like far end
    through the stream's 300 ms and a 150 ms reverberant room, the user as loud as the echo
    from 6.9 s to 9.9 s, and the room's path 50 ms longer from 11.5 s. Deterministic, so the
    floors sit just under what is measured here (the live runs report theirs)."""
    far = synthetic_speech(18.0, seed=3)
    near = synthetic_speech(3.0, seed=9, f0=210.0, level=0.1 * 10 ** (-10 / 20))
    at, jump = round(6.9 * SAMPLE_RATE), round(11.5 * SAMPLE_RATE)
    echo = room_echo(far, echo_path(450.0))[: len(far)]
    echo[jump:] = room_echo(far, echo_path(500.0))[jump : len(far)]
    mic = echo + NOISE[: len(far)]
    mic[at : at + len(near)] += near
    out, _, heard = cancel_traced(far, mic.astype(np.float32), 0.3)
    assert heard[10:].all()  # heard within 0.8 s, and kept through double talk and the jump
    single = frame_erle(echo[: at // FRAME * FRAME], out[: at // FRAME * FRAME])
    lag = max(range(1200), key=lambda k: np.dot(out[at + k : at + k + len(near)], near))
    cleaned = out[at + lag : at + lag + len(near)]
    corr = float(np.corrcoef(cleaned, near)[0, 1])
    kept_db = 20 * np.log10(np.dot(cleaned, near) / np.dot(mic[at : at + len(near)], near))
    e = (echo.reshape(-1, FRAME) ** 2).mean(1)
    erle = 10 * np.log10(e / ((out.reshape(-1, FRAME) ** 2).mean(1) + 1e-12))
    erle[e <= 1e-6] = np.nan
    j = jump // FRAME
    recovered = next(b for b in range(j, len(erle) - 4) if np.nanmedian(erle[b : b + 5]) >= 20)
    recovery_s = (recovered + 5 - j) * FRAME / SAMPLE_RATE
    later = float(np.nanmedian(erle[j + 25 : j + 50]))
    figures = {"single_talk_erle_db": round(single, 1), "double_talk_corr": round(corr, 3),
               "near_kept_db": round(kept_db, 2), "jump_recovery_s": recovery_s,
               "erle_db_2_to_4_s_after_jump": round(later, 1)}  # fmt: skip
    report("echo_room_offline", figures)
    # measured: 27.9 dB (the -60 dBFS room noise bounds it), 0.603, -9.64 dB, 0.64 s, 24.6 dB
    assert single > 25 and corr > 0.55 and kept_db > -10.5, figures
    assert recovery_s <= 1.0 and later > 22, figures


def test_status_line_shows_erle_only_while_an_echo_is_heard():
    import io

    from rich.console import Console

    from moshi_mlx.app.display import PlainScreen, RichScreen

    snapshot = dict(t=12.3, frames=150, compute_ms=31.0, rtf=0.39, latency_ms=260.0, mic_queue=0,
                    speaker_queue=1, dropped=0, underruns=0, erle_db=35.0)  # fmt: skip
    for heard, rich_words, plain_words in ((False, "no echo heard", "erle_db=none"),
                                           (True, "ERLE 35 dB", "erle_db=35")):  # fmt: skip
        s = dict(snapshot, echo_heard=heard)
        screen = RichScreen(Console(file=io.StringIO(), force_terminal=True, width=80, height=30))
        screen.stats(s)
        line = screen._status_text().plain
        assert rich_words in line and ("ERLE" in line) == heard, line
        out = io.StringIO()
        plain = PlainScreen(out, every_s=0.0)
        plain.stats(s)
        plain.tick()
        assert plain_words in out.getvalue(), out.getvalue()
