"""Checkpoint key mapping and weight loading for Mimi and the LM.

Each model has one table of ``(pattern, rule)`` pairs that turns a released key (PyTorch
checkpoints, or Kyutai's MLX repos for the LM) into the name of our parameter, with the layout
change it needs. Names that are already ours match no rule and pass through, so converted
files load with the same code. ``convert/`` reuses these tables.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import MoshiError
from .validate import dtype_name


class CheckpointError(MoshiError):
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

    def weight_set(step: str) -> int:
        # Steps past the schedule are PersonaPlex's user-stream steps, dropped after mapping.
        k = int(step)
        return schedule[k] if k < len(schedule) else k

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
                          stack_index=weight_set(m[1]))),
        (slice_ + r"transformer\.layers\.(\d+)\.gating\.(.+)",
         lambda m: Mapped(f"depformer.layers.{m[2]}.gating.{weight_set(m[1])}.{m[3]}")),
        (slice_ + r"transformer\.layers\.(\d+)\.(norm[12]\.\w+)",
         lambda m: Mapped(f"depformer.layers.{m[2]}.{m[3]}")),
    ]  # fmt: skip


def depformer_steps(keys) -> int:
    """How many depformer steps (output heads) a checkpoint has, in any of our layouts."""
    found = [
        int(m[1]) for k in keys if (m := re.match(r"(?:linears|depformer\.slices)\.(\d+)\.", k))
    ]
    return max(found) + 1 if found else 0


def drop_user_depformer_steps(weights: dict[str, mx.array], cfg) -> tuple[dict, list[int]]:
    """Remove from ``weights`` (in our names) the depformer steps past Moshi's ``dep_q``.

    PersonaPlex's depformer has ``n_q`` steps: after Moshi's codebooks it predicts the user's,
    which are always given, so those steps never change Moshi's output. Returns the weights of
    a ``dep_q``-step depformer (per-step tensors dropped, stacked attention projections cut)
    and the steps dropped, empty when the checkpoint has none.
    """
    dropped = [k for k in range(cfg.dep_q, cfg.n_q) if f"linears.{k}.weight" in weights]
    if not dropped:
        return weights, []
    n_sets = max(cfg.schedule) + 1
    per_step = (
        (r"(?:depformer_in|linears)\.(\d+)\..+", cfg.dep_q),
        (r"depformer_emb\.(\d+)\..+", cfg.dep_q - 1),  # embeds codebook k for step k + 1
        (r"depformer\.layers\.\d+\.gating\.(\d+)\..+", n_sets),
    )
    rows = {"in_proj": 3 * n_sets * cfg.depformer_dim, "out_proj": n_sets * cfg.depformer_dim}
    kept = {}
    for name, value in weights.items():
        if any((m := re.fullmatch(p, name)) and int(m[1]) >= n for p, n in per_step):
            continue
        stacked = re.fullmatch(r"depformer\.layers\.\d+\.self_attn\.(in_proj|out_proj)\.\w+", name)
        kept[name] = value[: rows[stacked[1]]] if stacked else value
    return kept, dropped


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


# bytes per element of the safetensors dtypes
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2,
             "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8,
             "F64": 8}  # fmt: skip
_MAX_HEADER = 100 << 20  # the format's own limit


def check_safetensors(path: Path) -> None:
    """Validate a safetensors file's header against the format: known dtypes, sizes that
    match the shapes, and tensors that tile the data exactly (no overlap, no gap, nothing
    past the end). MLX trusts the header; a hostile one could alias or overrun tensors."""
    size = path.stat().st_size

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"cannot read {path}: not a valid safetensors file ({why})")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("truncated or corrupt: no header")
        n = int.from_bytes(head, "little")
        if n > min(_MAX_HEADER, size - 8):
            raise bad("truncated or corrupt: header larger than the file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad("truncated or corrupt: header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not an object")
    spans = []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(t, dict) and t.get("dtype") in _ITEMSIZE
        shape, offsets = (t.get("shape"), t.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
        ok = ok and isinstance(offsets, list) and len(offsets) == 2
        ok = ok and all(type(o) is int for o in offsets)
        if not ok:
            raise bad(f"malformed entry for tensor {name!r}")
        nbytes = math.prod(shape) * _ITEMSIZE[t["dtype"]]
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"tensor {name!r} holds {offsets[1] - offsets[0]} bytes, its shape {nbytes}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise bad(f"tensor {name!r} {'overlaps another' if begin < end else 'leaves a gap'}")
        end = stop
    if end != size - 8 - n:
        raise bad("truncated or corrupt: the tensors do not end where the file does")


def read_safetensors(path: str | Path) -> dict[str, mx.array]:
    """Load a safetensors file lazily (its header validated first), turning unreadable files
    into a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    check_safetensors(path)
    try:
        return mx.load(str(path), format="safetensors")
    except Exception as e:  # MLX raises RuntimeError/ValueError with C++ details
        raise CheckpointError(
            f"cannot read {path}: not a valid safetensors file (truncated or corrupt?): {e}"
        ) from None


def check_finite(name: str, value: mx.array) -> None:
    """One line for a weight holding NaN or infinite values (evaluates it)."""
    if mx.issubdtype(value.dtype, mx.floating) and not mx.all(mx.isfinite(value)).item():
        raise CheckpointError(
            f"weight {name} holds NaN or infinite values: the checkpoint is broken; get a good "
            "copy of it"
        )


def leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every leaf module (the layers that hold the parameters)."""
    return tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)


def float_dtype(params: dict[str, mx.array]) -> str:
    """Name (``"bfloat16"``...) of the most common dtype among the float weights, leaving out
    quantization scales and biases (a quantized model's dtype is that of its norms)."""
    names = [
        dtype_name(v.dtype)
        for k, v in params.items()
        if mx.issubdtype(v.dtype, mx.floating) and not k.endswith((".scales", ".biases"))
    ]
    return max(set(names), key=names.count)


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
        floats = mx.issubdtype(value.dtype, mx.floating)
        if floats != mx.issubdtype(expected[name].dtype, mx.floating):
            raise CheckpointError(
                f"{source}: {name} is stored as {dtype_name(value.dtype)} where the model needs "
                f"{'floating point' if not floats else 'packed integers'} weights; it is not "
                "a checkpoint of this model"
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
    "depformer", "linears.", "extra_heads.",
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
