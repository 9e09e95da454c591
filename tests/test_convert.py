"""``moshi-mlx convert`` and the folders it writes: round trips, sharding, quantization,
safety and every bad input, through the Python API and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import LM_DIR, MIMI_DIR, UPSTREAM_MLX_DIR
from mlx.utils import tree_flatten
from moshi_mlx.convert.convert import convert

import moshi_mlx
from moshi_mlx.lm import LmConfig

QUANT_DIR = UPSTREAM_MLX_DIR / "quant"


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
