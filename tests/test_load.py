"""``moshi_mlx.load`` on every layout users bring (Kyutai's PyTorch release, Kyutai's MLX repos,
converted folders), Hugging Face repo ids through an offline cache, and the full-size key
lists of Kyutai's MLX files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import LM_DIR, MIMI_DIR, UPSTREAM_MLX_DIR
from mlx.utils import tree_flatten

import moshi_mlx
from moshi_mlx import hub
from moshi_mlx.lm import Lm, LmConfig
from moshi_mlx.loading import find_model_files
from moshi_mlx.quantize import Quantization, quantize_lm
from moshi_mlx.weights import CheckpointError, lm_rules, sanitize

MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"


def params(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert mx.array_equal(a[k], b[k]).item(), k


@pytest.fixture(scope="module")
def pytorch_bf16_params():
    lm = moshi_mlx.load_lm(LM_DIR / "weights.safetensors", LM_DIR / "config.json", dtype=None)
    return params(lm)


@pytest.fixture
def kyutai_mlx_repo(tmp_path, spm_model) -> Path:
    """A folder laid out like ``kyutai/moshiko-mlx-bf16`` holding the fixture LM as upstream's
    converter stores it, the PyTorch-named Mimi and the tokenizer."""
    repo = tmp_path / "moshiko-mlx-fixture"
    repo.mkdir()
    shutil.copy(UPSTREAM_MLX_DIR / "model.safetensors", repo / "model.safetensors")
    shutil.copy(MIMI_DIR / "weights.safetensors", repo / MIMI_FILE)
    shutil.copy(spm_model, repo / "tokenizer_spm_32k_3.model")
    shutil.copy(UPSTREAM_MLX_DIR / "config.json", repo / "config.json")
    shutil.copy(MIMI_DIR / "config.json", repo / "mimi_config.json")
    return repo


# ---- layouts ---------------------------------------------------------------------------------


def test_upstream_mlx_file_loads_to_exactly_the_pytorch_fixture_weights(pytorch_bf16_params):
    lm = moshi_mlx.load_lm(
        UPSTREAM_MLX_DIR / "model.safetensors", UPSTREAM_MLX_DIR / "config.json", dtype=None
    )
    assert_bitwise_equal(params(lm), pytorch_bf16_params)


def test_kyutai_mlx_folder_loads_with_its_stored_bfloat16(kyutai_mlx_repo, pytorch_bf16_params):
    assert find_model_files(kyutai_mlx_repo).layout == "kyutai-mlx"
    lm, mimi, tokenizer = moshi_mlx.load(kyutai_mlx_repo)
    assert_bitwise_equal(params(lm), pytorch_bf16_params)
    assert {a.dtype for a in params(mimi).values()} == {mx.float32}
    assert mimi.num_codebooks == 8
    assert tokenizer.piece_to_id("<pad>") == 3


def test_pytorch_release_folder_loads_like_load_lm(pytorch_repo, lm_io):
    assert find_model_files(pytorch_repo).layout == "pytorch"
    lm, _, _ = moshi_mlx.load(pytorch_repo, dtype="float32")
    reference = moshi_mlx.load_lm(LM_DIR / "weights.safetensors", LM_DIR / "config.json")
    codes = lm_io["tf_codes"]
    for ours, theirs in zip(lm(codes), reference(codes), strict=True):
        assert mx.array_equal(ours, theirs, equal_nan=True).item()
    text = lm(codes)[0][0, 0]
    assert mx.allclose(text, lm_io["tf_text_logits"][0, 0], atol=1e-4).item()


def test_dtype_casts_the_unquantized_weights(pytorch_repo):
    lm, mimi, _ = moshi_mlx.load(pytorch_repo, dtype=mx.float16, lazy=True)
    assert {a.dtype for a in params(lm).values()} == {mx.float16}
    assert {a.dtype for a in params(mimi).values()} == {mx.float32}


def test_files_are_told_apart_by_keys_not_names(tmp_path, pytorch_repo):
    folder = tmp_path / "renamed"
    folder.mkdir()
    shutil.copy(pytorch_repo / "model.safetensors", folder / "codec.safetensors")  # the LM
    shutil.copy(pytorch_repo / MIMI_FILE, folder / "model.safetensors")  # Mimi
    shutil.copy(pytorch_repo / "tokenizer_spm_32k_3.model", folder / "text.model")
    files = find_model_files(folder, lm_config=LM_DIR / "config.json")
    assert files.lm_weights == [folder / "codec.safetensors"]
    assert files.mimi_weights == folder / "model.safetensors"
    assert files.tokenizer == folder / "text.model"


def test_upstream_config_names_pick_the_files(kyutai_mlx_repo):
    config = json.loads((kyutai_mlx_repo / "config.json").read_text())
    shutil.copy(kyutai_mlx_repo / "model.safetensors", kyutai_mlx_repo / "model.other.safetensors")
    with pytest.raises(CheckpointError, match="several Moshi LM weights"):
        find_model_files(kyutai_mlx_repo)
    config["moshi_name"] = "model.other.safetensors"
    (kyutai_mlx_repo / "config.json").write_text(json.dumps(config))
    files = find_model_files(kyutai_mlx_repo)
    assert files.lm_weights == [kyutai_mlx_repo / "model.other.safetensors"]


def test_folder_without_config_means_moshi_7b(kyutai_mlx_repo):
    (kyutai_mlx_repo / "config.json").unlink()
    assert find_model_files(kyutai_mlx_repo).lm_config == LmConfig.moshi_7b()
    # The fixture is not a 7B: the error names the offending keys and the config fields.
    with pytest.raises(
        CheckpointError,
        match=r"260 missing key\(s\), e\.g\. depformer\.layers\.2\..*\(check depformer_dim",
    ):
        moshi_mlx.load(kyutai_mlx_repo)


def test_mimi_file_given_as_the_lm_is_named_as_such():
    with pytest.raises(CheckpointError, match="is a Mimi codec checkpoint, not a Moshi LM"):
        moshi_mlx.load_lm(MIMI_DIR / "weights.safetensors", LM_DIR / "config.json")
    with pytest.raises(CheckpointError, match="is a Moshi LM checkpoint, not a Mimi"):
        moshi_mlx.load_mimi(LM_DIR / "weights.safetensors", MIMI_DIR / "config.json")


def test_truncated_weights_are_one_clear_line(tmp_path, pytorch_repo):
    folder = tmp_path / "truncated"
    shutil.copytree(pytorch_repo, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        moshi_mlx.load(folder)
    assert "\n" not in str(e.value)


# ---- Hugging Face repo ids (offline: a hand-made cache) --------------------------------------


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def cache_repo(cache: Path, repo_id: str, files: Path) -> Path:
    """Put ``files`` in the cache the way ``snapshot_download`` leaves a repo."""
    commit = "0" * 40
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    shutil.copytree(files, folder / "snapshots" / commit)
    return folder / "snapshots" / commit


def test_repo_id_loads_from_the_cache_offline(offline_cache, kyutai_mlx_repo, pytorch_bf16_params):
    snapshot = cache_repo(offline_cache, "kyutai/moshiko-mlx-fixture", kyutai_mlx_repo)
    assert moshi_mlx.loading.model_folder("kyutai/moshiko-mlx-fixture") == snapshot
    lm, _, _ = moshi_mlx.load("kyutai/moshiko-mlx-fixture")
    assert_bitwise_equal(params(lm), pytorch_bf16_params)


def test_uncached_repo_offline_says_how_to_use_a_folder(offline_cache):
    with pytest.raises(hub.HubError) as e:
        moshi_mlx.load("kyutai/not-downloaded")
    message = str(e.value)
    assert "kyutai/not-downloaded" in message and "HF_HUB_OFFLINE=1" in message
    assert "local folder" in message and "\n" not in message


def test_unknown_repo_is_named(monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(*args, **kwargs):
        raise RepositoryNotFoundError.__new__(RepositoryNotFoundError)

    monkeypatch.setattr("huggingface_hub.snapshot_download", not_found)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(hub.HubError, match="kyutai/nope was not found on the Hugging Face Hub"):
        moshi_mlx.load("kyutai/nope")


def test_missing_local_path_is_not_taken_for_a_repo_id(tmp_path):
    with pytest.raises(hub.HubError, match="no such folder"):
        moshi_mlx.load(tmp_path / "nope")
    assert hub.is_repo_id("kyutai/moshiko-mlx-q4")
    assert not hub.is_repo_id("./moshiko-mlx-q4") and not hub.is_repo_id("a/b/c")


# ---- full-size key lists ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, quantization",
    [("bf16", None), ("q8", {"bits": 8, "group_size": 64}), ("q4", {"bits": 4, "group_size": 32})],
)
def test_kyutai_mlx_7b_keys_map_onto_our_7b_tree(name, quantization):
    listing = json.loads(
        (UPSTREAM_MLX_DIR / "full_size_keys" / f"moshiko_mlx_{name}_keys.json").read_text()
    )["tensors"]
    cfg = LmConfig.moshi_7b()
    # Shape-only stand-ins: MLX arrays are lazy, nothing of the 7B is allocated.
    dtypes = {"bfloat16": mx.bfloat16, "uint32": mx.uint32}
    stand_ins = {k: mx.zeros(v["shape"], dtypes[v["dtype"]]) for k, v in listing.items()}
    mapped = sanitize(stand_ins, lm_rules(cfg.schedule))
    model = Lm(cfg)
    if quantization:  # what ``convert -q`` does, lazily
        assert quantize_lm(model, Quantization(**quantization)).kept == {}
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    assert {k: v.shape for k, v in mapped.items()} == expected
    packed = {k for k, v in mapped.items() if v.dtype == mx.uint32}
    scaled = {k.removesuffix(".scales") + ".weight" for k in expected if k.endswith(".scales")}
    assert packed == scaled  # the packed weights are exactly those of our quantized layers
    assert not any("norm" in k for k in packed)  # norms stay in float
    # Embeddings and heads, 4 per temporal layer, 2 stacked + 8 x 2 per-step per depformer layer.
    per_model = 1 + 16 + 1 + 8 + 1 + 7 + 8 + 32 * 4 + 6 * (2 + 8 * 2)
    assert len(packed) == (0 if quantization is None else per_model)
