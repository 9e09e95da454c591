"""4/8-bit affine quantization of the LM: one description of the settings, one policy for the
layers it cannot quantize, and reading a quantized checkpoint's settings back from its shapes.

Quantized are the LM's linear projections and embedding tables (as in Kyutai's q4 / q8 files);
norms, Mimi and its convolutions stay in float.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from .errors import MoshiError
from .weights import leaf_modules

BITS = (4, 8)  # Kyutai: quality collapses below 4 bits
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = {4: 32, 8: 64}  # Kyutai's q4 / q8 files
READABLE_BITS = (2, 3, 4, 5, 6, 8)  # what MLX can store, for files made elsewhere


@dataclass(frozen=True)
class Quantization:
    """``bits`` per weight (4 or 8) with one scale and bias per ``group_size`` inputs (32, 64
    or 128; None: Kyutai's 32 for 4-bit, 64 for 8-bit)."""

    bits: int = 4
    group_size: int | None = None

    def __post_init__(self):
        if type(self.bits) is not int or self.bits not in BITS:
            raise MoshiError(f"quantization `bits` must be 4 or 8, got {self.bits!r}")
        if self.group_size is None:
            object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE[self.bits])
        elif type(self.group_size) is not int or self.group_size not in GROUP_SIZES:
            raise MoshiError(
                f"quantization `group_size` must be 32, 64 or 128, got {self.group_size!r}"
            )

    def as_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size}

    def __str__(self) -> str:
        return f"{self.bits}-bit, group size {self.group_size}"


@dataclass
class QuantizeReport:
    """How a model is quantized: the settings, how many layers are, and those kept in float
    because the group size does not divide their input width (path -> width)."""

    settings: Quantization
    quantized: int
    kept: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        text = f"{self.settings}: {self.quantized} layers"
        if self.kept:
            # numbered paths folded (``layers.{i}``) so that the line stays short
            folded = {re.sub(r"\.\d+(?=\.|$)", ".{i}", p): w for p, w in self.kept.items()}
            names = ", ".join(f"{p} (width {w})" for p, w in sorted(folded.items()))
            text += f"; {len(self.kept)} kept in float (width not divisible): {names}"
        return text


def quantizable(module: nn.Module) -> bool:
    """The layers we quantize: linear projections and embedding tables. Our ``ZeroEmbedding``
    and ``MultiLinear`` keep their behaviour through their own ``to_quantized``."""
    from .layers import MultiLinear

    return isinstance(module, (nn.Linear, nn.Embedding, MultiLinear)) and hasattr(
        module, "to_quantized"
    )


def quantize_lm(model: nn.Module, settings: Quantization) -> QuantizeReport:
    """Quantize the LM in place (lazily: nothing is computed until evaluated).

    Layers whose input width the group size does not divide stay in float (only tiny test
    models have such widths; every width of the real 7B is a multiple of 128) and are listed
    in the report. A model in which no layer can be quantized, or that is quantized already,
    is an error.
    """
    if quantization_of(model) is not None:
        raise MoshiError("the model is already quantized; quantize a float model instead")
    leaves = [(path, m) for path, m in leaf_modules(model) if quantizable(m)]
    kept = {p: m.weight.shape[-1] for p, m in leaves if m.weight.shape[-1] % settings.group_size}
    if len(kept) == len(leaves):
        widths = ", ".join(map(str, sorted(set(kept.values()))))
        raise MoshiError(
            f"`group_size` {settings.group_size} divides the input width of none of the "
            f"{len(leaves)} quantizable layers (widths {widths}): nothing would be quantized; "
            "pick a group size that divides them"
        )
    nn.quantize(
        model,
        settings.group_size,
        settings.bits,
        class_predicate=lambda path, m: quantizable(m) and path not in kept,
    )
    return quantize_report(model)


def quantize_report(model: nn.Module) -> QuantizeReport | None:
    """What ``quantize_lm`` (or the file a model was loaded from) made of ``model``; None for
    a float model."""
    settings = quantization_of(model)
    if settings is None:
        return None
    leaves = leaf_modules(model)
    quantized = sum("scales" in m for _, m in leaves)
    kept = {p: m.weight.shape[-1] for p, m in leaves if quantizable(m)}
    return QuantizeReport(settings, quantized, kept)


def quantization_of(model: nn.Module) -> Quantization | None:
    """The settings of the model's quantized layers (the most common, should they differ),
    None if it is all float."""
    found = Counter((m.bits, m.group_size) for _, m in leaf_modules(model) if "scales" in m)
    if not found:
        return None
    bits, group_size = found.most_common(1)[0][0]
    return _stored(bits, group_size)


def _stored(bits: int, group_size: int) -> Quantization:
    # Settings read from a file may lie outside what we produce (e.g. 6-bit from mlx-lm).
    q = object.__new__(Quantization)
    object.__setattr__(q, "bits", bits)
    object.__setattr__(q, "group_size", group_size)
    return q


def stored_quantization(module: nn.Module, weights: dict, prefix: str) -> tuple[int, int] | None:
    """``(bits, group_size)`` of layer ``prefix`` if ``weights`` stores it quantized, read
    from the shapes of its packed weight and scales; None if it is stored in float."""
    scales = weights.get(f"{prefix}.scales")
    packed = weights.get(f"{prefix}.weight")
    if scales is None or packed is None or not quantizable(module):
        return None
    in_dims = module.weight.shape[-1]
    bits = packed.shape[-1] * 32 // in_dims
    if (
        bits not in READABLE_BITS
        or packed.shape[-1] * 32 != bits * in_dims
        or scales.shape[-1] == 0
        or in_dims % scales.shape[-1]
    ):
        raise MoshiError(f"{prefix}: quantized tensor shapes do not fit the model config")
    return bits, in_dims // scales.shape[-1]


def quantize_like(model: nn.Module, weights: dict[str, mx.array]) -> Quantization | None:
    """Quantize exactly the layers that ``weights`` stores quantized, with the bits and group
    size read from the shapes. Returns the (most common) settings, None if all is float."""

    found: dict[str, tuple[int, int]] = {}

    def predicate(path, module):
        settings = found[path] = stored_quantization(module, weights, path)
        return {"bits": settings[0], "group_size": settings[1]} if settings else False

    nn.quantize(model, class_predicate=predicate)
    # Our converter and Kyutai's quantize every layer alike: one layer at other bits is a
    # damaged file (e.g. a weight cut to 3-bit width in a 4-bit file), not a choice.
    counts = Counter(s for s in found.values() if s)
    if len(counts) > 1:
        (bits, group), n = counts.most_common(1)[0]
        path, odd = next((p, s) for p, s in found.items() if s and s != (bits, group))
        raise MoshiError(
            f"{path} is stored at {odd[0]} bits, group size {odd[1]}, but {n} other layers at "
            f"{bits} bits, group size {group}: the file is damaged or mixes quantizations; "
            "get a good copy, or convert the float model again"
        )
    return quantization_of(model)


def logit_error(model, reference, codes: mx.array) -> dict:
    """Teacher-forced logits of ``model`` against ``reference`` (two ``Lm``) on ``codes``
    ``[1, n_q + 1, T]``: max and mean absolute error, top-1 agreements and the reference's
    logit RMS, for text and audio, over valid positions. The measure behind the README's
    quantization table."""
    t_ref, a_ref, t_mask, a_mask = reference(codes)
    t, a, _, _ = model(codes)
    out = {}
    for name, x, ref, mask in (("text", t, t_ref, t_mask), ("audio", a, a_ref, a_mask)):
        err = mx.where(mask[..., None], mx.abs(x - ref), 0.0)
        n = mask.sum().item()
        out[name] = {
            "max": err.max().item(),
            "mean": err.sum().item() / (n * x.shape[-1]),
            "top1": ((x.argmax(-1) == ref.argmax(-1)) & mask).sum().item(),
            "positions": n,
            "std": mx.sqrt(
                mx.where(mask[..., None], ref * ref, 0.0).sum() / (n * x.shape[-1])
            ).item(),
        }
    return out
