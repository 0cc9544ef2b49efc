"""How long library calls report progress without drawing anything themselves.

Training, evaluation and the benchmark take a `Reporter`. The base class does
nothing, so a notebook user who passes none sees no output they did not ask for;
the CLI passes `cli.report.RichReporter`, which draws rich progress bars on
stderr. A reporter is a context manager: the library enters it around the work
so that a live display starts and stops with it.

Tasks are keyed by a string the caller chooses (an attack name, "epoch 3/20").
"""
from __future__ import annotations

from typing import Any


class Reporter:
    """The no-op reporter; subclass it to show progress somewhere."""

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def message(self, text: str) -> None:
        """A line of information (run header, resume position, a stop notice)."""

    def start(self, key: str, description: str, total: int, completed: int = 0, status: str = "") -> None:
        """A new task with `total` units, `completed` of them already done (a resumed task)."""

    def advance(self, key: str, n: int = 1, status: str | None = None) -> None:
        """`n` more units of task `key` are done; `status` replaces its short status text."""

    def update(self, key: str, completed: float, status: str | None = None) -> None:
        """Task `key` has `completed` units done, a fraction of a unit included: how far a long attack
        is inside its batch (steps, restarts, targets, AutoAttack's parts), so that the bar and its
        time estimate move while one batch holds every image."""

    def finish(self, key: str) -> None:
        """Task `key` is over (a display may keep or drop its bar)."""


SILENT = Reporter()


def as_reporter(reporter: "Reporter | None") -> Reporter:
    return SILENT if reporter is None else reporter
