"""Checks of config values read from files, each a one-line ``MoshiError`` naming the field."""

from __future__ import annotations

import math
import os
from pathlib import Path

import mlx.core as mx

from .errors import MoshiError

# Bounds far beyond any real model, so that an edited or hostile config fails at once instead
# of asking for more memory than a machine has (sizes are also checked against memory).
MAX_SIZE = 1 << 20  # widths, vocabularies
# Layers, heads, codebooks, SEANet stages (Moshi: at most 32): each builds objects of its own,
# ~50 kB a layer, so their counts are bounded here and the widths by memory (``memory``).
MAX_COUNT = 1024
MAX_DELAY = 256  # steps a stream may lag (Moshi: 1, the 2B: 2)


def integer(what: str, field: str, value, low: int = 1, high: int = MAX_SIZE) -> int:
    if type(value) is not int or not low <= value <= high:
        raise MoshiError(f"{what}: {field} must be an integer in [{low}, {high}], got {value!r}")
    return value


def number(what: str, field: str, value, low: float = 0.0) -> float:
    """A finite number above ``low``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= low:
        raise MoshiError(f"{what}: {field} must be a finite number above {low:g}, got {value!r}")
    return value


def flag(what: str, field: str, value) -> bool:
    if not isinstance(value, bool):
        raise MoshiError(f"{what}: {field} must be true or false, got {value!r}")
    return value


def integers(what: str, field: str, value, low: int, high: int, length: int | None = None):
    if not isinstance(value, list) or (length is not None and len(value) != length):
        expected = f"a list of {length} integers" if length is not None else "a list of integers"
        raise MoshiError(f"{what}: {field} must be {expected}, got {value!r}")
    for v in value:
        integer(what, f"{field} entry", v, low, high)
    return value


def choice(what: str, field: str, value, supported: tuple) -> None:
    """Options we do not implement are refused, never ignored."""
    if value not in supported:
        names = ", ".join(repr(s) for s in supported)
        raise MoshiError(f"{what}: {field}={value!r} is not supported (only {names})")


def dtype_name(dtype) -> str:
    """``mx.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).split(".")[-1]


def kind(x) -> str:
    """What a bad argument is, for error messages: ``"int32 mx.array"``, ``"list"``..."""
    return f"{dtype_name(x.dtype)} mx.array" if isinstance(x, mx.array) else type(x).__name__


# ---- library arguments: one MoshiError naming the argument, never a TypeError from inside ----


def path(name: str, value) -> Path:
    """A file or folder argument: a ``str`` or ``os.PathLike``, not empty."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise MoshiError(f"`{name}` must be a path (str or pathlib.Path), got {value!r}")
    return Path(value)


def paths(name: str, value) -> list[Path]:
    """One path, or a non-empty list of them (a model's shards)."""
    if isinstance(value, (str, os.PathLike)):
        return [path(name, value)]
    if not isinstance(value, (list, tuple)) or not value:
        raise MoshiError(f"`{name}` must be a path or a non-empty list of paths, got {value!r}")
    return [path(f"{name} entry", v) for v in value]


def instance(name: str, value, cls, what: str, optional: bool = False):
    """``value`` if it is a ``cls`` (or None, when ``optional``)."""
    if not (isinstance(value, cls) or (optional and value is None)):
        raise MoshiError(f"`{name}` must be {what}, got {kind(value)}")
    return value


def text(name: str, value) -> str:
    """A ``str`` that can be written as UTF-8: a lone surrogate (an undecodable byte of an
    argument or a file read with ``surrogateescape``) would fail deep in the tokenizer."""
    if not isinstance(value, str):
        raise MoshiError(f"`{name}` must be a str, got {kind(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MoshiError(
            f"`{name}` is not valid text: character {e.start + 1} is a byte that is not UTF-8; "
            "write it in UTF-8"
        ) from None
    return value


def device(name: str, value) -> mx.Device | None:
    """An ``mx.Device``, a device type (``mx.cpu``, ``mx.gpu``) or None."""
    if isinstance(value, mx.DeviceType):
        return mx.Device(value)
    return instance(name, value, mx.Device, "an mx.Device (or mx.cpu, mx.gpu)", optional=True)
