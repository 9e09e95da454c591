"""The few pieces of mlx-lm that moshi-mlx uses, imported without mlx-lm's package ``__init__``.

``import mlx_lm.models.cache`` first runs ``mlx_lm/__init__.py``, which imports mlx-lm's
generation and conversion code and with it ``transformers``: 3 to 5 s before a command can
answer, for helpers that need nothing but MLX. This module loads the same files of the
installed mlx-lm (``models/base.py``, ``models/cache.py``, ``sample_utils.py``) as its own
submodules, so their relative imports stay inside it and ``mlx_lm`` itself is never imported:
a program that imports mlx-lm as well gets the whole package as usual (with its own copy of
these classes). See docs/startup.md.
"""

from __future__ import annotations

import importlib
import importlib.util

_spec = importlib.util.find_spec("mlx_lm")  # finds the package without running it
if _spec is None or not _spec.submodule_search_locations:
    raise ImportError("moshi-mlx needs mlx-lm: pip install mlx-lm")
# A module with __path__ is a package: moshi_mlx.mlx_lm_parts.models.cache is mlx_lm's file.
__path__ = list(_spec.submodule_search_locations)

_base = importlib.import_module(f"{__name__}.models.base")
_cache = importlib.import_module(f"{__name__}.models.cache")
_sample_utils = importlib.import_module(f"{__name__}.sample_utils")

create_attention_mask = _base.create_attention_mask
create_causal_mask = _base.create_causal_mask
scaled_dot_product_attention = _base.scaled_dot_product_attention
ConcatenateKVCache = _cache.ConcatenateKVCache
RotatingKVCache = _cache.RotatingKVCache
apply_top_k = _sample_utils.apply_top_k
apply_top_p = _sample_utils.apply_top_p

__all__ = [
    "ConcatenateKVCache",
    "RotatingKVCache",
    "apply_top_k",
    "apply_top_p",
    "create_attention_mask",
    "create_causal_mask",
    "scaled_dot_product_attention",
]
