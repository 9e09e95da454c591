"""Loading Mimi and the LM from a weight file plus an optional config."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from .lm import Lm, LmConfig
from .mimi import Mimi, MimiConfig
from .weights import (
    CheckpointError,
    lm_rules,
    load_into,
    mimi_rules,
    quantize_like,
    read_safetensors,
    sanitize,
)


def _config_dict(config: str | Path | dict | None, what: str) -> dict | None:
    if config is None or isinstance(config, dict):
        return config
    path = Path(config)
    if not path.is_file():
        raise CheckpointError(f"{what} config not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} config {path} is not valid JSON: {e}") from None


def mimi_config(config: str | Path | dict | MimiConfig | None) -> MimiConfig:
    if isinstance(config, MimiConfig):
        return config
    d = _config_dict(config, "Mimi")
    return MimiConfig() if d is None else MimiConfig.from_dict(d)


def lm_config(config: str | Path | dict | LmConfig | None) -> LmConfig:
    if isinstance(config, LmConfig):
        return config
    d = _config_dict(config, "LM")
    return LmConfig.moshi_7b() if d is None else LmConfig.from_dict(d)


def load_mimi(weights: str | Path, config: str | Path | dict | MimiConfig | None = None) -> Mimi:
    """Mimi from an upstream PyTorch checkpoint (released key layout) or a converted MLX file.

    ``config``: a JSON path, a dict in upstream's nested format, or None for the real codec.
    Mimi always computes in float32.
    """
    cfg = mimi_config(config)
    model = Mimi(cfg)
    raw = read_safetensors(weights)
    load_into(
        model,
        sanitize(raw, mimi_rules(len(cfg.seanet.ratios))),
        str(weights),
        as_dtype=mx.float32,
        hint=lambda name: "that the Mimi config fits this checkpoint",
    )
    return model


def load_lm(
    weights: str | Path,
    config: str | Path | dict | LmConfig | None = None,
    dtype: mx.Dtype | None = mx.float32,
) -> Lm:
    """The LM from a released PyTorch checkpoint, one of Kyutai's MLX files (bf16, q8 or q4) or
    a converted file. ``config``: JSON path, dict in upstream format, or None for Moshi 7B.

    Unquantized weights are cast to ``dtype`` (float32 by default, the exact path; pass
    ``mx.bfloat16`` for speed, or None to keep the file's dtype). Quantized files keep their
    bits and group size, read from the tensor shapes.
    """
    cfg = lm_config(config)
    model = Lm(cfg)
    params = sanitize(read_safetensors(weights), lm_rules(cfg.schedule))
    quantize_like(model, params)
    load_into(model, params, str(weights), as_dtype=dtype, hint=lm_config_hint)
    return model


def lm_config_hint(name: str) -> str:
    """The LM config field most likely wrong when parameter ``name`` does not fit."""
    for prefix, fields in (
        ("text_emb", "text_card or dim"),
        ("text_linear", "text_card or dim"),
        ("emb.", "card, n_q or dim"),
        ("transformer.", "dim, num_layers, num_heads or hidden_scale"),
        ("out_norm", "dim"),
        ("depformer_text_emb", "text_card, depformer_dim or depformer_low_rank_embeddings"),
        ("depformer_emb", "card, dep_q, depformer_dim or depformer_low_rank_embeddings"),
        ("depformer_in", "dim, depformer_dim, dep_q or depformer_multi_linear"),
        (
            "depformer.",
            "depformer_dim, depformer_num_layers, depformer_dim_feedforward or "
            "depformer_weights_per_step(_schedule)",
        ),
        ("linears", "card, dep_q or depformer_dim"),
    ):
        if name.startswith(prefix):
            return fields
    return "the model config"
