"""Band-limited sample-rate conversion: the filter bank shared by files and streams, and a
streaming resampler for sound devices that do not run at Moshi's 24 kHz.

Both use Kaiser-windowed sinc interpolation with the cut-off a little below the lower of the two
Nyquist frequencies. ``StreamResampler`` converts block by block with a fixed delay, so that an
80 ms block at the device's rate always becomes exactly one 1920-sample frame (and back).
"""

from __future__ import annotations

import math

import numpy as np


def kaiser_sinc_bank(
    up: int, down: int, half_taps: int = 24, beta: float = 8.0
) -> tuple[int, np.ndarray]:
    """Polyphase filters for output sample ``n`` at input position ``n * down / up``.

    Returns ``(reach, bank)``: ``bank[phase]`` (``[up, 2 * reach + 1]`` float64, unit gain at DC)
    weighs the input samples ``floor(position) - reach .. floor(position) + reach`` for an output
    whose position has fractional part ``phase / up``; ``half_taps`` zero crossings each side.
    """
    cutoff = min(1.0, up / down) * 0.95  # of the input's Nyquist
    radius = half_taps / cutoff  # in input samples
    reach = int(np.ceil(radius))
    d = (np.arange(up) / up)[:, None] - np.arange(-reach, reach + 1)[None, :]
    w = cutoff * np.sinc(cutoff * d)
    w *= np.i0(beta * np.sqrt(np.clip(1 - (d / radius) ** 2, 0, 1))) / np.i0(beta)
    w *= np.abs(d) < radius
    return reach, w / w.sum(axis=1, keepdims=True)


class StreamResampler:
    """Resample a mono stream from ``rate_in`` to ``rate_out`` Hz, one block at a time.

    Output sample ``n`` is the input at position ``n * rate_in / rate_out - delay``: a constant
    delay of ``reach`` input samples (``delay_s``, about 1 ms) buys causality, so a block of
    ``N`` input samples gives exactly ``N * rate_out / rate_in`` output samples whenever that is
    a whole number (any block of 80 ms at a common device rate), and never needs look-ahead.
    With equal rates it passes blocks through unchanged (``delay_s`` 0).
    """

    def __init__(self, rate_in: int, rate_out: int, half_taps: int = 16, beta: float = 8.0):
        self.rate_in, self.rate_out = int(rate_in), int(rate_out)
        g = math.gcd(self.rate_in, self.rate_out)
        self.up, self.down = self.rate_out // g, self.rate_in // g
        self.reach, self.bank = kaiser_sinc_bank(self.up, self.down, half_taps, beta)
        self.delay = 0 if self.up == self.down else self.reach  # in input samples
        self.delay_s = self.delay / self.rate_in
        self.taps = self.bank.shape[1]
        # input history: buf[0] is global input sample ``start`` (negative: silence before)
        self.start = -(self.delay + self.reach)
        self.buf = np.zeros(self.delay + self.reach, np.float64)
        self.received = 0  # input samples so far
        self.produced = 0  # output samples so far

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Resample the next block ``x`` (``[N]``); returns the output samples it completes."""
        x = np.asarray(x, np.float32).reshape(-1)
        if self.up == self.down:
            return x
        self.buf = np.concatenate([self.buf, x])
        self.received += len(x)
        n = np.arange(self.produced, self.received * self.up // self.down)
        self.produced += len(n)
        if not len(n):
            return np.zeros(0, np.float32)
        first = (n * self.down) // self.up - self.delay - self.reach - self.start
        windows = np.lib.stride_tricks.sliding_window_view(self.buf, self.taps)
        y = np.einsum("nt,nt->n", windows[first], self.bank[(n * self.down) % self.up])
        # keep what the next output still reads
        keep = (self.produced * self.down) // self.up - self.delay - self.reach - self.start
        self.buf = self.buf[keep:]
        self.start += keep
        return y.astype(np.float32)
