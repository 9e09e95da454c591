"""Causal 1D convolutions with a streaming mode (Mimi's SEANet and resampling layers).

Data layout is MLX's NLC: ``[batch, time, channels]``. Weights are stored as MLX expects them,
``[out, kernel, in]`` (converted from PyTorch by ``moshi_mlx.weights``).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def stored_for_matmul(w: mx.array, axes: tuple[int, ...]) -> mx.array:
    """``w`` with the same shape and values, its memory laid out as ``w.transpose(axes)``
    row-contiguous: MLX's CPU matmul runs 2-3x faster on such a right operand than on a
    transposed view (measured on Mimi's float32 shapes)."""
    inverse = tuple(sorted(range(len(axes)), key=axes.__getitem__))
    return mx.contiguous(w.transpose(axes)).transpose(inverse)


class MatmulChoice:
    """A layer that computes either with MLX's own kernel or as one matrix product over
    re-laid-out weights. ``use_matmul`` picks, once, when a model is placed on a device
    (``place``): the matrix product is what is fast on MLX's CPU backend."""

    matmul = False
    MATMUL_AXES: tuple[int, ...] = ()

    def use_matmul(self, enable: bool) -> None:
        self.matmul = enable and self.matmul_applies()
        if self.matmul:
            self.weight = stored_for_matmul(self.weight, self.MATMUL_AXES)

    def matmul_applies(self) -> bool:
        return True


def place(model: nn.Module, device: mx.Device) -> None:
    """Choose every layer's kernel for ``device``: matrix products on the CPU, MLX's own
    convolutions elsewhere (the GPU)."""
    for _, m in model.named_modules():
        if isinstance(m, MatmulChoice):
            m.use_matmul(device.type == mx.cpu)


class Linear(MatmulChoice, nn.Linear):
    """``nn.Linear`` that can keep its weight laid out for a fast ``x @ weight.T``."""

    MATMUL_AXES = (1, 0)

    def __call__(self, x: mx.array) -> mx.array:
        if not self.matmul:
            return super().__call__(x)
        y = x @ self.weight.T
        return y + self.bias if "bias" in self else y


class Conv1d(MatmulChoice, nn.Module):
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

    MATMUL_AXES = (1, 2, 0)  # rows (tap, input channel), columns output channel

    def matmul_applies(self) -> bool:
        k = self.weight.shape[1]
        return self.stride == 1 or (k == 2 * self.stride and self.dilation == 1)

    def _conv(self, x: mx.array) -> mx.array:
        """Valid convolution of an already padded input."""
        if not self.matmul:
            y = mx.conv1d(x, self.weight, stride=self.stride, dilation=self.dilation)
            return y + self.bias if "bias" in self else y
        out_ch, k, in_ch = self.weight.shape
        B, T, _ = x.shape
        s, d = self.stride, self.dilation
        w = self.weight.transpose(self.MATMUL_AXES).reshape(k * in_ch, out_ch)
        if s == 1:  # im2col: k shifted copies side by side
            n = T - (k - 1) * d
            cols = x if k == 1 else mx.concatenate([x[:, i * d : i * d + n] for i in range(k)], -1)
        else:  # kernel 2 * stride: output t reads input frames t and t + 1 of `s` samples each
            frames = x.reshape(B, T // s, s * in_ch)
            cols = mx.concatenate([frames[:, :-1], frames[:, 1:]], axis=-1)
        y = cols @ w
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


class ConvTranspose1d(MatmulChoice, nn.Module):
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

    MATMUL_AXES = (2, 1, 0)  # rows input channel, columns (tap, output channel)

    def matmul_applies(self) -> bool:
        return self.weight.shape[1] == 2 * self.stride

    def _full(self, x: mx.array) -> mx.array:
        """All ``(T - 1) * stride + kernel`` outputs, bias included."""
        if not self.matmul:
            y = mx.conv_transpose1d(x, self.weight, stride=self.stride, groups=self.groups)
            return y + self.bias if "bias" in self else y
        out_ch, k, _ = self.weight.shape
        B, T, in_ch = x.shape
        s = self.stride
        # Each input frame spreads over 2 * s outputs: a matrix product (or, depthwise, a
        # broadcast product), then the halves of neighbouring frames overlap-add.
        if self.groups == 1:
            w = self.weight.transpose(self.MATMUL_AXES).reshape(in_ch, k * out_ch)
            taps = (x @ w).reshape(B, T, k, out_ch)
        else:
            taps = x[:, :, None, :] * self.weight[:, :, 0].T
        zero = mx.zeros((B, 1, s, out_ch), taps.dtype)
        first = mx.concatenate([taps[:, :, :s], zero], axis=1)
        second = mx.concatenate([zero, taps[:, :, s:]], axis=1)
        y = (first + second).reshape(B, (T + 1) * s, out_ch)
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
