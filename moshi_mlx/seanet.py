"""SEANet convolutional encoder and decoder of Mimi (causal, streamable)."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from .conv import Conv1d, ConvTranspose1d
from .pieces import boundary


@dataclass
class SeanetConfig:
    channels: int = 1
    dimension: int = 512
    n_filters: int = 64
    n_residual_layers: int = 1
    ratios: list[int] = field(default_factory=lambda: [8, 6, 5, 4])
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2

    @property
    def hop_length(self) -> int:
        hop = 1
        for r in self.ratios:
            hop *= r
        return hop


class ResidualBlock(nn.Module):
    """``x + conv2(elu(conv1(elu(x))))`` with a C -> C/compress -> C bottleneck."""

    def __init__(self, dim: int, kernel_size: int, dilation: int, compress: int):
        super().__init__()
        hidden = dim // compress
        self.conv1 = Conv1d(dim, hidden, kernel_size, dilation=dilation)
        self.conv2 = Conv1d(hidden, dim, 1)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.conv2(nn.elu(self.conv1(nn.elu(x))))

    def step(self, x: mx.array) -> mx.array:
        return x + self.conv2.step(nn.elu(self.conv1.step(nn.elu(x))))


def _residuals(cfg: SeanetConfig, dim: int) -> list[ResidualBlock]:
    return [
        ResidualBlock(dim, cfg.residual_kernel_size, cfg.dilation_base**j, cfg.compress)
        for j in range(cfg.n_residual_layers)
    ]


class EncoderBlock(nn.Module):
    def __init__(self, cfg: SeanetConfig, dim: int, ratio: int):
        super().__init__()
        self.residuals = _residuals(cfg, dim)
        self.downsample = Conv1d(dim, 2 * dim, 2 * ratio, stride=ratio)

    def __call__(self, x: mx.array) -> mx.array:
        for r in self.residuals:
            x = r(x)
        return self.downsample(nn.elu(x))

    def step(self, x: mx.array) -> mx.array:
        for r in self.residuals:
            x = r.step(x)
        return self.downsample.step(nn.elu(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: SeanetConfig, dim: int, ratio: int):
        super().__init__()
        self.upsample = ConvTranspose1d(dim, dim // 2, 2 * ratio, stride=ratio)
        self.residuals = _residuals(cfg, dim // 2)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.upsample(nn.elu(x))
        for r in self.residuals:
            x = r(x)
        return x

    def step(self, x: mx.array) -> mx.array:
        x = self.upsample.step(nn.elu(x))
        for r in self.residuals:
            x = r.step(x)
        return x


class _ConvStack(nn.Module):
    """``conv_out(elu(blocks(conv_in(x))))``, in batch or streaming mode."""

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for b in self.blocks:
            x = b(x)
        return self.conv_out(nn.elu(x))

    def step(self, x: mx.array) -> mx.array:
        x = boundary(self.conv_in.step(x))
        for b in self.blocks:
            x = boundary(b.step(x))
        return self.conv_out.step(nn.elu(x))


class SeanetEncoder(_ConvStack):
    """Waveform ``[B, T, channels]`` -> latent ``[B, T / hop_length, dimension]``."""

    def __init__(self, cfg: SeanetConfig):
        super().__init__()
        dim = cfg.n_filters
        self.conv_in = Conv1d(cfg.channels, dim, cfg.kernel_size)
        self.blocks = []
        for ratio in reversed(cfg.ratios):
            self.blocks.append(EncoderBlock(cfg, dim, ratio))
            dim *= 2
        self.conv_out = Conv1d(dim, cfg.dimension, cfg.last_kernel_size)


class SeanetDecoder(_ConvStack):
    """Latent ``[B, T, dimension]`` -> waveform ``[B, T * hop_length, channels]``.

    No final activation (no tanh)."""

    def __init__(self, cfg: SeanetConfig):
        super().__init__()
        dim = cfg.n_filters * 2 ** len(cfg.ratios)
        self.conv_in = Conv1d(cfg.dimension, dim, cfg.kernel_size)
        self.blocks = []
        for ratio in cfg.ratios:
            self.blocks.append(DecoderBlock(cfg, dim, ratio))
            dim //= 2
        self.conv_out = Conv1d(dim, cfg.channels, cfg.last_kernel_size)
