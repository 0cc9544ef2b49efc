"""What the CLI draws: rich progress bars for the library's `Reporter` interface.

The library never imports rich for display; commands build a `RichReporter`
(or none, with --no-progress) and hand it down.
"""
from __future__ import annotations

from typing import Any

from ..progress import Reporter
from .common import console, err_console


class RichReporter(Reporter):
    """Progress bars on stderr (stdout stays clean for tables and JSON); messages on stdout
    (or on stderr with `messages_to_stderr`), printed above the live bars."""

    def __init__(self, *, transient: bool = False, messages_to_stderr: bool = False, label_width: int = 10):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self._progress = Progress(TextColumn(f"{{task.description:>{label_width}}}"), BarColumn(),
                                  MofNCompleteColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                  TimeRemainingColumn(), console=err_console, transient=transient)
        self._tasks: dict[str, Any] = {}
        self._messages_to_stderr = messages_to_stderr
        self._depth = 0

    def __enter__(self) -> "RichReporter":
        if self._depth == 0:
            self._progress.start()
        self._depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._progress.stop()

    def message(self, text: str) -> None:
        target = self._progress.console if self._messages_to_stderr else console
        target.print(text, highlight=False, soft_wrap=True, markup=False)

    def start(self, key: str, description: str, total: int, completed: int = 0, status: str = "") -> None:
        self._tasks[key] = self._progress.add_task(description, total=total, completed=completed, status=status)

    def advance(self, key: str, n: int = 1, status: str | None = None) -> None:
        task = self._tasks.get(key)
        if task is None:
            return
        if status is None:
            self._progress.update(task, advance=n)
        else:
            self._progress.update(task, advance=n, status=status)

    def update(self, key: str, completed: float, status: str | None = None) -> None:
        task = self._tasks.get(key)
        if task is not None:
            self._progress.update(task, completed=completed, **({} if status is None else {"status": status}))

    def finish(self, key: str) -> None:
        self._tasks.pop(key, None)


def reporter(enabled: bool, **kwargs: Any) -> Reporter | None:
    """A RichReporter when progress is wanted, else None (the library's silence)."""
    return RichReporter(**kwargs) if enabled else None
