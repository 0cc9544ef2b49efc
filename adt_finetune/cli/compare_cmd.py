"""`adt-ft compare`: paired statistics between leaderboard entries evaluated on the same images."""
from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from ..errors import UserError
from .common import WorkspaceOpt, console


def compare_cmd(
    entries: List[str] = typer.Argument(..., help="Entry names in the workspace's leaderboard, or paths of entry "
                                                  "JSON files; the first is the control.", show_default=False),
    group_seeds: bool = typer.Option(False, "--group-seeds", help="Group entries that differ only by seed "
                                                                  "(mean ± sd); the control is the first's group."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    as_markdown: bool = typer.Option(False, "--markdown", help="Print GitHub Markdown tables."),
    resamples: int = typer.Option(10_000, "--resamples", help="Bootstrap resamples for the 95% interval."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
    allow_failed_audit: bool = typer.Option(False, "--allow-failed-audit", "--allow-unaudited",
                                            help="Compare entries whose recorded audit failed (refused by default)."),
    workspace: Path = WorkspaceOpt,
) -> None:
    """Compare entries with the first (the control) on the same images: per attack and for A_rob, both
    accuracies, the difference with a 95% paired bootstrap interval, McNemar's exact p-value, and how many
    examples each one alone gets right."""
    from ..leaderboard import find_entry
    from ..leaderboard.compare import comparison_notes, comparison_section, compare_entries, render_comparisons
    from ..workspace import Workspace
    from .eval_tables import print_wide
    from .leaderboard_cmd import sections_renderable

    if as_json and as_markdown:
        raise UserError("--json and --markdown exclude each other: give one")
    ws = Workspace(workspace)
    found = [find_entry(name, ws.leaderboard_dir) for name in entries]
    comps = compare_entries(found, group_seeds=group_seeds, workspace=ws.root, n_resamples=resamples, seed=seed,
                            allow_failed_audit=allow_failed_audit)
    if as_json or as_markdown:
        typer.echo(render_comparisons(comps, "json" if as_json else "markdown"), nl=False)
        return
    print_wide(console, sections_renderable([comparison_section(c) for c in comps], comparison_notes(comps),
                                            n_text=1, titles_above=True))


def register(app: typer.Typer) -> None:
    app.command("compare")(compare_cmd)
