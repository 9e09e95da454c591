"""Hostile and broken input, generated on the fly: nothing read from outside a model folder, no
crash, nothing of the user's overwritten, nothing left behind, one clear line each.

Every command-line case asserts exit code 1, one line on stderr naming the cause, no traceback,
no file changed or created outside what the command owns, and no temporary file left. The
sound-card cases (a recording chat killed, two quick Ctrl-C's, a lost device) are in
test_chat_audio.py; the README's safety section lists the classes and their counts.
"""

from __future__ import annotations

import json
import math
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
from moshi_mlx import MoshiError
from moshi_mlx.app.wavio import read_wav, write_wav

# ---- helpers ---------------------------------------------------------------------------------


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- never read or copy outside the model folder ------------------------------------------


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "secret.model"
    path.write_bytes(b"private key material")
    return path


def upstream_names(folder: Path, **names) -> None:
    config = json.loads((LM_DIR / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **names}))


OUTSIDE = {
    "absolute tokenizer name": lambda f, s: upstream_names(f, tokenizer_name=str(s)),
    "dot-dot tokenizer name": lambda f, s: upstream_names(f, tokenizer_name="../secret.model"),
    "absolute LM name": lambda f, s: upstream_names(f, moshi_name="/etc/passwd"),
    "dot-dot Mimi name": lambda f, s: upstream_names(
        f, mimi_name="../../etc/hostname", moshi_name="model.safetensors"
    ),
    "symlinked tokenizer": lambda f, s: (
        (f / "tokenizer_spm_32k_3.model").unlink(),
        (f / "tokenizer_spm_32k_3.model").symlink_to(s),
    ),
    "shard index naming a file outside": lambda f, s: (
        f / "model.safetensors.index.json"
    ).write_text(json.dumps({"weight_map": {"text_emb.weight": "../secret.model"}})),
    "converted config naming a file outside": lambda f, s: None,  # set up in the test
}


@pytest.mark.parametrize("case", OUTSIDE)
def test_files_named_by_a_model_folder_stay_inside_it(capsys, tmp_path, pytorch_repo, model_dir,
                                                       secret, case):  # fmt: skip
    if case == "converted config naming a file outside":
        folder = copy_folder(model_dir, tmp_path / "model")
        config = json.loads((folder / "config.json").read_text())
        config["files"]["tokenizer"] = "../secret.model"
        (folder / "config.json").write_text(json.dumps(config))
    else:
        folder = copy_folder(pytorch_repo, tmp_path / "model")
        OUTSIDE[case](folder, secret)
    before = state(tmp_path)
    code, err = cli(capsys, "convert", "--hf-path", folder, "--mlx-path", tmp_path / "out")
    one_line_error(code, err, "outside the model folder", "refusing to read it")
    assert state(tmp_path) == before  # nothing written, the secret copied nowhere
    speech_wav(tmp_path / "in.wav")
    code, err = cli(capsys, "run", tmp_path / "in.wav", tmp_path / "o.wav", "--hf-path", folder)
    one_line_error(code, err, "outside the model folder")
    assert not (tmp_path / "o.wav").exists()


def test_a_hub_cache_snapshot_may_point_into_its_own_blobs(tmp_path, model_dir):
    """The boundary of a Hugging Face cache snapshot is its repo's cache folder: its files are
    symlinks into ``blobs/``; one pointing further out is refused."""
    repo = tmp_path / "models--owner--model"
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in model_dir.iterdir():
        shutil.copy(f, repo / "blobs" / f.name)
        (snapshot / f.name).symlink_to(Path("../../blobs") / f.name)
    lm, _, _ = moshi_mlx.load(snapshot)
    assert lm.cfg.dim == 64
    (tmp_path / "elsewhere.model").write_bytes(b"x")
    tokenizer = snapshot / json.loads((model_dir / "config.json").read_text())["files"]["tokenizer"]
    tokenizer.unlink()
    tokenizer.symlink_to(tmp_path / "elsewhere.model")
    with pytest.raises(MoshiError, match="resolves outside the model folder"):
        moshi_mlx.load(snapshot)


# ---- never crash: out-of-range codes, absurd sizes -----------------------------------------


@pytest.fixture(scope="module")
def lm():
    return moshi_mlx.load_lm(LM_DIR / "weights.safetensors", LM_DIR / "config.json")


@pytest.fixture(scope="module")
def mimi():
    m = moshi_mlx.load_mimi(MIMI_DIR / "weights.safetensors", MIMI_DIR / "config.json")
    m.set_num_codebooks(8)
    return m


def codes_with(row: int, value: int) -> mx.array:
    codes = np.zeros((1, 17, 4), np.int32)
    codes[0, row, 2] = value
    return mx.array(codes)


@pytest.mark.parametrize("row, value, words", [
    (1, 2048, "audio ids must be in [-1, 2048)"),  # one past the table: read other memory
    (5, 1 << 30, "audio ids must be in [-1, 2048)"),  # far past: segfaulted
    (9, -2, "audio ids must be in [-1, 2048)"),
    (0, 32000, "text ids must be in [-1, 32000)"),
])  # fmt: skip
def test_out_of_range_codes_are_errors_in_teacher_forcing(lm, row, value, words):
    with pytest.raises(MoshiError) as e:
        lm(codes_with(row, value))
    assert words in str(e.value)


@pytest.mark.parametrize("given, words", [
    (dict(user_codes=mx.full((1, 8), 2048)), "user_codes must be in [0, 2048)"),
    (dict(user_codes=mx.full((1, 8), -5)), "user_codes must be in [0, 2048)"),
    (dict(user_codes=mx.zeros((1, 8), mx.int32), moshi_codes=mx.full((1, 8), 4096)),
     "moshi_codes must be in [0, 2048)"),
    (dict(user_codes=mx.zeros((1, 8), mx.int32), text_token=mx.array([32000])),
     "text_token must be in [0, 32000)"),
])  # fmt: skip
def test_out_of_range_codes_are_errors_in_generation(lm, given, words):
    gen = moshi_mlx.LmGen(lm, temp=0, temp_text=0)
    user = given.pop("user_codes")
    with pytest.raises(MoshiError, match=words.replace("[", r"\[").replace(")", r"\)")):
        gen.step(user, **given)


@pytest.mark.parametrize("value", [2048, 1 << 20, -1])
def test_out_of_range_codes_are_errors_in_decoding(mimi, value):
    mimi.reset()
    codes = mx.zeros((1, 8, 1), mx.int32).at[0, 3, 0].add(value)
    for decode in (mimi.decode, mimi.decode_step):
        with pytest.raises(MoshiError, match=r"`codes` must be in \[0, 2048\)"):
            decode(codes)


# ---- library calls --------------------------------------------------------------------------


@pytest.mark.parametrize("call, words", [
    (lambda lm, mimi: mimi.encode(np.zeros((1, 1, 1920), np.float32)), "`pcm` must be a float"),
    (lambda lm, mimi: mimi.encode([[0.0] * 1920]), "`pcm` must be a float mx.array"),
    (lambda lm, mimi: mimi.encode(None), "`pcm` must be a float mx.array"),
    (lambda lm, mimi: mimi.encode(mx.zeros((1, 1, 1920), mx.int32)), "got int32 mx.array"),
    (lambda lm, mimi: mimi.encode(mx.zeros((0, 1, 1920))), "`pcm` must be [batch, 1, samples]"),
    (lambda lm, mimi: mimi.decode(mx.zeros((1, 8, 1))), "`codes` must be an integer mx.array"),
    (lambda lm, mimi: mimi.decode(mx.zeros((0, 8, 1), mx.int32)), "`codes` must be [batch"),
    (lambda lm, mimi: lm(np.zeros((1, 17, 3), np.int32)), "`codes` must be an integer mx.array"),
    (lambda lm, mimi: lm(mx.zeros((1, 17, 3))), "`codes` must be an integer mx.array"),
    (lambda lm, mimi: lm(mx.zeros((1, 17, 0), mx.int32)), "`codes` must be [batch, 17, time]"),
    (lambda lm, mimi: moshi_mlx.LmGen(lm).step([[0] * 8]), "user_codes must be an mx.array"),
    (lambda lm, mimi: moshi_mlx.LmGen(lm).step(mx.zeros((0, 8), mx.int32)), "must be [batch, 8]"),
    (lambda lm, mimi: moshi_mlx.LmGen(lm).step(mx.zeros((1, 8))), "must be integers"),
    (lambda lm, mimi: moshi_mlx.LmGen(lm, temp=-1.0), "`temp` must be a finite number >= 0"),
    (lambda lm, mimi: moshi_mlx.LmGen(lm, top_k=-3), "`top_k` must be an integer >= 0"),
    (lambda lm, mimi: moshi_mlx.load_lm(LM_DIR / "weights.safetensors", LM_DIR / "config.json",
                                        "float64"), "`dtype` must be one of"),
    (lambda lm, mimi: moshi_mlx.Quantization(3), "`bits` must be 4 or 8"),
])  # fmt: skip
def test_library_calls_refuse_bad_arguments_naming_them(lm, mimi, call, words):
    with pytest.raises(MoshiError) as e:
        call(lm, mimi)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_batch_size_changed_mid_stream_is_refused(lm, mimi):
    mimi.reset()
    mimi.encode_step(mx.zeros((1, 1, 1920)))
    with pytest.raises(MoshiError, match="encode_step got a batch of 2 but this stream started"):
        mimi.encode_step(mx.zeros((2, 1, 1920)))
    mimi.reset()
    mimi.encode_step(mx.zeros((2, 1, 1920)))  # a new stream may have another batch
    gen = moshi_mlx.LmGen(lm)
    gen.step(mx.zeros((1, 8), mx.int32))
    with pytest.raises(MoshiError, match="batch size 3 but this conversation started with 1"):
        gen.step(mx.zeros((3, 8), mx.int32))
    mimi.reset()


# Configs whose model cannot fit any machine's memory, or whose counts are absurd: refused
# from the arithmetic (or the count's bound) before anything is built. Each runs through the
# command line in a fresh wrapper process, whose children's peak memory is that command's.
ABSURD_LM = [
    ("dim", 51200, "describes a model that needs at least"),  # 1e12 parameters
    ("hidden_scale", 1e7, "describes a model that needs at least"),  # a 640M-wide MLP
    ("num_layers", 10**6, "num_layers must be an integer in [1, 1024], got 1000000"),
    ("n_q", 10**6, "n_q must be an integer in [1, 1024]"),
]
ABSURD_MIMI = [
    ("quantizer.n_q", 10**6, "quantizer.n_q must be an integer in [1, 1024]"),
    ("quantizer.dimension", 1 << 20, "describes a model that needs at least"),
    ("transformer.num_layers", 10**6, "transformer.num_layers must be an integer in [1, 1024]"),
    ("seanet.ratios", [1] * 40, "the length of seanet.ratios must be"),
]
_PEAK = """
import resource, subprocess, sys, time
t0 = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(r.returncode, peak, round(time.perf_counter() - t0, 2))
print(r.stderr, file=sys.stderr, end="")
"""


def peak_of(*argv) -> tuple[int, str, int, float]:
    """``moshi-mlx argv``: exit code, stderr, its peak resident bytes and its seconds."""
    r = subprocess.run([sys.executable, "-c", _PEAK, str(MOSHI_MLX), *map(str, argv)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    code, peak, seconds = r.stdout.split()
    return int(code), r.stderr, int(peak), float(seconds)


@pytest.mark.parametrize("key, value, words", ABSURD_LM + ABSURD_MIMI)
def test_absurd_sizes_are_refused_before_anything_is_built(tmp_path, pytorch_repo, key, value,
                                                           words):  # fmt: skip
    folder = copy_folder(pytorch_repo, tmp_path / "model")
    name = "mimi_config.json" if (key, value, words) in ABSURD_MIMI else "config.json"
    with_upstream_config(folder, name, set_field(key, value))
    speech_wav(tmp_path / "in.wav")
    code, err, peak, _ = peak_of(
        "run", tmp_path / "in.wav", tmp_path / "o.wav", "--hf-path", folder
    )
    one_line_error(code, err, words)
    assert peak < 1e9, peak  # nothing allocated on the config's word
    assert not (tmp_path / "o.wav").exists()


@pytest.mark.parametrize("flags, words", [
    (["--dim", 51200, "--heads", 32], "no quantization makes it fit"),
    (["--layers", 10**6], "num_layers must be an integer in [1, 1024]"),
    (["--dim", 4096, "--layers", 1024], "no quantization makes it fit"),
])  # fmt: skip
def test_absurd_bench_models_are_refused_before_anything_is_built(flags, words):
    code, err, peak, _ = peak_of("bench", "--random-weights", "--steps", 1, *flags)
    one_line_error(code, err, words)
    assert peak < 1e9, peak


# ---- never destroy the user's files ----------------------------------------------------------


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


RUN_OUTPUTS = {
    "an existing file": (lambda d: d / "keep.wav", "exists; pick another name, or pass --force"),
    "a folder": (lambda d: d, "exists and is not a regular file"),
    "a FIFO": (lambda d: fifo(d / "pipe"), "exists and is not a regular file"),
    "a symlink": (lambda d: (d / "link.wav").symlink_to(d / "keep.wav") or d / "link.wav",
                  "is a symbolic link; refusing to write through it"),
    "a dangling symlink": (lambda d: (d / "dang.wav").symlink_to(d / "nowhere.wav")
                           or d / "dang.wav", "is a symbolic link"),
    "the input": (lambda d: d / "in.wav", "exists; pick another name"),
    "a model file": (lambda d: d / "model" / "config.json", "exists; pick another name"),
    "a new file in the model folder": (lambda d: d / "model" / "out.wav",
                                       "is inside the model folder"),
    "a missing folder": (lambda d: d / "no" / "out.wav", "does not exist"),
    "a name too long": (lambda d: d / ("x" * 300 + ".wav"), "is too long for this file system"),
}  # fmt: skip


@pytest.mark.parametrize("case", RUN_OUTPUTS)
def test_run_never_writes_over_what_it_should_not(capsys, tmp_path, model_dir, case):
    make, words = RUN_OUTPUTS[case]
    folder = copy_folder(model_dir, tmp_path / "model")
    speech_wav(tmp_path / "in.wav")
    (tmp_path / "keep.wav").write_bytes(b"the user's own recording")
    out = make(tmp_path)
    before = state(tmp_path)
    force = ["--force"] if case in ("the input", "a model file", "a FIFO") else []
    code, err = cli(capsys, "run", tmp_path / "in.wav", out, "--hf-path", folder, *force)
    if case in ("the input", "a model file"):  # even with --force
        words = "OUT would overwrite IN" if case == "the input" else "inside the model folder"
    one_line_error(code, err, words)
    assert state(tmp_path) == before


def test_run_overwrites_an_existing_file_only_with_force(capsys, tmp_path, model_dir):
    speech_wav(tmp_path / "in.wav")
    (tmp_path / "out.wav").write_bytes(b"old")
    assert cli(capsys, "run", tmp_path / "in.wav", tmp_path / "out.wav", "--hf-path", model_dir,
               "--force", "--sampler", "greedy")[0] == 0  # fmt: skip
    assert read_wav(tmp_path / "out.wav")[0].shape[0] == 5 * 1920
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.wav", "out.wav"]


@pytest.mark.parametrize("record, words", [
    ("talk.wav", "talk.wav exists; pick another name, or pass --force"),
    ("talk2.wav", "talk2.transcript.txt exists; pick another name"),  # the transcript too
    ("folder", "exists and is not a regular file"),
    ("link.wav", "is a symbolic link"),
    ("no/such.wav", "does not exist"),
])  # fmt: skip
def test_chat_record_never_writes_over_what_it_should_not(tmp_path, model_dir, record, words):
    (tmp_path / "talk.wav").write_bytes(b"last week's talk")
    (tmp_path / "talk2.transcript.txt").write_text("last week's transcript")
    (tmp_path / "folder").mkdir()
    (tmp_path / "link.wav").symlink_to(tmp_path / "talk.wav")
    before = state(tmp_path)
    # checked before the sound devices and the model: no sound card needed
    force = "--force" if record in ("folder", "link.wav") else "--seed=1"
    r = moshi_mlx_cmd("chat", "--hf-path", model_dir, "--record", tmp_path / record, force,
                      timeout=60)  # fmt: skip
    one_line_error(r.returncode, r.stderr, words)
    assert state(tmp_path) == before


def test_convert_never_deletes_what_appeared_meanwhile(tmp_path, pytorch_repo, monkeypatch):
    from moshi_mlx.convert import convert as conversion

    out = tmp_path / "out"
    real = conversion.write_safetensors

    def and_meanwhile(path, *args, **kwargs):  # the user makes the folder mid-conversion
        out.mkdir(exist_ok=True)
        (out / "notes.txt").write_text("mine")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(conversion, "write_safetensors", and_meanwhile)
    for force in (False, True):
        with pytest.raises(MoshiError) as e:
            conversion.convert(pytorch_repo, out, force=force)
        assert "already exists" in str(e.value) or "would delete notes.txt" in str(e.value)
        assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left


def test_convert_force_replaces_only_a_pure_earlier_conversion(capsys, tmp_path, pytorch_repo):
    out = tmp_path / "out"
    assert cli(capsys, "convert", "--hf-path", pytorch_repo, "--mlx-path", out)[0] == 0
    (out / "my-notes.txt").write_text("mine")
    before = state(tmp_path)
    code, err = cli(capsys, "convert", "--hf-path", pytorch_repo, "--mlx-path", out, "--force")
    one_line_error(code, err, "--force would delete my-notes.txt", "move them away")
    assert state(tmp_path) == before


# ---- leave nothing behind, lose nothing when killed -------------------------------------------


@pytest.fixture(scope="module")
def larger_lm(tmp_path_factory, pytorch_repo) -> dict:
    """A random LM of ~80 MB (our parameter names) beside the fixture's Mimi and tokenizer:
    its conversion takes long enough to be killed half-way."""
    folder = tmp_path_factory.mktemp("larger")
    cfg = {**json.loads((LM_DIR / "config.json").read_text()), "dim": 512, "num_heads": 4,
           "num_layers": 4}  # fmt: skip
    lm = moshi_mlx.random_lm(moshi_mlx.LmConfig.from_dict(cfg), mx.float32)
    from mlx.utils import tree_flatten

    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(lm.parameters())))
    (folder / "lm.json").write_text(json.dumps(cfg))
    return {"moshi": folder / "model.safetensors", "config": folder / "lm.json"}


def convert_args(pytorch_repo, larger_lm, out) -> list:
    return ["convert", "--moshi-weights", larger_lm["moshi"], "--lm-config", larger_lm["config"],
            "--mimi-weights", pytorch_repo / "tokenizer-e351c8d8-checkpoint125.safetensors",
            "--mimi-config", pytorch_repo / "mimi_config.json",
            "--tokenizer", pytorch_repo / "tokenizer_spm_32k_3.model",
            "--mlx-path", out]  # fmt: skip


def test_a_killed_conversion_leaves_nothing_the_next_one_keeps(tmp_path, pytorch_repo, larger_lm):
    out = tmp_path / "out"
    args = convert_args(pytorch_repo, larger_lm, out)
    t0 = time.monotonic()
    assert moshi_mlx_cmd(*args, timeout=300).returncode == 0
    took = time.monotonic() - t0
    shutil.rmtree(out)
    rng = np.random.default_rng(int(time.time()))
    for _ in range(2):  # killed at a random point of the conversion
        proc = subprocess.Popen([str(MOSHI_MLX), *map(str, args)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            time.sleep(rng.uniform(0.3, 0.9) * took)
        finally:
            proc.kill()
            proc.wait()
        if out.exists():  # it finished first: a whole, loadable folder
            assert moshi_mlx.load(out).lm.cfg.dim == 512
            shutil.rmtree(out)
    r = moshi_mlx_cmd(*args, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # stale temporaries removed
    assert moshi_mlx.load(out).lm.cfg.dim == 512


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB file system."""
    yield from tmpfs(tmp_path / "disk", "size=3m")


def test_a_full_disk_is_one_line_and_leaves_nothing(capsys, small_disk, tmp_path, model_dir,
                                                    pytorch_repo):  # fmt: skip
    code, err = cli(capsys, "convert", "--hf-path", pytorch_repo, "--mlx-path", small_disk / "m")
    one_line_error(code, err, "No space left on device", str(small_disk / "m"))
    assert list(small_disk.iterdir()) == []
    speech_wav(tmp_path / "long.wav", seconds=120.0)  # 11 MB of answer: more than the disk
    code, err = cli(capsys, "run", tmp_path / "long.wav", small_disk / "o.wav", "--hf-path",
                    model_dir, "--sampler", "greedy")  # fmt: skip
    one_line_error(code, err, "No space left on device", str(small_disk / "o.wav"))
    assert list(small_disk.iterdir()) == []


# ---- one clear line naming the file and the field ---------------------------------------------


def with_upstream_config(folder: Path, name: str, edit) -> None:
    path = folder / name
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def set_field(key: str, value):
    def edit(config):
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value

    return edit


LM_FIELDS = [
    ("dim", 0, "dim must be an integer in [1,"), ("dim", "64", "dim must be an integer"),
    ("num_heads", -2, "num_heads must be an integer"), ("num_layers", 2.5, "num_layers"),
    ("context", 0, "context must be an integer"), ("card", None, "card must be an integer"),
    ("text_card", True, "text_card must be an integer"), ("n_q", 17, "delays must be a list"),
    ("delays", [0] * 16 + [10**9], "delays entry must be an integer in [0, 15], got 10000"),
    ("delays", "0,1", "delays must be a list"), ("hidden_scale", 0, "hidden_scale must be"),
    ("max_period", float("nan"), "max_period must be a finite number"),
    ("gating", "gelu", "gating='gelu' is not supported"),
    ("norm", "layer_norm", "norm='layer_norm'"),
    ("cross_attention", True, "cross_attention=True is not supported"),
]  # fmt: skip
MIMI_FIELDS = [
    ("seanet.ratios", [8, 0, 5, 4], "seanet.ratios entry must be an integer"),
    ("seanet.ratios", "8654", "seanet.ratios must be a list"),
    ("frame_rate", 0, "frame_rate must be a finite number above 0"),
    ("sample_rate", 1, "sample_rate must be an integer in [1000,"),
    ("quantizer.n_q", 0, "quantizer.n_q must be an integer"),
    ("transformer.num_heads", 5, "must be a multiple of num_heads"),
    ("seanet.activation", "GELU", "seanet.activation='GELU' is not supported"),
    ("seanet.pad_mode", "reflect", "seanet.pad_mode='reflect' is not supported"),
    ("transformer.norm", "rms_norm", "transformer.norm='rms_norm' is not supported"),
    ("transformer", [], "transformer must be an object"),
]  # fmt: skip


@pytest.mark.parametrize("key, value, words", LM_FIELDS + MIMI_FIELDS)
def test_bad_config_values_are_one_line_naming_file_and_field(capsys, tmp_path, pytorch_repo,
                                                              key, value, words):  # fmt: skip
    folder = copy_folder(pytorch_repo, tmp_path / "model")
    name = "mimi_config.json" if (key, value, words) in MIMI_FIELDS else "config.json"
    with_upstream_config(folder, name, set_field(key, value))
    speech_wav(tmp_path / "in.wav")
    code, err = cli(capsys, "run", tmp_path / "in.wav", tmp_path / "o.wav", "--hf-path", folder)
    one_line_error(code, err, str(folder / name), words)
    assert not (tmp_path / "o.wav").exists()


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.clear() or c.update({"format": "moshi-mlx"}), "section 'files' is missing"),
    (lambda c: c.pop("lm"), "section 'lm' is missing or not an object"),
    (lambda c: c.update(mimi="none"), "section 'mimi' is missing or not an object"),
    (lambda c: c.update(quantization={"bits": 8, "group_size": 64}),
     "quantization says bits 8, group_size 64 but the weights are float"),
])  # fmt: skip
def test_broken_converted_configs_are_one_line(capsys, tmp_path, model_dir, edit, words):
    folder = copy_folder(model_dir, tmp_path / "model")
    with_upstream_config(folder, "config.json", edit)
    speech_wav(tmp_path / "in.wav")
    code, err = cli(capsys, "run", tmp_path / "in.wav", tmp_path / "o.wav", "--hf-path", folder)
    one_line_error(code, err, "config.json", words)


def test_a_config_that_is_not_an_object_is_one_line(capsys, tmp_path, pytorch_repo):
    folder = copy_folder(pytorch_repo, tmp_path / "model")
    (folder / "config.json").write_text("[1, 2, 3]")
    code, err = cli(capsys, "convert", "--hf-path", folder, "--mlx-path", tmp_path / "out")
    one_line_error(code, err, "config", "must hold a JSON object")


def rewrite_weights(path: Path, change) -> None:
    weights = dict(mx.load(str(path)))
    change(weights)
    mx.save_safetensors(str(path), weights)


@pytest.mark.parametrize("change, words", [
    (lambda w: w.update({"text_linear.weight": w["text_linear.weight"].astype(mx.int32)}),
     "text_linear.weight is stored as int32 where the model needs floating point"),
    (lambda w: w.update({"out_norm.alpha": mx.full(w["out_norm.alpha"].shape, mx.nan)}),
     "out_norm.weight holds NaN or infinite values"),
    (lambda w: w.update({"emb.3.weight": w["emb.3.weight"].at[0, 0].add(mx.inf)}),
     "emb.3.weight holds NaN or infinite values"),
])  # fmt: skip
def test_broken_weights_are_one_line(capsys, tmp_path, pytorch_repo, change, words):
    folder = copy_folder(pytorch_repo, tmp_path / "model")
    rewrite_weights(folder / "model.safetensors", change)
    speech_wav(tmp_path / "in.wav")
    code, err = cli(capsys, "run", tmp_path / "in.wav", tmp_path / "o.wav", "--hf-path", folder)
    one_line_error(code, err, words)
    code, err = cli(capsys, "convert", "--hf-path", folder, "--mlx-path", tmp_path / "out")
    one_line_error(code, err, words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.wav", "model"]


def safetensors_with(entries: dict, data: bytes) -> bytes:
    header = json.dumps(entries).encode()
    return len(header).to_bytes(8, "little") + header + data


@pytest.mark.parametrize("entries, data, words", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "overlaps another"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), "leaves a gap"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8),
     "do not end where the file does"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "holds 8 bytes"),
    ({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, bytes(1), "malformed entry"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4), "malformed entry"),
])  # fmt: skip
def test_hostile_safetensors_headers_are_refused(capsys, tmp_path, pytorch_repo, entries, data,
                                                 words):  # fmt: skip
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(safetensors_with(entries, data))
    code, err = cli(capsys, "convert", "--hf-path", pytorch_repo, "--moshi-weights", bad,
                    "--mlx-path", tmp_path / "out")  # fmt: skip
    one_line_error(code, err, str(bad), "not a valid safetensors file", words)


def wav_bytes(channels=1, rate=24000, bits=16, tag=1, align=None, data=b"\0\0" * 100,
              declared=None) -> bytes:  # fmt: skip
    align = channels * bits // 8 if align is None else align
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits)
    size = len(data) if declared is None else declared
    body = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", size) + data
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


@pytest.mark.parametrize("wav, words", [
    (wav_bytes(channels=0), "broken WAV header (0 channels)"),
    (wav_bytes(rate=1), "a sample rate of 1 Hz"),  # would resample to 24000x its length
    (wav_bytes(rate=4_000_000), "a sample rate of 4000000 Hz"),
    (wav_bytes(bits=12), "unsupported WAV encoding"),
    (wav_bytes(tag=6, bits=8), "unsupported WAV encoding (format 0x6"),
    (wav_bytes(align=3), "blocks of 3 bytes for 1 channels of 16 bit"),
    (b"RIFF\0\0\0\0WAVEfmt ", "broken WAV file (no fmt chunk)"),
    (b"ID3\x04" + bytes(100), "is not a WAV file"),
])  # fmt: skip
def test_impossible_wav_headers_are_one_line(capsys, tmp_path, model_dir, wav, words):
    (tmp_path / "in.wav").write_bytes(wav)
    code, err = cli(capsys, "run", tmp_path / "in.wav", tmp_path / "o.wav", "--hf-path",
                    model_dir)  # fmt: skip
    one_line_error(code, err, "in.wav", words)
    assert not (tmp_path / "o.wav").exists()


def test_a_wav_shorter_than_its_header_is_read_with_a_warning(capsys, tmp_path, model_dir):
    (tmp_path / "in.wav").write_bytes(wav_bytes(data=bytes(2 * 4800), declared=2 * 48000))
    code, err = cli(capsys, "run", tmp_path / "in.wav", tmp_path / "o.wav", "--hf-path",
                    model_dir, "--sampler", "greedy")  # fmt: skip
    assert code == 0, err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert warning == ["moshi-mlx run: warning: " + f"{tmp_path / 'in.wav'} is shorter than its "
                       "header says: reading the 0.20 s that are there"]  # fmt: skip
    assert read_wav(tmp_path / "o.wav")[0].shape[0] == 3 * 1920


@pytest.mark.parametrize("args, words", [
    (["--temp", "nan"], "--temp must be a finite number >= 0"),
    (["--top-k", "-1"], "--top-k must be an integer >= 0"),
    (["--top-p", "2"], "--top-p must be in [0, 1]"),
    (["--seed", "-1"], "--seed must be an integer >= 0"),
    (["-q", "--q-group-size", "0"], "--q-group-size must be 32, 64 or 128, got 0"),
    (["--q-bits", "8"], "--q-bits and --q-group-size need -q/--quantize"),
    (["--hf-path", ""], "--hf-path is empty"),
    (["--dtype", "float64"], "invalid choice: 'float64'"),
])  # fmt: skip
def test_bad_flags_are_one_line(capsys, tmp_path, model_dir, args, words):
    speech_wav(tmp_path / "in.wav")
    code, err = cli(capsys, "run", tmp_path / "in.wav", tmp_path / "o.wav", "--hf-path",
                    model_dir, *args)  # fmt: skip
    one_line_error(code, err, words)


@pytest.mark.parametrize("args, words", [
    (["--device-latency", "-1"], "--device-latency must be 'low', 'high' or seconds"),
    (["--device-latency", "nan"], "--device-latency must be"),
    (["--max-lag-ms", "inf"], "--max-lag-ms must be a finite number of ms"),
    (["--echo-cancel", "off", "--auto-gain"], "need --echo-cancel on"),
])  # fmt: skip
def test_bad_chat_flags_are_one_line(model_dir, args, words):
    r = moshi_mlx_cmd("chat", "--hf-path", model_dir, *args, timeout=60)
    one_line_error(r.returncode, r.stderr, words)


def test_bench_json_out_to_a_folder_is_one_line(capsys, tmp_path):
    code, err = cli(capsys, "bench", "--random-weights", "--json-out", tmp_path)
    one_line_error(code, err, "--json-out", "is a folder")


@pytest.fixture
def read_only(tmp_path):
    """A read-only file system."""
    yield from tmpfs(tmp_path / "ro", "ro,size=1m")


def test_an_unwritable_output_is_refused_before_any_compute(capsys, tmp_path, model_dir,
                                                            pytorch_repo, read_only):  # fmt: skip
    speech_wav(tmp_path / "in.wav")
    code, err = cli(capsys, "run", tmp_path / "in.wav", read_only / "o.wav", "--hf-path",
                    model_dir)  # fmt: skip
    one_line_error(code, err, "cannot write to the folder")
    code, err = cli(capsys, "convert", "--hf-path", pytorch_repo, "--mlx-path", read_only / "m")
    one_line_error(code, err, str(read_only / "m"))


def test_a_tokenizer_that_does_not_fit_the_lm_is_one_warning(capsys, tmp_path, pytorch_repo):
    from conftest import train_spm

    folder = copy_folder(pytorch_repo, tmp_path / "model")
    shutil.copy(train_spm(tmp_path / "spm", 64), folder / "tokenizer_spm_32k_3.model")
    with pytest.warns(moshi_mlx.errors.MoshiWarning, match="has 64 pieces but the LM writes 32000"):
        moshi_mlx.load(folder)


# ---- run on long inputs, and a closed stdout -------------------------------------------------


def peak_rss_mb(*args) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``moshi-mlx args`` in a child of its own and return its peak resident memory."""
    code = ("import resource, subprocess, sys; "
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode); "
            "print(r.stderr, file=sys.stderr)")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code, str(MOSHI_MLX), *map(str, args)],
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    kib, rc = map(int, r.stdout.split())
    return kib / 1024, subprocess.CompletedProcess(args, rc, "", r.stderr)


def test_run_memory_does_not_grow_with_the_input(tmp_path, model_dir):
    """5 s against 60 s of 44.1 kHz stereo input: read, resampled and written as it goes (the
    whole-file path kept every frame: 119 MB for 5 s, 250 MB for 2 minutes)."""
    peaks = {}
    for seconds in (5, 60):
        t = np.arange(int(seconds * 44100)) / 44100
        x = (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        write_wav(tmp_path / f"in{seconds}.wav", np.stack([x, x], axis=1), 44100)
        peaks[seconds], r = peak_rss_mb("run", tmp_path / f"in{seconds}.wav",
                                        tmp_path / f"out{seconds}.wav", "--hf-path", model_dir,
                                        "--sampler", "greedy")  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert (
            read_wav(tmp_path / f"out{seconds}.wav")[0].shape[0] == math.ceil(seconds * 12.5) * 1920
        )
    # 60 s of input is 10 MB as float32 at 44.1 kHz stereo, its answer 5.5 MB
    assert peaks[60] - peaks[5] < 8, peaks


@pytest.mark.parametrize(
    "sig, second_after_s",  # a second signal changes nothing; SIGTERM and SIGHUP act as Ctrl-C
    [
        (signal.SIGINT, None),
        (signal.SIGINT, 0.0),
        (signal.SIGINT, 0.05),
        (signal.SIGTERM, None),
        (signal.SIGHUP, None),
    ],
)
def test_a_stop_signal_keeps_what_run_computed_as_a_valid_shorter_wav(tmp_path, model_dir, sig,
                                                                       second_after_s):  # fmt: skip
    t = np.arange(24000 * 60) / 24000
    write_wav(tmp_path / "in.wav", (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24000)
    proc = subprocess.Popen([str(MOSHI_MLX), "run", tmp_path / "in.wav", tmp_path / "out.wav",
                             "--hf-path", model_dir, "--sampler", "greedy"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(".out.wav.") for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(1.0)  # some frames computed
        proc.send_signal(sig)
        if second_after_s is not None:
            time.sleep(second_after_s)
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "out.wav holds the first" in lines[0] and "Traceback" not in err
    x, rate = read_wav(tmp_path / "out.wav")
    assert rate == 24000 and 0 < len(x) < 60 * 24000 and len(x) % 1920 == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.wav", "out.wav"]


def test_a_closed_stdout_ends_quietly(tmp_path):
    r = subprocess.run(f"'{MOSHI_MLX}' bench --kv --no-lm --random-weights --mimi-config "
                       f"'{MIMI_DIR / 'config.json'}' --steps 3 --warmup 1 | head -c 5",
                       shell=True, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.stdout == "frame" and r.stderr == "", r.stderr
