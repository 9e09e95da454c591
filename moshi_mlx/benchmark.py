"""Timing the full-duplex frame: the passes behind ``moshi-mlx bench``.

Every pass replays the same positions from a fresh stream: ``warmup`` untimed frames, then
``steps`` timed ones, on the same random inputs (0.1-sigma noise frames for Mimi, uniform
random user codes for the LM alone, as the reference harness).

- ``stages``: a sync after each stage: ``encode``, ``temporal`` and ``depth`` (from
  ``LmGen.step``'s timings), ``decode``; also ``lm`` (the LM step) and ``mimi`` (encode +
  decode). With no LM: Mimi's ``encode`` and ``decode`` of what it just encoded.
- ``lm``: ``LmGen.step`` and the copy of its tokens to the host, nothing else.
- ``frame``: the duplex engine the chat runs (``SerialEngine`` or ``PipelinedEngine``), fed
  each frame as soon as it takes one: the wall time of each ``push``, the time between
  consecutive answers (``interval_ms``: what must stay under 80 ms) and from a frame's
  ``push`` to its answer (``latency_ms``), both in steady state (answers from a ``push``, not
  the final ``flush``).
- ``full_context``: the peak memory of two frames with the LM's KV window full
  (``memory.fill_context``), as in a conversation of more than ``context`` frames.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .engine import DEFAULT_ENGINE, make_engine
from .generate import LmGen
from .lm import Lm
from .memory import fill_context
from .mimi import Mimi
from .sampling import Sampling
from .session import DuplexSession

Progress = Callable[[int, int], None]
PASSES = ("stages", "lm", "frame", "full_context")


@dataclass
class Pass:
    """Wall times (ms) of the timed frames of one pass, per stage when synced per stage, and
    the peak memory over them."""

    name: str
    wall_ms: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)
    interval_ms: list[float] = field(default_factory=list)  # between answers (engine pass)
    latency_ms: list[float] = field(default_factory=list)  # push to answer (engine pass)
    cpu_s: float = 0.0
    peak_bytes: int = 0

    @property
    def cpu_util(self) -> float:
        """Process CPU time over wall time: about 1 for one busy core."""
        return self.cpu_s / max(sum(self.wall_ms) / 1000, 1e-12)


def _run(name: str, frame: Callable[[int], dict | None], warmup: int, steps: int, progress):
    result = Pass(name)
    for i in range(warmup + steps):
        if i == warmup:
            mx.reset_peak_memory()
        w0, c0 = time.perf_counter(), time.process_time()
        stages = frame(i)
        w1, c1 = time.perf_counter(), time.process_time()
        if i >= warmup:
            result.wall_ms.append(1000 * (w1 - w0))
            result.cpu_s += c1 - c0
            for k, v in (stages or {}).items():
                result.stages.setdefault(k, []).append(v)
        if progress is not None:
            progress(i + 1, warmup + steps)
    result.peak_bytes = mx.get_peak_memory()
    return result


def _ms_since(t0: float) -> float:
    return 1000 * (time.perf_counter() - t0)


def time_mimi(mimi: Mimi, steps: int, warmup: int = 5, seed: int = 0, progress=None) -> Pass:
    """Mimi alone: one streaming ``encode_step`` and the ``decode_step`` of its codes per
    frame, each synced (the reference's Mimi bench)."""
    rng = np.random.default_rng(seed)
    shape = (1, 1, mimi.frame_size)
    pcms = [(0.1 * rng.standard_normal(shape)).astype(np.float32) for _ in range(warmup + steps)]
    mimi.reset()

    def frame(i):
        t0 = time.perf_counter()
        codes = mimi.encode_step(mx.array(pcms[i]))
        mx.eval(codes)
        encode = _ms_since(t0)
        t1 = time.perf_counter()
        mx.eval(mimi.decode_step(codes, check=False))
        decode = _ms_since(t1)
        return {"encode": encode, "decode": decode, "mimi": encode + decode}

    return _run("stages", frame, warmup, steps, progress)


def time_frames(
    lm: Lm,
    mimi: Mimi | None,
    sampling: Sampling,
    steps: int,
    warmup: int = 5,
    passes: Collection[str] = PASSES,
    progress_for: Callable[[str], Progress | None] = lambda name: None,
    engine: str = DEFAULT_ENGINE,
) -> dict[str, Pass]:
    """The ``passes`` (of ``PASSES``; ``frame`` through the ``engine``, ``"serial"`` or
    ``"pipelined"``, and ``stages``' Mimi timings only with Mimi) over the LM, with Mimi when
    given. ``progress_for(pass_name)`` gives each pass's callback. Sampling uses
    ``sampling.seed``, which also picks the inputs."""
    seed = sampling.seed or 0
    rng = np.random.default_rng(seed)
    total = warmup + steps
    user_codes = [mx.array(rng.integers(0, lm.cfg.card, size=(1, lm.cfg.n_user)), mx.int32)
                  for _ in range(total)]  # fmt: skip
    pcms = [(0.1 * rng.standard_normal(1920)).astype(np.float32) for _ in range(total)]
    gen = LmGen(lm, sampling)
    session = DuplexSession(lm, mimi, gen) if mimi is not None else None
    wanted, passes = passes, {}

    def fresh_stream():
        if session is not None:
            session.reset()
        gen.reset()

    def stage_frame(i):
        st: dict[str, float] = {}
        t0 = time.perf_counter()
        if session is not None:
            codes = session.encode(pcms[i])
            mx.eval(codes)
            st["encode"] = _ms_since(t0)
        else:
            codes = user_codes[i]
        t1 = time.perf_counter()
        out = gen.step(codes, check=False, timings=st)
        if out is not None:
            np.array(out)
        st["lm"] = _ms_since(t1)
        if session is not None and out is not None and lm.cfg.dep_q:  # STT: nothing to decode
            t2 = time.perf_counter()
            np.array(session.decode(out[:, 1:]))
            st["decode"] = _ms_since(t2)
        if session is not None:
            st["mimi"] = st["encode"] + st.get("decode", 0.0)
        return st

    def lm_frame(i):
        out = gen.step(user_codes[i % total], check=False)  # valid by construction
        if out is not None:
            np.array(out)

    for name, frame in (("stages", stage_frame), ("lm", lm_frame)):
        if name in wanted:
            fresh_stream()
            passes[name] = _run(name, frame, warmup, steps, progress_for(name))
    if session is None:
        if "full_context" in wanted:
            passes["full_context"] = _full_context(lambda f: f(gen), lm_frame)
        return passes
    if not {"frame", "full_context"} & set(wanted):
        return passes
    with make_engine(engine, lm, mimi, gen) as running:
        if "frame" in wanted:
            passes["frame"] = _time_engine(running, pcms, warmup, steps, progress_for("frame"))
            running.reset()
        if "full_context" in wanted:
            passes["full_context"] = _full_context(
                running.lm_call, lambda i: running.push(pcms[i % total]), running.flush
            )
    return passes


def time_batches(
    lm: Lm,
    mimi: Mimi | None,
    sampling: Sampling,
    sizes: Collection[int],
    steps: int,
    warmup: int = 5,
    engine: str = DEFAULT_ENGINE,
    progress_for: Callable[[str], Progress | None] = lambda name: None,
) -> dict[int, Pass]:
    """Batches of independent streams of a speech-to-text model, one pass per size: each
    frame is the engine's ``push`` of a ``[B, 1920]`` block (Mimi's encode overlapping the LM
    step) when Mimi is given, else ``LmGen.step`` of ``[B, n_q]`` random codes."""
    rng = np.random.default_rng(sampling.seed or 0)
    total = warmup + steps
    passes = {}
    for size in sizes:
        gen = LmGen(lm, sampling)
        if mimi is None:
            codes = [mx.array(rng.integers(0, lm.cfg.card, (size, lm.cfg.n_user)), mx.int32)
                     for _ in range(total)]  # fmt: skip

            def frame(i, codes=codes, gen=gen):
                np.array(gen.step(codes[i], check=False))

            passes[size] = _run(
                f"batch {size}", frame, warmup, steps, progress_for(f"batch {size}")
            )
            continue
        pcms = [(0.1 * rng.standard_normal((size, 1920))).astype(np.float32)
                for _ in range(total)]  # fmt: skip
        with make_engine(engine, lm, mimi, gen) as running:
            passes[size] = _time_engine(running, pcms, warmup, steps, progress_for(f"batch {size}"))
    return passes


def batch_report(passes: dict[int, Pass]) -> dict[str, dict]:
    """Per batch size (as text, the JSON key): the frame's time (the interval between answers
    for the pipelined engine), ``rtf`` and ``streams_realtime``: how many streams that rate
    keeps in real time (batch x 80 ms / frame); ``realtime``: whether the whole batch is."""
    rows = {}
    for size, p in passes.items():
        ms = summarize(p.interval_ms or p.wall_ms)["median_ms"]
        rows[str(size)] = {"frame_ms_p50": round(ms, 3), "rtf": round(ms / FRAME_MS, 4),
                           "streams_realtime": round(size * FRAME_MS / ms, 2),
                           "realtime": ms <= FRAME_MS}  # fmt: skip
    return rows


def _time_engine(engine, pcms: list[np.ndarray], warmup: int, steps: int, progress) -> Pass:
    """Push frames as fast as the engine takes them; see the module's ``frame`` pass."""
    pushed, answered, from_push = {}, {}, set()

    def frame(i):
        pushed[i] = time.perf_counter()
        for r in engine.push(pcms[i]):
            answered[r.index] = time.perf_counter()
            from_push.add(r.index)

    result = _run("frame", frame, warmup, steps, progress)
    for r in engine.flush():
        answered[r.index] = time.perf_counter()
    steady = sorted(i for i in from_push if i >= warmup)
    result.latency_ms = [1000 * (answered[i] - pushed[i]) for i in steady]
    result.interval_ms = [1000 * (answered[i] - answered[i - 1]) for i in steady if i > warmup]
    return result


def _full_context(lm_call: Callable, frame: Callable[[int], object], flush=None) -> Pass:
    """Peak memory of two frames with the LM's KV window full, after the frames that fill
    the delays; ``lm_call(fn)`` runs ``fn(gen)`` where the LM's state lives, ``flush()``
    waits for frames in flight."""
    delays = lm_call(lambda gen: gen.cfg.max_delay)
    for i in range(delays + 1):
        frame(i)
    if flush is not None:
        flush()
    lm_call(fill_context)
    mx.reset_peak_memory()
    for i in range(delays + 1, delays + 3):
        frame(i)
    if flush is not None:
        flush()
    return Pass("full_context", peak_bytes=mx.get_peak_memory())


FRAME_MS = 80.0  # one frame of audio


def _p50_p95(result: dict, name: str, ms: list[float] | None) -> None:
    t = summarize(ms or [])
    result[f"{name}_ms_p50"] = round(t["median_ms"], 3) if t else None
    result[f"{name}_ms_p95"] = round(t["p95_ms"], 3) if t else None


def timing_report(passes: dict[str, Pass], engine: str | None) -> dict:
    """The timing keys of ``moshi-mlx bench`` from its passes (``engine``: that of the
    ``frame`` pass, None without one): ``*_ms_p50`` / ``*_ms_p95`` of the frame, LM step,
    Mimi, stages, frame interval and latency; ``rtf`` (the frame interval over 80 ms for the
    pipelined engine, the frame time otherwise), ``rtf_ref``, ``fps``; peak memory (GB)."""
    st = passes["stages"].stages if "stages" in passes else {}
    r: dict = {}
    if "frame" in passes:
        frame, how = passes["frame"].wall_ms, f"{engine} engine push, one per frame as the chat"
    elif "lm" in passes:
        frame, how = passes["lm"].wall_ms, "LmGen.step + host copy (no Mimi)"
    else:
        frame, how = st["mimi"], "Mimi encode_step + decode_step (no LM)"
    _p50_p95(r, "frame", frame)
    r["frame_timing"] = how
    _p50_p95(r, "lm_step", passes["lm"].wall_ms if "lm" in passes else None)
    if "lm" in passes:
        r["lm_step_timing"] = "LmGen.step + host copy of the tokens, no other sync"
    _p50_p95(r, "mimi", st.get("mimi"))
    if "mimi" in st:
        r["mimi_timing"] = "encode_step + decode_step, each synced"
    engine_pass = passes.get("frame", Pass(""))
    _p50_p95(r, "frame_interval", engine_pass.interval_ms)
    _p50_p95(r, "frame_latency", engine_pass.latency_ms)
    r["engine"] = engine if "frame" in passes else None
    pipelined = engine == "pipelined" and r["frame_interval_ms_p50"] is not None
    p50 = r["frame_interval_ms_p50"] if pipelined else r["frame_ms_p50"]
    r["rtf"] = round(p50 / FRAME_MS, 4)
    r["rtf_ref"] = round(FRAME_MS / p50, 4)
    r["rtf_note"] = (
        f"rtf = {'frame interval' if pipelined else 'frame'} / 80 ms (below 1 is real time); "
        "rtf_ref = 80 ms / frame"
    )
    r["fps"] = round(1000.0 / p50, 3)
    for name in ("encode", "temporal", "depth", "decode"):
        if name in st:
            _p50_p95(r, name, st[name])
    if "lm" in st:
        _p50_p95(r, "stages_frame", passes["stages"].wall_ms)
        r["stages_timing"] = "a sync after each stage (temporal includes text sampling)"
    timed = [p for name, p in passes.items() if name != "full_context"]
    r["peak_memory_gb"] = round(max(p.peak_bytes for p in timed) / 1e9, 4)
    full = passes.get("full_context")
    r["peak_memory_full_context_gb"] = round(full.peak_bytes / 1e9, 4) if full else None
    r["cpu_util"] = {name: round(p.cpu_util, 3) for name, p in passes.items() if p.wall_ms}
    return r


def summarize(ms: list[float]) -> dict[str, float] | None:
    """Median, p90, p95, mean, min and max of a list of milliseconds (None when empty)."""
    if not ms:
        return None
    a = np.asarray(ms)
    return {
        "median_ms": float(np.median(a)),
        "p90_ms": float(np.percentile(a, 90)),
        "p95_ms": float(np.percentile(a, 95)),
        "mean_ms": float(a.mean()),
        "min_ms": float(a.min()),
        "max_ms": float(a.max()),
    }
