"""Hostile input to the library and what it reads, second round (issue 19): codes that skipped
the checks never reach a gather, no silent wrong result, and one ``MoshiError`` line (or, on the
command line, exit code 1 and one stderr line without a traceback) where a traceback was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import LM_DIR, MIMI_DIR, MOSHI_MLX, UPSTREAM_MLX_DIR, moshi_mlx_cmd, run_python

import moshi_mlx
from moshi_mlx import MoshiError, persona
from moshi_mlx.loading import load_tokenizer, materialize
from moshi_mlx.memory import LIMIT_ENV, usable_memory
from moshi_mlx.mimi import MimiConfig
from moshi_mlx.weights import MAX_QUANT_PARAM

LM_WEIGHTS, LM_CONFIG = LM_DIR / "weights.safetensors", LM_DIR / "config.json"
MIMI_WEIGHTS, MIMI_CONFIG = MIMI_DIR / "weights.safetensors", MIMI_DIR / "config.json"
QUANT_DIR = UPSTREAM_MLX_DIR / "quant"  # Kyutai's layout, quantized as Kyutai does
Q4 = QUANT_DIR / "model.q4.safetensors"


@pytest.fixture(scope="module")
def lm():
    return moshi_mlx.load_lm(LM_WEIGHTS, LM_CONFIG)


@pytest.fixture(scope="module")
def mimi():
    m = moshi_mlx.load_mimi(MIMI_WEIGHTS, MIMI_CONFIG)
    m.set_num_codebooks(8)
    return m


def one_line(e: pytest.ExceptionInfo, *words: str) -> str:
    message = str(e.value)
    assert "\n" not in message, message
    for w in words:
        assert w in message, (w, message)
    return message


def cli_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit code 1, one line on stderr naming the cause, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def speech_wav(path: Path) -> Path:
    from moshi_mlx.app.wavio import write_wav

    t = np.arange(9600) / 24000
    write_wav(path, (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24000)
    return path


def rewrite(path: Path, change) -> None:
    weights = dict(mx.load(str(path)))
    change(weights)
    mx.save_safetensors(str(path), weights)


# ---- codes never reach a gather unchecked ----------------------------------------------------


def test_unchecked_huge_codes_do_not_crash_the_process():
    # In a child process: a gather past its table segfaulted, which would kill the suite.
    code = f"""
import mlx.core as mx, moshi_mlx
lm = moshi_mlx.load_lm({str(LM_WEIGHTS)!r}, {str(LM_CONFIG)!r})
gen = moshi_mlx.LmGen(lm, temp=0, temp_text=0)
for _ in range(4):
    out = gen.step(mx.full((1, 8), 10**9, mx.int32), moshi_codes=mx.full((1, 8), 10**9, mx.int32),
                   text_token=mx.array([10**9]), check=False)
mx.eval(out)
mimi = moshi_mlx.load_mimi({str(MIMI_WEIGHTS)!r}, {str(MIMI_CONFIG)!r})
for value, dtype in ((10**9, mx.int32), (2**32 - 1, mx.uint32), (-5, mx.int32)):
    mx.eval(mimi.decode_step(mx.full((1, 8, 1), value, dtype), check=False))
print("survived")
"""
    r = run_python(code, timeout=600)
    assert r.returncode == 0 and "survived" in r.stdout, (r.returncode, r.stderr[-2000:])


def logits(lm, codes: int, text: int, check: bool) -> list[np.ndarray]:
    """The logits of 5 steps given these user and Moshi codes and text token (what the
    embeddings read; the given codes themselves come back as Moshi's output unchanged)."""
    cfg = lm.cfg
    gen = moshi_mlx.LmGen(lm, temp=0.8, temp_text=0.7, seed=3)
    out = []
    for _ in range(5):
        moshi, text_token = mx.full((1, cfg.dep_q), codes, mx.int32), mx.array([text])
        user = mx.full((1, cfg.n_user), codes, mx.int32)
        gen.step(user, moshi_codes=moshi, text_token=text_token, check=check)
        out += [np.array(gen.last_text_logits), np.array(mx.stack(gen.last_audio_logits))]
    return out


@pytest.mark.parametrize("model", ["float", "q4"])
def test_unchecked_codes_past_the_tables_wrap_into_them(lm, model):
    if model == "q4":
        lm = moshi_mlx.load_lm(Q4, QUANT_DIR / "config.json")
    huge = logits(lm, 10**9, 10**9, check=False)
    # the tables have card + 1 and text_card + 1 rows (the last: the initial token)
    wrapped = logits(lm, 10**9 % (lm.cfg.card + 1), 10**9 % (lm.cfg.text_card + 1), check=True)
    first = logits(lm, 0, 0, check=True)
    for a, b in zip(huge, wrapped, strict=True):
        np.testing.assert_array_equal(a, b)
        assert np.isfinite(a).all()
    assert any((a != c).any() for a, c in zip(huge, first, strict=True))  # the codes matter


def test_unchecked_codes_past_the_codebooks_wrap_into_them(mimi):
    outs = []
    for value in (10**9, 10**9 % 2048):
        codes = mx.full((1, 8, 2), value, mx.int32)
        mimi.reset()
        outs.append(np.array(mimi.decode_step(codes, check=value < 2048)))
    mimi.reset()
    np.testing.assert_array_equal(outs[0], outs[1])
    assert np.abs(outs[1]).max() > 0


def test_unchecked_codes_still_have_their_types_and_shapes_checked(lm, mimi):
    gen = moshi_mlx.LmGen(lm)
    with pytest.raises(MoshiError) as e:
        gen.step(np.zeros((1, 8), np.int32), check=False)
    one_line(e, "user_codes must be an mx.array")
    with pytest.raises(MoshiError) as e:
        gen.step(mx.zeros((1, 8)), check=False)
    one_line(e, "user_codes must be integers")
    mimi.reset()
    with pytest.raises(MoshiError) as e:
        mimi.decode_step(mx.zeros((1, 8), mx.int32), check=False)
    one_line(e, "`codes` must be [batch, codebooks, frames]")


# ---- silent wrong results ----------------------------------------------------------------------


def test_load_lm_and_load_mimi_alone_refuse_nan_and_infinite_weights(tmp_path):
    lm_file, mimi_file = tmp_path / "lm.safetensors", tmp_path / "mimi.safetensors"
    shutil.copy(LM_WEIGHTS, lm_file)
    shutil.copy(MIMI_WEIGHTS, mimi_file)
    rewrite(lm_file, lambda w: w.update({"emb.2.weight": w["emb.2.weight"].at[5, 1].add(mx.nan)}))
    first_conv = "decoder.model.0."
    rewrite(mimi_file, lambda w: w.update(
        {k: v.at[0].add(mx.inf) for k, v in w.items() if k.startswith(first_conv)}))  # fmt: skip
    with pytest.raises(MoshiError) as e:
        moshi_mlx.load_lm(lm_file, LM_CONFIG)
    one_line(e, "emb.2.weight holds NaN or infinite values")
    with pytest.raises(MoshiError) as e:
        moshi_mlx.load_mimi(mimi_file, MIMI_CONFIG)
    one_line(e, "decoder.conv_in", "holds NaN or infinite values")
    # lazily, the check comes with reading the weights
    model = moshi_mlx.load_lm(lm_file, LM_CONFIG, lazy=True)
    with pytest.raises(MoshiError, match="emb.2.weight holds NaN"):
        materialize(model)


@pytest.mark.parametrize("value", [mx.nan, mx.inf, -mx.inf])
def test_encoding_nan_or_infinite_audio_is_refused(mimi, value):
    pcm = mx.zeros((1, 1, 3840)).at[0, 0, 2000].add(value)
    for encode in (mimi.encode, mimi.encode_step):
        mimi.reset()
        with pytest.raises(MoshiError) as e:
            encode(pcm)
        one_line(e, "`pcm` holds NaN or infinite samples")
    mimi.reset()


@pytest.mark.parametrize("dtype", [mx.int32, mx.uint8, mx.bool_, "int8", mx.float64])
def test_weights_are_never_cast_to_a_non_float_dtype(tmp_path, dtype):
    with pytest.raises(MoshiError) as e:
        moshi_mlx.load_lm(LM_WEIGHTS, LM_CONFIG, dtype)
    one_line(e, "`dtype` must be one of float32, float16, bfloat16")


def damaged_q4(tmp_path: Path, change) -> Path:
    path = tmp_path / "model.q4.safetensors"
    shutil.copy(Q4, path)
    rewrite(path, change)
    return path


def three_bit(w: dict) -> None:
    prefix = "transformer.layers.0.self_attn.out_proj"
    rows, packed = w[f"{prefix}.weight"].shape
    dense = mx.random.normal((rows, packed * 32 // 4), key=mx.random.key(0))
    q, scales, biases = mx.quantize(dense, group_size=32, bits=3)
    w.update({f"{prefix}.weight": q, f"{prefix}.scales": scales.astype(mx.bfloat16),
              f"{prefix}.biases": biases.astype(mx.bfloat16)})  # fmt: skip


@pytest.mark.parametrize("change, words", [
    (lambda w: w.update({k: v * 1e30 for k, v in w.items() if k.endswith(".scales")}),
     "quantization scales"),
    (lambda w: w.update({"text_linear.biases": w["text_linear.biases"] * 1e30}),
     "quantization biases text_linear.biases reach 8.32e+29, beyond any real weight"),
    (lambda w: w.update({"text_linear.scales": w["text_linear.scales"].at[0, 0].add(mx.nan)}),
     "text_linear.scales holds NaN or infinite values"),
    (three_bit, "transformer.layers.0.self_attn.out_proj is stored at 3 bits, group size 32, "
                "but 81 other layers at 4 bits, group size 32"),
])  # fmt: skip
def test_damaged_quantized_weights_are_refused(tmp_path, change, words):
    path = damaged_q4(tmp_path, change)
    with pytest.raises(MoshiError) as e:
        moshi_mlx.load_lm(path, QUANT_DIR / "config.json")
    one_line(e, words)


def test_the_scale_bound_leaves_real_quantized_weights_far_inside():
    # Kyutai's own q4 and q8 files of the fixture load, and their largest scale and offset are
    # orders of magnitude below the bound
    for name in ("model.q4.safetensors", "model.q8.safetensors"):
        moshi_mlx.load_lm(QUANT_DIR / name, QUANT_DIR / "config.json")
        w = mx.load(str(QUANT_DIR / name))
        largest = max(mx.abs(v).max().item() for k, v in w.items()
                      if k.endswith((".scales", ".biases")))  # fmt: skip
        assert largest < MAX_QUANT_PARAM / 1000


def test_a_stereo_mimi_config_is_refused():
    config = json.loads(MIMI_CONFIG.read_text())
    with pytest.raises(MoshiError) as e:
        MimiConfig.from_dict({**config, "channels": 2})
    one_line(e, "channels=2 is not supported (only 1)")
    with pytest.raises(MoshiError) as e:
        moshi_mlx.load_mimi(MIMI_WEIGHTS, {**config, "channels": 2})
    one_line(e, "channels=2")


def test_q_bits_0_is_refused_not_taken_for_4(tmp_path, pytorch_repo):
    out = tmp_path / "out"
    for bits in ("0", "3", "16"):
        r = moshi_mlx_cmd("convert", "--hf-path", pytorch_repo, "--mlx-path", out, "-q",
                          "--q-bits", bits)  # fmt: skip
        cli_error(r, f"got {bits}")
        assert not out.exists()


# ---- one line, not a traceback -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["owner/..", "owner/...", "owner/name.git", "a/b--c"])
def test_invalid_repo_ids_are_one_line(tmp_path, name):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = moshi_mlx_cmd("run", speech_wav(tmp_path / "in.wav"), tmp_path / "o.wav", "--hf-path",
                      name, cwd=tmp_path, env=env)  # fmt: skip
    cli_error(r, name, "nor is it a valid Hugging Face repo id")
    with pytest.raises(MoshiError) as e:
        moshi_mlx.load(name)
    one_line(e, "nor is it a valid Hugging Face repo id")


def folder_with_config(tmp_path: Path, model_dir: Path, text: str) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    (folder / "config.json").write_text(text)
    return folder


@pytest.mark.parametrize("text, words", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"format": "moshi-mlx", "lm": {"dim": ' + "7" * 5000 + "}}", "cannot read config"),
])  # fmt: skip
def test_absurd_config_json_is_one_line(tmp_path, model_dir, text, words):
    folder = folder_with_config(tmp_path, model_dir, text)
    r = moshi_mlx_cmd("run", speech_wav(tmp_path / "in.wav"), tmp_path / "o.wav", "--hf-path",
                      folder)  # fmt: skip
    cli_error(r, str(folder / "config.json"), words)
    assert not (tmp_path / "o.wav").exists()


def test_a_deeply_nested_safetensors_header_is_one_line(tmp_path):
    header = ("[" * 100_000 + "]" * 100_000).encode()
    path = tmp_path / "weights.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(MoshiError) as e:
        moshi_mlx.load_lm(path, LM_CONFIG)
    one_line(e, "not a valid safetensors file")


@pytest.mark.parametrize("value", ["inf", "1e400", "nan", "-3", "0", "lots"])
def test_an_absurd_memory_limit_is_one_line(tmp_path, model_dir, monkeypatch, value):
    monkeypatch.setenv(LIMIT_ENV, value)
    with pytest.raises(MoshiError) as e:
        usable_memory()
    one_line(e, LIMIT_ENV, repr(value))
    if value in ("inf", "1e400"):
        r = moshi_mlx_cmd("run", speech_wav(tmp_path / "in.wav"), tmp_path / "o.wav",
                          "--hf-path", model_dir)  # fmt: skip
        cli_error(r, LIMIT_ENV)


def test_an_input_device_index_past_any_integer_is_one_line():
    from moshi_mlx.app.audio import choose_devices, import_sounddevice

    sd = import_sounddevice()
    with pytest.raises(MoshiError) as e:
        choose_devices(sd, "99999999999999999999", None)
    one_line(e, "no input device 99999999999999999999")


@pytest.mark.parametrize("where", ["a weight file", "config.json"])
def test_a_symlink_loop_in_a_model_folder_is_one_line(tmp_path, model_dir, where):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    name = "model.safetensors" if where == "a weight file" else "config.json"
    (folder / name).unlink()
    (folder / "other").symlink_to(folder / name)
    (folder / name).symlink_to(folder / "other")
    r = moshi_mlx_cmd("run", speech_wav(tmp_path / "in.wav"), tmp_path / "o.wav", "--hf-path",
                      folder)  # fmt: skip
    cli_error(r, "points back to itself")


def test_a_config_json_that_is_a_folder_is_one_line(tmp_path, model_dir):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    r = moshi_mlx_cmd("run", speech_wav(tmp_path / "in.wav"), tmp_path / "o.wav", "--hf-path",
                      folder)  # fmt: skip
    cli_error(r, "config.json is a folder")


def test_a_text_prompt_that_is_not_utf8_is_one_line(tmp_path, model_dir, spm_model):
    tokenizer = load_tokenizer(spm_model)
    with pytest.raises(MoshiError) as e:
        persona.text_prompt_tokens(tokenizer, "be \udcff kind")
    one_line(e, "not UTF-8")
    # from the command line: argv bytes that are not UTF-8 arrive as lone surrogates
    argv = [MOSHI_MLX, "run", speech_wav(tmp_path / "in.wav"), tmp_path / "o.wav", "--hf-path",
            model_dir, "--text-prompt", b"be \xff kind"]  # fmt: skip
    r = subprocess.run([os.fsencode(a) for a in argv], capture_output=True, text=True)
    cli_error(r, "not UTF-8")
    assert not (tmp_path / "o.wav").exists()


def test_weights_cut_short_while_being_read_are_one_line(tmp_path, pytorch_repo):
    lm_file = tmp_path / "lm.safetensors"
    shutil.copy(LM_WEIGHTS, lm_file)
    model = moshi_mlx.load_lm(lm_file, LM_CONFIG, lazy=True)
    os.truncate(lm_file, lm_file.stat().st_size // 2)
    with pytest.raises(MoshiError) as e:
        materialize(model)
    one_line(e, "cut short or changed while it was being read")


def test_a_conversion_whose_source_is_cut_short_meanwhile_is_one_line(tmp_path, pytorch_repo):
    from moshi_mlx.convert.convert import convert

    source = tmp_path / "source"
    shutil.copytree(pytorch_repo, source)
    lm_file = source / "model.safetensors"

    def cut(name, done, total):
        if lm_file.stat().st_size > 1000:
            os.truncate(lm_file, 1000)

    out = tmp_path / "out"
    with pytest.raises(MoshiError) as e:
        convert(source, out, mimi_config=source / "mimi_config.json", progress=cut)
    one_line(e, "cut short or changed while it was being read")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


@pytest.mark.parametrize("mlx_path", [".", ""])
def test_mlx_path_naming_the_current_folder_is_one_line(tmp_path, pytorch_repo, mlx_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    r = moshi_mlx_cmd("convert", "--hf-path", pytorch_repo, "--mlx-path", mlx_path, "--force",
                      cwd=work)  # fmt: skip
    cli_error(r, "names no new folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]


# ---- library arguments of the wrong type -------------------------------------------------------


class Tokenizer:
    def encode(self, text):
        return [1, 2]


BAD_CALLS = [
    (lambda lm, mimi: moshi_mlx.load(5), "`path_or_repo_id` must be a path"),
    (lambda lm, mimi: moshi_mlx.load(None), "`path_or_repo_id` must be a path"),
    (lambda lm, mimi: moshi_mlx.load(LM_DIR, parts=5), "`parts` must be a list"),
    (lambda lm, mimi: moshi_mlx.load(LM_DIR, dtype=[1]), "`dtype` must be one of"),
    (lambda lm, mimi: moshi_mlx.load(LM_DIR, quantize=4), "`quantize` must be a Quantization"),
    (lambda lm, mimi: moshi_mlx.load(LM_DIR, progress=5), "`progress` must be a function"),
    (lambda lm, mimi: moshi_mlx.load(LM_DIR, mimi_device="gpu"), "`mimi_device` must be"),
    (lambda lm, mimi: moshi_mlx.load_lm(5), "`weights` must be a path or a non-empty list"),
    (lambda lm, mimi: moshi_mlx.load_lm([]), "`weights` must be a path or a non-empty list"),
    (lambda lm, mimi: moshi_mlx.load_lm(LM_WEIGHTS, 5), "`config` must be LmConfig"),
    (lambda lm, mimi: moshi_mlx.load_lm(LM_WEIGHTS, LM_CONFIG, quantize="4"),
     "`quantize` must be a Quantization"),
    (lambda lm, mimi: moshi_mlx.load_mimi(None), "`weights` must be a path"),
    (lambda lm, mimi: moshi_mlx.load_mimi(MIMI_WEIGHTS, 5), "`config` must be MimiConfig"),
    (lambda lm, mimi: moshi_mlx.load_mimi(MIMI_WEIGHTS, MIMI_CONFIG, "cpu"),
     "`device` must be an mx.Device"),
    (lambda lm, mimi: moshi_mlx.LmGen(None), "`lm` must be an Lm"),
    (lambda lm, mimi: moshi_mlx.LmGen(lm, 5), "`sampling` must be a Sampling"),
    (lambda lm, mimi: moshi_mlx.LmGen(lm, bogus=1), "unknown sampling field(s) bogus"),
    (lambda lm, mimi: moshi_mlx.LmGen(lm).step(mx.zeros((1, 8), mx.int32), timings=5),
     "`timings` must be a dict"),
    (lambda lm, mimi: moshi_mlx.LmGen(lm).system_prompt(None, "hello"),
     "text_tokens must be token ids, not a str"),
    (lambda lm, mimi: moshi_mlx.Sampling(temp="hot"), "`temp` must be a finite number"),
    (lambda lm, mimi: moshi_mlx.Quantization(4.0), "`bits` must be 4 or 8"),
    (lambda lm, mimi: moshi_mlx.Quantization(4, [32]), "`group_size` must be 32, 64 or 128"),
    (lambda lm, mimi: mimi.decode(mx.zeros((1, 8, 0), mx.int32)), "at least one frame"),
    (lambda lm, mimi: mimi.encode(mx.zeros((1, 1920))), "`pcm` must be [batch, 1, samples]"),
    (lambda lm, mimi: mimi.set_num_codebooks("8"), "num_codebooks must be in [1, 32]"),
    (lambda lm, mimi: mimi.set_num_codebooks(8.5), "num_codebooks must be in [1, 32]"),
    (lambda lm, mimi: persona.text_prompt_tokens(Tokenizer(), 5), "`text` must be a str"),
    (lambda lm, mimi: persona.text_prompt_tokens(None, "hi"), "`tokenizer` must be"),
    (lambda lm, mimi: persona.voice_prompt_from_pcm(None, np.zeros(1920, np.float32), 24000),
     "`mimi` must be a Mimi"),
    (lambda lm, mimi: persona.save_voice_prompt(5, mx.zeros((1, 8, 2), mx.int32), mimi),
     "`path` must be a path"),
    (lambda lm, mimi: persona.save_voice_prompt("v.safetensors", "codes", mimi),
     "`codes` must be an integer mx.array"),
    (lambda lm, mimi: persona.save_voice_prompt("v.safetensors", mx.full((1, 8, 2), 1e12), mimi),
     "voice prompt codes must be integers in [0, 2048)"),
    (lambda lm, mimi: persona.load_voice_prompt(5, mimi), "`path` must be a path"),
    (lambda lm, mimi: persona.load_voice_prompt("v.safetensors", None), "`mimi` must be a Mimi"),
    (lambda lm, mimi: persona.is_persona_model(None), "`lm.cfg` must be an LmConfig"),
]  # fmt: skip


@pytest.mark.parametrize("call, words", BAD_CALLS)
def test_library_entry_points_refuse_wrong_types_in_one_line(lm, mimi, tmp_path, monkeypatch,
                                                             call, words):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MoshiError) as e:
        call(lm, mimi)
    one_line(e, words)
    assert list(tmp_path.iterdir()) == []


def test_mx_device_types_are_accepted_where_a_device_is():
    mimi = moshi_mlx.load_mimi(MIMI_WEIGHTS, MIMI_CONFIG, mx.cpu)
    assert mimi.device == mx.Device(mx.cpu)
