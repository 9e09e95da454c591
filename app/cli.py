"""``moshi-mlx``: one command line with a subcommand per job.

Each subcommand lives in its own module exposing ``HELP`` (its description),
``add_arguments(parser)`` and ``main(args) -> int``; errors meant for users are raised as
``UserError`` (or ``ValueError`` from the library) and printed as one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help); a module is imported only when its subcommand runs.
SUBCOMMANDS = {
    "chat": ("moshi_mlx.app.chat", "talk with Moshi through the microphone and speakers"),
    "run": ("moshi_mlx.app.run", "file in, file out: Moshi's reply to a WAV file"),
    "convert": ("moshi_mlx.convert.cli", "convert (and quantize) a checkpoint to an MLX folder"),
    "bench": ("moshi_mlx.app.bench", "time the frame step (real-time factor, memory)"),
}


class UserError(Exception):
    """A problem the user can fix; printed without a traceback."""


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Only the subcommand named in ``argv`` gets its module imported (they pull in very
    different dependencies: sound, the Hugging Face hub, transformers...)."""
    parser = argparse.ArgumentParser(
        prog="moshi-mlx", description="Moshi full-duplex speech model in MLX"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in argv:
            module = importlib.import_module(module_name)
            p.description = module.HELP
            module.add_arguments(p)
            p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[:1]).parse_args(argv)
    try:
        return args._main(args) or 0
    except (UserError, ValueError, FileNotFoundError) as e:
        print(f"moshi-mlx {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
