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
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import MAX_FILE_SIZE_GB, save_config

from moshi_mlx.lm import Lm
from moshi_mlx.loading import (
    FORMAT,
    ModelFiles,
    as_dtype,
    find_model_files,
    is_converted,
    lm_config_hint,
    load_tokenizer,
    model_folder,
    read_lm_weights,
    wrong_checkpoint,
)
from moshi_mlx.mimi import Mimi
from moshi_mlx.weights import (
    DEFAULT_GROUP_SIZE,
    CheckpointError,
    checkpoint_kind,
    load_into,
    mimi_rules,
    quantize_like,
    quantize_lm,
    read_safetensors,
    sanitize,
)

from .streaming import plan_shards, shard_names, write_safetensors

MIMI_FILE = "mimi.safetensors"
INDEX_FILE = "model.safetensors.index.json"
Progress = Callable[[str, int, int], None]  # (tensor name, bytes done, bytes in total)


@dataclass
class ConversionResult:
    """What ``convert`` wrote, and what it cost."""

    path: Path
    lm_files: list[str]
    quantization: dict | None
    dtype: str
    skipped: list[str] = field(default_factory=list)  # layers kept in float (skip_indivisible)
    bytes_written: int = 0
    seconds: float = 0.0
    peak_memory: int = 0  # bytes, mx.get_peak_memory()
    max_rss: int = 0  # bytes, of this process so far


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]


def _max_rss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS: bytes, Linux: KiB


def _check_output(out: Path, force: bool, inputs: list[Path]) -> None:
    """Refuse to overwrite anything but a previous conversion, and never a folder holding
    the inputs."""
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder")
    resolved = out.resolve()
    for path in inputs:
        if path.resolve().is_relative_to(resolved):
            raise CheckpointError(
                f"{out} holds the input file {path.name}; pick another --mlx-path"
            )
    if not force:
        raise CheckpointError(f"{out} already exists; pass --force to replace it")
    config = out / "config.json"
    ours = config.is_file() and is_converted(_try_json(config))
    if not ours and any(out.iterdir()):
        raise CheckpointError(
            f"{out} exists and is not a moshi-mlx model folder; refusing to replace it even "
            "with --force"
        )


def _try_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _input_files(
    hf_path, moshi_weights, mimi_weights, tokenizer, lm_config, mimi_config
) -> ModelFiles:
    folder = model_folder(hf_path) if hf_path is not None else None
    if folder is None and None in (moshi_weights, mimi_weights, tokenizer):
        raise CheckpointError(
            "give --hf-path (a repo id or a folder), or all of --moshi-weights, --mimi-weights "
            "and --tokenizer"
        )
    for path, flag, kind in ((moshi_weights, "--moshi-weights", "lm"),
                             (mimi_weights, "--mimi-weights", "mimi")):  # fmt: skip
        if path is not None and checkpoint_kind(read_safetensors(path)) != kind:
            # Said again later without the flag; say it before any work.
            weights = read_safetensors(path)
            raise CheckpointError(f"{flag}: {wrong_checkpoint(Path(path), weights, kind)}")
    return find_model_files(
        folder,
        moshi_weights=moshi_weights,
        mimi_weights=mimi_weights,
        tokenizer=tokenizer,
        lm_config=lm_config,
        mimi_config=mimi_config,
    )


def _lm_tensors(
    files: ModelFiles,
    dtype: mx.Dtype | None,
    quantize: bool,
    bits: int,
    group_size: int,
    skip_indivisible: bool,
) -> tuple[dict[str, mx.array], dict | None, list[str]]:
    """The LM's output tensors, lazily, in module order; checks keys and shapes first."""
    model = Lm(files.lm_config)
    params, source = read_lm_weights(files.lm_weights, files.lm_config)
    stored = quantize_like(model, params)
    load_into(model, params, source, as_dtype=dtype, hint=lm_config_hint)
    del params
    skipped: list[str] = []
    if quantize:
        if stored is not None:
            raise CheckpointError(
                f"{source} is already quantized ({stored['bits']}-bit, group size "
                f"{stored['group_size']}); convert it without -q, or quantize from a float "
                "checkpoint (e.g. kyutai/moshiko-mlx-bf16 or kyutai/moshiko-pytorch-bf16)"
            )
        skipped = quantize_lm(model, bits, group_size, skip_indivisible)
        stored = {"group_size": group_size, "bits": bits}
    tensors = dict(tree_flatten(model.parameters()))
    return tensors, stored, skipped


def _mimi_tensors(files: ModelFiles) -> dict[str, mx.array]:
    model = Mimi(files.mimi_config)
    raw = read_safetensors(files.mimi_weights)
    if checkpoint_kind(raw) != "mimi":
        raise CheckpointError(wrong_checkpoint(files.mimi_weights, raw, "mimi"))
    params = sanitize(raw, mimi_rules(len(files.mimi_config.seanet.ratios)))
    del raw
    load_into(model, params, str(files.mimi_weights), as_dtype=mx.float32)
    return dict(tree_flatten(model.parameters()))


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
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int | None = None,
    dtype: str | mx.Dtype | None = None,
    moshi_weights: str | Path | None = None,
    mimi_weights: str | Path | None = None,
    tokenizer: str | Path | None = None,
    lm_config: str | Path | dict | None = None,
    mimi_config: str | Path | dict | None = None,
    force: bool = False,
    skip_indivisible: bool = False,
    max_shard_bytes: int = MAX_FILE_SIZE_GB << 30,
    progress: Progress | None = None,
) -> ConversionResult:
    """Write a model folder at ``mlx_path`` that ``moshi_mlx.load`` reloads by itself.

    ``hf_path``: a Hugging Face repo id or a local folder with Kyutai's files (PyTorch release
    or MLX repo; the layout is read from the keys); single files override what it holds.
    ``quantize``: ``q_bits`` (4 or 8) affine quantization of the LM's linear and embedding
    layers with ``q_group_size`` inputs per scale (default 32 for 4-bit, 64 for 8-bit).
    ``dtype``: of the unquantized weights (and scales); None keeps the source's. Mimi is
    always float32. ``skip_indivisible`` keeps in float the layers whose width the group size
    does not divide (otherwise an error). The folder is written next to ``mlx_path`` under a
    temporary name and renamed at the end: a failed conversion leaves nothing. An existing
    ``mlx_path`` is replaced only with ``force`` (and only if it is an earlier conversion).
    """
    start = time.perf_counter()
    mx.reset_peak_memory()
    if quantize and q_bits not in DEFAULT_GROUP_SIZE:
        raise ValueError(f"--q-bits must be 4 or 8, got {q_bits}")
    group_size = q_group_size or DEFAULT_GROUP_SIZE.get(q_bits, 64)
    target_dtype = as_dtype(dtype)
    out = Path(mlx_path).expanduser()

    files = _input_files(hf_path, moshi_weights, mimi_weights, tokenizer, lm_config, mimi_config)
    inputs = [*files.lm_weights, files.mimi_weights, files.tokenizer]
    _check_output(out, force, inputs)
    load_tokenizer(files.tokenizer)  # fail now on a bad tokenizer, not after the LM
    lm, quantization, skipped = _lm_tensors(
        files, target_dtype, quantize, q_bits, group_size, skip_indivisible
    )
    mimi = _mimi_tensors(files)
    floats = Counter(
        a.dtype for k, a in lm.items() if mx.issubdtype(a.dtype, mx.floating) and "scales" not in k
    )
    stored_dtype = _dtype_name(floats.most_common(1)[0][0])

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
    if quantization is not None:
        # mlx-lm's convention: per-layer exceptions as ``path: false``.
        quant_entry = {**quantization, **{path: False for path in skipped}}
    config = {
        "format": FORMAT,
        "model_type": "moshi",
        "lm": files.lm_config.to_dict(),
        "mimi": files.mimi_config.to_dict(),
        "quantization": quant_entry,
        "dtype": stored_dtype,
        "files": {"lm": names, "mimi": MIMI_FILE, "tokenizer": files.tokenizer.name},
        "source": source,
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the model folder need not be
        weight_map = {}
        for shard, file_name in zip(shards, names, strict=True):
            part = {k: lm.pop(k) for k in shard}
            write_safetensors(tmp / file_name, part, {"format": "mlx"}, tick)
            weight_map.update(dict.fromkeys(shard, file_name))
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=4))
        write_safetensors(tmp / MIMI_FILE, mimi, {"format": "mlx"}, tick)
        shutil.copyfile(files.tokenizer, tmp / files.tokenizer.name)
        save_config(dict(config), tmp / "config.json")
        (tmp / "README.md").write_text(_model_card(out.name, config, source))
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConversionResult(
        path=out,
        lm_files=names,
        quantization=quantization,
        dtype=stored_dtype,
        skipped=skipped,
        bytes_written=total,
        seconds=time.perf_counter() - start,
        peak_memory=mx.get_peak_memory(),
        max_rss=_max_rss(),
    )


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an earlier conversion is removed only after."""
    if not out.exists():
        tmp.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
