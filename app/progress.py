"""Progress of long work (building, loading, converting, timing, answering) on stderr: a rich
bar per task on a terminal, with the time spent and the time left; nothing otherwise."""

from __future__ import annotations

import sys
from collections.abc import Callable


class Progress:
    """``with Progress() as p: advance = p.task("build LM")`` gives a callback
    ``advance(done, total)`` (the library's progress signature); the task ends when ``done``
    reaches ``total``. The amount shows counts, sizes (``nbytes=True``) or seconds of audio
    (``seconds_per_step``: what one step is worth, e.g. 0.08 for a frame). Off a terminal it
    shows nothing: stderr then holds only results, warnings and errors."""

    def __init__(self):
        self.bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar

            self.bar = Bar(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[amount]}"),
                TimeElapsedColumn(),
                TextColumn("[dim]left[/dim]"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def task(
        self, description: str, nbytes: bool = False, seconds_per_step: float | None = None
    ) -> Callable[[int, int], None]:
        if self.bar is None:
            return lambda done, total: None
        task = None

        def advance(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = self.bar.add_task(description, total=total, amount="")
            self.bar.update(task, completed=done, amount=amount(done, total))
            if done >= total:
                self.bar.remove_task(task)

        def amount(done: int, total: int) -> str:
            if nbytes:
                return f"{size(done)} / {size(total)}"
            if seconds_per_step is not None:
                return f"{seconds(done * seconds_per_step)} / {seconds(total * seconds_per_step)}"
            return f"{done}/{total}"

        return advance


def size(n: int) -> str:
    """Bytes for people: MB below a gigabyte, else GB."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def seconds(s: float) -> str:
    """A duration of audio for people: ``12.3 s`` below a minute, else ``4:05``."""
    if s < 60:
        return f"{s:.1f} s"
    minutes, s = divmod(int(s), 60)
    return f"{minutes}:{s:02d}"
