"""Building blocks of the LM: zero-token embeddings and per-step (stacked) linear layers,
each with a quantized twin so that ``nn.quantize`` keeps their special behaviour."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def _zero_negative(ids: mx.array, out: mx.array) -> mx.array:
    # Token -1 ("zero token") means "no input here": its embedding is exactly zero.
    return mx.where((ids < 0)[..., None], mx.zeros((), out.dtype), out)


def _in_table(ids: mx.array, rows: int) -> mx.array:
    # An id past the table would make the gather read (or crash on) other memory: ids that
    # skipped the host-side checks (``check=False``) are wrapped into it on the device, with
    # no sync, in one op (as many as the ``maximum(ids, 0)`` it replaces; negative ids are
    # zeroed after the lookup).
    return mx.remainder(ids, rows)


class ZeroEmbedding(nn.Embedding):
    """``nn.Embedding`` where negative ids give an all-zero vector.

    With ``low_rank`` the table has ``low_rank`` columns followed by a projection to ``dims``
    (upstream's ``depformer_low_rank_embeddings``).
    """

    def __init__(self, num_embeddings: int, dims: int, low_rank: int | None = None):
        super().__init__(num_embeddings, low_rank or dims)
        if low_rank:
            self.low_rank = nn.Linear(low_rank, dims, bias=False)

    def __call__(self, ids: mx.array) -> mx.array:
        out = _zero_negative(ids, super().__call__(_in_table(ids, self.weight.shape[0])))
        return self.low_rank(out) if "low_rank" in self else out

    def to_quantized(
        self, group_size: int | None = None, bits: int | None = None, mode: str = "affine", **_
    ) -> nn.Module:
        # Only reached for leaf modules, i.e. without a low-rank projection.
        return QuantizedZeroEmbedding.from_embedding(self, group_size, bits, mode)


class QuantizedZeroEmbedding(nn.QuantizedEmbedding):
    """Quantized ``ZeroEmbedding`` (upstream's quantized files lose the -1 rule; we keep it)."""

    def __call__(self, ids: mx.array) -> mx.array:
        return _zero_negative(ids, super().__call__(_in_table(ids, self.num_embeddings)))


class MultiLinear(nn.Module):
    """``n`` bias-free linear layers stored stacked on the output axis: ``weight`` is
    ``[n * out, in]``, as in the released checkpoints' depformer projections. ``__call__(x, i)``
    applies layer ``i``."""

    def __init__(self, input_dims: int, output_dims: int, n: int):
        super().__init__()
        scale = input_dims**-0.5
        self.weight = mx.random.uniform(-scale, scale, (n * output_dims, input_dims))
        self.output_dims = output_dims

    def _rows(self, a: mx.array, i: int) -> mx.array:
        return a[i * self.output_dims : (i + 1) * self.output_dims]

    def __call__(self, x: mx.array, i: int) -> mx.array:
        return x @ self._rows(self.weight, i).T

    def to_quantized(
        self, group_size: int | None = None, bits: int | None = None, mode: str = "affine", **_
    ) -> nn.Module:
        return QuantizedMultiLinear(self, group_size or 64, bits or 4, mode)


class QuantizedMultiLinear(nn.Module):
    def __init__(self, linear: MultiLinear, group_size: int, bits: int, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.output_dims = linear.output_dims
        self.weight, self.scales, *rest = mx.quantize(linear.weight, group_size, bits, mode=mode)
        if rest:
            self.biases = rest[0]
        self.freeze()

    def __call__(self, x: mx.array, i: int) -> mx.array:
        rows = slice(i * self.output_dims, (i + 1) * self.output_dims)
        return mx.quantized_matmul(
            x,
            self.weight[rows],
            self.scales[rows],
            self.biases[rows] if "biases" in self else None,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )
