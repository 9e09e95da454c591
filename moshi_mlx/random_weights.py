"""Models of a given config with random weights: the same compute as the real ones (for
benchmarks, memory figures and trying the commands), with nothing to download.

``SIZES`` names the scaled-down models the project times and tests: ``tiny`` and ``medium``
(the rows of the side-by-side benchmark), each with every part scaled (temporal and depth
transformers, Mimi for ``tiny``); ``train_tokenizer`` writes a small text tokenizer to go
with them.
"""

from __future__ import annotations

import dataclasses
import io
import random
import string
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from .errors import MoshiError
from .lm import Lm, LmConfig
from .loading import materialize
from .mimi import Mimi, MimiConfig
from .quantize import Quantization, quantize_lm
from .quantizer import Codebook


def scale_lm_config(
    cfg: LmConfig,
    *,
    dim: int | None = None,
    layers: int | None = None,
    heads: int | None = None,
    dep_dim: int | None = None,
    dep_layers: int | None = None,
    dep_heads: int | None = None,
    context: int | None = None,
    text_card: int | None = None,
) -> LmConfig:
    """``cfg`` with the parts given changed; the others are kept as they are.

    Scaled widths get upstream MLX's FFN sizes, as the reference harness scales them: temporal
    hidden ``11 * dim / 4`` (``hidden_scale`` 4.125) and depformer hidden ``11 * dep_dim / 4``;
    heads default to ``dim / 128`` and ``dep_dim / 64``.
    """
    given = (("num_layers", layers), ("context", context), ("text_card", text_card),
             ("depformer_num_layers", dep_layers))  # fmt: skip
    changes = {k: v for k, v in given if v is not None}
    if dim is not None:
        changes.update(dim=dim, hidden_scale=4.125, num_heads=max(1, dim // 128))
    if dep_dim is not None:
        hidden = 11 * dep_dim // 4  # 2/3 of the feed-forward width gives this hidden width
        changes.update(depformer_dim=dep_dim, depformer_dim_feedforward=(3 * hidden + 1) // 2,
                       depformer_num_heads=max(1, dep_dim // 64))  # fmt: skip
    if heads is not None:
        changes["num_heads"] = heads
    if dep_heads is not None:
        changes["depformer_num_heads"] = dep_heads
    cfg = dataclasses.replace(cfg, **changes)
    cfg.validate()
    return cfg


# A Mimi of a few hundred thousand weights with the released codec's rates (24 kHz, 1920-sample
# frames, 2048-entry codebooks): the tests' fixture codec.
_TINY_MIMI = {
    "seanet": {"dimension": 64, "n_filters": 8, "n_residual_layers": 1, "ratios": [8, 6, 5, 4]},
    "transformer": {"d_model": 64, "num_heads": 4, "num_layers": 2, "context": 16,
                    "dim_feedforward": 128, "input_dimension": 64, "output_dimensions": [64]},
    "quantizer": {"dimension": 16, "n_q": 32, "bins": 2048, "input_dimension": 64,
                  "output_dimension": 64},
}  # fmt: skip

# name -> (LM scale-down of Moshi 7B, Mimi config or None for the released codec, what it is)
_SIZES = {
    "tiny": (dict(dim=256, layers=2, dep_dim=256, dep_layers=2), _TINY_MIMI,
             "LM 256 wide x 2 layers, depth 256 x 2, a tiny Mimi"),
    "medium": (dict(dim=1024, layers=8, dep_dim=512, dep_layers=2), None,
               "LM 1024 wide x 8 layers, depth 512 x 2, the released Mimi"),
}  # fmt: skip
SIZES = tuple(_SIZES)


def sized_config(size: str) -> tuple[LmConfig, MimiConfig]:
    """The LM and Mimi configs of a named size (``SIZES``): Moshi's vocabularies, delays and
    context, everything else scaled down."""
    if size not in _SIZES:
        raise MoshiError(f"unknown size {size!r}: use {' or '.join(SIZES)}")
    lm, mimi, _ = _SIZES[size]
    return scale_lm_config(LmConfig.moshi_7b(), **lm), MimiConfig.from_dict(mimi or {})


def describe_size(size: str) -> str:
    """One line on what a named size holds."""
    return _SIZES[size][2]


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
    one has all-zero centroids), its kernels chosen for ``device``. The same ``seed`` gives
    the same weights."""
    mx.random.seed(seed)
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


# The first pieces of the tokenizer's vocabulary: real words, so that a transcript of a random
# model has a few of them among the made-up ones.
_TOKENIZER_TEXT = """hello there how are you doing today
i am fine thank you and you
the weather is nice and the sun is shining
moshi listens and speaks at the same time
full duplex speech models can interrupt and be interrupted
"""


def train_tokenizer(path: str | Path, vocab_size: int = 32000) -> Path:
    """Write at ``path`` a word-level SentencePiece model with Moshi's special ids (0 unk / end
    of padding, 1 ``<s>``, 2 ``</s>``, 3 ``<pad>``) and ``vocab_size`` pieces: the words of a
    few English sentences, then made-up words. The same bytes every time; about a second for
    32000 pieces."""
    import sentencepiece as spm

    rng = random.Random(0)
    made_up = {"".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 10)))
               for _ in range(vocab_size + 1000)}  # fmt: skip
    words = sorted(made_up)
    lines = _TOKENIZER_TEXT.splitlines() * 5
    lines += [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    model = io.BytesIO()  # no file names in the model: the same bytes wherever it is trained
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        pad_id=3, unk_id=0, bos_id=1, eos_id=2, model_type="word", minloglevel=2,
    )  # fmt: skip
    path = Path(path)
    path.write_bytes(model.getvalue())
    return path
