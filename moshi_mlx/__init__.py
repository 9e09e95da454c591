"""moshi-mlx: Kyutai's Moshi (Mimi codec + Helium LM + depth transformer) in pure MLX."""

from .generate import LmGen
from .lm import Lm, LmConfig
from .loading import load, load_lm, load_mimi
from .mimi import Mimi, MimiConfig

__all__ = ["Lm", "LmConfig", "LmGen", "Mimi", "MimiConfig", "load", "load_lm", "load_mimi"]
