"""The progress display of a model fetch (download, extract, convert, checksum) on stderr.

One rich progress line per phase: a bar with bytes where the size is known, a spinner with the
elapsed time where it is not (pip's download, the conversion). Finished phases stay on screen, so
the user sees where the minutes went.
"""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.filesize import decimal
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from dynkv.cli.output import err


class RichFetchProgress:
    """A dynkv.model.fetch.FetchProgress drawn with rich; use as a context manager."""

    def __init__(self, console: Console | None = None) -> None:
        self._progress = Progress(
            SpinnerColumn(finished_text="[green]✓[/green]"),
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            TextColumn("{task.fields[size]}"),
            TimeElapsedColumn(),
            console=console or err,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> RichFetchProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self._close()
        self._progress.stop()

    def phase(self, label: str, total: int | None = None) -> None:
        self._close()
        self._task = self._progress.add_task(label, total=total, size="")

    def advance(self, n: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, n)
            task = self._progress.tasks[-1]
            of = f"/{decimal(int(task.total))}" if task.total else ""
            self._progress.update(self._task, size=f"{decimal(int(task.completed))}{of}")

    def _close(self) -> None:
        if self._task is None:
            return
        task = self._progress.tasks[-1]
        total = task.total if task.total is not None else task.completed or 1
        self._progress.update(self._task, total=total, completed=total)
        self._progress.stop_task(self._task)
        self._task = None
