"""How Moshi's tokens are drawn: one description shared by the generator, the commands and the
benchmark, and the token samplers built from it (on mlx-lm's top-k / top-p filters)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

from .errors import MoshiError

if TYPE_CHECKING:
    import mlx.core as mx

# (logits [B, V], key) -> tokens [B]. MLX is imported where samplers are built: the commands
# check the sampling flags (``Sampling``) before anything heavy is imported.
TokenSampler = Callable[["mx.array", "mx.array"], "mx.array"]


@dataclass(frozen=True)
class Sampling:
    """Temperatures, top-k and top-p for Moshi's audio and text tokens, and the seed.

    Temperature 0 is greedy (argmax). ``top_k`` / ``top_p`` 0 switch a filter off; top-p keeps
    the smallest set of tokens holding ``top_p`` of ``softmax(logits / temp)`` (upstream MLX),
    top-k the ``top_k`` most likely (upstream PyTorch). The defaults are upstream PyTorch's,
    what ``chat`` uses. ``seed`` None draws fresh randomness; otherwise a generator built from
    it replays exactly.
    """

    temp: float = 0.8
    temp_text: float = 0.7
    top_k: int = 250
    top_k_text: int = 25
    top_p: float = 0.0
    top_p_text: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        for name in ("temp", "temp_text"):
            value = getattr(self, name)
            if not _real(value) or not 0 <= value < math.inf:
                raise MoshiError(f"sampling: `{name}` must be a finite number >= 0, got {value!r}")
        for name in ("top_k", "top_k_text"):
            value = getattr(self, name)
            if not _integer(value) or value < 0:
                raise MoshiError(f"sampling: `{name}` must be an integer >= 0, got {value!r}")
        for name in ("top_p", "top_p_text"):
            value = getattr(self, name)
            if not _real(value) or not 0 <= value <= 1:
                raise MoshiError(f"sampling: `{name}` must be in [0, 1], got {value!r}")
        if self.seed is not None and (not _integer(self.seed) or not 0 <= self.seed < 2**63):
            raise MoshiError(f"sampling: `seed` must be an integer >= 0, got {self.seed!r}")

    def replace(self, **changes) -> Sampling:
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# Named settings: "top-k" is upstream PyTorch's (and chat's) default; "top-p" upstream MLX's
# ``Sampler()`` (temperature 0.8 and top-p 0.95 for text and audio); "greedy" is argmax.
PRESETS = {
    "top-k": Sampling(),
    "top-p": Sampling(temp_text=0.8, top_k=0, top_k_text=0, top_p=0.95, top_p_text=0.95),
    "greedy": Sampling(temp=0.0, temp_text=0.0),
}


def token_sampler(temp: float, top_k: int, top_p: float, vocab: int) -> TokenSampler:
    """``sample(logits [B, vocab], key) -> [B]``: draw from ``softmax(logits / temp)``
    restricted by top-p then top-k (0 = off; a top-k of the whole vocabulary is no filter);
    temperature 0 is argmax. Randomness comes only from ``key``."""
    import mlx.core as mx

    from .mlx_lm_parts import apply_top_k, apply_top_p

    if temp == 0:
        return lambda logits, key: mx.argmax(logits, axis=-1)

    def sample(logits: mx.array, key: mx.array) -> mx.array:
        # mlx-lm's filters take log-probabilities: give them the tempered distribution.
        logits = logits / temp
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        if 0 < top_k < vocab:
            logprobs = apply_top_k(logprobs, top_k)
        return mx.random.categorical(logprobs, key=key)

    return sample
