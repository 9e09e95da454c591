"""Timing the full-duplex frame: the passes behind ``moshi-mlx bench``.

Every pass replays the same positions from a fresh stream: ``warmup`` untimed frames, then
``steps`` timed ones, on the same random inputs (0.1-sigma noise frames for Mimi, uniform
random user codes for the LM alone, as the reference harness).

- ``stages``: a sync after each stage: ``encode``, ``temporal`` and ``depth`` (from
  ``LmGen.step``'s timings), ``decode``; also ``lm`` (the LM step) and ``mimi`` (encode +
  decode). With no LM: Mimi's ``encode`` and ``decode`` of what it just encoded.
- ``lm``: ``LmGen.step`` and the copy of its tokens to the host, nothing else.
- ``frame``: ``DuplexSession.step``, the chat's loop body, with no sync added.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .generate import LmGen
from .lm import Lm
from .mimi import Mimi
from .sampling import Sampling
from .session import DuplexSession

Progress = Callable[[int, int], None]


@dataclass
class Pass:
    """Wall times (ms) of the timed frames of one pass, per stage when synced per stage, and
    the peak memory over them."""

    name: str
    wall_ms: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)
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
    stages: bool = True,
    progress_for: Callable[[str], Progress | None] = lambda name: None,
) -> dict[str, Pass]:
    """The ``stages`` (unless ``stages`` is False), ``lm`` and (with Mimi) ``frame`` passes
    over the LM, with Mimi when given. ``progress_for(pass_name)`` gives each pass's callback.
    Sampling uses ``sampling.seed``, which also picks the inputs."""
    seed = sampling.seed or 0
    rng = np.random.default_rng(seed)
    total = warmup + steps
    user_codes = [mx.array(rng.integers(0, lm.cfg.card, size=(1, lm.cfg.n_user)), mx.int32)
                  for _ in range(total)]  # fmt: skip
    pcms = [(0.1 * rng.standard_normal(1920)).astype(np.float32) for _ in range(total)]
    gen = LmGen(lm, sampling)
    session = DuplexSession(lm, mimi, gen) if mimi is not None else None
    passes: dict[str, Pass] = {}

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
        if session is not None and out is not None:
            t2 = time.perf_counter()
            np.array(session.decode(out[:, 1:]))
            st["decode"] = _ms_since(t2)
            st["mimi"] = st["encode"] + st["decode"]
        return st

    def lm_frame(i):
        out = gen.step(user_codes[i], check=False)  # valid by construction
        if out is not None:
            np.array(out)

    def session_frame(i):
        session.step(pcms[i])

    runs = [("stages", stage_frame)] if stages else []
    runs.append(("lm", lm_frame))
    if session is not None:
        runs.append(("frame", session_frame))
    for name, frame in runs:
        fresh_stream()
        passes[name] = _run(name, frame, warmup, steps, progress_for(name))
    return passes


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
