"""Side-by-side timing of one speech-to-text step: Kyutai's moshi_mlx 0.3.0 against ours.

    .venv-ref/bin/python scripts/peer_stt_bench.py ref  --size 1b [--quant 4] [--batch 8] ...
    .venv/bin/python     scripts/peer_stt_bench.py ours --size 1b [--quant 4] [--batch 8] ...
    .venv-ref/bin/python scripts/peer_stt_bench.py rustymimi --ckpt MIMI.safetensors
    .venv/bin/python     scripts/peer_stt_bench.py mimi      --ckpt MIMI.safetensors

One STT step is one 80 ms frame of Kyutai's speech-to-text model (dep_q 0): the embeddings of
the 32 codebooks of the frame plus the previous text token, the temporal transformer, out_norm,
the text linear, greedy text sampling and the extra (voice-activity) heads, all forced inside
the timed region. ``ref`` drives upstream's ``LmGen.step_with_extra_heads`` the way Kyutai's
``delayed-streams-modeling`` scripts do (``stt_from_mic_mlx.py``: ``set_dtype(bf16)``, then
``nn.quantize`` group 32 for q4, text ``Sampler(top_k=25, temp=0)``); ``ours`` drives our
``LmGen.step`` on our STT model, quantized by ``random_lm`` (every Linear and Embedding, as
upstream). Random weights, the same random codes on both sides. ``rustymimi`` / ``mimi`` time the
streaming Mimi encode of one frame into 32 codebooks (Kyutai's Rust codec / ours) on the same
random checkpoint (``../shared/peer_bench/ref_step_bench.py make-mimi-ckpt``).

The script runs under either venv: each subcommand imports only its own side's ``moshi_mlx``
(the script's folder, not the repository root, is on ``sys.path``). Each run prints one
``RESULT_JSON`` line in ``../shared/peer_bench``'s record format (bench ``stt_lm_step`` /
``stt_mimi_encode``; the batch is part of ``config``, so ``compare_results.py`` and
``scripts/peer_table.py`` match rows of equal batch only) and appends it to ``--json-out``.
Development tool: the project never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
from peer_records import timing as records_timing

FRAME_SAMPLES = 1920
ROOT = Path(__file__).resolve().parent.parent
STT_1B_KEYS = ROOT / "tests/fixtures/full_size_keys/stt_1b_keys.json"
# kyutai/stt-2.6b-en: the published sizes (dim 2048, 48 layers of 32 heads, 4000 text tokens,
# a 375-step window); the rest as STT 1B.
STT_2B6 = {"dim": 2048, "num_layers": 48, "num_heads": 32, "text_card": 4000, "context": 375,
           "extra_heads_num_heads": 0}  # fmt: skip


def stt_config(size: str) -> dict:
    """The upstream-format config dict of an STT model, with the keys both parsers need."""
    cfg = json.loads(STT_1B_KEYS.read_text())["config"]  # the released STT 1B config's fields
    if size == "2.6b":
        cfg.update(STT_2B6)
    cfg["model_type"] = "stt"
    # upstream's LmConfig.from_config_dict reads this key even without a depformer
    cfg.setdefault("depformer_dim_feedforward", int(cfg["hidden_scale"] * cfg["depformer_dim"]))
    return cfg


def describe(cfg: dict, batch: int) -> dict:
    keys = ("dim", "num_heads", "num_layers", "context", "n_q", "dep_q", "text_card", "card",
            "extra_heads_num_heads")  # fmt: skip
    return {**{k: cfg[k] for k in keys}, "batch": batch}


def timing(wall_s: list[float], cpu_s: list[float]) -> dict:
    """The reference's ``timing`` block, plus the process's CPU time per step: on a machine
    shared with other work, wall time measures the load as much as the code; CPU time much
    less so."""
    cpu_util = round(sum(cpu_s) / max(sum(wall_s), 1e-12), 3)
    return {
        **records_timing([w * 1000.0 for w in wall_s], cpu_util),
        "cpu_median_ms": round(float(np.median(cpu_s)) * 1000.0, 3),
        "cpu_p95_ms": round(float(np.percentile(cpu_s, 95)) * 1000.0, 3),
    }


def env_info() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    import mlx.core as mx

    return {
        "python": platform.python_version(),
        "nproc": os.cpu_count(),
        "loadavg": open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg")
        else None,
        "packages": {p: v(p) for p in ("mlx", "mlx-cpu", "moshi_mlx", "moshi-mlx", "rustymimi")},
        "mlx_device": str(mx.default_device()),
    }  # fmt: skip


def emit(result: dict, json_out: str | None) -> None:
    t = result["timing"]
    print(
        f"{result['impl']}: {result['bench']} {result.get('quant', '')} {result['dtype']} "
        f"config {result['config']}: median {t['median_ms']:.1f} ms  p95 {t['p95_ms']:.1f}  "
        f"(n={t['n']}, cpu_util {t['cpu_util']}, build {result['build_s']:.1f} s)"
    )
    line = json.dumps(result, sort_keys=True)
    print("RESULT_JSON " + line, flush=True)
    if json_out:
        with open(json_out, "a") as f:
            f.write(line + "\n")


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def random_codes(args, cfg: dict) -> list[np.ndarray]:
    rng = np.random.default_rng(args.seed)
    shape = (args.batch, cfg["n_q"])
    return [rng.integers(0, cfg["card"], size=shape) for _ in range(args.warmup + args.steps)]


def time_steps(step, inputs: list, warmup: int, reset_peak) -> tuple[list, list]:
    wall, cpu = [], []
    for i, codes in enumerate(inputs):
        if i == warmup:
            reset_peak()
        w0, c0 = time.perf_counter(), time.process_time()
        step(codes)
        w1, c1 = time.perf_counter(), time.process_time()
        if i >= warmup:
            wall.append(w1 - w0)
            cpu.append(c1 - c0)
    return wall, cpu


def lm_record(args, cfg, impl, wall, cpu, build_s, model_bytes) -> dict:
    import mlx.core as mx

    return {
        "bench": "stt_lm_step",
        "impl": impl,
        "config": describe(cfg, args.batch),
        "quant": f"q{args.quant} group_size {args.group_size}" if args.quant else "none",
        "dtype": "bf16",
        "sampler": "greedy",
        "seed": args.seed,
        "warmup_steps": args.warmup,
        "positions_timed": [args.warmup, args.warmup + args.steps - 1],
        "timing": timing(wall, cpu),
        "streams_per_s": round(args.batch * 1000.0 / float(np.median(wall) * 1000.0), 4),
        "peak_mem_bytes": mx.get_peak_memory(),
        "model_bytes": model_bytes,
        "max_rss_bytes": max_rss_bytes(),
        "build_s": round(build_s, 2),
        "env": env_info(),
        **({"label": args.label} if args.label else {}),
    }


# -- Kyutai's moshi_mlx 0.3.0 ------------------------------------------------------------------


def bench_ref(args) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from moshi_mlx import models, utils

    cfg = stt_config(args.size)
    t0 = time.perf_counter()
    mx.random.seed(args.seed)
    model = models.Lm(models.LmConfig.from_config_dict(cfg))
    model.set_dtype(mx.bfloat16)  # as Kyutai's scripts: bf16 first, then quantize
    if args.quant:
        nn.quantize(model, bits=args.quant, group_size=args.group_size)
    for layer in model.transformer.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    model_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    model.warmup()
    build_s = time.perf_counter() - t0

    gen = models.LmGen(
        model=model,
        max_steps=args.warmup + args.steps + 5,
        text_sampler=utils.Sampler(top_k=25, temp=0),
        audio_sampler=utils.Sampler(top_k=250, temp=0.8),
        batch_size=args.batch,
        check=False,
    )
    heads = len(model.extra_heads) > 0
    inputs = [mx.array(c, dtype=mx.int32) for c in random_codes(args, cfg)]
    mx.eval(inputs)

    def step(codes):
        if heads:  # the voice-activity path of stt_from_mic_mlx.py (--vad)
            text, vad = gen.step_with_extra_heads(codes)
            mx.eval(vad)
        else:
            text, _ = gen.step(codes)  # (text tokens, transformer output)
        np.array(text)  # the caller reads the token(s)
        gen.last_audio_tokens()

    wall, cpu = time_steps(step, inputs, args.warmup, mx.reset_peak_memory)
    emit(lm_record(args, cfg, "moshi_mlx 0.3.0 (Kyutai)", wall, cpu, build_s, model_bytes),
         args.json_out)  # fmt: skip


# -- ours --------------------------------------------------------------------------------------


def bench_ours(args) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from moshi_mlx.generate import LmGen
    from moshi_mlx.lm import LmConfig
    from moshi_mlx.quantize import Quantization
    from moshi_mlx.random_weights import random_lm

    cfg = stt_config(args.size)
    t0 = time.perf_counter()
    quant = Quantization(args.quant, args.group_size) if args.quant else None
    lm = random_lm(LmConfig.from_dict(cfg), mx.bfloat16, quant, seed=args.seed)
    model_bytes = sum(v.nbytes for _, v in tree_flatten(lm.parameters()))
    gen = LmGen(lm, temp=0.0, temp_text=0.0, seed=args.seed)
    # one step then a fresh start, as upstream's ``warmup()``
    mx.eval(gen.step(mx.zeros((args.batch, cfg["n_q"]), mx.int32), check=False))
    gen.reset()
    build_s = time.perf_counter() - t0

    inputs = [mx.array(c, dtype=mx.int32) for c in random_codes(args, cfg)]
    mx.eval(inputs)

    def step(codes):
        text = gen.step(codes, check=False)  # codes from our own Mimi, as the transcriber
        if gen.last_extra_heads is not None:
            mx.eval(gen.last_extra_heads)
        np.array(text)

    wall, cpu = time_steps(step, inputs, args.warmup, mx.reset_peak_memory)
    emit(lm_record(args, cfg, "moshi-mlx", wall, cpu, build_s, model_bytes), args.json_out)


# -- Mimi encode (32 codebooks) ----------------------------------------------------------------


def mimi_record(args, impl, wall, cpu, build_s) -> dict:
    return {
        "bench": "stt_mimi_encode",
        "impl": impl,
        "config": {"num_codebooks": 32, "frame_samples": FRAME_SAMPLES, "ckpt": "random",
                   "batch": 1},
        "dtype": "f32",
        "seed": args.seed,
        "warmup_steps": args.warmup,
        "timing": timing(wall, cpu),
        "max_rss_bytes": max_rss_bytes(),
        "build_s": round(build_s, 2),
        "env": env_info(),
    }  # fmt: skip


def pcm_frames(args) -> list[np.ndarray]:
    rng = np.random.default_rng(args.seed)
    shape = (1, 1, FRAME_SAMPLES)
    return [(0.1 * rng.standard_normal(shape)).astype(np.float32)
            for _ in range(args.warmup + args.steps)]  # fmt: skip


def bench_rustymimi(args) -> None:
    import rustymimi

    t0 = time.perf_counter()
    tok = rustymimi.Tokenizer(args.ckpt, num_codebooks=32)
    build_s = time.perf_counter() - t0
    wall, cpu = time_steps(tok.encode_step, pcm_frames(args), args.warmup, lambda: None)
    emit(mimi_record(args, "rustymimi 0.4.1 (Kyutai)", wall, cpu, build_s), args.json_out)


def bench_mimi(args) -> None:
    import mlx.core as mx

    from moshi_mlx.loading import load_mimi

    t0 = time.perf_counter()
    mimi = load_mimi(args.ckpt)  # the released codec's config: 32 codebooks
    build_s = time.perf_counter() - t0

    def step(pcm):
        mx.eval(mimi.encode_step(mx.array(pcm)))

    wall, cpu = time_steps(step, pcm_frames(args), args.warmup, lambda: None)
    emit(mimi_record(args, "moshi-mlx", wall, cpu, build_s), args.json_out)


def table(paths: list[str]) -> None:
    """Markdown table of ref and ours JSONL files: per row the median of the runs' medians
    (range, run count), wall and CPU (wall median x cpu_util: what the step cost the process
    on a shared machine), the speed-ups (reference / ours, > 1: ours faster) and our streams/s
    (batch / wall median)."""
    import statistics

    def load(path):
        rows = {}
        for line in Path(path).read_text().splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                key = (r["bench"], json.dumps(r["config"], sort_keys=True), r.get("quant", "-"))
                rows.setdefault(key, []).append(r)
        return rows

    def wall(r):
        return r["timing"]["median_ms"]

    def cpu(r):
        return r["timing"]["median_ms"] * r["timing"]["cpu_util"]

    def med(runs, of):
        return statistics.median(of(r) for r in runs)

    def cell(runs, of):
        if not runs:
            return "–"
        values = [of(r) for r in runs]
        spread = f" [{min(values):.0f}–{max(values):.0f}]" if len(values) > 1 else ""
        return f"{statistics.median(values):.0f}{spread} (n={len(values)})"

    def ratio(theirs, mine, of):
        return f"{med(theirs, of) / med(mine, of):.2f}x" if theirs and mine else "–"

    ref, ours = load(paths[0]), load(paths[1])
    print("| what | batch | quant | Kyutai wall ms | ours wall ms | wall speed-up "
          "| Kyutai CPU ms | ours CPU ms | CPU speed-up | ours streams/s |")  # fmt: skip
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key in sorted(set(ref) | set(ours)):
        bench, config, quant = key
        c = json.loads(config)
        if bench == "stt_mimi_encode":
            what = "Mimi encode, 32 codebooks"
        else:
            what = f"STT step, dim {c['dim']} x {c['num_layers']}"
        theirs, mine = ref.get(key), ours.get(key)
        streams = f"{c['batch'] * 1000 / med(mine, wall):.3f}" if mine else "–"
        q = "f32" if quant == "-" else ("bf16" if quant == "none" else quant.split()[0])
        cells = [what, str(c["batch"]), q, cell(theirs, wall), cell(mine, wall),
                 ratio(theirs, mine, wall), cell(theirs, cpu), cell(mine, cpu),
                 ratio(theirs, mine, cpu), streams]  # fmt: skip
        print("| " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, what in (("ref", "Kyutai's LmGen step (run with .venv-ref)"),
                       ("ours", "our LmGen step (run with .venv)"),
                       ("rustymimi", "Kyutai's Rust Mimi encode, 32 codebooks (.venv-ref)"),
                       ("mimi", "our Mimi encode, 32 codebooks (.venv)")):  # fmt: skip
        s = sub.add_parser(name, help=what)
        if name in ("ref", "ours"):
            s.add_argument("--size", choices=("1b", "2.6b"), default="1b")
            s.add_argument("--quant", type=int, choices=(4, 8))
            s.add_argument("--group-size", type=int, help="default: Kyutai's (q4: 32, q8: 64)")
            s.add_argument("--batch", type=int, default=1)
        else:
            s.add_argument("--ckpt", required=True, help="random Mimi checkpoint (PyTorch names)")
        s.add_argument("--steps", type=int, default=10, help="timed frames")
        s.add_argument("--warmup", type=int, default=2, help="untimed frames before timing")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--label", help="free text stored in the record")
        s.add_argument("--json-out", help="append the RESULT_JSON line to this file")
    t = sub.add_parser("table", help="markdown table of REF.jsonl OURS.jsonl")
    t.add_argument("files", nargs=2)
    args = p.parse_args(argv)
    if args.cmd == "table":
        return table(args.files)
    if getattr(args, "quant", None) and args.group_size is None:
        args.group_size = 32 if args.quant == 4 else 64
    {"ref": bench_ref, "ours": bench_ours, "rustymimi": bench_rustymimi, "mimi": bench_mimi}[
        args.cmd
    ](args)


if __name__ == "__main__":
    sys.exit(main())
