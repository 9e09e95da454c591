"""The duplex engines: the pipelined one computes exactly what the serial one does, one frame
later at most, and stops cleanly (both threads, error reported once) whatever fails."""

from __future__ import annotations

import signal
import threading
import time

import mlx.core as mx
import numpy as np
import pytest
from conftest import LM_DIR, MIMI_DIR, run_python

import moshi_mlx
from moshi_mlx import LmConfig, Quantization
from moshi_mlx.engine import PipelinedEngine, SerialEngine, make_engine, mimi_device
from moshi_mlx.errors import MoshiError

FRAMES = 6


@pytest.fixture(scope="module")
def models():
    lm = moshi_mlx.load_lm(LM_DIR / "weights.safetensors", LM_DIR / "config.json")
    mimi = moshi_mlx.load_mimi(MIMI_DIR / "weights.safetensors", MIMI_DIR / "config.json")
    return lm, mimi


@pytest.fixture(scope="module")
def frames(mimi_io) -> np.ndarray:
    return np.array(mimi_io["pcm"][0, 0, : FRAMES * 1920]).reshape(FRAMES, 1920)


def lm_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "moshi-lm"]


def run(engine, frames) -> tuple[list, list[int]]:
    """All answers, and for each the number of pushes made when it came back."""
    results, pushes = [], []
    for i, pcm in enumerate(frames):
        for r in engine.push(pcm):
            results.append(r)
            pushes.append(i + 1)
    for r in engine.flush():
        results.append(r)
        pushes.append(len(frames) + 1)
    return results, pushes


def answers(models, kind: str, frames, seed: int = 3, **sampling):
    lm, mimi = models
    with make_engine(kind, lm, mimi, moshi_mlx.LmGen(lm, seed=seed, **sampling)) as engine:
        return run(engine, frames)


def assert_same(a: list, b: list) -> None:
    assert [r.index for r in a] == [r.index for r in b] == list(range(len(a)))
    for x, y in zip(a, b, strict=True):
        assert x.text_id == y.text_id
        assert np.array_equal(x.user_codes, y.user_codes)
        if x.pcm is None:
            assert y.pcm is None and y.codes is None
        else:
            assert np.array_equal(x.codes, y.codes)
            assert x.pcm.dtype == y.pcm.dtype == np.float32 and np.array_equal(x.pcm, y.pcm)


@pytest.mark.parametrize("sampling", [{}, {"temp": 0.0, "temp_text": 0.0}], ids=["top-k", "greedy"])
def test_pipelined_answers_equal_serial_answers(models, frames, sampling):
    serial, _ = answers(models, "serial", frames, **sampling)
    pipelined, _ = answers(models, "pipelined", frames, **sampling)
    assert len(serial) == FRAMES
    assert sum(r.pcm is not None for r in serial) == FRAMES - 1  # the first fills the delays
    assert_same(serial, pipelined)


@pytest.mark.parametrize("kind", ["serial", "pipelined"])
def test_a_bad_frame_is_refused_and_the_engine_goes_on(models, frames, kind):
    lm, mimi = models
    expected, _ = answers(models, "serial", frames)
    with make_engine(kind, lm, mimi, moshi_mlx.LmGen(lm, seed=3)) as engine:
        for bad, words in ((list(frames[0]), "got list"), (frames[0][:100], "got (100,)"),
                           (frames[0].astype(np.int16), "float numpy array")):  # fmt: skip
            with pytest.raises(MoshiError, match="`pcm` must be a float numpy array") as e:
                engine.push(bad)
            assert words in str(e.value)
        got, _ = run(engine, frames)
    assert_same(expected, got)


@pytest.mark.parametrize("dtype, bits", [(mx.bfloat16, None), (mx.bfloat16, 4), (mx.float16, 8)])
def test_pipelined_equals_serial_in_low_precision(models, frames, dtype, bits):
    # On CPU the LM thread runs the depformer uncompiled, in pieces: still the same bits.
    cfg = LmConfig(dim=128, text_card=64, num_heads=2, num_layers=2, context=8,
                   depformer_dim=64, depformer_dim_feedforward=264, depformer_num_heads=2,
                   depformer_num_layers=2)  # fmt: skip
    lm = moshi_mlx.random_lm(cfg, dtype, Quantization(bits) if bits else None, seed=1)
    random = (lm, models[1])
    assert_same(answers(random, "serial", frames)[0], answers(random, "pipelined", frames)[0])


def test_serial_engine_is_the_session(models, frames):
    lm, mimi = models
    session = moshi_mlx.DuplexSession(lm, mimi, moshi_mlx.LmGen(lm, seed=3))
    session.reset()
    by_hand = [session.step(pcm) for pcm in frames]
    assert_same(by_hand, answers(models, "serial", frames)[0])


def test_pipelined_answers_at_most_one_frame_later_than_serial(models, frames):
    _, serial = answers(models, "serial", frames)
    _, pipelined = answers(models, "pipelined", frames)
    lag = [p - i - 1 for i, p in enumerate(pipelined)]  # pushes after the frame's own
    assert serial == list(range(1, FRAMES + 1))  # each answer from its own push
    assert lag == [1] * FRAMES  # the next push (the last one: flush)


def test_in_flight_counts_frames_waiting_for_their_answer(models, frames):
    lm, mimi = models
    with PipelinedEngine(lm, mimi, moshi_mlx.LmGen(lm, seed=1)) as engine:
        assert engine.in_flight == 0
        engine.push(frames[0])
        assert engine.in_flight == 1
        assert len(engine.push(frames[1])) == 1 and engine.in_flight == 1
        assert len(engine.flush()) == 1 and engine.in_flight == 0
    assert SerialEngine(lm, mimi, moshi_mlx.LmGen(lm)).in_flight == 0


def test_reset_replays_the_conversation(models, frames):
    lm, mimi = models
    with PipelinedEngine(lm, mimi, moshi_mlx.LmGen(lm, seed=5)) as engine:
        first, _ = run(engine, frames)
        engine.push(frames[0])  # left in flight: reset drops it
        engine.reset()
        again, _ = run(engine, frames)
    assert_same(first, again)
    assert_same(first, answers(models, "serial", frames, seed=5)[0])


class Injected(RuntimeError):
    pass


def fail_at(fn, frame: int, error: BaseException):
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == frame + 1:
            raise error
        return fn(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("stage", ["encode", "lm", "decode"])
@pytest.mark.parametrize(
    "error", [Injected("device lost"), KeyboardInterrupt()], ids=["error", "ctrl-c"]
)
def test_a_failure_in_any_stage_stops_both_threads_and_is_raised_once(
    models, frames, monkeypatch, stage, error
):
    lm, mimi = models
    gen = moshi_mlx.LmGen(lm, seed=3)
    engine = PipelinedEngine(lm, mimi, gen)
    target = {"encode": (mimi, "encode_step"), "lm": (gen, "step"), "decode": (mimi, "decode_step")}
    obj, name = target[stage]
    monkeypatch.setattr(obj, name, fail_at(getattr(obj, name), 3, error))
    raised = []
    for pcm in frames:
        try:
            engine.push(pcm)
        except type(error) as e:
            raised.append(e)
        except MoshiError as e:
            assert "closed" in str(e)  # every later call: the engine is closed
    assert raised == [error]  # the very error, once
    assert not lm_threads()
    with pytest.raises(MoshiError, match="closed"):
        engine.flush()
    engine.close()  # idempotent
    # Nothing left behind: a new engine on the same models answers as a fresh serial one.
    monkeypatch.undo()
    assert_same(answers(models, "pipelined", frames)[0], answers(models, "serial", frames)[0])


def test_closing_with_frames_in_flight_stops_the_thread(models, frames):
    lm, mimi = models
    for _ in range(10):
        engine = PipelinedEngine(lm, mimi, moshi_mlx.LmGen(lm))
        engine.push(frames[0])
        engine.push(frames[1])
        engine.close()
        assert not lm_threads()


def test_engine_choice_and_mimi_device_are_checked(models):
    lm, mimi = models
    with pytest.raises(MoshiError, match="`engine` must be one of serial, pipelined"):
        make_engine("parallel", lm, mimi, moshi_mlx.LmGen(lm))
    with pytest.raises(MoshiError, match="`mimi_device` must be gpu or cpu"):
        mimi_device("tpu")
    assert mimi_device("cpu") == mx.Device(mx.cpu)


# Run in a fresh interpreter: a crash at exit (an abort in MLX's per-thread state) only shows
# in the exit code. Engines are started and stopped many times, on the main thread and, as
# the chat does, on a worker thread that ends before the interpreter does.
_CYCLES = f"""
import threading
import numpy as np
import moshi_mlx
from moshi_mlx import LmConfig, Quantization
from moshi_mlx.engine import PipelinedEngine, finish_thread

lm = moshi_mlx.load_lm({str(LM_DIR / "weights.safetensors")!r}, {str(LM_DIR / "config.json")!r})
mimi = moshi_mlx.load_mimi({str(MIMI_DIR / "weights.safetensors")!r},
                           {str(MIMI_DIR / "config.json")!r})
pcm = np.zeros(1920, np.float32)

def cycles(n):
    for i in range(n):
        with PipelinedEngine(lm, mimi, moshi_mlx.LmGen(lm, seed=i)) as engine:
            for _ in range(i % 4):
                engine.push(pcm)

def worker():
    try:
        moshi_mlx.random_mimi(mimi.cfg)  # uses MLX's per-thread random state
        cycles(10)
    finally:
        finish_thread()

cycles(20)
for _ in range(3):
    t = threading.Thread(target=worker)
    t.start()
    t.join()
assert not [t for t in threading.enumerate() if t.name == "moshi-lm"]
print("done")
"""


@pytest.mark.parametrize("run_number", range(4))
def test_many_start_stop_cycles_never_crash(run_number):
    result = run_python(_CYCLES, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "done"


def test_close_interrupted_by_ctrl_c_waits_for_the_lm_thread_the_next_time(models):
    """Two quick Ctrl-C's: one stops the wait for an answer, the next the wait in ``close``.
    The next ``close`` must still wait until the LM thread has really ended (on Python 3.11
    an interrupted ``Thread.join`` marks a running thread as ended, and a process that left
    with the LM thread inside MLX aborted)."""
    lm, mimi = models
    engine = PipelinedEngine(lm, mimi, moshi_mlx.LmGen(lm))
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def slow(gen):
        started.set()
        release.wait(30)
        finished.set()

    def ctrl_c_twice():
        main = threading.main_thread().ident
        started.wait(30)
        time.sleep(0.1)  # the main thread waits for slow's answer
        signal.pthread_kill(main, signal.SIGINT)
        while not engine._closed:
            time.sleep(0.01)
        time.sleep(0.1)  # the main thread waits in close(), slow still running
        signal.pthread_kill(main, signal.SIGINT)
        time.sleep(0.3)
        release.set()

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    helper = threading.Thread(target=ctrl_c_twice)
    try:
        helper.start()
        with pytest.raises(KeyboardInterrupt):
            engine.lm_call(slow)
        assert not finished.is_set()  # both Ctrl-C's came while slow ran
        engine.close()
        assert finished.is_set() and not lm_threads()
    finally:
        release.set()
        helper.join()
        signal.signal(signal.SIGINT, previous)
        engine.close()
