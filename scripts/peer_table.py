"""Markdown table of a side-by-side run (``scripts/peer_bench.sh``) for the README.

    python scripts/peer_table.py REF.jsonl OURS.jsonl [REF_MLX032.jsonl]

Rows are matched like ``../shared/peer_bench/compare_results.py`` does (bench, config without
delays/weights, quant, dtype); several runs of a row (alternating rounds) give the median of
their medians, with the range. The speed-up is reference median / our median (> 1: we are
faster); the issue's target for the row is shown next to it. The Mimi row is also compared
with ``rustymimi`` (the Rust codec the reference's app uses) when it was timed.
"""

from __future__ import annotations

import json
import statistics
import sys

SIZES = {(256, 2, 256, 2): "tiny", (1024, 8, 512, 2): "medium", (4096, 32, 1024, 6): "7B"}
# Issue 6: at least 2x (tiny bf16), 1.3x (medium bf16), never slower (q4, q8, 7B bf16), 3x Mimi.
TARGETS = {("tiny", "none"): 2.0, ("medium", "none"): 1.3}


def row_key(r: dict) -> tuple:
    cfg = {k: v for k, v in r.get("config", {}).items() if k not in ("delays", "ckpt", "weights")}
    return r["bench"], json.dumps(cfg, sort_keys=True), r.get("quant", "-"), r.get("dtype", "-")


def load(path: str) -> dict[tuple, list[dict]]:
    rows: dict[tuple, list[dict]] = {}
    with open(path) as f:
        for line in f:
            line = line.strip().removeprefix("RESULT_JSON ")
            if line.startswith("{"):
                r = json.loads(line)
                rows.setdefault(row_key(r), []).append(r)
    return rows


def median_of(runs: list[dict], field: str = "median_ms") -> float:
    return statistics.median(r["timing"][field] for r in runs)


def cell(runs: list[dict] | None) -> str:
    if not runs:
        return "–"
    meds = [r["timing"]["median_ms"] for r in runs]
    spread = f" [{min(meds):.1f}–{max(meds):.1f}]" if len(meds) > 1 else ""
    return f"{statistics.median(meds):.1f}{spread} (n={len(meds)})"


def describe(r: dict) -> tuple[str, str]:
    if r["bench"] != "lm_step":
        return "Mimi frame (enc+dec, 8 codebooks)", "f32"
    c = r["config"]
    size = SIZES.get((c["dim"], c["layers"], c["dep_dim"], c["dep_layers"]))
    size = size or f"dim {c['dim']} x {c['layers']}, dep {c['dep_dim']} x {c['dep_layers']}"
    q = r["quant"]
    return f"LM step, {size}", r["dtype"] if q == "none" else f"{r['dtype']} {q.split()[0]}"


def main(paths: list[str]) -> None:
    if len(paths) < 2:
        sys.exit(__doc__)
    ref, ours = load(paths[0]), load(paths[1])
    ref2 = load(paths[2]) if len(paths) > 2 else {}
    rusty = [r for runs in ref.values() for r in runs if r["bench"] == "rustymimi_stream_frame"]
    cols = ["what", "dtype / quant", "reference ms", "ours ms", "speed-up", "target"]
    if ref2:  # the reference on our MLX: what the library upgrade alone is worth
        cols[3:3] = ["reference on MLX 0.32.4 ms"]
        cols[6:6] = ["speed-up vs MLX 0.32.4 reference"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join(" --- " if i < 2 else " ---: " for i in range(len(cols))) + "|")
    for key in sorted(ours, key=lambda k: (k[0], describe(ours[k][0]))):
        mine = ours[key]
        what, dq = describe(mine[0])
        theirs = ref.get(key)
        speedup = f"{median_of(theirs) / median_of(mine):.2f}x" if theirs else "–"
        size = what.split(", ")[-1]
        quant = mine[0].get("quant", "none")
        target = 3.0 if key[0] != "lm_step" else TARGETS.get((size, quant), 1.0)
        cells = [what, dq, cell(theirs), cell(mine), speedup, f">= {target:g}x"]
        if ref2:
            theirs2 = ref2.get(key)
            cells[3:3] = [cell(theirs2)]
            cells[6:6] = [f"{median_of(theirs2) / median_of(mine):.2f}x" if theirs2 else "–"]
        print("| " + " | ".join(cells) + " |")
        if key[0] != "lm_step" and rusty:
            ratio = median_of(rusty) / median_of(mine)
            cells = ["Mimi frame vs rustymimi (Rust, candle)", "f32", cell(rusty), cell(mine),
                     f"{ratio:.2f}x", "stretch: >= 1x"]  # fmt: skip
            if ref2:
                cells[3:3] = ["–"]
                cells[6:6] = ["–"]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
