"""BS.1770-4 integrated loudness (moshi_mlx.loudness) against the standard's published filter,
the meaning of its -0.691 offset, and EBU Tech 3341's minimum-requirement test signals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moshi_mlx.errors import MoshiError
from moshi_mlx.loudness import integrated_loudness, k_weighted, k_weighting, normalize_loudness

# ITU-R BS.1770-4, Annex 1, Tables 1 and 2: the two K-weighting stages at 48 kHz, (b, a).
SHELF_48K = (
    [1.53512485958697, -2.69169618940638, 1.19839281085285],
    [1.0, -1.69065929318241, 0.73248077421585],
)
HIGH_PASS_48K = ([1.0, -2.0, 1.0], [1.0, -1.99004745483398, 0.99007225036621])


def sine(levels: list[tuple[float, float]], rate: int, freq: float = 1000.0) -> np.ndarray:
    """A continuous sine whose peak level (dBFS) is ``levels[i][0]`` for ``levels[i][1]`` s."""
    amplitude = np.concatenate([np.full(round(s * rate), 10 ** (db / 20)) for db, s in levels])
    return amplitude * np.sin(2 * np.pi * freq * np.arange(amplitude.size) / rate)


def test_k_weighting_at_48_khz_is_the_published_filter():
    shelf, high_pass = k_weighting(48000)
    for ours, published in ((shelf, SHELF_48K), (high_pass, HIGH_PASS_48K)):
        np.testing.assert_allclose(ours[0], published[0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(ours[1], published[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("rate", [24000, 48000])
def test_frequency_domain_filtering_equals_the_recursion(rate):
    x = np.random.default_rng(0).standard_normal(4000)
    y = x
    for b, a in k_weighting(rate):  # direct form I, sample by sample
        out, x1, x2, y1, y2 = np.empty_like(y), 0.0, 0.0, 0.0, 0.0
        for n, v in enumerate(y):
            out[n] = b[0] * v + b[1] * x1 + b[2] * x2 - a[1] * y1 - a[2] * y2
            x1, x2, y1, y2 = v, x1, out[n], y1
        y = out
    assert np.abs(k_weighted(x, rate) - y).max() < 1e-9


def test_997_hz_sine_reads_its_mean_square():
    # BS.1770-4 sets the -0.691 offset to cancel the K-weighting gain at 997 Hz: a 997 Hz sine
    # of amplitude A reads 10 log10(A^2 / 2), -23.0103 LUFS at -20 dBFS. At 48 kHz the filter
    # is the standard's (its gain there: 0.69101 dB).
    expected = 10 * math.log10(0.1**2 / 2)
    assert integrated_loudness(sine([(-20, 10)], 48000, 997), 48000) == pytest.approx(
        expected, abs=1e-3
    )
    # At 24 kHz the same analog design is warped by the bilinear transform: measured +0.026 LU.
    assert integrated_loudness(sine([(-20, 10)], 24000, 997), 24000) == pytest.approx(
        expected, abs=0.05
    )


# EBU Tech 3341 test signals 1-5: stereo 1 kHz sines, the same level in both channels, expected
# loudness within +-0.1 LU. A mono sine 3.01 dB louder has the same summed mean square.
EBU_3341 = {
    "1 steady": ([(-23, 20)], -23.0),
    "2 steady, quieter": ([(-33, 20)], -33.0),
    "3 relative gate": ([(-36, 10), (-23, 60), (-36, 10)], -23.0),
    "4 absolute gate": ([(-72, 10), (-36, 10), (-23, 60), (-36, 10), (-72, 10)], -23.0),
    "5 gating at the edge": ([(-26, 20), (-20, 20.1), (-26, 20)], -23.0),
}


@pytest.mark.parametrize("case", EBU_3341)
def test_ebu_3341_signals_at_24_khz(case):
    levels, expected = EBU_3341[case]
    mono = [(db + 10 * math.log10(2), seconds) for db, seconds in levels]
    assert integrated_loudness(sine(mono, 24000), 24000) == pytest.approx(expected, abs=0.1)


def test_normalisation_reaches_the_target_by_a_gain():
    rng = np.random.default_rng(1)
    speechy = rng.standard_normal(3 * 24000) * np.repeat(rng.uniform(0, 0.3, 30), 2400)
    out = normalize_loudness(speechy, 24000, -24.0)
    assert out.dtype == np.float32
    assert integrated_loudness(out, 24000) == pytest.approx(-24.0, abs=1e-4)
    ratio = out / speechy
    assert np.allclose(ratio, ratio[0], rtol=1e-6)


def test_short_or_silent_audio_is_refused():
    with pytest.raises(MoshiError, match="at least 0.4 s"):
        integrated_loudness(np.ones(9599), 24000)
    assert integrated_loudness(np.zeros(24000), 24000) == -math.inf
    with pytest.raises(MoshiError, match="silent"):
        normalize_loudness(np.zeros(24000), 24000)
