"""Terminal output shared by every layer: the stderr console and progress bars (rich).

A bar shows only when stderr is a terminal; logs and pipes stay clean."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


def make_console() -> Console:
    """A stderr console; wide enough for the tables when stderr is not a terminal."""
    console = Console(stderr=True)
    if not console.is_terminal:
        console = Console(stderr=True, width=160)
    return console


def bar(total: int, what: str) -> tuple[Progress, object]:
    """A progress bar over ``total`` steps (``with progress: ... progress.advance(task)``)."""
    console = make_console()
    progress = Progress(
        TextColumn(what),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    return progress, progress.add_task(what, total=total)


def spinner(what: str, console: Console | None = None) -> tuple[Progress, object]:
    """A spinner with elapsed time for work of unknown length, and its task (whose description,
    ``what`` at first, the caller may update): ``with spinner("building")[0]:``."""
    console = console or make_console()
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    return progress, progress.add_task(what, total=None)
