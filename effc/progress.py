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


def _progress(console: Console, *columns) -> Progress:
    """A transient progress display on ``console``, shown only on a terminal."""
    return Progress(
        *columns,
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def bar(total: int, what: str) -> tuple[Progress, object]:
    """A progress bar over ``total`` steps (``with progress: ... progress.advance(task)``)."""
    progress = _progress(
        make_console(), TextColumn(what), BarColumn(), TextColumn("{task.completed}/{task.total}")
    )
    return progress, progress.add_task(what, total=total)


def spinner(what: str, console: Console | None = None) -> tuple[Progress, object]:
    """A spinner with elapsed time for work of unknown length, and its task (whose description,
    ``what`` at first, the caller may update): ``with spinner("building")[0]:``."""
    progress = _progress(
        console or make_console(), SpinnerColumn(), TextColumn("{task.description}")
    )
    return progress, progress.add_task(what, total=None)
