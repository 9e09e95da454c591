"""Multi-head self-attention shared by Mimi's transformer, the temporal transformer and the depth
transformer: ``SelfAttention`` for the first two, the depth transformer's per-step projections
call ``self_attention`` directly; every attention mask comes from ``attention_mask`` (mlx-lm's
builder, which asks the KV cache when there is one)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .mlx_lm_parts import create_attention_mask, scaled_dot_product_attention


def attention_mask(x: mx.array, cache=None, window: int | None = None):
    """Mask for the ``T = x.shape[1]`` new positions of ``x`` ``[B, T, D]``: causal, and keys
    at most ``window - 1`` steps back when ``window`` is given. With a cache, for the keys it
    holds after this update (prefill and single steps alike)."""
    return create_attention_mask(x, cache, window_size=window)


def self_attention(
    qkv: mx.array,
    num_heads: int,
    mask,
    cache=None,
    rope_base: float | None = None,
    offset: int = 0,
) -> mx.array:
    """``qkv`` ``[B, T, 3 * D]`` (rows Q, K, V; heads contiguous in each) -> ``[B, T, D]``.

    ``rope_base``: interleaved rotary embedding with that max period at absolute positions
    ``offset ..``, applied before the cache stores the keys; None for no positional encoding.
    """
    B, T, _ = qkv.shape
    head_dim = qkv.shape[-1] // (3 * num_heads)
    q, k, v = qkv.reshape(B, T, 3, num_heads, head_dim).transpose(2, 0, 3, 1, 4)
    if rope_base is not None:
        q = mx.fast.rope(q, head_dim, traditional=True, base=rope_base, scale=1.0, offset=offset)
        k = mx.fast.rope(k, head_dim, traditional=True, base=rope_base, scale=1.0, offset=offset)
    if cache is not None:
        k, v = cache.update_and_fetch(k, v)
    out = scaled_dot_product_attention(q, k, v, cache=cache, scale=head_dim**-0.5, mask=mask)
    return out.transpose(0, 2, 1, 3).reshape(B, T, -1)


class SelfAttention(nn.Module):
    """Fused ``in_proj`` (Q, K, V rows) -> ``self_attention`` with RoPE -> ``out_proj``, both
    without bias; ``linear`` builds the projections (Mimi's choose their kernel per device).
    The positions of ``x`` start at ``offset`` (default: the cache's step count)."""

    def __init__(self, dim: int, num_heads: int, rope_base: float, linear=nn.Linear):
        super().__init__()
        self.num_heads = num_heads
        self.rope_base = rope_base
        self.in_proj = linear(dim, 3 * dim, bias=False)
        self.out_proj = linear(dim, dim, bias=False)

    def __call__(self, x: mx.array, mask, cache=None, offset: int | None = None) -> mx.array:
        if offset is None:
            offset = cache.offset if cache is not None else 0
        qkv = self.in_proj(x)
        out = self_attention(qkv, self.num_heads, mask, cache, self.rope_base, offset)
        return self.out_proj(out)
