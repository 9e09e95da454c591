"""``moshi-mlx``: one command line with a subcommand per job.

Each subcommand lives in its own module exposing ``HELP`` (its description),
``add_arguments(parser)`` and ``main(args) -> int``; nothing heavy (MLX, the models, the hub,
sound) is imported until a command runs, so ``--help`` and flag errors answer at once.

A bare command (``moshi-mlx``, ``moshi-mlx persona``) prints its help. Flag mistakes are one
line, exit code 1, naming the (sub)command's help; a mistyped flag, command or choice gets a
"did you mean".

Errors: a ``MoshiError`` (the library's user-facing error) is printed as one line, the API's
argument names in it (`mimi_weights`) replaced by the flags that set them (--mimi-weights, or
``moshi-mlx convert --mimi-weights`` where this command has none); so is an ``OSError`` about a
file, named as the user named it (never a writer's temporary). Anything else is a bug: its
traceback is printed, then a line saying so, and the exit code is 70.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import re
import sys
import traceback
import warnings
from pathlib import Path

# name -> (module, one-line help); a module is imported only when its subcommand runs.
SUBCOMMANDS = {
    "chat": ("moshi_mlx.app.chat", "talk with Moshi through the microphone and speakers"),
    "run": ("moshi_mlx.app.run", "file in, file out: Moshi's reply to a WAV file"),
    "convert": ("moshi_mlx.app.convert", "convert (and quantize) a checkpoint to an MLX folder"),
    "bench": ("moshi_mlx.app.bench", "time the frame step (real-time factor, memory)"),
    "transcribe": ("moshi_mlx.app.transcribe", "speech to text: WAV files or live captions"),
    "persona": ("moshi_mlx.app.persona", "prepare a voice prompt for PersonaPlex (persona save)"),
    "serve": ("moshi_mlx.app.serve", "talk with Moshi from a web page (Kyutai's protocol)"),
}
BUG_EXIT = 70  # sysexits' EX_SOFTWARE
PROG = "moshi-mlx"


def _version() -> str:
    from moshi_mlx import __version__

    return __version__


class Parser(argparse.ArgumentParser):
    """Flag errors as one line and exit code 1, like every other error of the command line,
    pointing at this (sub)command's help; a mistyped choice gets a "did you mean"."""

    def error(self, message: str):
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _check_value(self, action, value):
        if action.choices is None or value in action.choices:
            return
        choices = [str(c) for c in action.choices]
        if isinstance(action, argparse._SubParsersAction):
            what = "command" if self.prog == PROG else "action"
            message = f"unknown {what} {value!r}"
            close = _close(str(value), choices)
            if close is None and len(choices) == 1:  # `persona voice.wav`: the one action
                close = f"{self.prog} {choices[0]} {value}"
            elif close is not None:
                close = f"{self.prog} {close}"
            message += (
                f" (did you mean `{close}`?)" if close else f"; choose from {', '.join(choices)}"
            )
            raise argparse.ArgumentError(None, message)
        message = f"invalid choice: {value!r} (choose from {', '.join(choices)})"
        close = _close(str(value), choices)
        raise argparse.ArgumentError(
            action, message + (f"; did you mean {close}?" if close else "")
        )


def _close(word: str, candidates: list[str]) -> str | None:
    """The candidate ``word`` most likely misspells, if any is close."""
    found = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return found[0] if found else None


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The parser, and the subparser of the subcommand named in ``argv`` (only its module gets
    imported: they pull in very different dependencies)."""
    parser = Parser(prog=PROG, description="Moshi full-duplex speech model in MLX")
    parser.add_argument("--version", action="version", version=f"moshi-mlx {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _innermost(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The (sub-)subcommand parser that ``args`` came through (``moshi-mlx persona save``)."""
    while (action := _subparsers(parser)) is not None:
        name = getattr(args, action.dest, None)
        if name not in action.choices:
            break
        parser = action.choices[name]
    return parser


def _unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """argparse's "unrecognized arguments", with the flag each mistyped one likely meant."""
    flags = [f for a in parser._actions for f in a.option_strings]
    guesses = []
    for extra in extras:
        if extra.startswith("-"):
            close = _close(extra.split("=", 1)[0], flags)
            if close is not None:
                guesses.append(f"{close} for {extra.split('=', 1)[0]}")
    message = f"unrecognized arguments: {' '.join(extras)}"
    if len(guesses) == 1:
        guesses = [guesses[0].split(" for ")[0]]
    return message + (f" (did you mean {', '.join(guesses)}?)" if guesses else "")


def flags_for(message: str, parser: argparse.ArgumentParser) -> str:
    """``message`` with each `argument` of the API written as the flag that sets it: this
    command's, else ``moshi-mlx convert``'s (which builds model folders from separate files)."""
    flags = _flags(parser)
    elsewhere: dict[str, str] = {}
    if any(m not in flags for m in re.findall(r"`(\w+)`", message)):
        convert = Parser(prog=f"{PROG} convert")
        importlib.import_module(SUBCOMMANDS["convert"][0]).add_arguments(convert)
        elsewhere = {dest: f"{convert.prog} {flag}" for dest, flag in _flags(convert).items()}
    return re.sub(r"`(\w+)`", lambda m: flags.get(m[1]) or elsewhere.get(m[1], m[1]), message)


def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    return {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _destination(filename) -> str:
    """The path a user named, for a writer's temporary (which they never named)."""
    from moshi_mlx.leftovers import destination_name

    path = Path(os.fsdecode(filename))
    name = destination_name(path.name)
    return str(path.with_name(name)) if name else str(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser, sub = build_parser([command] if command else [])
    rest = argv[argv.index(command) + 1 :] if command in SUBCOMMANDS else None
    try:
        if not argv or (rest == [] and _subparsers(sub) is not None):
            sub.print_help()  # a bare command (`moshi-mlx`, `moshi-mlx persona`): its help
            return 0
        args, extras = parser.parse_known_args(argv)
        if extras:
            inner = _innermost(parser, args)
            inner.error(_unrecognized(inner, extras))
        if args.command is None:
            parser.error("give a command")
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
        print(f"{prefix}: error: {_destination(e.filename)}: {e.strerror or e}", file=sys.stderr)
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
