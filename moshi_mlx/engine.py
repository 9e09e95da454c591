"""Duplex engines: the user's 80 ms frames in, Moshi's frames out, Mimi and the LM either one
after the other or at the same time.

- ``SerialEngine``: Mimi ``encode_step`` -> ``LmGen.step`` -> Mimi ``decode_step`` on the
  caller's thread (``DuplexSession``); a frame costs the sum of the three, and the answer to
  a frame comes back from the ``push`` of that frame (``lag`` 0).
- ``PipelinedEngine``: the LM runs on a thread of its own while the caller's thread runs
  Mimi, so while the LM computes frame t, Mimi decodes frame t-1 and encodes frame t+1: a
  frame costs max(LM, Mimi), and the answer to a frame comes back from the next ``push``
  (``lag`` 1, one frame later than serial). The codes, text and audio are exactly those of
  the serial engine: only when the work runs changes.

Why a thread and not two MLX streams driven from one thread: ``mx.eval`` and
``mx.async_eval`` return only once at most about a hundred dispatched operations remain in
flight (MLX's scheduler keeps 10 tasks of 10 dispatches: ``MAX_ACTIVE_TASKS``,
``DISPATCHES_PER_TASK``), so "launching" one LM step or one Mimi frame (thousands of
operations each) holds the launching thread for ~97 % of its run, and a graph launched next
starts when the first has nearly finished (measured: an async Mimi encode held its thread for
~90 of its ~92 ms). Each thread, by contrast, evaluates on its own default stream at its own
pace. The slots are shared by all threads, though, so two threads that each evaluate a whole
step starve each other (both ran 1.5-2x slower side by side): on CPU streams both threads
evaluate in pieces (``moshi_mlx.pieces``), which leaves results unchanged.

Threads and arrays: the LM thread creates every per-conversation array of the ``LmGen`` (its
KV cache, random key and tokens: ``reset`` runs there) and the caller's thread every array of
Mimi; the model weights are computed before the thread starts and only read. The two threads
exchange numpy arrays only. A thread that ran MLX work calls ``finish_thread`` before it
ends (the LM thread does; so must the caller's thread if it is not the main one).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from .errors import MoshiError
from .generate import LmGen
from .lm import Lm
from .mimi import Mimi
from .pieces import in_pieces
from .session import DuplexSession, FrameResult, frame_result

ENGINES = ("serial", "pipelined")
DEFAULT_ENGINE = "pipelined"
MIMI_DEVICES = ("gpu", "cpu")


def default_mimi_device() -> mx.Device:
    """Where Mimi runs unless told: the CPU on Apple silicon (MLX's CPU backend uses Apple's
    BLAS there, and the GPU is left to the LM, whose every frame is bound by reading its
    weights: as upstream's app runs its codec on the CPU) and on machines where MLX has no GPU;
    the GPU elsewhere (measured on an H200: Mimi takes 11-14 ms a frame there, ~310 ms on MLX's
    Linux CPU backend, and 4 s beside the LM on the GPU in the pipelined engine)."""
    if mx.metal.is_available() or not mx.cuda.is_available():
        return mx.Device(mx.cpu)
    return mx.Device(mx.gpu)


def mimi_device(name: str | None) -> mx.Device:
    """``"gpu"``, ``"cpu"`` or None (``default_mimi_device``) -> an ``mx.Device``."""
    if name is None:
        return default_mimi_device()
    if name not in MIMI_DEVICES:
        raise MoshiError(f"`mimi_device` must be gpu or cpu, got {name!r}")
    if name == "gpu" and not (mx.metal.is_available() or mx.cuda.is_available()):
        raise MoshiError("`mimi_device` gpu: MLX has no GPU on this machine; use cpu")
    return mx.Device(mx.gpu if name == "gpu" else mx.cpu)


def finish_thread() -> None:
    """Call last in a thread (other than the main one) that ran MLX work: it drops the
    thread's MLX streams and random state. Left to the thread's exit, MLX's per-thread random
    state takes the GIL in its destructor, which aborts the process (``terminate called
    without an active exception``) when the interpreter is shutting down at that moment."""
    mx.clear_streams()


class SerialEngine:
    """Mimi encode -> LM step -> Mimi decode, one after the other on the caller's thread.

    ``push(pcm)`` returns the answer to that same frame. Use it on one thread. Creating it
    starts a new conversation (resets ``gen`` and Mimi's streams).
    """

    lag = 0

    def __init__(self, lm: Lm, mimi: Mimi, gen: LmGen):
        self.session = DuplexSession(lm, mimi, gen)
        self.session.reset()

    def push(self, pcm: np.ndarray) -> list[FrameResult]:
        """One frame of user audio (``[1920]`` float32, 24 kHz) -> ``[its FrameResult]``."""
        return [self.session.step(pcm)]

    @property
    def in_flight(self) -> int:
        """Frames pushed whose answers have not come back: none here."""
        return 0

    def flush(self) -> list[FrameResult]:
        """Answers still in flight: none here."""
        return []

    def reset(self) -> None:
        """Start a new conversation (with a seed, sampling restarts from the same state)."""
        self.session.reset()

    def lm_call(self, fn: Callable[[LmGen], object]):
        """``fn(gen)``, on the thread that owns the LM's state (here: this one)."""
        return fn(self.session.gen)

    def close(self) -> None:
        """Nothing to stop; for the same use as ``PipelinedEngine``."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PipelinedEngine:
    """The LM on its own thread, Mimi on the caller's: a frame costs max(LM, Mimi).

    ``push(pcm)`` encodes the frame (caller's thread), hands its codes to the LM thread, then
    waits for the LM's answer to the previous frame and decodes it while the LM computes this
    one: it returns ``[answer to the previous frame]`` (nothing after the first push).
    ``flush()`` returns the answers still in flight (at the end of the input). Results are
    exactly those of ``SerialEngine`` for the same frames and seed.

    Create, use and close it on one thread (the one that made Mimi; the LM's weights must be
    computed). An exception in either thread stops both: the first ``push`` or ``flush``
    that meets it raises it, once, and the engine is closed (later calls raise
    ``MoshiError``). ``close()`` (or leaving a ``with`` block) stops the LM thread; its
    current step finishes first. Creating it starts a new conversation.
    """

    lag = 1

    def __init__(self, lm: Lm, mimi: Mimi, gen: LmGen):
        self.session = DuplexSession(lm, mimi, gen)
        self.gen = gen
        self.lm_device = mx.default_device()
        mx.eval(lm.parameters())  # the LM thread may only read computed arrays
        self._jobs: queue.Queue = queue.Queue()
        self._done: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._ended = threading.Event()  # set by the LM thread as its very last act
        self._pending: deque[tuple[int, np.ndarray]] = deque()  # LM steps in flight
        self._frames = 0
        self._closed = False
        self._thread = threading.Thread(target=self._lm_loop, name="moshi-lm", daemon=True)
        self._thread.start()
        self.reset()

    # -- the LM thread -------------------------------------------------------------------------

    def _lm_loop(self) -> None:
        try:
            with mx.stream(self.lm_device), in_pieces(self.lm_device.type == mx.cpu):
                while True:
                    job = self._jobs.get()
                    if job is None or self._stop.is_set():
                        return
                    try:
                        self._done.put((True, job(self.gen)))
                    except BaseException as e:  # handed to the caller, which raises it
                        self._done.put((False, e))
                        return
        finally:
            finish_thread()
            self._ended.set()

    def _call(self, job: Callable[[LmGen], object]) -> None:
        self._jobs.put(job)

    def _result(self):
        ok, value = self._done.get()
        if not ok:
            raise value
        return value

    # -- the caller's thread -------------------------------------------------------------------

    def _mimi_pieces(self):
        return in_pieces(self.session.mimi_device.type == mx.cpu)

    def _check_open(self) -> None:
        if self._closed:
            raise MoshiError(
                "this engine was closed (after an error, or by close()); make a new one"
            )

    def push(self, pcm: np.ndarray) -> list[FrameResult]:
        """One frame of user audio (``[1920]`` float32, 24 kHz) -> the answers finished now:
        ``[answer to the previous frame]``, or ``[]`` after the first frame."""
        self._check_open()
        self.session.check_pcm(pcm)  # a bad argument leaves the engine running
        try:
            with self._mimi_pieces():
                user = np.array(self.session.encode(pcm))  # overlaps the LM's previous step
            self._call(lambda gen: _lm_step(gen, user))
            self._pending.append((self._frames, user))
            self._frames += 1
            return [self._finish()] if len(self._pending) > self.lag else []
        except BaseException:
            self.close()
            raise

    @property
    def in_flight(self) -> int:
        """Frames pushed whose answers have not come back yet (at most ``lag`` between
        pushes); each adds 80 ms between the user's voice and Moshi's answer."""
        return len(self._pending)

    def flush(self) -> list[FrameResult]:
        """Wait for the answers still in flight and return them (oldest first)."""
        self._check_open()
        try:
            return [self._finish() for _ in range(len(self._pending))]
        except BaseException:
            self.close()
            raise

    def _finish(self) -> FrameResult:
        """Wait for the LM's answer to the oldest frame in flight and decode it."""
        index, user = self._pending.popleft()
        out, heads = self._result()
        if out is None:
            return FrameResult(None, None, user[0], None, index)
        pcm = None
        if out.shape[1] > 1:  # a speech-to-text model's frame is its text token only
            with self._mimi_pieces():
                pcm = np.array(self.session.decode(mx.array(out[:, 1:])))  # overlaps the next step
        return frame_result(pcm, out, user, heads, index)

    def reset(self) -> None:
        """Start a new conversation: frames in flight are dropped, the LM (on its thread) and
        Mimi are reset (with a seed, sampling restarts from the same state)."""
        self._check_open()
        try:
            while self._pending:
                self._pending.popleft()
                self._result()
            self.session.mimi.reset()
            self._call(lambda gen: gen.reset())
            self._result()
            self._frames = 0
        except BaseException:
            self.close()
            raise

    def lm_call(self, fn: Callable[[LmGen], object]):
        """``fn(gen)`` on the LM thread (which owns the ``LmGen``'s arrays); returns its
        result. No frame may be in flight (``flush`` first)."""
        self._check_open()
        if self._pending:
            raise MoshiError("lm_call needs the frames in flight answered first (flush)")
        try:
            self._call(fn)
            return self._result()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the LM thread (after its current step) and wait for it. Idempotent; if a
        Ctrl-C interrupts the wait, the next ``close`` waits again."""
        self._closed = True
        self._stop.set()
        self._jobs.put(None)
        if self._thread is not threading.current_thread():
            # Not Thread.join: on Python 3.11 a KeyboardInterrupt during join marks a thread
            # that still runs as ended, and a process that then exits with the LM thread
            # inside MLX aborts (seen with two quick Ctrl-C's on `run`).
            self._ended.wait()
            self._thread.join()  # at once now: only the thread's exit is left
        self._pending.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _lm_step(gen: LmGen, user: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """One ``LmGen.step`` on the LM thread: the user's codes ``[B, n_user]`` in, Moshi's
    tokens ``[B, 1 + dep_q]`` (None while the delays fill) and the extra heads out, as
    numpy."""
    out = gen.step(mx.array(user), check=False)  # codes from our Mimi: valid by construction
    heads = gen.last_extra_heads
    return (
        None if out is None else np.array(out),
        None if heads is None or out is None else np.array(heads),
    )


def make_engine(kind: str, lm: Lm, mimi: Mimi, gen: LmGen) -> SerialEngine | PipelinedEngine:
    """The engine ``kind`` (``"serial"`` or ``"pipelined"``) over these models."""
    if kind not in ENGINES:
        raise MoshiError(f"`engine` must be one of {', '.join(ENGINES)}, got {kind!r}")
    return (SerialEngine if kind == "serial" else PipelinedEngine)(lm, mimi, gen)
