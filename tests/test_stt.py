"""Kyutai's speech-to-text models against the PyTorch reference (tests/fixtures/stt): loading in
every layout, greedy traces with the extra heads, batches, the real STT 1B's key layout."""

from __future__ import annotations

import json
import shutil
import warnings

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, FULL_SIZE_KEYS, LM_DIR, moshi_mlx_cmd
from mlx.utils import tree_flatten

import moshi_mlx
from moshi_mlx import Lm, LmConfig, LmGen
from moshi_mlx.convert.convert import convert
from moshi_mlx.errors import MoshiError, MoshiWarning
from moshi_mlx.memory import check_config_fits, lm_parameters, lm_tensors
from moshi_mlx.quantize import Quantization
from moshi_mlx.stt import FRAME, Transcriber, Word, text_of, timestamped_words
from moshi_mlx.weights import lm_rules, read_safetensors, sanitize

STT_DIR = FIXTURES / "stt"
TOL_LOGITS = 1e-4
TOL_HEADS = 1e-5


@pytest.fixture(scope="module")
def io() -> dict[str, mx.array]:
    return mx.load(str(STT_DIR / "io.safetensors"))


@pytest.fixture(scope="module")
def model():
    return moshi_mlx.load(STT_DIR, dtype="float32")


@pytest.fixture(scope="module")
def lm_dialogue() -> Lm:
    return moshi_mlx.load_lm(LM_DIR / "weights.safetensors", LM_DIR / "config.json")


def greedy(lm: Lm, codes: mx.array):
    """Greedy ``LmGen`` over ``codes`` ``[B, 32, S]``: tokens ``[B, S]``, text logits ``[B, S,
    card]``, extra heads ``[B, S, heads, 6]`` (None without heads)."""
    gen = LmGen(lm, temp=0, temp_text=0)
    tokens, logits, heads = [], [], []
    for t in range(codes.shape[2]):
        out = gen.step(codes[:, :, t])
        assert out.shape == (codes.shape[0], 1)
        tokens.append(out[:, 0])
        logits.append(gen.last_text_logits)
        heads.append(gen.last_extra_heads)
    stacked = None if heads[0] is None else mx.stack(heads, axis=1)
    return mx.stack(tokens, axis=1), mx.stack(logits, axis=1), stacked


def max_err(a, b) -> float:
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


def check_trace(lm: Lm, io: dict, clip: str, tol_logits: float = TOL_LOGITS) -> None:
    tokens, logits, heads = greedy(lm, io[f"{clip}_codes"])
    assert tokens.tolist() == io[f"{clip}_text_tokens"].tolist()
    assert max_err(logits, io[f"{clip}_text_logits"]) < tol_logits
    # The reference stores each head's probability of class 0, the one Kyutai's scripts read.
    assert max_err(heads[..., 0], io[f"{clip}_extra_heads"]) < TOL_HEADS
    assert mx.allclose(heads.sum(-1), mx.ones(heads.shape[:-1]), atol=1e-5).item()


# ---- config and key layout -------------------------------------------------------------------


def test_config_reads_kyutai_stt_fields_with_upstream_defaults():
    raw = json.loads((STT_DIR / "config.json").read_text())
    assert "depformer_dim_feedforward" not in raw
    cfg = LmConfig.from_dict(raw)
    assert cfg.is_stt and cfg.model_type == "stt" and cfg.dep_q == 0
    assert (cfg.extra_heads_num_heads, cfg.extra_heads_dim) == (4, 6)
    assert (cfg.stt_delay_seconds, cfg.stt_prefix_seconds) == (0.5, 0.0)
    assert cfg.depformer_dim_feedforward == int(4.125 * 32)  # upstream's LMModel default
    assert cfg.mimi_codebooks == 32 and cfg.n_user == 32
    # The 2.6B writes the field as null; configs without model_type and dep_q 0 are STT.
    no_type = {k: v for k, v in raw.items() if k != "model_type"}
    assert LmConfig.from_dict({**no_type, "depformer_dim_feedforward": None}).is_stt
    for bad, match in (
        ({"model_type": "tts"}, "model_type"),
        ({"model_type": "moshi"}, "dep_q 0"),
        ({"stt_config": {"audio_delay_seconds": -1}}, "audio_delay_seconds"),
        ({"stt_config": {"audio_delay_seconds": 1e9}}, "audio_delay_seconds"),
        ({"extra_heads_num_heads": -1}, "extra_heads_num_heads"),
    ):
        with pytest.raises(MoshiError, match=match):
            LmConfig.from_dict({**raw, **bad})


def test_every_key_of_the_real_stt_1b_maps_onto_the_model_built_from_its_config():
    layout = json.loads((FULL_SIZE_KEYS / "stt_1b_keys.json").read_text())
    cfg = LmConfig.from_dict(layout["config"])
    model = Lm(cfg)  # lazy: nothing of the 1B is allocated
    params = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    keys = layout["tensors"]
    mapped = sanitize({k: mx.zeros(v["shape"]) for k, v in keys.items()}, lm_rules(cfg.schedule))
    assert len(mapped) == len(keys) == len(params)
    assert set(mapped) == set(params)
    for name, value in mapped.items():
        assert tuple(value.shape) == params[name], name
    total = sum(int(np.prod(s)) for s in params.values())
    assert total == layout["n_params"] == lm_parameters(cfg)
    # the memory check's sizes are the model's, tensor by tensor
    assert sum(c * r * k for c, r, k, _ in lm_tensors(cfg)) == total
    check_config_fits(cfg, None, "the STT 1B config", limit=8 << 30)


# ---- loading in every layout -----------------------------------------------------------------


def test_pytorch_release_layout_loads_with_32_codebook_mimi(model):
    lm, mimi, tokenizer = model
    assert lm.cfg.is_stt and len(lm.extra_heads) == 4
    assert not hasattr(lm, "depformer") and lm.linears == [] and lm.depformer_in == []
    assert mimi.num_codebooks == 32
    assert tokenizer.get_piece_size() == lm.cfg.text_card


@pytest.mark.parametrize("clip", ["clip0", "clip1"])
def test_greedy_trace_matches_reference(model, io, clip):
    check_trace(model.lm, io, clip)


def test_batch_rows_equal_their_single_runs(model, io):
    tokens, logits, heads = greedy(model.lm, io["batch_codes"])
    assert tokens.tolist() == io["batch_text_tokens"].tolist()
    assert max_err(logits, io["batch_text_logits"]) < TOL_LOGITS
    assert max_err(heads[..., 0], io["batch_extra_heads"]) < TOL_HEADS
    for row, clip in enumerate(("clip0", "clip1")):
        steps = io[f"{clip}_codes"].shape[2]
        single, single_logits, single_heads = greedy(model.lm, io[f"{clip}_codes"])
        assert tokens[row, :steps].tolist() == single[0].tolist()
        assert max_err(logits[row, :steps], single_logits[0]) < 1e-5
        assert max_err(heads[row, :steps], single_heads[0]) < TOL_HEADS


def _kyutai_mlx_names(params: dict[str, mx.array]) -> dict[str, mx.array]:
    """Our parameter names -> those of Kyutai's MLX repos (upstream ``moshi_mlx.models.Lm``)."""
    return {"audio_" + k.replace("emb.", "embs.", 1) if k.startswith("emb.") else k: v
            for k, v in params.items()}  # fmt: skip


@pytest.fixture(scope="module")
def kyutai_mlx_repo(tmp_path_factory, model):
    """The fixture in the layout of ``kyutai/stt-1b-en_fr-mlx``: the LM in upstream MLX names
    (bf16), the PyTorch Mimi, a config.json naming the files (its Mimi config under another
    name, read through ``mimi_config_name``)."""
    folder = tmp_path_factory.mktemp("stt-mlx")
    for name in ("mimi.safetensors", "tokenizer.model"):
        shutil.copy(STT_DIR / name, folder / name)
    shutil.copy(STT_DIR / "mimi_config.json", folder / "codec.json")
    config = json.loads((STT_DIR / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mimi_config_name": "codec.json"}))
    lm = moshi_mlx.load_lm(STT_DIR / "model.safetensors", STT_DIR / "config.json", mx.bfloat16)
    params = _kyutai_mlx_names(dict(tree_flatten(lm.parameters())))
    assert "audio_embs.0.weight" in params and "extra_heads.3.weight" in params
    mx.save_safetensors(str(folder / "model.safetensors"), params)
    return folder


def test_kyutai_mlx_layout_loads(kyutai_mlx_repo, io):
    lm, mimi, _ = moshi_mlx.load(kyutai_mlx_repo, dtype="float32")
    assert mimi.num_codebooks == 32
    # bf16 weights: the reference's greedy tokens, logits at bf16's precision
    tokens, logits, heads = greedy(lm, io["clip0_codes"])
    assert max_err(logits, io["clip0_text_logits"]) < 0.05
    assert heads.shape == (1, io["clip0_codes"].shape[2], 4, 6)


@pytest.mark.parametrize("bits", [4, 8])
def test_kyutai_mlx_layout_quantized_loads(tmp_path, io, bits):
    """Kyutai's quantized MLX files: upstream's ``nn.quantize`` of the bf16 model, saved."""
    quantize = Quantization(bits)
    direct = moshi_mlx.load(STT_DIR, dtype="bfloat16", quantize=quantize).lm
    folder = tmp_path / f"stt-mlx-q{bits}"
    folder.mkdir()
    for name in ("config.json", "mimi_config.json", "mimi.safetensors", "tokenizer.model"):
        shutil.copy(STT_DIR / name, folder / name)
    params = _kyutai_mlx_names(dict(tree_flatten(direct.parameters())))
    assert "audio_embs.0.scales" in params
    mx.save_safetensors(str(folder / "model.safetensors"), params)
    lm = moshi_mlx.load(folder).lm
    got, want = greedy(lm, io["clip0_codes"]), greedy(direct, io["clip0_codes"])
    assert got[0].tolist() == want[0].tolist() and max_err(got[1], want[1]) == 0


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_converted_folders_reload(tmp_path, io, bits):
    quantize = Quantization(bits) if bits else None
    out = tmp_path / f"stt-{bits or 'f32'}"
    convert(STT_DIR, out, dtype="float32", quantize=quantize)
    config = json.loads((out / "config.json").read_text())
    assert (
        config["model_type"] == "stt" and config["lm"]["stt_config"]["audio_delay_seconds"] == 0.5
    )
    lm, mimi, _ = moshi_mlx.load(out)
    assert lm.cfg.is_stt and mimi.num_codebooks == 32 and len(lm.extra_heads) == 4
    if bits is None:
        check_trace(lm, io, "clip0")
    else:  # exactly the model quantized while loading the release
        direct = moshi_mlx.load(STT_DIR, dtype="float32", quantize=quantize).lm
        got, want = greedy(lm, io["clip0_codes"]), greedy(direct, io["clip0_codes"])
        assert got[0].tolist() == want[0].tolist()
        assert max_err(got[1], want[1]) == 0 and max_err(got[2], want[2]) == 0


def test_checkpoint_without_extra_heads_loads_without_them_and_says_so_once(tmp_path, io):
    folder = tmp_path / "no-heads"
    shutil.copytree(STT_DIR, folder)
    weights = read_safetensors(STT_DIR / "model.safetensors")
    kept = {k: v for k, v in weights.items() if not k.startswith("extra_heads.")}
    (folder / "model.safetensors").unlink()
    mx.save_safetensors(str(folder / "model.safetensors"), kept)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm, _, _ = moshi_mlx.load(folder, dtype="float32")
    said = [w for w in caught if issubclass(w.category, MoshiWarning)]
    assert len(said) == 1 and "extra (voice-activity) heads" in str(said[0].message)
    assert lm.extra_heads == [] and lm.cfg.extra_heads_num_heads == 0
    tokens, _, heads = greedy(lm, io["clip0_codes"])
    assert heads is None and tokens.tolist() == io["clip0_text_tokens"].tolist()


def test_memory_check_sizes_stt_models(monkeypatch):
    cfg = LmConfig.from_dict(json.loads((STT_DIR / "config.json").read_text()))
    assert lm_parameters(cfg) == sum(
        int(np.prod(v.shape)) for _, v in tree_flatten(Lm(cfg).parameters())
    )
    monkeypatch.setenv("MOSHI_MLX_MEMORY_LIMIT_GB", "0.000001")
    with pytest.raises(MoshiError, match="needs"):
        moshi_mlx.load(STT_DIR)


# ---- word timestamps and the streaming transcriber -------------------------------------------

TIMESTAMPS = json.loads((STT_DIR / "timestamps.json").read_text())


def as_reference(words: list[Word]) -> list[dict]:
    return [{"word": w.text, "start_end": [w.start, w.end]} for w in words]


@pytest.mark.parametrize(
    "case", TIMESTAMPS["hand_made"], ids=lambda c: f"{c['name']}@{c['offset_seconds']}"
)
def test_timestamped_words_follow_kyutais_rule(model, case):
    words = timestamped_words(case["tokens"], model.tokenizer, case["offset_seconds"])
    assert as_reference(words) == case["words"]


@pytest.mark.parametrize("clip", ["clip0", "clip1"])
def test_timestamped_words_of_the_traces(model, clip):
    trace = TIMESTAMPS["traces"][clip]
    words = timestamped_words(trace["tokens"], model.tokenizer, TIMESTAMPS["offset_seconds"])
    assert as_reference(words) == trace["words"]


def frames_of(pcm: np.ndarray) -> list[np.ndarray]:
    """A clip as 1920-sample frames, the last zero-padded (as Kyutai's scripts pad)."""
    pad = [(0, 0)] * (pcm.ndim - 1) + [(0, -pcm.shape[-1] % FRAME)]
    pcm = np.pad(pcm, pad)
    return [pcm[..., i : i + FRAME] for i in range(0, pcm.shape[-1], FRAME)]


@pytest.mark.parametrize("engine", ["serial", "pipelined"])
def test_transcriber_streams_the_reference_trace_and_words(model, io, engine):
    lm, mimi, tokenizer = model
    with Transcriber(lm, mimi, tokenizer, engine=engine) as transcriber:
        assert transcriber.offset_seconds == TIMESTAMPS["offset_seconds"]
        updates = []
        for pcm in frames_of(np.array(io["clip0"][0, 0])):
            updates += transcriber.push(pcm)
        steps_before_finish = len(updates)
        updates += transcriber.finish()
    trace = TIMESTAMPS["traces"]["clip0"]
    # the clip's frames, then the audio delay's silence (7 frames) that pushes the last text out
    assert steps_before_finish + TIMESTAMPS["suffix_frames"] + 1 >= len(trace["tokens"])
    assert transcriber.tokens[0] == trace["tokens"]
    words = [w for u in updates for w in u.words[0]]
    assert as_reference(words) == trace["words"]
    assert "".join(u.text[0] for u in updates) == "".join(
        tokenizer.id_to_piece(t).replace("\u2581", " ") for t in trace["tokens"] if t > 3
    )
    assert transcriber.text() == text_of(trace["tokens"], tokenizer)
    # head 2's first class, read each step as Kyutai's microphone script reads it
    end_of_turn = [u.end_of_turn[0] for u in updates if u.end_of_turn is not None]
    assert np.allclose(end_of_turn, np.array(io["clip0_extra_heads"][0, :, 2]), atol=TOL_HEADS)


def test_transcriber_batch_rows_equal_single_streams(model, io):
    lm, mimi, tokenizer = model
    clips = [np.array(io[c][0, 0]) for c in ("clip0", "clip1")]
    longest = max(len(c) for c in clips)
    batch = np.stack([np.pad(c, (0, longest - len(c))) for c in clips])
    with Transcriber(lm, mimi, tokenizer, batch=2) as transcriber:
        for pcm in frames_of(batch):
            transcriber.push(pcm)
        transcriber.finish()
        rows = transcriber.tokens
    for row, clip in enumerate(("clip0", "clip1")):
        single = TIMESTAMPS["traces"][clip]["tokens"]
        assert rows[row][: len(single)] == single


def test_transcriber_refuses_a_dialogue_model_and_bad_frames(model, lm_dialogue):
    lm, mimi, tokenizer = model
    with pytest.raises(MoshiError, match="speech-to-text model"):
        Transcriber(lm_dialogue, mimi, tokenizer)
    with Transcriber(lm, mimi, tokenizer) as transcriber:
        with pytest.raises(MoshiError, match="pcm"):
            transcriber.push(np.zeros(100, np.float32))
        assert transcriber.finish() == []  # nothing pushed: nothing to say


def test_bench_times_stt_batches_on_the_fixture_and_at_real_sizes():
    r = moshi_mlx_cmd("bench", "--hf-path", STT_DIR, "--steps", 2, "--warmup", 1,
                      "--batch", "1,2", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["config"]["model_type"] == "stt" and result["rtf"] > 0
    assert set(result["batches"]) == {"1", "2"}
    for size, row in result["batches"].items():
        assert row["streams_realtime"] == round(int(size) * 80 / row["frame_ms_p50"], 2)
        assert row["realtime"] == (row["frame_ms_p50"] <= 80)
    # the summary has a line per batch size, the throughput against batch 1 beside the others
    r = moshi_mlx_cmd("bench", "--hf-path", STT_DIR, "--steps", 2, "--warmup", 1, "--batch",
                      "1,2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = {line.split()[1]: line for line in r.stdout.splitlines() if line.startswith("  batch ")}
    assert list(rows) == ["1", "2"] and "the streams of batch 1" in rows["2"], r.stdout
    assert "streams kept in real time" in rows["1"] and "x the streams" not in rows["1"]
    # the real STT 1B's layout, scaled down to one layer so that it builds quickly here
    r = moshi_mlx_cmd("bench", "--random-weights", "--config", "stt-1b", "--layers", 1, "--no-mimi",
                      "--steps", 1, "--warmup", 1, "--batch", "2", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["config"]["dim"] == 2048 and result["config"]["text_card"] == 8000
    assert list(result["batches"]) == ["2"]
