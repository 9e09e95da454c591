"""``moshi-mlx convert``: Kyutai's checkpoints -> a self-contained (optionally 4/8-bit) MLX
model folder (``moshi_mlx.convert.convert.convert``); with ``--random tiny|medium``, a folder
of random weights to try every command without downloading (``convert_random``)."""

from __future__ import annotations

import argparse

from .options import DTYPES, add_quantization_arguments, input_file

HELP = (
    "Convert Kyutai's Moshi checkpoints (PyTorch release or MLX repos, by repo id or folder) "
    "into a self-contained MLX model folder, optionally quantized to 4 or 8 bits; or write a "
    "small model of random weights (--random) to try the commands without downloading."
)
SIZES = ("tiny", "medium")  # moshi_mlx.random_weights.SIZES, without importing MLX for --help
INPUT_FLAGS = ("hf_path", "moshi_weights", "mimi_weights", "tokenizer", "lm_config", "mimi_config")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("input")
    src.add_argument(
        "--hf-path",
        help="Hugging Face repo id (e.g. kyutai/moshiko-pytorch-bf16) or local folder with the "
        "upstream files; set HF_HUB_OFFLINE=1 to use only the local cache",
    )
    src.add_argument(
        "--moshi-weights", type=input_file, help="LM weights file (overrides --hf-path's)"
    )
    src.add_argument(
        "--mimi-weights", type=input_file, help="Mimi codec weights file (overrides --hf-path's)"
    )
    src.add_argument("--tokenizer", type=input_file, help="SentencePiece text tokenizer (*.model)")
    src.add_argument(
        "--lm-config", type=input_file, help="LM config JSON, upstream format (default: Moshi 7B)"
    )
    src.add_argument(
        "--mimi-config", type=input_file, help="Mimi config JSON, upstream nested format"
    )
    src.add_argument(
        "--random",
        choices=SIZES,
        help="no input: random weights of a small model and a tokenizer of its own, to try the "
        "commands (tiny: LM 256 wide, a tiny Mimi, ~120 MB; medium: LM 1024 wide x 8 layers, "
        "the released Mimi, ~1 GB)",
    )
    src.add_argument("--seed", type=int, default=0, help="with --random: the weights' seed")
    out = parser.add_argument_group("output")
    out.add_argument("--mlx-path", default="mlx_model", help="output folder (default: mlx_model)")
    add_quantization_arguments(out)
    out.add_argument(
        "--dtype",
        choices=DTYPES,
        help="dtype of the unquantized weights (default: the source's; bfloat16 with --random)",
    )
    out.add_argument("--force", action="store_true", help="replace an earlier conversion")


def check_args(args: argparse.Namespace) -> None:
    from moshi_mlx.errors import MoshiError

    if args.random is not None:
        given = [f for f in INPUT_FLAGS if getattr(args, f) is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise MoshiError(f"--random makes its own weights: leave out {flag}")
    elif args.seed != 0:
        raise MoshiError("--seed picks --random's weights; a conversion has no seed")
    if args.seed < 0:
        raise MoshiError(f"--seed must be an integer >= 0, got {args.seed}")


def main(args: argparse.Namespace) -> int:
    check_args(args)
    from moshi_mlx.convert.convert import convert, convert_random

    from .options import quantization_from_args
    from .progress import Progress, size
    from .signals import stop_as_interrupt

    stop_as_interrupt()  # SIGTERM and SIGHUP too: the temporary folder is removed, as on Ctrl-C
    quantization = quantization_from_args(args)
    with Progress() as progress:
        advance = progress.task("writing" if args.random else "converting", nbytes=True)
        tick = lambda name, done, total: advance(done, total)  # noqa: E731
        if args.random is not None:
            result = convert_random(
                args.random,
                args.mlx_path,
                quantize=quantization,
                dtype=args.dtype,
                seed=args.seed,
                force=args.force,
                progress=tick,
            )
        else:
            result = convert(
                args.hf_path,
                args.mlx_path,
                quantize=quantization,
                dtype=args.dtype,
                moshi_weights=args.moshi_weights,
                mimi_weights=args.mimi_weights,
                tokenizer=args.tokenizer,
                lm_config=args.lm_config,
                mimi_config=args.mimi_config,
                force=args.force,
                progress=tick,
            )
    lm = str(result.quantization) if result.quantization else result.dtype
    what = f"random weights ({args.random}, seed {args.seed}): " if args.random else ""
    print(
        f"wrote {result.path}: {what}LM {lm} in {len(result.lm_files)} file(s), Mimi float32, "
        f"tokenizer; {size(result.bytes_written)} in {result.seconds:.1f} s, peak MLX memory "
        f"{size(result.peak_memory)}, max RSS {size(result.max_rss)}"
    )
    return 0
