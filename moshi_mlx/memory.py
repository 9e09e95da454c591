"""Memory: what Moshi needs, worked out from its configs before anything is built; what the
device can use; the full-context state for measuring the real peak; this process's peaks.

A conversation's memory is the LM's weights, its temporal KV cache (a rolling window of
``context`` steps, 3000 for Moshi 7B: it only grows until the window is full, minutes into a
talk) and Mimi (float32 weights and its own small caches). ``footprint`` adds them up from the
configs without allocating, ``check_fits`` compares them with what the device can use
(``usable_memory``) and refuses, in one line naming a quantization that would fit, a model
that would otherwise swap or be killed mid-conversation.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import MoshiError
from .lm import LmConfig
from .mimi import MimiConfig
from .quantize import Quantization

GB = 1e9
LIMIT_ENV = "MOSHI_MLX_MEMORY_LIMIT_GB"  # overrides what the device reports (tests, shared boxes)
# Peak over the sum of the parts, for what a frame allocates on top (logits, attention over the
# window, Mimi's activations): the 7B's measured peaks with the window full came within 0.2 %
# of the sum (README, Benchmark); 5 % leaves room for what is not counted (allocator slack).
HEADROOM = 1.05


def max_rss_bytes() -> int:
    """Peak resident memory of this process so far (``ru_maxrss``: bytes on macOS, KiB on
    Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def param_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters (lazy ones included: their shapes are known)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def lm_tensors(cfg: LmConfig) -> list[tuple[int, int, int, bool]]:
    """Every weight of ``Lm(cfg)`` as ``(count, rows, cols, quantizable)`` (a vector has one
    row; ``quantizable``: what ``quantize_lm`` may quantize). The shapes the model builds,
    written out so that any config is sized at once, however absurd (the tests hold the two
    equal)."""
    d, dd, v, card = cfg.dim, cfg.depformer_dim, cfg.text_card, cfg.card
    h, dh = cfg.hidden_dim, cfg.depformer_hidden_dim
    layers = cfg.num_layers
    temporal = [
        (1, v + 1, d, True),  # text_emb
        (cfg.n_q, card + 1, d, True),  # emb
        (2 * layers + 1, 1, d, False),  # the temporal layers' norms, out_norm
        (layers, 3 * d, d, True),  # in_proj
        (layers, d, d, True),  # out_proj
        (layers, 2 * h, d, True),  # gating.linear_in
        (layers, d, h, True),  # gating.linear_out
        (1, v, d, True),  # text_linear
        (cfg.extra_heads_num_heads, cfg.extra_heads_dim, d, True),  # extra_heads
    ]
    if cfg.dep_q == 0:  # speech-to-text: no depth transformer
        return temporal
    dep_layers, sets = cfg.depformer_num_layers, max(cfg.schedule) + 1
    rank = cfg.depformer_low_rank_embeddings
    if rank:  # a table of ``rank`` columns (not a leaf: kept in float) and a projection
        dep_embeddings = [(1, v + 1, rank, False), (cfg.dep_q - 1, card + 1, rank, False),
                          (cfg.dep_q, dd, rank, True)]  # fmt: skip
    else:
        dep_embeddings = [(1, v + 1, dd, True), (cfg.dep_q - 1, card + 1, dd, True)]
    return temporal + [
        (cfg.dep_q if cfg.depformer_multi_linear else 1, dd, d, True),  # depformer_in
        *dep_embeddings,
        (2 * dep_layers, 1, dd, False),  # the depformer's norms
        (dep_layers, sets * 3 * dd, dd, True),  # in_proj, one block of rows per weight set
        (dep_layers, sets * dd, dd, True),  # out_proj
        (dep_layers * sets, 2 * dh, dd, True),  # gating.linear_in
        (dep_layers * sets, dd, dh, True),  # gating.linear_out
        (cfg.dep_q, card, dd, True),  # linears
    ]


def lm_parameters(cfg: LmConfig) -> int:
    """Parameters of ``Lm(cfg)`` (7.69 billion for Moshi 7B)."""
    return sum(count * rows * cols for count, rows, cols, _ in lm_tensors(cfg))


def lm_weight_bytes(
    cfg: LmConfig, dtype: mx.Dtype = mx.bfloat16, quantization: Quantization | None = None
) -> int:
    """Bytes of the LM's weights in ``dtype``, quantized as ``quantize_lm`` does: ``bits`` per
    weight plus a scale and a bias in ``dtype`` per group; layers whose input width the group
    size does not divide stay in float."""
    total = 0
    for count, rows, cols, quantizable in lm_tensors(cfg):
        if quantization is None or not quantizable or cols % quantization.group_size:
            size = rows * cols * dtype.size
        else:
            groups = rows * cols // quantization.group_size
            size = rows * cols * quantization.bits // 8 + 2 * groups * dtype.size
        total += count * size
    return total


def mimi_parameters(cfg: MimiConfig) -> int:
    """Parameters of ``Mimi(cfg)``, worked out from the config (the tests hold it equal to the
    built codec)."""
    s, t = cfg.seanet, cfg.transformer

    def conv(cin: int, cout: int, kernel: int, bias: bool = True) -> int:
        return cout * kernel * cin + (cout if bias else 0)

    def residuals(dim: int) -> int:
        hidden = dim // s.compress
        per = conv(dim, hidden, s.residual_kernel_size) + conv(hidden, dim, 1)
        return s.n_residual_layers * per

    n, dim = conv(s.channels, s.n_filters, s.kernel_size), s.n_filters  # SEANet encoder
    for ratio in reversed(s.ratios):
        n += residuals(dim) + conv(dim, 2 * dim, 2 * ratio)
        dim *= 2
    n += conv(dim, s.dimension, s.last_kernel_size) + conv(s.dimension, dim, s.kernel_size)
    for ratio in s.ratios:  # SEANet decoder
        n += conv(dim, dim // 2, 2 * ratio) + residuals(dim // 2)
        dim //= 2
    n += conv(dim, s.channels, s.last_kernel_size)
    d, ff = t.d_model, t.dim_feedforward
    n += 2 * t.num_layers * (4 * d + 4 * d * d + 2 * d * ff + 2 * d)  # both transformers
    kernel = 2 * cfg.downsample_stride  # downsample, and the depthwise upsample
    n += conv(s.dimension, s.dimension, kernel, bias=False) + s.dimension * kernel
    n += 2 * 2 * s.dimension * cfg.codebook_dim  # the two RVQs' projections
    return n + cfg.n_q * (cfg.bins * cfg.codebook_dim + cfg.bins + 1)  # codebooks


def kv_cache_bytes(cfg: LmConfig, dtype: mx.Dtype = mx.bfloat16, batch: int = 1) -> int:
    """Bytes of the temporal transformer's KV cache with its window full: keys and values of
    ``context`` steps in every layer, in the activations' ``dtype`` (the float dtype of the
    weights, also for quantized ones)."""
    return 2 * cfg.num_layers * batch * cfg.context * cfg.dim * dtype.size


def mimi_bytes(cfg: MimiConfig | None = None, batch: int = 1) -> int:
    """Bytes of Mimi: its float32 weights and its encoder's and decoder's transformer caches
    with their windows full."""
    cfg = cfg or MimiConfig()
    t = cfg.transformer
    return 4 * mimi_parameters(cfg) + 2 * 2 * t.num_layers * batch * t.context * t.d_model * 4


@dataclass(frozen=True)
class Footprint:
    """Bytes a conversation needs once the LM's window is full."""

    weights: int
    kv_cache: int
    mimi: int

    @property
    def total(self) -> int:
        return int(HEADROOM * (self.weights + self.kv_cache + self.mimi))

    def __str__(self) -> str:
        parts = [f"weights {self.weights / GB:.1f} GB", f"KV cache {self.kv_cache / GB:.1f} GB"]
        if self.mimi:
            parts.append(f"Mimi {self.mimi / GB:.1f} GB")
        return f"{self.total / GB:.1f} GB ({', '.join(parts)}, with the window full)"


def footprint(
    cfg: LmConfig,
    dtype: mx.Dtype = mx.bfloat16,
    quantization: Quantization | None = None,
    mimi: MimiConfig | None | bool = None,
    weights: int | None = None,
) -> Footprint:
    """What Moshi of ``cfg`` needs: LM weights in ``dtype`` with ``quantization`` (or the
    given ``weights`` bytes, e.g. ``param_bytes`` of a lazily loaded model), the full KV
    cache, and Mimi of config ``mimi`` (None: the released codec; False: no Mimi)."""
    if weights is None:
        weights = lm_weight_bytes(cfg, dtype, quantization)
    codec = 0 if mimi is False else mimi_bytes(mimi or None)
    return Footprint(weights, kv_cache_bytes(cfg, dtype), codec)


def usable_memory(device: mx.Device | None = None) -> tuple[int, str]:
    """Bytes the ``device`` (default: MLX's default) can use for Moshi, and who says so:
    ``MOSHI_MLX_MEMORY_LIMIT_GB`` when set; on Apple GPUs Metal's recommended working set;
    on other GPUs their memory; on the CPU the machine's memory."""
    if os.environ.get(LIMIT_ENV):
        try:
            return int(float(os.environ[LIMIT_ENV]) * GB), f"{LIMIT_ENV} allows"
        except ValueError:
            raise MoshiError(f"{LIMIT_ENV} must be a number of GB") from None
    device = device or mx.default_device()
    info = mx.device_info(device)
    if device.type == mx.gpu:
        if "max_recommended_working_set_size" in info:
            return int(info["max_recommended_working_set_size"]), "this Mac's GPU can use"
        return int(info.get("total_memory") or info["memory_size"]), "this GPU has"
    if "memory_size" in info:
        return int(info["memory_size"]), "this machine has"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has"


def check_fits(
    cfg: LmConfig,
    dtype: mx.Dtype = mx.bfloat16,
    quantization: Quantization | None = None,
    mimi: MimiConfig | None | bool = None,
    weights: int | None = None,
    stored: Quantization | None = None,
    limit: int | None = None,
) -> Footprint:
    """Raise a one-line ``MoshiError`` if Moshi (as for ``footprint``) does not fit in
    ``limit`` bytes (default: ``usable_memory()``), naming the quantization that would fit;
    return the footprint otherwise. ``stored``: the quantization the weights already have
    (a quantized checkpoint cannot be quantized again, so then only a smaller model helps)."""
    need = footprint(cfg, dtype, quantization, mimi, weights)
    limit, who = _limit(limit)
    if need.total <= limit:
        return need
    current = quantization or stored
    fits = None
    for bits in (8, 4):
        if current is not None and bits >= current.bits:
            continue
        option = footprint(cfg, dtype, Quantization(bits), mimi)
        if option.total <= limit:
            fits = (bits, option.total)
            break
    message = f"Moshi needs {need} but {who} {limit / GB:.1f} GB"
    if fits is None:
        message += "; no quantization makes it fit (is another program holding memory?)"
    elif stored is not None:
        message += f"; a {fits[0]}-bit model would ({fits[1] / GB:.1f} GB)"
    else:
        message += f"; use `quantize` {fits[0]} ({fits[1] / GB:.1f} GB)"
    raise MoshiError(message)


def check_config_fits(
    cfg: LmConfig | None, mimi: MimiConfig | None, source: str, limit: int | None = None
) -> None:
    """Refuse at once, before anything is built or read, configs whose model cannot fit the
    device in any form (``cfg``'s LM at 4 bits with its full KV cache, and ``mimi``): a
    hand-edited or hostile config (a 51200-wide model, a codec of a million-entry codebooks)
    must not cost minutes and gigabytes before its error. ``check_fits`` then checks the
    model in the form it is loaded. ``source`` names the config in the message."""
    need = 0 if mimi is None else mimi_bytes(mimi)
    if cfg is not None:
        need += lm_parameters(cfg) // 2 + kv_cache_bytes(cfg, mx.float16)
    limit, who = _limit(limit)
    if need > limit:
        raise MoshiError(
            f"{source} describes a model that needs at least {need / GB:.3g} GB even at 4 "
            f"bits, but {who} {limit / GB:.3g} GB: is it the right config?"
        )


def _limit(limit: int | None) -> tuple[int, str]:
    return usable_memory() if limit is None else (limit, "the limit allows")


def fill_context(gen) -> None:
    """Make ``gen``'s temporal KV cache (an ``LmGen`` that has run at least one step) hold a
    full window, as after ``context`` frames, without running them: the next steps attend
    over the whole window and use the memory of a long conversation. Values are zeros."""
    for cache in gen.cache:
        if cache.keys is None:
            raise MoshiError("fill_context needs an LmGen that has run a step")
        B, H, _, D = cache.keys.shape
        full = (B, H, cache.max_size, D)
        keys, values = mx.zeros(full, cache.keys.dtype), mx.zeros(full, cache.values.dtype)
        cache.state = (keys, values, cache.max_size, cache.keep, cache.max_size, cache.max_size)
    mx.eval([c.state[:2] for c in gen.cache])
