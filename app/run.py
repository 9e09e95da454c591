"""``moshi-mlx run IN OUT``: Moshi listens to a WAV file and its answer is written to another.

The input is read (any common WAV), mixed to mono and resampled to 24 kHz, then fed frame by
frame through the same ``loop.drive`` / ``FrameDriver`` as the live chat; Moshi's frame ``t``
lands at the same time in OUT as input frame ``t`` in IN (silence while the delays fill), so
the two files line up. With ``--seed`` (or temperatures 0) the output is reproducible.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from moshi_mlx.errors import MoshiError

from .options import add_model_arguments, add_sampling_arguments, sampling_from_args
from .wavio import read_wav, resample, to_mono, write_wav

HELP = "Moshi's answer to a WAV file: IN (any common WAV) -> OUT (24 kHz mono WAV) + transcript"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN", help="what the user says: a WAV file (any rate)")
    p.add_argument("output", metavar="OUT", help="where to write Moshi's audio (WAV, 24 kHz)")
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument(
        "--json", action="store_true", help="print one JSON object (transcript, timings) only"
    )


def read_input(path: str | Path) -> tuple[np.ndarray, dict]:
    """Mono 24 kHz float32 audio of a WAV file, and what the file was."""
    from .loop import SAMPLE_RATE

    x, rate = read_wav(path)
    if len(x) == 0:
        raise MoshiError(f"{path} holds no audio")
    info = {"sample_rate": rate, "channels": x.shape[1], "seconds": round(len(x) / rate, 3)}
    return resample(to_mono(x), rate, SAMPLE_RATE), info


def main(args: argparse.Namespace) -> int:
    from .loop import FRAME, FRAME_S, SAMPLE_RATE, FrameDriver, Step, drive, split_frames
    from .options import load_model, model_choice

    sampling = sampling_from_args(args)
    model_choice(args)  # flag errors before any slow work
    out_path = Path(args.output)
    if out_path.is_dir():
        raise MoshiError(f"OUT {out_path} is a folder; give a file name")
    if not out_path.parent.is_dir():
        raise MoshiError(f"the folder of OUT ({out_path.parent}) does not exist")
    if out_path.exists() and out_path.resolve() == Path(args.input).resolve():
        raise MoshiError("OUT would overwrite IN")
    pcm, info = read_input(args.input)

    def report(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    lm, mimi, tokenizer = load_model(args, report=report)
    driver = FrameDriver(lm, mimi, tokenizer, sampling)
    driver.warmup()
    frames = split_frames(pcm)
    report(f"{len(frames)} frames ({len(frames) * FRAME_S:.2f} s of audio)")

    steps: list[Step] = []
    live_text = not args.json

    def collect(_frame, step: Step) -> None:
        steps.append(step)
        if live_text and step.text:
            print(step.text, end="", flush=True)

    drive(driver, frames, collect)
    audio = np.concatenate([s.pcm for s in steps])
    write_wav(out_path, audio, SAMPLE_RATE)

    compute = np.array([s.compute_s for s in steps])
    text = "".join(s.text for s in steps)
    if args.json:
        result = {
            "input": str(args.input),
            "output": str(out_path),
            "input_sample_rate": info["sample_rate"],
            "input_channels": info["channels"],
            "input_seconds": info["seconds"],
            "sample_rate": SAMPLE_RATE,
            "frames": len(steps),
            "seconds": round(len(audio) / SAMPLE_RATE, 3),
            "text": text.strip(),
            "pieces": [
                {"frame": s.index, "t": round(s.index * FRAME / SAMPLE_RATE, 2), "text": s.text}
                for s in steps
                if s.text
            ],
            "text_ids": [s.text_id for s in steps],
            "seed": sampling.seed,
            "compute_ms_median": round(float(np.median(compute)) * 1000, 2),
            "rtf_median": round(float(np.median(compute)) / FRAME_S, 3),
        }
        print(json.dumps(result))
    else:
        print(flush=True)
        report(
            f"wrote {out_path}: {len(audio) / SAMPLE_RATE:.2f} s; compute "
            f"{np.median(compute) * 1000:.1f} ms/frame (median), RTF "
            f"{np.median(compute) / FRAME_S:.2f}"
        )
    return 0
