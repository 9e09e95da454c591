"""Integrated loudness of mono audio (ITU-R BS.1770-4, in LUFS) and normalisation to a target
loudness, with numpy only. PersonaPlex normalises a voice prompt to -24 LUFS before encoding it.

BS.1770-4: K-weighting (a high shelf, then a high pass), mean squares over 400 ms blocks with
75 % overlap, block loudness ``-0.691 + 10 log10(z)``, blocks kept above -70 LUFS (absolute
gate) and above the loudness of those minus 10 LU (relative gate); the integrated loudness is
that of the mean square of the kept blocks.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import MoshiError

BLOCK_SECONDS = 0.4
BLOCK_STEP = 0.25  # of a block: 75 % overlap
ABSOLUTE_GATE = -70.0  # LUFS
RELATIVE_GATE = -10.0  # LU below the loudness of the blocks above the absolute gate

# Analog prototypes of the two K-weighting stages; their bilinear transforms at 48 kHz are
# BS.1770-4's published coefficients (to 1e-14; the parameters libebur128 derives), and at any
# other rate they give the same filter, where the standard only tabulates 48 kHz.
_SHELF = (1681.974450955533, 3.999843853973347, 0.7071752369554196)  # f0 (Hz), gain (dB), Q
_SHELF_VB_EXPONENT = 0.4996667741545416
_HIGH_PASS = (38.13547087602444, 0.5003270373238773)  # f0 (Hz), Q

# Zeros appended before filtering in the frequency domain: both stages' impulse responses have
# decayed below 1e-100 after one second, so the circular filtering is the causal IIR's output.
_TAIL_SECONDS = 1.0


def k_weighting(sample_rate: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The K-weighting filter at ``sample_rate``: two biquads ``(b, a)`` (``a[0] == 1``)."""
    f0, gain_db, q = _SHELF
    k = math.tan(math.pi * f0 / sample_rate)
    vh = 10 ** (gain_db / 20)
    vb = vh**_SHELF_VB_EXPONENT
    a0 = 1 + k / q + k * k
    shelf = (
        np.array([vh + vb * k / q + k * k, 2 * (k * k - vh), vh - vb * k / q + k * k]) / a0,
        np.array([a0, 2 * (k * k - 1), 1 - k / q + k * k]) / a0,
    )
    f0, q = _HIGH_PASS
    k = math.tan(math.pi * f0 / sample_rate)
    a0 = 1 + k / q + k * k
    high_pass = (
        np.array([1.0, -2.0, 1.0]),
        np.array([a0, 2 * (k * k - 1), 1 - k / q + k * k]) / a0,
    )
    return [shelf, high_pass]


def k_weighted(pcm: np.ndarray, sample_rate: int) -> np.ndarray:
    """``pcm`` ``[T]`` through the K-weighting filter (zero initial state), float64 ``[T]``.

    Computed in the frequency domain over the signal plus a decayed tail: the same numbers as
    running the recursion sample by sample, without a Python loop or scipy.
    """
    x = np.asarray(pcm, dtype=np.float64)
    n = x.size + int(_TAIL_SECONDS * sample_rate)
    # e^{-jw} per rfft bin, then each biquad's response B(e^{-jw}) / A(e^{-jw}).
    z = np.exp(-2j * np.pi * np.arange(n // 2 + 1) / n)
    response = np.ones_like(z)
    for b, a in k_weighting(sample_rate):
        response *= np.polyval(b[::-1], z) / np.polyval(a[::-1], z)
    return np.fft.irfft(np.fft.rfft(x, n) * response, n)[: x.size]


def integrated_loudness(pcm: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness of mono ``pcm`` ``[T]`` (float, full scale 1.0) in LUFS, -inf when
    every block is below the absolute gate. Needs at least one 400 ms block."""
    pcm = np.asarray(pcm)
    block = round(BLOCK_SECONDS * sample_rate)
    step = round(BLOCK_STEP * block)
    if pcm.ndim != 1:
        raise MoshiError(f"loudness needs mono audio [samples], got shape {list(pcm.shape)}")
    if pcm.size < block:
        raise MoshiError(
            f"loudness needs at least {BLOCK_SECONDS} s of audio, got {pcm.size / sample_rate} s"
        )
    power = np.concatenate([[0.0], np.cumsum(k_weighted(pcm, sample_rate) ** 2)])
    starts = np.arange(0, pcm.size - block + 1, step)  # whole blocks only
    z = (power[starts + block] - power[starts]) / block
    with np.errstate(divide="ignore"):
        block_loudness = -0.691 + 10 * np.log10(z)
    kept = z[block_loudness > ABSOLUTE_GATE]
    if kept.size == 0:
        return -math.inf
    gate = -0.691 + 10 * math.log10(kept.mean()) + RELATIVE_GATE
    kept = z[(block_loudness > ABSOLUTE_GATE) & (block_loudness > gate)]
    return -0.691 + 10 * math.log10(kept.mean())


def normalize_loudness(pcm: np.ndarray, sample_rate: int, target: float = -24.0) -> np.ndarray:
    """``pcm`` scaled to ``target`` LUFS (float32; no clipping, as NVIDIA's pyloudnorm)."""
    loudness = integrated_loudness(pcm, sample_rate)
    if not math.isfinite(loudness):
        raise MoshiError("the audio is silent (below -70 LUFS everywhere); it cannot be normalised")
    gain = 10 ** ((target - loudness) / 20)
    return (np.asarray(pcm, dtype=np.float64) * gain).astype(np.float32)
