"""``moshi-mlx convert``: Kyutai's checkpoints -> a self-contained (optionally 4/8-bit) MLX
model folder."""

from __future__ import annotations

import argparse
import sys

from .convert import DEFAULT_GROUP_SIZE, convert

HELP = (
    "Convert Kyutai's Moshi checkpoints (PyTorch release or MLX repos, by repo id or folder) "
    "into a self-contained MLX model folder, optionally quantized to 4 or 8 bits."
)

DTYPES = ("bfloat16", "float16", "float32")
GROUP_SIZES = (32, 64, 128)


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
    out.add_argument(
        "-q", "--quantize", action="store_true", help="quantize the LM's linear/embedding layers"
    )
    out.add_argument(
        "--q-bits", type=int, metavar="{4,8}", help="bits per weight with -q (default 4)"
    )
    out.add_argument(
        "--q-group-size",
        type=int,
        metavar="{32,64,128}",
        help="weights per scale with -q (default 32 for 4-bit, 64 for 8-bit)",
    )
    out.add_argument(
        "--skip-indivisible",
        action="store_true",
        help="with -q, keep in float the layers whose width the group size does not divide "
        "(tiny test models) instead of failing",
    )
    out.add_argument(
        "--dtype",
        metavar="{bfloat16,float16,float32}",
        help="dtype of the unquantized weights (default: keep the source's)",
    )
    out.add_argument("--force", action="store_true", help="replace an existing --mlx-path")


def _check(args: argparse.Namespace) -> None:
    from moshi_mlx.app.cli import UserError

    if args.q_bits is not None and args.q_bits not in DEFAULT_GROUP_SIZE:
        raise UserError(f"--q-bits must be 4 or 8, got {args.q_bits}")
    if args.q_group_size is not None and args.q_group_size not in GROUP_SIZES:
        raise UserError(f"--q-group-size must be 32, 64 or 128, got {args.q_group_size}")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype}")
    if not args.quantize and (
        args.q_bits is not None or args.q_group_size is not None or args.skip_indivisible
    ):
        raise UserError("--q-bits, --q-group-size and --skip-indivisible need -q/--quantize")


class _Bar:
    """Conversion progress on stderr: a rich bar on a terminal, nothing otherwise."""

    def __init__(self):
        self.progress = self.task = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

            self.progress = Progress(
                TextColumn("converting"),
                BarColumn(),
                DownloadColumn(),
                TextColumn("{task.fields[name]}"),
                console=Console(stderr=True),
                transient=True,
            )

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __call__(self, name: str, done: int, total: int) -> None:
        if self.progress is None:
            return
        if self.task is None:
            self.task = self.progress.add_task("convert", total=total, name="")
        self.progress.update(self.task, completed=done, name=name)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def main(args: argparse.Namespace) -> int:
    from moshi_mlx.app.cli import UserError

    _check(args)
    try:
        result = _convert(args)
    except OSError as e:  # unreadable input, full disk, no permission: one line, no traceback
        where = f"{e.filename}: " if e.filename else ""
        raise UserError(f"{where}{e.strerror or e}") from None
    _report(result)
    return 0


def _convert(args: argparse.Namespace):
    with _Bar() as bar:
        return convert(
            args.hf_path,
            args.mlx_path,
            quantize=args.quantize,
            q_bits=args.q_bits or 4,
            q_group_size=args.q_group_size,
            dtype=args.dtype,
            moshi_weights=args.moshi_weights,
            mimi_weights=args.mimi_weights,
            tokenizer=args.tokenizer,
            lm_config=args.lm_config,
            mimi_config=args.mimi_config,
            force=args.force,
            skip_indivisible=args.skip_indivisible,
            progress=bar,
        )


def _report(result) -> None:
    q = result.quantization
    lm = f"{q['bits']}-bit group {q['group_size']}" if q else result.dtype
    if result.skipped:
        lm += f" ({len(result.skipped)} layer(s) kept in {result.dtype})"
    print(
        f"wrote {result.path}: LM {lm} in {len(result.lm_files)} file(s), Mimi float32, "
        f"tokenizer; {_size(result.bytes_written)} in {result.seconds:.1f} s, peak MLX memory "
        f"{_size(result.peak_memory)}, max RSS {_size(result.max_rss)}"
    )
