"""Flags shared by the commands, and the library objects they turn into.

Every command that takes a model, quantizes or samples uses these, so a flag means the same
everywhere: ``-q/--quantize [BITS]`` with ``--q-bits`` and ``--q-group-size`` (a
``moshi_mlx.Quantization``), ``--dtype``, the sampling flags (a ``moshi_mlx.Sampling``), and
``--engine`` / ``--mimi-device`` (``moshi_mlx.engine``).
Argument destinations carry the library's argument names, so the library's error messages
name these flags (see ``cli.flags_for``). Importing this module imports nothing heavy.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Collection
from pathlib import Path

DEFAULT_MODEL = "kyutai/moshiko-mlx-q4"
KYUTAI_REPOS = {(4, 32): "kyutai/moshiko-mlx-q4", (8, 64): "kyutai/moshiko-mlx-q8"}
DTYPES = ("bfloat16", "float16", "float32")
SAMPLERS = ("top-k", "top-p", "greedy")  # moshi_mlx.sampling.PRESETS
ENGINES = ("serial", "pipelined")  # moshi_mlx.engine.ENGINES
DEFAULT_ENGINE = "pipelined"  # moshi_mlx.engine.DEFAULT_ENGINE
MIMI_DEVICES = ("gpu", "cpu")  # moshi_mlx.engine.MIMI_DEVICES
DEFAULT_BITS = 4


def _bits_type(positionals: bool) -> Callable[[str], int]:
    hint = " (put -q after IN and OUT, or use --q-bits)" if positionals else ""

    def bits(text: str) -> int:
        if text not in ("4", "8"):
            raise argparse.ArgumentTypeError(f"takes 4 or 8 bits, got {text!r}{hint}")
        return int(text)

    return bits


# `moshi-mlx run` on MLX's CPU backend, 2 shared x86 cores (docs/startup.md).
QUANTIZE_ON_CPU = (
    "on Apple GPUs quantized models are faster and smaller; on MLX's CPU backend (Linux) they "
    "run slower than bf16 (real-time factor 2.11 at 4 bits, 1.57 at 8, 0.73-0.94 unquantized)"
)


def add_quantization_arguments(group) -> None:
    # -q takes an optional value: before a command's positional arguments it would eat one.
    positionals = any(not a.option_strings for a in group._actions)
    group.add_argument(
        "-q",
        "--quantize",
        nargs="?",
        const=0,
        type=_bits_type(positionals),
        metavar="BITS",
        help=f"quantize the LM's linear and embedding layers, BITS 4 or 8 (default "
        f"{DEFAULT_BITS}; same as --q-bits); {QUANTIZE_ON_CPU}",
    )
    group.add_argument("--q-bits", dest="bits", type=int, help="bits with -q: 4 or 8")
    group.add_argument(
        "--q-group-size",
        dest="group_size",
        type=int,
        help="weights per scale with -q: 32, 64 or 128 (default 32 for 4-bit, 64 for 8-bit)",
    )


def input_file(text: str) -> str:
    """argparse ``type`` of a flag naming a file to read: refused at once (before anything
    heavy is imported) when missing or not a file."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file")
    if not path.exists():
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    return text


def add_model_arguments(
    parser: argparse.ArgumentParser,
    default: str | None = DEFAULT_MODEL,
    dtype_default: str = "as stored",
):
    g = parser.add_argument_group("model")
    where = f"default {default}, downloaded and cached on first use" if default else "required"
    g.add_argument(
        "--hf-path",
        default=None,
        help=f"model folder or Hugging Face repo id: written by `moshi-mlx convert`, one of "
        f"Kyutai's MLX repos or its PyTorch release ({where}; HF_HUB_OFFLINE=1 uses the "
        "cache only)",
    )
    add_quantization_arguments(g)
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help=f"cast unquantized LM weights to this dtype (default: {dtype_default})",
    )
    return g


def quantization_from_args(args: argparse.Namespace):
    """The ``Quantization`` that ``-q``, ``--q-bits`` and ``--q-group-size`` ask for, or None."""
    from moshi_mlx.errors import MoshiError

    if args.quantize is None:
        if args.bits is not None or args.group_size is not None:
            raise MoshiError("--q-bits and --q-group-size need -q/--quantize")
        return None
    if args.quantize and args.bits is not None and args.bits != args.quantize:
        raise MoshiError(f"-q {args.quantize} and --q-bits {args.bits} disagree; give one")
    from moshi_mlx.quantize import Quantization  # (imports MLX)

    bits = args.quantize or (DEFAULT_BITS if args.bits is None else args.bits)  # never 0 -> 4
    return Quantization(bits, args.group_size)


def add_engine_arguments(group) -> None:
    """``--engine`` and ``--mimi-device``: how a frame's work is scheduled, and where Mimi runs."""
    group.add_argument(
        "--engine",
        choices=ENGINES,
        default=DEFAULT_ENGINE,
        help=f"serial: Mimi, then the LM, then Mimi, one after the other; pipelined: Mimi runs "
        f"while the LM computes the next frame, a frame costs max(LM, Mimi) and Moshi answers "
        f"one frame (80 ms) later (default {DEFAULT_ENGINE})",
    )
    group.add_argument(
        "--mimi-device",
        choices=MIMI_DEVICES,
        default=None,
        help="where Mimi runs (default: cpu on Apple silicon, leaving the GPU to the LM as "
        "Kyutai's app does, and where MLX has no GPU; gpu elsewhere)",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    from_default = "(from --sampler)"
    g = parser.add_argument_group("sampling (temperature 0 = greedy; 0 switches top-k/top-p off)")
    g.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="top-k",
        help="base settings: top-k = upstream PyTorch's (audio temp 0.8 top-k 250, text temp "
        "0.7 top-k 25; the default), top-p = upstream MLX's (temp 0.8, top-p 0.95), greedy",
    )
    for flag, kind in (
        ("--temp", float),
        ("--temp-text", float),
        ("--top-k", int),
        ("--top-k-text", int),
        ("--top-p", float),
        ("--top-p-text", float),
    ):
        g.add_argument(flag, type=kind, default=None, help=f"{flag[2:]} {from_default}")
    g.add_argument("--seed", type=int, default=None, help="random seed: same input, same output")


def sampling_from_args(args: argparse.Namespace):
    """The ``Sampling`` of ``--sampler`` with the explicit flags applied."""
    from moshi_mlx.sampling import PRESETS

    names = ("temp", "temp_text", "top_k", "top_k_text", "top_p", "top_p_text", "seed")
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    return PRESETS[args.sampler].replace(**given)


def model_name(args: argparse.Namespace, quantization=None) -> str:
    """What ``--hf-path`` asks for; without it, Kyutai's repo of the asked quantization."""
    from moshi_mlx.errors import MoshiError

    if args.hf_path is not None:
        if not args.hf_path.strip():
            raise MoshiError("--hf-path is empty; give a model folder or a Hugging Face repo id")
        return args.hf_path
    if quantization is None:
        return DEFAULT_MODEL
    repo = KYUTAI_REPOS.get((quantization.bits, quantization.group_size))
    if repo is None:
        raise MoshiError(
            f"Kyutai publishes no {quantization} model; to quantize with these settings, give "
            "a float model with --hf-path (e.g. kyutai/moshiko-mlx-bf16)"
        )
    return repo


def model_choice(args: argparse.Namespace):
    """``(name, quantization)`` the model flags ask for: the folder or repo id to load, and the
    ``Quantization`` to apply while loading (None: as stored). Checks the flags, so commands
    call it before any slow work."""
    from moshi_mlx.hub import local_folder

    quantization = quantization_from_args(args)
    name = model_name(args, quantization)
    local_folder(name)  # a missing folder is said now, not after the imports
    # Without --hf-path, -q picks Kyutai's repo of those settings, quantized already.
    return name, quantization if args.hf_path is not None else None


def load_model(
    args: argparse.Namespace,
    report: Callable[[str], None] = print,
    parts: Collection[str] = ("lm", "mimi", "tokenizer"),
    progress: Callable[[int, int], None] | None = None,
    kind: str | None = "moshi",
):
    """``(lm, mimi, tokenizer)`` for the model flags (``moshi_mlx.load``); call it on the
    thread that will run the model. ``report`` receives one-line progress messages. ``kind``:
    the model the command needs, ``"moshi"`` (dialogue) or ``"stt"`` (speech-to-text; None:
    either): another is refused in one line before its weights are read."""
    from moshi_mlx import hub

    name, quantization = model_choice(args)
    start = time.perf_counter()
    report(f"loading {name}")  # said before MLX and the model's code are imported
    if hub.local_folder(name) is None:
        report(f"fetching {name} from the Hugging Face Hub (cached after the first run)")
    import moshi_mlx
    from moshi_mlx.engine import mimi_device
    from moshi_mlx.quantize import quantize_report

    # Commands without --mimi-device keep Mimi on MLX's default device.
    device = mimi_device(args.mimi_device) if hasattr(args, "mimi_device") else None
    if kind is not None:
        check_model_kind(name, kind)
    model = moshi_mlx.load(
        name,
        dtype=args.dtype,
        quantize=quantization,
        parts=parts,
        mimi_device=device,
        progress=progress,
    )
    if quantization is not None:
        report(f"quantized the LM to {quantize_report(model.lm)}")
    report(f"model ready in {time.perf_counter() - start:.1f} s")
    return model


def check_model_kind(name: str, kind: str) -> None:
    """One line when the model ``name`` is not of the ``kind`` the command needs (read from
    its config alone)."""
    from moshi_mlx.errors import MoshiError
    from moshi_mlx.loading import find_model_files, model_folder

    stt = find_model_files(model_folder(name, parts=()), parts=()).lm_config.is_stt
    if stt and kind == "moshi":
        raise MoshiError(
            f"{name} is a speech-to-text model (Kyutai STT): chat and run need a Moshi dialogue "
            "model (e.g. kyutai/moshiko-mlx-q4); transcribe with `moshi-mlx transcribe`"
        )
    if not stt and kind == "stt":
        raise MoshiError(
            f"{name} is a Moshi dialogue model: transcribe needs a speech-to-text model "
            "(Kyutai STT, e.g. kyutai/stt-1b-en_fr-mlx); talk to this one with `moshi-mlx chat`"
        )


def add_persona_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("persona (NVIDIA PersonaPlex's system prompt)")
    g.add_argument(
        "--voice-prompt",
        metavar="WAV|SAFETENSORS",
        help="the voice Moshi speaks with: a recording of it (any WAV), or a voice prompt "
        "saved by `moshi-mlx persona save`",
    )
    g.add_argument("--text-prompt", metavar="TEXT", help="who Moshi is: the role, in words")


def check_persona_args(args: argparse.Namespace) -> None:
    """Flag errors of the persona flags, before any slow work."""
    from moshi_mlx.errors import MoshiError

    if args.text_prompt is not None and not args.text_prompt.strip():
        raise MoshiError("--text-prompt is empty; give the role in words, or leave it out")
    if args.text_prompt is not None:
        from moshi_mlx.persona import check_text_prompt

        check_text_prompt(args.text_prompt, "text_prompt")
    if args.voice_prompt is not None:
        from .persona import check_voice_file

        check_voice_file(args.voice_prompt, "--voice-prompt")


def prompt_from_args(args: argparse.Namespace, mimi, tokenizer, report=print):
    """The ``loop.Prompt`` of ``--voice-prompt`` / ``--text-prompt`` (None without them): the
    voice read (any WAV, resampled to 24 kHz, loudness-normalised and encoded by
    ``moshi_mlx.persona``) or loaded, the role tokenized. On the model's thread."""
    from moshi_mlx import persona

    from .loop import Prompt
    from .persona import voice_codes

    if args.voice_prompt is None and args.text_prompt is None:
        return None
    voice = None  # (LmGen.system_prompt warns once on a model not trained for prompts)
    if args.voice_prompt is not None:
        voice = voice_codes(args.voice_prompt, mimi, "--voice-prompt", report)
    text = None
    if args.text_prompt is not None:
        text = persona.text_prompt_tokens(tokenizer, args.text_prompt)
    return Prompt(voice, text)
