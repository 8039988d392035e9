"""Progress bars for long commands whose work comes in named stages."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import Progress, TaskID

#: ``(stage, done, total)``: the callback long-running library code reports through.
StageCallback = Callable[[str, int, int], None]


@contextlib.contextmanager
def stage_progress(console: Console) -> Iterator[StageCallback]:
    """A callback that draws one bar per stage, the bar appearing with the stage's first report;
    the bars vanish when the block ends, leaving the console to the results."""
    with Progress(console=console, transient=True) as progress:
        tasks: dict[str, TaskID] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        yield report
