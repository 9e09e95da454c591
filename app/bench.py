"""``moshi-mlx bench``: time one full-duplex frame, stage by stage.

A frame is 80 ms of audio: Mimi ``encode_step`` of the user's 1920 samples, the temporal
transformer (+ text sampling), the depth transformer over Moshi's ``dep_q`` codebooks (+ audio
sampling), and Mimi ``decode_step`` of Moshi's codes. Every measurement replays the same
positions (``--warmup`` untimed frames, then ``--steps`` timed ones) from a fresh stream, in
passes: ``stages`` (a sync after each stage, for the split), ``lm`` (``LmGen.step`` and the
copy of its tokens to the host), ``frame`` (the duplex engine the chat runs, ``--engine``) and
``full_context`` (peak memory with the LM's KV window full); see ``moshi_mlx.benchmark``.
It prints a summary for people (``summary``); ``--json`` and ``--kv`` give every figure.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

from moshi_mlx.outputs import append_output

from .options import (
    DTYPES,
    add_engine_arguments,
    add_quantization_arguments,
    add_sampling_arguments,
    input_file,
)

HELP = "time the frame step (Mimi, temporal and depth transformers) on a model or random weights"
PRESETS = {"moshiko-7b": "moshi_7b", "moshika-7b": "moshi_7b", "moshi-2b": "moshi_2b",
           "stt-1b": "stt_1b", "stt-2.6b": "stt_2_6b"}  # fmt: skip
STT_BATCHES = "1,8,32"  # batch sizes timed for a speech-to-text model unless --batch says
SCALE_FLAGS = ("dim", "layers", "heads", "dep_dim", "dep_layers", "dep_heads", "context",
               "text_card")  # fmt: skip
SIZES = ("tiny", "medium")  # moshi_mlx.random_weights.SIZES: every part scaled
DEFAULT_SEED = 299792458


def add_arguments(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model")
    model.add_argument("--hf-path", help="model folder or Hugging Face repo id")
    model.add_argument(
        "--random-weights", action="store_true", help="random weights of --config (no download)"
    )
    model.add_argument(
        "--config",
        help="with --random-weights: moshiko-7b (default), moshi-2b, stt-1b, stt-2.6b or an LM "
        "JSON",
    )
    model.add_argument(
        "--mimi-weights", type=input_file, help="Mimi safetensors (PyTorch or converted layout)"
    )
    model.add_argument(
        "--mimi-config", type=input_file, help="Mimi config JSON for random or given Mimi weights"
    )
    model.add_argument("--no-mimi", action="store_true", help="time the LM only")
    model.add_argument("--no-lm", action="store_true", help="time Mimi only")
    model.add_argument("--num-codebooks", type=int, default=8, help="Mimi codebooks, --no-lm")
    model.add_argument("--dtype", choices=DTYPES, help="LM dtype (random weights: bfloat16)")
    add_quantization_arguments(model)

    scale = p.add_argument_group("scale-down of --config (FFN hidden 11/4 of the width)")
    scale.add_argument("--dim", type=int, help="temporal width (heads default dim/128)")
    scale.add_argument("--layers", type=int, help="temporal layers")
    scale.add_argument("--heads", type=int, help="temporal heads")
    scale.add_argument("--dep-dim", type=int, help="depth transformer width (heads default /64)")
    scale.add_argument("--dep-layers", type=int, help="depth transformer layers")
    scale.add_argument("--dep-heads", type=int, help="depth transformer heads")
    scale.add_argument("--context", type=int, help="temporal attention window (steps)")
    scale.add_argument("--text-card", type=int, help="text vocabulary size")

    run = p.add_argument_group("run")
    run.add_argument("--steps", type=int, default=50, help="timed frames (default 50)")
    run.add_argument("--warmup", type=int, default=5, help="untimed frames first (default 5)")
    run.add_argument("--no-stages", action="store_true", help="skip the pass synced per stage")
    run.add_argument(
        "--batch",
        help=f"speech-to-text models: batch sizes of independent streams to time, comma-"
        f"separated (default {STT_BATCHES}; 0 skips)",
    )
    add_engine_arguments(run)
    add_sampling_arguments(p)  # --seed: weights, inputs and sampling (default 299792458)

    out = p.add_argument_group("output")
    out.add_argument(
        "--json", action="store_true", help="every figure as one JSON object on stdout"
    )
    out.add_argument(
        "--kv", action="store_true", help="every figure as key=value lines (for grep and awk)"
    )
    out.add_argument("--json-out", help="append the JSON object as a line to this file")
    out.add_argument("--label", help="free text stored in the result (e.g. a git revision)")


def check_args(args) -> None:
    from moshi_mlx.errors import MoshiError

    if args.json and args.kv:
        raise MoshiError("give --json or --kv, not both")
    if args.no_lm and args.no_mimi:
        raise MoshiError("--no-lm and --no-mimi leave nothing to time")
    if args.hf_path is not None and args.random_weights:
        raise MoshiError("give either --hf-path or --random-weights, not both")
    if args.config and not args.random_weights:
        raise MoshiError("--config needs --random-weights (a converted model has its own config)")
    scaled = [f for f in SCALE_FLAGS if getattr(args, f) is not None]
    if scaled and not args.random_weights:
        flag = "--" + scaled[0].replace("_", "-")
        raise MoshiError(
            f"{flag} scales a --random-weights config; a converted model keeps its own"
        )
    if args.hf_path is None and not args.random_weights and not (args.no_lm and args.mimi_weights):
        raise MoshiError("no model: pass --hf-path PATH_OR_REPO, or --random-weights [--config]")
    if args.steps < 1 or args.warmup < 0:
        raise MoshiError("--steps must be at least 1 and --warmup at least 0")
    if args.json_out and Path(args.json_out).is_dir():
        raise MoshiError(f"--json-out {args.json_out} is a folder; give a file name")
    if args.json_out:
        append_output(args.json_out, check_only=True, what="--json-out", models=[args.hf_path])


def lm_config_from_args(args):
    """The LM config of ``--config`` (preset name, size or upstream JSON) with the scale-down
    flags (``moshi_mlx.random_weights.scale_lm_config``: each flag scales what it names)."""
    from moshi_mlx import LmConfig
    from moshi_mlx.errors import MoshiError
    from moshi_mlx.loading import read_json
    from moshi_mlx.random_weights import scale_lm_config, sized_config

    name = args.config or "moshiko-7b"
    if name in PRESETS:
        cfg = getattr(LmConfig, PRESETS[name])()
    elif name in SIZES:
        cfg = sized_config(name)[0]
    elif name.endswith(".json") or Path(name).exists():
        cfg = LmConfig.from_dict(read_json(name, "LM config"))
    else:
        raise MoshiError(
            f"unknown config {name!r}: use {', '.join((*PRESETS, *SIZES))} or an LM JSON file"
        )
    given = {flag: getattr(args, flag) for flag in SCALE_FLAGS if getattr(args, flag) is not None}
    return scale_lm_config(cfg, **given)


def kept_parts(args, cfg, mimi_cfg) -> list[str]:
    """The parts of a scaled-down random model kept at the size of ``--config`` (none when
    nothing is scaled): what makes a "256-wide" run slower and bigger than its width says."""
    scaled = {f for f in SCALE_FLAGS if getattr(args, f) is not None}
    if not scaled and args.config not in SIZES:
        return []
    kept = []
    if not scaled & {"dim", "layers", "heads"} and args.config not in SIZES:
        kept.append(f"temporal transformer ({cfg.dim} wide, {cfg.num_layers} layers)")
    if not scaled & {"dep_dim", "dep_layers", "dep_heads"} and args.config not in SIZES:
        kept.append(f"depth transformer ({cfg.depformer_dim} wide, {cfg.depformer_num_layers} "
                    f"layers, {cfg.dep_q} steps)")  # fmt: skip
    if "text_card" not in scaled:
        kept.append(f"text vocabulary ({cfg.text_card})")
    if "context" not in scaled:
        kept.append(f"context ({cfg.context} steps)")
    if not args.no_mimi and not args.mimi_weights and mimi_cfg is None:
        kept.append("Mimi (the released codec)")
    return kept


def build_models(args, progress) -> dict:
    """The models to time and a description of them."""
    import mlx.core as mx

    import moshi_mlx
    from moshi_mlx.engine import mimi_device
    from moshi_mlx.errors import MoshiWarning
    from moshi_mlx.loading import as_dtype, as_mimi_config
    from moshi_mlx.memory import check_fits
    from moshi_mlx.random_weights import sized_config

    from .options import load_model, quantization_from_args

    quantization = quantization_from_args(args)
    mimi_cfg = as_mimi_config(args.mimi_config) if args.mimi_config else None
    if mimi_cfg is None and args.config in SIZES:
        mimi_cfg = sized_config(args.config)[1]
    device = mimi_device(args.mimi_device)
    lm = mimi = None
    info = {"model": None, "mimi": None, "kept_full_size": None}
    if args.hf_path is not None:
        parts = [p for p, skip in (("lm", args.no_lm), ("mimi", args.no_mimi or args.mimi_weights))
                 if not skip]  # fmt: skip
        lm, mimi, _ = load_model(args, lambda _: None, parts, progress.task("load model"), None)
        info["model"] = args.hf_path
        info["mimi"] = f"{args.hf_path} (Mimi)" if mimi is not None else None
    elif not args.no_lm:
        cfg = lm_config_from_args(args)
        name = args.config or "moshiko-7b"
        info["model"] = f"random weights, config {name}"
        info["kept_full_size"] = kept_parts(args, cfg, mimi_cfg)
        dtype = as_dtype(args.dtype or "bfloat16")
        check_fits(cfg, dtype, quantization, False if args.no_mimi else mimi_cfg)
        heavy = [p for p in info["kept_full_size"] if not p.startswith("context")]
        if heavy and args.config not in SIZES:  # the context costs memory only, no compute
            warnings.warn(
                f"the scaled {name} keeps at full size: {'; '.join(heavy)} "
                "(scale them too with --dep-dim, --dep-layers, --text-card, --context and "
                "--mimi-config, or use --config tiny or medium)",
                MoshiWarning,
                stacklevel=1,
            )
        lm = moshi_mlx.random_lm(cfg, dtype, quantization, args.seed, progress.task("build LM"))
    if args.mimi_weights and not args.no_mimi:
        mimi = moshi_mlx.load_mimi(args.mimi_weights, mimi_cfg, device)
        info["mimi"] = args.mimi_weights
    elif mimi is None and not args.no_mimi:
        mimi = moshi_mlx.random_mimi(mimi_cfg, args.seed, device)
        named = args.mimi_config or (args.config if args.config in SIZES else None)
        info["mimi"] = "random weights" + (f", config {named}" if named else "")
    if mimi is not None:
        mimi.set_num_codebooks(lm.cfg.mimi_codebooks if lm is not None else args.num_codebooks)
        mx.eval(mimi.parameters())
    return {"lm": lm, "mimi": mimi, "info": info}


def run_passes(models: dict, args, sampling, progress) -> dict:
    from moshi_mlx.benchmark import PASSES, time_frames, time_mimi

    lm, mimi = models["lm"], models["mimi"]
    if lm is None:
        return {
            "stages": time_mimi(
                mimi, args.steps, args.warmup, sampling.seed, progress.task("mimi pass")
            )
        }
    passes = [p for p in PASSES if p != "stages" or not args.no_stages]
    timed = time_frames(lm, mimi, sampling, args.steps, args.warmup, passes,
                        lambda name: progress.task(f"{name} pass"), args.engine)  # fmt: skip
    sizes = batch_sizes(args.batch, lm.cfg.is_stt)
    if sizes:
        from moshi_mlx.benchmark import time_batches

        models["batches"] = time_batches(lm, mimi, sampling, sizes, args.steps, args.warmup,
                                         args.engine, lambda name: progress.task(name))  # fmt: skip
    return timed


def batch_sizes(text: str | None, stt: bool) -> list[int]:
    from moshi_mlx.errors import MoshiError

    text = text if text is not None else (STT_BATCHES if stt else "0")
    try:
        sizes = [int(t) for t in text.split(",")]
    except ValueError:
        raise MoshiError(f"--batch takes sizes like {STT_BATCHES}, got {text!r}") from None
    if sizes == [0]:
        return []
    if not stt:
        raise MoshiError("--batch times speech-to-text models; this is a dialogue model")
    if not all(1 <= n <= 1024 for n in sizes):
        raise MoshiError(f"--batch sizes must be in [1, 1024], got {text!r}")
    return sizes


def report(models: dict, passes: dict, args, sampling, build: dict) -> dict:
    """The result object (``--json``); the ``key=value`` lines are its flattening."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from moshi_mlx.benchmark import timing_report
    from moshi_mlx.memory import param_bytes
    from moshi_mlx.quantize import quantization_of
    from moshi_mlx.weights import float_dtype

    lm, mimi = models["lm"], models["mimi"]
    r = timing_report(passes, args.engine if lm is not None and mimi is not None else None)
    r["mimi_device"] = mimi.device.type.name if mimi is not None else None
    r["build_peak_memory_gb"] = round(build["peak"] / 1e9, 4)
    for name, model in (("lm", lm), ("mimi", mimi)):
        r[f"{name}_params_gb"] = round(param_bytes(model) / 1e9, 4) if model else None
    r["build_s"] = round(build["seconds"], 2)
    r["steps"], r["warmup"], r["seed"] = args.steps, args.warmup, sampling.seed
    r["device"] = mx.default_device().type.name
    r["device_info"] = {k: v for k, v in mx.device_info().items()}
    r["mlx_version"] = mx.__version__
    r.update(models["info"])
    if lm is not None:
        r["dtype"] = float_dtype(dict(tree_flatten(lm.parameters())))
        q = quantization_of(lm)
        r["quant"] = q.as_dict() if q else None
        r["sampler"] = args.sampler
        r["sampling"] = sampling.as_dict()
        r["config"] = {**lm.cfg.to_dict(), "hidden_dim": lm.cfg.hidden_dim,
                       "depformer_hidden_dim": lm.cfg.depformer_hidden_dim}  # fmt: skip
        r["config"].pop("delays")
        r["scaled"] = [f for f in SCALE_FLAGS if getattr(args, f) is not None]
    if "batches" in models:
        from moshi_mlx.benchmark import batch_report

        r["batches"] = batch_report(models["batches"])
    if args.label:
        r["label"] = args.label
    return r


def flatten(d: dict, prefix: str = "") -> list[tuple[str, str]]:
    """``key=value`` pairs of a nested result, values as text (lists joined by commas)."""
    items = []
    for k, v in d.items():
        if isinstance(v, dict):
            items += flatten(v, f"{prefix}{k}.")
        elif isinstance(v, list | tuple):
            items.append((f"{prefix}{k}", ",".join(map(str, v)) or "none"))
        else:
            text = "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
            items.append((f"{prefix}{k}", text))
    return items


def main(args) -> int:
    import mlx.core as mx

    from .options import sampling_from_args
    from .progress import Progress

    check_args(args)
    sampling = sampling_from_args(args)
    if sampling.seed is None:
        sampling = sampling.replace(seed=DEFAULT_SEED)
    args.seed = sampling.seed
    with Progress() as progress:
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        models = build_models(args, progress)
        build = {"seconds": time.perf_counter() - t0, "peak": mx.get_peak_memory()}
        passes = run_passes(models, args, sampling, progress)
    result = report(models, passes, args, sampling, build)
    if args.json_out:
        samples = {f"{p}.{k}": v for p, ps in passes.items() for k, v in ps.stages.items()}
        samples.update({p: ps.wall_ms for p, ps in passes.items()})
        with append_output(args.json_out, what="--json-out", models=[args.hf_path]) as f:
            f.write(json.dumps({**result, "samples_ms": samples}) + "\n")
    if args.json:
        print(json.dumps(result))
    elif args.kv:
        for key, value in flatten(result):
            print(f"{key}={value}")
    else:
        print("\n".join(summary(result)))
    return 0


def summary(r: dict) -> list[str]:
    """A few lines for people from the result (``--json`` has every figure): a headline
    naming what was timed and where, the frame's median and p95, the real-time factor, the
    stages and the peak memory."""

    def ms(key: str) -> str:
        return "-" if r.get(key) is None else f"{r[key]:.1f}"

    what = r["model"] or "Mimi only (no LM)"
    if r.get("scaled"):
        what += " scaled (" + ", ".join(f"{f} {r['config'][_CONFIG_FIELD[f]]}"
                                       for f in r["scaled"]) + ")"  # fmt: skip
    parts = [what]
    if r.get("dtype"):
        parts.append(f"{r['dtype']}" + (f", {r['quant']['bits']}-bit" if r.get("quant") else ""))
    if r.get("engine"):
        parts.append(f"{r['engine']} engine")
    if r.get("mimi"):
        parts.append(f"Mimi: {r['mimi']}, on {r['mimi_device']}")
    else:
        parts.append("LM only (no Mimi)")
    parts.append(f"{r['device']} (MLX {r['mlx_version']})")
    lines = ["moshi-mlx bench: " + " · ".join(parts)]

    def row(name: str, text: str) -> None:
        lines.append(f"  {name:<12} {text}")

    row("frame", f"{ms('frame_ms_p50')} ms median, {ms('frame_ms_p95')} ms p95 over "
                 f"{r['steps']} frame{'s' if r['steps'] != 1 else ''}")  # fmt: skip
    if r.get("frame_interval_ms_p50") is not None:
        row("answers", f"every {ms('frame_interval_ms_p50')} ms median "
                       f"({ms('frame_interval_ms_p95')} p95), each {ms('frame_latency_ms_p50')} "
                       "ms after its frame")  # fmt: skip
    pace = "keeps up with" if r["rtf"] < 1 else "slower than"
    row("real time", f"RTF {r['rtf']:.2f}: {pace} real time (80 ms of audio per frame; "
                     "below 1 keeps up)")  # fmt: skip
    stages = [f"{s} {ms(f'{s}_ms_p50')}" for s in ("encode", "temporal", "depth", "decode")
              if r.get(f"{s}_ms_p50") is not None]  # fmt: skip
    if stages:
        row("stages", ", ".join(stages) + " ms median, synced per stage")
    batches = r.get("batches") or {}
    for size, b in batches.items():  # speech-to-text: independent streams in one batch
        text = (
            f"{b['frame_ms_p50']:.1f} ms a frame, {b['streams_realtime']:.2f} streams kept "
            "in real time"
        )
        if size != "1" and "1" in batches:
            gain = int(size) * batches["1"]["frame_ms_p50"] / b["frame_ms_p50"]
            text += f" ({gain:.2f}x the streams of batch 1)"
        row(f"batch {size}", text)
    full = r.get("peak_memory_full_context_gb")
    weights = [f"{n} {r[f'{k}_params_gb']:.2f} GB" for n, k in (("LM", "lm"), ("Mimi", "mimi"))
               if r.get(f"{k}_params_gb") is not None]  # fmt: skip
    row("memory", f"peak {r['peak_memory_gb']:.2f} GB"
                  + (f", {full:.2f} GB with the context full" if full is not None else "")
                  + (f"; weights {', '.join(weights)}" if weights else ""))  # fmt: skip
    if r.get("kept_full_size"):
        row("kept", "at full size: " + "; ".join(r["kept_full_size"]))
    lines.append("  (--json or --kv for every figure)")
    return lines


# scale flag -> the config field it sets (for the headline)
_CONFIG_FIELD = {"dim": "dim", "layers": "num_layers", "heads": "num_heads",
                 "dep_dim": "depformer_dim", "dep_layers": "depformer_num_layers",
                 "dep_heads": "depformer_num_heads", "context": "context",
                 "text_card": "text_card"}  # fmt: skip
