"""What `adt-ft eval` (and `quickstart`, `leaderboard`) draw: result tables, sanity lines,
the W-PGD table. The evaluation library returns data; these render it with rich."""
from __future__ import annotations

from typing import Any, Sequence

from ..utils import format_pct


def results_table(rows: Sequence[tuple[str, Any]], title: str | None = None):
    """A rich table like the ADT paper's Table 1 from (label, EvalResult) rows: one row per
    model, columns clean, each attack, A_rob; with two rows, a third shows the change."""
    from rich.table import Table

    columns: list[str] = []
    for _, r in rows:
        columns += [a for a in r.attacks if a not in columns]
    cascade = any(r.mode == "cascade" for _, r in rows)
    table = Table(title=title, caption=("cascade mode: attack columns are cumulative (robust to it and every "
                                        "earlier attack)" if cascade else None))
    table.add_column("model", min_width=min(24, max(len(label) for label, _ in rows)))
    for c in ["clean", *columns, "A_rob"]:
        numeric_style = dict(justify="right", no_wrap=True, min_width=len(c))
        marked = cascade and any(r.in_a_rob(c) for _, r in rows)
        table.add_column(c + ("*" if marked else ""), style="bold" if c == "A_rob" else None, **numeric_style)
    for label, r in rows:
        table.add_row(label, *[format_pct(r.display_value(c)) for c in ["clean", *columns, "A_rob"]])
    if len(rows) == 2:
        (_, before), (_, after) = rows
        deltas = []
        for c in ["clean", *columns, "A_rob"]:
            b, a = before.display_value(c), after.display_value(c)
            deltas.append("" if a is None or b is None else f"{a - b:+.2f}")
        table.add_row("change", *deltas, style="italic")
    return table


def print_wide(console, renderable) -> None:
    """Print a table whole: into a pipe or file at the width it needs (rich would
    otherwise crop it at 80 columns); on a terminal, rich fits it to the window."""
    from rich.console import Console

    need = console.measure(renderable, options=console.options.update(width=10_000)).maximum
    if need > console.width and not console.is_terminal:
        Console(file=console.file, width=need, color_system=None).print(renderable)
    else:
        console.print(renderable)


def print_sanity(result, console) -> None:
    """One line per sanity check of an EvalResult: ✓, a warning, or a dimmed 'not applicable'."""
    from rich.markup import escape

    for c in result.sanity:
        detail = escape(c.detail)
        if c.ok is None:
            console.print(f"  [dim]– {c.name}: {detail}[/]", highlight=False, soft_wrap=True)
        elif c.ok:
            console.print(f"  [green]✓[/] {c.name}: {detail}", highlight=False, soft_wrap=True)
        else:
            console.print(f"  [bold yellow]⚠ WARNING[/] {c.name}: {detail}", highlight=False, soft_wrap=True)


def wasserstein_table(report: dict[str, Any]):
    """The `wasserstein` suite's JSON report: a line with the clean statistics, then a table
    with one row per budget δ (accuracies in %)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    clean = report.get("clean") or {}
    head = Text(f"W-PGD ({report.get('threat_model')}, loss {report.get('loss')}): Υ = {_num(clean.get('upsilon'))}, "
                f"V(0) = {_num(clean.get('v0'))}, W(0) = {_num(clean.get('w0'))}", style="italic")
    t = Table()
    for c in ("budget δ", "W-PGD acc", "first-order est.", "PGD-20 acc (ε = δ)"):
        t.add_column(c, justify="right")
    for row in report.get("rows", []):
        t.add_row(_num(row.get("budget")), _fraction_pct(row.get("wpgd_acc")), _fraction_pct(row.get("first_order")),
                  _fraction_pct(row.get("pgd_acc")))
    return Group(head, t)


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def _fraction_pct(v: Any) -> str:
    return format_pct(None if v is None else 100 * v, missing="n/a")


def corruptions_table(result):
    """One row per corruption: its accuracy at severities 1-5 and their mean; a last row of means per severity
    and the overall mean (RobustBench's corruptions_acc)."""
    from rich.table import Table

    acc = result.accuracy
    severities = list(next(iter(acc.values())))
    table = Table(title=f"accuracy under common corruptions (%), first {result.n_examples} images")
    table.add_column("corruption")
    for s in severities:
        table.add_column(f"severity {s}", justify="right", no_wrap=True)
    table.add_column("mean", justify="right", style="bold", no_wrap=True)
    for name, row in acc.items():
        table.add_row(name, *[format_pct(row[s]) for s in severities], format_pct(result.per_corruption[name]))
    means = [sum(row[s] for row in acc.values()) / len(acc) for s in severities]
    table.add_row("mean", *[format_pct(m) for m in means], format_pct(result.corruptions_acc), style="bold")
    return table
