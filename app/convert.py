"""``moshi-mlx convert``: Kyutai's checkpoints -> a self-contained (optionally 4/8-bit) MLX
model folder (``moshi_mlx.convert.convert.convert``)."""

from __future__ import annotations

import argparse

from .options import DTYPES, add_quantization_arguments

HELP = (
    "Convert Kyutai's Moshi checkpoints (PyTorch release or MLX repos, by repo id or folder) "
    "into a self-contained MLX model folder, optionally quantized to 4 or 8 bits."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("input")
    src.add_argument(
        "--hf-path",
        help="Hugging Face repo id (e.g. kyutai/moshiko-pytorch-bf16) or local folder with the "
        "upstream files; set HF_HUB_OFFLINE=1 to use only the local cache",
    )
    src.add_argument("--moshi-weights", help="LM weights file (overrides --hf-path's)")
    src.add_argument("--mimi-weights", help="Mimi codec weights file (overrides --hf-path's)")
    src.add_argument("--tokenizer", help="SentencePiece text tokenizer (*.model)")
    src.add_argument("--lm-config", help="LM config JSON, upstream format (default: Moshi 7B)")
    src.add_argument("--mimi-config", help="Mimi config JSON, upstream nested format")
    out = parser.add_argument_group("output")
    out.add_argument("--mlx-path", default="mlx_model", help="output folder (default: mlx_model)")
    add_quantization_arguments(out)
    out.add_argument(
        "--dtype", choices=DTYPES, help="dtype of the unquantized weights (default: the source's)"
    )
    out.add_argument("--force", action="store_true", help="replace an earlier conversion")


def main(args: argparse.Namespace) -> int:
    from moshi_mlx.convert.convert import convert

    from .options import quantization_from_args
    from .progress import Progress, size
    from .signals import stop_as_interrupt

    stop_as_interrupt()  # SIGTERM and SIGHUP too: the temporary folder is removed, as on Ctrl-C
    quantization = quantization_from_args(args)
    with Progress() as progress:
        advance = progress.task("converting", nbytes=True)
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
            progress=lambda name, done, total: advance(done, total),
        )
    lm = str(result.quantization) if result.quantization else result.dtype
    print(
        f"wrote {result.path}: LM {lm} in {len(result.lm_files)} file(s), Mimi float32, "
        f"tokenizer; {size(result.bytes_written)} in {result.seconds:.1f} s, peak MLX memory "
        f"{size(result.peak_memory)}, max RSS {size(result.max_rss)}"
    )
    return 0
