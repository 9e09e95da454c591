"""NVIDIA PersonaPlex against its own ``LMGen`` (tests/fixtures/persona, see its MANIFEST):
loading the 16-step depformer at Moshi's 8, teacher forcing call by call, the system prompt and
its batched prefill, and the voice / text prompt helpers.

Alignment: NVIDIA's first call runs no model, so its call ``i + 1`` is our step ``i``, given
the arguments of its call ``i``.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, FULL_SIZE_KEYS, LM_DIR, MIMI_DIR, moshi_mlx_cmd
from mlx.utils import tree_flatten

import moshi_mlx
from moshi_mlx import Lm, LmConfig, LmGen, persona
from moshi_mlx.app.wavio import write_wav
from moshi_mlx.errors import MoshiError, MoshiWarning
from moshi_mlx.loading import as_lm_config
from moshi_mlx.loudness import normalize_loudness
from moshi_mlx.weights import drop_user_depformer_steps, lm_rules, sanitize

PERSONA_DIR = FIXTURES / "persona"
WEIGHTS = PERSONA_DIR / "weights.safetensors"
CONFIG = PERSONA_DIR / "config.json"
TOL = 1e-4


@pytest.fixture(scope="module")
def io() -> dict[str, mx.array]:
    return mx.load(str(PERSONA_DIR / "io.safetensors"))


@pytest.fixture(scope="module")
def lm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MoshiWarning)  # checked in its own test
        return moshi_mlx.load_lm(WEIGHTS, CONFIG)


def max_err(a, b) -> float:
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


def load_recording_warnings(*args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = moshi_mlx.load_lm(*args, **kwargs)
    return lm, [w for w in caught if issubclass(w.category, MoshiWarning)]


def params(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def assert_same_params(a, b) -> None:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    assert all(mx.array_equal(pa[k], pb[k]).item() for k in pa)


# ---- loading ---------------------------------------------------------------------------------


def test_16_step_checkpoint_loads_at_dep_q_8_with_one_warning():
    lm, caught = load_recording_warnings(WEIGHTS, CONFIG)
    assert (lm.cfg.dep_q, lm.cfg.n_user, lm.cfg.persona) == (8, 8, True)
    assert len(lm.linears) == len(lm.depformer_in) == 8 and len(lm.depformer_emb) == 7
    layer = lm.depformer.layers[0]
    assert layer.self_attn.in_proj.weight.shape == (8 * 3 * 32, 32) and len(layer.gating) == 8
    assert len(caught) == 1
    assert re.search(r"depformer steps 8-15 predict only the user's audio", str(caught[0].message))


def test_no_prompt_trace_matches_nvidia(lm, io):
    gen = LmGen(lm, temp=0, temp_text=0)
    user = io["noprompt_user_codes"]
    for i in range(user.shape[0] - 1):
        out = gen.step(user[i : i + 1])
        j = i + 1  # NVIDIA's call
        assert np.array_equal(np.array(gen.last_input[0]), np.array(io["noprompt_model_input"][j]))
        ref = np.array(io["noprompt_out"][j, :9])
        assert (out is None) == (ref[0] == -100)
        assert out is None or np.array_equal(np.array(out[0]), ref)
        assert max_err(gen.last_text_logits[0], io["noprompt_text_logits"][j]) < TOL
        # At NVIDIA's first model call, codebooks 2..7 are fed the delayed streams' initial
        # token (2048), ours (and Kyutai's) their own samples: never output (MANIFEST).
        audio = mx.stack(gen.last_audio_logits, axis=1)[0]
        books = slice(0, 2) if i == 0 else slice(0, 8)
        assert max_err(audio[books], io["noprompt_dep_logits"][j, books]) < TOL


def persona_checkpoint_with_8_steps(path) -> None:
    """The fixture as an 8-step checkpoint (what NVIDIA's loader expands by copying)."""
    raw = mx.load(str(WEIGHTS))
    keep = {}
    for name, value in raw.items():
        step = re.match(
            r"(depformer_in|linears|depformer_emb|depformer\.layers\.\d+\.gating)\.(\d+)", name
        )
        if step and int(step[2]) >= (7 if step[1] == "depformer_emb" else 8):
            continue
        if name.endswith("self_attn.in_proj_weight") and name.startswith("depformer"):
            value = value[: 8 * 3 * 32]
        elif name.endswith("self_attn.out_proj.weight") and name.startswith("depformer"):
            value = value[: 8 * 32]
        keep[name] = value
    mx.save_safetensors(str(path), keep)


def test_8_step_checkpoint_with_dep_q_16_config_loads_silently(lm, tmp_path):
    persona_checkpoint_with_8_steps(tmp_path / "model.safetensors")
    eight, caught = load_recording_warnings(tmp_path / "model.safetensors", CONFIG)
    assert caught == [] and eight.cfg == lm.cfg
    assert_same_params(eight, lm)


def kyutai_mlx_layout(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """The fixture (PyTorch names) as Kyutai's MLX repos store an LM: per-slice depformer."""
    out = {}
    for name, value in weights.items():
        if name.startswith(("depformer", "linears")):
            continue
        name = name.replace("self_attn.in_proj_weight", "self_attn.in_proj.weight")
        if name.endswith(".alpha"):
            name, value = name.replace(".alpha", ".weight"), value.reshape(-1)
        out[re.sub(r"^emb\.", "audio_embs.", name)] = value
    d = 32
    for k in range(16):
        s = f"depformer.slices.{k}"
        out[f"{s}.linear_in.weight"] = weights[f"depformer_in.{k}.weight"]
        out[f"{s}.linear_out.weight"] = weights[f"linears.{k}.weight"]
        emb = "depformer_text_emb" if k == 0 else f"depformer_emb.{k - 1}"
        out[f"{s}.emb.weight"] = weights[f"{emb}.weight"]
        for layer in range(2):
            src, dst = f"depformer.layers.{layer}", f"{s}.transformer.layers.{layer}"
            in_proj = weights[f"{src}.self_attn.in_proj_weight"]
            out[f"{dst}.self_attn.in_proj.weight"] = in_proj[3 * d * k : 3 * d * (k + 1)]
            out_proj = weights[f"{src}.self_attn.out_proj.weight"]
            out[f"{dst}.self_attn.out_proj.weight"] = out_proj[d * k : d * (k + 1)]
            for lin in ("linear_in", "linear_out"):
                out[f"{dst}.gating.{lin}.weight"] = weights[f"{src}.gating.{k}.{lin}.weight"]
            for norm in ("norm1", "norm2"):
                out[f"{dst}.{norm}.weight"] = weights[f"{src}.{norm}.alpha"].reshape(-1)
    return out


def test_kyutai_mlx_layout_loads_like_the_pytorch_layout(lm, tmp_path):
    mx.save_safetensors(
        str(tmp_path / "model.safetensors"), kyutai_mlx_layout(mx.load(str(WEIGHTS)))
    )
    mlx_lm, caught = load_recording_warnings(tmp_path / "model.safetensors", CONFIG)
    assert len(caught) == 1
    assert_same_params(mlx_lm, lm)


def test_converted_persona_model_keeps_dep_q_8_and_its_persona_flag(lm, tmp_path):
    # What a converted folder holds: our parameter names and ``cfg.to_dict()``.
    config = json.loads(json.dumps(lm.cfg.to_dict()))
    assert config["dep_q"] == 8 and config["persona"] is True
    mx.save_safetensors(str(tmp_path / "model.safetensors"), params(lm))
    again, caught = load_recording_warnings(tmp_path / "model.safetensors", config)
    assert caught == [] and again.cfg == lm.cfg
    assert_same_params(again, lm)


def test_persona_folder_loads_with_one_warning(tmp_path, spm_model):
    # Laid out like nvidia/personaplex-7b-v1, plus the tiny model's configs.
    shutil.copy(WEIGHTS, tmp_path / "model.safetensors")
    shutil.copy(CONFIG, tmp_path / "config.json")
    shutil.copy(
        MIMI_DIR / "weights.safetensors", tmp_path / "tokenizer-e351c8d8-checkpoint125.safetensors"
    )
    shutil.copy(MIMI_DIR / "config.json", tmp_path / "mimi_config.json")
    shutil.copy(spm_model, tmp_path / "tokenizer_spm_32k_3.model")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm, mimi, _ = moshi_mlx.load(tmp_path)
    assert [w.category for w in caught] == [MoshiWarning]
    assert (lm.cfg.dep_q, lm.cfg.persona, mimi.num_codebooks) == (8, True, 8)


def personaplex_7b_keys() -> dict[str, list[int]]:
    """The released PersonaPlex checkpoint's keys and shapes: Moshiko 7B's with a 16-step
    depformer (NVIDIA's LMModel with dep_q 16)."""
    layout = json.loads((FULL_SIZE_KEYS / "moshi_7b_keys.json").read_text())["checkpoint_layout"]
    keys = {k: v["shape"] for k, v in layout.items()}
    for name, shape in list(keys.items()):
        per_step = re.fullmatch(r"(depformer_in|linears|.+\.gating)\.(\d+)\.(.+)", name)
        if per_step:
            keys[f"{per_step[1]}.{int(per_step[2]) + 8}.{per_step[3]}"] = shape
        elif re.fullmatch(r"depformer\..+\.(in_proj_weight|out_proj\.weight)", name):
            keys[name] = [2 * shape[0], shape[1]]
    for k in range(7, 15):  # the embeddings of codebooks 7..14, inputs of steps 8..15
        keys[f"depformer_emb.{k}.weight"] = keys["depformer_emb.0.weight"]
    return keys


def test_every_released_personaplex_key_maps_onto_the_7b_at_dep_q_8():
    keys = personaplex_7b_keys()
    assert len(keys) == 355 + 8 + 8 + 8 + 6 * 8 * 2
    assert sum(np.prod(s) for s in keys.values()) == 8_371_408_896  # the release's 8.37 B
    cfg = LmConfig.personaplex_7b()
    stand_ins = {k: mx.zeros(shape, mx.bfloat16) for k, shape in keys.items()}  # never allocated
    mapped, dropped = drop_user_depformer_steps(sanitize(stand_ins, lm_rules(cfg.schedule)), cfg)
    assert dropped == list(range(8, 16))
    expected = {k: v.shape for k, v in tree_flatten(Lm(cfg).parameters())}
    assert {k: v.shape for k, v in mapped.items()} == expected
    assert sum(np.prod(s) for s in expected.values()) == 7_687_729_152  # Moshiko's size


def test_without_a_config_persona_weights_mean_personaplex_7b():
    assert as_lm_config(None, weights=[WEIGHTS]) == LmConfig.personaplex_7b()
    assert as_lm_config(None, weights=[LM_DIR / "weights.safetensors"]) == LmConfig.moshi_7b()
    assert LmConfig.personaplex_7b().dep_q == 8


# ---- teacher forcing, call by call -----------------------------------------------------------

CONVERSATION = 4  # call_phase of the conversation calls


def nvidia_arguments(io, i: int) -> dict:
    """NVIDIA's call ``i`` as our step's keywords (-100: not given)."""
    agent, text = io["call_arg_agent"][i : i + 1], io["call_arg_text"][i : i + 1]
    return {
        "moshi_codes": None if (agent < 0).any().item() else agent,
        "text_token": None if (text < 0).any().item() else text,
    }


def test_call_by_call_forcing_reproduces_nvidia(lm, io):
    """Every call of NVIDIA's run (prompt phases, then conversation): the same model input
    and outputs, text logits, and depth-transformer logits in the conversation.

    In the prompt phases NVIDIA's depformer is fed the text and codebook 0 given at its
    *next* call (it runs one call late); a step cannot know those, and they cannot matter:
    every token the prompt's depformer samples is replaced by a given one. The forcing
    itself is checked against those logits in the next test."""
    gen = LmGen(lm, temp=0, temp_text=0)
    phase = np.array(io["call_phase"])
    for i in range(phase.size - 1):
        out = gen.step(io["call_arg_user"][i : i + 1], **nvidia_arguments(io, i))
        j = i + 1
        assert np.array_equal(np.array(gen.last_input[0]), np.array(io["call_model_input"][j]))
        # NVIDIA's rows 0..8 (text, Moshi's audio); dep8_out: its run stopped at step 8.
        ref = np.array(io["dep8_out"][j, :9])
        assert np.array_equal(ref, np.array(io["call_out"][j, :9]))
        assert (out is None) == (ref[0] == -100)
        assert out is None or np.array_equal(np.array(out[0]), ref)
        assert max_err(gen.last_text_logits[0], io["call_text_logits"][j]) < TOL
        if phase[j] == CONVERSATION:
            audio = mx.stack(gen.last_audio_logits, axis=1)[0]
            assert max_err(audio, io["call_dep_logits"][j, :8]) < TOL


def test_depformer_forcing_matches_nvidia_given_its_target_column(lm, io):
    """Fed NVIDIA's given tokens of each call (``call_target`` where ``call_provided``), our
    depformer gives its logits for all 42 model calls, prompt phases included; forced tokens
    replace the samples and feed the next codebook."""
    calls = io["call_model_input"].shape[0]
    x = io["call_model_input"][1:].T[None].astype(mx.int32)  # the 42 model inputs [1, 17, 42]
    z, _ = lm.temporal(lm.embed(x))  # teacher forced: 42 steps fit the 64-step window
    assert max_err(z[0], io["call_transformer_out"][1:]) < TOL
    gen = LmGen(lm, temp=0, temp_text=0)
    for j in range(1, calls):
        provided = io["call_provided"][j, :9]
        forced = mx.where(provided, io["call_target"][j, :9], 0).astype(mx.int32)[None]
        text = mx.argmax(io["call_text_logits"][j])[None]
        produced, logits = gen.depformer_step(
            z[:, j - 1 : j], text, forced, provided, mx.random.key(0)
        )
        assert max_err(logits[0], io["call_dep_logits"][j, :8]) < TOL
        audio = mx.where(provided[1:], forced[0, 1:], io["call_dep_tokens"][j, :8])
        assert produced[0, 0].item() == io["call_dep_text_in"][j].item()
        assert mx.array_equal(produced[0, 1:], audio).item()


class TracingGen(LmGen):
    traces = 0

    def depformer_step(self, *args):
        TracingGen.traces += 1  # runs only while mx.compile traces the graph
        return super().depformer_step(*args)


def test_forced_and_free_steps_share_one_compiled_depformer(lm):
    gen = TracingGen(lm, seed=3)
    user = mx.zeros((1, 8), mx.int32)
    moshi, text = mx.full((1, 8), 7, mx.int32), mx.array([5])
    for given in ({}, {"moshi_codes": moshi}, {"text_token": text}, {},
                  {"moshi_codes": moshi, "text_token": text}, {}):  # fmt: skip
        out = gen.step(user, **given)
    mx.eval(out)
    assert gen.offset == 6 and TracingGen.traces == 1


@pytest.mark.parametrize(
    "given, message",
    [
        ({"moshi_codes": mx.zeros((1, 7), mx.int32)}, r"moshi_codes must be \[batch, 8\]"),
        ({"moshi_codes": mx.full((1, 8), 2048, mx.int32)}, r"moshi_codes must be in \[0, 2048\)"),
        ({"moshi_codes": mx.zeros((1, 8))}, "moshi_codes must be integers"),
        ({"moshi_codes": mx.zeros((2, 8), mx.int32)}, "differ in batch size"),
        ({"text_token": mx.zeros((1, 1), mx.int32)}, r"text_token must be \[batch\]"),
        ({"text_token": mx.array([128])}, r"text_token must be in \[0, 128\)"),
        ({"text_token": [3]}, "text_token must be an mx.array"),
    ],
)
def test_given_tokens_are_checked(lm, given, message):
    gen = LmGen(lm, temp=0, temp_text=0)
    with pytest.raises(MoshiError, match=message):
        gen.step(mx.zeros((1, 8), mx.int32), **given)


def test_given_tokens_keep_the_conversation_batch_size(lm):
    gen = LmGen(lm, temp=0, temp_text=0)
    gen.step(mx.zeros((1, 8), mx.int32))
    with pytest.raises(MoshiError, match="text_token has batch size 2 but this conversation"):
        gen.step(mx.zeros((1, 8), mx.int32), text_token=mx.array([3, 3]))


# ---- system prompt ---------------------------------------------------------------------------


def nvidia_prompt(io) -> tuple:
    """``system_prompt``'s arguments for the prompt of NVIDIA's run."""
    return (
        io["prompt_voice_codes"],
        io["prompt_text_tokens"].tolist(),
        io["audio_silence_frame_cnt"].item(),
    )


def test_system_prompt_then_conversation_reproduces_nvidia(lm, io):
    phase = np.array(io["call_phase"])
    first = int(np.argmax(phase == CONVERSATION))  # NVIDIA's first conversation call
    gen = LmGen(lm, temp=0, temp_text=0)
    gen.system_prompt(*nvidia_prompt(io))
    assert gen.offset == first
    # The prompt's last frame is a step: NVIDIA's first conversation call.
    assert np.array_equal(np.array(gen.last_input[0]), np.array(io["call_model_input"][first]))
    assert max_err(gen.last_text_logits[0], io["call_text_logits"][first]) < TOL
    audio = mx.stack(gen.last_audio_logits, axis=1)[0]
    assert max_err(audio, io["call_dep_logits"][first, :8]) < TOL
    for k in range(phase.size - 1 - first):
        out = gen.step(io["user_codes"][k : k + 1])
        j = first + k + 1
        assert np.array_equal(np.array(out[0]), np.array(io["call_out"][j, :9]))
        assert max_err(gen.last_text_logits[0], io["call_text_logits"][j]) < TOL
        audio = mx.stack(gen.last_audio_logits, axis=1)[0]
        assert max_err(audio, io["call_dep_logits"][j, :8]) < TOL


def step_through_prompt(gen, io, voice, text, silence) -> None:
    """The prompt frame by frame through ``step``, in NVIDIA's order (voice, silence, text,
    silence), the user's side always the sine frame."""
    batch = voice.shape[0]
    sine = mx.broadcast_to(io["sine_tokens"][None], (batch, 8))
    quiet = mx.broadcast_to(io["silence_tokens"][None], (batch, 8))
    pad = mx.full((batch,), 3, mx.int32)
    frames = [(voice[:, :, f], pad) for f in range(voice.shape[2])] + [(quiet, pad)] * silence
    frames += [(quiet, mx.full((batch,), t, mx.int32)) for t in text] + [(quiet, pad)] * silence
    for moshi, token in frames:
        gen.step(sine, moshi_codes=moshi, text_token=token)


def in_time_order(cache) -> tuple[mx.array, mx.array]:
    """Keys and values of a rolling KV cache, oldest first."""
    keys, values = cache.keys_and_values()
    if cache.offset > keys.shape[2]:  # a full ring: the oldest entry is at the write index
        shift = cache.state[5] % keys.shape[2]
        keys, values = mx.roll(keys, -shift, axis=2), mx.roll(values, -shift, axis=2)
    return keys, values


def synthetic_prompt(frames: int, tokens: int, batch: int) -> tuple:
    rng = np.random.default_rng(frames)
    voice = mx.array(rng.integers(0, 2048, (batch, 8, frames)))
    return voice, rng.integers(4, 128, tokens).tolist(), 6


@pytest.mark.parametrize(
    "prompt, chunk",
    [
        ("nvidia", 256),
        ("past the window", 256),  # 101 frames > context 64: chunks of 64
        ("past the window", 7),
    ],
)
def test_batched_prefill_leaves_the_state_stepping_leaves(lm, io, monkeypatch, prompt, chunk):
    monkeypatch.setattr(moshi_mlx.generate, "PREFILL_CHUNK", chunk)
    voice, text, silence = nvidia_prompt(io) if prompt == "nvidia" else synthetic_prompt(80, 9, 2)
    prefilled, stepped = LmGen(lm, seed=5), LmGen(lm, seed=5)  # sampling: randomness must agree
    prefilled.system_prompt(voice, text, silence)
    step_through_prompt(stepped, io, voice, text, silence)
    assert prefilled.offset == stepped.offset
    assert prompt == "nvidia" or prefilled.offset > lm.cfg.context  # the window has rolled
    assert mx.array_equal(prefilled.key, stepped.key).item()
    for a, b in zip(prefilled.cache, stepped.cache, strict=True):
        assert a.offset == b.offset
        for x, y in zip(in_time_order(a), in_time_order(b), strict=True):
            assert x.shape == y.shape and max_err(x, y) < TOL
    user = np.random.default_rng(1).integers(0, 2048, (12, voice.shape[0], 8))
    for frame in user:
        out_a, out_b = prefilled.step(mx.array(frame)), stepped.step(mx.array(frame))
        assert np.array_equal(np.array(out_a), np.array(out_b))
        assert max_err(prefilled.last_text_logits, stepped.last_text_logits) < TOL


def test_system_prompt_on_a_model_not_trained_for_it_warns_once(lm, io):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LmGen(lm, temp=0).system_prompt(*nvidia_prompt(io))
        moshiko = moshi_mlx.load_lm(LM_DIR / "weights.safetensors", LM_DIR / "config.json")
        assert not moshiko.cfg.persona
        gen = LmGen(moshiko, temp=0, temp_text=0)
        gen.system_prompt(text_tokens=[5, 6, 7], silence_frames=2)
    assert [str(w.message) for w in caught if issubclass(w.category, MoshiWarning)] == [
        "this model was not trained for system prompts (it is not PersonaPlex); prompting it anyway"
    ]
    assert gen.offset == 7 and gen.step(mx.zeros((1, 8), mx.int32)).shape == (1, 9)


@pytest.mark.parametrize(
    "prompt, message",
    [
        (
            {"voice_codes": mx.zeros((1, 7, 3), mx.int32)},
            r"voice_codes must be \[batch, 8, frames\]",
        ),
        ({"voice_codes": mx.full((1, 8, 3), 2048)}, r"voice_codes must be in \[0, 2048\)"),
        ({"voice_codes": mx.zeros((1, 8, 3))}, "voice_codes must be integers"),
        ({"text_tokens": [5, 200]}, r"text_tokens must be in \[0, 128\)"),
        ({"text_tokens": [[5, 6]]}, r"text_tokens must be \[tokens\]"),
        ({"silence_frames": -1}, "silence_frames must be >= 0"),
        ({"silence_frames": 1.5}, "silence_frames must be an integer"),
    ],
)
def test_system_prompt_arguments_are_checked(lm, prompt, message):
    with pytest.raises(MoshiError, match=message):
        LmGen(lm).system_prompt(**prompt)


def test_system_prompt_keeps_the_conversation_batch_size(lm):
    gen = LmGen(lm)
    gen.step(mx.zeros((1, 8), mx.int32))
    with pytest.raises(MoshiError, match="voice_codes has batch size 2 but this conversation"):
        gen.system_prompt(mx.zeros((2, 8, 3), mx.int32))


# ---- prompts: text, voice, voice files -------------------------------------------------------


@pytest.fixture(scope="module")
def mimi():
    return moshi_mlx.load_mimi(MIMI_DIR / "weights.safetensors", MIMI_DIR / "config.json")


def voice_recording(samples: int, seed: int = 0) -> np.ndarray:
    """Noise bursts under a syllable-like envelope, as float32 at 24 kHz."""
    rng = np.random.default_rng(seed)
    envelope = np.repeat(rng.uniform(0, 0.5, samples // 2400 + 1), 2400)[:samples]
    return (rng.standard_normal(samples) * envelope).astype(np.float32)


def test_persona_models_are_told_by_their_config():
    assert persona.is_persona_model(SimpleNamespace(cfg=LmConfig.personaplex_7b()))
    assert not persona.is_persona_model(SimpleNamespace(cfg=LmConfig.moshi_7b()))


def test_text_prompt_is_wrapped_in_system_tags_then_tokenized(spm_model):
    import sentencepiece

    wrap = persona.wrap_with_system_tags
    assert wrap("  You enjoy a good talk. \n") == "<system> You enjoy a good talk. <system>"
    assert wrap("<system> Be brief. <system>") == "<system> Be brief. <system>"
    assert wrap("<system> Be brief.") == "<system> <system> Be brief. <system>"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    tokens = persona.text_prompt_tokens(sp, "hello there ")
    assert tokens == sp.encode("<system> hello there <system>") and len(tokens) > 2


def encode_frames(mimi, pcm: np.ndarray) -> mx.array:
    """``pcm`` zero-padded to whole frames, encoded frame by frame from a fresh stream."""
    frame = mimi.frame_size
    pcm = np.pad(pcm, (0, -pcm.size % frame))
    mimi.reset()
    codes = [
        mimi.encode_step(mx.array(pcm[i : i + frame])[None, None])
        for i in range(0, pcm.size, frame)
    ]
    return mx.concatenate(codes, axis=2)[:, :8]


def test_voice_prompt_is_normalised_framed_and_leaves_mimi_fresh(mimi):
    frame = mimi.frame_size
    pcm = voice_recording(5 * frame + 700)
    codes = persona.voice_prompt_from_pcm(mimi, pcm, 24000)
    first = mx.array(pcm[:frame])[None, None]
    after = mimi.encode_step(first)
    mimi.reset()
    assert mx.array_equal(after, mimi.encode_step(first)).item()  # Mimi was reset afterwards
    # NVIDIA's preparation by hand: -24 LUFS, the last frame zero-padded, frame by frame.
    assert codes.shape == (1, 8, 6)
    assert mx.array_equal(codes, encode_frames(mimi, normalize_loudness(pcm, 24000))).item()
    # The level of the recording does not matter (it would without normalisation).
    assert mx.array_equal(persona.voice_prompt_from_pcm(mimi, pcm / 4, 24000), codes).item()
    assert not mx.array_equal(encode_frames(mimi, pcm / 4), codes).item()


def test_voice_prompt_needs_mono_audio_at_mimi_rate(mimi):
    with pytest.raises(MoshiError, match="resample it to 24000 Hz"):
        persona.voice_prompt_from_pcm(mimi, voice_recording(24000), 16000)
    with pytest.raises(MoshiError, match=r"mono samples \[T\]"):
        persona.voice_prompt_from_pcm(mimi, np.zeros((2, 24000), np.float32), 24000)


def test_voice_prompt_drives_the_system_prompt(lm, mimi, spm_model):
    import sentencepiece

    codes = persona.voice_prompt_from_pcm(mimi, voice_recording(6 * 1920), 24000)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    text = persona.text_prompt_tokens(sp, "hello")
    gen = LmGen(lm, temp=0, temp_text=0)
    gen.system_prompt(codes, text)
    assert gen.offset == 6 + 6 + len(text) + 6
    assert gen.step(mx.zeros((1, 8), mx.int32)).shape == (1, 9)


def test_voice_prompt_file_round_trip(mimi, tmp_path):
    codes = mx.array(np.random.default_rng(0).integers(0, 2048, (1, 8, 5)))
    persona.save_voice_prompt(tmp_path / "voice.safetensors", codes, mimi)
    loaded = persona.load_voice_prompt(tmp_path / "voice.safetensors", mimi)
    assert loaded.dtype == mx.int32 and mx.array_equal(loaded, codes).item()


def test_voice_prompt_files_of_other_kinds_are_refused(mimi, tmp_path):
    good = {"format": persona.VOICE_PROMPT_FORMAT, "sample_rate": "24000", "frame_size": "1920"}
    codes = {"codes": mx.zeros((1, 8, 2), mx.int32)}
    (tmp_path / "NATF0.pt").write_bytes(b"\x80\x02pickle")
    mx.save_safetensors(str(tmp_path / "khz16.safetensors"), codes,
                        metadata={**good, "sample_rate": "16000", "card": "2048"})  # fmt: skip
    mx.save_safetensors(str(tmp_path / "wide.safetensors"), {"codes": mx.zeros((1, 16, 2))},
                        metadata={**good, "card": "2048"})  # fmt: skip
    (tmp_path / "noise.safetensors").write_bytes(b"not safetensors at all")
    for name, message in [
        ("NATF0.pt", r"torch pickles, which we never load; make a voice prompt from a WAV"),
        ("khz16.safetensors", "made for another codec: sample_rate 16000"),
        ("wide.safetensors", r"codes have shape \[1, 16, 2\]"),
        ("noise.safetensors", "not a safetensors file"),
        ("missing.safetensors", "voice prompt not found"),
    ]:
        with pytest.raises(MoshiError, match=message):
            persona.load_voice_prompt(tmp_path / name, mimi)
    with pytest.raises(MoshiError, match="not a voice prompt made by save_voice_prompt"):
        persona.load_voice_prompt(WEIGHTS, mimi)
    with pytest.raises(MoshiError, match=r"must be \[1, 8, frames\]"):
        persona.save_voice_prompt(tmp_path / "v.safetensors", mx.zeros((1, 7, 2)), mimi)


# ---- the command line: persona save, --voice-prompt and --text-prompt ------------------------


@pytest.fixture(scope="module")
def persona_folder(tmp_path_factory, spm_model) -> Path:
    """The PersonaPlex fixture laid out like nvidia/personaplex-7b-v1 (PyTorch release)."""
    folder = tmp_path_factory.mktemp("personaplex-fixture")
    shutil.copy(WEIGHTS, folder / "model.safetensors")
    shutil.copy(CONFIG, folder / "config.json")
    shutil.copy(MIMI_DIR / "weights.safetensors", folder / "tokenizer-e351c8d8.safetensors")
    shutil.copy(MIMI_DIR / "config.json", folder / "mimi_config.json")
    shutil.copy(spm_model, folder / "tokenizer_spm_32k_3.model")
    return folder


@pytest.fixture(scope="module")
def voice_wav(tmp_path_factory) -> Path:
    """Two seconds of a speech-like voice at 44.1 kHz stereo, quiet (the prompt normalises it)."""
    from room import synthetic_speech

    voice = synthetic_speech(2.0, seed=5, f0=180.0, rate=44100, level=0.02)
    path = tmp_path_factory.mktemp("voice") / "voice.wav"
    write_wav(path, np.stack([voice, 0.8 * voice], axis=1), 44100)
    return path


def run_json(folder, *args, tmp_path, name) -> tuple[dict, str]:
    speech = tmp_path / "in.wav"
    if not speech.exists():
        write_wav(speech, np.random.default_rng(0).standard_normal(24000 * 2) * 0.05, 24000)
    r = moshi_mlx_cmd("run", speech, tmp_path / name, "--hf-path", folder, "--dtype", "float32",
                      "--sampler", "greedy", "--json", *args, timeout=180)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr


def test_run_with_a_voice_and_a_role_applies_them_and_says_so(persona_folder, voice_wav, tmp_path):
    plain, _ = run_json(persona_folder, tmp_path=tmp_path, name="plain.wav")
    prompted, err = run_json(persona_folder, "--voice-prompt", voice_wav, "--text-prompt",
                             "You are a patient French teacher.", tmp_path=tmp_path,
                             name="a.wav")  # fmt: skip
    again, _ = run_json(persona_folder, "--voice-prompt", voice_wav, "--text-prompt",
                        "You are a patient French teacher.", "--engine", "serial",
                        tmp_path=tmp_path, name="b.wav")  # fmt: skip
    assert "persona prompt applied in" in err and "voice prompt: 2.0 s" in err
    assert "not trained for system prompts" not in err  # PersonaPlex is
    # greedy: the same every time, with either engine (pipelined by default)
    assert prompted["text_ids"] == again["text_ids"]
    assert prompted["text_ids"] != plain["text_ids"]  # the prompt changed the conversation
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()


def test_persona_save_then_reuse_gives_the_same_conversation(persona_folder, voice_wav, tmp_path):
    saved = tmp_path / "voice.safetensors"
    r = moshi_mlx_cmd("persona", "save", voice_wav, "-o", saved, "--hf-path", persona_folder,
                      timeout=120)  # fmt: skip
    assert r.returncode == 0 and saved.is_file(), r.stderr
    r = moshi_mlx_cmd("persona", "save", voice_wav, "-o", saved, "--hf-path", persona_folder)
    assert r.returncode == 1 and "exists; pick another name, or pass --force" in r.stderr
    from_wav, _ = run_json(persona_folder, "--voice-prompt", voice_wav, tmp_path=tmp_path,
                           name="wav.wav")  # fmt: skip
    from_file, _ = run_json(persona_folder, "--voice-prompt", saved, tmp_path=tmp_path,
                            name="file.wav")  # fmt: skip
    assert from_file["text_ids"] == from_wav["text_ids"]


def test_a_prompt_on_a_model_not_trained_for_it_is_one_warning(pytorch_repo, tmp_path):
    _, err = run_json(pytorch_repo, "--text-prompt", "You are a pirate.", tmp_path=tmp_path,
                      name="o.wav")  # fmt: skip
    warned = [line for line in err.splitlines() if "not trained for system prompts" in line]
    assert len(warned) == 1 and warned[0].startswith("moshi-mlx run: warning:"), err


@pytest.mark.parametrize("args, words", [
    (["--voice-prompt", "missing.wav"], "--voice-prompt: no such file"),
    (["--text-prompt", "  "], "--text-prompt is empty"),
    (["--voice-prompt", "voice.pt"], "torch pickles, which we never load"),
])  # fmt: skip
def test_bad_persona_flags_are_one_line(persona_folder, tmp_path, args, words):
    (tmp_path / "voice.pt").write_bytes(b"\x80\x04not really")
    args = [str(tmp_path / a) if a.endswith((".wav", ".pt")) else a for a in args]
    write_wav(tmp_path / "in.wav", np.zeros(4800), 24000)
    r = moshi_mlx_cmd("run", tmp_path / "in.wav", tmp_path / "out.wav", "--hf-path",
                      persona_folder, *args, timeout=120)  # fmt: skip
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and words in lines[-1] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out.wav").exists()
