"""Serial against pipelined engine, side by side in one process: the README's table.

    python scripts/engine_table.py [--rows tiny,medium] [--rounds 5] [--steps 12] [--warmup 3]

Per row (random bf16 LM scaled like ``moshi-mlx bench --dim ... --layers ...``, real-size
random Mimi in float32, MLX's default device), each round times, one after the other: the LM
step alone, one Mimi frame alone (encode + decode), the serial engine and the pipelined
engine (``moshi_mlx.benchmark``: the same passes as ``moshi-mlx bench``). Figures are the
median over rounds of each round's median, with the range of the rounds' medians for the
engines; the machine's load average is printed with each round, since on a shared machine
other work shows in the timings.
"""

from __future__ import annotations

import argparse
import json
import statistics
from types import SimpleNamespace

import mlx.core as mx

import moshi_mlx
from moshi_mlx.app.bench import lm_config_from_args
from moshi_mlx.benchmark import summarize, time_frames, time_mimi
from moshi_mlx.sampling import PRESETS

ROWS = {
    "tiny": dict(dim=256, layers=2, dep_dim=256, dep_layers=2),
    "medium": dict(dim=1024, layers=8, dep_dim=512, dep_layers=2),
}
SCALE = ("config", "dim", "heads", "layers", "dep_dim", "dep_heads", "dep_layers", "context",
         "text_card")  # fmt: skip


def p50(ms: list[float]) -> float:
    return summarize(ms)["median_ms"]


def spread(rounds: list[dict], key: str) -> str:
    """Median of the rounds [their range]."""
    values = [t[key] for t in rounds]
    return f"{statistics.median(values):.1f} [{min(values):.0f}-{max(values):.0f}]"


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def one_round(lm, mimi, sampling, steps: int, warmup: int) -> dict[str, float]:
    t = {"lm": p50(time_frames(lm, None, sampling, steps, warmup, ("lm",))["lm"].wall_ms)}
    t["mimi"] = p50(time_mimi(mimi, steps, warmup, sampling.seed).stages["mimi"])
    for engine in ("serial", "pipelined"):
        frame = time_frames(lm, mimi, sampling, steps, warmup, ("frame",), engine=engine)["frame"]
        t[f"{engine}_interval"] = p50(frame.interval_ms)
        t[f"{engine}_latency"] = p50(frame.latency_ms)
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="tiny,medium")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    sampling = PRESETS["top-k"].replace(seed=299792458)
    mimi = moshi_mlx.random_mimi(seed=sampling.seed)
    mx.eval(mimi.parameters())
    lines = []
    for row in args.rows.split(","):
        flags = SimpleNamespace(**{**dict.fromkeys(SCALE), **ROWS[row]})
        lm = moshi_mlx.random_lm(lm_config_from_args(flags), mx.bfloat16, seed=sampling.seed)
        rounds = []
        for r in range(args.rounds):
            before = load()
            rounds.append(one_round(lm, mimi, sampling, args.steps, args.warmup))
            shown = {k: round(v, 1) for k, v in rounds[-1].items()}
            print(f"# {row} round {r + 1}: {json.dumps(shown)} load {before} -> {load()}")
        m = {k: statistics.median(t[k] for t in rounds) for k in rounds[0]}
        alone = max(m["lm"], m["mimi"])
        lines.append(
            f"| {row} | {m['lm']:.1f} | {m['mimi']:.1f} | {spread(rounds, 'serial_interval')} | "
            f"{m['serial_latency']:.1f} | {spread(rounds, 'pipelined_interval')} | "
            f"{m['pipelined_latency']:.1f} | {m['pipelined_interval'] / alone:.2f} | "
            f"{m['serial_interval'] / m['pipelined_interval']:.2f}x |"
        )
    print("| config | LM step alone | Mimi frame alone | serial interval | serial latency | "
          "pipelined interval | pipelined latency | pipelined / max(LM, Mimi) | "
          "serial / pipelined |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
