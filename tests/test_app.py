"""The app's parts that need no sound card: WAV in/out and resampling, the lag policy, the
recording, the screens, the shared frame loop on the converted fixture model, and
``moshi-mlx run`` end to end through the command line."""

from __future__ import annotations

import io
import json
import struct
import wave
from pathlib import Path

import numpy as np
import pytest
from conftest import moshi_mlx_cmd

import moshi_mlx
from moshi_mlx import Sampling
from moshi_mlx.app.audio import LagPolicy
from moshi_mlx.app.cli import main as cli_main
from moshi_mlx.app.display import PlainScreen, RichScreen
from moshi_mlx.app.loop import FRAME, SAMPLE_RATE, FrameDriver, drive, split_frames
from moshi_mlx.app.recording import Recorder, Transcript
from moshi_mlx.app.run import input_frames
from moshi_mlx.app.wavio import AtomicWav, WavError, WavReader, read_wav, resample, write_wav


@pytest.fixture(scope="session")
def model(model_dir):
    return moshi_mlx.load(model_dir)


def speech_like(seconds: float, seed: int = 0, rate: int = SAMPLE_RATE) -> np.ndarray:
    """A chirp with noise bursts: not silence, and different in every frame."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    chirp = 0.3 * np.sin(2 * np.pi * (150 * t + 900 * t**2 / seconds))
    bursts = 0.2 * rng.standard_normal(t.size) * ((t % 0.4) < 0.12)
    return (chirp + bursts).astype(np.float32)


# ---- WAV files and resampling ---------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_resample_keeps_a_tone_in_band(rate):
    t = np.arange(rate) / rate
    y = resample(0.5 * np.sin(2 * np.pi * 1000 * t), rate, SAMPLE_RATE)
    assert len(y) == SAMPLE_RATE
    ty = np.arange(len(y)) / SAMPLE_RATE
    inner = slice(500, -500)  # away from the zero-padded edges
    assert np.abs(y[inner] - 0.5 * np.sin(2 * np.pi * 1000 * ty)[inner]).max() < 1e-3


@pytest.mark.parametrize("rate", [44100, 48000])
def test_resample_removes_tones_above_the_new_nyquist(rate):
    t = np.arange(rate) / rate
    y = resample(0.5 * np.sin(2 * np.pi * 15000 * t), rate, SAMPLE_RATE)
    assert np.sqrt(np.mean(y[500:-500] ** 2)) < 0.5 / np.sqrt(2) / 1000  # > 60 dB down


def _riff(fmt_tag: int, channels: int, rate: int, bits: int, data: bytes, extensible=False):
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else fmt_tag, channels, rate,
                      rate * block, block, bits)  # fmt: skip
    if extensible:
        guid = (
            struct.pack("<H", fmt_tag) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        )
        fmt += struct.pack("<HHI", 22, bits, 0) + guid
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt
    chunks += b"LIST" + struct.pack("<I", 4) + b"INFO"  # an extra chunk readers must skip
    chunks += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def test_read_wav_decodes_the_common_encodings(tmp_path):
    x = np.array([0.0, 0.5, -0.5, 0.25, -1.0, 0.75], np.float32)
    encodings = {
        "s16": (1, 16, (x * 32768).clip(-32768, 32767).astype("<i2").tobytes()),
        "s32": (1, 32, (x * 2.0**31).clip(-(2**31), 2**31 - 1).astype("<i4").tobytes()),
        "f32": (3, 32, x.astype("<f4").tobytes()),
        "f64": (3, 64, x.astype("<f8").tobytes()),
        "u8": (1, 8, (x * 128 + 128).clip(0, 255).astype(np.uint8).tobytes()),
        "s24": (1, 24, b"".join(int(v * 2**23).to_bytes(4, "little", signed=True)[:3]
                                for v in x.clip(-1, 1 - 2**-23))),
    }  # fmt: skip
    for name, (tag, bits, data) in encodings.items():
        for extensible in (False, True):
            path = tmp_path / f"{name}{extensible}.wav"
            path.write_bytes(_riff(tag, 2, 16000, bits, data, extensible))
            y, rate = read_wav(path)
            assert rate == 16000 and y.shape == (3, 2), name
            np.testing.assert_allclose(y.reshape(-1), x, atol=1 / 127, err_msg=name)


def test_read_wav_reads_what_write_wav_wrote(tmp_path):
    x = speech_like(0.5, rate=16000)[:, None] * [1.0, 0.5]
    write_wav(tmp_path / "a.wav", x, 16000)
    y, rate = read_wav(tmp_path / "a.wav")
    assert rate == 16000 and y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=2 / 32767)  # 16-bit


def test_read_wav_refuses_what_it_cannot_read_with_one_line(tmp_path):
    (tmp_path / "song.mp3").write_bytes(b"ID3\x04" + bytes(100))
    (tmp_path / "alaw.wav").write_bytes(_riff(6, 1, 8000, 8, bytes(10)))
    cases = {"song.mp3": "not a WAV file", "alaw.wav": "unsupported WAV encoding",
             "missing.wav": "no such file"}  # fmt: skip
    for name, words in cases.items():
        with pytest.raises(WavError, match=words) as e:
            read_wav(tmp_path / name)
        assert "\n" not in str(e.value)


def test_atomic_wav_appears_only_when_complete(tmp_path):
    path = tmp_path / "out.wav"
    w = AtomicWav(path, 2, SAMPLE_RATE)
    w.write(np.zeros((FRAME, 2), np.float32))
    assert not path.exists()
    w.close()
    with wave.open(str(path)) as r:
        assert (r.getnchannels(), r.getframerate(), r.getnframes()) == (2, SAMPLE_RATE, FRAME)
    w = AtomicWav(tmp_path / "gone.wav", 1, SAMPLE_RATE)
    w.write(np.zeros((FRAME, 1), np.float32))
    w.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]  # no temporary left


# ---- lag policy --------------------------------------------------------------------------


def simulate(policy: LagPolicy, compute_ms, seconds: float = 20.0) -> dict:
    """Discrete-time model of the chat: a callback every 80 ms pops a Moshi frame and pushes a
    mic frame; one compute thread takes ``compute_ms(i)`` for its i-th frame and asks the
    policy before each. Returns the pipeline latency (in frames: playing callback minus
    capturing callback) of every played frame, and the number of frames dropped."""
    mic, speaker = [], []  # waiting: (block, spare) and computed block numbers
    latencies, drops, free_at, computing = [], 0, 0.0, None
    i = 0
    for block in range(int(seconds / 0.08)):
        now = block * 80.0
        while True:  # the compute thread, up to this callback
            if computing is not None:
                if free_at > now:
                    break
                speaker.append(computing)
                computing = None
            if not mic:
                break
            taken, spare = mic.pop(0)
            decision = policy.decide(len(mic), len(speaker), spare)
            if decision == LagPolicy.DROP_MIC:
                drops += 1
                continue
            if decision == LagPolicy.DROP_SPEAKER:
                speaker.pop(0)
                drops += 1
            free_at = max(free_at, taken * 80.0) + compute_ms(i)
            computing, i = taken, i + 1
        if speaker:
            latencies.append(block - speaker.pop(0))
            spare = len(speaker)
        else:
            spare = -1
        mic.append((block, spare))
    return {"latency": np.array(latencies), "drops": drops}


def test_lag_policy_bounds_latency_when_compute_is_too_slow():
    max_waiting = 3
    slow = simulate(LagPolicy(max_waiting), lambda i: 200.0)  # 2.5x slower than real time
    assert slow["drops"] > 100
    # a frame waits at most max_waiting frames, plus its own compute and capture
    assert slow["latency"].max() <= max_waiting + 200 / 80 + 2
    late = slow["latency"][len(slow["latency"]) // 2 :]
    assert late.max() <= slow["latency"][: len(late)].max()  # does not grow
    unbounded = simulate(LagPolicy(10_000, settle=10_000), lambda i: 200.0)
    assert unbounded["latency"].max() > 50  # what the bound prevents


def test_lag_policy_catches_up_after_a_hiccup_and_drops_nothing_in_steady_state():
    steady = simulate(LagPolicy(5), lambda i: 30.0)
    assert steady["drops"] == 0 and steady["latency"].max() == 1
    # one 400 ms stall: five frames late, then back to real time
    hiccup = simulate(LagPolicy(5, settle=25), lambda i: 400.0 if i == 20 else 30.0)
    assert hiccup["latency"].max() >= 5
    assert 1 <= hiccup["drops"] <= 6
    assert hiccup["latency"][-10:].max() == 1  # back to the minimum


def test_lag_policy_keeps_the_spare_frame_that_jitter_needs():
    # a 150 ms spike every 0.8 s: each one needs one frame of slack, so after the first
    # underrun the extra frame stays instead of being dropped and missed again
    jitter = simulate(LagPolicy(5), lambda i: 150.0 if i % 10 == 5 else 40.0)
    assert jitter["drops"] == 0
    assert jitter["latency"][20:].max() == 2
    # the same spike once only: the slack it left is dropped after the settle window
    once = simulate(LagPolicy(5, settle=25), lambda i: 150.0 if i == 5 else 40.0)
    assert once["drops"] == 1 and once["latency"][-10:].max() == 1


def test_lag_policy_rejects_an_empty_budget():
    with pytest.raises(ValueError):
        LagPolicy(0)


# ---- recording and screens ---------------------------------------------------------------


def test_recorder_puts_moshi_after_the_device_latency_and_fills_gaps(tmp_path):
    path = tmp_path / "talk.wav"
    rec = Recorder(path)
    mic = [np.full(FRAME, v, np.float32) for v in (0.1, 0.2, 0.3, 0.4)]
    moshi = np.full(FRAME, -0.5, np.float32)
    latency = 0.01  # 240 samples between the mic's and the speaker's clocks
    rec.block(0, mic[0], None, 0.5)  # the first callback's timing is often off: median wins
    rec.block(1, mic[1], moshi, latency)
    rec.text(1, " hello")
    rec.text(2, " there")
    rec.block(3, mic[3], None, latency)  # block 2 never arrived
    rec.close()
    x, rate = read_wav(path)
    assert rate == SAMPLE_RATE and x.shape == (4 * FRAME + 240, 2)
    np.testing.assert_allclose(x[:FRAME, 0], 0.1, atol=1e-4)
    np.testing.assert_allclose(x[2 * FRAME : 3 * FRAME, 0], 0.0)  # the gap is silence
    np.testing.assert_allclose(x[3 * FRAME : 4 * FRAME, 0], 0.4, atol=1e-4)
    right = x[:, 1]
    assert np.all(right[: FRAME + 240] == 0)
    np.testing.assert_allclose(right[FRAME + 240 : 2 * FRAME + 240], -0.5, atol=1e-4)
    assert np.all(right[2 * FRAME + 240 :] == 0)
    assert (tmp_path / "talk.transcript.txt").read_text() == "[00:00.090] hello there\n"


def test_recorder_adds_the_cleaned_microphone_as_a_third_channel(tmp_path):
    rec = Recorder(tmp_path / "talk.wav", settle=1, cleaned=True)
    mic, moshi, clean = (np.full(FRAME, v, np.float32) for v in (0.4, -0.5, 0.1))
    rec.block(0, mic, moshi, 240 / SAMPLE_RATE, clean)
    rec.close()
    x, _ = read_wav(tmp_path / "talk.wav")
    assert x.shape == (FRAME + 240, 3)
    np.testing.assert_allclose(x[:FRAME, 0], 0.4, atol=1e-4)
    np.testing.assert_allclose(x[:FRAME, 2], 0.1, atol=1e-4)  # on the microphone's timeline
    np.testing.assert_allclose(x[240:, 1], -0.5, atol=1e-4)  # Moshi, after the latency
    assert np.all(x[FRAME:, [0, 2]] == 0)


def test_transcript_breaks_lines_at_pauses():
    t = Transcript(pause_s=1.0)
    for time_s, piece in [(0.0, " Hi"), (0.08, ","), (0.16, " you"), (2.0, " Yes"), (2.5, "!")]:
        t.add(time_s, piece)
    t.add(3.0, "")
    assert t.render() == "[00:00.000] Hi, you\n[00:02.000] Yes!\n"


SNAPSHOT = dict(t=12.3, frames=150, compute_ms=31.0, rtf=0.39, latency_ms=260.0, mic_queue=0,
                speaker_queue=1, dropped=2, underruns=3, erle_db=32.4)  # fmt: skip


def test_plain_screen_prints_lines_with_status_and_summary():
    out = io.StringIO()
    screen = PlainScreen(out, every_s=0.0, pause_s=0.0)
    screen.info("loading")
    screen.ready("speak now")
    screen.text(" hello")
    screen.stats(SNAPSHOT)
    screen.tick()
    screen.summary({"frames": 150, "dropped": 2})
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["loading", "speak now", "moshi: hello"]
    assert lines[3].startswith("status t=12.3 frames=150 compute_ms=31 rtf=0.39 latency_ms=260")
    assert "dropped=2" in lines[3] and "underruns=3" in lines[3] and "erle_db=32" in lines[3]
    assert lines[4] == "summary frames=150 dropped=2"


def test_rich_screen_shows_transcript_and_status():
    from rich.console import Console

    out = io.StringIO()
    screen = RichScreen(Console(file=out, force_terminal=True, width=100, height=30))
    screen.ready("speak now")
    screen.text(" moshi listens and speaks")
    screen.stats(SNAPSHOT)
    screen.tick()
    screen.close()
    text = out.getvalue()
    for words in ("moshi listens and speaks", "compute 31 ms", "RTF 0.39", "latency ~260 ms",
                  "dropped 2", "underruns 3", "ERLE 32 dB"):  # fmt: skip
        assert words in text


def test_rich_status_line_fits_80_columns_and_keeps_the_counters():
    from rich.console import Console

    busy = dict(SNAPSHOT, t=3725.0, compute_ms=1234.0, rtf=15.43, latency_ms=1234.0, mic_queue=12,
                speaker_queue=9, dropped=123, underruns=45)  # fmt: skip
    screen = RichScreen(Console(file=io.StringIO(), force_terminal=True, width=80, height=30))
    screen.stats(busy)
    line = screen._status_text().plain
    assert len(line) <= 80, line
    for words in ("62:05", "RTF 15.43", "latency ~1234 ms", "dropped 123", "underruns 45",
                  "ERLE 32 dB"):  # fmt: skip
        assert words in line, line


# ---- the frame loop on the converted fixture model -----------------------------------------


def run_driver(model, pcm, sampling, warmup=True, engine="pipelined"):
    lm, mimi, tok = model
    driver = FrameDriver(lm, mimi, tok, sampling, engine=engine)
    try:
        if warmup:
            driver.warmup()
        else:
            driver.reset()
        steps, items = [], []
        frames = split_frames(pcm)
        n = drive(driver, frames, lambda item, s: (items.append(item), steps.append(s)))
    finally:
        driver.close()
    # every frame answered once, in order, paired with the frame it answers
    assert n == len(frames) and [s.index for s in steps] == list(range(len(frames)))
    assert all(item is frame for item, frame in zip(items, frames, strict=True))
    return steps


def test_frame_loop_pipelined_equals_serial(model):
    pcm = speech_like(1.2, seed=4)
    pipelined = run_driver(model, pcm, Sampling(seed=9))
    serial = run_driver(model, pcm, Sampling(seed=9), engine="serial")
    for x, y in zip(pipelined, serial, strict=True):
        assert x.text_id == y.text_id and x.text == y.text
        np.testing.assert_array_equal(x.user_codes, y.user_codes)
        np.testing.assert_array_equal(x.pcm, y.pcm)


def test_frame_loop_is_deterministic_for_a_seed(model):
    pcm = speech_like(1.2)
    a = run_driver(model, pcm, Sampling(seed=11))
    b = run_driver(model, pcm, Sampling(seed=11))
    other = run_driver(model, pcm, Sampling(seed=12))
    cold = run_driver(model, pcm, Sampling(seed=11), warmup=False)
    assert len(a) == 15 and a[0].text_id is None and a[1].text_id is not None
    for x, y, z in zip(a, b, cold, strict=True):
        assert x.text_id == y.text_id == z.text_id
        np.testing.assert_array_equal(x.user_codes, y.user_codes)
        np.testing.assert_array_equal(x.pcm, y.pcm)
        np.testing.assert_array_equal(x.pcm, z.pcm)  # warm-up leaves no trace
    assert any(not np.array_equal(x.codes, y.codes) for x, y in zip(a[1:], other[1:], strict=True))
    assert np.abs(a[-1].pcm).max() > 0


def test_frame_loop_greedy_needs_no_seed(model):
    pcm = speech_like(0.8, seed=3)
    greedy = Sampling(temp=0.0, temp_text=0.0)
    a, b = run_driver(model, pcm, greedy), run_driver(model, pcm, greedy)
    assert [s.text_id for s in a] == [s.text_id for s in b]
    assert all(np.array_equal(x.codes, y.codes) for x, y in zip(a[1:], b[1:], strict=True))


def test_frame_loop_feeds_the_user_audio_to_mimi(model):
    import mlx.core as mx

    lm, mimi, _ = model
    frames = split_frames(speech_like(0.8, seed=5))
    steps = run_driver(model, np.concatenate(frames), Sampling(seed=1))
    mimi.reset()
    n_user = steps[0].user_codes.shape[0]
    expected = [np.array(mimi.encode_step(mx.array(f[None, None]))[0, :n_user, 0]) for f in frames]
    np.testing.assert_array_equal(np.stack([s.user_codes for s in steps]), np.stack(expected))


# ---- moshi-mlx run ------------------------------------------------------------------------


def test_run_end_to_end_is_deterministic_and_matches_the_frame_loop(tmp_path, model_dir, model):
    speech = speech_like(1.0, seed=2, rate=44100)
    write_wav(tmp_path / "in.wav", np.stack([speech, 0.5 * speech], 1), 44100)
    outs = []
    for name, engine in (("a.wav", "pipelined"), ("b.wav", "serial")):  # the same answer
        r = moshi_mlx_cmd("run", tmp_path / "in.wav", tmp_path / name, "--hf-path", model_dir,
                          "--seed", 7, "--json", "--engine", engine, timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout))
        assert outs[-1]["engine"] == engine
    a, b = outs
    assert a["frames"] == 13 and a["input_sample_rate"] == 44100 and a["input_channels"] == 2
    assert a["text_ids"] == b["text_ids"] and a["text_ids"][0] is None
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()
    y, rate = read_wav(tmp_path / "a.wav")
    assert rate == SAMPLE_RATE and y.shape == (13 * FRAME, 1)
    # the same loop, in process, on the same resampled input
    with WavReader(tmp_path / "in.wav") as reader:  # the same frames as run reads them
        pcm = np.concatenate(list(input_frames(reader)))
    steps = run_driver(model, pcm, Sampling(seed=7))
    assert [s.text_id for s in steps] == a["text_ids"]
    np.testing.assert_allclose(y[:, 0], np.concatenate([s.pcm for s in steps]), atol=1 / 32767)
    assert a["text"] == "".join(s.text for s in steps).strip()


def test_run_prints_the_transcript_without_json(tmp_path, model_dir):
    write_wav(tmp_path / "in.wav", speech_like(0.4, rate=16000), 16000)
    r = moshi_mlx_cmd("run", tmp_path / "in.wav", tmp_path / "out.wav", "--hf-path", model_dir,
                      "--temp", 0, "--temp-text", 0, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stderr and "RTF" in r.stderr
    assert (tmp_path / "out.wav").is_file()


def test_run_bad_inputs_give_one_line(tmp_path, model_dir, capsys):
    (tmp_path / "notes.txt").write_text("not audio")
    write_wav(tmp_path / "empty.wav", np.zeros((0, 1)), 24000)
    write_wav(tmp_path / "ok.wav", speech_like(0.2), 24000)
    model = ["--hf-path", str(model_dir)]
    cases = [
        ("notes.txt", "o.wav", model, "is not a WAV file"),
        ("missing.wav", "o.wav", model, "no such file"),
        ("empty.wav", "o.wav", model, "holds no audio"),
        ("ok.wav", "nowhere/o.wav", model, "does not exist"),
        ("ok.wav", ".", model, "is not a regular file"),
        ("ok.wav", "o.wav", [*model, "--temp", "-1"], "--temp must be a finite number >= 0"),
        ("ok.wav", "o.wav", ["--hf-path", str(tmp_path / "no-model")], "no such folder"),
    ]
    for wav_in, wav_out, extra, words in cases:
        argv = ["run", str(tmp_path / wav_in), str(tmp_path / wav_out), *extra]
        assert cli_main(argv) == 1, words
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("moshi-mlx run: error:") and words in err[-1], err
        assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "o.wav").exists()


# -- the command line ------------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [([], "chat"), (["persona"], "save")])
def test_a_bare_command_prints_its_help(capsys, argv, words):
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: moshi-mlx{''.join(' ' + a for a in argv)} ") and words in out


@pytest.mark.parametrize("argv, words", [
    (["--verison"], "moshi-mlx: error: unrecognized arguments: --verison (did you mean "
                    "--version?) (see moshi-mlx --help)"),
    (["chat", "--hfpath", "x"], "(did you mean --hf-path?) (see moshi-mlx chat --help)"),
    (["run", "in.wav", "out.wav", "--sed=3"], "--sed=3 (did you mean --seed?)"),
    (["chta"], "moshi-mlx: error: unknown command 'chta' (did you mean `moshi-mlx chat`?)"),
    (["persona", "voice.wav"], "unknown action 'voice.wav' (did you mean `moshi-mlx persona "
                               "save voice.wav`?) (see moshi-mlx persona --help)"),
    (["chat", "--engine", "piplined"], "did you mean pipelined? (see moshi-mlx chat --help)"),
    (["persona", "save", "v.wav"], "required: -o/--output (see moshi-mlx persona save --help)"),
])  # fmt: skip
def test_mistyped_flags_and_commands_get_a_suggestion_and_the_subcommands_help(capsys, argv, words):
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and words in err, err


def test_q_without_bits_talks_of_positional_arguments_only_where_there_are_some(capsys):
    assert cli_main(["chat", "-q", "3"]) == 1
    err = capsys.readouterr().err
    assert "takes 4 or 8 bits, got '3'" in err and "IN" not in err and "positional" not in err
    assert cli_main(["run", "-q", "in.wav", "out.wav"]) == 1
    assert "got 'in.wav' (put -q after IN and OUT, or use --q-bits)" in capsys.readouterr().err


def test_q_help_says_what_quantization_does_on_the_cpu(capsys):
    assert cli_main(["chat", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "on MLX's CPU backend (Linux) they run slower than bf16" in text


def test_a_folder_given_for_a_file_is_called_a_folder(tmp_path, capsys):
    write_wav(tmp_path / "in.wav", speech_like(0.1), 24000)
    cases = [
        ["convert", "--hf-path", str(tmp_path), "--mimi-weights", str(tmp_path)],
        ["convert", "--hf-path", str(tmp_path), "--tokenizer", str(tmp_path)],
        ["bench", "--no-lm", "--mimi-weights", str(tmp_path)],
        ["run", str(tmp_path / "in.wav"), str(tmp_path / "o.wav"), "--voice-prompt", str(tmp_path)],
    ]
    for argv in cases:
        assert cli_main(argv) == 1, argv
        err = capsys.readouterr().err
        assert f"{tmp_path} is a folder; give a file" in err and len(err.splitlines()) == 1, err


def test_messages_name_flags_not_library_arguments(tmp_path, pytorch_repo, capsys):
    """A folder without Mimi: `run` has no flag for it, so the message names convert's."""
    folder = tmp_path / "no-mimi"
    folder.mkdir()
    for f in pytorch_repo.iterdir():
        if not f.name.startswith("tokenizer-"):
            (folder / f.name).write_bytes(f.read_bytes())
    write_wav(tmp_path / "in.wav", speech_like(0.1), 24000)
    run = ["run", str(tmp_path / "in.wav"), str(tmp_path / "o.wav")]
    cases = [
        (run, "give it with moshi-mlx convert --mimi-weights"),
        (["convert", "--mlx-path", str(tmp_path / "out")], "give it with --mimi-weights"),
    ]
    for argv, words in cases:
        assert cli_main([*argv, "--hf-path", str(folder)]) == 1
        err = capsys.readouterr().err
        assert "no Mimi codec weights found" in err and words in err, err
        assert "mimi_weights" not in err


def test_errors_never_name_a_writers_temporary(tmp_path, pytorch_repo, capsys):
    """The conversion's temporary folder beside /proc/x cannot be made: the message names
    the folder asked for."""
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    assert cli_main(["convert", "--hf-path", str(pytorch_repo), "--mlx-path", "/proc/x"]) == 1
    err = capsys.readouterr().err
    assert "/proc/x" in err and ".converting-" not in err and len(err.splitlines()) == 1, err
