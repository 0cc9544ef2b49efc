"""`adt-ft audit`: the robustness-evaluation audit (docs/evaluation.md, "Audit"), a thin layer over
adt_finetune.evaluation.audit_run."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import DeviceOpt, WorkspaceOpt, console, err_console

_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red"}


def audit_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Zoo name or checkpoint file (default: the "
                                                                    "latest run, else the current model)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="With a checkpoint file: zoo name or package.module:Class."),
    arch_kwargs: Optional[str] = typer.Option(None, "--arch-kwargs", help="JSON constructor arguments for --arch."),
    run: Optional[str] = typer.Option(None, "--run", help="Run id or run folder (its base model is the transfer "
                                                          "check's surrogate)."),
    entry: Optional[str] = typer.Option(None, "--entry", help="Leaderboard entry name or JSON path: the audit is "
                                                              "recorded in it. Alone, only the checks its "
                                                              "per-example flags support run."),
    surrogate: Optional[str] = typer.Option(None, "--surrogate", help="Zoo name or checkpoint file to craft transfer "
                                                                      "attacks on (default: a run's base model)."),
    checks: Optional[str] = typer.Option(None, "--checks", help="Comma-separated check names (default: all)."),
    n_examples: int = typer.Option(200, "--n-examples", "-n", help="First N test images.", show_default=True),
    eps: Optional[str] = typer.Option(None, "--eps", help="L∞ budget (default: the entry's, else the dataset's)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset name or image folder."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where the dataset files are."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images per attack batch.", show_default=True),
    seed: int = typer.Option(0, "--seed", help="Seed of the audit's attacks.", show_default=True),
    device: str = DeviceOpt,
    write: bool = typer.Option(True, "--write/--no-write", help="Record the audit in the entry's JSON."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
    workspace: Path = WorkspaceOpt,
) -> None:
    """Audit a robustness evaluation (Carlini et al. 2019's checklist): black-box vs white-box, an
    unbounded attack and an ε sweep, convergence, transfer, gradient health, randomness (with EOT) and
    the W-PGD columns. Exit code 1 when a check fails."""
    from ..evaluation.audit_run import audit_workspace
    from ..utils import parse_json_object
    from .report import reporter

    names = [c.strip() for c in checks.split(",") if c.strip()] if checks is not None else None
    rec = audit_workspace(model=model, arch=arch, arch_kwargs=parse_json_object(arch_kwargs), run=run, entry=entry,
                          surrogate=surrogate, n_examples=n_examples, eps=eps, dataset=dataset, data_dir=data_dir,
                          device=device, batch_size=batch_size, seed=seed, checks=names, workspace=workspace,
                          write=write, reporter=reporter(progress))
    print_audit(rec.report, rec.label)
    if rec.entry_path is not None:
        console.print(f"recorded in {rec.entry_path}", highlight=False, soft_wrap=True, markup=False)
    if rec.report.verdict == "fail":
        raise typer.Exit(1)


def print_audit(report, label: str) -> None:
    """The checklist as a table, then the skipped checks and the overall verdict."""
    from rich.table import Table

    from .eval_tables import print_wide

    table = Table(title=f"audit of {label} ({report.n_examples} images, ε = {report.eps:.4g}, from the "
                        f"{report.source})")
    table.add_column("check", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("evidence")
    for c in report.checks:
        table.add_row(c.name, f"[{_STYLE[c.verdict]}]{c.verdict}[/]", c.detail)
    print_wide(console, table)
    for name, reason in report.skipped.items():
        console.print(f"skipped {name}: {reason}", highlight=False, soft_wrap=True, markup=False)
    line = f"audit verdict: {report.verdict}"
    if report.upper_bounds:
        line += f"; upper bounds: {', '.join(report.upper_bounds)}"
    (err_console if report.verdict == "fail" else console).print(f"[{_STYLE[report.verdict]}]{line}[/]",
                                                                 highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("audit")(audit_cmd)
