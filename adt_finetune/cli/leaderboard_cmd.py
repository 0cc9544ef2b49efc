"""`adt-ft leaderboard`: the workspace's entries as a table, Markdown, JSON or a plot."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .common import WorkspaceOpt, console, err_console


def leaderboard_cmd(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Only this dataset (default: all)."),
    threat_model: Optional[str] = typer.Option(None, "--threat-model", "-t", help="Only this threat model."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, markdown or json."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also save a figure (clean vs robust, per-attack "
                                                             "bars), e.g. board.png.", dir_okay=False),
    workspace: Path = WorkspaceOpt,
) -> None:
    """Show the workspace's leaderboard entries, best robust accuracy (A_rob) first."""
    from .. import leaderboard as lb
    from ..data import canonical_name
    from ..evaluation import print_wide
    from ..workspace import Workspace

    if fmt not in lb.FORMATS:
        raise UserError(f"unknown format {fmt!r}: choose from {', '.join(lb.FORMATS)}")
    ds = None
    if dataset is not None:
        ds = dataset.strip().lower() if dataset.strip().lower() == "imagenet" else canonical_name(dataset)
    ws = Workspace(workspace)
    entries = lb.read_entries(ws.leaderboard_dir, ds, threat_model)
    if not entries:
        where = ws.leaderboard_dir / (ds or "*") / (threat_model or "*")
        raise UserError(f"no leaderboard entries in {where}: write one with 'adt-ft eval'")
    groups: dict[tuple[str, str], list] = {}
    for e in entries:
        groups.setdefault((e.dataset, e.threat_model), []).append(e)
    if fmt == "json":
        typer.echo(lb.render(entries, "json"), nl=False)
    else:
        for (d, t), group in sorted(groups.items()):
            title = f"{d} / {t}: {len(group)} entr{'y' if len(group) == 1 else 'ies'}"
            if fmt == "markdown":
                typer.echo(lb.render(group, "markdown", title=title))
            else:
                print_wide(console, lb.table(group, title=title))
    if plot is not None:
        lb.plot(entries, plot)
        err_console.print(f"wrote {plot}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("leaderboard")(leaderboard_cmd)
