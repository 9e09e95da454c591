"""``moshi-mlx chat``: talk with Moshi, full duplex, microphone -> Mimi -> LM -> Mimi -> speakers.

Four threads: PortAudio's callback only moves numpy frames through two bounded queues
(``audio.DuplexAudio``); the microphone stage turns each block into a 24 kHz mono frame and
cancels Moshi's echo in it (``echo.MicStage``); one compute thread owns every MLX array (it
loads the model, warms it up and runs ``loop.drive`` over the cleaned frames, applying the
``LagPolicy``); the main thread draws the screen, watches the stream and handles Ctrl-C.
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from moshi_mlx.errors import MoshiError
from moshi_mlx.outputs import write_output

from .audio import (
    DuplexAudio,
    Format,
    LagPolicy,
    MicBlock,
    MoshiFrame,
    NativeStderrFilter,
    choose_devices,
    import_sounddevice,
    list_devices,
    one_line,
)
from .display import make_screen
from .echo import EchoCanceller, MicStage
from .loop import FRAME, FRAME_S, SAMPLE_RATE, FrameDriver, Step, drive, split_frames
from .options import (
    add_engine_arguments,
    add_model_arguments,
    add_persona_arguments,
    add_sampling_arguments,
    check_persona_args,
    load_model,
    model_choice,
    prompt_from_args,
    sampling_from_args,
)
from .recording import Recorder, transcript_path
from .signals import STOPPING
from .wavio import check_writable, read_wav, resample, to_mono

HELP = "talk with Moshi: microphone -> Moshi -> speakers, full duplex, with a live transcript"
DEFAULT_MAX_LAG_MS = 400.0
STALL_S = 2.0  # no audio callback for this long means the stream is dead
STREAM_STOPPED = (
    "the audio stream stopped: a sound device failed or was disconnected "
    "(see `moshi-mlx chat --list-devices`)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p)
    add_persona_arguments(p)
    add_engine_arguments(p.add_argument_group("compute"))
    g = p.add_argument_group("audio")
    g.add_argument("--list-devices", action="store_true", help="list the sound devices and exit")
    g.add_argument("--input-device", help="microphone: device index or (part of a) name")
    g.add_argument("--output-device", help="speakers: device index or (part of a) name")
    g.add_argument(
        "--max-lag-ms",
        type=float,
        default=DEFAULT_MAX_LAG_MS,
        help="most audio that may wait in the app's queues when compute falls behind; older "
        f"frames are dropped beyond it (default {DEFAULT_MAX_LAG_MS:g}, at least 80)",
    )
    g.add_argument(
        "--device-latency",
        default="low",
        help="PortAudio buffering: 'low', 'high' or seconds (raise it if the sound crackles)",
    )
    g.add_argument(
        "--record",
        metavar="PATH",
        help="save the conversation: WAV (1 microphone, 2 Moshi, 3 cleaned microphone with "
        "--echo-cancel on) and a timestamped transcript beside it (talk.wav -> "
        "talk.transcript.txt); written as you talk, never over an existing file",
    )
    g.add_argument("--force", action="store_true", help="let --record overwrite existing files")
    e = p.add_argument_group("echo cancellation (WebRTC AEC3)")
    e.add_argument(
        "--echo-cancel",
        choices=("on", "off"),
        default="on",
        help="remove Moshi's own voice from the microphone, so that loudspeakers work "
        "(default on; the microphone passes untouched until an echo is heard)",
    )
    e.add_argument(
        "--noise-suppression", action="store_true", help="also suppress steady background noise"
    )
    e.add_argument(
        "--auto-gain", action="store_true", help="also level the microphone automatically"
    )
    # For tests and debugging, not shown in --help.
    g.add_argument("--debug-dump", metavar="NPZ", help=argparse.SUPPRESS)
    g.add_argument("--debug-play", metavar="WAV", help=argparse.SUPPRESS)  # instead of Moshi
    g.add_argument("--debug-slow-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    # RATE:IN:OUT, the device format to open instead of choosing one (tests)
    g.add_argument("--debug-format", type=_format, help=argparse.SUPPRESS)
    g.add_argument("--status-every", type=float, default=5.0, help=argparse.SUPPRESS)


def _format(text: str) -> Format:
    rate, n_in, n_out = (int(v) for v in text.split(":"))
    return Format(rate, n_in, n_out)


class _LeaveNow(Exception):
    """End the process at once with ``code``, after the one-line ``message`` if any.

    The interpreter's normal exit terminates PortAudio and waits for threads, and puts back
    Python's own signal handlers: with a sound device that vanished, or the model thread still
    inside MLX, that can hang for good or abort the process, and a Ctrl-C then finds the
    default handler. Whatever must be kept (recording, summary) is written before this is
    raised.
    """


def _leave(code: int, message: str | None = None) -> None:
    if message:
        print(f"moshi-mlx chat: {message}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(args: argparse.Namespace) -> int:
    # Flag and path mistakes first: they are answered before sound or MLX is imported.
    sampling = None if args.list_devices else _check_args(args)
    try:
        with NativeStderrFilter():
            sd = import_sounddevice()
            if args.list_devices:
                print(list_devices(sd))
                return 0
            return Chat(args, sd, sampling).run()
    except _LeaveNow as e:
        _leave(*e.args)


def _check_args(args: argparse.Namespace):
    """The ``Sampling`` of the flags, after checking every flag and path (nothing heavy)."""
    if not FRAME_S * 1000 <= args.max_lag_ms < math.inf:
        raise MoshiError(
            f"--max-lag-ms must be a finite number of ms, at least {FRAME_S * 1000:g} (a frame)"
        )
    if args.device_latency not in ("low", "high"):
        try:
            args.device_latency = float(args.device_latency)
        except ValueError:
            args.device_latency = math.nan
        if not 0 <= args.device_latency <= 10:
            raise MoshiError("--device-latency must be 'low', 'high' or seconds (0 to 10)")
    if args.echo_cancel == "off" and (args.noise_suppression or args.auto_gain):
        raise MoshiError("--noise-suppression and --auto-gain need --echo-cancel on")
    if args.record:
        check_writable(args.record, args.force, suffix=".wav", kind="the recording",
                       **_output_rule(args))  # fmt: skip
        check_writable(transcript_path(Path(args.record)), args.force, **_output_rule(args))
    if args.debug_dump:
        check_writable(args.debug_dump, args.force, suffix=".npz", kind="the dump",
                       **_output_rule(args))  # fmt: skip
    sampling = sampling_from_args(args)
    model_choice(args)
    check_persona_args(args)
    return sampling


def _output_rule(args: argparse.Namespace) -> dict:
    """What chat's files must never overwrite (``moshi_mlx.outputs``): what it reads."""
    inputs = {"--voice-prompt": args.voice_prompt, "--debug-play": args.debug_play}
    return dict(inputs=inputs, models=[args.hf_path])


class Chat:
    def __init__(self, args: argparse.Namespace, sd, sampling):
        self.args, self.sd, self.sampling = args, sd, sampling
        self.stop = threading.Event()
        self.screen = None

    def run(self) -> int:
        args = self.args
        devices = choose_devices(self.sd, args.input_device, args.output_device, args.debug_format)
        screen = self.screen = make_screen(status_every_s=args.status_every)
        fmt = "" if devices.format.rate == SAMPLE_RATE else f" (converted from {devices.format})"
        screen.info(f"microphone: {devices.input_name} | speakers: {devices.output_name}{fmt}")
        max_waiting = int(args.max_lag_ms // (FRAME_S * 1000))
        worker = ComputeWorker(args, self.sampling, max_waiting)
        self._catch_signals()
        worker.start()
        audio = recorder = stage = None
        failure, loaded = None, False
        early = False  # stopped while the model was loading: nothing to wait for or keep
        try:
            while not worker.ready.wait(0.1):
                self._pump(worker)
                if worker.error is not None:
                    raise worker.error
                if self.stop.is_set():
                    early = True
                    screen.info("stopped before the conversation started")
                    raise _LeaveNow(130)
            self._pump(worker)
            loaded = True
            audio = DuplexAudio(self.sd, devices, max_waiting, args.device_latency)
            canceller = None
            if args.echo_cancel == "on":
                canceller = EchoCanceller(args.noise_suppression, args.auto_gain)
            stage = MicStage(audio.mic, audio.conversion.mic, canceller)
            recorder = None
            if args.record:
                recorder = Recorder(args.record, cleaned=canceller is not None, force=args.force,
                                    **_output_rule(args))  # fmt: skip
            worker.attach(audio, stage, recorder)
            stage.start()
            try:
                audio.start()
            except self.sd.PortAudioError as e:
                raise MoshiError(f"cannot start the sound devices: {one_line(e)}") from None
            worker.go.set()
            screen.ready("listening: speak now (Ctrl-C to stop)")
            failure = self._converse(worker, audio)
        except _LeaveNow:
            raise
        except Exception as e:
            if not loaded:  # the command line prints it
                raise
            # After the model loaded: one line, never through the interpreter's teardown (see
            # _LeaveNow), which can abort the process with threads or streams half made.
            if not isinstance(e, (MoshiError, OSError)):
                traceback.print_exc()
                failure = f"internal error (a bug in moshi-mlx): {one_line(e)}"
            else:
                failure = one_line(e)
        finally:
            if audio is not None:
                audio.stop()
            worker.halt.set()
            if stage is not None:
                stage.halt.set()
                if stage.ident is not None:  # started
                    stage.join(timeout=5)
            # A model thread still loading may be deep inside MLX or a download: never waited
            # for (the process ends with os._exit); nothing it says comes after the stop.
            if not early:
                worker.join(timeout=30)
                self._pump(worker)
            screen.close()
            if audio is not None and worker.stage is not None:
                try:
                    self._finish(worker, audio, recorder)
                except (MoshiError, OSError) as e:
                    failure = failure or one_line(e)
        if not loaded and not worker.is_alive():
            return 0
        # After a conversation, never through the interpreter's teardown (see _LeaveNow).
        raise _LeaveNow(1 if failure else 0, failure and f"error: {failure}")

    def _converse(self, worker: ComputeWorker, audio: DuplexAudio) -> str | None:
        """Runs until Ctrl-C (None) or a failure (its one-line message)."""
        screen = self.screen
        stall = StallClock(time.monotonic())
        while not self.stop.wait(0.1):
            self._pump(worker)
            screen.tick()
            if worker.error is not None:
                raise worker.error
            if worker.stage.error is not None:
                raise worker.stage.error
            if audio.failed.is_set() or not audio.active:
                return STREAM_STOPPED
            if stall.silent(audio.blocks, time.monotonic()) > STALL_S:  # the device is gone
                return STREAM_STOPPED
        return None

    def _pump(self, worker: ComputeWorker) -> None:
        screen = self.screen
        while True:
            try:
                kind, value = worker.events.get_nowait()
            except queue.Empty:
                break
            if kind == "info":
                screen.info(value)
            elif kind == "text":
                screen.text(value)
        if worker.snapshot is not None:
            screen.stats(worker.snapshot)

    def _finish(self, worker: ComputeWorker, audio: DuplexAudio, recorder) -> None:
        if recorder is not None:
            worker.flush_text()
            wav, txt = recorder.close()
            self.screen.info(f"recording: {wav} (transcript: {txt})")
        if self.args.debug_dump:
            worker.write_dump(self.args.debug_dump)
        self.screen.summary(worker.summary())

    def _catch_signals(self) -> None:
        """Ctrl-C (and SIGTERM, SIGHUP) ask for a clean stop; a second one ends the process at once
        (the recording is a valid file at all times, missing at most its last second). The
        handlers stay until the process ends: a second Ctrl-C while it exits must not find
        Python's own, which would wait for the sound and model threads."""

        def on_signal(signum, frame):
            if self.stop.is_set():
                try:
                    os.write(NativeStderrFilter.original_stderr(), b"moshi-mlx chat: stopped\n")
                except OSError:
                    pass
                os._exit(130)
            self.stop.set()

        for s in STOPPING:
            signal.signal(s, on_signal)


class StallClock:
    """How long the audio stream has been silent while this process ran: time spent suspended
    (Ctrl-Z, then fg) is no stall, so each turn of the main loop counts at most half a second;
    the lag policy drops what was missed meanwhile."""

    def __init__(self, now: float):
        self.blocks, self.last, self.silent_s = -1, now, 0.0

    def silent(self, blocks: int, now: float) -> float:
        """Seconds without a new callback, given the callbacks so far and the time now."""
        if blocks != self.blocks:
            self.blocks, self.silent_s = blocks, 0.0
        else:
            self.silent_s += min(now - self.last, 0.5)
        self.last = now
        return self.silent_s


def _frames_of(path: str) -> list[np.ndarray]:
    """``--debug-play``: a WAV file as 24 kHz mono frames, played instead of Moshi's output (the
    echo tests use it to make the far end a known signal)."""
    x, rate = read_wav(path)
    return split_frames(resample(to_mono(x), rate, SAMPLE_RATE))


def _median(values) -> float | None:
    return float(np.median(values)) if len(values) else None


class ComputeWorker(threading.Thread):
    """The one thread that touches MLX: loads the model, warms it up, then turns microphone
    frames into Moshi frames until ``halt`` is set."""

    def __init__(self, args: argparse.Namespace, sampling, max_waiting: int):
        super().__init__(name="moshi-compute", daemon=True)
        self.args, self.sampling = args, sampling
        self.policy = LagPolicy(max_waiting)
        self.events: queue.Queue = queue.Queue()
        self.ready, self.go, self.halt = threading.Event(), threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.snapshot: dict | None = None
        self.audio: DuplexAudio | None = None
        self.stage: MicStage | None = None
        self.recorder: Recorder | None = None
        self.play = _frames_of(args.debug_play) if args.debug_play else None
        self.driver: FrameDriver | None = None
        self.pending: dict[int, tuple[np.ndarray, str]] = {}  # computed, not played yet
        self.compute_s: list[float] = []
        self.latency_s: list[float] = []
        self.blocks = 0  # microphone blocks taken from the queue
        self.last_block = -1
        self.dropped_mic = self.dropped_speaker = 0
        self.t0 = None
        dump = args.debug_dump is not None
        self.dump: dict[str, list] | None = {k: [] for k in _DUMP_KEYS} if dump else None

    def attach(self, audio: DuplexAudio, stage: MicStage, recorder: Recorder | None) -> None:
        self.audio, self.stage, self.recorder = audio, stage, recorder

    def run(self) -> None:
        try:
            lm, mimi, tokenizer = load_model(self.args, report=self._info)
            self.no_codes = np.full(lm.cfg.dep_q, -1)
            prompt = prompt_from_args(self.args, mimi, tokenizer, report=self._info)
            driver = FrameDriver(lm, mimi, tokenizer, self.sampling,
                                 slow_s=self.args.debug_slow_ms / 1000, prompt=prompt,
                                 engine=self.args.engine)  # fmt: skip
            self.driver = driver
            self._info("warming up" + (" and applying the persona prompt" if prompt else ""))
            seconds = driver.warmup()
            self._info(f"warm-up done in {seconds:.1f} s ({self.args.engine} engine)")
            if prompt is not None:
                self._info(f"persona prompt applied in {driver.prompt_s:.2f} s")
            self.ready.set()
            while not self.go.wait(0.05):
                if self.halt.is_set():
                    return
            self.t0 = time.monotonic()
            drive(driver, self._mic_frames(), self._on_step)
        except BaseException as e:  # handed to the main thread, which raises it
            self.error = e
        finally:
            from moshi_mlx.engine import finish_thread

            if self.driver is not None:
                self.driver.close()  # the engine's LM thread stops with this one
            finish_thread()

    def _info(self, message: str) -> None:
        self.events.put(("info", message))

    # -- the source: microphone frames, minus what the lag policy drops --------------------
    def _mic_frames(self):
        audio, stage = self.audio, self.stage
        while not self.halt.is_set():
            try:
                block = stage.out.get(timeout=0.05)
            except queue.Empty:
                continue
            self._account(block)
            decision = self.policy.decide(
                stage.waiting(), audio.speaker.qsize(), block.spare, self.driver.in_flight
            )
            self._dump_block(block, decision)
            if decision == LagPolicy.DROP_MIC:
                self.dropped_mic += 1
                self._publish()
                continue
            if decision == LagPolicy.DROP_SPEAKER:
                try:
                    self._discard(audio.speaker.get_nowait())
                except queue.Empty:
                    pass
            yield block

    def _account(self, block: MicBlock) -> None:
        """Book-keeping for one callback: what it played, the recording, the latency."""
        self.blocks += 1
        self.last_block = block.index
        played, text = self.pending.pop(block.played, (None, ""))
        if block.played >= 0 and not math.isnan(block.played_latency):
            self.latency_s.append(block.played_latency + FRAME_S)
        if self.recorder is not None:
            clean = block.pcm if self.recorder.cleaned else None
            self.recorder.block(block.index, block.raw, played, block.roundtrip, clean)
            if text:
                self.recorder.text(block.index, text)

    def _discard(self, frame: MoshiFrame) -> None:
        """A computed Moshi frame that will never play (dropped by the lag policy)."""
        self.dropped_speaker += 1
        _, text = self.pending.pop(frame.step, (None, ""))
        if text and self.recorder is not None:
            self.recorder.text(self.last_block + 1, text)

    # -- the sink: computed frames to the speaker queue -------------------------------------
    def _on_step(self, block: MicBlock, step: Step) -> None:
        pcm = step.pcm if self.play is None else self.play[step.index % len(self.play)]
        self.pending[step.index] = (pcm, step.text)
        frame = MoshiFrame(step.index, block.adc, pcm, self.audio.conversion.speaker(pcm))
        try:
            self.audio.speaker.put_nowait(frame)
        except queue.Full:
            self._discard(frame)
        if step.text:
            self.events.put(("text", step.text))
        self.compute_s.append(step.compute_s)
        if self.dump is not None:
            d = self.dump
            d["step_block"].append(block.index)
            d["step_pcm_in"].append(block.pcm)
            d["step_pcm_raw"].append(block.raw)
            d["step_pcm_out"].append(pcm)
            d["step_user_codes"].append(step.user_codes)
            d["step_codes"].append(step.codes if step.codes is not None else self.no_codes)
            d["step_text"].append(-1 if step.text_id is None else step.text_id)
            d["step_compute_s"].append(step.compute_s)
        self._publish()

    def _dump_block(self, block: MicBlock, decision: str) -> None:
        if self.dump is not None:
            d = self.dump
            d["block_index"].append(block.index)
            d["block_played"].append(block.played)
            d["block_played_latency"].append(block.played_latency)
            d["block_device_latency"].append(block.dac - block.adc)
            d["block_roundtrip"].append(block.roundtrip)
            d["block_dropped"].append(decision == LagPolicy.DROP_MIC)
            d["block_waiting"].append(self.stage.waiting() + self.audio.speaker.qsize())
            # every block as the microphone stage made it, computed or dropped
            d["block_pcm_raw"].append(block.raw)
            d["block_pcm_in"].append(block.pcm)

    def _publish(self) -> None:
        audio = self.audio
        compute = _median(self.compute_s[-50:])
        latency = _median(self.latency_s[-25:])
        self.snapshot = {
            "t": 0.0 if self.t0 is None else time.monotonic() - self.t0,
            "frames": len(self.compute_s),
            "compute_ms": None if compute is None else compute * 1000,
            "rtf": None if compute is None else compute / FRAME_S,
            "latency_ms": None if latency is None else latency * 1000,
            "mic_queue": self.stage.waiting(),
            "speaker_queue": audio.speaker.qsize(),
            "dropped": self.dropped_mic + self.dropped_speaker + audio.overflows,
            "underruns": audio.underruns,
        }
        if self.stage.canceller is not None:
            self.snapshot["erle_db"] = _median(self.stage.erle_db[-25:])
            self.snapshot["echo_heard"] = self.stage.echo_heard

    def flush_text(self) -> None:
        """Text of frames computed but never played still belongs in the transcript."""
        for step in sorted(self.pending):
            _, text = self.pending.pop(step)
            if text and self.recorder is not None:
                self.recorder.text(self.last_block + 1, text)

    def summary(self) -> dict:
        audio = self.audio
        compute = _median(self.compute_s)
        latency = _median(self.latency_s)
        fields = {
            "duration_s": f"{audio.blocks * FRAME_S:.1f}",
            "frames": len(self.compute_s),
            "blocks": audio.blocks,
            "dropped": self.dropped_mic + self.dropped_speaker + audio.overflows,
            "dropped_mic": self.dropped_mic,
            "dropped_speaker": self.dropped_speaker,
            "lost": audio.overflows,
            "underruns": audio.underruns,
            "compute_ms_median": "-" if compute is None else f"{compute * 1000:.1f}",
            "rtf_median": "-" if compute is None else f"{compute / FRAME_S:.2f}",
            "latency_ms_median": "-" if latency is None else f"{latency * 1000:.0f}",
            "latency_ms_max": "-" if not self.latency_s else f"{max(self.latency_s) * 1000:.0f}",
            "sample_rate": audio.format.rate,
            "in_channels": audio.format.in_channels,
            "out_channels": audio.format.out_channels,
            "echo_cancel": "off" if self.stage.canceller is None else "on",
        }
        if self.stage.canceller is not None:
            erle, cost = _median(self.stage.erle_db), _median(self.stage.process_s)
            fields["erle_db_median"] = "-" if erle is None else f"{erle:.1f}"
            fields["echo_ms_median"] = "-" if cost is None else f"{cost * 1000:.2f}"
            fields["echo_heard_s"] = f"{self.stage.heard_frames * FRAME_S:.1f}"
        for flag, n in sorted(audio.flags.items()):
            fields[flag] = n
        return fields

    def write_dump(self, path: str) -> None:
        """Everything the compute thread saw and made, for tests (``--debug-dump``)."""
        d = self.dump
        arrays = {k: np.asarray(v) for k, v in d.items() if not k.startswith("step_") or v}
        arrays["max_waiting"] = np.asarray(self.policy.max_waiting)
        arrays["frame"] = np.asarray(FRAME)

        def save(tmp: Path) -> None:
            with open(tmp, "xb") as f:
                np.savez(f, **arrays)

        write_output(path, save, force=self.args.force, suffix=".npz", kind="the dump",
                     **_output_rule(self.args))  # fmt: skip


_DUMP_KEYS = (
    "block_index",
    "block_played",
    "block_played_latency",
    "block_device_latency",
    "block_roundtrip",
    "block_dropped",
    "block_waiting",
    "block_pcm_raw",
    "block_pcm_in",
    "step_block",
    "step_pcm_in",
    "step_pcm_raw",
    "step_pcm_out",
    "step_user_codes",
    "step_codes",
    "step_text",
    "step_compute_s",
)
