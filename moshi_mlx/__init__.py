"""moshi-mlx: Kyutai's Moshi (Mimi codec + Helium LM + depth transformer) in pure MLX.

The names below load their modules (and MLX) on first use, so that importing the package, or
asking the command line for ``--help``, costs nothing.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_LAZY = {
    "Lm": "lm",
    "LmConfig": "lm",
    "LmGen": "generate",
    "Mimi": "mimi",
    "MimiConfig": "mimi",
    "MoshiError": "errors",
    "Quantization": "quantize",
    "Sampling": "sampling",
    "DuplexSession": "session",
    "load": "loading",
    "load_lm": "loading",
    "load_mimi": "loading",
    "random_lm": "random_weights",
    "random_mimi": "random_weights",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'moshi_mlx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
