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
