"""Figures of ``moshi-mlx serve``: frame latency over loopback and the Opus cost per frame.

    python scripts/serve_latency.py [--rows fixture,tiny,medium] [--seconds 30] [--engine E]
    python scripts/serve_latency.py --opus [--frames 500]

Latency: a model folder of random weights is written for each row (the LM scaled as in
scripts/engine_table.py, the real-size Mimi, a small tokenizer; or the tests' fixture
model), ``moshi-mlx serve`` is started on it, and a client of Kyutai's protocol
(tests/serve_client.py: sphn + aiohttp) sends Ogg Opus frames at the real-time pace (one per
80 ms) for ``--seconds``. Once a second the server's stats name the client frame its last
audio answered: the time from sending that frame to receiving that answer is one latency
sample (exact whatever frames the lag policy dropped). Printed as ``key=value``: p50/p95 in
ms, samples, answers, frames dropped by the server.

Opus: the server's per-frame work with sphn, one 1920-sample frame of voice-like audio encoded
(``OpusStreamWriter.append_pcm``) and one decoded (``OpusStreamReader.append_bytes``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
ROWS = {
    "tiny": dict(dim=256, layers=2, dep_dim=256, dep_layers=2),
    "medium": dict(dim=1024, layers=8, dep_dim=512, dep_layers=2),
}


def voice_like(seconds: float) -> list[np.ndarray]:
    t = np.arange(int(seconds * 24000)) / 24000
    f = 180 + 60 * np.sin(2 * np.pi * 0.7 * t)
    x = 0.3 * np.sin(2 * np.pi * np.cumsum(f) / 24000) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    n = len(x) // 1920
    return list(x[: n * 1920].astype(np.float32).reshape(n, 1920))


def fixture_folder(folder: Path) -> Path:
    """The test suite's fixture model (tiny LM, tiny Mimi) converted as the tests do: compute
    far under 80 ms, so its latency is the server's own."""
    import shutil

    from conftest import LM_DIR, MIMI_DIR, train_spm

    from moshi_mlx.convert.convert import convert

    repo = folder / "repo"
    repo.mkdir()
    shutil.copy(LM_DIR / "weights.safetensors", repo / "model.safetensors")
    shutil.copy(MIMI_DIR / "weights.safetensors", repo / "mimi.safetensors")
    shutil.copy(train_spm(folder / "spm"), repo / "tokenizer_spm_32k_3.model")
    shutil.copy(LM_DIR / "config.json", repo / "config.json")
    out = folder / "moshi-fixture"
    convert(repo, out, dtype="float32", mimi_weights=repo / "mimi.safetensors",
            mimi_config=MIMI_DIR / "config.json")  # fmt: skip
    return out


def model_folder(row: str, folder: Path) -> Path:
    """A model folder ``moshi_mlx.load`` reads: random bf16 LM of the row, random Mimi."""
    import mlx.core as mx

    if row == "fixture":
        return fixture_folder(folder)
    from conftest import train_spm
    from mlx.utils import tree_flatten

    from moshi_mlx.app.bench import lm_config_from_args
    from moshi_mlx.random_weights import random_lm, random_mimi

    scale = dict.fromkeys(("config", "heads", "dep_heads", "context"))
    cfg = lm_config_from_args(argparse.Namespace(**scale, text_card=32000, **ROWS[row]))
    out = folder / f"moshi-{row}"
    out.mkdir(parents=True)
    lm = random_lm(cfg, mx.bfloat16)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(lm.parameters())),
                        {"format": "mlx"})  # fmt: skip
    mimi = random_mimi()
    mx.save_safetensors(str(out / "mimi.safetensors"), dict(tree_flatten(mimi.parameters())),
                        {"format": "mlx"})  # fmt: skip
    tok = train_spm(folder / "spm", cfg.text_card)
    (out / "tokenizer_spm_32k_3.model").write_bytes(tok.read_bytes())
    config = {
        "format": "moshi-mlx",
        "model_type": "moshi",
        "lm": cfg.to_dict(),
        "mimi": mimi.cfg.to_dict(),
        "quantization": None,
        "dtype": "bfloat16",
        "files": {"lm": ["model.safetensors"], "mimi": "mimi.safetensors",
                  "tokenizer": "tokenizer_spm_32k_3.model"},
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def latency(row: str, seconds: float, engine: str) -> dict:
    from serve_client import talk

    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(row, Path(tmp))
        cmd = [str(Path(sys.executable).with_name("moshi-mlx")), "serve", "--hf-path",
               str(folder), "--port", "0", "--engine", engine]  # fmt: skip
        server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        try:
            line = server.stdout.readline()
            m = re.match(r"open http://([^/]+)/", line)
            if not m:
                raise SystemExit(f"the server did not start: {line!r}")
            url = f"ws://{m[1]}/api/chat"
            reply = asyncio.run(talk(url, voice_like(seconds), query={"text_seed": "1"},
                                     pace_s=0.08, timeout_s=seconds + 5))  # fmt: skip
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(60)
    ms = np.array(reply.answered_latency_s) * 1000
    dropped = max((m.get("dropped", 0) for m in reply.metadata), default=0)
    return {
        "row": row,
        "engine": engine,
        "latency_ms_p50": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
        "latency_ms_p95": round(float(np.percentile(ms, 95)), 1) if len(ms) else None,
        "samples": len(ms),
        "frames_sent": int(seconds / 0.08),
        "answers": len(reply.audio),
        "dropped": dropped,
    }


def opus_cost(frames: int) -> dict:
    import sphn

    pcm = voice_like(frames * 0.08 + 0.08)[:frames]
    writer, reader = sphn.OpusStreamWriter(24000), sphn.OpusStreamReader(24000)
    encode, decode = [], []
    for x in pcm:
        t0 = time.perf_counter()
        data = writer.append_pcm(x)
        t1 = time.perf_counter()
        reader.append_bytes(data)
        t2 = time.perf_counter()
        encode.append(t1 - t0)
        decode.append(t2 - t1)
    e, d = np.array(encode[5:]) * 1000, np.array(decode[5:]) * 1000
    return {
        "frames": frames,
        "encode_ms_p50": round(float(np.median(e)), 3),
        "encode_ms_p95": round(float(np.percentile(e, 95)), 3),
        "decode_ms_p50": round(float(np.median(d)), 3),
        "decode_ms_p95": round(float(np.percentile(d, 95)), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="fixture,tiny,medium")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--engine", default="pipelined", choices=("serial", "pipelined"))
    p.add_argument("--opus", action="store_true", help="the Opus cost per frame only")
    p.add_argument("--frames", type=int, default=500)
    args = p.parse_args()
    with open("/proc/loadavg") if Path("/proc/loadavg").exists() else open(__file__) as f:
        load = " ".join(f.readline().split()[:3]) if f.name == "/proc/loadavg" else "-"
    results = [opus_cost(args.frames)] if args.opus else [
        latency(row, args.seconds, args.engine) for row in args.rows.split(",")
    ]  # fmt: skip
    for r in results:
        print(" ".join(f"{k}={v}" for k, v in r.items()) + f" load={load.replace(' ', '/')}")


if __name__ == "__main__":
    main()
