"""Causal 1D convolutions with a streaming mode (Mimi's SEANet and resampling layers).

Data layout is MLX's NLC: ``[batch, time, channels]``. Weights are stored as MLX expects them,
``[out, kernel, in]`` (converted from PyTorch by ``moshi_mlx.weights``).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class Conv1d(nn.Module):
    """Causal conv: all ``(k - 1) * dilation + 1 - stride`` padding on the left.

    ``__call__`` runs on a whole signal whose length is a multiple of ``stride``; ``step`` runs on
    consecutive chunks of such lengths and gives the same result, carrying the last input samples.
    ``pad_mode`` is ``"constant"`` (zeros) or ``"replicate"`` (copies of the first sample).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = True,
        pad_mode: str = "constant",
    ):
        super().__init__()
        self.weight = mx.zeros((out_channels, kernel_size, in_channels))
        if bias:
            self.bias = mx.zeros((out_channels,))
        self.stride = stride
        self.dilation = dilation
        self.pad_mode = pad_mode
        self.padding = (kernel_size - 1) * dilation + 1 - stride
        self._previous: mx.array | None = None

    def _conv(self, x: mx.array) -> mx.array:
        y = mx.conv1d(x, self.weight, stride=self.stride, dilation=self.dilation)
        return y + self.bias if "bias" in self else y

    def _left_context(self, x: mx.array) -> mx.array:
        if self.pad_mode == "replicate":
            return mx.repeat(x[:, :1], self.padding, axis=1)
        return mx.zeros((x.shape[0], self.padding, x.shape[2]), x.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        if self.padding > 0:
            x = mx.concatenate([self._left_context(x), x], axis=1)
        return self._conv(x)

    def step(self, x: mx.array) -> mx.array:
        if self.padding == 0:
            return self._conv(x)
        if self._previous is None:
            self._previous = self._left_context(x)
        x = mx.concatenate([self._previous, x], axis=1)
        self._previous = x[:, x.shape[1] - self.padding :]
        return self._conv(x)

    def reset(self) -> None:
        self._previous = None


class ConvTranspose1d(nn.Module):
    """Transposed conv whose ``kernel - stride`` overlapping outputs are trimmed on the right.

    In streaming, that overlap (without the bias) is kept and added to the next chunk's first
    outputs, so chunked decoding equals decoding the whole sequence. ``groups == channels`` gives
    the depthwise variant Mimi uses for 12.5 -> 25 Hz upsampling.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        bias: bool = True,
        groups: int = 1,
    ):
        super().__init__()
        self.weight = mx.zeros((out_channels, kernel_size, in_channels // groups))
        if bias:
            self.bias = mx.zeros((out_channels,))
        self.stride = stride
        self.groups = groups
        self.overlap = kernel_size - stride
        self._partial: mx.array | None = None

    def _full(self, x: mx.array) -> mx.array:
        y = mx.conv_transpose1d(x, self.weight, stride=self.stride, groups=self.groups)
        return y + self.bias if "bias" in self else y

    def __call__(self, x: mx.array) -> mx.array:
        y = self._full(x)
        return y[:, : y.shape[1] - self.overlap]

    def step(self, x: mx.array) -> mx.array:
        y = self._full(x)
        if self.overlap == 0:
            return y
        if self._partial is not None:
            head = y[:, : self.overlap] + self._partial
            y = mx.concatenate([head, y[:, self.overlap :]], axis=1)
        tail = y[:, y.shape[1] - self.overlap :]
        self._partial = tail - self.bias if "bias" in self else tail
        return y[:, : y.shape[1] - self.overlap]

    def reset(self) -> None:
        self._partial = None
