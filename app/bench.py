"""``moshi-mlx bench``: time one full-duplex frame, stage by stage.

A frame is 80 ms of audio: Mimi ``encode_step`` of the user's 1920 samples, the temporal
transformer (+ text sampling), the depth transformer over Moshi's ``dep_q`` codebooks (+ audio
sampling), and Mimi ``decode_step`` of Moshi's codes. Every measurement runs the same positions
(``--warmup`` untimed frames, then ``--steps`` timed ones) from a fresh stream, in passes:

- ``stages``: one sync (``mx.eval``) after each stage, for the per-stage split;
- ``lm``: ``LmGen.step`` + copy of its tokens to the host, nothing else (the work the
  reference harness times as its ``lm_step``);
- ``frame``: ``DuplexSession.step``, the loop body of the chat, with no syncs added.

Headline ``frame_ms`` comes from the ``frame`` pass (the ``lm`` pass with ``--no-mimi``, the
Mimi stages with ``--no-lm``). Results are ``key=value`` lines, or one JSON object (``--json``);
``--json-out`` appends records in the format of ``../shared/peer_bench`` for side-by-side
comparison with Kyutai's ``moshi_mlx``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from moshi_mlx.app.cli import UserError
from moshi_mlx.loading import DTYPES
from moshi_mlx.weights import DEFAULT_GROUP_SIZE, quantization_of

HELP = "time the frame step (Mimi, temporal and depth transformers) on a model or random weights"

FRAME_MS = 80.0
PRESETS = {"moshiko-7b": "moshi_7b", "moshika-7b": "moshi_7b", "moshi-2b": "moshi_2b"}
SHORT_DTYPE = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
SAMPLERS = ("top-p", "top-k", "greedy")
REF_SAMPLER = {"top-p": "default", "top-k": "topk", "greedy": "greedy"}
SCALE_FLAGS = (
    "dim",
    "layers",
    "heads",
    "dep_dim",
    "dep_layers",
    "dep_heads",
    "context",
    "text_card",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model")
    model.add_argument(
        "--hf-path", help="converted model: a local folder or a Hugging Face repo id"
    )
    model.add_argument(
        "--random-weights", action="store_true", help="random weights of --config (no download)"
    )
    model.add_argument(
        "--config",
        help="with --random-weights: moshiko-7b (default), moshi-2b, or an upstream LM config JSON",
    )
    model.add_argument("--mimi-weights", help="Mimi safetensors (PyTorch or converted layout)")
    model.add_argument("--mimi-config", help="Mimi config JSON for random or given Mimi weights")
    model.add_argument("--no-mimi", action="store_true", help="time the LM only")
    model.add_argument("--no-lm", action="store_true", help="time Mimi only")

    scale = p.add_argument_group(
        "scale-down (as ../shared/peer_bench/ref_step_bench.py: FFN hidden 11*dim/4)"
    )
    scale.add_argument("--dim", type=int, help="temporal width (heads default dim/128)")
    scale.add_argument("--layers", type=int, help="temporal layers")
    scale.add_argument("--heads", type=int, help="temporal heads")
    scale.add_argument("--dep-dim", type=int, help="depth transformer width (heads default /64)")
    scale.add_argument("--dep-layers", type=int, help="depth transformer layers")
    scale.add_argument("--dep-heads", type=int, help="depth transformer heads")
    scale.add_argument("--context", type=int, help="temporal attention window (steps)")
    scale.add_argument("--text-card", type=int, help="text vocabulary size")

    run = p.add_argument_group("run")
    run.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="LM dtype")
    run.add_argument("-q", "--q-bits", type=int, dest="q_bits", help="quantize the LM: 4 or 8 bits")
    run.add_argument(
        "--q-group-size", type=int, help="quantization group size (default 32 for 4-bit, 64 for 8)"
    )
    run.add_argument("--steps", type=int, default=50, help="timed frames (default 50)")
    run.add_argument("--warmup", type=int, default=5, help="untimed frames first (default 5)")
    run.add_argument("--seed", type=int, default=299792458, help="weights, inputs and sampling")
    run.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="top-p",
        help="top-p: temp 0.8, top-p 0.95 (upstream Sampler()); top-k: temp 0.8, top-k 25 text / "
        "250 audio; greedy",
    )
    run.add_argument(
        "--no-stages",
        action="store_true",
        help="skip the pass synced after each stage (LM runs: no stage split, no mimi_ms)",
    )
    run.add_argument("--num-codebooks", type=int, default=8, help="Mimi codebooks with --no-lm")

    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="one JSON object on stdout")
    out.add_argument(
        "--json-out", help="append peer_bench-compatible records (RESULT_JSON format) to this file"
    )
    out.add_argument("--label", help="free text stored in the records (e.g. a git revision)")


# -- configuration ---------------------------------------------------------------------------


def _check_args(args) -> None:
    if args.no_lm and args.no_mimi:
        raise UserError("--no-lm and --no-mimi leave nothing to time")
    if args.hf_path and args.random_weights:
        raise UserError("give either --hf-path or --random-weights, not both")
    if args.config and not args.random_weights:
        raise UserError("--config needs --random-weights (a converted model has its own config)")
    scaled = [f for f in SCALE_FLAGS if getattr(args, f) is not None]
    if scaled and not args.random_weights:
        flag = "--" + scaled[0].replace("_", "-")
        raise UserError(f"{flag} scales a --random-weights config; a converted model keeps its own")
    mimi_given = args.mimi_weights is not None
    if not args.hf_path and not args.random_weights and not (args.no_lm and mimi_given):
        raise UserError(
            "no model: pass --hf-path PATH_OR_REPO, or --random-weights [--config moshiko-7b]"
        )
    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be at least 1 and --warmup at least 0")
    if args.q_bits is not None and args.q_bits not in DEFAULT_GROUP_SIZE:
        raise UserError(f"-q/--q-bits must be 4 or 8, got {args.q_bits}")
    if args.q_group_size is not None:
        if args.q_bits is None:
            raise UserError("--q-group-size needs -q 4 or -q 8")
        if args.q_group_size not in (32, 64, 128):
            raise UserError(f"--q-group-size must be 32, 64 or 128, got {args.q_group_size}")
    for flag in ("mimi_weights", "mimi_config"):
        path = getattr(args, flag)
        if path is not None and not Path(path).is_file():
            raise UserError(f"--{flag.replace('_', '-')}: file not found: {path}")


def _read_json(path: str, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path} is not valid JSON: {e}") from None


def lm_config_from_args(args):
    """The LM config of ``--config`` (preset name or upstream JSON) with the scale-down flags.

    Scaled widths get upstream MLX's FFN sizes, so that both implementations time the same
    matrices: temporal hidden ``11 * dim / 4`` (our ``hidden_scale`` 4.125) and depformer
    hidden ``11 * dep_dim / 4`` (``depformer_dim_feedforward = 1.5 * hidden``, not 4x, which
    would give PyTorch's 21/8 rule).
    """
    from moshi_mlx import LmConfig

    name = args.config or "moshiko-7b"
    if name in PRESETS:
        cfg = getattr(LmConfig, PRESETS[name])()
    elif name.endswith(".json") or os.sep in name or Path(name).exists():
        if not Path(name).is_file():
            raise UserError(f"--config: file not found: {name}")
        cfg = LmConfig.from_dict(_read_json(name, "LM config"))
    else:
        raise UserError(
            f"unknown config {name!r}: use {', '.join(PRESETS)} or an upstream LM config JSON"
        )
    changes: dict = {}
    if args.dim is not None:
        changes.update(dim=args.dim, hidden_scale=4.125, num_heads=max(1, args.dim // 128))
    if args.heads is not None:
        changes["num_heads"] = args.heads
    if args.layers is not None:
        changes["num_layers"] = args.layers
    if args.dep_dim is not None:
        hidden = 11 * args.dep_dim // 4
        changes.update(
            depformer_dim=args.dep_dim,
            depformer_dim_feedforward=(3 * hidden + 1) // 2,
            depformer_num_heads=max(1, args.dep_dim // 64),
        )
    if args.dep_heads is not None:
        changes["depformer_num_heads"] = args.dep_heads
    if args.dep_layers is not None:
        changes["depformer_num_layers"] = args.dep_layers
    if args.context is not None:
        changes["context"] = args.context
    if args.text_card is not None:
        changes["text_card"] = args.text_card
    cfg = dataclasses.replace(cfg, **changes)
    for value, flag in ((cfg.dim, "--dim"), (cfg.depformer_dim, "--dep-dim")):
        if value < 1:
            raise UserError(f"{flag} must be positive")
    cfg.validate()
    return cfg


def ref_config_description(cfg, dep_scaled: bool) -> dict:
    """``cfg`` described with the reference harness's ``config`` fields, so that records of both
    implementations match in ``compare_results.py`` exactly when the matrices are the same."""

    def ff(dim: int, hidden: int, given: int | None) -> int:
        # Upstream MLX: hidden = 11*dim/4 if dim_feedforward == 4*dim else 2*dim_feedforward/3.
        if given is not None and given != 4 * dim and 2 * given // 3 == hidden:
            return given
        return 4 * dim if hidden == 11 * dim // 4 else -hidden  # negative: no upstream match

    dep_given = None if dep_scaled else cfg.depformer_dim_feedforward
    return {
        "dim": cfg.dim,
        "heads": cfg.num_heads,
        "layers": cfg.num_layers,
        "ffn_dim_feedforward": ff(cfg.dim, cfg.hidden_dim, None),
        "context": cfg.context,
        "dep_dim": cfg.depformer_dim,
        "dep_heads": cfg.depformer_num_heads,
        "dep_layers": cfg.depformer_num_layers,
        "dep_dim_feedforward": ff(cfg.depformer_dim, cfg.depformer_hidden_dim, dep_given),
        "dep_q": cfg.dep_q,
        "n_q": cfg.n_q,
        "text_card": cfg.text_card,
        "audio_card": cfg.card,
        "delays": list(cfg.delays[1:]),
    }


# -- building models -------------------------------------------------------------------------


def _leaves(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return tree_flatten(module.leaf_modules(), is_leaf=nn.Module.is_module)


def quantize(lm, bits: int, group_size: int) -> None:
    """Upstream's quantization (every Linear and Embedding of the LM), lazily; a group size
    that does not divide a layer's width is a user error naming the layer."""
    from moshi_mlx.weights import indivisible_layers, quantize_lm

    bad = indivisible_layers(lm, group_size)
    if bad:
        name, width = next(iter(bad.items()))
        raise UserError(
            f"--q-group-size {group_size} does not divide the input width {width} of {name} "
            f"({len(bad)} layer(s); widths that are multiples of 128 fit every group size)"
        )
    quantize_lm(lm, bits, group_size)


def materialize(lm, progress) -> None:
    """Evaluate the LM's parameters one leaf module at a time: they are lazy until then, so a
    7B in float32 (or its bf16 copy when quantizing) never exists at once."""
    leaves = [leaf for _, leaf in _leaves(lm)]
    task = progress.start("build LM", len(leaves))
    for leaf in leaves:
        mx.eval(leaf.parameters())
        progress.advance(task)
    progress.stop(task)
    mx.eval(lm.parameters())


def build_random_lm(cfg, dtype: mx.Dtype, bits: int | None, group_size: int | None, progress):
    """Random-weight ``Lm`` cast to ``dtype`` and then quantized, as upstream does."""
    from moshi_mlx import Lm

    lm = Lm(cfg)
    lm.set_dtype(dtype)
    if bits:
        quantize(lm, bits, group_size)
    materialize(lm, progress)
    return lm


def build_random_mimi(cfg):
    """Random Mimi of ``cfg`` with usable codebooks (a fresh one has all-zero centroids)."""
    from moshi_mlx import Mimi
    from moshi_mlx.quantizer import Codebook

    mimi = Mimi(cfg)
    for _, m in mimi.named_modules():
        if isinstance(m, Codebook):
            m.embedding_sum = mx.random.normal(m.embedding_sum.shape)
            m.cluster_usage = mx.ones_like(m.cluster_usage)
    mx.eval(mimi.parameters())
    return mimi


def build_models(args, progress) -> dict:
    """The models to time and a description of them."""
    from moshi_mlx import MimiConfig, load_mimi

    info: dict = {}
    lm = mimi = None
    mx.random.seed(args.seed)
    mimi_cfg = None
    if args.mimi_config:
        mimi_cfg = MimiConfig.from_dict(_read_json(args.mimi_config, "Mimi config"))
    bits = args.q_bits
    group_size = args.q_group_size or (DEFAULT_GROUP_SIZE[bits] if bits else None)

    if args.hf_path:
        # As moshi_mlx.load, but the tokenizer is not needed and Mimi may come from elsewhere.
        from moshi_mlx.loading import as_dtype, find_model_files, load_lm, model_folder

        unused = os.devnull  # a path find_model_files records but the bench never reads
        files = find_model_files(
            model_folder(args.hf_path),
            mimi_weights=args.mimi_weights or (unused if args.no_mimi else None),
            tokenizer=unused,
        )
        info["model"] = args.hf_path
        if not args.no_lm:
            lm = load_lm(files.lm_weights, files.lm_config, dtype=as_dtype(args.dtype))
            if bits and quantization_of(lm) is not None:
                raise UserError("this model is already quantized; -q applies to float models")
            if bits:
                quantize(lm, bits, group_size)
            materialize(lm, progress)
        if not args.no_mimi and not args.mimi_weights:
            mimi = load_mimi(files.mimi_weights, mimi_cfg or files.mimi_config)
    elif not args.no_lm:
        cfg = lm_config_from_args(args)
        info["model"] = f"random weights, config {args.config or 'moshiko-7b'}"
        lm = build_random_lm(cfg, DTYPES[args.dtype], bits, group_size, progress)

    if args.no_mimi:
        mimi = None
    elif args.mimi_weights:
        mimi = load_mimi(args.mimi_weights, mimi_cfg)
        info["mimi"] = args.mimi_weights
    elif mimi is None:
        mimi = build_random_mimi(mimi_cfg or MimiConfig())
        info["mimi"] = "random weights" + (f", config {args.mimi_config}" if mimi_cfg else "")
    else:
        info["mimi"] = f"{args.hf_path} (Mimi)"
    if mimi is not None:
        mx.eval(mimi.parameters())
    if lm is not None:
        info["quant"] = quantization_of(lm)
    return {"lm": lm, "mimi": mimi, "info": info}


# -- generation set-up -----------------------------------------------------------------------


def make_gen(lm, sampler: str, seed: int):
    """``LmGen`` with the reference's sampler: temperature 0.8 for text and audio, top-p 0.95
    (upstream ``Sampler()``), or top-k 25 / 250, or greedy."""
    from moshi_mlx import LmGen

    temp = 0.0 if sampler == "greedy" else 0.8
    if sampler == "top-p":
        return LmGen(lm, temp=temp, temp_text=temp, top_k=0, top_k_text=0, seed=seed,
                     top_p=0.95, top_p_text=0.95)  # fmt: skip
    return LmGen(lm, temp=temp, temp_text=temp, top_k=250, top_k_text=25, seed=seed)


# The callable through which LmGen.step runs the depth transformer, first match wins: the
# compiled one when LmGen compiles it, else the plain method.
DEPTH_STAGE = ("depth_stage", "_depformer", "depformer_step")


class StageClock:
    """Splits ``LmGen.step`` at its call of the depth stage (``DEPTH_STAGE``), syncing around it:
    the time before is the temporal stage (+ text sampling), the call itself the depth stage
    (+ audio sampling). ``marks`` stays None if ``step`` never calls it."""

    def __init__(self, gen):
        self.gen = gen
        self.name = next((n for n in DEPTH_STAGE if hasattr(gen, n)), None)
        self.marks: tuple[float, float] | None = None
        if self.name is not None:
            self.had_own = self.name in vars(gen)
            self.inner = getattr(gen, self.name)
            setattr(gen, self.name, self._step)

    def _step(self, *args, **kwargs):
        mx.eval(args)
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        mx.eval(out)
        self.marks = (t0, time.perf_counter())
        return out

    def close(self) -> None:
        if self.name is None:
            return
        if self.had_own:
            setattr(self.gen, self.name, self.inner)
        else:
            delattr(self.gen, self.name)  # back to the class attribute


# -- timing ----------------------------------------------------------------------------------


def summarize(ms: list[float]) -> dict | None:
    """Median, p95 and friends of a list of milliseconds (linear interpolation, like numpy)."""
    if not ms:
        return None
    a = np.asarray(ms, dtype=np.float64)
    med = float(np.median(a))
    return {
        "n": len(ms),
        "median_ms": round(med, 3),
        "mean_ms": round(float(a.mean()), 3),
        "p10_ms": round(float(np.percentile(a, 10)), 3),
        "p90_ms": round(float(np.percentile(a, 90)), 3),
        "p95_ms": round(float(np.percentile(a, 95)), 3),
        "min_ms": round(float(a.min()), 3),
        "max_ms": round(float(a.max()), 3),
        "steps_per_s": round(1000.0 / med, 3),
        "rtf": round(FRAME_MS / med, 4),  # reference convention: > 1 is faster than real time
    }


class Pass:
    """One pass of ``warmup + steps`` frames: wall and CPU time per timed frame, and the peak
    memory over the timed frames."""

    def __init__(self, name: str, warmup: int, steps: int):
        self.name, self.warmup, self.steps = name, warmup, steps
        self.wall_ms: list[float] = []
        self.cpu_s = 0.0
        self.stages: dict[str, list[float]] = {}
        self.peak = 0

    def run(self, frame: Callable[[int], dict | None], progress) -> Pass:
        task = progress.start(f"{self.name} pass", self.warmup + self.steps)
        for i in range(self.warmup + self.steps):
            if i == self.warmup:
                mx.reset_peak_memory()
            w0, c0 = time.perf_counter(), time.process_time()
            stages = frame(i)
            w1, c1 = time.perf_counter(), time.process_time()
            if i >= self.warmup:
                self.wall_ms.append(1000 * (w1 - w0))
                self.cpu_s += c1 - c0
                for k, v in (stages or {}).items():
                    self.stages.setdefault(k, []).append(v)
            progress.advance(task)
        self.peak = mx.get_peak_memory()
        progress.stop(task)
        return self

    def timing(self) -> dict:
        t = summarize(self.wall_ms)
        t["cpu_util"] = round(self.cpu_s / max(sum(self.wall_ms) / 1000, 1e-12), 3)
        return t


def _ms(t0: float, t1: float) -> float:
    return 1000.0 * (t1 - t0)


def run_passes(models: dict, args, progress) -> dict[str, Pass]:
    from moshi_mlx.session import DuplexSession

    lm, mimi = models["lm"], models["mimi"]
    total = args.warmup + args.steps
    rng = np.random.default_rng(args.seed)
    passes: dict[str, Pass] = {}

    if lm is None:  # Mimi alone, as the reference's Mimi bench: decode the codes just encoded
        mimi.set_num_codebooks(args.num_codebooks)
        shape = (1, 1, mimi.frame_size)
        pcms = [(0.1 * rng.standard_normal(shape)).astype(np.float32) for _ in range(total)]
        mimi.reset()

        def mimi_frame(i):
            t0 = time.perf_counter()
            codes = mimi.encode_step(mx.array(pcms[i]))
            mx.eval(codes)
            t1 = time.perf_counter()
            mx.eval(mimi.decode_step(codes))
            t2 = time.perf_counter()
            return {"encode": _ms(t0, t1), "decode": _ms(t1, t2), "mimi": _ms(t0, t1) + _ms(t1, t2)}

        passes["stages"] = Pass("mimi", args.warmup, args.steps).run(mimi_frame, progress)
        return passes

    gen = make_gen(lm, args.sampler, args.seed)
    cfg = lm.cfg
    n_user = cfg.n_q - cfg.dep_q
    # Same inputs as the reference harness: random user codes, and 0.1-sigma noise frames.
    user_codes = [mx.array(rng.integers(0, cfg.card, size=(1, n_user)), mx.int32)
                  for _ in range(total)]  # fmt: skip
    session = DuplexSession(lm, mimi, gen) if mimi is not None else None

    # Codes are valid by construction: skip LmGen's host-side check, as the reference does.
    def lm_step(codes):
        return gen.step(codes, check=False)

    pcms = [(0.1 * rng.standard_normal(1920)).astype(np.float32) for _ in range(total)]

    def fresh_stream():
        mx.random.seed(args.seed)
        gen.reset()
        if session is not None:
            session.reset()

    # stages: a sync after each stage
    fresh_stream()

    def stage_frame(i):
        st = {}
        t0 = time.perf_counter()
        if session is not None:
            codes = session.encode(pcms[i])
            mx.eval(codes)
            st["encode"] = _ms(t0, time.perf_counter())
        else:
            codes = user_codes[i]
        clock.marks = None
        t1 = time.perf_counter()
        out = lm_step(codes)
        if out is not None:
            np.array(out)
        t2 = time.perf_counter()
        st["lm"] = _ms(t1, t2)
        if clock.marks is not None:
            st["temporal"] = _ms(t1, clock.marks[0])
            st["depth"] = _ms(*clock.marks)
        if session is not None and out is not None:
            pcm = session.decode(out[:, 1:])
            np.array(pcm)
            st["decode"] = _ms(t2, time.perf_counter())
            st["mimi"] = st["encode"] + st["decode"]
        return st

    if not args.no_stages:
        clock = StageClock(gen)
        try:
            passes["stages"] = Pass("stages", args.warmup, args.steps).run(stage_frame, progress)
        finally:
            clock.close()

    # lm: LmGen.step and the host copy of its tokens, as the reference times it
    fresh_stream()

    def lm_frame(i):
        out = lm_step(user_codes[i])
        if out is not None:
            np.array(out)

    passes["lm"] = Pass("lm", args.warmup, args.steps).run(lm_frame, progress)

    if session is not None:  # frame: the chat's loop body, nothing added
        fresh_stream()

        def session_frame(i):
            session.step(pcms[i])

        passes["frame"] = Pass("frame", args.warmup, args.steps).run(session_frame, progress)
    return passes


# -- report ----------------------------------------------------------------------------------


def _pkg_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _device() -> dict:
    dev = mx.default_device()
    info = {"device": dev.type.name}
    if hasattr(mx, "device_info"):
        try:
            info["device_info"] = {k: v for k, v in mx.device_info().items()}
        except Exception as e:  # noqa: BLE001 - informative only
            info["device_info"] = f"unavailable: {e}"
    return info


def _max_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # KiB on Linux


def env_info() -> dict:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "nproc": os.cpu_count(),
        "packages": {
            p: _pkg_version(p)
            for p in ("mlx", "mlx-cpu", "mlx-cuda", "mlx-lm", "moshi-mlx", "numpy")
        },  # fmt: skip
        "thread_env": {
            k: os.environ[k]
            for k in (
                "OMP_NUM_THREADS",
                "OPENBLAS_NUM_THREADS",
                "MKL_NUM_THREADS",
                "RAYON_NUM_THREADS",
                "MLX_NUM_THREADS",
            )
            if k in os.environ
        },  # fmt: skip
        "mlx_device": str(mx.default_device()),
    }


def _param_bytes(module) -> int:
    return int(sum(v.nbytes for _, v in tree_flatten(module.parameters())))


def _stage(result: dict, name: str, ms: list[float] | None) -> None:
    t = summarize(ms or [])
    result[f"{name}_ms_p50"] = t["median_ms"] if t else None
    result[f"{name}_ms_p95"] = t["p95_ms"] if t else None


def report(models: dict, passes: dict[str, Pass], args, build: dict) -> dict:
    """The result object (``--json``); the ``key=value`` lines are its flattening."""
    lm, mimi = models["lm"], models["mimi"]
    st = passes["stages"].stages if "stages" in passes else {}
    r: dict = {}
    if "frame" in passes:
        frame, how = passes["frame"].wall_ms, "DuplexSession.step, one sync per frame"
    elif "lm" in passes:
        frame, how = passes["lm"].wall_ms, "LmGen.step + host copy (no Mimi)"
    else:
        frame, how = st["mimi"], "Mimi encode_step + decode_step (no LM)"
    _stage(r, "frame", frame)
    r["frame_timing"] = how
    # The keys are always there (null for a part not timed).
    _stage(r, "lm_step", passes["lm"].wall_ms if "lm" in passes else None)
    if lm is not None:
        r["lm_step_timing"] = "LmGen.step + host copy of the tokens, no other sync (as reference)"
    _stage(r, "mimi", st.get("mimi"))
    if mimi is not None:
        r["mimi_timing"] = "encode_step + decode_step, each synced"
    p50 = r["frame_ms_p50"]
    r["rtf"] = round(p50 / FRAME_MS, 4)
    r["rtf_ref"] = round(FRAME_MS / p50, 4)
    r["rtf_note"] = "rtf = frame/80ms (< 1 is real time); rtf_ref = 80ms/frame (reference's)"
    r["fps"] = round(1000.0 / p50, 3)
    for name in ("encode", "temporal", "depth", "decode"):
        if name in st:
            _stage(r, name, st[name])
    if lm is not None and st and "temporal" not in st:
        r["stage_note"] = (
            f"LmGen.step calls none of {', '.join(DEPTH_STAGE)}: no temporal/depth split"
        )
    if "lm" in st:
        _stage(r, "stages_frame", passes["stages"].wall_ms)
        r["stages_timing"] = "a sync after each stage (temporal includes text sampling)"
    r["peak_memory_gb"] = round(max(p.peak for p in passes.values()) / 1e9, 4)
    r["build_peak_memory_gb"] = round(build["peak"] / 1e9, 4)
    r["lm_params_gb"] = round(_param_bytes(lm) / 1e9, 4) if lm is not None else None
    r["mimi_params_gb"] = round(_param_bytes(mimi) / 1e9, 4) if mimi is not None else None
    r["build_s"] = round(build["seconds"], 2)
    r["steps"], r["warmup"], r["seed"] = args.steps, args.warmup, args.seed
    r.update(_device())
    r["mlx_version"] = mx.__version__
    r["model"] = models["info"].get("model")
    r["mimi"] = models["info"].get("mimi")
    if lm is not None:
        r["dtype"] = args.dtype
        r["quant"] = models["info"].get("quant")
        r["sampler"] = args.sampler
        cfg = lm.cfg
        r["config"] = {
            **{k: v for k, v in cfg.to_dict().items() if k != "delays"},
            "hidden_dim": cfg.hidden_dim,
            "depformer_hidden_dim": cfg.depformer_hidden_dim,
        }
    if args.label:
        r["label"] = args.label
    return r


def reference_records(models: dict, passes: dict[str, Pass], args, build: dict) -> list[dict]:
    """Records in ``ref_step_bench.py``'s format, matched to its rows by compare_results.py."""
    lm, mimi = models["lm"], models["mimi"]
    common = {
        "impl": "moshi-mlx",
        "seed": args.seed,
        "warmup_steps": args.warmup,
        "positions_timed": [args.warmup, args.warmup + args.steps - 1],
        "max_rss_bytes": _max_rss_bytes(),
        "build_s": round(build["seconds"], 3),
        "env": env_info(),
        **({"label": args.label} if args.label else {}),
    }
    out = []
    if lm is not None:
        q = models["info"].get("quant")
        out.append({
            "bench": "lm_step",
            **common,
            "config": ref_config_description(lm.cfg, args.dep_dim is not None),
            "quant": f"q{q['bits']} group_size {q['group_size']}" if q else "none",
            "dtype": SHORT_DTYPE[args.dtype],
            "sampler": REF_SAMPLER[args.sampler],
            "timing": passes["lm"].timing(),
            "peak_mem_bytes": passes["lm"].peak,
            "model_bytes": _param_bytes(lm),
        })  # fmt: skip
    if mimi is not None and "stages" in passes:
        st = passes["stages"].stages
        if not st.get("mimi"):
            raise UserError("no frame reached Mimi decode: raise --warmup or --steps")
        if lm is None:  # the pass is exactly Mimi's encode + decode
            timing = passes["stages"].timing()
        else:
            timing = {**summarize(st["mimi"]), "cpu_util": None}
        from moshi_mlx import MimiConfig

        default = mimi.cfg == MimiConfig()
        out.append({
            "bench": "mimi_mlx_stream_frame",
            **common,
            "config": {"mimi": "mimi_202407" if default else "custom",
                       "num_codebooks": mimi.num_codebooks, "frame_samples": mimi.frame_size,
                       "weights": models["info"].get("mimi")},
            "dtype": "f32",
            "timing": timing,
            "encode": summarize(st["encode"]),
            "decode": summarize(st.get("decode", [])),
            "peak_mem_bytes": passes["stages"].peak,
            "model_bytes": _param_bytes(mimi),
        })  # fmt: skip
    return out


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for k, v in d.items():
        if isinstance(v, dict):
            items += _flatten(v, f"{prefix}{k}.")
        else:
            items.append((f"{prefix}{k}", v))
    return items


def _text(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list | tuple):
        return ",".join(map(str, v))
    return str(v)


# -- progress --------------------------------------------------------------------------------


class Progress:
    """A rich progress bar on stderr when it is a terminal, otherwise one line per phase."""

    def __init__(self):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.bar = None
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(
                "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), console=self.console, transient=True,
            )  # fmt: skip

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()

    def start(self, what: str, total: int):
        if self.bar is None:
            print(f"bench: {what} ({total})", file=sys.stderr, flush=True)
            return None
        return self.bar.add_task(what, total=total)

    def advance(self, task) -> None:
        if task is not None:
            self.bar.advance(task)

    def stop(self, task) -> None:
        if task is not None:
            self.bar.remove_task(task)


# -- entry point -----------------------------------------------------------------------------


def main(args) -> int:
    _check_args(args)
    with Progress() as progress:
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        models = build_models(args, progress)
        build = {"seconds": time.perf_counter() - t0, "peak": mx.get_peak_memory()}
        passes = run_passes(models, args, progress)
    result = report(models, passes, args, build)
    records = reference_records(models, passes, args, build)
    if args.json_out:
        with open(args.json_out, "a") as f:
            for rec in records:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in _flatten(result):
            print(f"{k}={_text(v)}")
        if args.json_out:
            for rec in records:
                print("RESULT_JSON " + json.dumps(rec, sort_keys=True))
    return 0


def _standalone(argv: list[str] | None = None) -> int:
    """``python -m moshi_mlx.app.bench``: the bench without the other subcommands' imports."""
    p = argparse.ArgumentParser(prog="moshi-mlx bench", description=HELP)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return main(args)
    except (UserError, ValueError, FileNotFoundError) as e:
        print(f"moshi-mlx bench: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_standalone())
