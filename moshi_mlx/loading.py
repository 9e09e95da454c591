"""Loading Mimi and the LM from weight files, and whole model folders with ``load``.

Error messages name the API's arguments in backticks (`moshi_weights`); the command line shows
its flags in their place.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import MoshiError, MoshiWarning
from .lm import Lm, LmConfig
from .memory import check_config_fits, check_fits, param_bytes
from .mimi import Mimi, MimiConfig
from .quantize import Quantization, quantization_of, quantize_like, quantize_lm
from .weights import (
    CheckpointError,
    check_finite,
    checkpoint_kind,
    depformer_steps,
    drop_user_depformer_steps,
    float_dtype,
    leaf_modules,
    lm_rules,
    load_into,
    mimi_rules,
    read_safetensors,
    sanitize,
)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
PARTS = ("lm", "mimi", "tokenizer")


def read_json(path: str | Path, what: str) -> dict:
    """A JSON file holding an object, or a one-line ``CheckpointError`` naming ``what``."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        detail = " ".join(str(e).split())
        raise CheckpointError(f"cannot read {what} {path}: {detail}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{what} {path} must hold a JSON object")
    return d


def _config(config, default, from_dict, what: str, source: str | Path | None):
    """A config object from itself, a dict read from ``source``, a JSON path, or None."""
    if config is None:
        return default()
    if not isinstance(config, (dict, str, Path)):
        return config
    if not isinstance(config, dict):
        source, config = config, read_json(config, what)
    try:
        return from_dict(config)
    except MoshiError as e:
        raise CheckpointError(f"{source}: {e}" if source else str(e)) from None


def as_mimi_config(config: str | Path | dict | MimiConfig | None, source=None) -> MimiConfig:
    """A ``MimiConfig`` from a JSON path, an upstream dict (read from ``source``, named in
    errors), or None (the released codec)."""
    return _config(config, MimiConfig, MimiConfig.from_dict, "Mimi config", source)


def as_lm_config(
    config: str | Path | dict | LmConfig | None, source=None, weights: Sequence[Path] = ()
) -> LmConfig:
    """An ``LmConfig`` from a JSON path, an upstream dict (read from ``source``, named in
    errors), or None: Moshi 7B, or PersonaPlex 7B when the checkpoint ``weights`` (paths)
    have its depformer predicting the user's stream."""
    if config is None and weights:
        keys = [k for path in weights for k in read_safetensors(path)]
        if depformer_steps(keys) > LmConfig.moshi_7b().dep_q:
            return LmConfig.personaplex_7b()
    return _config(config, LmConfig.moshi_7b, LmConfig.from_dict, "LM config", source)


def load_mimi(
    weights: str | Path,
    config: str | Path | dict | MimiConfig | None = None,
    device: mx.Device | None = None,
) -> Mimi:
    """Mimi from an upstream PyTorch checkpoint (released key layout) or a converted MLX file.

    ``config``: a JSON path, a dict in upstream's nested format, or None for the real codec.
    Mimi always computes in float32; its kernels are chosen for ``device`` (see
    ``Mimi.place``; default MLX's default device).
    """
    cfg = as_mimi_config(config)
    model = Mimi(cfg)
    raw = read_safetensors(weights)
    if checkpoint_kind(raw) != "mimi":
        raise CheckpointError(wrong_checkpoint(Path(weights), raw, "mimi"))
    load_into(
        model,
        sanitize(raw, mimi_rules(len(cfg.seanet.ratios))),
        str(weights),
        as_dtype=mx.float32,
        hint=lambda name: "that the Mimi config fits this checkpoint",
    )
    model.place(device)
    return model


def load_lm(
    weights: str | Path | Sequence[str | Path],
    config: str | Path | dict | LmConfig | None = None,
    dtype: str | mx.Dtype | None = mx.float32,
    quantize: Quantization | None = None,
) -> Lm:
    """The LM from a released PyTorch checkpoint, one of Kyutai's MLX files (bf16, q8 or q4) or
    a converted file (or the list of its shards). ``config``: JSON path, dict in upstream
    format, or None for Moshi 7B (PersonaPlex 7B if the weights are PersonaPlex's).

    Unquantized weights are cast to ``dtype`` (float32 by default, the exact path; pass
    ``mx.bfloat16`` for speed, or None to keep the file's dtype). Quantized files keep their
    bits and group size, read from the tensor shapes; ``quantize`` quantizes a float model
    (``quantize_lm``'s rules). Nothing is read from disk until used (``materialize``).
    """
    paths = [Path(weights)] if isinstance(weights, (str, Path)) else [Path(p) for p in weights]
    cfg = as_lm_config(config, weights=paths)
    params, source = read_lm_weights(paths, cfg)
    model = Lm(without_missing_heads(cfg, params, source))
    stored = quantize_like(model, params)
    load_into(model, params, source, as_dtype=as_dtype(dtype), hint=lm_config_hint)
    if quantize is not None:
        if stored is not None:
            raise CheckpointError(
                f"{source} is already quantized ({stored}); load it without `quantize`, or "
                "quantize a float checkpoint (e.g. kyutai/moshiko-mlx-bf16)"
            )
        quantize_lm(model, quantize)
    return model


def without_missing_heads(cfg: LmConfig, params: dict, source: str) -> LmConfig:
    """``cfg`` without its extra heads when the checkpoint has none (Kyutai ships the STT
    voice-activity heads in one release only), with one ``MoshiWarning`` saying so."""
    if cfg.extra_heads_num_heads and not any(k.startswith("extra_heads.") for k in params):
        warnings.warn(
            f"{source} has no weights for the config's {cfg.extra_heads_num_heads} extra "
            "(voice-activity) heads: loading the model without them",
            MoshiWarning,
            stacklevel=3,
        )
        return replace(cfg, extra_heads_num_heads=0)
    return cfg


def materialize(model: nn.Module, progress: Callable[[int, int], None] | None = None) -> None:
    """Evaluate a lazily built or loaded model one layer at a time, so that float copies of
    weights being quantized or cast never exist all at once, and refuse weights that are NaN
    or infinite. ``progress(done, total)``."""
    leaves = leaf_modules(model)
    for i, (path, leaf) in enumerate(leaves):
        params = tree_flatten(leaf.parameters())
        mx.eval([v for _, v in params])
        for name, value in params:
            check_finite(f"{path}.{name}", value)
        if progress is not None:
            progress(i + 1, len(leaves))
    mx.eval(model.parameters())


def read_lm_weights(
    weights: str | Path | Sequence[str | Path], cfg: LmConfig
) -> tuple[dict[str, mx.array], str]:
    """Lazily read LM weights (one file or shards) into our parameter names; also returns a
    name for error messages. PersonaPlex's depformer steps for the user's stream are dropped,
    with one ``MoshiWarning``."""
    paths = [Path(weights)] if isinstance(weights, (str, Path)) else [Path(p) for p in weights]
    raw: dict[str, mx.array] = {}
    for path in paths:
        part = read_safetensors(path)
        if checkpoint_kind(part) != "lm":
            raise CheckpointError(wrong_checkpoint(path, part, "lm"))
        twice = sorted(set(part) & set(raw))
        if twice:
            raise CheckpointError(
                f"{path}: tensor(s) also in another shard: {', '.join(twice[:4])}"
            )
        raw.update(part)
    source = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent} ({len(paths)} shards)"
    params, dropped = drop_user_depformer_steps(sanitize(raw, lm_rules(cfg.schedule)), cfg)
    if dropped:
        warnings.warn(
            f"{source}: depformer steps {dropped[0]}-{dropped[-1]} predict only the user's "
            "audio and are ignored; running at Moshiko's cost",
            MoshiWarning,
            stacklevel=2,
        )
    return params, source


def wrong_checkpoint(path: Path, weights: dict, wanted: str) -> str:
    """One-line message for a file whose keys are not those of the model (``"lm"`` or
    ``"mimi"``) it was given to."""
    what = {"lm": "a Moshi LM checkpoint", "mimi": "a Mimi codec checkpoint"}
    kind = checkpoint_kind(weights)
    if kind is not None:
        return f"{path} is {what[kind]}, not {what[wanted]} (were the files swapped?)"
    sample = ", ".join(sorted(weights)[:3]) or "no tensors"
    return f"{path} is not {what[wanted]} (its keys look like: {sample})"


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
        ("extra_heads", "extra_heads_num_heads, extra_heads_dim or dim"),
    ):
        if name.startswith(prefix):
            return fields
    return "the model config"


# ---- whole model folders ---------------------------------------------------------------------

FORMAT = "moshi-mlx"  # ``format`` field of the config.json that ``moshi-mlx convert`` writes
MIMI_CONFIG = "mimi_config.json"  # optional Mimi config beside a PyTorch / Kyutai MLX release


@dataclass
class ModelFiles:
    """Where the parts of a model are and how to build them (see ``find_model_files``); a part
    not asked for is None."""

    lm_weights: list[Path] | None
    mimi_weights: Path | None
    tokenizer: Path | None
    lm_config: LmConfig
    mimi_config: MimiConfig
    # "moshi-mlx" (written by ``moshi-mlx convert``), "kyutai-mlx" (Kyutai's MLX repos) or
    # "pytorch" (Kyutai's PyTorch release), read from the LM's keys; None without the LM.
    layout: str | None
    folder: Path | None = None
    config: dict | None = None  # the folder's config.json, if any


def is_converted(config: dict | None) -> bool:
    """Whether a folder's config.json was written by ``moshi-mlx convert``."""
    return bool(config) and config.get("format") == FORMAT


class ModelFolder:
    """A model folder from a stranger: every file its configs name, and every file found in
    it, must stay inside it. Absolute names, ``..`` and symlinks that resolve outside are
    refused. A Hugging Face cache snapshot's files are symlinks into its repo's ``blobs/``, so
    there the repo's cache folder is the boundary."""

    def __init__(self, path: Path):
        self.path = path
        hub_repo = path.parent.parent
        in_hub_cache = path.parent.name == "snapshots" and hub_repo.name.startswith("models--")
        self.root = (hub_repo if in_hub_cache else path).resolve()

    def _inside(self, path: Path, label: str) -> Path:
        if not path.resolve().is_relative_to(self.root):
            raise CheckpointError(
                f"{self.path}: {label} resolves outside the model folder; refusing to read it"
            )
        return path

    def file(self, name, what: str, named_by: str = "config.json") -> Path:
        """The file ``name`` that ``named_by`` lists as the ``what`` file."""
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{self.path}: {named_by} gives {what} as {name!r}, not a name")
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise CheckpointError(
                f"{self.path}: {named_by} names {what} file {name!r} outside the model folder; "
                "refusing to read it"
            )
        path = self._inside(self.path / rel, f"the {what} file {name!r} named by {named_by}")
        if not path.is_file():
            raise CheckpointError(
                f"{self.path}: the {what} file {name} named by {named_by} is missing"
            )
        return path

    def glob(self, pattern: str) -> list[Path]:
        """The folder's files matching ``pattern``, in name order."""
        return [self._inside(p, f"{p.name}") for p in sorted(self.path.glob(pattern))]

    def optional(self, name: str) -> Path | None:
        """The folder's file ``name`` if there is one."""
        path = self.path / name
        return self._inside(path, name) if path.is_file() else None


def _scan(folder: ModelFolder) -> tuple[dict[str, list[Path]], bool]:
    """Safetensors files of ``folder`` grouped by what their keys say they are, and whether
    the LM files are the shards of one model (an index lists them, or mlx-lm's names)."""
    found: dict[str, list[Path]] = {"lm": [], "mimi": []}
    index = folder.glob("*.safetensors.index.json")
    if len(index) == 1:
        weight_map = read_json(index[0], "shard index").get("weight_map", {})
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index[0]}: weight_map must be an object")
        found["lm"] = [
            folder.file(n, "LM shard", index[0].name)
            for n in sorted(set(weight_map.values()), key=str)
        ]
    sharded = bool(found["lm"])
    for path in folder.glob("*.safetensors"):
        if path in found["lm"]:
            continue
        kind = checkpoint_kind(read_safetensors(path))
        if kind is not None:
            found[kind].append(path)
    if not sharded and len(found["lm"]) > 1:
        sharded = all(re.search(r"-\d+-of-\d+\.safetensors$", p.name) for p in found["lm"])
    return found, sharded


def _one(paths: list[Path], what: str, folder: Path, argument: str) -> Path:
    if not paths:
        raise CheckpointError(f"{folder}: no {what} found; give it with `{argument}`")
    if len(paths) > 1:
        names = ", ".join(p.name for p in paths)
        raise CheckpointError(
            f"{folder}: several {what} files ({names}); pick one with `{argument}`"
        )
    return paths[0]


def _layout(lm_weights: list[Path], config: dict | None) -> str:
    if is_converted(config):
        return FORMAT
    keys = set()
    for path in lm_weights:
        keys.update(read_safetensors(path))
    if any(k.startswith(("audio_embs.", "depformer.slices.")) for k in keys):
        return "kyutai-mlx"
    if any(k.endswith(("_proj_weight", ".alpha")) or "_projs." in k for k in keys):
        return "pytorch"
    return FORMAT


def _section(config: dict, key: str, path: Path) -> dict:
    """Section ``key`` of a converted folder's config.json (an object)."""
    value = config.get(key)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: section {key!r} is missing or not an object; reconvert")
    return value


def find_model_files(
    folder: str | Path | None = None,
    *,
    parts: Collection[str] = PARTS,
    moshi_weights: str | Path | None = None,
    mimi_weights: str | Path | None = None,
    tokenizer: str | Path | None = None,
    lm_config: str | Path | dict | LmConfig | None = None,
    mimi_config: str | Path | dict | MimiConfig | None = None,
) -> ModelFiles:
    """Find the files of the ``parts`` (``"lm"``, ``"mimi"``, ``"tokenizer"``) of a model
    folder, and the configs to build them.

    Reads, in order: explicit arguments; the folder's ``config.json`` (ours, or upstream's LM
    config with optional ``moshi_name`` / ``mimi_name`` / ``tokenizer_name``); otherwise the
    weight files are told apart by their keys and the tokenizer is the folder's ``*.model``.
    The LM config defaults to Moshi 7B (PersonaPlex 7B for PersonaPlex's weights), the Mimi
    config to ``mimi_config.json`` when present, else the released codec.
    """
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise MoshiError(f"unknown model part(s) {sorted(unknown)}; parts are {', '.join(PARTS)}")
    folder = ModelFolder(Path(folder).expanduser()) if folder is not None else None
    config = None
    config_path = folder.optional("config.json") if folder is not None else None
    if config_path is not None:
        config = read_json(config_path, "config")
    ours = is_converted(config)
    names = dict(_section(config, "files", config_path)) if ours else {}
    if config and not ours:
        names = {
            "lm": config.get("moshi_name"),
            "mimi": config.get("mimi_name"),
            "tokenizer": config.get("tokenizer_name"),
        }
    scanned: tuple[dict[str, list[Path]], bool] | None = None

    def weights_of(kind: str, override, argument: str) -> list[Path]:
        nonlocal scanned
        if override is not None:
            return [Path(override).expanduser()]
        if folder is None:
            raise CheckpointError(f"no model folder given: give `{argument}` (or a folder)")
        if names.get(kind):
            listed = names[kind] if isinstance(names[kind], list) else [names[kind]]
            return [folder.file(n, f"{kind} weights") for n in listed]
        if scanned is None:
            scanned = _scan(folder)
        found, sharded = scanned
        if kind == "lm" and sharded:
            return found["lm"]
        what = "Moshi LM weights" if kind == "lm" else "Mimi codec weights"
        return [_one(found[kind], what, folder.path, argument)]

    lm_paths = weights_of("lm", moshi_weights, "moshi_weights") if "lm" in parts else None
    mimi_path = weights_of("mimi", mimi_weights, "mimi_weights")[0] if "mimi" in parts else None
    tok_path = None
    if "tokenizer" not in parts:
        pass
    elif tokenizer is not None:
        tok_path = Path(tokenizer).expanduser()
    elif folder is None:
        raise CheckpointError("no model folder given: give `tokenizer` (or a folder)")
    elif names.get("tokenizer"):
        tok_path = folder.file(names["tokenizer"], "tokenizer")
    else:
        tok_path = _one(
            folder.glob("*.model"), "text tokenizer (*.model)", folder.path, "tokenizer"
        )

    lm_source = mimi_source = None  # where a config dict was read, for error messages
    if lm_config is None and config is not None and (ours or "dim" in config):
        lm_config = _section(config, "lm", config_path) if ours else config
        lm_source = config_path
    if mimi_config is None and ours:
        mimi_config, mimi_source = _section(config, "mimi", config_path), config_path
    elif mimi_config is None and config is not None and config.get("mimi_config_name"):
        mimi_config = folder.file(config["mimi_config_name"], "Mimi config")
    elif mimi_config is None and folder is not None:
        mimi_config = folder.optional(MIMI_CONFIG)
    return ModelFiles(
        lm_weights=lm_paths,
        mimi_weights=mimi_path,
        tokenizer=tok_path,
        lm_config=as_lm_config(lm_config, lm_source, lm_paths or ()),
        mimi_config=as_mimi_config(mimi_config, mimi_source),
        layout=_layout(lm_paths, config) if lm_paths else None,
        folder=folder.path if folder is not None else None,
        config=config,
    )


def model_folder(path_or_repo_id: str | Path, parts: Collection[str] = PARTS) -> Path:
    """A local folder as is, or a Hugging Face repo id downloaded (only the files the
    ``parts`` need) into the usual cache. Raises ``HubError`` with one line when that fails."""
    from . import hub

    folder = hub.local_folder(path_or_repo_id)
    if folder is not None:
        return folder
    repo = str(path_or_repo_id)
    meta = hub.snapshot(repo, ["config.json", "*.safetensors.index.json", MIMI_CONFIG])
    config = read_json(meta / "config.json", "config") if (meta / "config.json").is_file() else {}
    if is_converted(config):
        files = config.get("files", {})
        named = {"lm": files.get("lm") or [], "mimi": [files.get("mimi")],
                 "tokenizer": [files.get("tokenizer")]}  # fmt: skip
    elif all(config.get(k) for k in ("moshi_name", "mimi_name", "tokenizer_name")):
        named = {"lm": [config["moshi_name"]], "mimi": [config["mimi_name"]],
                 "tokenizer": [config["tokenizer_name"]]}  # fmt: skip
    else:  # told apart by their keys once here
        named = {"lm": ["*.safetensors"], "mimi": ["*.safetensors"], "tokenizer": ["*.model"]}
    patterns = ["*.json", "README.md"] + [p for part in parts for p in named[part] if p]
    return hub.snapshot(repo, patterns)


def load_tokenizer(path: str | Path):
    """The SentencePiece text tokenizer (``sentencepiece.SentencePieceProcessor``)."""
    import sentencepiece

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"tokenizer file not found: {path}")
    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        detail = " ".join(str(e).split())
        raise CheckpointError(f"{path} is not a SentencePiece tokenizer model: {detail}") from None


def check_tokenizer(tokenizer, cfg: LmConfig, path: Path) -> None:
    """One ``MoshiWarning`` line for a tokenizer that does not fit the LM: fewer pieces than
    the LM has text ids (those would show as nothing), or another padding id."""
    pieces = tokenizer.get_piece_size()
    if pieces < cfg.text_card:
        warnings.warn(
            f"{path} has {pieces} pieces but the LM writes {cfg.text_card} text ids: it is not "
            "this model's tokenizer, and the text past its pieces will not show",
            MoshiWarning,
            stacklevel=2,
        )
    elif tokenizer.pad_id() != cfg.existing_text_padding_id:
        warnings.warn(
            f"{path} pads with id {tokenizer.pad_id()} but the LM with "
            f"{cfg.existing_text_padding_id}: it is probably not this model's tokenizer",
            MoshiWarning,
            stacklevel=2,
        )


def as_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype | None:
    """``"bfloat16"`` / ``"float16"`` / ``"float32"`` (or an ``mx.Dtype``, or None) -> dtype."""
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise MoshiError(f"`dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _check_stated_quantization(lm: Lm, config: dict, path: Path) -> None:
    """A converted folder's config.json says how its LM is quantized; the tensors must agree."""
    stated = config.get("quantization")
    actual = quantization_of(lm)
    settings = None
    if isinstance(stated, dict):
        settings = (stated.get("bits"), stated.get("group_size"))
    if settings != (None if actual is None else (actual.bits, actual.group_size)):
        said = "float" if stated is None else f"bits {settings[0]}, group_size {settings[1]}"
        raise CheckpointError(
            f"{path}: quantization says {said} but the weights are {actual or 'float'}; the "
            "folder is inconsistent: convert it again"
        )


def fits_memory(
    lm: Lm, cfg: LmConfig, mimi: MimiConfig | bool, quantize: Quantization | None
) -> None:
    """``memory.check_fits`` for a lazily loaded (not yet read) LM."""
    params = dict(tree_flatten(lm.parameters()))
    stored = quantization_of(lm) if quantize is None else None
    dtype = DTYPES[float_dtype(params)]
    check_fits(cfg, dtype, quantize, mimi, weights=param_bytes(lm), stored=stored)


class Model(NamedTuple):
    """What ``load`` returns; a part not asked for is None."""

    lm: Lm | None
    mimi: Mimi | None
    tokenizer: object | None


def load(
    path_or_repo_id: str | Path,
    dtype: str | mx.Dtype | None = None,
    *,
    quantize: Quantization | None = None,
    parts: Collection[str] = PARTS,
    mimi_device: mx.Device | None = None,
    lazy: bool = False,
    progress: Callable[[int, int], None] | None = None,
    check_memory: bool = True,
) -> Model:
    """Everything needed to run Moshi from one name: ``(lm, mimi, tokenizer)``.

    ``path_or_repo_id``: a folder written by ``moshi-mlx convert``, one of Kyutai's MLX repos
    (``kyutai/moshiko-mlx-q4`` / ``-q8`` / ``-bf16``, ``moshika-*``), a PyTorch release
    (``kyutai/moshiko-pytorch-bf16``), as a local folder or a Hugging Face repo id. Quantized
    models reload with their own bits and group size. ``dtype``: None keeps the stored dtype
    (bf16 for Kyutai's repos); otherwise unquantized weights are cast to it. ``quantize``
    quantizes a float model while loading (its float copy never exists whole). ``parts``:
    which of ``"lm"``, ``"mimi"``, ``"tokenizer"`` to load (others are None, and their files
    are neither downloaded nor read). Mimi is float32, set to the number of codebooks the LM
    uses, its kernels chosen for ``mimi_device``; the tokenizer is a
    ``sentencepiece.SentencePieceProcessor``. Weights are read now, one layer at a time
    (``progress(done, total)``), unless ``lazy``. Before any weight is read, ``check_memory``
    makes sure the LM, its full-context KV cache and Mimi fit the memory the device can use
    (``memory.check_fits``: a one-line ``MoshiError`` naming a quantization that would fit;
    configs that cannot fit in any form are refused before anything is built).
    """
    files = find_model_files(model_folder(path_or_repo_id, parts), parts=parts)
    if check_memory:  # at once, before building anything
        check_config_fits(files.lm_config if files.lm_weights is not None else None,
                          files.mimi_config if files.mimi_weights is not None else None,
                          f"the config of {path_or_repo_id}")  # fmt: skip
    lm = mimi = tokenizer = None
    if files.tokenizer is not None:
        tokenizer = load_tokenizer(files.tokenizer)
        check_tokenizer(tokenizer, files.lm_config, files.tokenizer)
    if files.lm_weights is not None:
        lm = load_lm(files.lm_weights, files.lm_config, dtype=as_dtype(dtype), quantize=quantize)
        if quantize is None and is_converted(files.config):
            _check_stated_quantization(lm, files.config, files.folder / "config.json")
        if check_memory:
            mimi_config = files.mimi_config if files.mimi_weights is not None else False
            fits_memory(lm, files.lm_config, mimi_config, quantize)
        if not lazy:
            materialize(lm, progress)
    if files.mimi_weights is not None:
        mimi = load_mimi(files.mimi_weights, files.mimi_config, mimi_device)
        mimi.set_num_codebooks(min(files.lm_config.mimi_codebooks, mimi.cfg.n_q))
        if not lazy:
            materialize(mimi)
    return Model(lm, mimi, tokenizer)
