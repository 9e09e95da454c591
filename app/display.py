"""What ``chat`` shows: a live rich screen on a terminal, plain lines otherwise.

Both screens take the same calls from the main thread: ``info`` (start-up progress), ``ready``,
``text`` (a streamed piece of Moshi's transcript), ``stats`` (a status snapshot), ``tick``
(called a few times a second), ``close`` and ``summary``.
"""

from __future__ import annotations

import sys
import time


def status_fields(s: dict) -> dict[str, str]:
    """The status snapshot as display strings, shared by both screens."""

    def ms(v):
        return "-" if v is None else f"{v:.0f}"

    return {
        "t": f"{s['t']:.1f}",
        "frames": str(s["frames"]),
        "compute_ms": ms(s["compute_ms"]),
        "rtf": "-" if s["rtf"] is None else f"{s['rtf']:.2f}",
        "latency_ms": ms(s["latency_ms"]),
        "mic_queue": str(s["mic_queue"]),
        "speaker_queue": str(s["speaker_queue"]),
        "dropped": str(s["dropped"]),
        "underruns": str(s["underruns"]),
        "erle_db": "none" if s.get("echo_heard") is False else ms(s.get("erle_db")),
    }


class PlainScreen:
    """Line by line, for pipes and logs: progress, transcript lines (broken at pauses) and a
    ``status key=value ...`` line every ``every_s`` seconds."""

    def __init__(self, out=None, every_s: float = 5.0, pause_s: float = 1.0):
        self.out = out or sys.stdout
        self.every_s = every_s
        self.pause_s = pause_s
        self.line = ""
        self._last_piece = 0.0
        self._last_status = time.monotonic()
        self._stats: dict | None = None

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def info(self, message: str) -> None:
        self._print(message)

    def ready(self, message: str) -> None:
        self._print(message)
        self._last_status = time.monotonic()

    def text(self, piece: str) -> None:
        now = time.monotonic()
        if self.line and (now - self._last_piece >= self.pause_s or len(self.line) > 100):
            self._flush_line()
        self.line += piece
        self._last_piece = now

    def _flush_line(self) -> None:
        if self.line.strip():
            self._print(f"moshi: {self.line.strip()}")
        self.line = ""

    def stats(self, snapshot: dict) -> None:
        self._stats = snapshot

    def tick(self) -> None:
        now = time.monotonic()
        if self.line and now - self._last_piece >= self.pause_s:
            self._flush_line()
        if self._stats and now - self._last_status >= self.every_s:
            self._last_status = now
            fields = status_fields(self._stats)
            self._print("status " + " ".join(f"{k}={v}" for k, v in fields.items()))

    def close(self) -> None:
        self._flush_line()

    def summary(self, fields: dict) -> None:
        self._print("summary " + " ".join(f"{k}={v}" for k, v in fields.items()))


class RichScreen:
    """A live screen: Moshi's transcript in a panel that scrolls, and a status line under it."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console()
        self.transcript = ""
        self._stats: dict | None = None
        self._live = None

    def info(self, message: str) -> None:
        self.console.print(f"[dim]•[/dim] {message}")

    def ready(self, message: str) -> None:
        from rich.live import Live

        self.console.print(f"[bold green]●[/bold green] [bold]{message}[/bold]")
        self._live = Live(
            self._render(), console=self.console, refresh_per_second=8, transient=False
        )
        self._live.start()

    def text(self, piece: str) -> None:
        self.transcript += piece

    def stats(self, snapshot: dict) -> None:
        self._stats = snapshot

    def tick(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def _render(self):
        from rich.console import Group
        from rich.panel import Panel
        from rich.text import Text

        width = max(20, self.console.width - 4)
        rows = max(3, min(12, self.console.height - 6))
        lines = Text(self.transcript.lstrip() or "…").wrap(self.console, width)
        body = Text("\n").join(lines[-rows:])
        panel = Panel(body, title="Moshi", title_align="left", subtitle="Ctrl-C to stop")
        return Group(panel, self._status_text())

    def _status_text(self):
        from rich.text import Text

        if not self._stats:
            return Text("starting…", style="dim")
        s, f = self._stats, status_fields(self._stats)
        minutes, seconds = divmod(int(s["t"]), 60)
        bad_rtf = s["rtf"] is not None and s["rtf"] > 1.0
        # (text, style, rank): when the line is wider than the terminal, the parts with the
        # highest rank go first, so that it never wraps or cuts the counters off
        parts = [
            (f"{minutes:02d}:{seconds:02d}", "", 0),
            (f"compute {f['compute_ms']} ms", "", 6),
            (f"RTF {f['rtf']}", "bold red" if bad_rtf else "", 1),
            (f"latency ~{f['latency_ms']} ms", "", 2),
            (f"queue {f['mic_queue']}/{f['speaker_queue']}", "", 7),
            (f"dropped {f['dropped']}", "yellow" if s["dropped"] else "", 4),
            (f"underruns {f['underruns']}", "yellow" if s["underruns"] else "", 5),
        ]
        if s.get("echo_heard") is False:  # echo cancellation on, nothing to cancel
            parts.append(("no echo heard", "", 3))
        elif "erle_db" in s:  # echo cancellation on
            parts.append((f"ERLE {f['erle_db']} dB", "", 3))
        sep = " │ "
        while len(parts) > 1 and len(sep.join(p for p, _, _ in parts)) > self.console.width:
            parts.remove(max(parts, key=lambda p: p[2]))
        text = Text(no_wrap=True, overflow="ellipsis")
        for i, (part, style, _) in enumerate(parts):
            if i:
                text.append(sep, style="dim")
            text.append(part, style=style)
        return text

    def close(self) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.stop()
            self._live = None

    def summary(self, fields: dict) -> None:
        self.console.print(
            "[bold]summary[/bold] " + " ".join(f"{k}={v}" for k, v in fields.items())
        )


def make_screen(out=None, status_every_s: float = 5.0):
    """``RichScreen`` when ``out`` (stdout by default) is a terminal, else ``PlainScreen``."""
    out = out or sys.stdout
    return RichScreen() if out.isatty() else PlainScreen(out, every_s=status_every_s)


# A turn of Moshi's speech ends after this much audio with no text (padding ids only): two
# seconds is longer than the pauses between its sentences, shorter than a listener's reply.
TURN_PAUSE_S = 2.0


class Transcript:
    """``run``'s transcript as flowing text, fed one frame's text at a time (``""`` for a
    frame of padding). With a ``width`` (a terminal), words flow into lines of at most that
    many characters, printed as each fills, and a turn ends with a blank line; without (a pipe,
    a file), each turn is one line. A turn ends after ``pause_frames`` frames of padding in a
    row (``TURN_PAUSE_S`` of audio), and at ``close``."""

    def __init__(self, out=None, width: int | None = None, pause_frames: int | None = None):
        from .loop import FRAME_S

        self.out = out or sys.stdout
        self.width = width
        self.pause_frames = pause_frames or round(TURN_PAUSE_S / FRAME_S)
        self.line = ""  # the words of the line being filled
        self.word = ""  # the word being spelled (a word can come in several pieces)
        self.quiet = 0  # frames of padding in a row
        self.turns = 0  # turns printed
        self.lines = 0  # lines printed of the turn going on

    def step(self, text: str) -> None:
        if not text:
            self.quiet += 1
            if self.quiet == self.pause_frames:
                self.end_turn()
            return
        self.quiet = 0
        if text.startswith(" ") and self.word:
            self._add_word()
        self.word += text

    def _add_word(self) -> None:
        word, self.word = self.word, ""
        if self.width and self.line and len(self.line) + len(word) > self.width:
            self._emit(self.line)
            self.line = ""
        self.line += word.lstrip() if not self.line else word

    def end_turn(self) -> None:
        if self.word:
            self._add_word()
        if self.line.strip():
            self._emit(self.line.strip())
        self.line = ""
        if self.lines:
            self.turns += 1
        self.lines = 0

    def close(self) -> None:
        self.end_turn()

    def _emit(self, line: str) -> None:
        if self.width and self.turns and not self.lines:
            print(file=self.out)  # turns are paragraphs on a terminal
        print(line, file=self.out, flush=True)
        self.lines += 1


def transcript_width(out=None) -> int | None:
    """Line width for ``Transcript``: the terminal's (at most 100) when ``out`` (stdout by
    default) is one, else None (a line per turn)."""
    import shutil

    out = out or sys.stdout
    if not out.isatty():
        return None
    return max(20, min(100, shutil.get_terminal_size().columns - 1))
