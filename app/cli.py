"""``moshi-mlx``: one command line with a subcommand per job.

Each subcommand lives in its own module exposing ``HELP``, ``add_arguments(parser)`` and
``main(args) -> int``; errors meant for users are raised as ``UserError`` (or ``ValueError``
from the library) and printed as one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "chat": "moshi_mlx.app.chat",
    "run": "moshi_mlx.app.run",
    "convert": "moshi_mlx.convert.cli",
    "bench": "moshi_mlx.app.bench",
}


class UserError(Exception):
    """A problem the user can fix; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moshi-mlx", description="Moshi full-duplex speech model in MLX"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue  # subcommand not built yet
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._main(args) or 0
    except (UserError, ValueError, FileNotFoundError) as e:
        print(f"moshi-mlx {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
