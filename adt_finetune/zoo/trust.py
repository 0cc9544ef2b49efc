"""Which `package.module:Class` architectures adt-ft may import.

Building a `module:Class` architecture imports that module and runs its code,
like `python -m module`. That is fine for an architecture the user names
(`--arch` on the command line, `arch=` in a notebook call, a recipe they
chose), and never fine for one read from a file someone else may have written:
a shared workspace's `.adt-ft/state.json` or a run folder's `run.json` must be
data, never code (`"arch": "os:system"` would otherwise run a command).

So an architecture read from a file is built only when it is a RobustBench zoo
name, one of adt-ft's own (`adt_finetune.models.*`), or one this user has named
before: every architecture a user names is remembered in their own config
folder (`$ADT_FT_CONFIG_DIR`, else `$XDG_CONFIG_HOME/adt-ft`, else
`~/.config/adt-ft`), never in the workspace.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError

#: architectures that ship with adt-ft itself
BUILTIN_PREFIXES = ("adt_finetune.models.",)
TRUST_FILE = "trusted-architectures.txt"

_session: set[str] = set()


def config_dir() -> Path:
    if os.environ.get("ADT_FT_CONFIG_DIR"):
        return Path(os.environ["ADT_FT_CONFIG_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "adt-ft"


def _remembered() -> set[str]:
    try:
        text = (config_dir() / TRUST_FILE).read_text()
    except OSError:
        return set()
    return {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}


def needs_trust(arch: str) -> bool:
    """Whether building `arch` imports code that is neither RobustBench's zoo nor adt-ft's own."""
    return ":" in arch and not arch.startswith(BUILTIN_PREFIXES)


def trust(arch: str) -> None:
    """Remember that the user named `arch` (this process, and their config folder when writable)."""
    if not needs_trust(arch) or arch in _session:
        return
    _session.add(arch)
    if arch in _remembered():
        return
    from ..utils import atomic_write_text

    folder = config_dir()
    lines = sorted(_remembered() | {arch})
    try:
        atomic_write_text(folder / TRUST_FILE, "# architectures this user has named with --arch (adt-ft)\n"
                          + "".join(f"{line}\n" for line in lines))
    except OSError:
        pass  # a read-only home: the architecture is still trusted for this process


def check_trusted(arch: str, source: str) -> None:
    """UserError unless `arch` (read from `source`, a file) may be imported."""
    if not needs_trust(arch) or arch in _session or arch in _remembered():
        return
    raise UserError(f"{source} names the architecture {arch!r}, which adt-ft would import and run; it is not a "
                    "RobustBench zoo architecture and you have never named it yourself: if you trust that code, "
                    f"give --arch {arch} on the command line")
