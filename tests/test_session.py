"""The per-frame duplex compute shared by chat, run and bench."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from conftest import LM_DIR, MIMI_DIR

import moshi_mlx
from moshi_mlx.session import DuplexSession


def make_session(seed: int) -> DuplexSession:
    lm = moshi_mlx.load_lm(LM_DIR / "weights.safetensors", LM_DIR / "config.json")
    mimi = moshi_mlx.load_mimi(MIMI_DIR / "weights.safetensors", MIMI_DIR / "config.json")
    return DuplexSession(lm, mimi, moshi_mlx.LmGen(lm, seed=seed))


def test_session_equals_encode_generate_decode_by_hand(mimi_io):
    pcm = np.array(mimi_io["pcm"][0, 0])
    session = make_session(seed=3)
    results = [session.step(pcm[i * 1920 : (i + 1) * 1920]) for i in range(4)]

    lm = moshi_mlx.load_lm(LM_DIR / "weights.safetensors", LM_DIR / "config.json")
    mimi = moshi_mlx.load_mimi(MIMI_DIR / "weights.safetensors", MIMI_DIR / "config.json")
    mimi.set_num_codebooks(8)
    gen = moshi_mlx.LmGen(lm, seed=3)
    for i, result in enumerate(results):
        codes = mimi.encode_step(mx.array(pcm[None, None, i * 1920 : (i + 1) * 1920]))
        assert np.array_equal(result.user_codes, np.array(codes[0, :, 0]))
        out = gen.step(codes[:, :, 0])
        if out is None:
            assert i == 0 and result.pcm is None and result.text_id is None
            continue
        assert result.text_id == out[0, 0].item()
        assert np.array_equal(result.codes, np.array(out[0, 1:]))
        expected = mimi.decode_step(out[:, 1:, None])
        assert result.pcm.shape == (1920,) and result.pcm.dtype == np.float32
        assert np.allclose(result.pcm, np.array(expected[0, 0]), atol=1e-6)


def test_session_is_deterministic_for_a_seed_and_resets(mimi_io):
    pcm = np.array(mimi_io["pcm"][0, 0, : 5 * 1920]).reshape(5, 1920)
    session = make_session(seed=7)
    first = [session.step(f) for f in pcm]
    other = make_session(seed=7)  # same seed, new session
    second = [other.step(f) for f in pcm]
    session.reset()
    mx.random.seed(7)
    after_reset = [session.step(f) for f in pcm]
    for run in (second, after_reset):
        assert [r.text_id for r in run] == [r.text_id for r in first]
        for x, y in zip(first[1:], run[1:], strict=True):
            assert np.array_equal(x.codes, y.codes) and np.array_equal(x.pcm, y.pcm)
