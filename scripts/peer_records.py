"""Turn ``moshi-mlx bench --json-out`` lines into the reference harness's records.

    python scripts/peer_records.py OURS_RAW.jsonl >> OURS.jsonl

``../shared/peer_bench/compare_results.py`` (and ``scripts/peer_table.py``) match rows of two
implementations by ``bench``, ``config`` (described in the reference's fields), ``quant`` and
``dtype``, and read ``timing``; this writes our results that way. Its ``timing.rtf`` is the
reference's convention (80 ms / frame, above 1 is faster than real time), the inverse of
``moshi-mlx bench``'s ``rtf``. Development tool: the project itself never imports it.
"""

from __future__ import annotations

import json
import sys

import numpy as np

FRAME_MS = 80.0
SHORT_DTYPE = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
SAMPLER = {"top-p": "default", "top-k": "topk", "greedy": "greedy"}


def timing(ms: list[float], cpu_util: float | None) -> dict:
    """The reference's ``timing`` block of a list of per-frame milliseconds."""
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
        "rtf": round(FRAME_MS / med, 4),
        "cpu_util": cpu_util,
    }


def ref_config(c: dict, dep_scaled: bool) -> dict:
    """Our LM config described with the reference harness's ``config`` fields. Its FFN width
    is upstream MLX's ``dim_feedforward``: ``4 * dim`` gives a gated hidden width of
    ``11 * dim / 4``, another value ``2 * dim_feedforward / 3``. The reference states a scaled
    depformer as ``4 * dep_dim`` and the released one as its config's 4224, the same hidden
    width at the 7B's size: ``dep_scaled`` says which. A negative value marks a width with no
    upstream equivalent."""

    def ff(dim: int, hidden: int, given: int | None) -> int:
        if given is not None and given != 4 * dim and 2 * given // 3 == hidden:
            return given
        return 4 * dim if hidden == 11 * dim // 4 else -hidden

    return {
        "dim": c["dim"],
        "heads": c["num_heads"],
        "layers": c["num_layers"],
        "ffn_dim_feedforward": ff(c["dim"], c["hidden_dim"], None),
        "context": c["context"],
        "dep_dim": c["depformer_dim"],
        "dep_heads": c["depformer_num_heads"],
        "dep_layers": c["depformer_num_layers"],
        "dep_dim_feedforward": ff(
            c["depformer_dim"],
            c["depformer_hidden_dim"],
            None if dep_scaled else c["depformer_dim_feedforward"],
        ),
        "dep_q": c["dep_q"],
        "n_q": c["n_q"],
        "text_card": c["text_card"],
        "audio_card": c["card"],
    }


def records(r: dict) -> list[dict]:
    """The reference records (``lm_step``, ``mimi_mlx_stream_frame``) of one bench result."""
    samples = r["samples_ms"]
    common = {
        "impl": "moshi-mlx",
        "seed": r["seed"],
        "warmup_steps": r["warmup"],
        "positions_timed": [r["warmup"], r["warmup"] + r["steps"] - 1],
        "build_s": r["build_s"],
        "env": {"mlx_version": r["mlx_version"], "device": r["device"]},
        **({"label": r["label"]} if "label" in r else {}),
    }
    out = []
    if r.get("config"):
        q = r["quant"]
        out.append({
            "bench": "lm_step",
            **common,
            "config": ref_config(r["config"], "dep_dim" in r["scaled"]),
            "quant": f"q{q['bits']} group_size {q['group_size']}" if q else "none",
            "dtype": SHORT_DTYPE[r["dtype"]],
            "sampler": SAMPLER[r["sampler"]],
            "timing": timing(samples["lm"], r["cpu_util"].get("lm")),
            "peak_mem_bytes": int(r["peak_memory_gb"] * 1e9),
            "model_bytes": int(r["lm_params_gb"] * 1e9),
        })  # fmt: skip
    mimi = samples.get("stages.mimi")
    if r.get("mimi") and mimi:
        out.append({
            "bench": "mimi_mlx_stream_frame",
            **common,
            "config": {"mimi": "custom" if ", config " in r["mimi"] else "mimi_202407",
                       "num_codebooks": 8, "frame_samples": 1920},
            "dtype": "f32",
            "timing": timing(mimi, None),
            "encode": timing(samples["stages.encode"], None),
            "decode": timing(samples["stages.decode"], None),
            "model_bytes": int(r["mimi_params_gb"] * 1e9),
        })  # fmt: skip
    return out


def main(paths: list[str]) -> None:
    for path in paths:
        with open(path) as f:
            for line in f:
                if line.strip():
                    for rec in records(json.loads(line)):
                        print(json.dumps(rec, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1:])
