"""Options and consoles shared by every command."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from ..registry import declared_names

_PACKAGE = Path(__file__).resolve().parent.parent


#: settings whose flag is not `--` and the name with dashes (`batch_size` is --batch-size)
FLAG_EXCEPTIONS = {"attack_settings": "--set", "config_overrides": "--set"}
_SETTING = re.compile(r"`([a-z][a-z0-9_]*)`")


def flags_for_settings(message: str) -> str:
    """A library error as the CLI says it: each setting it names in backticks becomes that setting's
    flag (the library speaks of settings, the command line of flags)."""
    return _SETTING.sub(lambda m: FLAG_EXCEPTIONS.get(m.group(1), "--" + m.group(1).replace("_", "-")), message)


def method_names() -> list[str]:
    """The registered training methods, read from methods/ without importing it (no torch at start-up)."""
    return declared_names(_PACKAGE / "methods", "register_method")


def attack_names() -> list[str]:
    """The registered attacks, read from attacks/ without importing it (no torch at start-up)."""
    return declared_names(_PACKAGE / "attacks", "register_attack")


class CliConsole(Console):
    """A rich Console that writes whole lines into a file or pipe.

    A file has no width, and rich's default of 80 columns would wrap paths and run
    names mid-name and squeeze tables. When the output is not a terminal, text is
    printed unwrapped (soft wrap) and a table at the width it needs; on a terminal
    everything fits the window as usual.
    """

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if self.is_terminal or kwargs.get("width") is not None:
            return super().print(*objects, **kwargs)
        if all(isinstance(o, (str, Text)) for o in objects):
            if kwargs.get("soft_wrap") is None:
                kwargs["soft_wrap"] = True
            return super().print(*objects, **kwargs)
        wide = self.options.update(width=10_000)
        need = max(self.measure(o, options=wide).maximum for o in objects)
        if need <= self.width:
            return super().print(*objects, **kwargs)
        # A console of the needed width, writing to the same file: rich caps `width=` at the console's own.
        Console(file=self.file, width=need, color_system=self.color_system, no_color=self.no_color).print(
            *objects, **kwargs)

console = CliConsole()
err_console = CliConsole(stderr=True)

WorkspaceOpt = typer.Option(Path("."), "--workspace", "-w", help="Workspace folder (models/, runs/, leaderboard/).",
                            file_okay=False)
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda, cuda:1, or auto (cuda when available).")
