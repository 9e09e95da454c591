"""Checkpoint key mapping and weight loading for Mimi and the LM.

Each model has one table of ``(pattern, rule)`` pairs that turns a released key (PyTorch
checkpoints, or Kyutai's MLX repos for the LM) into the name of our parameter, with the layout
change it needs. Names that are already ours match no rule and pass through, so converted
files load with the same code. ``convert/`` reuses these tables.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


class CheckpointError(ValueError):
    """A weight file that cannot be used for the model it was given to."""


@dataclass
class Mapped:
    name: str
    transform: Callable[[mx.array], mx.array] | None = None
    # Several source tensors stacked along axis 0 into one parameter (depformer projections).
    stack_index: int | None = None


def _conv(w):  # PyTorch Conv1d [out, in, k] -> MLX [out, k, in]; biases unchanged
    return w.swapaxes(1, 2) if w.ndim == 3 else w


def _convtr(w):  # PyTorch ConvTranspose1d [in, out, k] -> MLX [out, k, in]
    return w.transpose(1, 2, 0) if w.ndim == 3 else w


def _depthwise_convtr(w):  # groups == channels: [C, 1, k] -> [C, k, 1]
    return w.transpose(0, 2, 1)


def _squeeze_last(w):  # 1x1 conv [out, in, 1] -> linear [out, in]; ours (2-D) unchanged
    return w[..., 0] if w.ndim == 3 else w


def _flat(w):  # RMSNorm alpha [1, 1, d] -> [d]
    return w.reshape(-1)


# ---- Mimi ------------------------------------------------------------------------------------

_CODEBOOK_FIELDS = {
    "embedding_sum": "embedding_sum", "embed_sum": "embedding_sum", "embed_avg": "embedding_sum",
    "cluster_usage": "cluster_usage", "cluster_size": "cluster_usage",
    "_initialized": "initialized", "inited": "initialized",
}  # fmt: skip


def _seanet_rule(part: str, n_stages: int):
    """Index ``i`` of upstream's ``{encoder,decoder}.model`` Sequential -> our module name.

    Encoder: conv, then per stage [residual, ELU, down conv], then ELU, conv.
    Decoder: conv, then per stage [ELU, up conv, residual], then ELU, conv.
    """
    last = 3 * n_stages + 2

    def rule(m: re.Match) -> Mapped | None:
        i, rest = int(m[1]), m[2]
        if i == 0 and rest.startswith("conv.conv."):
            return Mapped(f"{part}.conv_in.{rest[10:]}", _conv)
        if i == last and rest.startswith("conv.conv."):
            return Mapped(f"{part}.conv_out.{rest[10:]}", _conv)
        residual_at, resample_at = (1, 3) if part == "encoder" else (3, 2)
        block = re.fullmatch(r"block\.([13])\.conv\.conv\.(weight|bias)", rest)
        if block and (i - residual_at) % 3 == 0:
            conv = "conv1" if block[1] == "1" else "conv2"
            return Mapped(
                f"{part}.blocks.{(i - residual_at) // 3}.residuals.0.{conv}.{block[2]}", _conv
            )
        if (i - resample_at) % 3 == 0 and 0 <= (i - resample_at) // 3 < n_stages:
            stage = (i - resample_at) // 3
            if part == "encoder" and rest.startswith("conv.conv."):
                return Mapped(f"encoder.blocks.{stage}.downsample.{rest[10:]}", _conv)
            if part == "decoder" and rest.startswith("convtr.convtr."):
                return Mapped(f"decoder.blocks.{stage}.upsample.{rest[14:]}", _convtr)
        return None

    return rule


def _mimi_transformer_rule(m: re.Match) -> Mapped:
    rest = m[3]
    rest = re.sub(r"^self_attn\.in_projs?(?:\.0)?[._]weight$", "self_attn.in_proj.weight", rest)
    rest = re.sub(r"^self_attn\.out_projs\.0\.weight$", "self_attn.out_proj.weight", rest)
    rest = re.sub(r"^(layer_scale_[12])\.scale$", r"\1", rest)
    return Mapped(f"{m[1]}_transformer.layers.{m[2]}.{rest}")


def mimi_rules(n_stages: int = 4) -> list[tuple[str, Callable[[re.Match], Mapped | None]]]:
    """PyTorch Mimi checkpoint (released layout) -> our ``Mimi`` parameter names."""
    return [
        (r"encoder\.model\.(\d+)\.(.+)", _seanet_rule("encoder", n_stages)),
        (r"decoder\.model\.(\d+)\.(.+)", _seanet_rule("decoder", n_stages)),
        (r"(encoder|decoder)_transformer\.transformer\.layers\.(\d+)\.(.+)",
         _mimi_transformer_rule),
        (r"downsample\.conv\.conv\.conv\.weight", lambda m: Mapped("downsample.weight", _conv)),
        (r"upsample\.convtr\.convtr\.convtr\.weight",
         lambda m: Mapped("upsample.weight", _depthwise_convtr)),
        (r"quantizer\.(rvq_first|rvq_rest)\.(input_proj|output_proj)\.weight",
         lambda m: Mapped(f"quantizer.{m[1]}.{m[2]}.weight", _squeeze_last)),
        (r"quantizer\.(rvq_first|rvq_rest)\.vq\.layers\.(\d+)\._codebook\.(\w+)",
         lambda m: Mapped(f"quantizer.{m[1]}.codebooks.{m[2]}.{_CODEBOOK_FIELDS[m[3]]}")
         if m[3] in _CODEBOOK_FIELDS else None),
    ]  # fmt: skip


# ---- LM --------------------------------------------------------------------------------------


def lm_rules(schedule: list[int]) -> list[tuple[str, Callable[[re.Match], Mapped | None]]]:
    """Released PyTorch LM checkpoint, or Kyutai's MLX repos -> our ``Lm`` parameter names.

    ``schedule[k]`` is the depformer weight set of step ``k`` (upstream MLX stores one copy per
    step; PyTorch stacks the sets along axis 0 of each attention projection).
    """
    slice_ = r"depformer\.slices\.(\d+)\."
    return [
        # PyTorch released layout.
        (r"(.+)\.self_attn\.in_proj_weight", lambda m: Mapped(f"{m[1]}.self_attn.in_proj.weight")),
        (r"(.+)\.self_attn\.(in|out)_projs\.(\d+)\.weight",
         lambda m: Mapped(f"{m[1]}.self_attn.{m[2]}_proj.weight", stack_index=int(m[3]))),
        (r"(.+)\.alpha", lambda m: Mapped(f"{m[1]}.weight", _flat)),
        # Upstream MLX layout (kyutai/moshiko-mlx-*), quantized or not.
        (r"audio_embs\.(\d+)\.(\w+)", lambda m: Mapped(f"emb.{m[1]}.{m[2]}")),
        (slice_ + r"linear_in\.(\w+)", lambda m: Mapped(f"depformer_in.{m[1]}.{m[2]}")),
        (slice_ + r"linear_out\.(\w+)", lambda m: Mapped(f"linears.{m[1]}.{m[2]}")),
        (slice_ + r"emb\.(\w+)",
         lambda m: Mapped(f"depformer_text_emb.{m[2]}") if m[1] == "0"
         else Mapped(f"depformer_emb.{int(m[1]) - 1}.{m[2]}")),
        (slice_ + r"transformer\.layers\.(\d+)\.self_attn\.(in_proj|out_proj)\.(\w+)",
         lambda m: Mapped(f"depformer.layers.{m[2]}.self_attn.{m[3]}.{m[4]}",
                          stack_index=schedule[int(m[1])])),
        (slice_ + r"transformer\.layers\.(\d+)\.gating\.(.+)",
         lambda m: Mapped(f"depformer.layers.{m[2]}.gating.{schedule[int(m[1])]}.{m[3]}")),
        (slice_ + r"transformer\.layers\.(\d+)\.(norm[12]\.\w+)",
         lambda m: Mapped(f"depformer.layers.{m[2]}.{m[3]}")),
    ]  # fmt: skip


# ---- applying a table ------------------------------------------------------------------------


def map_key(key: str, rules) -> Mapped | None:
    for pattern, rule in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return rule(m)
    return None


def sanitize(weights: dict[str, mx.array], rules) -> dict[str, mx.array]:
    """Rename and reshape a checkpoint's tensors into our parameter names.

    Keys that match no rule keep their name (ours already). Tensors mapped to the same name with
    a stack index are concatenated in index order; repeated copies (upstream MLX duplicates
    shared norms and scheduled weight sets in every depformer slice) are kept once.
    """
    out: dict[str, mx.array] = {}
    stacks: dict[str, dict[int, mx.array]] = {}
    for key, value in weights.items():
        mapped = map_key(key, rules)
        if mapped is None:
            out.setdefault(key, value)
            continue
        if mapped.transform is not None:
            value = mapped.transform(value)
        if mapped.stack_index is None:
            out.setdefault(mapped.name, value)
        else:
            stacks.setdefault(mapped.name, {}).setdefault(mapped.stack_index, value)
    for name, parts in stacks.items():
        out[name] = mx.concatenate([parts[i] for i in sorted(parts)], axis=0)
    return out


def read_safetensors(path: str | Path) -> dict[str, mx.array]:
    """Load a safetensors file lazily, turning unreadable files into a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        return mx.load(str(path), format="safetensors")
    except Exception as e:  # MLX raises RuntimeError/ValueError with C++ details
        raise CheckpointError(
            f"cannot read {path}: not a valid safetensors file (truncated or corrupt?): {e}"
        ) from None


def _quantization_of(module: nn.Module, weights: dict, prefix: str) -> dict | None:
    """bits/group_size of a layer stored quantized in ``weights``, from the tensor shapes."""
    scales = weights.get(f"{prefix}.scales")
    packed = weights.get(f"{prefix}.weight")
    if scales is None or packed is None or not hasattr(module, "to_quantized"):
        return None
    in_dims = module.weight.shape[-1]
    bits = packed.shape[-1] * 32 // in_dims
    if bits not in (2, 3, 4, 5, 6, 8) or in_dims % scales.shape[-1]:
        raise CheckpointError(f"{prefix}: quantized tensor shapes do not fit the model config")
    return {"group_size": in_dims // scales.shape[-1], "bits": bits}


def quantize_like(model: nn.Module, weights: dict[str, mx.array]) -> dict | None:
    """Quantize exactly the layers that ``weights`` stores quantized (bits and group size read
    from the shapes). Returns the most common ``{bits, group_size}`` or None."""
    found: dict[str, dict] = {}

    def predicate(path, module):
        q = _quantization_of(module, weights, path)
        if q:
            found[path] = q
        return q or False

    nn.quantize(model, class_predicate=predicate)
    if not found:
        return None
    settings = [tuple(sorted(q.items())) for q in found.values()]
    return dict(max(set(settings), key=settings.count))


def load_into(
    model: nn.Module,
    weights: dict[str, mx.array],
    source: str,
    as_dtype: mx.Dtype | None = None,
    hint: Callable[[str], str] | None = None,
) -> None:
    """Strictly load ``weights`` (already in our names): every parameter present, no extras, the
    same shapes; each error names the first few offending keys, the file and, with ``hint``,
    the config field that is likely wrong. Floating tensors are cast to ``as_dtype`` if given
    (packed quantized weights keep theirs)."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    why = (lambda keys: f" (check {hint(keys[0])})") if hint else (lambda keys: "")
    if extra:
        raise CheckpointError(
            f"{source}: {len(extra)} unexpected key(s), e.g. {', '.join(extra[:4])}{why(extra)}"
        )
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} missing key(s), e.g. {', '.join(missing[:4])}{why(missing)}"
        )
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise CheckpointError(
                f"{source}: {name} has shape {list(value.shape)} but the config gives "
                f"{list(expected[name].shape)}{why([name])}"
            )
    if as_dtype is not None:
        weights = {
            k: v.astype(as_dtype) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }
    model.load_weights(list(weights.items()), strict=False)


# ---- recognising checkpoints -----------------------------------------------------------------

_LM_PREFIXES = (
    "text_emb.", "text_linear.", "emb.", "audio_embs.", "transformer.layers.", "out_norm.",
    "depformer", "linears.",
)  # fmt: skip
_MIMI_PREFIXES = (
    "encoder.", "decoder.", "encoder_transformer.", "decoder_transformer.", "quantizer.",
    "downsample.", "upsample.",
)  # fmt: skip


def checkpoint_kind(keys) -> str | None:
    """``"lm"`` or ``"mimi"`` from a checkpoint's key names (any of the layouts we read: PyTorch
    release, Kyutai's MLX repos, ours), None when the keys look like neither."""
    keys = list(keys)
    lm = sum(k.startswith(_LM_PREFIXES) for k in keys)
    mimi = sum(k.startswith(_MIMI_PREFIXES) for k in keys)
    if lm == mimi:
        return None
    return "lm" if lm > mimi else "mimi"


# ---- quantizing ------------------------------------------------------------------------------

QUANT_BITS = (2, 3, 4, 5, 6, 8)
# Group size per bit width of Kyutai's q4 / q8 files, our defaults too.
DEFAULT_GROUP_SIZE = {4: 32, 8: 64}
QUANT_GROUP_SIZES = (32, 64, 128)


def quantizable(path: str, module: nn.Module) -> bool:
    """The layers we quantize: linear projections and embedding tables (norms, convolutions
    and Mimi stay in float). Our ``ZeroEmbedding`` / ``MultiLinear`` keep their behaviour."""
    from .layers import MultiLinear

    return isinstance(module, (nn.Linear, nn.Embedding, MultiLinear)) and hasattr(
        module, "to_quantized"
    )


def quantization_of(model: nn.Module) -> dict | None:
    """``{bits, group_size}`` of the model's first quantized layer, None if it is all float."""
    for _, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if "scales" in m:
            return {"bits": m.bits, "group_size": m.group_size}
    return None


def indivisible_layers(model: nn.Module, group_size: int) -> dict[str, int]:
    """Quantizable layers whose input width (last weight axis) ``group_size`` does not divide,
    with that width."""
    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    return {
        path: m.weight.shape[-1]
        for path, m in leaves
        if quantizable(path, m) and m.weight.shape[-1] % group_size
    }


def quantize_lm(
    model: nn.Module, bits: int, group_size: int, skip_indivisible: bool = False
) -> list[str]:
    """Quantize the LM's linear and embedding layers in place (affine, ``bits`` per weight,
    one scale and bias per ``group_size`` inputs). Lazy: nothing is computed until evaluated.

    A layer whose input width ``group_size`` does not divide cannot be quantized: by default
    that is an error naming the layers; with ``skip_indivisible`` they stay in float and their
    paths are returned.
    """
    if bits not in QUANT_BITS:
        raise ValueError(f"quantization bits must be one of {QUANT_BITS}, got {bits}")
    if group_size not in QUANT_GROUP_SIZES:
        raise ValueError(
            f"quantization group size must be one of {QUANT_GROUP_SIZES}, got {group_size}"
        )
    skipped = indivisible_layers(model, group_size)
    if skipped and not skip_indivisible:
        folded = {re.sub(r"\.\d+(?=\.|$)", ".{i}", p): w for p, w in skipped.items()}
        names = ", ".join(f"{p} (width {w})" for p, w in sorted(folded.items()))
        raise ValueError(
            f"group size {group_size} does not divide the input width of {len(skipped)} "
            f"layer(s): {names}; pick a group size that divides them, or keep those layers in "
            "float (skip_indivisible, --skip-indivisible)"
        )
    nn.quantize(
        model,
        group_size,
        bits,
        class_predicate=lambda path, m: quantizable(path, m) and path not in skipped,
    )
    return sorted(skipped)
