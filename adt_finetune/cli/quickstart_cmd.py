"""`adt-ft quickstart`: the embedded offline default, end to end."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from .common import WorkspaceOpt, console


def quickstart_cmd(
    n_examples: int = typer.Option(1000, "--n-examples", "-n", help="Test images to evaluate on."),
    finetune_images: int = typer.Option(10000, "--train-subset", help="Training images for ADT fine-tuning."),
    epochs: int = typer.Option(2, "--epochs", help="ADT fine-tuning epochs."),
    seed: int = typer.Option(0, "--seed"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where the Fashion-MNIST files are."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    workspace: Path = WorkspaceOpt,
) -> None:
    """Pretrain a small CNN on Fashion-MNIST, fine-tune it with ADT-EXP-AM, evaluate before → after (offline, CPU)."""
    from .eval_tables import print_wide, results_table
    from ..leaderboard import read_entries
    from .leaderboard_cmd import table
    from ..quickstart import NEXT_STEPS, QuickstartSettings, check_settings, quickstart
    from .report import reporter
    from .train_cmd import print_summary

    settings = QuickstartSettings(n_examples=n_examples, finetune_images=finetune_images, finetune_epochs=epochs,
                                  seed=seed)
    check_settings(settings)
    start = time.perf_counter()
    res = quickstart(workspace, settings=settings, data_dir=data_dir, progress=progress, reporter=reporter(progress),
                     log=lambda m: console.print(m, highlight=False), train_reporter=reporter(progress),
                     pretrain_reporter=reporter(progress),
                     # the quickstart's table keeps its columns: epoch diagnostics are for `adt-ft train`
                     on_trained=(lambda run: print_summary(run, diagnostics=False)) if progress else None)
    rec = res.record
    print_wide(console, results_table([("before: " + rec.target.base.label, rec.baseline),
                                 ("after: " + rec.target.label, rec.result)],
                                      title="Fashion-MNIST, ε = 0.1: robust accuracy (%)"))
    console.print("[4/4] leaderboard:", highlight=False)
    entries = read_entries(res.workspace / "leaderboard", dataset="fashion-mnist", threat_model="Linf")
    print_wide(console, table(entries))
    console.print(f"done in {time.perf_counter() - start:.0f}s (workspace {res.workspace})", highlight=False)
    console.print(NEXT_STEPS, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("quickstart")(quickstart_cmd)
