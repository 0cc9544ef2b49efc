"""The README cannot drift from the CLI: every concrete `adt-ft ...` command it shows parses
(each option exists and takes the values shown), and every module path it names exists."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands(text: str) -> list[str]:
    """Concrete command lines: `$ adt-ft ...` and bare `adt-ft ...` lines in code blocks, and
    inline `adt-ft ...` code spans; usage synopses (with [OPTIONAL] or a|b) are skipped."""
    found: list[str] = []
    in_block = False
    pending = ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_block = not in_block
            continue
        candidates = []
        if in_block or line.startswith("    "):
            stripped = (pending + " " + line.strip()) if pending else line.strip()
            pending = ""
            if stripped.endswith("\\"):
                pending = stripped[:-1]
                continue
            stripped = re.sub(r"^\$\s+", "", stripped)
            stripped = re.sub(r"^(\w+=\S+\s+)+", "", stripped)  # OMP_NUM_THREADS=1 adt-ft ...
            if stripped.startswith("adt-ft "):
                candidates.append(stripped)
        if not line.startswith("#"):  # a heading names a command, it does not run one
            candidates += [m for m in re.findall(r"`(adt-ft [^`]+)`", line)]
        for c in candidates:
            c = c.split("  #")[0].strip()
            if "[" in c or "|" in c or "..." in c or "…" in c:
                continue
            found.append(c)
    return found


def parse(command: str) -> None:
    """Parse a command line with the real click command tree, without running it."""
    from typer.main import get_command

    from adt_finetune.cli import app

    args = shlex.split(command)[1:]
    root = get_command(app)
    ctx = click.Context(root, info_name="adt-ft")
    if not args:
        return
    name, sub, rest = root.resolve_command(ctx, args)
    assert sub is not None, f"no command {name!r}"
    try:
        with ctx:
            sub.make_context(name, list(rest), parent=ctx, resilient_parsing=False)
    except Exception as e:  # `--help` exits cleanly with code 0: the command line is still valid
        if getattr(e, "exit_code", None) != 0 or "Exit" not in type(e).__name__:
            raise


def usage_error() -> type:
    """The UsageError class of the click that typer uses (typer >= 0.25 ships its own copy)."""
    try:
        from typer._click.exceptions import UsageError
    except ImportError:
        UsageError = click.UsageError
    return UsageError


def test_the_readme_shows_commands():
    commands = readme_commands(README.read_text())
    assert len(commands) >= 15
    assert "adt-ft pull Zhang2019" in commands and "adt-ft eval --suite paper" in commands


@pytest.mark.parametrize("command", readme_commands(README.read_text()))
def test_every_readme_command_parses(command):
    parse(command)


def test_a_wrong_option_is_caught():
    """The check can fail: an option that does not exist, or a missing value, is a usage error."""
    with pytest.raises(usage_error()):
        parse("adt-ft eval --no-such-option 3")
    with pytest.raises(usage_error()):
        parse("adt-ft train --epochs")


def test_every_command_takes_the_workspace_option():
    """The README: "Every command takes `--workspace DIR`" (and its short form -w)."""
    from typer.main import get_command

    from adt_finetune.cli import app

    def leaves(group, prefix):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):  # a command group: its subcommands take the option
                yield from leaves(command, f"{prefix}{name} ")
            else:
                yield prefix + name, command

    found = list(leaves(get_command(app), ""))
    assert len(found) >= 12
    readme = README.read_text()
    for name, command in found:
        if name == "study report":  # reads the report folder alone, as the README says
            assert "`adt-ft study report` reads only" in readme
            continue
        opts = {o for p in command.params for o in getattr(p, "opts", [])}
        assert {"--workspace", "-w"} <= opts, f"adt-ft {name} has no --workspace/-w"
