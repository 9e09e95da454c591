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
from .lm import Lm, LmConfig
from .mimi import Mimi, MimiConfig
from .quantize import Quantization, quantize_lm

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


def lm_weight_bytes(
    cfg: LmConfig, dtype: mx.Dtype = mx.bfloat16, quantization: Quantization | None = None
) -> int:
    """Bytes of the LM's weights in ``dtype``, quantized as ``quantize_lm`` does (scales and
    biases in ``dtype``; layers the group size does not divide stay in float). Worked out from
    the shapes of a lazily built model: nothing is allocated (building it draws from MLX's
    global random state, as building any model does)."""
    lm = Lm(cfg)
    lm.set_dtype(dtype)
    if quantization is not None:
        quantize_lm(lm, quantization)
    return param_bytes(lm)


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
    return param_bytes(Mimi(cfg)) + 2 * 2 * t.num_layers * batch * t.context * t.d_model * 4


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
    if limit is None:
        limit, who = usable_memory()
    else:
        who = "the limit allows"
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
