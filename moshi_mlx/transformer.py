"""Mimi's encoder/decoder transformer: pre-norm LayerNorm, exact GELU, LayerScale, RoPE,
causal attention over a window of ``context`` steps, with a streaming KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .attention import SelfAttention, attention_mask
from .conv import Linear
from .mlx_lm_parts import ConcatenateKVCache, create_causal_mask
from .pieces import boundary


@dataclass
class TransformerConfig:
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    context: int = 250
    max_period: float = 10000.0
    layer_scale: float | None = 0.01


class RingKVCache(ConcatenateKVCache):
    """The last ``capacity`` keys/values, in time order; ``position`` counts every step seen.

    Upstream Mimi's streaming cache is a ring of exactly ``context`` slots: when a chunk of two
    steps arrives, both keys are written before either query reads, so the first query of the
    chunk sees ``context - 1`` keys. Keeping exactly ``capacity`` entries reproduces that.
    (mlx-lm's ``RotatingKVCache`` keeps ``capacity + S - 1`` for multi-token updates instead.)
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.position = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.position += keys.shape[2]
        keys, values = super().update_and_fetch(keys, values)
        self.keys, self.values = keys[:, :, -self.capacity :], values[:, :, -self.capacity :]
        self.offset = self.keys.shape[2]
        return self.keys, self.values

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False):
        """Mask of the ``N`` new queries over the keys held after their update (mlx-lm's
        cache API): all of them for one query, causal within a chunk."""
        if N == 1:
            return None
        held = min(self.offset + N, self.capacity)
        return create_causal_mask(N, held - N, window_size=window_size)


class MimiTransformerLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.self_attn = SelfAttention(cfg.d_model, cfg.num_heads, cfg.max_period, Linear)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.linear1 = Linear(cfg.d_model, cfg.dim_feedforward, bias=False)
        self.linear2 = Linear(cfg.dim_feedforward, cfg.d_model, bias=False)
        self.layer_scale_1 = mx.ones((cfg.d_model,))
        self.layer_scale_2 = mx.ones((cfg.d_model,))

    def __call__(self, x: mx.array, mask: mx.array, offset: int, cache=None) -> mx.array:
        x = x + self.layer_scale_1 * self.self_attn(self.norm1(x), mask, cache, offset)
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
        mask = attention_mask(x, window=self.context)
        for layer in self.layers:
            x = layer(x, mask, 0)
        return x

    def step(self, x: mx.array) -> mx.array:
        if self._caches is None:
            self._caches = [RingKVCache(self.context) for _ in self.layers]
        start = self._caches[0].position
        mask = attention_mask(x, self._caches[0], window=self.context)
        for layer, cache in zip(self.layers, self._caches, strict=True):
            x = boundary(layer(x, mask, start, cache))
        return x

    def reset(self) -> None:
        self._caches = None
