"""4-bit and 8-bit LMs: the README's quantization table, held by measurement, and what
quantization must keep (the zero token, float norms, Kyutai's own q8 / q4 files)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import LM_DIR, UPSTREAM_MLX_DIR

import moshi_mlx
from moshi_mlx.convert.measure import logit_error, quantized_copy, random_codes
from moshi_mlx.layers import QuantizedMultiLinear, QuantizedZeroEmbedding
from moshi_mlx.weights import indivisible_layers, quantize_lm

QUANT_DIR = UPSTREAM_MLX_DIR / "quant"

# The README's table (python -m moshi_mlx.convert.measure quality), measured on Linux / CPU:
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


def test_eight_bits_are_much_closer_than_four(fixture_reference, lm_io):
    # Guards the table against a bits mix-up: q8 errors sit near bf16 rounding, q4 far above.
    for table in (FIXTURE_TABLE, QUANT_TABLE):
        assert table[8, 32][0] * 5 < table[4, 32][0] and table[8, 64][1] * 5 < table[4, 64][1]


def test_quantized_layers_keep_the_zero_token_and_float_norms():
    model = moshi_mlx.load_lm(QUANT_DIR / "model.safetensors", QUANT_DIR / "config.json", None)
    assert quantize_lm(model, 4, 32) == []
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


def test_indivisible_widths_are_named_or_skipped():
    model = moshi_mlx.load_lm(LM_DIR / "weights.safetensors", LM_DIR / "config.json", None)
    assert sorted(set(indivisible_layers(model, 32).values())) == [88, 176]
    with pytest.raises(ValueError) as e:
        quantize_lm(model, 8, 64)
    message = str(e.value)
    assert "group size 64 does not divide the input width of 54 layer(s)" in message
    assert "transformer.layers.{i}.gating.linear_out (width 176)" in message
    assert "depformer_text_emb (width 32)" in message and "\n" not in message
    skipped = quantize_lm(model, 8, 32, skip_indivisible=True)
    assert skipped == sorted(indivisible_layers(model, 32))
    assert len(skipped) == 18
    assert type(model.transformer.layers[0].gating.linear_out) is nn.Linear
    assert isinstance(model.transformer.layers[0].gating.linear_in, nn.QuantizedLinear)


@pytest.mark.parametrize("bits, group_size", [(7, 32), (4, 48)])
def test_unsupported_settings_are_refused(bits, group_size):
    model = moshi_mlx.load_lm(QUANT_DIR / "model.safetensors", QUANT_DIR / "config.json", None)
    with pytest.raises(ValueError, match="bits must be|group size must be"):
        quantize_lm(model, bits, group_size)
