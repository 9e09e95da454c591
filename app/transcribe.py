"""``moshi-mlx transcribe FILE...``: Kyutai's streaming speech-to-text on WAV files or the mic.

Files are read block by block, mixed to mono and resampled to 24 kHz as ``run`` reads its
input, and transcribed together as one batch of independent streams (``--batch-size`` at a
time; the shorter ones padded with silence), so memory stays bounded however long they are.
The words and their times come from the model's tokens by Kyutai's rule
(``moshi_mlx.stt.timestamped_words``). ``--mic`` shows live captions instead.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moshi_mlx.errors import MoshiError

from .loop import FRAME, SAMPLE_RATE
from .options import add_engine_arguments, add_model_arguments
from .wavio import WavReader, check_writable, create

HELP = "speech to text with Kyutai's STT models: WAV files (batched) or live microphone captions"
DEFAULT_STT_MODEL = "kyutai/stt-1b-en_fr-mlx"
FORMATS = ("text", "json", "srt", "vtt")
SUFFIX = {"text": ".txt", "json": ".json", "srt": ".srt", "vtt": ".vtt"}
DEFAULT_BATCH = 8
MAX_BATCH = 256
# Subtitle cues: a new one after this many words, this long, or a pause this long.
CUE_WORDS, CUE_SECONDS, CUE_PAUSE = 12, 5.0, 1.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", metavar="FILE", nargs="*", help="WAV files (any rate, channels)")
    p.add_argument("--format", choices=FORMATS, default="text", help="output (default text)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", metavar="PATH", help="write the transcript here (1 FILE)")
    out.add_argument("--output-dir", metavar="DIR", help="write FILE's transcript as DIR/NAME.EXT")
    p.add_argument("--force", action="store_true", help="overwrite outputs that exist")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="N",
        help=f"files transcribed together (default: all of them, at most {DEFAULT_BATCH})",
    )
    p.add_argument(
        "--mic", action="store_true", help="live captions from the microphone (Ctrl-C stops)"
    )
    p.add_argument("--input-device", help="microphone for --mic: an index or part of a name")
    add_model_arguments(
        p,
        default=DEFAULT_STT_MODEL,
        dtype_default="float32 on MLX's CPU backend if it fits, as stored on a GPU; see "
        "docs/transcribe.md",
    )
    add_engine_arguments(p.add_argument_group("compute"))


# ---- one stream's result ---------------------------------------------------------------------


@dataclass
class Transcript:
    text: str = ""
    words: list = field(default_factory=list)  # moshi_mlx.stt.Word
    duration: float = 0.0

    def as_json(self) -> dict:
        words = [{"word": w.text, "start": round(w.start, 3), "end": round(w.end, 3)}
                 for w in self.words]  # fmt: skip
        return {"text": self.text, "words": words, "duration": round(self.duration, 3)}


def _clock(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def cues(words) -> list[tuple[float, float, str]]:
    """Subtitle cues ``(start, end, text)``: words grouped until a pause, a length or a count."""
    out, group = [], []
    for w in words:
        if group and (
            len(group) >= CUE_WORDS
            or w.end - group[0].start > CUE_SECONDS
            or w.start - group[-1].end > CUE_PAUSE
        ):
            out.append(group)
            group = []
        group.append(w)
    if group:
        out.append(group)
    return [(g[0].start, max(g[-1].end, g[0].start), " ".join(w.text for w in g)) for g in out]


def render(t: Transcript, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(t.as_json(), ensure_ascii=False) + "\n"
    if fmt == "text":
        return t.text + "\n"
    sep = "," if fmt == "srt" else "."
    blocks = []
    for i, (start, end, text) in enumerate(cues(t.words), 1):
        timing = f"{_clock(start, sep)} --> {_clock(end, sep)}"
        blocks.append(f"{i}\n{timing}\n{text}\n" if fmt == "srt" else f"{timing}\n{text}\n")
    head = "WEBVTT\n\n" if fmt == "vtt" else ""
    return head + "\n".join(blocks)


def write_output(path: Path, text: str, force: bool) -> None:
    """The one place transcripts are written (never over a file without ``--force``)."""
    with create(path, force) as f:
        f.write(text.encode())


# ---- files -----------------------------------------------------------------------------------


def output_paths(args: argparse.Namespace) -> list[Path | None]:
    """Where each FILE's transcript goes (None: stdout), checked before any slow work."""
    if args.output:
        if len(args.files) > 1:
            raise MoshiError("-o takes one FILE; for several, give --output-dir")
        paths = [Path(args.output)]
    elif args.output_dir:
        folder = Path(args.output_dir)
        if not folder.is_dir():
            raise MoshiError(f"--output-dir {folder} is not a folder")
        paths = [folder / (Path(f).stem + SUFFIX[args.format]) for f in args.files]
        if len(set(paths)) < len(paths):
            raise MoshiError("two FILEs have the same name: their transcripts would collide")
    else:
        return [None] * len(args.files)
    inputs = {Path(f).resolve() for f in args.files}
    for path in paths:
        check_writable(path, args.force)
        if path.resolve() in inputs:
            raise MoshiError(f"{path} is one of the FILEs; write the transcript elsewhere")
    return paths


def transcribe_batch(lm, mimi, tokenizer, readers: list[WavReader], args, advance) -> list:
    """The readers' audio as one batch of streams -> a ``Transcript`` each."""
    from moshi_mlx.stt import Transcriber, text_of, timestamped_words

    from .run import input_frames

    frames = [input_frames(r) for r in readers]
    counts = [math.ceil(round(r.frames * SAMPLE_RATE / r.rate) / FRAME) for r in readers]
    peaks = [0.0] * len(readers)
    total = max(counts)
    batch = len(readers)
    with Transcriber(lm, mimi, tokenizer, batch=batch, engine=args.engine) as transcriber:
        for step in range(total):
            block = np.zeros((batch, FRAME), np.float32)
            for row, source in enumerate(frames):
                if step < counts[row]:
                    block[row] = next(source)
                    peaks[row] = max(peaks[row], float(np.abs(block[row]).max()))
            transcriber.push(block if batch > 1 else block[0])
            advance(step + 1, total)
        transcriber.finish()
    results = []
    for row, reader in enumerate(readers):
        # A row's own steps: the silence prefix, its audio, the delay's silence (what a run of
        # this file alone gives; what follows is the padding up to the longest file).
        steps = transcriber.prefix_frames + counts[row] + transcriber.delay_frames
        tokens = transcriber.tokens[row][:steps]
        duration = reader.frames / reader.rate
        if peaks[row] == 0.0:  # digital silence (or nothing): no speech to write
            results.append(Transcript(duration=duration))
            continue
        words = timestamped_words(tokens, tokenizer, transcriber.offset_seconds)
        results.append(Transcript(text_of(tokens, tokenizer).strip(), words, duration))
    return results


def transcribe_files(args: argparse.Namespace, load, say) -> int:
    from .progress import Progress

    paths = output_paths(args)
    size = args.batch_size or min(len(args.files), DEFAULT_BATCH)
    if not 1 <= size <= MAX_BATCH:
        raise MoshiError(f"--batch-size must be in [1, {MAX_BATCH}], got {size}")
    with warnings.catch_warnings():  # every file checked before the model loads (a
        warnings.simplefilter("ignore")  # truncated one warns when it is read)
        for name in args.files:
            WavReader(name).close()
    lm, mimi, tokenizer = load()
    several = len(args.files) > 1
    with Progress() as progress:
        for start in range(0, len(args.files), size):  # a batch's files open at a time
            names = args.files[start : start + size]
            readers = [WavReader(name) for name in names]
            try:
                label = f"transcribing {len(readers)} file{'s' * (len(readers) > 1)}"
                results = transcribe_batch(lm, mimi, tokenizer, readers, args,
                                           progress.task(label))  # fmt: skip
            finally:
                for reader in readers:
                    reader.close()
            # each batch's transcripts as soon as they are done
            for name, path, result in zip(names, paths[start:], results, strict=False):
                text = render(result, args.format)
                if path is not None:
                    write_output(path, text, args.force)
                    say(f"wrote {path}")
                else:
                    if several and args.format != "json":
                        print(f"==> {name} <==")
                    print(text, end="", flush=True)
    return 0


# ---- microphone ------------------------------------------------------------------------------


def open_microphone(args: argparse.Namespace, frames: queue.Queue):
    """An input stream that puts 24 kHz mono 1920-sample frames into ``frames`` (a bounded
    queue; a frame that does not fit is dropped and counted)."""
    from .audio import import_sounddevice, one_line, parse_device
    from .resample import StreamResampler

    sd = import_sounddevice()
    device = parse_device(args.input_device)
    try:
        info = sd.query_devices(device, "input")
    except (sd.PortAudioError, ValueError) as e:
        raise MoshiError(f"no microphone to record from ({one_line(e)}); plug one in or pick "
                         "one with --input-device") from None  # fmt: skip
    rate = SAMPLE_RATE
    try:
        sd.check_input_settings(device=device, channels=1, dtype="float32", samplerate=rate)
    except (sd.PortAudioError, ValueError):
        rate = int(info["default_samplerate"])
    resampler = StreamResampler(rate, SAMPLE_RATE)
    pending = [np.zeros(0, np.float32)]
    dropped = [0]

    def callback(indata, n, time_info, status) -> None:
        pending[0] = np.concatenate([pending[0], resampler(indata[:, 0].copy())])
        while len(pending[0]) >= FRAME:
            frame, pending[0] = pending[0][:FRAME], pending[0][FRAME:]
            try:
                frames.put_nowait(frame)
            except queue.Full:
                dropped[0] += 1

    try:
        block = round(rate * FRAME / SAMPLE_RATE)
        stream = sd.InputStream(samplerate=rate, channels=1, dtype="float32", device=device,
                                blocksize=block, callback=callback)  # fmt: skip
    except (sd.PortAudioError, ValueError) as e:
        raise MoshiError(f"cannot record from {info['name']!r} ({one_line(e)}); pick another "
                         "microphone with --input-device") from None  # fmt: skip
    return stream, dropped


def live_captions(args: argparse.Namespace, load, say, source=None) -> int:
    """Captions as the words are spoken; Ctrl-C stops and keeps what was transcribed (and
    ``-o`` writes it). ``source``: frames to caption instead of the microphone's (tests)."""
    from moshi_mlx.stt import Transcriber

    paths = output_paths(args) if args.output else [None]
    stream, dropped = None, [0]
    if source is None:  # the microphone is checked before the model loads
        frames: queue.Queue = queue.Queue(maxsize=64)  # 5 s behind at most, then frames drop
        stream, dropped = open_microphone(args, frames)

        def microphone():  # until Ctrl-C
            while True:
                yield frames.get()

        source = microphone()
    lm, mimi, tokenizer = load()
    transcriber = Transcriber(lm, mimi, tokenizer, engine=args.engine)
    words, out = [], sys.stdout
    turn_over = True  # nothing said yet

    def show(updates) -> None:
        nonlocal turn_over
        for u in updates:
            if u.text[0]:
                out.write(u.text[0])
                turn_over = False
            words.extend(u.words[0])
            if u.end_of_turn is not None and u.end_of_turn[0] > 0.5 and not turn_over:
                out.write(" [end of turn]\n")
                turn_over = True
        out.flush()

    seen = 0
    try:
        if stream is not None:
            stream.start()
            say("listening; Ctrl-C stops")
        for frame in source:
            seen += 1
            show(transcriber.push(frame))
    except KeyboardInterrupt:
        pass
    finally:
        if stream is not None:
            stream.stop()
            stream.close()
    try:
        show(transcriber.finish())
    finally:
        transcriber.close()
    out.write("\n")
    if dropped[0]:
        say(f"the model fell behind: {dropped[0]} of {seen + dropped[0]} frames were dropped")
    seconds = transcriber.audio_frames * FRAME / SAMPLE_RATE
    result = Transcript(transcriber.text().strip(), words, seconds)
    if paths[0] is not None:
        write_output(paths[0], render(result, args.format), args.force)
        say(f"wrote {paths[0]}")
    return 0


def default_dtype(name: str) -> str | None:
    """The LM's dtype without --dtype: float32 on MLX's CPU backend when the float32 model
    fits, else None (as stored, bf16 for Kyutai's releases). Greedy text is where bf16's
    rounding shows: it flips the choice between nearly tied tokens (a word of the fixture's
    clip1), and on the CPU one stream's frame takes as long in float32 as in bf16 (a batch of
    8 takes 2.8x as long: --dtype bfloat16 trades the precision for that). On a GPU, bf16
    halves the memory read per frame, so it stays as stored (docs/transcribe.md)."""
    import mlx.core as mx

    from moshi_mlx.loading import find_model_files, model_folder
    from moshi_mlx.memory import check_fits

    if mx.default_device().type != mx.cpu:
        return None
    files = find_model_files(model_folder(name, parts=()), parts=())
    if (files.config or {}).get("quantization"):
        return None  # a quantized folder keeps its form
    try:
        check_fits(files.lm_config, mx.float32, mimi=files.mimi_config)
    except MoshiError:
        return None
    return "float32"


# ---- the command -----------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    from .options import load_model, model_choice

    if args.hf_path is None:  # -q then quantizes Kyutai's STT repo while loading
        args.hf_path = DEFAULT_STT_MODEL
    model_choice(args)  # flag errors before any slow work
    if args.mic == bool(args.files):
        raise MoshiError("give WAV FILEs to transcribe, or --mic for live captions (not both)")
    if args.output_dir and args.mic:
        raise MoshiError("--output-dir is for FILEs; with --mic, use -o")

    def say(message: str) -> None:  # what was done, on stderr (stdout holds the transcript)
        print(message, file=sys.stderr, flush=True)

    def report(message: str) -> None:  # progress, for a person at a terminal
        if sys.stderr.isatty():
            say(message)

    def load():
        if args.dtype is None and args.quantize is None:
            args.dtype = default_dtype(args.hf_path)
        return load_model(args, report=report, kind="stt")

    if args.mic:
        return live_captions(args, load, say)
    return transcribe_files(args, load, say)
