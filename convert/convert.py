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

import json
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import MAX_FILE_SIZE_GB, save_config

from moshi_mlx.errors import MoshiWarning
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
from moshi_mlx.quantize import Quantization, QuantizeReport, quantize_report
from moshi_mlx.weights import (
    CheckpointError,
    check_finite,
    checkpoint_kind,
    float_dtype,
    read_safetensors,
)

from .output import (
    INDEX_FILE,
    MIMI_FILE,
    check_destination,
    move_into_place,
    remove_stale,
    temp_folder,
)
from .streaming import plan_shards, shard_names, write_safetensors

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


def _input_files(
    hf_path, moshi_weights, mimi_weights, tokenizer, lm_config, mimi_config
) -> ModelFiles:
    folder = model_folder(hf_path) if hf_path is not None else None
    if folder is None and None in (moshi_weights, mimi_weights, tokenizer):
        raise CheckpointError(
            "give `hf_path` (a repo id or a folder), or all of `moshi_weights`, `mimi_weights` "
            "and `tokenizer`"
        )
    for path, argument, kind in ((moshi_weights, "moshi_weights", "lm"),
                                 (mimi_weights, "mimi_weights", "mimi")):  # fmt: skip
        if path is not None:
            # Found again later without naming the argument: say it before any work.
            weights = read_safetensors(path)
            if checkpoint_kind(weights) != kind:
                raise CheckpointError(
                    f"`{argument}`: {wrong_checkpoint(Path(path), weights, kind)}"
                )
    return find_model_files(
        folder,
        moshi_weights=moshi_weights,
        mimi_weights=mimi_weights,
        tokenizer=tokenizer,
        lm_config=lm_config,
        mimi_config=mimi_config,
    )


def _model_card(name: str, config: dict, source: dict) -> str:
    q = config["quantization"]
    lm = (
        f"{q['bits']}-bit affine quantization, group size {q['group_size']} (linear and "
        f"embedding layers; norms in {config['dtype']})"
        if q
        else f"{config['dtype']}, not quantized"
    )
    origin = source.get("hf_path") or source.get("moshi_weights") or "local files"
    front = "---\nlibrary_name: mlx\ntags:\n- mlx\n- moshi\n- speech\n"
    if source.get("hf_path") and "/" in origin and not Path(origin).exists():
        front += f"base_model: {origin}\n"
    front += "---\n\n"
    files = config["files"]
    return front + (
        f"# {name}\n\n"
        "[Moshi](https://github.com/kyutai-labs/moshi), Kyutai's full-duplex speech model, "
        "converted to MLX by `moshi-mlx convert`.\n\n"
        f"- Source: `{origin}` ({source['layout']} layout)\n"
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
    max_shard_bytes: int = MAX_FILE_SIZE_GB << 30,
    progress: Progress | None = None,
) -> ConversionResult:
    """Write a model folder at ``mlx_path`` that ``moshi_mlx.load`` reloads by itself.

    ``hf_path``: a Hugging Face repo id or a local folder with Kyutai's files (PyTorch release
    or MLX repo; the layout is read from the keys); single files override what it holds.
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
    files = _input_files(hf_path, moshi_weights, mimi_weights, tokenizer, lm_config, mimi_config)
    inputs = [*files.lm_weights, files.mimi_weights, files.tokenizer]
    check_destination(out, force, inputs)
    for path in remove_stale(out):
        message = f"removed {path}, left behind by a conversion that was killed"
        warnings.warn(message, MoshiWarning, stacklevel=2)
    # fail now on a bad tokenizer, not after the LM
    check_tokenizer(load_tokenizer(files.tokenizer), files.lm_config, files.tokenizer)
    # Lazy: the tensors are read, cast and quantized only as they are written.
    lm_model = load_lm(files.lm_weights, files.lm_config, as_dtype(dtype), quantize)
    report = quantize_report(lm_model)
    lm_cfg = lm_model.cfg  # without the extra heads a checkpoint may lack
    lm = dict(tree_flatten(lm_model.parameters()))
    mimi = dict(tree_flatten(load_mimi(files.mimi_weights, files.mimi_config).parameters()))
    del lm_model
    stored_dtype = float_dtype(lm)

    sizes = {k: a.nbytes for k, a in lm.items()}
    shards = plan_shards(sizes, max_shard_bytes)
    names = shard_names(len(shards))
    total = sum(sizes.values()) + sum(a.nbytes for a in mimi.values())
    done = 0

    def tick(name: str, nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(name, done, total)

    source = {
        "hf_path": str(hf_path) if hf_path is not None else None,
        "moshi_weights": files.lm_weights[0].name if len(files.lm_weights) == 1 else None,
        "mimi_weights": files.mimi_weights.name,
        "tokenizer": files.tokenizer.name,
        "layout": files.layout,
    }
    quant_entry = None
    if report is not None:
        # mlx-lm's convention: per-layer exceptions as ``path: false``.
        quant_entry = {**report.settings.as_dict(), **dict.fromkeys(report.kept, False)}
    config = {
        "format": FORMAT,
        "model_type": files.lm_config.model_type,
        "lm": lm_cfg.to_dict(),
        "mimi": files.mimi_config.to_dict(),
        "quantization": quant_entry,
        "dtype": stored_dtype,
        "files": {"lm": names, "mimi": MIMI_FILE, "tokenizer": files.tokenizer.name},
        "source": source,
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder(out, "converting")
    try:
        weight_map = {}
        for shard, file_name in zip(shards, names, strict=True):
            part = {k: lm.pop(k) for k in shard}
            write_safetensors(tmp / file_name, part, {"format": "mlx"}, tick, check_finite)
            weight_map.update(dict.fromkeys(shard, file_name))
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=4))
        write_safetensors(tmp / MIMI_FILE, mimi, {"format": "mlx"}, tick, check_finite)
        shutil.copyfile(files.tokenizer, tmp / files.tokenizer.name)
        save_config(dict(config), tmp / "config.json")
        (tmp / "README.md").write_text(_model_card(out.name, config, source))
        move_into_place(tmp, out, force, inputs)
    except OSError as e:  # a full disk, a quota, a folder that went away: nothing is left
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
