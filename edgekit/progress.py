"""Console output: step messages and progress bars with ETA, silenced by --quiet.

Everything goes to stderr so ``--json`` can keep stdout for the report.
"""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")


class Reporter:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.console = Console(stderr=True, highlight=False)

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)

    def track(self, iterable: Iterable[T], description: str = "", total: int | None = None) -> Iterator[T]:
        """Iterate with a progress bar (elapsed and remaining time) unless quiet."""
        if self.quiet or not self.console.is_terminal:
            yield from iterable
            return
        columns = (
            TextColumn("  {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console, transient=True) as progress:
            if total is None and hasattr(iterable, "__len__"):
                total = len(iterable)  # type: ignore[arg-type]
            task = progress.add_task(description, total=total)
            for item in iterable:
                yield item
                progress.advance(task)
