"""Models of a given config with random weights: the same compute as the real ones (for
benchmarks and memory figures), with nothing to download."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from .lm import Lm, LmConfig
from .loading import materialize
from .mimi import Mimi, MimiConfig
from .quantize import Quantization, quantize_lm
from .quantizer import Codebook


def random_lm(
    cfg: LmConfig,
    dtype: mx.Dtype = mx.bfloat16,
    quantize: Quantization | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Lm:
    """A random ``Lm`` of ``cfg`` in ``dtype``, then quantized as ``load(quantize=...)`` does.
    Built one layer at a time: a 4-bit 7B never holds its bf16 copy."""
    mx.random.seed(seed)
    lm = Lm(cfg)
    lm.set_dtype(dtype)
    if quantize is not None:
        quantize_lm(lm, quantize)
    materialize(lm, progress)
    return lm


def random_mimi(
    cfg: MimiConfig | None = None, seed: int = 0, device: mx.Device | None = None
) -> Mimi:
    """A random Mimi of ``cfg`` (the released codec by default) with usable codebooks (a fresh
    one has all-zero centroids), its kernels chosen for ``device``."""
    mimi = Mimi(cfg)
    key = mx.random.key(seed)
    for _, m in mimi.named_modules():
        if isinstance(m, Codebook):
            key, sub = mx.random.split(key)
            m.embedding_sum = mx.random.normal(m.embedding_sum.shape, key=sub)
            m.cluster_usage = mx.ones_like(m.cluster_usage)
    mx.eval(mimi.parameters())
    mimi.place(device)
    return mimi
