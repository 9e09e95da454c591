"""Sampling: one description (``Sampling``), upstream's filter semantics, and generators that
own their random state."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import LM_DIR

import moshi_mlx
from moshi_mlx import LmGen, MoshiError, Sampling
from moshi_mlx.sampling import PRESETS, token_sampler


def draws(sample, logits, n, seed=0):
    keys = mx.random.split(mx.random.key(seed), n)
    return [sample(logits, keys[i]).item() for i in range(n)]


def test_filters_follow_upstream_semantics():
    logits = mx.array([[0.0, 3.0, 2.9, -1.0]])
    # A nucleus or a top-k of one token leaves only the argmax, whatever the temperature.
    for sample in (token_sampler(5.0, 0, 1e-6, 4), token_sampler(5.0, 1, 0.0, 4),
                   token_sampler(0.0, 0, 0.0, 4)):  # fmt: skip
        assert draws(sample, logits, 20) == [1] * 20
    # top-p is taken on softmax(logits / temp): at temp 0.1 token 1 alone holds > 0.7 of the
    # mass; at temp 10 the two best tokens are needed.
    cold, hot = token_sampler(0.1, 0, 0.7, 4), token_sampler(10.0, 0, 0.55, 4)
    assert set(draws(cold, logits, 50)) == {1}
    assert set(draws(hot, logits, 200)) == {1, 2}
    # a top-k of the whole vocabulary is plain sampling: every token shows up
    assert set(draws(token_sampler(10.0, 4, 0.0, 4), logits, 400)) == {0, 1, 2, 3}


def test_presets_top_p_cuts_the_tail_and_top_k_keeps_it():
    # Token 1 holds 3 % of the mass: top-k 25 (chat's default) draws it about 12 times in 400,
    # top-p 0.95 (upstream MLX's Sampler()) never.
    vocab = 64
    row = mx.array([0.0, -3.5] + [-1e9] * (vocab - 2))  # e^-3.5 / (1 + e^-3.5) = 3 %
    logits = mx.broadcast_to(row, (400, vocab))
    key = mx.random.key(0)
    for name, expect_tail in (("top-p", False), ("top-k", True)):
        s = PRESETS[name]
        # temperature 1 isolates the filter from the temperature
        tokens = token_sampler(1.0, s.top_k_text, s.top_p_text, vocab)(logits, key)
        assert bool(mx.any(tokens == 1).item()) is expect_tail, name


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"temp": -0.1}, "`temp` must be a finite number >= 0"),
        ({"temp_text": math.nan}, "`temp_text` must be a finite number"),
        ({"temp": math.inf}, "`temp` must be a finite number"),
        ({"top_k": -1}, "`top_k` must be an integer >= 0"),
        ({"top_k_text": 2.5}, "`top_k_text` must be an integer"),
        ({"top_p": 1.5}, "`top_p` must be in [0, 1]"),
        ({"seed": -1}, "`seed` must be an integer >= 0"),
        ({"seed": "7"}, "`seed` must be an integer"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(changes, words):
    with pytest.raises(MoshiError) as e:
        Sampling(**changes)
    assert words in str(e.value)


@pytest.fixture(scope="module")
def lm():
    return moshi_mlx.load_lm(LM_DIR / "weights.safetensors", LM_DIR / "config.json")


def run(gen, user, steps=6):
    return [None if (o := gen.step(user[s : s + 1])) is None else np.array(o) for s in range(steps)]


def test_generators_own_their_random_state(lm):
    user = mx.array(np.random.default_rng(0).integers(0, 2048, size=(6, 8)))
    alone_a = run(LmGen(lm, seed=1), user)
    alone_b = run(LmGen(lm, seed=2), user)
    # interleaved in one process, with the global random state disturbed in between
    a, b = LmGen(lm, seed=1), LmGen(lm, seed=2)
    mixed_a, mixed_b = [], []
    for s in range(6):
        mx.random.seed(1234 + s)
        mixed_a.append(a.step(user[s : s + 1]))
        mx.random.uniform(shape=(3,))
        mixed_b.append(b.step(user[s : s + 1]))
    as_np = [[None if o is None else np.array(o) for o in run_] for run_ in (mixed_a, mixed_b)]
    for x, y in zip(alone_a + alone_b, as_np[0] + as_np[1], strict=True):
        assert (x is None and y is None) or np.array_equal(x, y)
    # different seeds really sample differently
    assert any(not np.array_equal(x, y) for x, y in zip(alone_a[1:], alone_b[1:], strict=True))


def test_reset_rewinds_a_seeded_generator(lm):
    user = mx.array(np.random.default_rng(1).integers(0, 2048, size=(6, 8)))
    gen = LmGen(lm, Sampling(seed=5))
    first = run(gen, user)
    gen.reset()
    again = run(gen, user)
    assert all(np.array_equal(x, y) for x, y in zip(first[1:], again[1:], strict=True))


def test_sampling_object_or_keywords_not_both(lm):
    assert LmGen(lm, Sampling(temp=0.5)).sampling.temp == 0.5
    assert LmGen(lm, temp=0.5).sampling.temp == 0.5
    with pytest.raises(MoshiError, match="not both"):
        LmGen(lm, Sampling(), temp=0.5)
