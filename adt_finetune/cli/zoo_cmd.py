"""`adt-ft models` and `adt-ft pull`: browse the RobustBench zoo and make a model current."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import UserError
from ..utils import format_pct
from .common import WorkspaceOpt, console

DatasetOpt = typer.Option("cifar10", "--dataset", "-d", help="cifar10, cifar100 or imagenet (zoo); any adt-ft "
                                                             "dataset with --from-file.")
ThreatOpt = typer.Option("Linf", "--threat-model", "-t", help="Linf, L2 or corruptions.")


def _pct(value: float | None) -> str:
    return format_pct(value, missing="-")


def models_cmd(
    query: Optional[str] = typer.Argument(None, help="Part of a name, architecture, title or venue (any case)."),
    dataset: str = DatasetOpt,
    threat_model: str = ThreatOpt,
    workspace: Path = WorkspaceOpt,
    check: bool = typer.Option(False, "--check", help="Build the architecture(s) with random weights (nothing is "
                                                      "downloaded) and say which training scopes and attacks apply, "
                                                      "and why not where they do not."),
) -> None:
    """List RobustBench zoo entries with their reported accuracies."""
    from ..workspace import Workspace
    from ..zoo import search

    ws = Workspace(workspace)
    if check:
        _check(query, dataset, threat_model)
        return
    entries = search(query, dataset, threat_model)
    if not entries:
        raise UserError(f"no {dataset}/{threat_model} zoo entry matches {query!r}: try a shorter query, "
                        "another --dataset/--threat-model, or no query to list all")
    first = entries[0]
    robust_label = "AA %" if first.threat_model != "corruptions" else "corrupt. %"
    table = Table(title=f"RobustBench {first.dataset} / {first.threat_model}"
                        + (f" matching {query!r}" if query else "") + f": {len(entries)} entries",
                  caption="AA = reported AutoAttack accuracy; extra = trained with extra data; "
                          "in workspace '-' = leaderboard only, no checkpoint to pull")
    # Names are what users type next, so they are never truncated.
    table.add_column("name", style="bold", no_wrap=True, min_width=max(len(e.name) for e in entries))
    table.add_column("architecture")
    table.add_column("clean %", justify="right")
    table.add_column(robust_label, justify="right")
    table.add_column("extra")
    table.add_column("in workspace")
    # Best first, as on the RobustBench leaderboard.
    for e in sorted(entries, key=lambda e: -(e.robust_acc if e.robust_acc is not None else -1)):
        here = ws.model_path(e.dataset, e.threat_model, e.name)
        present = here.is_file() or here.with_name(f"{here.name}_m0.pt").is_file()
        status = "yes" if present else ("no" if e.loadable else "-")
        table.add_row(e.name, e.architecture, _pct(e.clean_acc), _pct(e.robust_acc),
                      "yes" if e.additional_data else "no", status)
    console.print(table)


def _check(query: str | None, dataset: str, threat_model: str) -> None:
    """`models --check`: one entry in detail (an exact name, alias or unique prefix), else a table."""
    from ..zoo import resolve_name, search
    from ..zoo.support import check_entry

    try:
        entries = [resolve_name(query, dataset, threat_model)] if query else []
    except UserError:
        entries = []
    if entries:
        support = check_entry(entries[0])
        for line in support.lines():
            console.print(line, soft_wrap=True, markup=False, highlight=False)
        return
    entries = [e for e in search(query, dataset, threat_model) if e.loadable]
    if not entries:
        raise UserError(f"no loadable {dataset}/{threat_model} zoo entry matches {query!r}: "
                        "adt-ft models lists them")
    tm = entries[0].threat_model
    table = Table(title=f"RobustBench {entries[0].dataset} / {tm}: what adt-ft can do with {len(entries)} "
                        "entries (random weights, nothing downloaded)",
                  caption=None if tm != "corruptions" else "corruptions models: eval --suite corruptions only; "
                                                                 "no attacks, no training")
    table.add_column("name", style="bold", no_wrap=True, min_width=max(len(e.name) for e in entries))
    for column in ("verdict", "head", "feature tap", "why not"):
        table.add_column(column)
    cache: dict = {}
    with console.status("building architectures"):
        for entry in entries:
            s = check_entry(entry, cache)
            table.add_row(entry.name, s.verdict, s.head or "-", s.tap or "-", "; ".join(s.why) or "-")
    console.print(table)


def pull_cmd(
    name: Optional[str] = typer.Argument(None, help="Zoo name, alias (Zhang2019) or unique prefix."),
    dataset: str = DatasetOpt,
    threat_model: str = ThreatOpt,
    workspace: Path = WorkspaceOpt,
    from_file: Optional[Path] = typer.Option(None, "--from-file", help="A local state-dict checkpoint instead of a "
                                                                       "zoo download.", dir_okay=False),
    arch: Optional[str] = typer.Option(None, "--arch", help="With --from-file: a zoo name or package.module:Class."),
    model_name: Optional[str] = typer.Option(None, "--name", help="With --from-file: the name to record "
                                                                  "(default: the file name)."),
) -> None:
    """Fetch a zoo model into the workspace (or register a local checkpoint) and make it current."""
    from ..workspace import Workspace
    from ..nets import num_params
    from ..zoo import pull_file_model, pull_model

    ws = Workspace(workspace)
    # soft_wrap: paths and names must stay copyable, never broken across lines.
    say = functools.partial(console.print, soft_wrap=True)
    if from_file is not None:
        if name is not None:
            raise UserError("give either a zoo NAME or --from-file PATH, not both")
        if arch is None:
            raise UserError("--from-file needs --arch: a zoo name (e.g. Zhang2019Theoretically) or "
                            "package.module:Class")
        ref, model = pull_file_model(from_file, arch, dataset=dataset, threat_model=threat_model, workspace=ws,
                                     name=model_name)
        say(f"loaded {ref.path} into {ref.arch}")
        entry = None
    else:
        if name is None:
            raise UserError("give a zoo model name (adt-ft models lists them) or --from-file PATH --arch ARCH")
        if arch is not None or model_name is not None:
            raise UserError("--arch and --name only apply with --from-file")
        from ..zoo import resolve_name

        resolved = resolve_name(name, dataset, threat_model)
        if resolved.name != name:
            say(f"{name} resolved to [bold]{resolved.name}[/] ({resolved.dataset}/{resolved.threat_model})")
        ref, model, entry = pull_model(resolved.name, dataset=resolved.dataset, threat_model=resolved.threat_model,
                                       workspace=ws)

    say(f"name:         [bold]{ref.name}[/]")
    say(f"architecture: {entry.architecture + ' (' + ref.arch + ')' if entry else ref.arch}")
    say(f"parameters:   {num_params(model):,}")
    say(f"file:         {ref.path}")
    say(f"dataset:      {ref.dataset} / {ref.threat_model}")
    if entry is not None:
        eps = f", eps {entry.eps:.4g}" if entry.eps is not None else ""
        robust = "AutoAttack" if entry.autoattack_acc is not None else "robust"
        say(f"reported:     clean {_pct(entry.clean_acc)}%, {robust} {_pct(entry.robust_acc)}%{eps} "
                      f"({entry.venue}{', extra data' if entry.additional_data else ''})")
    say(f"current model of workspace {ws.root} is now {ref.name}")


def register(app: typer.Typer) -> None:
    app.command("models")(models_cmd)
    app.command("pull")(pull_cmd)
