"""Hostile and careless files, round two: the clean-up of killed writers' temporaries, the one
output rule every writer follows, inputs that are not files, files told apart by their bytes,
persona prompts of any size, and signals in the middle of a write.

Each command-line case asserts exit code 1 with one line on stderr naming the cause (no
traceback) and that nothing of the user's changed. The README's safety section (docs/safety.md)
lists the classes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import (
    LM_DIR,
    MIMI_DIR,
    MOSHI_MLX,
    cli,
    moshi_mlx_cmd,
    one_line_error,
    speech_wav,
    state,
    tmpfs,
)

import moshi_mlx
from moshi_mlx import persona
from moshi_mlx.app.chat import STALL_S, StallClock
from moshi_mlx.app.recording import Recorder
from moshi_mlx.app.wavio import read_wav, write_wav
from moshi_mlx.errors import MoshiError
from moshi_mlx.leftovers import MARK, Temporary, remove_stale
from moshi_mlx.outputs import Output, check_output

# ---- helpers ---------------------------------------------------------------------------------


WRITER = """
import sys, time
from pathlib import Path
from moshi_mlx.leftovers import Temporary
t = Temporary(Path(sys.argv[1]), sys.argv[2], folder=sys.argv[3] == "folder")
if sys.argv[3] == "folder":
    t.add("config.json").write_text("{}")
else:
    t.payload.write_bytes(b"half a file")
print(t.path, flush=True)
time.sleep(600)
"""


class Writer:
    """A moshi-mlx writer in another process (as one in another PID namespace would be: its PID
    means nothing here), holding its temporary for ``dest`` until killed."""

    def __init__(self, dest: Path, kind: str = "writing", folder: bool = False):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(dest), kind, "folder" if folder else "file"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.path = Path(self.proc.stdout.readline().strip())
        assert self.path.parent == dest.parent and self.path.is_dir()

    def kill(self) -> None:
        self.proc.kill()  # kill -9: no chance to clean up
        self.proc.wait()


@pytest.fixture
def writers():
    started: list[Writer] = []
    yield lambda *a, **k: started.append(Writer(*a, **k)) or started[-1]
    for w in started:
        w.kill()


# ---- the clean-up removes only what it can prove it made ------------------------------------


def test_a_killed_writers_temporary_is_removed_a_running_writers_is_not(tmp_path, writers):
    out = tmp_path / "take[1].wav"
    running = writers(out)
    killed = writers(out)
    killed.kill()
    write_wav(out, np.zeros((2400, 1), np.float32), 24000)  # the next writer to that name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, running.path.name])
    assert (running.path / "payload").read_bytes() == b"half a file"  # untouched
    running.kill()
    assert remove_stale(out, ("writing",)) == [running.path]  # gone once its writer is
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_user_files_named_like_temporaries_survive(tmp_path):
    out = tmp_path / "out.wav"
    user = {
        ".out.wav.writing-999999-deadbeef": b"the old naming, a dead PID",  # a file
        ".out.wav.writing-0123456789abcdef": b"the new naming, but a file",
        ".out.wav.writing-99999999999999999999-deadbeef": b"PID past 2**64",  # OverflowError
        ".out.wav.writing-2147483648-deadbeef": b"PID 2**31",
    }
    for name, data in user.items():
        (tmp_path / name).write_bytes(data)
    for name in (".out.wav.old-123-deadbeef", ".out.wav.writing-fedcba9876543210"):
        (tmp_path / name).mkdir()  # user folders named like ours, with a thesis in them
        (tmp_path / name / "thesis.txt").write_text("three years of work")
    marked = tmp_path / ".out.wav.writing-00000000000000aa"  # our mark, plus a user file
    marked.mkdir()
    (marked / MARK).write_bytes(b"moshi-mlx temporary v1\npayload\n")
    (marked / "thesis.txt").write_text("three years of work")
    unmarked = tmp_path / ".out.wav.writing-00000000000000bb"  # a mark never written (empty)
    unmarked.mkdir()
    (unmarked / MARK).write_bytes(b"")
    (unmarked / "payload").write_bytes(b"data")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / MARK).write_bytes(b"moshi-mlx temporary v1\npayload\n")
    (target / "payload").write_bytes(b"data")
    (tmp_path / ".out.wav.writing-00000000000000cc").symlink_to(target)  # never followed
    before = state(tmp_path)
    write_wav(out, np.zeros((2400, 1), np.float32), 24000)
    after = state(tmp_path)
    assert after.pop("out.wav") and after == before


def test_a_file_system_mounted_at_a_temporarys_name_is_never_emptied(tmp_path):
    out = tmp_path / "out.wav"
    looks_ours = b"moshi-mlx temporary v1\npayload\n"
    for mounted in (False, True):
        folder = tmp_path / ".out.wav.writing-00000000000000dd"
        if mounted:
            gen = tmpfs(folder, "size=1m")
            next(gen)
        else:
            folder.mkdir()
        try:
            (folder / MARK).write_bytes(looks_ours)
            (folder / "payload").write_bytes(b"data")
            removed = remove_stale(out, ("writing",))
            if mounted:  # exactly what we would remove, but a mount point: left alone
                assert removed == [] and (folder / "payload").read_bytes() == b"data"
            else:  # the control: the same folder, not mounted, is ours and goes
                assert removed == [folder] and not folder.exists()
        finally:
            if mounted:
                next(gen, None)


def test_a_running_conversion_keeps_its_folder_a_killed_one_is_named(tmp_path, writers,
                                                                     pytorch_repo):  # fmt: skip
    out = tmp_path / "out"
    running = writers(out, "converting", folder=True)
    user = tmp_path / ".out.converting-x"  # the example: a user's folder
    user.mkdir()
    (user / "thesis.txt").write_text("mine")
    r = moshi_mlx_cmd("convert", "--hf-path", pytorch_repo, "--mlx-path", out, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "killed" not in r.stderr  # nothing was removed: no message
    assert (running.path / "payload" / "config.json").read_text() == "{}"
    assert (user / "thesis.txt").read_text() == "mine"
    running.kill()
    r = moshi_mlx_cmd("convert", "--hf-path", pytorch_repo, "--mlx-path", out, "--force",
                      timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if "left behind by a conversion" in line]
    assert len(warned) == 1 and running.path.name in warned[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.converting-x", "out"]


def test_persona_save_cleans_its_own_killed_temporaries(tmp_path, writers, model_dir):
    out = tmp_path / "v.safetensors"
    writers(out).kill()
    speech_wav(tmp_path / "voice.wav", 1.0)
    r = moshi_mlx_cmd("persona", "save", tmp_path / "voice.wav", "-o", out, "--hf-path",
                      model_dir, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.safetensors", "voice.wav"]


def test_a_temporary_removes_only_what_it_recorded(tmp_path):
    t = Temporary(tmp_path / "out", "converting", folder=True)
    t.add("a.safetensors").write_bytes(b"a")
    (t.payload / "not-recorded.txt").write_text("someone else's")
    t.close()  # what it made goes; the rest, and so the folder, stays
    assert (t.payload / "not-recorded.txt").exists() and not (t.payload / "a.safetensors").exists()
    assert remove_stale(tmp_path / "out", ("converting",)) == []  # holds what it did not list


# ---- one output rule for every writer ---------------------------------------------------------


@pytest.fixture
def folder(tmp_path, model_dir) -> Path:
    shutil.copytree(model_dir, tmp_path / "model")
    speech_wav(tmp_path / "v.wav", 1.0)
    (tmp_path / "notes.txt").write_text("my notes")
    return tmp_path


PERSONA_SAVE = {
    "onto its own voice, even with --force": (["v.wav", "-o", "v.wav", "--force"],
                                              "--output would overwrite VOICE"),
    "into the model folder": (["v.wav", "-o", "model/mimi.safetensors", "--force"],
                              "inside the model folder"),
    "a suffix that lies": (["v.wav", "-o", "v4.wav"], "name it v4.safetensors"),
    "a FIFO as the voice": (["pipe", "-o", "v.safetensors"], "is a FIFO"),
    "a folder as the voice": (["model", "-o", "v.safetensors"], "is a folder"),
}  # fmt: skip


@pytest.mark.parametrize("case", PERSONA_SAVE)
def test_persona_save_follows_the_output_rule(capsys, folder, case):
    args, words = PERSONA_SAVE[case]
    os.mkfifo(folder / "pipe")
    before = state(folder)
    argv = [folder / a if i in (0, 2) else a for i, a in enumerate(args)]
    code, err = cli(capsys, "persona", "save", *argv, "--hf-path", folder / "model")
    one_line_error(code, err, words)
    assert state(folder) == before


def test_a_hard_link_to_the_input_is_the_input(capsys, folder):
    os.link(folder / "v.wav", folder / "same.wav")
    before = state(folder)
    code, err = cli(capsys, "run", folder / "v.wav", folder / "same.wav", "--hf-path",
                    folder / "model", "--force")  # fmt: skip
    one_line_error(code, err, "OUT would overwrite IN")
    assert state(folder) == before


RUN_OUTPUTS = {
    "a suffix that lies": ("out.mp3", [], "name it out.wav"),
    "no suffix": ("out", [], "name it out.wav"),
    "a folder holding another model": ("other/out.wav", [], "inside a model folder"),
    "the voice prompt": ("v.wav", ["--voice-prompt", "v.wav", "--force"],
                         "would overwrite --voice-prompt"),
    "the Hugging Face cache": ("hub/out.wav", [], "inside the model folder"),
}  # fmt: skip


@pytest.mark.parametrize("case", RUN_OUTPUTS)
def test_run_follows_the_output_rule(capsys, folder, monkeypatch, case):
    out, extra, words = RUN_OUTPUTS[case]
    shutil.copytree(folder / "model", folder / "other")
    (folder / "hub").mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(folder / "hub"))
    speech_wav(folder / "in.wav")
    before = state(folder)
    extra = [folder / a if a.endswith(".wav") else a for a in extra]
    code, err = cli(capsys, "run", folder / "in.wav", folder / out, "--hf-path", folder / "model",
                    *extra)  # fmt: skip
    one_line_error(code, err, words)
    assert state(folder) == before


def test_chat_debug_dump_never_replaces_a_users_file(folder, model_dir):
    before = state(folder)
    r = moshi_mlx_cmd("chat", "--hf-path", model_dir, "--debug-dump", folder / "notes.txt",
                      timeout=60)  # fmt: skip
    one_line_error(r.returncode, r.stderr, "notes.txt exists; pick another name")
    r = moshi_mlx_cmd("chat", "--hf-path", model_dir, "--debug-dump", folder / "notes.txt",
                      "--force", timeout=60)  # fmt: skip
    one_line_error(r.returncode, r.stderr, "name it notes.npz")
    assert state(folder) == before


def test_chat_record_where_nothing_can_be_created_is_one_line(model_dir):
    # /proc takes no new files, even from root: refused before the model and the devices (it
    # aborted the process once the model had loaded)
    r = moshi_mlx_cmd("chat", "--hf-path", model_dir, "--record", "/proc/talk.wav", timeout=60)
    one_line_error(r.returncode, r.stderr, "/proc/talk.wav")


@pytest.mark.parametrize("name", ["mimi.safetensors", "config.json", "model.safetensors",
                                  "README.md", "model.safetensors.index.json"])  # fmt: skip
def test_convert_refuses_a_tokenizer_named_like_its_own_files(capsys, tmp_path, pytorch_repo,
                                                              name):  # fmt: skip
    shutil.copy(pytorch_repo / "tokenizer_spm_32k_3.model", tmp_path / name)
    before = state(tmp_path)
    code, err = cli(capsys, "convert", "--hf-path", pytorch_repo, "--tokenizer", tmp_path / name,
                    "--mlx-path", tmp_path / "out")  # fmt: skip
    one_line_error(code, err, f"tokenizer's file name '{name}'", "--tokenizer")
    assert state(tmp_path) == before


def test_an_output_that_appears_meanwhile_is_left_untouched(tmp_path):
    out = Output(tmp_path / "o.wav", force=False, suffix=".wav")
    with pytest.raises(MoshiError, match="appeared meanwhile|exists"):
        with out.writing() as tmp:
            tmp.write_bytes(b"ours")
            (tmp_path / "o.wav").write_bytes(b"theirs")
    assert (tmp_path / "o.wav").read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.wav"]


def test_the_rule_refuses_a_symlinked_output_even_with_force(tmp_path):
    (tmp_path / "real.wav").write_bytes(b"mine")
    (tmp_path / "link.wav").symlink_to(tmp_path / "real.wav")
    with pytest.raises(MoshiError, match="symbolic link"):
        check_output(tmp_path / "link.wav", force=True)


# ---- inputs that are not files ----------------------------------------------------------------


@pytest.mark.parametrize("what", ["fifo", "/dev/zero", "folder"])
def test_a_non_file_input_to_run_is_refused_at_once(tmp_path, model_dir, what):
    path = {"fifo": tmp_path / "pipe", "/dev/zero": Path("/dev/zero"), "folder": tmp_path}[what]
    if what == "fifo":
        os.mkfifo(path)
    words = {"fifo": "is a FIFO", "/dev/zero": "is a character device", "folder": "is a folder"}
    r = moshi_mlx_cmd("run", path, tmp_path / "out.wav", "--hf-path", model_dir, timeout=60)
    one_line_error(r.returncode, r.stderr, words[what])
    r = moshi_mlx_cmd("run", speech_wav(tmp_path / "in.wav"), tmp_path / "out.wav", "--hf-path",
                      model_dir, "--voice-prompt", path, timeout=60)  # fmt: skip
    one_line_error(r.returncode, r.stderr, "--voice-prompt", words[what])
    assert not (tmp_path / "out.wav").exists()


# ---- files told apart by their bytes ----------------------------------------------------------


@pytest.fixture(scope="module")
def mimi():
    m = moshi_mlx.load_mimi(MIMI_DIR / "weights.safetensors", MIMI_DIR / "config.json")
    m.set_num_codebooks(8)
    return m


def test_voice_files_are_told_by_their_bytes(tmp_path, mimi):
    from moshi_mlx.app.persona import voice_codes

    speech_wav(tmp_path / "voice.wav", 0.5).rename(tmp_path / "voice.mp3")  # a WAV all the same
    from_wav = voice_codes(str(tmp_path / "voice.mp3"), mimi)
    persona.save_voice_prompt(tmp_path / "v4.wav", from_wav, mimi)  # a prompt named .wav
    assert mx.array_equal(voice_codes(str(tmp_path / "v4.wav"), mimi), from_wav).item()
    (tmp_path / "q.wav").write_bytes(b"ID3\x04" + bytes(100))  # an mp3 named .wav
    with pytest.raises(MoshiError, match="neither a WAV recording of the voice nor a voice"):
        voice_codes(str(tmp_path / "q.wav"), mimi)
    (tmp_path / "voice.safetensors").write_bytes(b"\x80\x04 a pickle")
    with pytest.raises(MoshiError, match="torch pickles, which we never load"):
        voice_codes(str(tmp_path / "voice.safetensors"), mimi)


# ---- persona prompts are bounded, checked from the header -------------------------------------


def long_wav_header(path: Path, seconds: float, rate: int = 8000, bits: int = 8) -> Path:
    """A WAV whose header and size say ``seconds`` of audio, without writing them (sparse)."""
    data = int(seconds * rate) * bits // 8
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * bits // 8, bits // 8, bits)
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", 36 + data) + b"WAVE" + b"fmt " + struct.pack("<I", 16)
                + fmt + b"data" + struct.pack("<I", data))  # fmt: skip
        f.truncate(44 + data)
    return path


def test_a_long_voice_recording_is_refused_from_its_header(tmp_path, model_dir):
    voice = long_wav_header(tmp_path / "hour.wav", 3600)
    speech_wav(tmp_path / "in.wav")
    for argv in (["run", tmp_path / "in.wav", tmp_path / "o.wav", "--voice-prompt", voice],
                 ["persona", "save", voice, "-o", tmp_path / "v.safetensors"]):  # fmt: skip
        r = moshi_mlx_cmd(*argv, "--hf-path", model_dir, timeout=60)
        one_line_error(r.returncode, r.stderr, "3600.0 s of audio", "at most 30 s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hour.wav", "in.wav"]


def test_a_long_voice_prompt_file_is_refused_from_its_header(tmp_path, mimi):
    frames = 200_000  # 6.4 MB of codes, 4.4 hours
    codes = np.zeros((1, 8, frames), np.int32)
    from safetensors.numpy import save_file

    meta = {"format": persona.VOICE_PROMPT_FORMAT, "sample_rate": "24000", "frame_size": "1920",
            "card": str(mimi.cfg.bins)}  # fmt: skip
    save_file({"codes": codes}, str(tmp_path / "v.safetensors"), metadata=meta)
    with pytest.raises(MoshiError, match="200000 frames of voice .* at most 375"):
        persona.load_voice_prompt(tmp_path / "v.safetensors", mimi)


def test_a_long_text_prompt_is_refused_before_anything_loads(capsys, tmp_path, model_dir):
    speech_wav(tmp_path / "in.wav")
    role = "You are a patient teacher. " * 4500  # 120 kB
    t0 = time.monotonic()
    code, err = cli(capsys, "run", tmp_path / "in.wav", tmp_path / "o.wav", "--hf-path",
                    model_dir, "--text-prompt", role)  # fmt: skip
    one_line_error(code, err, "121500 characters", "at most 5000")
    assert time.monotonic() - t0 < 30  # refused at once: it took 45 s and 0.7 GB
    code, err = cli(capsys, "run", tmp_path / "in.wav", tmp_path / "o.wav", "--hf-path",
                    model_dir, "--text-prompt", "a lone surrogate \udc80")  # fmt: skip
    one_line_error(code, err, "not valid text")


def test_text_prompts_are_bounded_in_tokens(spm_model):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    fits = persona.text_prompt_tokens(sp, "hello " * 400)
    assert len(fits) <= persona.MAX_TEXT_TOKENS
    with pytest.raises(MoshiError, match=r"tokens; at most 500 fit"):
        persona.text_prompt_tokens(sp, "hello " * 800)  # 4800 characters, 800 tokens


# ---- signals in the middle of a write ---------------------------------------------------------


@pytest.fixture(scope="module")
def larger_lm(tmp_path_factory) -> dict:
    """A random LM of ~80 MB: its conversion takes long enough to be stopped half-way."""
    folder = tmp_path_factory.mktemp("larger")
    cfg = {**json.loads((LM_DIR / "config.json").read_text()), "dim": 512, "num_heads": 4,
           "num_layers": 4}  # fmt: skip
    lm = moshi_mlx.random_lm(moshi_mlx.LmConfig.from_dict(cfg), mx.float32)
    from mlx.utils import tree_flatten

    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(lm.parameters())))
    (folder / "lm.json").write_text(json.dumps(cfg))
    return {"moshi": folder / "model.safetensors", "config": folder / "lm.json"}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_convert_leaving_nothing(tmp_path, pytorch_repo, larger_lm, sig):
    out = tmp_path / "out"
    args = ["convert", "--moshi-weights", larger_lm["moshi"], "--lm-config", larger_lm["config"],
            "--mimi-weights", pytorch_repo / "tokenizer-e351c8d8-checkpoint125.safetensors",
            "--mimi-config", pytorch_repo / "mimi_config.json",
            "--tokenizer", pytorch_repo / "tokenizer_spm_32k_3.model",
            "--mlx-path", out]  # fmt: skip
    proc = subprocess.Popen([str(MOSHI_MLX), *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(".out.") for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.01)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    if proc.returncode == 0:  # it finished first: a whole folder
        assert moshi_mlx.load(out).lm.cfg.dim == 512
        return
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_the_transcript_is_on_disk_as_it_is_spoken(tmp_path):
    """What a chat killed with kill -9 leaves: every piece written so far (it was 0 bytes)."""
    rec = Recorder(tmp_path / "talk.wav", settle=1)
    rec.block(0, np.zeros(1920, np.float32), None, 0.01)
    rec.text(0, " hello")
    rec.text(1, " there")
    text = (tmp_path / "talk.transcript.txt").read_text()  # not closed: as after kill -9
    assert text.startswith("[00:00.") and text.endswith("] hello there")
    rec.close()
    assert (tmp_path / "talk.transcript.txt").read_text() == text + "\n"


def test_time_spent_suspended_is_no_stall():
    """Ctrl-Z then fg 5 s later: the stream's callbacks resume, chat goes on (it said "a sound
    device failed or was disconnected"); a stream silent while we run is still a stall."""
    clock = StallClock(now=0.0)
    assert clock.silent(blocks=10, now=0.1) < STALL_S
    assert clock.silent(blocks=10, now=5.2) < STALL_S  # suspended for 5 s
    assert clock.silent(blocks=11, now=5.3) == 0.0  # the callbacks are back
    t = 5.3
    for _ in range(int(STALL_S / 0.1) + 5):
        t += 0.1
        silent = clock.silent(blocks=11, now=t)
    assert silent > STALL_S


# ---- with the virtual sound card: a chat suspended, a chat whose file fails late ------------


def test_a_suspended_chat_resumes(card, model_dir, tmp_path):
    from audio_card import Chat

    chat = Chat(card, "--hf-path", model_dir, "--record", tmp_path / "talk.wav")
    try:
        chat.wait_for("speak now")
        time.sleep(1.0)
        chat.proc.send_signal(signal.SIGSTOP)  # Ctrl-Z
        time.sleep(5.0)
        chat.proc.send_signal(signal.SIGCONT)  # fg
        time.sleep(4.0)
        assert chat.proc.poll() is None, chat.err  # it ended: "a sound device failed ..."
        rc = chat.interrupt()
    finally:
        chat.kill()
    assert rc == 0 and not any("Traceback" in line for line in chat.err), chat.err
    assert read_wav(tmp_path / "talk.wav")[0].shape[0] > 4 * 24000


def test_a_failure_after_the_model_loaded_is_one_line(card, model_dir, tmp_path):
    """The dump's folder vanishes mid-chat: the dump cannot be written at the end, which is
    one line and exit code 1 (a failure there aborted the process: rc -6)."""
    from audio_card import Chat

    (tmp_path / "sub").mkdir()
    chat = Chat(card, "--hf-path", model_dir, "--debug-dump", tmp_path / "sub" / "d.npz")
    try:
        chat.wait_for("speak now")
        time.sleep(1.0)
        (tmp_path / "sub").rmdir()
        rc = chat.interrupt()
    finally:
        chat.kill()
    errors = [line for line in chat.err if "error" in line]
    assert rc == 1 and len(errors) == 1 and "sub/d.npz" in errors[0], chat.err
    assert not any("Traceback" in line or "terminate called" in line for line in chat.err)


def test_a_voice_recording_is_mixed_and_resampled_as_a_stream(tmp_path):
    """Block by block (a 30 s recording at 768 kHz on 64 channels held whole was 5.9 GB, its
    whole-signal resampling more), and the same as resampling the whole signal."""
    from moshi_mlx.app.persona import mono_24k
    from moshi_mlx.app.wavio import WavReader, resample, to_mono

    t = np.arange(44100 * 2 + 37) / 44100
    voice = sum(0.05 * np.sin(2 * np.pi * f * t + f) for f in (180, 360, 540, 900))
    x = np.stack([voice, 0.5 * voice], axis=1).astype(np.float32)
    write_wav(tmp_path / "v.wav", x, 44100)
    with WavReader(tmp_path / "v.wav") as r:
        streamed = mono_24k(r)
    x, rate = read_wav(tmp_path / "v.wav")
    whole = resample(to_mono(x), rate, 24000)
    assert streamed.shape == whole.shape
    # the stream's filter is shorter (16 zero crossings against 24) and its delay is taken
    # out to the nearest 24 kHz sample: close, not equal
    core = slice(100, -100)
    err = np.abs(streamed[core] - whole[core]).max() / np.abs(whole).max()
    assert err < 0.05, err  # one sample off: 0.15


def test_a_log_is_appended_to_never_through_a_link(tmp_path, model_dir):
    from moshi_mlx.outputs import append_output

    log = tmp_path / "runs.jsonl"
    for line in ("one\n", "two\n"):
        with append_output(log, what="--json-out") as f:
            f.write(line)
    assert log.read_text() == "one\ntwo\n"  # appended, never replaced
    (tmp_path / "link.jsonl").symlink_to(log)
    os.mkfifo(tmp_path / "pipe")
    for path, words in ((tmp_path / "link.jsonl", "symbolic link"),
                        (tmp_path / "pipe", "not a regular file"),
                        (model_dir / "bench.jsonl", "inside a model folder")):  # fmt: skip
        with pytest.raises(MoshiError, match=words):
            append_output(path, what="--json-out")
    assert log.read_text() == "one\ntwo\n" and not (model_dir / "bench.jsonl").exists()
