"""Which `package.module:Class` architectures adt-ft may import.

Building a `module:Class` architecture imports that module and runs its code,
like `python -m module`. That is fine for an architecture the user names
(`--arch` on the command line, `arch=` in a notebook call, a recipe they
chose), and never fine for one read from a file someone else may have written:
a shared workspace's `.adt-ft/state.json`, a run folder's `run.json` or a shard
file must be data, never code (`"arch": "os:system"` would otherwise run a command).

So an architecture read from a file is built only when it is

- a RobustBench zoo name (no `:`), or a class in RobustBench's own architecture
  modules or adt-ft's (`BUILTIN_MODULES`);
- or one this user has named: in this process, or before: every architecture a user
  names is remembered in their own config folder (`$ADT_FT_CONFIG_DIR`, else
  `$XDG_CONFIG_HOME/adt-ft`, else `~/.config/adt-ft`), never in the workspace. That
  file (`trusted-architectures.txt`, one `module:Class` a line) is the user's
  allow-list: they may edit it by hand.

Whatever the source, an architecture is `package.module:Name` with `Name` a direct
attribute of the module (no dotted path: `module:a.b.c` would reach anything the
module imported), checked before the module is imported.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import UserError
from ..utils import atomic_write_text

#: architectures that ship with adt-ft itself or with RobustBench, whose zoo it serves
BUILTIN_MODULES = ("adt_finetune.models", "robustbench.model_zoo.architectures")
TRUST_FILE = "trusted-architectures.txt"
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_ATTR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_session: set[str] = set()


def config_dir() -> Path:
    if os.environ.get("ADT_FT_CONFIG_DIR"):
        return Path(os.environ["ADT_FT_CONFIG_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "adt-ft"


def split_arch(arch: str) -> tuple[str, str]:
    """(module, name) of `package.module:Name`; UserError for anything else (a dotted name, a path)."""
    module, _, attr = arch.partition(":")
    if not _MODULE.fullmatch(module) or not _ATTR.fullmatch(attr):
        raise UserError(f"architecture {arch!r} is neither a zoo name nor package.module:Class (a class defined "
                        "in that module, named directly: no dotted path after the ':')")
    return module, attr


def is_builtin(arch: str) -> bool:
    """Whether `arch` is a class of adt-ft's or RobustBench's own architecture modules."""
    module = arch.partition(":")[0]
    return any(module == root or module.startswith(root + ".") for root in BUILTIN_MODULES)


def _remembered() -> set[str]:
    try:
        text = (config_dir() / TRUST_FILE).read_text()
    except (OSError, UnicodeDecodeError):
        return set()
    return {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}


def needs_trust(arch: str) -> bool:
    """Whether building `arch` imports code that is neither RobustBench's zoo nor adt-ft's own."""
    return ":" in arch and not is_builtin(arch)


def is_trusted(arch: str) -> bool:
    return not needs_trust(arch) or arch in _session or arch in _remembered()


def trust(arch: str) -> None:
    """Remember that the user named `arch` (this process, and their config folder when writable)."""
    if not needs_trust(arch) or arch in _session:
        return
    split_arch(arch)
    _session.add(arch)
    if arch in _remembered():
        return
    folder = config_dir()
    lines = sorted(_remembered() | {arch})
    try:
        atomic_write_text(folder / TRUST_FILE, "# architectures this user has named with --arch (adt-ft)\n"
                          + "".join(f"{line}\n" for line in lines))
    except OSError:
        pass  # a read-only home: the architecture is still trusted for this process


def check_trusted(arch: str, source: str) -> None:
    """UserError unless `arch` (read from `source`, a file) may be imported; nothing is imported here."""
    if ":" in arch:
        try:
            split_arch(arch)
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
    if is_trusted(arch):
        return
    raise UserError(f"{source} names the architecture {arch!r}, which adt-ft would import and run; it is neither a "
                    "RobustBench zoo architecture nor adt-ft's own, and you have never named it yourself: if you "
                    f"trust that code, give `arch` {arch} on the command line once (or add it to "
                    f"{config_dir() / TRUST_FILE})")
