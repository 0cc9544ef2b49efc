"""`adt-ft leaderboard`: the workspace's entries as a table, Markdown, JSON or a plot."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import typer

from ..errors import UserError
from .common import WorkspaceOpt, console, err_console


def section_table(section, n_text: int = 3, bold: str = "A_rob", title: bool = True):
    """A rich Table from a `leaderboard.Section`: text columns left, numbers right and never wrapped."""
    from rich.table import Table

    t = Table(title=section.title if title else None)
    for j, h in enumerate(section.header):
        numeric = j >= n_text
        width = len(h) if numeric else min(20, max([len(h)] + [len(r[j]) for r in section.body]))
        t.add_column(h, justify="right" if numeric else "left", style="bold" if h == bold else None,
                     no_wrap=numeric, min_width=width)
    for r in section.body:
        t.add_row(*r)
    return t


def sections_renderable(parts: Sequence, notes: Iterable[str], n_text: int = 3, titles_above: bool = False):
    """Tables one under the other, then the notes (dimmed), as one printable object. With
    `titles_above` each title is a line of its own (rich would wrap a title wider than its table)."""
    from rich.console import Group
    from rich.text import Text

    items: list = []
    for s in parts:
        if titles_above:
            items.append(Text(s.title, style="bold"))
        items.append(section_table(s, n_text, title=not titles_above))
    return Group(*items, *[Text(n, style="dim") for n in notes])


def table(entries, title: str | None = None):
    """The leaderboard as rich tables, one per comparability group (dataset, threat model, ε, n)."""
    from .. import leaderboard as lb

    parts, notes = lb.sections(entries)
    if title:
        for s in parts:
            s.title = f"{title}: {s.title}"
    return sections_renderable(parts, notes)


def _dataset_filter(dataset: str | None) -> str | None:
    from ..data import canonical_name

    if dataset is None:
        return None
    return dataset.strip().lower() if dataset.strip().lower() == "imagenet" else canonical_name(dataset)


def leaderboard_cmd(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Only this dataset (default: all)."),
    threat_model: Optional[str] = typer.Option(None, "--threat-model", "-t", help="Only this threat model."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, markdown or json."),
    group_seeds: bool = typer.Option(False, "--group-seeds", help="One row per group of entries that differ only "
                                                                  "by seed: mean ± standard deviation."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also save a figure (clean vs robust, per-attack "
                                                             "bars), e.g. board.png.", dir_okay=False),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write a static site (sortable tables, seed "
                                        "groups, plots, one page per entry) into this folder; it opens from disk.",
                                        file_okay=False),
    workspace: Path = WorkspaceOpt,
) -> None:
    """Show the workspace's leaderboard entries: within each group of equal ε and number of evaluated
    examples (n), the entries evaluated with AutoAttack (standard) ranked by it, best first; the weaker
    evaluations apart, not ranked."""
    from .. import leaderboard as lb
    from ..workspace import Workspace
    from .eval_tables import print_wide

    lb.check_format(fmt)
    if plot is not None:
        lb.plot_format(plot)  # an unknown image type fails before anything is printed
    ds = _dataset_filter(dataset)
    ws = Workspace(workspace)
    entries = lb.read_entries(ws.leaderboard_dir, ds, threat_model)
    if not entries:
        where = ws.leaderboard_dir / (ds or "*") / (threat_model or "*")
        raise UserError(f"no leaderboard entries in {where}: write one with 'adt-ft eval'")
    for line in lb.verify_entries(entries):
        err_console.print(f"warning: {line}", highlight=False, soft_wrap=True, markup=False)
    if group_seeds:
        groups = lb.group_by_seed(entries, ws.root)
        if fmt == "table":
            print_wide(console, sections_renderable(*lb.group_sections(groups), n_text=2))
        else:
            typer.echo(lb.render_groups(groups, fmt), nl=False)
    elif fmt == "table":
        print_wide(console, table(entries))
    else:
        typer.echo(lb.render(entries, fmt), nl=False)
    if plot is not None:
        lb.plot(entries, plot)
        err_console.print(f"wrote {plot}", highlight=False)
    if html is not None:
        from ..publish import build_site

        site = build_site(entries, html, workspace=ws.root)
        err_console.print(f"wrote {site.index} ({len(site.pages)} entry pages)", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.command("leaderboard")(leaderboard_cmd)
