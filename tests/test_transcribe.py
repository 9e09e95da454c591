"""``moshi-mlx transcribe`` on the STT fixture: the reference trace's words and times from a WAV,
batches of files, the output formats and rules, live captions without a sound card, bad input,
and commands given the wrong kind of model."""

from __future__ import annotations

import argparse
import json
import signal
import struct
import subprocess
import threading
import time

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, LM_DIR, MOSHI_MLX, moshi_mlx_cmd

from moshi_mlx.app import transcribe
from moshi_mlx.stt import Word

STT_DIR = FIXTURES / "stt"
TIMESTAMPS = json.loads((STT_DIR / "timestamps.json").read_text())
# The fixture's weights are bf16 values and the reference computed in float32, as transcribe
# does by default on the CPU.
MODEL = ("--hf-path", STT_DIR)


def write_float_wav(path, x: np.ndarray, rate: int = 24000) -> None:
    """A mono float32 WAV (format 3), as a recorder or a DAW writes one."""
    data = np.asarray(x, "<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    riff = struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data))
    path.write_bytes(b"RIFF" + riff + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
                     + b"data" + struct.pack("<I", len(data)) + data)  # fmt: skip


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict:
    io = mx.load(str(STT_DIR / "io.safetensors"))
    folder = tmp_path_factory.mktemp("clips")
    paths = {}
    for name in ("clip0", "clip1"):
        paths[name] = folder / f"{name}.wav"
        write_float_wav(paths[name], np.array(io[name][0, 0]))
    paths["silent"] = folder / "silent.wav"
    write_float_wav(paths["silent"], np.zeros(30000))
    paths["empty"] = folder / "empty.wav"
    write_float_wav(paths["empty"], np.zeros(0))
    paths["samples"] = {name: np.array(io[name][0, 0]) for name in ("clip0", "clip1")}
    return paths


def expected(clip: str) -> list[dict]:
    """The trace's words as the JSON output writes them (times to the millisecond)."""
    words = TIMESTAMPS["traces"][clip]["words"]
    return [{"word": w["word"], "start": round(w["start_end"][0], 3),
             "end": round(w["start_end"][1], 3)} for w in words]  # fmt: skip


def one_line_error(r, *needles: str) -> None:
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_json_of_a_wav_gives_the_reference_words_and_times(clips):
    r = moshi_mlx_cmd("transcribe", clips["clip0"], "--format", "json", *MODEL)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert list(result) == ["text", "words", "duration"]
    assert result["words"] == expected("clip0")
    assert all(list(w) == ["word", "start", "end"] for w in result["words"])
    assert result["duration"] == round(58300 / 24000, 3)
    assert result["text"] == "yfi sw"  # the trace's text ids decoded


def test_several_files_are_one_batch_with_outputs_in_a_folder(clips, tmp_path):
    files = [clips["clip0"], clips["clip1"], clips["silent"], clips["empty"]]
    r = moshi_mlx_cmd("transcribe", *files, "--format", "json", "--output-dir", tmp_path, *MODEL)
    assert r.returncode == 0, r.stderr
    results = {p.stem: json.loads((tmp_path / f"{p.stem}.json").read_text()) for p in files}
    assert results["clip0"]["words"] == expected("clip0")
    assert results["clip1"]["words"] == expected("clip1")
    # no speech, no error: an empty transcript
    assert results["silent"] == {"text": "", "words": [], "duration": 1.25}
    assert results["empty"] == {"text": "", "words": [], "duration": 0.0}
    # an output that exists is kept without --force
    again = moshi_mlx_cmd("transcribe", clips["clip0"], "--output-dir", tmp_path, "--format",
                          "json", *MODEL)  # fmt: skip
    one_line_error(again, "clip0.json exists", "--force")


def test_bad_input_is_one_line_naming_the_file(clips, tmp_path):
    mp3 = tmp_path / "talk.mp3"
    mp3.write_bytes(b"ID3\x03\x00\x00\x00\x00\x00\x00" + bytes(200))
    one_line_error(moshi_mlx_cmd("transcribe", mp3, *MODEL), str(mp3), "not a WAV")
    one_line_error(moshi_mlx_cmd("transcribe", tmp_path, *MODEL), str(tmp_path), "folder")
    truncated = tmp_path / "cut.wav"
    truncated.write_bytes(clips["clip0"].read_bytes()[:20000])
    r = moshi_mlx_cmd("transcribe", truncated, *MODEL)
    assert r.returncode == 0 and "Traceback" not in r.stderr
    warning = r.stderr.strip().splitlines()
    assert len(warning) == 1 and str(truncated) in warning[0] and "shorter" in warning[0]


def test_each_command_says_which_kind_of_model_it_needs(clips, tmp_path):
    r = moshi_mlx_cmd("transcribe", clips["clip0"], "--hf-path", LM_DIR)
    one_line_error(r, "dialogue model", "speech-to-text")
    r = moshi_mlx_cmd("run", clips["clip0"], tmp_path / "out.wav", "--hf-path", STT_DIR)
    one_line_error(r, "speech-to-text model", "chat and run need a Moshi dialogue model")
    assert not (tmp_path / "out.wav").exists()


def test_mic_without_a_device_is_one_line(clips):
    r = moshi_mlx_cmd("transcribe", "--mic", "--input-device", "no-such-microphone-xyz", *MODEL)
    one_line_error(r)
    assert "--input-device" in r.stderr or "PortAudio" in r.stderr


def test_live_captions_without_a_sound_card(clips, tmp_path, capsys):
    """The --mic path from the frames on: text as it arrives, then -o writes the words."""
    pcm = clips["samples"]["clip0"]
    pcm = np.pad(pcm, (0, -len(pcm) % 1920))
    frames = [pcm[i : i + 1920] for i in range(0, len(pcm), 1920)]
    out = tmp_path / "live.json"
    args = argparse.Namespace(output=str(out), output_dir=None, files=[], force=False,
                              format="json", engine="pipelined")  # fmt: skip

    def load():
        import moshi_mlx

        return moshi_mlx.load(STT_DIR, dtype="float32")

    assert transcribe.live_captions(args, load, print, source=iter(frames)) == 0
    shown = capsys.readouterr().out
    assert "yfi sw" in shown  # the pieces as they came
    assert json.loads(out.read_text())["words"] == expected("clip0")


def test_live_captions_from_the_virtual_microphone(card, clips, tmp_path):
    """``--mic`` on a sound card: speech played into the microphone reaches the model (text
    appears; silence alone gives none), Ctrl-C ends it cleanly and ``-o`` keeps the words.
    What is said is not compared with the trace: where the 80 ms frames fall in the speech
    depends on when the recording started."""
    out = tmp_path / "live.json"
    proc = subprocess.Popen([str(MOSHI_MLX), "transcribe", "--mic", "-o", str(out), "--format",
                             "json", *map(str, MODEL)], env=card, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    speech = np.tile(np.pad(clips["samples"]["clip0"], (0, 12000)), 4).astype("<f4")
    try:
        text = []
        reader = threading.Thread(target=lambda: text.extend(iter(lambda: proc.stdout.read(1), "")),
                                  daemon=True)  # fmt: skip
        reader.start()
        deadline = time.monotonic() + 300  # loading under a heavy load took over 90 s
        while proc.poll() is None and time.monotonic() < deadline and not "".join(text).strip():
            subprocess.run(["pacat", "--playback", "--raw", "-d", "micfeed", "--format=float32le",
                            "--rate=24000", "--channels=1"], input=speech.tobytes(), env=card,
                           timeout=120)  # fmt: skip
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)  # stdout is the reader's alone; stderr is a few lines
        reader.join(timeout=10)
        err = proc.stderr.read()
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "listening; Ctrl-C stops" in err and f"wrote {out}" in err
    assert "".join(text).strip(), err  # the speech reached the model
    result = json.loads(out.read_text())
    assert list(result) == ["text", "words", "duration"] and result["text"]
    assert result["duration"] > 0, result
    for w in result["words"]:
        assert 0 <= w["start"] <= w["end"], result


def test_the_default_dtype_is_float32_on_the_cpu_where_it_fits(monkeypatch):
    assert transcribe.default_dtype(str(STT_DIR)) == "float32"
    monkeypatch.setenv("MOSHI_MLX_MEMORY_LIMIT_GB", "0.001")
    assert transcribe.default_dtype(str(STT_DIR)) is None  # then as stored


def test_formats_render_words_as_cues():
    words = [Word("good", 0.24, 0.8), Word("morning", 0.88, 1.44), Word("river", 3.52, 4.16)]
    t = transcribe.Transcript("good morning river", words, 5.0)
    assert transcribe.render(t, "text") == "good morning river\n"
    assert transcribe.render(t, "srt") == (
        "1\n00:00:00,240 --> 00:00:01,440\ngood morning\n\n"
        "2\n00:00:03,520 --> 00:00:04,160\nriver\n"
    )
    assert transcribe.render(t, "vtt") == (
        "WEBVTT\n\n00:00:00.240 --> 00:00:01.440\ngood morning\n\n"
        "00:00:03.520 --> 00:00:04.160\nriver\n"
    )
    assert json.loads(transcribe.render(t, "json"))["words"][1] == {
        "word": "morning", "start": 0.88, "end": 1.44}  # fmt: skip
