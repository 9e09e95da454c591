"""4-bit and 8-bit LMs: the README's quantization table, held by measurement, and what
quantization must keep (the zero token, float norms, Kyutai's own q8 / q4 files)."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import LM_DIR, UPSTREAM_MLX_DIR
from mlx.utils import tree_flatten

import moshi_mlx
from moshi_mlx import MoshiError, Quantization
from moshi_mlx.layers import QuantizedMultiLinear, QuantizedZeroEmbedding
from moshi_mlx.quantize import logit_error, quantizable, quantize_lm, quantize_report
from moshi_mlx.weights import leaf_modules

QUANT_DIR = UPSTREAM_MLX_DIR / "quant"

# The README's table (python scripts/measure.py quality), measured on Linux / CPU:
# teacher-forced logits of the LM quantized from its bf16 weights, computed in float32, against
# the same bf16 weights computed in float32. (text max abs error, audio max abs error, text
# top-1 agreement, audio top-1 agreement). Fixture LM: tf_codes, 20 text / 153 audio positions;
# quant/ LM: random_codes(seed 4), 12 text / 89 audio positions.
FIXTURE_TABLE = {
    (8, 32): (0.261, 0.245, 19, 144),
    (8, 64): (0.392, 0.278, 19, 146),
    (4, 32): (3.614, 3.493, 12, 87),
    (4, 64): (3.946, 3.051, 11, 94),
}
QUANT_TABLE = {
    (8, 32): (0.113, 0.413, 12, 86),
    (8, 64): (0.126, 0.379, 12, 86),
    (4, 32): (1.401, 5.404, 10, 68),
    (4, 64): (1.525, 5.213, 8, 63),
}
# Other backends (Metal) sum in another order: allow 5% on the errors and one flipped near-tie.
SLACK, FLIPS = 1.05, 1


def quantized_copy(weights, config, bits: int, group_size: int):
    """The LM quantized from its stored (bf16) weights, computed in float32, and the share of
    its weights that got quantized."""
    model = moshi_mlx.load_lm(weights, config, dtype=None)
    sizes = {k: v.size for k, v in tree_flatten(model.parameters())}
    kept = quantize_lm(model, Quantization(bits, group_size)).kept
    model.set_dtype(mx.float32)  # scales and norms upcast exactly: only quantization differs
    kept_size = sum(n for k, n in sizes.items() if k.rsplit(".", 1)[0] in kept)
    return model, 1 - kept_size / sum(sizes.values())


def random_codes(cfg, steps: int, seed: int) -> mx.array:
    rng = np.random.default_rng(seed)
    text = rng.integers(0, cfg.text_card, (1, 1, steps))
    return mx.array(np.concatenate([text, rng.integers(0, cfg.card, (1, cfg.n_q, steps))], 1))


def assert_within(err: dict, row: tuple) -> None:
    text_max, audio_max, text_top1, audio_top1 = row
    assert err["text"]["max"] <= text_max * SLACK
    assert err["audio"]["max"] <= audio_max * SLACK
    assert err["text"]["top1"] >= text_top1 - FLIPS
    assert err["audio"]["top1"] >= audio_top1 - FLIPS


@pytest.fixture(scope="module")
def fixture_reference():
    return moshi_mlx.load_lm(LM_DIR / "weights.safetensors", LM_DIR / "config.json")


@pytest.fixture(scope="module")
def quant_reference():
    return moshi_mlx.load_lm(QUANT_DIR / "model.safetensors", QUANT_DIR / "config.json")


@pytest.mark.parametrize("bits, group_size", list(FIXTURE_TABLE))
def test_fixture_lm_quantization_error_is_as_in_the_table(
    bits, group_size, fixture_reference, lm_io
):
    model, _ = quantized_copy(LM_DIR / "weights.safetensors", LM_DIR / "config.json", bits,
                              group_size)  # fmt: skip
    err = logit_error(model, fixture_reference, lm_io["tf_codes"])
    assert_within(err, FIXTURE_TABLE[bits, group_size])


@pytest.mark.parametrize("bits, group_size", list(QUANT_TABLE))
def test_quant_lm_quantization_error_is_as_in_the_table(bits, group_size, quant_reference):
    model, share = quantized_copy(QUANT_DIR / "model.safetensors", QUANT_DIR / "config.json",
                                  bits, group_size)  # fmt: skip
    assert share == 1.0  # widths 256 / 704 / 64: every layer quantizes
    err = logit_error(model, quant_reference, random_codes(quant_reference.cfg, 12, seed=4))
    assert_within(err, QUANT_TABLE[bits, group_size])


@pytest.mark.parametrize("file_name, bits, group_size", [
    ("model.q8.safetensors", 8, 64), ("model.q4.safetensors", 4, 32),
])  # fmt: skip
def test_kyutai_quantized_files_stay_within_the_table(file_name, bits, group_size, quant_reference):
    model = moshi_mlx.load_lm(QUANT_DIR / file_name, QUANT_DIR / "config.json")
    assert isinstance(model.text_emb, QuantizedZeroEmbedding)
    assert model.text_emb.bits == bits and model.text_emb.group_size == group_size
    err = logit_error(model, quant_reference, random_codes(quant_reference.cfg, 12, seed=4))
    assert_within(err, QUANT_TABLE[bits, group_size])


def test_eight_bits_are_much_closer_than_four(quant_reference):
    # Guards against a bits mix-up: measured, q8 errors sit near bf16 rounding, q4 far above.
    codes = random_codes(quant_reference.cfg, 12, seed=4)
    errors = {}
    for bits in (8, 4):
        model, _ = quantized_copy(QUANT_DIR / "model.safetensors", QUANT_DIR / "config.json",
                                  bits, 32)  # fmt: skip
        errors[bits] = logit_error(model, quant_reference, codes)
    for part in ("text", "audio"):
        assert errors[8][part]["max"] * 5 < errors[4][part]["max"], errors


def test_quantized_layers_keep_the_zero_token_and_float_norms():
    model = moshi_mlx.load_lm(QUANT_DIR / "model.safetensors", QUANT_DIR / "config.json", None)
    report = quantize_lm(model, Quantization(4))
    assert report.kept == {} and report.settings == Quantization(4, 32)
    ids = mx.array([[-1, 5, -1]])
    for emb in (model.text_emb, model.emb[3], model.depformer_emb[0], model.depformer_text_emb):
        assert isinstance(emb, QuantizedZeroEmbedding)
        out = emb(ids)
        assert mx.all(out[:, 0] == 0).item() and mx.all(out[:, 2] == 0).item()
        assert mx.any(out[:, 1] != 0).item()
    assert isinstance(model.depformer.layers[0].self_attn.in_proj, QuantizedMultiLinear)
    assert isinstance(model.transformer.layers[0].self_attn.in_proj, nn.QuantizedLinear)
    for norm in (
        model.out_norm,
        model.transformer.layers[0].norm1,
        model.depformer.layers[1].norm2,
    ):
        assert type(norm) is nn.RMSNorm and norm.weight.dtype == mx.bfloat16
    with pytest.raises(MoshiError, match="already quantized"):
        quantize_lm(model, Quantization(8))


def test_layers_the_group_size_does_not_divide_stay_in_float_and_are_reported():
    model = moshi_mlx.load_lm(LM_DIR / "weights.safetensors", LM_DIR / "config.json", None)
    layers = sum(quantizable(m) for _, m in leaf_modules(model))
    report = quantize_lm(model, Quantization(8, 32))  # widths 32, 88, 176: 88 and 176 stay
    assert sorted(set(report.kept.values())) == [88, 176] and len(report.kept) == 18
    assert report.quantized == layers - 18 == 68
    assert type(model.transformer.layers[0].gating.linear_out) is nn.Linear
    assert isinstance(model.transformer.layers[0].gating.linear_in, nn.QuantizedLinear)
    text = str(report)
    assert "8-bit, group size 32: 68 layers; 18 kept in float" in text
    assert "transformer.layers.{i}.gating.linear_out (width 176)" in text and "\n" not in text
    assert str(quantize_report(model)) == text  # the same, read back from the model


def test_a_group_size_that_divides_no_width_is_refused():
    cfg = json.loads((LM_DIR / "config.json").read_text())
    cfg.update(dim=48, depformer_dim=24, num_heads=2, depformer_num_heads=2)
    model = moshi_mlx.Lm(moshi_mlx.LmConfig.from_dict(cfg))
    with pytest.raises(MoshiError, match="`group_size` 128 divides the input width of none"):
        quantize_lm(model, Quantization(4, 128))


@pytest.mark.parametrize("bits, group_size", [(7, 32), (4, 48), (True, 32)])
def test_unsupported_settings_are_refused(bits, group_size):
    with pytest.raises(MoshiError, match="`bits` must be|`group_size` must be"):
        Quantization(bits, group_size)
