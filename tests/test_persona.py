"""NVIDIA PersonaPlex against its own ``LMGen`` (tests/fixtures/persona, see its MANIFEST):
loading the 16-step depformer at Moshi's 8, teacher forcing call by call, the system prompt and
its batched prefill, and the voice / text prompt helpers.

Alignment: NVIDIA's first call runs no model, so its call ``i + 1`` is our step ``i``, given
the arguments of its call ``i``.
"""

from __future__ import annotations

import json
import re
import warnings

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, LM_DIR
from mlx.utils import tree_flatten

import moshi_mlx
from moshi_mlx import LmConfig, LmGen
from moshi_mlx.errors import MoshiWarning
from moshi_mlx.loading import as_lm_config

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


def test_without_a_config_persona_weights_mean_personaplex_7b():
    assert as_lm_config(None, [WEIGHTS]) == LmConfig.personaplex_7b()
    assert as_lm_config(None, [LM_DIR / "weights.safetensors"]) == LmConfig.moshi_7b()
    assert LmConfig.personaplex_7b().dep_q == 8
