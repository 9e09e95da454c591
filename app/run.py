"""``moshi-mlx run IN OUT``: Moshi listens to a WAV file and its answer is written to another.

The input is read as it goes (any common WAV), mixed to mono and resampled to 24 kHz frame by
frame, and fed through the same ``loop.drive`` / ``FrameDriver`` as the live chat; Moshi's
answer is written as it comes, so memory does not grow with the input's length. Moshi's frame
``t`` lands at the same time in OUT as input frame ``t`` in IN (silence while the delays fill),
so the two files line up. With ``--seed`` (or temperatures 0) the output is reproducible.
Ctrl-C stops early and keeps what was computed as a valid, shorter OUT.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from moshi_mlx.errors import MoshiError
from moshi_mlx.outputs import check_input

from .loop import FRAME, FRAME_S, SAMPLE_RATE
from .options import (
    add_engine_arguments,
    add_model_arguments,
    add_persona_arguments,
    add_sampling_arguments,
    check_persona_args,
    sampling_from_args,
)
from .resample import StreamResampler
from .signals import hold_stops, stop_as_interrupt
from .wavio import AtomicWav, WavReader, check_writable

HELP = "Moshi's answer to a WAV file: IN (any common WAV) -> OUT (24 kHz mono WAV) + transcript"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN", help="what the user says: a WAV file (any rate)")
    p.add_argument("output", metavar="OUT", help="where to write Moshi's audio (WAV, 24 kHz)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    add_model_arguments(p)
    add_sampling_arguments(p)
    add_persona_arguments(p)
    add_engine_arguments(p.add_argument_group("compute"))
    p.add_argument(
        "--json", action="store_true", help="print one JSON object (transcript, timings) only"
    )


def input_frames(reader: WavReader) -> Iterator[np.ndarray]:
    """The WAV's audio as 24 kHz mono 1920-sample frames, read, mixed and resampled block by
    block; ``ceil(duration / 80 ms)`` frames, the last one padded with silence."""
    resampler = StreamResampler(reader.rate, SAMPLE_RATE)
    total = math.ceil(round(reader.frames * SAMPLE_RATE / reader.rate) / FRAME)
    pending = np.zeros(0, np.float32)
    sent = 0
    block = max(1, round(reader.rate * FRAME_S))
    while sent < total:
        x = reader.read(block)
        if len(x):
            mono = x.mean(axis=1, dtype=np.float32)
        else:  # the end: push the resampler's delay (and the last frame's padding) out
            mono = np.zeros(block, np.float32)
        pending = np.concatenate([pending, resampler(mono)])
        while len(pending) >= FRAME and sent < total:
            yield pending[:FRAME]
            pending, sent = pending[FRAME:], sent + 1


def output_rule(args: argparse.Namespace) -> dict:
    """The output rule's arguments for OUT (``moshi_mlx.outputs``): a WAV, not IN nor the voice
    prompt, not in the model's folder, replaced only with --force."""
    inputs = {"IN": args.input, "--voice-prompt": args.voice_prompt}
    return dict(force=args.force, what="OUT", inputs=inputs, models=[args.hf_path])


def main(args: argparse.Namespace) -> int:
    from .display import Transcript, transcript_width
    from .loop import FrameDriver, Step, drive
    from .options import load_model, model_choice, prompt_from_args
    from .progress import Progress

    stop_as_interrupt()  # SIGTERM and SIGHUP stop as Ctrl-C does: OUT kept, shorter
    sampling = sampling_from_args(args)
    model_choice(args)  # flag errors before any slow work
    check_persona_args(args)
    out_path = Path(args.output)
    check_writable(out_path, suffix=".wav", kind="run's answer", **output_rule(args))
    reader = WavReader(check_input(args.input, "IN"))
    if reader.frames == 0:
        raise MoshiError(f"{args.input} holds no audio")

    def say(message: str) -> None:  # what was done, on stderr (stdout holds the answer)
        print(message, file=sys.stderr, flush=True)

    def report(message: str) -> None:  # progress, for a person at a terminal
        if sys.stderr.isatty():
            say(message)

    with reader:
        lm, mimi, tokenizer = load_model(args, report=report)
        prompt = prompt_from_args(args, mimi, tokenizer, report=say)
        driver = FrameDriver(lm, mimi, tokenizer, sampling, prompt=prompt, engine=args.engine)
        driver.warmup()
        if prompt is not None:
            say(f"persona prompt applied in {driver.prompt_s:.2f} s")
        total = math.ceil(round(reader.frames * SAMPLE_RATE / reader.rate) / FRAME)
        report(f"{total * FRAME_S:.2f} s of audio ({total} frames)")
        pieces, text_ids, compute = [], [], []
        live_text = not args.json
        transcript = Transcript(width=transcript_width())
        wav = AtomicWav(out_path, 1, SAMPLE_RATE, **output_rule(args))
        interrupted = False

        def collect(_frame, step: Step) -> None:
            wav.write(step.pcm[:, None])
            text_ids.append(step.text_id)
            compute.append(step.compute_s)
            if step.text:
                pieces.append({"frame": step.index, "t": round(step.index * FRAME_S, 2),
                               "text": step.text})  # fmt: skip
            if live_text:
                transcript.step(step.text)
            advance(step.index + 1, total)

        try:
            with Progress() as progress:
                advance = (
                    progress.task("answering", seconds_per_step=FRAME_S)
                    if live_text
                    else (lambda done, n: None)
                )
                start = time.perf_counter()
                drive(driver, input_frames(reader), collect)
        except KeyboardInterrupt:
            interrupted = True
            hold_stops()  # closing OUT takes milliseconds: a second Ctrl-C must not lose it
        except OSError as e:  # a full disk while writing OUT: nothing half-written is left
            wav.discard()
            raise MoshiError(f"cannot write {out_path}: {e.strerror or e}") from None
        except BaseException:
            wav.discard()
            raise
        finally:
            driver.close()
        try:
            wav.close()
        except OSError as e:
            wav.discard()
            raise MoshiError(f"cannot write {out_path}: {e.strerror or e}") from None

    seconds = wav.frames / SAMPLE_RATE
    median = float(np.median(compute)) if compute else math.nan
    text = "".join(p["text"] for p in pieces)
    if args.json:
        print(json.dumps({
            "input": str(args.input),
            "output": str(out_path),
            "input_sample_rate": reader.rate,
            "input_channels": reader.channels,
            "input_seconds": round(reader.frames / reader.rate, 3),
            "sample_rate": SAMPLE_RATE,
            "frames": len(text_ids),
            "seconds": round(seconds, 3),
            "interrupted": interrupted,
            "text": text.strip(),
            "pieces": pieces,
            "text_ids": text_ids,
            "seed": sampling.seed,
            "engine": args.engine,
            "compute_ms_median": round(median * 1000, 2),
            "rtf_median": round(median / FRAME_S, 3),
        }))  # fmt: skip
    else:
        transcript.close()
        say(
            f"wrote {out_path}: {seconds:.2f} s in {time.perf_counter() - start:.1f} s; "
            f"compute {median * 1000:.1f} ms/frame (median, {args.engine}), RTF "
            f"{median / FRAME_S:.2f}"
        )
    if interrupted:
        say(f"interrupted: {out_path} holds the first {seconds:.2f} s of the answer")
        return 130
    return 0
