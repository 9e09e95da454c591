"""``moshi-mlx convert`` and the folders it writes: round trips, sharding, quantization,
safety and every bad input, through the Python API and the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import LM_DIR, MIMI_DIR, UPSTREAM_MLX_DIR, moshi_mlx_cmd
from mlx.utils import tree_flatten

import moshi_mlx
from moshi_mlx.app.cli import main as cli_main
from moshi_mlx.convert.convert import convert
from moshi_mlx.lm import LmConfig
from moshi_mlx.quantize import Quantization
from moshi_mlx.weights import lm_rules, read_safetensors, sanitize

QUANT_DIR = UPSTREAM_MLX_DIR / "quant"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"


def logits(lm, codes):
    text, audio, _, _ = lm(codes)
    return text, audio


def same(a, b) -> bool:
    return all(mx.array_equal(x, y, equal_nan=True).item() for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def reference_lm():
    """The LM loaded straight from the PyTorch fixture file, float32."""
    return moshi_mlx.load_lm(LM_DIR / "weights.safetensors", LM_DIR / "config.json")


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory, pytorch_repo) -> Path:
    out = tmp_path_factory.mktemp("converted") / "moshiko-f32"
    convert(pytorch_repo, out, dtype="float32", mimi_config=pytorch_repo / "mimi_config.json")
    return out


# ---- round trips -----------------------------------------------------------------------------


def test_float32_folder_reloads_to_the_same_logits_as_the_pytorch_file(
    float_folder, reference_lm, lm_io
):
    lm, mimi, tokenizer = moshi_mlx.load(float_folder)
    codes = lm_io["tf_codes"]
    assert same(logits(lm, codes), logits(reference_lm, codes))
    assert lm.text_emb.weight.dtype == mx.float32
    assert tokenizer.get_piece_size() > 4 and tokenizer.id_to_piece(3) == "<pad>"


def test_converted_mimi_decodes_like_the_pytorch_file(float_folder, mimi_io):
    _, mimi, _ = moshi_mlx.load(float_folder)
    reference = moshi_mlx.load_mimi(MIMI_DIR / "weights.safetensors", MIMI_DIR / "config.json")
    codes = mimi_io["codes"][:, :8]
    assert mimi.num_codebooks == 8  # what the LM uses
    assert mx.array_equal(mimi.decode(codes), reference.decode(codes)).item()
    assert mx.array_equal(mimi.encode(mimi_io["pcm"]), mimi_io["codes"][:, :8]).item()


def test_default_dtype_keeps_the_stored_bfloat16_bit_for_bit(tmp_path, pytorch_repo):
    out = tmp_path / "bf16"
    result = convert(pytorch_repo, out)
    assert result.dtype == "bfloat16" and result.quantization is None
    lm, _, _ = moshi_mlx.load(out)
    ref = moshi_mlx.load_lm(LM_DIR / "weights.safetensors", LM_DIR / "config.json", dtype=None)
    ours, theirs = dict(tree_flatten(lm.parameters())), dict(tree_flatten(ref.parameters()))
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == mx.bfloat16
        assert mx.array_equal(ours[k], theirs[k]).item(), k


def test_folder_holds_config_files_and_model_card(float_folder):
    config = json.loads((float_folder / "config.json").read_text())
    assert config["format"] == "moshi-mlx"
    upstream = json.loads((LM_DIR / "config.json").read_text())
    assert LmConfig.from_dict(config["lm"]) == LmConfig.from_dict(upstream)
    assert all(upstream[k] == v for k, v in config["lm"].items() if k in upstream)
    assert config["mimi"]["seanet"]["dimension"] == 64
    assert config["quantization"] is None and config["dtype"] == "float32"
    assert config["files"] == {
        "lm": ["model.safetensors"],
        "mimi": "mimi.safetensors",
        "tokenizer": "tokenizer_spm_32k_3.model",
    }
    names = sorted(p.name for p in float_folder.iterdir())
    assert names == sorted(
        [
            "README.md",
            "config.json",
            "mimi.safetensors",
            "model.safetensors",
            "model.safetensors.index.json",
            "tokenizer_spm_32k_3.model",
        ]
    )
    mimi = mx.load(str(float_folder / "mimi.safetensors"))
    assert {a.dtype for a in mimi.values()} == {mx.float32}
    card = (float_folder / "README.md").read_text()
    assert "moshi_mlx.load" in card and "float32, not quantized" in card


# ---- quantized round trips -------------------------------------------------------------------


@pytest.mark.parametrize("bits, group_size", [(8, 32), (4, 32), (4, 64)])
def test_quantized_folder_reloads_by_itself_to_the_measured_model(
    tmp_path, pytorch_repo, lm_io, bits, group_size
):
    out = tmp_path / f"q{bits}"
    result = convert(pytorch_repo, out, quantize=Quantization(bits, group_size))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == bits
    assert config["quantization"]["group_size"] == group_size
    kept = sorted(k for k, v in config["quantization"].items() if v is False)
    assert kept == sorted(result.quantization.kept) and kept  # the fixture's odd widths
    # No flags on reload: bits and group size come back from the folder; computed in float32
    # it is exactly the model the quantization table measures.
    lm, _, _ = moshi_mlx.load(out, dtype="float32")
    measured = moshi_mlx.load_lm(LM_DIR / "weights.safetensors", LM_DIR / "config.json", None,
                                 quantize=Quantization(bits, group_size))  # fmt: skip
    measured.set_dtype(mx.float32)
    codes = lm_io["tf_codes"]
    assert same(logits(lm, codes), logits(measured, codes))
    assert lm.text_emb.bits == bits and lm.text_emb.group_size == group_size


def test_default_group_sizes_are_kyutais(tmp_path, pytorch_repo):
    for bits, group_size in ((4, 32), (8, 64)):
        out = tmp_path / f"q{bits}"
        result = convert(pytorch_repo, out, quantize=Quantization(bits))
        assert result.quantization.settings == Quantization(bits, group_size)


@pytest.fixture
def kyutai_quant_repo(tmp_path, spm_model) -> Path:
    """Kyutai-MLX-style folder of the quantizable upstream fixture (bf16, q8 and q4 files)."""
    repo = tmp_path / "quant-repo"
    repo.mkdir()
    shutil.copy(QUANT_DIR / "config.json", repo / "config.json")
    shutil.copy(MIMI_DIR / "weights.safetensors", repo / MIMI_FILE)
    shutil.copy(MIMI_DIR / "config.json", repo / "mimi_config.json")
    shutil.copy(spm_model, repo / "tokenizer_spm_32k_3.model")
    return repo


@pytest.mark.parametrize("bits, group_size, theirs", [
    (8, 64, "model.q8.safetensors"), (4, 32, "model.q4.safetensors"),
])  # fmt: skip
def test_quantizing_kyutais_bf16_gives_their_quantized_file_bit_for_bit(
    tmp_path, kyutai_quant_repo, bits, group_size, theirs
):
    shutil.copy(QUANT_DIR / "model.safetensors", kyutai_quant_repo / "model.safetensors")
    out = tmp_path / "ours"
    convert(kyutai_quant_repo, out, quantize=Quantization(bits, group_size))
    ours = mx.load(str(out / "model.safetensors"))
    schedule = LmConfig.from_dict(json.loads((QUANT_DIR / "config.json").read_text())).schedule
    expected = sanitize(read_safetensors(QUANT_DIR / theirs), lm_rules(schedule))
    assert ours.keys() == expected.keys()
    for k in ours:
        assert ours[k].dtype == expected[k].dtype, k
        assert mx.array_equal(ours[k], expected[k]).item(), k


def test_kyutai_quantized_repo_converts_without_requantizing(tmp_path, kyutai_quant_repo):
    shutil.copy(QUANT_DIR / "model.q4.safetensors", kyutai_quant_repo / "model.q4.safetensors")
    result = convert(kyutai_quant_repo, tmp_path / "q4")
    assert result.quantization.settings == Quantization(4, 32) and not result.quantization.kept
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4}
    assert config["source"]["layout"] == "kyutai-mlx"
    with pytest.raises(ValueError, match="already quantized \\(4-bit, group size 32\\)"):
        convert(kyutai_quant_repo, tmp_path / "again", quantize=Quantization(8))
    assert not (tmp_path / "again").exists()


def test_large_models_are_sharded_like_mlx_lm(tmp_path, pytorch_repo, reference_lm, lm_io):
    out = tmp_path / "sharded"
    result = convert(pytorch_repo, out, dtype="float32", max_shard_bytes=8 << 20)
    n = len(result.lm_files)  # 32.6 MB of float32 weights in 8 MiB files
    assert n >= 4
    assert result.lm_files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(result.lm_files)
    stored = {}
    for name in result.lm_files:
        part = mx.load(str(out / name))
        assert sum(a.nbytes for a in part.values()) <= 8 << 20 or len(part) == 1
        stored.update(part)
    assert stored.keys() == index["weight_map"].keys()
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in stored.values())
    lm, _, _ = moshi_mlx.load(out)
    codes = lm_io["tf_codes"]
    assert same(logits(lm, codes), logits(reference_lm, codes))
    # Without our config.json the shards are still found, through the index.
    shutil.copy(LM_DIR / "config.json", out / "config.json")
    shutil.copy(MIMI_DIR / "config.json", out / "mimi_config.json")
    lm, _, _ = moshi_mlx.load(out)
    assert same(logits(lm, codes), logits(reference_lm, codes))
    (out / "model.safetensors.index.json").unlink()  # and through mlx-lm's file names
    assert moshi_mlx.loading.find_model_files(out).lm_weights == [out / f for f in result.lm_files]


def test_single_files_without_a_folder(tmp_path, pytorch_repo, reference_lm, lm_io):
    out = tmp_path / "files"
    convert(
        mlx_path=out,
        moshi_weights=pytorch_repo / "model.safetensors",
        mimi_weights=pytorch_repo / MIMI_FILE,
        tokenizer=pytorch_repo / "tokenizer_spm_32k_3.model",
        lm_config=LM_DIR / "config.json",
        mimi_config=MIMI_DIR / "config.json",
        dtype="float32",
    )
    lm, _, _ = moshi_mlx.load(out)
    assert same(logits(lm, lm_io["tf_codes"]), logits(reference_lm, lm_io["tf_codes"]))


# ---- safety ----------------------------------------------------------------------------------


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("error, raised", [
    (OSError(28, "No space left on device"), ValueError),  # one line: "cannot write ..."
    (KeyboardInterrupt(), KeyboardInterrupt),
])  # fmt: skip
def test_failed_conversion_leaves_nothing(tmp_path, pytorch_repo, monkeypatch, error, raised):
    import moshi_mlx.convert.convert as module

    real, calls = module.write_safetensors, []

    def failing(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:  # after the LM, while writing Mimi
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "write_safetensors", failing)
    with pytest.raises(raised):
        convert(pytorch_repo, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_failed_forced_conversion_keeps_the_previous_folder(tmp_path, pytorch_repo, monkeypatch):
    import moshi_mlx.convert.convert as module

    out = tmp_path / "out"
    convert(pytorch_repo, out)
    before = sorted(p.name for p in out.iterdir())

    def failing(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "write_safetensors", failing)
    with pytest.raises(ValueError, match="cannot write .*: No space left on device"):
        convert(pytorch_repo, out, force=True, dtype="float32")
    assert sorted(p.name for p in out.iterdir()) == before and leftovers(tmp_path) == []


def test_force_replaces_only_an_earlier_conversion(tmp_path, pytorch_repo):
    out = tmp_path / "out"
    convert(pytorch_repo, out)
    with pytest.raises(ValueError, match="already exists; pass `force`"):
        convert(pytorch_repo, out, dtype="float32")
    convert(pytorch_repo, out, dtype="float32", force=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert leftovers(tmp_path) == []
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="`force` would delete notes.txt"):
        convert(pytorch_repo, precious, force=True)
    with pytest.raises(ValueError, match="holds the input file"):
        convert(pytorch_repo, pytorch_repo, force=True)
    assert (precious / "notes.txt").read_text() == "keep me"


# ---- command line and bad inputs -------------------------------------------------------------


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``moshi-mlx convert ...`` in this process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(["convert", *map(str, argv)])
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(result, *fragments: str) -> None:
    code, _, err = result
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("moshi-mlx convert: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_end_to_end_in_a_subprocess(tmp_path, pytorch_repo, lm_io):
    out = tmp_path / "q8"
    done = moshi_mlx_cmd("convert", "--hf-path", pytorch_repo, "--mimi-config",
                         pytorch_repo / "mimi_config.json", "--mlx-path", out, "-q", "8",
                         "--q-group-size", "32", timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}: LM 8-bit, group size 32: 68 layers; 18 kept in float" in done.stdout
    lm, mimi, tokenizer = moshi_mlx.load(out)
    text, _, _, _ = lm(lm_io["tf_codes"])
    assert text.shape == (1, 1, 20, 32000) and lm.text_emb.bits == 8


def test_cli_writes_the_same_folder_as_the_api(tmp_path, pytorch_repo, float_folder):
    code, stdout, _ = run_cli("--hf-path", pytorch_repo, "--mlx-path", tmp_path / "cli",
                              "--dtype", "float32")  # fmt: skip
    assert code == 0 and "LM float32 in 1 file(s)" in stdout
    for name in ("model.safetensors", "mimi.safetensors", "config.json"):
        assert (tmp_path / "cli" / name).read_bytes() == (float_folder / name).read_bytes(), name


def test_cli_truncated_weights(tmp_path, pytorch_repo):
    bad = tmp_path / "model.safetensors"
    data = (pytorch_repo / "model.safetensors").read_bytes()
    bad.write_bytes(data[: len(data) - 1000])
    result = run_cli("--hf-path", pytorch_repo, "--moshi-weights", bad, "--mlx-path",
                     tmp_path / "out")  # fmt: skip
    assert_one_line_error(result, str(bad), "truncated or corrupt")
    assert not (tmp_path / "out").exists()


def test_cli_mimi_file_as_moshi_weights(tmp_path, pytorch_repo):
    result = run_cli("--hf-path", pytorch_repo, "--moshi-weights", pytorch_repo / MIMI_FILE,
                     "--mlx-path", tmp_path / "out")  # fmt: skip
    assert_one_line_error(result, "--moshi-weights", "is a Mimi codec checkpoint, not a Moshi LM")


def test_cli_not_a_checkpoint_at_all(tmp_path, pytorch_repo):
    other = tmp_path / "other.safetensors"
    mx.save_safetensors(str(other), {"vision.patch_embed.weight": mx.zeros((4, 4))})
    result = run_cli("--hf-path", pytorch_repo, "--mimi-weights", other, "--mlx-path",
                     tmp_path / "out")  # fmt: skip
    assert_one_line_error(result, "--mimi-weights", "is not a Mimi codec checkpoint",
                          "vision.patch_embed.weight")  # fmt: skip


def test_cli_keys_that_do_not_match_the_config(tmp_path, pytorch_repo):
    config = json.loads((LM_DIR / "config.json").read_text()) | {"num_layers": 3}
    (tmp_path / "lm.json").write_text(json.dumps(config))
    result = run_cli("--hf-path", pytorch_repo, "--lm-config", tmp_path / "lm.json",
                     "--mlx-path", tmp_path / "out")  # fmt: skip
    assert_one_line_error(result, "missing key(s), e.g. transformer.layers.2.", "num_layers")
    config["num_layers"], config["dim"] = 2, 128
    (tmp_path / "lm.json").write_text(json.dumps(config))
    result = run_cli("--hf-path", pytorch_repo, "--lm-config", tmp_path / "lm.json",
                     "--mlx-path", tmp_path / "out")  # fmt: skip
    assert_one_line_error(result, "has shape", "but the config gives")


@pytest.mark.parametrize("flags, message", [
    (["-q", "--q-bits", "3"], "--q-bits must be 4 or 8, got 3"),
    (["-q", "--q-group-size", "48"], "--q-group-size must be 32, 64 or 128, got 48"),
    (["--dtype", "float64"], "invalid choice: 'float64'"),
    (["--q-bits", "8"], "need -q/--quantize"),
    (["--q-group-size", "32"], "need -q/--quantize"),
    (["-q", "4", "--q-bits", "8"], "disagree"),
])  # fmt: skip
def test_cli_bad_settings(tmp_path, pytorch_repo, flags, message):
    result = run_cli("--hf-path", pytorch_repo, "--mlx-path", tmp_path / "out", *flags)
    assert_one_line_error(result, message)
    assert not (tmp_path / "out").exists()


def test_cli_unknown_repo_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli("--hf-path", "kyutai/no-such-model", "--mlx-path", tmp_path / "out")
    assert_one_line_error(result, "kyutai/no-such-model", "HF_HUB_OFFLINE=1", "local folder")


def test_cli_existing_output_needs_force(tmp_path, pytorch_repo):
    (tmp_path / "out").mkdir()
    result = run_cli("--hf-path", pytorch_repo, "--mlx-path", tmp_path / "out")
    assert_one_line_error(result, "already exists; pass --force to replace it")
    assert run_cli("--hf-path", pytorch_repo, "--mlx-path", tmp_path / "out", "--force")[0] == 0


def test_cli_needs_an_input(tmp_path):
    assert_one_line_error(run_cli("--mlx-path", tmp_path / "out"), "give --hf-path")


# ---- every missing piece at once ---------------------------------------------------------------


def test_every_missing_piece_is_named_in_one_message(tmp_path, pytorch_repo):
    lm_only = tmp_path / "lm-only"  # the LM and its config: no Mimi, no tokenizer
    lm_only.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copy(pytorch_repo / name, lm_only / name)
    result = run_cli("--hf-path", lm_only, "--mlx-path", tmp_path / "out")
    assert_one_line_error(result, "2 pieces are missing", "no Mimi codec weights found",
                          "--mimi-weights", "no text tokenizer", "--tokenizer")  # fmt: skip
    # The Mimi weights given, but not their config (the released codec's does not fit them).
    result = run_cli("--hf-path", lm_only, "--mimi-weights", pytorch_repo / MIMI_FILE,
                     "--mlx-path", tmp_path / "out")  # fmt: skip
    assert_one_line_error(result, "2 pieces are missing", "--tokenizer", "--mimi-config",
                          "the released codec's config was assumed")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_single_files_name_every_missing_flag(tmp_path, pytorch_repo):
    result = run_cli("--moshi-weights", pytorch_repo / "model.safetensors",
                     "--mlx-path", tmp_path / "out")  # fmt: skip
    assert_one_line_error(result, "no Mimi codec weights given: give --mimi-weights",
                          "no text tokenizer", "give --tokenizer",
                          "Moshi 7B's config was assumed", "--lm-config")  # fmt: skip


# ---- random weights --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("random") / "tiny"
    done = moshi_mlx_cmd("convert", "--random", "tiny", "--mlx-path", out, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {out}: random weights (tiny, seed 0)")
    return out


def test_random_tiny_folder_loads_and_answers_a_wav(tiny_folder, tmp_path):
    from moshi_mlx.random_weights import sized_config

    lm, mimi, tokenizer = moshi_mlx.load(tiny_folder)
    assert lm.cfg == sized_config("tiny")[0] and mimi.cfg == sized_config("tiny")[1]
    assert tokenizer.get_piece_size() == lm.cfg.text_card and tokenizer.pad_id() == 3
    config = json.loads((tiny_folder / "config.json").read_text())
    assert config["source"] == {"random": "tiny", "seed": 0, "layout": "moshi-mlx"}
    wav = tmp_path / "in.wav"
    write_tone(wav, seconds=1.0)
    done = moshi_mlx_cmd("run", wav, tmp_path / "out.wav", "--hf-path", tiny_folder, "--json",
                         "--seed", 1, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["frames"] == 13 and result["seconds"] == pytest.approx(13 * 0.08)
    assert result["text"]  # a random model says random words of its tokenizer
    assert (tmp_path / "out.wav").stat().st_size > 13 * 1920 * 2
    # Piped, the transcript is a line per turn: a random model never pads, so one line.
    done = moshi_mlx_cmd("run", wav, tmp_path / "out.wav", "--hf-path", tiny_folder, "--force",
                         "--seed", 1, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == result["text"] + "\n"


def write_tone(path: Path, seconds: float, rate: int = 24000) -> None:
    import wave

    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def test_random_folder_is_the_same_for_the_same_seed(tiny_folder, tmp_path):
    from moshi_mlx.convert.convert import convert_random

    again = convert_random("tiny", tmp_path / "again", seed=0)
    for name in ("model.safetensors", "mimi.safetensors", "tokenizer.model"):
        assert (again.path / name).read_bytes() == (tiny_folder / name).read_bytes(), name
    other = convert_random("tiny", tmp_path / "other", seed=1)
    for name in ("model.safetensors", "mimi.safetensors"):
        assert (other.path / name).read_bytes() != (tiny_folder / name).read_bytes(), name


def test_random_folder_follows_the_output_rules(tiny_folder, tmp_path):
    from moshi_mlx.convert.convert import convert_random

    result = run_cli("--random", "tiny", "--mlx-path", tiny_folder)
    assert_one_line_error(result, "already exists; pass --force to replace it")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="`force` would delete notes.txt"):
        convert_random("tiny", precious, force=True)
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt"]
    assert leftovers(tmp_path) == []


def test_random_folder_quantized(tmp_path):
    code, stdout, _ = run_cli("--random", "tiny", "-q", "4", "--mlx-path", tmp_path / "q4")
    assert code == 0 and "random weights (tiny, seed 0): LM 4-bit" in stdout
    lm, _, _ = moshi_mlx.load(tmp_path / "q4")
    assert lm.text_emb.bits == 4 and lm.text_emb.group_size == 32


@pytest.mark.parametrize("flags, message", [
    (["--random", "tiny", "--hf-path", "x"], "--random makes its own weights: leave out --hf-path"),
    (["--random", "huge"], "invalid choice: 'huge'"),
    (["--hf-path", "x", "--seed", "3"], "--seed picks --random's weights"),
    (["--random", "tiny", "--seed", "-1"], "--seed must be an integer >= 0"),
])  # fmt: skip
def test_random_bad_flags(tmp_path, flags, message):
    assert_one_line_error(run_cli("--mlx-path", tmp_path / "out", *flags), message)
    assert not (tmp_path / "out").exists()
