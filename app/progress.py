"""Progress of long work (building, loading, converting, timing) on stderr: a rich bar per task
on a terminal, one line per task otherwise."""

from __future__ import annotations

import sys
from collections.abc import Callable


class Progress:
    """``with Progress() as p: advance = p.task("build LM")`` gives a callback
    ``advance(done, total)`` (the library's progress signature); the task ends when ``done``
    reaches ``total``. ``nbytes=True`` shows sizes instead of counts. Off a terminal it shows
    nothing: stderr then holds only results, warnings and errors."""

    def __init__(self):
        self.bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[amount]}"),
                TimeElapsedColumn(),
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

    def task(self, description: str, nbytes: bool = False) -> Callable[[int, int], None]:
        if self.bar is None:
            return lambda done, total: None
        task = None

        def advance(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = self.bar.add_task(description, total=total, amount="")
            amount = f"{size(done)} / {size(total)}" if nbytes else f"{done}/{total}"
            self.bar.update(task, completed=done, amount=amount)
            if done >= total:
                self.bar.remove_task(task)

        return advance


def size(n: int) -> str:
    """Bytes for people: MB below a gigabyte, else GB."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"
