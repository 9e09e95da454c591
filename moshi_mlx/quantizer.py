"""Mimi's split residual vector quantizer (1 semantic level + ``n_q - 1`` acoustic levels)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .conv import Linear


class Codebook(nn.Module):
    """One RVQ level, stored like the checkpoint: running sums and usage counts."""

    def __init__(self, bins: int, dim: int):
        super().__init__()
        self.embedding_sum = mx.zeros((bins, dim))
        self.cluster_usage = mx.ones((bins,))
        self.initialized = mx.ones((1,))
        self._derived: tuple | None = None

    def _centroids_and_half_norms(self) -> tuple[mx.array, mx.array]:
        # Derived once per set of weights (loading replaces the arrays, which resets this).
        sums, usage = self.embedding_sum, self.cluster_usage
        if self._derived is None or self._derived[0] is not sums or self._derived[1] is not usage:
            centroids = sums / mx.maximum(usage, 1e-5)[:, None]
            half_norms = 0.5 * mx.sum(centroids * centroids, axis=-1)
            mx.eval(centroids, half_norms)
            self._derived = (sums, usage, centroids, half_norms)
        return self._derived[2], self._derived[3]

    def centroids(self) -> mx.array:
        """``embedding_sum / max(cluster_usage, 1e-5)``: the code vectors, ``[bins, dim]``."""
        return self._centroids_and_half_norms()[0]

    def nearest(self, x: mx.array) -> mx.array:
        """Index of the closest centroid (Euclidean) for each vector of ``x`` ``[..., dim]``."""
        centroids, half_norms = self._centroids_and_half_norms()
        # |x - c|^2 / 2 = |x|^2 / 2 + (|c|^2 / 2 - x.c); the first term is the same for all c.
        return mx.argmin(half_norms - x @ centroids.T, axis=-1)


class ResidualVectorQuantizer(nn.Module):
    def __init__(self, input_dim: int, codebook_dim: int, n_q: int, bins: int):
        super().__init__()
        self.input_proj = Linear(input_dim, codebook_dim, bias=False)
        self.output_proj = Linear(codebook_dim, input_dim, bias=False)
        self.codebooks = [Codebook(bins, codebook_dim) for _ in range(n_q)]

    def encode(self, x: mx.array, n_q: int) -> mx.array:
        """``[B, T, input_dim]`` -> codes ``[B, T, n_q]`` (uint32)."""
        residual = self.input_proj(x)
        codes = []
        for book in self.codebooks[:n_q]:
            idx = book.nearest(residual)
            residual = residual - book.centroids()[idx]
            codes.append(idx)
        return mx.stack(codes, axis=-1)

    def decode(self, codes: mx.array) -> mx.array:
        """``[B, T, K]`` -> ``[B, T, input_dim]``; levels beyond ``K`` are not used."""
        quantized = 0.0
        for k in range(codes.shape[-1]):
            quantized = quantized + self.codebooks[k].centroids()[codes[..., k]]
        return self.output_proj(quantized)


class SplitResidualVectorQuantizer(nn.Module):
    """Both RVQs quantize the same latent; the acoustic one never sees the semantic residual."""

    def __init__(self, input_dim: int, codebook_dim: int, n_q: int, bins: int):
        super().__init__()
        self.n_q = n_q
        self.bins = bins
        self.rvq_first = ResidualVectorQuantizer(input_dim, codebook_dim, 1, bins)
        self.rvq_rest = ResidualVectorQuantizer(input_dim, codebook_dim, n_q - 1, bins)

    def encode(self, x: mx.array, n_q: int) -> mx.array:
        codes = self.rvq_first.encode(x, 1)
        if n_q > 1:
            codes = mx.concatenate([codes, self.rvq_rest.encode(x, n_q - 1)], axis=-1)
        return codes

    def decode(self, codes: mx.array) -> mx.array:
        """Codes ``[B, T, K]`` -> ``[B, T, input_dim]``. Codes past the codebooks (unchecked
        ones, ``decode_step(check=False)``) are wrapped into them on the device, all levels in
        one op: a gather out of range reads other memory or crashes."""
        codes = mx.remainder(codes, self.bins)
        out = self.rvq_first.decode(codes[..., :1])
        if codes.shape[-1] > 1:
            out = out + self.rvq_rest.decode(codes[..., 1:])
        return out
