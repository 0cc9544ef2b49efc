"""`adt-ft study run | status | report`: a whole study (base, fine-tuning arms, evaluations, report)
from one study file, resumable, with any number of workers on one or several machines."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from ..utils import child_env
from .common import WorkspaceOpt, console, err_console

study_app = typer.Typer(help="Run a study from a study file: every arm fine-tuned from one base model, evaluated "
                             "and compared with the control (docs/study.md).", no_args_is_help=True)
FileArg = typer.Argument(..., help="The study file (YAML; the shipped ones are in recipes/studies/).",
                         show_default=False)
SmokeOpt = typer.Option(False, "--smoke", help="Overlay the file's smoke: section (a tiny end-to-end check).")
OutOpt = typer.Option(None, "--out", help="Report folder (default: the study file's report.out).")
OnlyOpt = typer.Option(None, "--only", help="Re-run just these arms (method/loss, comma-separated) and the base; "
                                           "the report takes every other entry from the report folder.")


def _context(file: Path, workspace: Path, smoke: bool, out: Optional[Path], only: Optional[str] = None):
    from ..study import Claims, Progress, load_study, worker_id
    from ..workspace import Workspace

    spec = load_study(file, smoke=smoke, out=out, only=only)
    ws = Workspace(workspace)
    progress = Progress(spec, ws)
    progress.state.mkdir(parents=True, exist_ok=True)
    return spec, ws, progress, Claims(progress.state, worker_id(), heartbeat_s=_env_float("ADT_FT_STUDY_HEARTBEAT_S", 10),
                                      expiry_s=_env_float("ADT_FT_STUDY_EXPIRY_S", 60))


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise UserError(f"${name} must be a number of seconds, got {os.environ[name]!r}") from None


@study_app.command("run")
def run_cmd(file: Path = FileArg, workspace: Path = WorkspaceOpt,
            workers: int = typer.Option(1, "--workers", help="Worker processes on this machine (each takes one job "
                                                              "at a time); more machines: run the same command there."),
            data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Dataset folder (offline data)."),
            smoke: bool = SmokeOpt, out: Optional[Path] = OutOpt, only: Optional[str] = OnlyOpt,
            retry_failed: bool = typer.Option(False, "--retry-failed", help="Run failed jobs again."),
            poll: float = typer.Option(10.0, "--poll", help="Seconds between looks while other workers hold the "
                                                            "jobs the rest needs."),
            progress: bool = typer.Option(True, "--progress/--no-progress", help="Per-batch progress bars.")) -> None:
    """Run every job of the study that is not done yet (resumable after any kill), then write the report."""
    from ..study import JobRunner, run_worker
    from .report import reporter

    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    spec, ws, prog, claims = _context(file, workspace, smoke, out, only)
    if workers > 1:
        return _spawn(workers, file, workspace, data_dir, smoke, out, retry_failed, poll, only)
    runner = JobRunner(spec, ws, data_dir=data_dir, reporter=lambda: reporter(progress),
                       log=lambda line: console.print(line, highlight=False),
                       offline=bool(os.environ.get("ADT_FT_OFFLINE")))
    result = run_worker(runner, claims, poll_s=poll, retry_failed=retry_failed)
    if result.failed:
        raise UserError(f"{len(result.failed)} job(s) failed ({', '.join(result.failed[:3])}...): see "
                        f"'adt-ft study status {file}' for why; fix it and run again with --retry-failed")
    if not result.complete:
        raise UserError(f"the study is not complete: jobs depend on failed ones; see 'adt-ft study status {file}'")


def _spawn(workers: int, file: Path, workspace: Path, data_dir, smoke, out, retry_failed, poll, only) -> None:
    """N workers as child processes of this one (the same command, one worker each)."""
    command = [sys.executable, "-m", "adt_finetune", "study", "run", str(file), "-w", str(workspace),
               "--no-progress", "--poll", str(poll)]
    command += (["--data-dir", data_dir] if data_dir else []) + (["--smoke"] if smoke else [])
    command += (["--out", str(out)] if out else []) + (["--retry-failed"] if retry_failed else [])
    command += ["--only", only] if only else []
    children = [subprocess.Popen(command, env=child_env()) for _ in range(workers)]
    try:
        codes = [c.wait() for c in children]
    except KeyboardInterrupt:
        for c in children:
            c.terminate()
        raise
    if any(codes):
        raise typer.Exit(max(codes))


@study_app.command("status")
def status_cmd(file: Path = FileArg, workspace: Path = WorkspaceOpt, smoke: bool = SmokeOpt,
               only: Optional[str] = OnlyOpt) -> None:
    """A table of the study's jobs: done, running where, failed why, queued, with time spent and left."""
    from rich.table import Table

    from ..study import status_rows

    spec, ws, prog, claims = _context(file, workspace, smoke, None, only)
    rows = status_rows(spec, prog, claims)
    table = Table(title=f"study {spec.name} in {ws.root}")
    for col in ("job", "state", "time (min)", "estimate (min)"):
        table.add_column(col, justify="right" if "min" in col else "left")
    for r in rows:
        table.add_row(r["job"], r["state"], "—" if r["seconds"] is None else f"{r['seconds'] / 60:.1f}",
                      "—" if r["estimate"] is None else f"{r['estimate'] / 60:.1f}")
    console.print(table)
    done = sum(r["state"] in ("done", "skipped") for r in rows)
    left = [r["estimate"] for r in rows if r["estimate"] is not None]
    unknown = sum(1 for r in rows if r["state"] not in ("done", "skipped") and r["estimate"] is None)
    console.print(f"{done} of {len(rows)} jobs done; remaining ≈ {sum(left) / 60:.1f} min of one worker"
                  + (f" plus {unknown} job(s) not yet estimable" if unknown else "")
                  + " (from the finished jobs of the same kind)", highlight=False)


@study_app.command("report")
def report_cmd(file: Path = FileArg, out: Optional[Path] = OutOpt) -> None:
    """Write README.md, study.png and index.html from the report folder's entries alone."""
    from ..study import load_study, write_report

    spec = load_study(file, out=out)
    path = write_report(spec, spec.out, command=f"adt-ft study report {file}")
    err_console.print(f"wrote {path}, {path.parent / 'study.png'} and {path.parent / 'index.html'}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(study_app, name="study")
