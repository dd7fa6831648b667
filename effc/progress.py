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


def spinner(what: str) -> Progress:
    """A spinner with elapsed time for work of unknown length (``with spinner("building"):``)."""
    console = make_console()
    progress = Progress(
        SpinnerColumn(),
        TextColumn(what),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    progress.add_task(what, total=None)
    return progress
