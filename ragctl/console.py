"""The CLI's shared rich pieces: progress bars, and the callback that shows an index build's
stages (chunk, embed) on one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

StageCallback = Callable[[str, int, int], None]


def progress_bar(console: Console, *, transient: bool = False) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=transient,
    )


def stage_callback(bar: Progress, label: str) -> StageCallback:
    """`progress(stage, done, total)` that keeps one bar per stage on `bar`."""
    tasks: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(f"{label}: {stage}", total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return progress


@contextmanager
def stage_progress(console: Console, label: str) -> Iterator[tuple[Progress, StageCallback]]:
    """A transient progress display and a stage callback on it."""
    with progress_bar(console, transient=True) as bar:
        yield bar, stage_callback(bar, label)
