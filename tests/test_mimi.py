"""Mimi against the PyTorch reference outputs (tests/fixtures/mimi), key mapping at full size,
streaming behaviour and bad input."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import FULL_SIZE_KEYS, MIMI_DIR
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file

import moshi_mlx
from moshi_mlx.conv import MatmulChoice
from moshi_mlx.mimi import Mimi, MimiConfig
from moshi_mlx.weights import CheckpointError, mimi_rules, sanitize

TOL = 1e-4
FRAME = 1920


@pytest.fixture(scope="module", params=["cpu-matmuls", "mlx-kernels"])
def mimi(request) -> Mimi:
    """Both kernel choices of ``Mimi.place``: matrix products over re-laid-out weights (the
    CPU's) and MLX's own convolutions (the GPU's), run here on the CPU."""
    m = moshi_mlx.load_mimi(MIMI_DIR / "weights.safetensors", MIMI_DIR / "config.json")
    if request.param == "mlx-kernels":
        for _, layer in m.named_modules():
            if isinstance(layer, MatmulChoice):
                layer.use_matmul(False)
    assert any(isinstance(x, MatmulChoice) and x.matmul for _, x in m.named_modules()) == (
        request.param == "cpu-matmuls"
    )
    m.set_num_codebooks(32)
    return m


def max_err(a: mx.array, b: mx.array) -> float:
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


def ncl(x: mx.array) -> mx.array:  # our NLC -> PyTorch's NCL
    return x.transpose(0, 2, 1)


def test_batch_intermediates_match_reference(mimi, mimi_io):
    pcm = mimi_io["pcm"]
    seanet = mimi.encoder(ncl(pcm))
    assert max_err(ncl(seanet), mimi_io["seanet_encoder_out"]) < TOL
    transformed = mimi.encoder_transformer(seanet)
    assert max_err(ncl(transformed), mimi_io["encoder_transformer_out"]) < TOL
    latent = mimi.encode_to_latent(pcm)
    assert latent.shape == (1, 64, 12)
    assert max_err(latent, mimi_io["latent"]) < TOL
    q = mimi.quantizer
    assert max_err(ncl(q.rvq_first.input_proj(ncl(latent))), mimi_io["latent_proj_semantic"]) < TOL
    assert max_err(ncl(q.rvq_rest.input_proj(ncl(latent))), mimi_io["latent_proj_acoustic"]) < TOL

    quantized = mimi.decode_latent(mimi_io["codes"])
    assert max_err(quantized, mimi_io["quantized_latent"]) < TOL
    up = mimi.upsample(ncl(quantized))
    assert max_err(ncl(up), mimi_io["upsampled_latent"]) < TOL
    assert max_err(ncl(mimi.decoder_transformer(up)), mimi_io["decoder_transformer_out"]) < TOL


def test_batch_codes_equal_reference_on_all_32_levels(mimi, mimi_io):
    codes = mimi.encode(mimi_io["pcm"])
    assert codes.shape == (1, 32, 12)
    assert np.array_equal(np.array(codes), np.array(mimi_io["codes"]))


def test_batch_decode_matches_reference(mimi, mimi_io):
    assert max_err(mimi.decode(mimi_io["codes"]), mimi_io["decoded"]) < TOL
    decoded_8 = mimi.decode(mimi_io["codes"][:, :8])
    assert decoded_8.shape == (1, 1, 12 * FRAME)
    assert max_err(decoded_8, mimi_io["decoded_8"]) < TOL


def test_set_num_codebooks_truncates_codes(mimi, mimi_io):
    mimi.set_num_codebooks(8)
    try:
        codes = mimi.encode(mimi_io["pcm"])
    finally:
        mimi.set_num_codebooks(32)
    assert np.array_equal(np.array(codes), np.array(mimi_io["codes"][:, :8]))


def test_batch_encode_pads_to_whole_frames(mimi, mimi_io):
    pcm = mimi_io["pcm"][..., : 5 * FRAME + 7]
    padded = mx.concatenate([pcm, mx.zeros((1, 1, FRAME - 7))], axis=-1)
    assert mimi.encode(pcm).shape == (1, 32, 6)
    assert np.array_equal(np.array(mimi.encode(pcm)), np.array(mimi.encode(padded)))


def stream_encode(mimi: Mimi, pcm: mx.array, frames_per_call: int = 1, latent=False):
    mimi.reset()
    n = pcm.shape[-1] // (FRAME * frames_per_call)
    step = mimi.encode_latent_step if latent else mimi.encode_step
    chunk = FRAME * frames_per_call
    return mx.concatenate([step(pcm[..., i * chunk : (i + 1) * chunk]) for i in range(n)], -1)


def test_streaming_matches_upstream_streaming_past_the_window(mimi, mimi_io):
    # 12 frames = 24 transformer steps > context 16: covers upstream's ring-cache eviction.
    pcm = mimi_io["pcm"]
    codes = stream_encode(mimi, pcm)
    assert np.array_equal(np.array(codes), np.array(mimi_io["codes_streaming"]))
    assert max_err(stream_encode(mimi, pcm, latent=True), mimi_io["latent_streaming"]) < TOL

    mimi.reset()
    decoded = [mimi.decode_step(mimi_io["codes"][..., i : i + 1]) for i in range(12)]
    assert all(d.shape == (1, 1, FRAME) for d in decoded)
    assert max_err(mx.concatenate(decoded, -1), mimi_io["decoded_streaming"]) < TOL


def test_streaming_equals_batch_inside_the_window(mimi, mimi_io):
    pcm = mimi_io["pcm"][..., : 8 * FRAME]  # 16 transformer steps = context
    assert max_err(stream_encode(mimi, pcm, latent=True), mimi.encode_to_latent(pcm)) < 1e-5


def test_multi_frame_chunks_equal_single_frames(mimi, mimi_io):
    pcm = mimi_io["pcm"][..., : 6 * FRAME]
    one = stream_encode(mimi, pcm, 1)
    three = stream_encode(mimi, pcm, 3)
    assert np.array_equal(np.array(one), np.array(three))


def test_reset_starts_a_new_stream(mimi, mimi_io):
    pcm = mimi_io["pcm"][..., : 3 * FRAME]
    first = stream_encode(mimi, pcm)
    second = stream_encode(mimi, pcm)  # stream_encode resets first
    assert np.array_equal(np.array(first), np.array(second))
    # Without a reset the state carries over and the first frame is encoded differently.
    continued = mimi.encode_step(pcm[..., :FRAME])
    assert not np.array_equal(np.array(continued), np.array(first[..., :1]))


def test_every_released_key_maps_to_one_parameter_of_the_real_mimi():
    keys = json.loads((FULL_SIZE_KEYS / "mimi_keys.json").read_text())["checkpoint_layout"]
    model = Mimi(MimiConfig())  # parameters are lazy: nothing is allocated
    params = {k: v.shape for k, v in tree_flatten(model.parameters())}
    # Zero-size stand-ins keep the test free of allocation while the transforms see real ranks.
    stand_ins = {k: mx.zeros(v["shape"]) for k, v in keys.items()}
    mapped = sanitize(stand_ins, mimi_rules())
    assert len(mapped) == len(keys) == len(params) == 318
    assert set(mapped) == set(params)
    for name, value in mapped.items():
        assert tuple(value.shape) == tuple(params[name]), name


def test_config_reads_upstream_nested_format_and_ignores_unknown_keys():
    d = json.loads((MIMI_DIR / "config.json").read_text())
    d["something_new"] = 1
    d["seanet"]["another"] = 2
    cfg = MimiConfig.from_dict(d)
    assert cfg.seanet.dimension == 64 and cfg.transformer.context == 16 and cfg.codebook_dim == 16
    assert cfg.frame_size == FRAME
    real = MimiConfig()
    assert (real.seanet.dimension, real.transformer.num_layers, real.n_q) == (512, 8, 32)
    assert MimiConfig.from_dict(real.to_dict()) == real


# ---- bad input -------------------------------------------------------------------------------


def test_encode_step_refuses_partial_frames(mimi):
    with pytest.raises(ValueError, match="multiple of 1920"):
        mimi.encode_step(mx.zeros((1, 1, 1000)))
    with pytest.raises(ValueError, match=r"\[batch, 1, samples\]"):
        mimi.encode(mx.zeros((1, 1920)))


def test_decode_refuses_out_of_range_codes_and_too_many_codebooks(mimi):
    with pytest.raises(ValueError, match=r"\[0, 2048\)"):
        mimi.decode(mx.full((1, 8, 2), 2048))
    with pytest.raises(ValueError, match=r"\[0, 2048\)"):
        mimi.decode_step(mx.full((1, 8, 1), -1))
    with pytest.raises(ValueError, match="33 codebooks"):
        mimi.decode(mx.zeros((1, 33, 2), dtype=mx.int32))
    with pytest.raises(ValueError, match="num_codebooks"):
        mimi.set_num_codebooks(0)


def test_checkpoint_with_missing_or_unexpected_keys_names_them(tmp_path):
    weights = load_file(str(MIMI_DIR / "weights.safetensors"))
    config = MIMI_DIR / "config.json"
    missing = dict(weights)
    del missing["decoder.model.0.conv.conv.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing.safetensors.*decoder\.conv_in\.weight"):
        moshi_mlx.load_mimi(tmp_path / "missing.safetensors", config)

    extra = dict(weights, **{"encoder.model.99.bogus": np.zeros(3, np.float32)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected key.*encoder\.model\.99\.bogus"):
        moshi_mlx.load_mimi(tmp_path / "extra.safetensors", config)


def test_wrong_config_or_file_gives_a_clear_error(tmp_path):
    # The fixture's tiny weights with the real Mimi config (8 transformer layers instead of 2).
    with pytest.raises(CheckpointError, match="missing key.*check that the Mimi config fits"):
        moshi_mlx.load_mimi(MIMI_DIR / "weights.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((MIMI_DIR / "weights.safetensors").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        moshi_mlx.load_mimi(truncated, MIMI_DIR / "config.json")
    with pytest.raises(CheckpointError, match="not found"):
        moshi_mlx.load_mimi(tmp_path / "nope.safetensors")


def test_forward_passes_never_rewrite_parameters(mimi, mimi_io):
    before = {k: id(v) for k, v in tree_flatten(mimi.parameters())}
    mimi.reset()
    mx.eval(mimi.decode_step(mimi.encode_step(mimi_io["pcm"][..., : 2 * FRAME])))
    mx.eval(mimi.decode(mimi.encode(mimi_io["pcm"])))
    assert {k: id(v) for k, v in tree_flatten(mimi.parameters())} == before
    mimi.reset()
