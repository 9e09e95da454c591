"""Memory arithmetic against the arrays the models really hold, and the check that refuses a
model too big for the device before anything is read."""

from __future__ import annotations

import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import LM_DIR, MIMI_DIR
from mlx.utils import tree_flatten

import moshi_mlx
from moshi_mlx import LmConfig, MimiConfig, Quantization
from moshi_mlx.app.cli import main as cli_main
from moshi_mlx.errors import MoshiError
from moshi_mlx.lm import Lm
from moshi_mlx.memory import (
    GB,
    LIMIT_ENV,
    check_fits,
    fill_context,
    footprint,
    kv_cache_bytes,
    lm_parameters,
    lm_tensors,
    lm_weight_bytes,
    mimi_bytes,
    mimi_parameters,
    param_bytes,
    usable_memory,
)
from moshi_mlx.mimi import Mimi

# Widths 128 / 352 / 64 / 176: every layer quantizes with group 32 and 64.
SMALL = LmConfig(dim=128, text_card=64, num_heads=2, num_layers=2, context=24,
                 depformer_dim=64, depformer_dim_feedforward=264, depformer_num_heads=2,
                 depformer_num_layers=1)  # fmt: skip


@pytest.mark.parametrize(
    "dtype, quantization",
    [(mx.bfloat16, None), (mx.float32, None), (mx.bfloat16, Quantization(4)),
     (mx.bfloat16, Quantization(8)), (mx.float16, Quantization(4, 64))],
)  # fmt: skip
def test_lm_weight_bytes_are_those_of_the_built_model(dtype, quantization):
    built = moshi_mlx.random_lm(SMALL, dtype, quantization)
    assert lm_weight_bytes(SMALL, dtype, quantization) == param_bytes(built)


FIXTURE = LmConfig.from_dict(json.loads((LM_DIR / "config.json").read_text()))
VARIANTS = {
    "fixture": FIXTURE,  # widths 64/176/32/88: group 64 leaves some layers in float
    "moshi-7b": LmConfig.moshi_7b(),
    "moshi-2b": LmConfig.moshi_2b(),
    "personaplex": LmConfig.personaplex_7b(),
    "low-rank": dataclasses.replace(FIXTURE, depformer_low_rank_embeddings=16),
    "schedule": dataclasses.replace(FIXTURE,
                                    depformer_weights_per_step_schedule=[0, 1, 1, 2, 2, 2, 3, 3]),
    "one-set": dataclasses.replace(FIXTURE, depformer_weights_per_step=False,
                                   depformer_multi_linear=False),
}  # fmt: skip


@pytest.mark.parametrize("name", VARIANTS)
def test_the_lm_arithmetic_gives_the_shapes_the_model_builds(name):
    cfg = VARIANTS[name]
    built = sorted(tuple(v.shape) for _, v in tree_flatten(Lm(cfg).parameters()))
    listed = sorted(
        (cols,) if rows == 1 else (rows, cols)
        for count, rows, cols, _ in lm_tensors(cfg)
        for _ in range(count)
    )
    assert listed == built


@pytest.mark.parametrize("name", ["fixture", "low-rank", "schedule"])
@pytest.mark.parametrize("quantization", [Quantization(4, 32), Quantization(8, 64)])
def test_the_lm_arithmetic_quantizes_as_quantize_lm_does(name, quantization):
    cfg = VARIANTS[name]
    built = moshi_mlx.random_lm(cfg, mx.float16, quantization)
    assert lm_weight_bytes(cfg, mx.float16, quantization) == param_bytes(built)


@pytest.mark.parametrize("config", ["real", "fixture"])
def test_the_mimi_arithmetic_counts_the_parameters_the_codec_builds(config):
    cfg = MimiConfig() if config == "real" else moshi_mlx.load_mimi(
        MIMI_DIR / "weights.safetensors", MIMI_DIR / "config.json").cfg  # fmt: skip
    assert 4 * mimi_parameters(cfg) == param_bytes(Mimi(cfg))


def test_lm_weight_bytes_of_moshi_7b_match_kyutais_files():
    # model.safetensors / model.q8 / model.q4 of kyutai/moshiko-mlx-* (README, Convert)
    cfg = LmConfig.moshi_7b()
    before = mx.get_active_memory()
    assert lm_weight_bytes(cfg) / GB == pytest.approx(15.37, abs=0.01)
    assert lm_weight_bytes(cfg, quantization=Quantization(8)) / GB == pytest.approx(8.17, abs=0.01)
    assert lm_weight_bytes(cfg, quantization=Quantization(4)) / GB == pytest.approx(4.80, abs=0.01)
    assert mx.get_active_memory() - before < 1e6  # worked out from shapes: nothing allocated


def test_fill_context_makes_the_kv_cache_as_big_as_the_arithmetic_says():
    lm = moshi_mlx.random_lm(SMALL, mx.float32)
    gen = moshi_mlx.LmGen(lm, seed=0)
    codes = mx.zeros((1, SMALL.n_user), mx.int32)
    with pytest.raises(MoshiError, match="has run a step"):
        fill_context(gen)
    gen.step(codes)
    fill_context(gen)
    held = sum(c.keys.nbytes + c.values.nbytes for c in gen.cache)
    assert held == kv_cache_bytes(SMALL, mx.float32)
    assert all(c.offset == SMALL.context for c in gen.cache)
    for _ in range(3):  # steps go on over the full window, which rolls instead of growing
        mx.eval(gen.step(codes))
    assert sum(c.keys.nbytes + c.values.nbytes for c in gen.cache) == held


def test_mimi_bytes_are_its_weights_and_full_transformer_caches(mimi_io):
    mimi = moshi_mlx.load_mimi(MIMI_DIR / "weights.safetensors", MIMI_DIR / "config.json")
    pcm = np.array(mimi_io["pcm"][0, 0, : 10 * 1920]).reshape(10, 1, 1, 1920)
    for frame in pcm:  # 10 frames of 2 transformer steps: the 16-step windows are full
        mx.eval(mimi.decode_step(mimi.encode_step(mx.array(frame))))
    caches = [*mimi.encoder_transformer._caches, *mimi.decoder_transformer._caches]
    held = sum(c.keys.nbytes + c.values.nbytes for c in caches)
    assert mimi_bytes(mimi.cfg) == param_bytes(mimi) + held


def test_check_fits_names_the_quantization_that_would_fit():
    cfg = LmConfig.moshi_7b()
    need = footprint(cfg)
    assert check_fits(cfg, limit=need.total) == need
    q8, q4 = (footprint(cfg, quantization=Quantization(b)).total for b in (8, 4))
    with pytest.raises(MoshiError) as e:
        check_fits(cfg, limit=q8)
    message = str(e.value)
    assert "\n" not in message and f"needs {need.total / GB:.1f} GB" in message
    assert message.endswith(f"use `quantize` 8 ({q8 / GB:.1f} GB)")
    with pytest.raises(MoshiError, match=r"use `quantize` 4 \("):
        check_fits(cfg, limit=q8 - 1)
    with pytest.raises(MoshiError, match=r"a 4-bit model would \("):
        check_fits(cfg, weights=lm_weight_bytes(cfg, quantization=Quantization(8)),
                   stored=Quantization(8), limit=q8 - 1)  # fmt: skip
    with pytest.raises(MoshiError, match="no quantization makes it fit"):
        check_fits(cfg, quantization=Quantization(4), limit=q4 - 1)


def test_usable_memory_reads_the_override(monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, "2.5")
    assert usable_memory() == (int(2.5 * GB), f"{LIMIT_ENV} allows")
    monkeypatch.setenv(LIMIT_ENV, "lots")
    with pytest.raises(MoshiError, match="must be a number of GB"):
        usable_memory()
    monkeypatch.delenv(LIMIT_ENV)
    limit, who = usable_memory()
    assert limit > GB and who


def test_load_refuses_before_reading_a_model_that_does_not_fit(monkeypatch, pytorch_repo):
    cfg = LmConfig.from_dict(json.loads((LM_DIR / "config.json").read_text()))
    weights = param_bytes(moshi_mlx.load_lm(LM_DIR / "weights.safetensors", cfg))
    monkeypatch.setenv(LIMIT_ENV, str(weights / 2 / GB))
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    with pytest.raises(MoshiError, match="Moshi needs .* but MOSHI_MLX_MEMORY_LIMIT_GB allows"):
        moshi_mlx.load(pytorch_repo, dtype="float32")
    assert mx.get_peak_memory() - before < weights / 2  # refused before the weights were read
    assert moshi_mlx.load(pytorch_repo, check_memory=False).lm is not None


def test_run_says_in_one_line_that_the_model_does_not_fit(tmp_path, monkeypatch, capsys,
                                                          pytorch_repo):  # fmt: skip
    from moshi_mlx.app.wavio import write_wav

    write_wav(tmp_path / "in.wav", np.zeros((2400, 1), np.float32), 24000)
    argv = ["run", str(tmp_path / "in.wav"), str(tmp_path / "out.wav"), "--hf-path",
            str(pytorch_repo)]  # fmt: skip
    mimi_cfg = moshi_mlx.load_mimi(MIMI_DIR / "weights.safetensors", MIMI_DIR / "config.json").cfg
    # Below the fixture in 4 bits (bf16 scales; its float32 file would give float32 ones), so
    # that nothing fits; above what a config needs at the least, so that the config passes.
    q4 = footprint(FIXTURE, mx.bfloat16, Quantization(4), mimi_cfg).total
    # a 4-bit weight is half a byte; the KV cache at least 2 bytes a value; Mimi as it is
    least = lm_parameters(FIXTURE) // 2 + kv_cache_bytes(FIXTURE, mx.float16) + mimi_bytes(mimi_cfg)
    for limit, words in (
        (q4 - 1, ("Moshi needs", "no quantization makes it fit")),
        (1000, ("the config of", f"needs at least {least / GB:.3g} GB even at 4 bits, but")),
    ):
        monkeypatch.setenv(LIMIT_ENV, str(limit / GB))
        assert cli_main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"moshi-mlx run: error: {words[0]}"), err
        assert words[1] in err[0], err
        assert not (tmp_path / "out.wav").exists()
