"""`adt-ft export ENTRY --robustbench DIR`: a leaderboard entry as a RobustBench submission."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import WorkspaceOpt, console, err_console


def export_cmd(
    entry: str = typer.Argument(..., help="Leaderboard entry name (see 'adt-ft leaderboard') or its JSON file."),
    robustbench: Path = typer.Option(..., "--robustbench", help="Folder to write the submission into: "
                                     "model_info/<dataset>/<threat_model>/<Name>.json, models/.../<Name>.pt and "
                                     "<Name>.model_zoo.txt.", file_okay=False),
    name: Optional[str] = typer.Option(None, "--name", help="RobustBench model name (file names and zoo key), "
                                       "e.g. Smith2025Distributional_R18. Default: from the entry name."),
    title: Optional[str] = typer.Option(None, "--title", help="Paper title (RobustBench's 'name' field). "
                                        "Default: the entry's."),
    authors: Optional[str] = typer.Option(None, "--authors", help="Authors, comma-separated."),
    venue: Optional[str] = typer.Option(None, "--venue", help="Venue, e.g. 'NeurIPS 2025'. Default: Unpublished."),
    link: Optional[str] = typer.Option(None, "--link", help="Link to the paper or code."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Write a draft for an entry that is not "
                                       "AutoAttack (standard) on the full test set; its footnote says so."),
    workspace: Path = WorkspaceOpt,
) -> None:
    """Write what a RobustBench pull request needs for a fine-tuned zoo model: its model_info JSON,
    its checkpoint for RobustBench's loader, and the model-zoo line to add."""
    from ..publish import export_robustbench

    done = export_robustbench(entry, robustbench, workspace=workspace, name=name, title=title, authors=authors,
                              venue=venue, link=link, allow_partial=allow_partial)
    if done.draft:
        err_console.print(f"warning: draft only, not for submission: {done.draft_reason}", highlight=False,
                          markup=False, soft_wrap=True)
    console.print(f"RobustBench export of {done.name} (architecture of {done.architecture}):", highlight=False,
                  markup=False)
    for label, path in (("model info", done.json_path), ("checkpoint", done.checkpoint_path),
                        ("zoo registration", done.registration_path)):
        console.print(f"  {label + ':':18} {path}", highlight=False, markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
