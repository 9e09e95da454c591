"""Mimi's encoder/decoder transformer: pre-norm LayerNorm, exact GELU, LayerScale, RoPE,
causal attention over a window of ``context`` steps, with a streaming KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ConcatenateKVCache

from .conv import Linear


@dataclass
class TransformerConfig:
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    context: int = 250
    max_period: float = 10000.0
    layer_scale: float | None = 0.01


def window_mask(q_pos: mx.array, k_pos: mx.array, context: int) -> mx.array:
    """Boolean ``[Tq, Tk]``: key ``j`` is visible to query ``p`` iff ``0 <= p - j < context``."""
    delta = q_pos[:, None] - k_pos[None, :]
    return (delta >= 0) & (delta < context)


class RingKVCache(ConcatenateKVCache):
    """The last ``capacity`` keys/values, in time order.

    Upstream Mimi's streaming cache is a ring of exactly ``context`` slots: when a chunk of two
    steps arrives, both keys are written before either query reads, so the first query of the
    chunk sees ``context - 1`` keys. Keeping exactly ``capacity`` entries reproduces that.
    (mlx-lm's ``RotatingKVCache`` keeps ``capacity + S - 1`` for multi-token updates instead.)
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        keys, values = super().update_and_fetch(keys, values)
        self.keys, self.values = keys[:, :, -self.capacity :], values[:, :, -self.capacity :]
        self.offset = self.keys.shape[2]
        return self.keys, self.values


class MimiAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.d_model // cfg.num_heads
        self.max_period = cfg.max_period
        self.in_proj = Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out_proj = Linear(cfg.d_model, cfg.d_model, bias=False)

    def __call__(self, x: mx.array, mask: mx.array, offset: int, cache=None) -> mx.array:
        B, T, _ = x.shape
        qkv = self.in_proj(x).reshape(B, T, 3, self.num_heads, self.head_dim)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        q = mx.fast.rope(
            q, self.head_dim, traditional=True, base=self.max_period, scale=1.0, offset=offset
        )
        k = mx.fast.rope(
            k, self.head_dim, traditional=True, base=self.max_period, scale=1.0, offset=offset
        )
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1))


class MimiTransformerLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.self_attn = MimiAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.linear1 = Linear(cfg.d_model, cfg.dim_feedforward, bias=False)
        self.linear2 = Linear(cfg.dim_feedforward, cfg.d_model, bias=False)
        self.layer_scale_1 = mx.ones((cfg.d_model,))
        self.layer_scale_2 = mx.ones((cfg.d_model,))

    def __call__(self, x: mx.array, mask: mx.array, offset: int, cache=None) -> mx.array:
        x = x + self.layer_scale_1 * self.self_attn(self.norm1(x), mask, offset, cache)
        # Exact erf GELU, as PyTorch's default (upstream MLX uses the tanh approximation).
        return x + self.layer_scale_2 * self.linear2(nn.gelu(self.linear1(self.norm2(x))))


class MimiTransformer(nn.Module):
    """``[B, T, d_model]`` -> same shape; ``step`` continues from the previous chunk."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.context = cfg.context
        self.layers = [MimiTransformerLayer(cfg) for _ in range(cfg.num_layers)]
        self._caches: list[RingKVCache] | None = None

    def __call__(self, x: mx.array) -> mx.array:
        pos = mx.arange(x.shape[1])
        mask = window_mask(pos, pos, self.context)
        for layer in self.layers:
            x = layer(x, mask, 0)
        return x

    def step(self, x: mx.array) -> mx.array:
        if self._caches is None:
            self._caches = [RingKVCache(self.context) for _ in self.layers]
            self._position = 0
        start, T = self._position, x.shape[1]
        n_keys = min(start + T, self.context)
        # Cached keys are the last n_keys positions in time order; only causality can mask them.
        mask = window_mask(
            mx.arange(start, start + T), mx.arange(start + T - n_keys, start + T), self.context
        )
        for layer, cache in zip(self.layers, self._caches, strict=True):
            x = layer(x, mask, start, cache)
        self._position += T
        return x

    def reset(self) -> None:
        self._caches = None
