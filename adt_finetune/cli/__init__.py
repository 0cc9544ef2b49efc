"""The `adt-ft` command: a thin Typer layer over the library API.

Each command lives in its own module and registers itself on the app. Bad input
raises UserError anywhere below; `main` turns it into one line and exit code 2.
"""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

# OpenMP's worker threads spin between torch ops by default; when another process shares the cores
# they burn the time slices the working thread needs (the quickstart ran 3.8x slower next to a second
# torch program). Passive waiting costs ~3% on an idle machine and changes no number. It only takes
# effect if set before torch is imported, which no CLI module does at import time.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer  # noqa: E402
from rich.text import Text  # noqa: E402

from ..errors import UserError
from .common import WorkspaceOpt, err_console, flags_for_settings

app = typer.Typer(
    name="adt-ft",
    help="Fine-tune RobustBench models with Adversarial Distributional Training and evaluate them.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _register_commands() -> None:
    # Each command module imports torch and the rest of the library inside its
    # command function only, so registering them all keeps `adt-ft --help` fast
    # (tests/test_startup.py checks that no heavy library is imported).
    from . import bench_cmd, compare_cmd, eval_cmd, leaderboard_cmd, quickstart_cmd, train_cmd, zoo_cmd

    for mod in (zoo_cmd, train_cmd, eval_cmd, leaderboard_cmd, compare_cmd, bench_cmd, quickstart_cmd):
        mod.register(app)
    from . import audit_cmd, export_cmd, study_cmd

    export_cmd.register(app)
    study_cmd.register(app)
    audit_cmd.register(app)


@app.callback()
def _root() -> None:
    """Fine-tune RobustBench models with Adversarial Distributional Training and evaluate them."""


@app.command("version")
def version_cmd(workspace: Path = WorkspaceOpt) -> None:
    """Print the versions of adt-ft and of everything that can change a number, and the workspace's state
    (for a bug report)."""
    from ..utils import versions
    from ..workspace import Workspace

    for k, v in versions().items():
        typer.echo(f"{k}: {v}")
    ws = Workspace(workspace)
    typer.echo(f"workspace: {ws.root}")
    try:  # a damaged state file must not hide the versions a bug report needs
        current, latest = ws.current_model(), ws.latest_run()
    except UserError as e:
        typer.echo(f"workspace state: unreadable ({flags_for_settings(str(e))})")
        return
    typer.echo(f"current model: {current.name if current else '—'}")
    typer.echo(f"latest run: {latest.name if latest else '—'}")


_register_commands()


def main(argv: list[str] | None = None) -> None:
    # Standalone mode: click itself reports usage errors (exit 2) and --help; we
    # only add UserError, raised anywhere below a command, as one line and exit 2.
    try:
        app(args=argv, prog_name="adt-ft")
    except UserError as e:
        _one_line(str(e))
    except OSError as e:
        # The machine refusing a file (permissions, an immutable folder, a read-only or full disk) is the
        # user's to fix, wherever below it happened; any other OSError is a bug and keeps its traceback.
        if e.errno not in _REFUSALS or e.filename is None:
            raise
        _one_line(f"cannot write or read {e.filename} ({e.strerror}): fix its permissions or free space, or "
                  "choose another --workspace")


_REFUSALS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def _one_line(message: str) -> None:
    # Under torchrun every rank meets the same bad input: rank 0 alone says so, once.
    if os.environ.get("RANK", "").strip() in ("", "0"):
        # The message is plain text: file names and module paths must not be read as markup or emoji.
        err_console.print(Text.assemble(("error: ", "bold red"), flags_for_settings(message)), highlight=False,
                          soft_wrap=True)
    sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
