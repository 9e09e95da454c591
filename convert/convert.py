"""Convert Kyutai's checkpoints into a self-contained MLX model folder, optionally quantized.

Inputs: Kyutai's PyTorch release (``kyutai/moshiko-pytorch-bf16``), Kyutai's MLX repos
(``kyutai/moshiko-mlx-*``), a fine-tune of either, or single files. The output folder holds
``config.json`` (LM and Mimi configs, quantization, dtype, file names), the LM weights in our
parameter names (sharded like mlx-lm when large), Mimi in float32, the text tokenizer and a
model card; ``moshi_mlx.load(folder)`` rebuilds everything from it with no other argument.

Nothing is held in memory whole: weights are read lazily, renamed, cast and quantized as graph
nodes, then evaluated and written one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from moshi_mlx.errors import MoshiError, MoshiWarning
from moshi_mlx.lm import Lm, LmConfig
from moshi_mlx.loading import (
    FORMAT,
    ModelFiles,
    as_dtype,
    check_tokenizer,
    find_model_files,
    load_lm,
    load_mimi,
    load_tokenizer,
    model_folder,
    wrong_checkpoint,
)
from moshi_mlx.memory import max_rss_bytes
from moshi_mlx.mimi import Mimi, MimiConfig
from moshi_mlx.quantize import Quantization, QuantizeReport, quantize_report
from moshi_mlx.random_weights import (
    describe_size,
    random_lm,
    random_mimi,
    sized_config,
    train_tokenizer,
)
from moshi_mlx.weights import (
    CheckpointError,
    check_weight,
    checkpoint_kind,
    float_dtype,
    read_safetensors,
)

from .output import (
    INDEX_FILE,
    MIMI_FILE,
    check_destination,
    check_names,
    move_into_place,
    remove_stale,
    temp_folder,
)
from .streaming import plan_shards, shard_names, write_safetensors

TOKENIZER_FILE = "tokenizer.model"  # the small tokenizer of a random folder
Progress = Callable[[str, int, int], None]  # (tensor name, bytes done, bytes in total)


@dataclass
class ConversionResult:
    """What ``convert`` wrote, and what it cost."""

    path: Path
    lm_files: list[str]
    quantization: QuantizeReport | None  # None: the LM is stored in float
    dtype: str
    bytes_written: int = 0
    seconds: float = 0.0
    peak_memory: int = 0  # bytes, mx.get_peak_memory()
    max_rss: int = 0  # bytes, of this process so far


# The pieces a conversion needs: (part, the argument that gives it, what it is)
PIECES = (
    ("lm", "moshi_weights", "Moshi LM weights"),
    ("mimi", "mimi_weights", "Mimi codec weights"),
    ("tokenizer", "tokenizer", "text tokenizer (a SentencePiece .model file)"),
)


def _assumed(config: str, argument: str) -> str:
    return f" ({config}'s config was assumed: give the one that fits with `{argument}`)"


def _inputs(
    hf_path, moshi_weights, mimi_weights, tokenizer, lm_config, mimi_config, dtype, quantize
) -> tuple[ModelFiles, Lm, Mimi]:
    """Find every piece of the model and check that they fit together (lazily: nothing is
    read but headers). Every missing or unfitting piece is named in one ``CheckpointError``,
    each with the argument that supplies it."""
    folder = model_folder(hf_path) if hf_path is not None else None
    given = {"lm": moshi_weights, "mimi": mimi_weights, "tokenizer": tokenizer}
    if folder is None and not any(given.values()):
        raise CheckpointError(
            "give `hf_path` (a repo id or a folder), or all of `moshi_weights`, `mimi_weights` "
            "and `tokenizer`"
        )
    problems: list[str] = []
    found: dict[str, ModelFiles] = {}
    for part, argument, what in PIECES:
        if folder is None and given[part] is None:
            problems.append(f"no {what} given: give `{argument}`")
            continue
        try:
            if part != "tokenizer" and given[part] is not None:
                # Found again later without naming the argument: say it before any work.
                weights = read_safetensors(given[part])
                if checkpoint_kind(weights) != part:
                    raise CheckpointError(wrong_checkpoint(Path(given[part]), weights, part))
            found[part] = find_model_files(
                folder, parts=(part,), lm_config=lm_config, mimi_config=mimi_config,
                **{argument: given[part]},
            )  # fmt: skip
        except MoshiError as e:
            problems.append(f"`{argument}`: {e}" if given[part] is not None else str(e))
    lm = mimi = None
    if "lm" in found:
        files = found["lm"]
        try:
            lm = load_lm(files.lm_weights, files.lm_config, as_dtype(dtype), quantize, lazy=True)
        except MoshiError as e:
            assumed = lm_config is None and files.lm_config == LmConfig.moshi_7b()
            problems.append(f"{e}{_assumed('Moshi 7B', 'lm_config') if assumed else ''}")
    if "mimi" in found:
        files = found["mimi"]
        try:
            mimi = load_mimi(files.mimi_weights, files.mimi_config, lazy=True)
        except MoshiError as e:
            assumed = mimi_config is None and files.mimi_config == MimiConfig()
            problems.append(
                f"{e}{_assumed('the released codec', 'mimi_config') if assumed else ''}"
            )
    if "tokenizer" in found:
        try:
            spm = load_tokenizer(found["tokenizer"].tokenizer)
        except MoshiError as e:
            problems.append(str(e))
        else:
            if lm is not None:  # a warning, not a problem
                check_tokenizer(spm, lm.cfg, found["tokenizer"].tokenizer)
    problems = list(dict.fromkeys(problems))  # a bad config is found once per piece
    if len(problems) == 1:
        raise CheckpointError(problems[0])
    if problems:
        listed = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        raise CheckpointError(f"{len(problems)} pieces are missing or do not fit: {listed}")
    files = dataclasses.replace(found["lm"], mimi_weights=found["mimi"].mimi_weights,
                                mimi_config=found["mimi"].mimi_config,
                                tokenizer=found["tokenizer"].tokenizer)  # fmt: skip
    return files, lm, mimi


def _model_card(name: str, config: dict, origin: str) -> str:
    q = config["quantization"]
    lm = (
        f"{q['bits']}-bit affine quantization, group size {q['group_size']} (linear and "
        f"embedding layers; norms in {config['dtype']})"
        if q
        else f"{config['dtype']}, not quantized"
    )
    front = "---\nlibrary_name: mlx\ntags:\n- mlx\n- moshi\n- speech\n"
    hf_path = config["source"].get("hf_path")
    if hf_path and "/" in hf_path and not Path(hf_path).exists():
        front += f"base_model: {hf_path}\n"
    front += "---\n\n"
    files = config["files"]
    return front + (
        f"# {name}\n\n"
        "[Moshi](https://github.com/kyutai-labs/moshi), Kyutai's full-duplex speech model, "
        "converted to MLX by `moshi-mlx convert`.\n\n"
        f"- Source: {origin}\n"
        f"- LM: {lm}; files {', '.join(f'`{f}`' for f in files['lm'])}\n"
        f"- Mimi codec: float32, `{files['mimi']}`\n"
        f"- Text tokenizer: `{files['tokenizer']}`\n\n"
        "## Use\n\n"
        "```python\n"
        "import moshi_mlx\n\n"
        f'lm, mimi, tokenizer = moshi_mlx.load("{name}")  # this folder (or its repo id)\n'
        "```\n\n"
        "The folder reloads by itself: `config.json` holds both model configs and the "
        "quantization, which is also read back from the tensor shapes.\n"
    )


# mlx-lm's shard size (``mlx_lm.utils.MAX_FILE_SIZE_GB``) and config layout (``save_config``),
# written here: importing mlx_lm.utils imports transformers, seconds for a few lines (see
# docs/startup.md).
MAX_SHARD_GB = 5


def config_json(config: dict) -> str:
    """``config.json`` as mlx-lm's ``save_config`` writes it: keys sorted, indent 4, the
    quantization also under ``quantization_config`` (where Hugging Face tools look)."""
    config = dict(config)
    if "quantization" in config:
        config["quantization_config"] = config["quantization"]
    return json.dumps(dict(sorted(config.items())), indent=4)


def convert(
    hf_path: str | Path | None = None,
    mlx_path: str | Path = "mlx_model",
    *,
    quantize: Quantization | None = None,
    dtype: str | mx.Dtype | None = None,
    moshi_weights: str | Path | None = None,
    mimi_weights: str | Path | None = None,
    tokenizer: str | Path | None = None,
    lm_config: str | Path | dict | None = None,
    mimi_config: str | Path | dict | None = None,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_GB << 30,
    progress: Progress | None = None,
) -> ConversionResult:
    """Write a model folder at ``mlx_path`` that ``moshi_mlx.load`` reloads by itself.

    ``hf_path``: a Hugging Face repo id or a local folder with Kyutai's files (PyTorch release
    or MLX repo; the layout is read from the keys); single files override what it holds.
    Every piece that is missing or does not fit is named in one error.
    ``quantize``: affine quantization of the LM's linear and embedding layers
    (``moshi_mlx.quantize_lm``'s rules: layers whose width the group size does not divide stay
    in float, and are listed in the result). ``dtype``: of the unquantized weights (and
    scales); None keeps the source's. Mimi is always float32. The folder is written next to
    ``mlx_path`` under a temporary name and renamed at the end: a failed conversion leaves
    nothing. An existing ``mlx_path`` is replaced only with ``force`` (and only if it is an
    earlier conversion). ``progress(tensor_name, bytes_done, bytes_total)``.
    """
    start = time.perf_counter()
    mx.reset_peak_memory()
    out = Path(mlx_path).expanduser()
    # Lazy: the tensors are read, cast and quantized only as they are written.
    files, lm, mimi = _inputs(hf_path, moshi_weights, mimi_weights, tokenizer, lm_config,
                              mimi_config, dtype, quantize)  # fmt: skip
    source = {
        "hf_path": str(hf_path) if hf_path is not None else None,
        "moshi_weights": files.lm_weights[0].name if len(files.lm_weights) == 1 else None,
        "mimi_weights": files.mimi_weights.name,
        "tokenizer": files.tokenizer.name,
        "layout": files.layout,
    }
    origin = source.get("hf_path") or source.get("moshi_weights") or "local files"
    origin = f"`{origin}` ({files.layout} layout)"
    return _write_folder(out, lm, mimi, files.tokenizer, source, origin, force,
                         [*files.lm_weights, files.mimi_weights, files.tokenizer],
                         max_shard_bytes, progress, start)  # fmt: skip


def convert_random(
    size: str,
    mlx_path: str | Path,
    *,
    quantize: Quantization | None = None,
    dtype: str | mx.Dtype | None = None,
    seed: int = 0,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_GB << 30,
    progress: Progress | None = None,
) -> ConversionResult:
    """Write at ``mlx_path`` a model folder of random weights of a named size
    (``moshi_mlx.random_weights.SIZES``: ``tiny`` or ``medium``) with a small tokenizer of its
    own, as ``convert`` writes a real model: it loads and runs like one, with nothing to
    download. The same ``seed`` writes the same weights. ``dtype``: of the LM (bfloat16 by
    default); ``quantize``, ``force`` and ``progress`` as for ``convert``."""
    start = time.perf_counter()
    mx.reset_peak_memory()
    out = Path(mlx_path).expanduser()
    lm_cfg, mimi_cfg = sized_config(size)
    check_destination(out, force, [])  # before the work, not only at the end
    lm = random_lm(lm_cfg, as_dtype(dtype) or mx.bfloat16, quantize, seed)
    mimi = random_mimi(mimi_cfg, seed)
    source = {"random": size, "seed": seed, "layout": FORMAT}
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = train_tokenizer(Path(scratch) / TOKENIZER_FILE, lm_cfg.text_card)
        origin = f"random weights, size `{size}` ({describe_size(size)}), seed {seed}"
        return _write_folder(out, lm, mimi, tokenizer, source, origin, force, [],
                             max_shard_bytes, progress, start)  # fmt: skip


def _write_folder(
    out: Path,
    lm_model: Lm,
    mimi_model: Mimi,
    tokenizer: Path,
    source: dict,
    origin: str,
    force: bool,
    inputs: list[Path],
    max_shard_bytes: int,
    progress: Progress | None,
    start: float,
) -> ConversionResult:
    """Write the models, the tokenizer, config.json and a model card into a temporary folder
    beside ``out``, then move it into place (see ``convert``)."""
    check_destination(out, force, inputs)
    for path in remove_stale(out):
        message = f"removed {path}, left behind by a conversion that was killed"
        warnings.warn(message, MoshiWarning, stacklevel=3)
    report = quantize_report(lm_model)
    lm_cfg = lm_model.cfg  # without the extra heads a checkpoint may lack
    lm = dict(tree_flatten(lm_model.parameters()))
    mimi = dict(tree_flatten(mimi_model.parameters()))
    stored_dtype = float_dtype(lm)

    sizes = {k: a.nbytes for k, a in lm.items()}
    shards = plan_shards(sizes, max_shard_bytes)
    names = shard_names(len(shards))
    check_names(names, tokenizer)
    total = sum(sizes.values()) + sum(a.nbytes for a in mimi.values())
    done = 0

    def tick(name: str, nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(name, done, total)

    quant_entry = None
    if report is not None:
        # mlx-lm's convention: per-layer exceptions as ``path: false``.
        quant_entry = {**report.settings.as_dict(), **dict.fromkeys(report.kept, False)}
    config = {
        "format": FORMAT,
        "model_type": lm_cfg.model_type,
        "lm": lm_cfg.to_dict(),
        "mimi": mimi_model.cfg.to_dict(),
        "quantization": quant_entry,
        "dtype": stored_dtype,
        "files": {"lm": names, "mimi": MIMI_FILE, "tokenizer": tokenizer.name},
        "source": source,
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder(out)
    try:
        weight_map = {}
        for shard, file_name in zip(shards, names, strict=True):
            part = {k: lm.pop(k) for k in shard}
            write_safetensors(tmp.add(file_name), part, {"format": "mlx"}, tick, check_weight)
            weight_map.update(dict.fromkeys(shard, file_name))
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": dict(sorted(weight_map.items())),
        }
        tmp.add(INDEX_FILE).write_text(json.dumps(index, indent=4))
        write_safetensors(tmp.add(MIMI_FILE), mimi, {"format": "mlx"}, tick, check_weight)
        shutil.copyfile(tokenizer, tmp.add(tokenizer.name))
        tmp.add("config.json").write_text(config_json(config))
        tmp.add("README.md").write_text(_model_card(out.name, config, origin))
        move_into_place(tmp, out, force, inputs)
    except OSError as e:  # a full disk, a quota, a folder that went away: nothing is left
        raise CheckpointError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        tmp.close()  # whatever is left of it (all of it, unless it was moved into place)
    return ConversionResult(
        path=out,
        lm_files=names,
        quantization=report,
        dtype=stored_dtype,
        bytes_written=total,
        seconds=time.perf_counter() - start,
        peak_memory=mx.get_peak_memory(),
        max_rss=max_rss_bytes(),
    )
