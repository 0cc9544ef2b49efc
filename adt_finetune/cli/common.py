"""Options and consoles shared by every command."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

WorkspaceOpt = typer.Option(Path("."), "--workspace", "-w", help="Workspace folder (models/, runs/, leaderboard/).",
                            file_okay=False)
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda, cuda:1, or auto (cuda when available).")


def resolve_device(name: str):
    import torch

    from ..errors import UserError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return dev
