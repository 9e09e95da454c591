"""``moshi-mlx``: one command line with a subcommand per job.

Each subcommand lives in its own module exposing ``HELP`` (its description),
``add_arguments(parser)`` and ``main(args) -> int``; nothing heavy (MLX, the models, the hub,
sound) is imported until a command runs, so ``--help`` and flag errors answer at once.

Errors: a ``MoshiError`` (the library's user-facing error) is printed as one line, the API's
argument names in it (`mimi_weights`) replaced by this command's flags (--mimi-weights); so is
an ``OSError`` about a file. Anything else is a bug: its traceback is printed, then a line
saying so, and the exit code is 70.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import traceback
import warnings

# name -> (module, one-line help); a module is imported only when its subcommand runs.
SUBCOMMANDS = {
    "chat": ("moshi_mlx.app.chat", "talk with Moshi through the microphone and speakers"),
    "run": ("moshi_mlx.app.run", "file in, file out: Moshi's reply to a WAV file"),
    "convert": ("moshi_mlx.app.convert", "convert (and quantize) a checkpoint to an MLX folder"),
    "bench": ("moshi_mlx.app.bench", "time the frame step (real-time factor, memory)"),
    "transcribe": ("moshi_mlx.app.transcribe", "speech to text: WAV files or live captions"),
    "persona": ("moshi_mlx.app.persona", "prepare a voice prompt for PersonaPlex (persona save)"),
}
BUG_EXIT = 70  # sysexits' EX_SOFTWARE


def _version() -> str:
    from moshi_mlx import __version__

    return __version__


class Parser(argparse.ArgumentParser):
    """Flag errors as one line and exit code 1, like every other error of the command line."""

    def error(self, message: str):
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The parser, and the subparser of the subcommand named in ``argv`` (only its module gets
    imported: they pull in very different dependencies)."""
    parser = Parser(prog="moshi-mlx", description="Moshi full-duplex speech model in MLX")
    parser.add_argument("--version", action="version", version=f"moshi-mlx {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = parser
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in argv:
            module = importlib.import_module(module_name)
            p.description = module.HELP
            module.add_arguments(p)
            p.set_defaults(_main=module.main)
            chosen = p
    return parser, chosen


def flags_for(message: str, parser: argparse.ArgumentParser) -> str:
    """``message`` with each `argument` of the API written as the flag that sets it here."""
    flags = {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}
    return re.sub(r"`(\w+)`", lambda m: flags.get(m[1], m[1]), message)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser, sub = build_parser([command] if command else [])
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a flag error already printed
        return e.code
    prefix = f"moshi-mlx {args.command}"

    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"{prefix}: warning: {flags_for(_one_line(message), sub)}", file=sys.stderr)

    warnings.showwarning = show_warning
    from moshi_mlx.errors import MoshiError

    try:
        return args._main(args) or 0
    except MoshiError as e:
        print(f"{prefix}: error: {flags_for(_one_line(e), sub)}", file=sys.stderr)
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as e:
        if e.filename is None:
            return _bug(prefix)
        print(f"{prefix}: error: {e.filename}: {e.strerror or e}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    except Exception:
        return _bug(prefix)
    return 1


def _bug(prefix: str) -> int:
    traceback.print_exc()
    print(
        f"{prefix}: internal error: this is a bug in moshi-mlx {_version()}, not a problem with "
        "your input; please report it with the traceback above",
        file=sys.stderr,
    )
    return BUG_EXIT


if __name__ == "__main__":
    sys.exit(main())
