"""The README cannot drift from the CLI: every concrete `adt-ft ...` command it shows parses
(each option exists and takes the values shown), and every module path it names exists."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from conftest import run_cli

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


# ---------------------------------------------------------------- the README's shown output, command by command

def shown_blocks(text: str) -> dict[str, list[str]]:
    """`$ adt-ft ...` lines in code blocks and the output shown under each (up to the next `$` line or
    the end of the block), by command line (continuation lines joined, trailing comments dropped)."""
    out: dict[str, list[str]] = {}
    in_block, command, pending = False, None, ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_block, command = not in_block, None
            continue
        if not in_block:
            continue
        if pending or line.startswith("$ adt-ft "):
            full = (pending + " " + line.strip()) if pending else line[2:]
            if full.endswith("\\"):
                pending = full[:-1]
                continue
            pending, command = "", re.sub(r"\s+", " ", full.split("  #")[0]).strip()
            out[command] = []
        elif command is not None:
            out[command].append(line)
    return out


_NUMBER = re.compile(r"[-+]?\d[\d,]*(\.\d+)?(e[-+]?\d+)?")


def words(lines: list[str], numbers: bool = True) -> list[str]:
    """Each non-empty line as its words (table rules and padding dropped; numbers as # unless `numbers`)."""
    out = []
    for line in lines:
        line = re.sub(r"[┏┓┗┛┃━┡┩│─└┘┳┻╇┼┴┬├┤╷╵]+", " ", line)
        if not numbers:
            line = _NUMBER.sub("#", line)
        line = " ".join(line.split())
        if line:
            out.append(line)
    return out


def run_shown(cli, command: str, *, cwd_ws: Path) -> tuple[int, list[str]]:
    code, out, err = cli(*shlex.split(command)[1:])
    return code, (out + err).splitlines()


@pytest.fixture(scope="module")
def blocks() -> dict[str, list[str]]:
    return shown_blocks(README.read_text())


def test_the_readme_shows_output_for_its_commands(blocks):
    for command in ("adt-ft models zhang2019", "adt-ft pull Zhang2019", "adt-ft pull Zhang2019You", "adt-ft recipes",
                    "adt-ft compare study-pgd-at-ce-full_paper study-exp-ce-full_paper -w ."):
        assert blocks.get(command), command


def test_models_block_prints_what_the_readme_shows(blocks, cli, tmp_path):
    ws = tmp_path / "ws"
    pulled = ws / "models" / "cifar10" / "Linf" / "Zhang2019Theoretically.pt"  # "in workspace: yes", as shown
    pulled.parent.mkdir(parents=True)
    pulled.write_bytes(b"")
    code, printed = run_shown(cli, "adt-ft models zhang2019 -w " + str(ws), cwd_ws=ws)
    assert code == 0
    assert words(printed) == words(blocks["adt-ft models zhang2019"])  # the zoo table ships: numbers too


def test_recipes_block_prints_what_the_readme_shows(blocks, cli, tmp_path):
    code, printed = run_shown(cli, f"adt-ft recipes -w {tmp_path}", cwd_ws=tmp_path)
    assert code == 0 and words(printed) == words(blocks["adt-ft recipes"])


def test_offline_pull_block_prints_what_the_readme_shows(blocks, cli, tmp_path, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    for name, obj in (("connect", socket.socket), ("create_connection", socket), ("getaddrinfo", socket)):
        monkeypatch.setattr(obj, name, refuse)
    monkeypatch.delenv("ADT_FT_OFFLINE", raising=False)
    ws = tmp_path / "ws"
    code, printed = run_shown(cli, f"adt-ft pull Zhang2019You -w {ws}", cwd_ws=ws)
    assert code == 2
    shown = [line.replace("/home/me/ws", str(ws)) for line in blocks["adt-ft pull Zhang2019You"]]
    assert printed[:2] == shown[:2]   # the two "downloading" lines, word for word
    head, tail = shown[2].split("(ConnectionError: ...)")
    assert printed[2].startswith(head) and printed[2].endswith(tail)  # the error's own text may differ
    assert not (ws / "models").exists()


def test_pull_from_file_block_prints_what_the_readme_shows(blocks, cli, tmp_path):
    import importlib.util

    (command,) = [c for c in blocks if c.startswith("adt-ft pull --from-file")]
    site = Path(importlib.util.find_spec("pyautoattack").origin).resolve().parent.parent
    ws = tmp_path / "ws"
    code, printed = run_shown(cli, command.replace(".venv/lib/python3.11/site-packages", str(site)) + f" -w {ws}",
                              cwd_ws=ws)
    assert code == 0
    shown = [line.replace(".venv/lib/python3.11/site-packages", str(site)).replace("/home/me/ws", str(ws.resolve()))
             for line in blocks[command]]
    assert printed == shown


def test_leaderboard_markdown_block_is_what_the_command_prints(cli):
    text = README.read_text()
    start = text.index("On the committed study (`adt-ft leaderboard --format markdown -w .` in this repository):")
    body = text.index("```\n", start) + 4
    block = text[body:text.index("\n```", body)]
    code, out, err = cli("leaderboard", "--format", "markdown", "-w", README.parent)
    assert code == 0, err
    assert out.strip() == block.strip()  # committed entries: every number too


def test_compare_block_is_what_the_command_prints(blocks, cli):
    command = "adt-ft compare study-pgd-at-ce-full_paper study-exp-ce-full_paper -w ."
    code, out, err = cli(*shlex.split(command)[1:-1], README.parent)
    assert code == 0, err
    assert words(out.splitlines()) == words(blocks[command])


# The blocks that need a trained run or the network are run small (train, eval) or checked for shape only.

_RUN_ID = re.compile(r"\d{8}-\d{6}-[\w-]+?-(ce|trades)-(full|last-layer)")


def shape(lines: list[str], replace: dict[str, str]) -> set[str]:
    """The distinct line shapes: words with numbers as #, run ids as RUN, paths as given in `replace`."""
    out = set()
    for line in lines:
        for old, new in replace.items():
            line = line.replace(old, new)
        line = _RUN_ID.sub("RUN", re.sub(r"_set-[0-9a-f]{8}", "", line))
        out.update(words([line], numbers=False))
    return out


@pytest.fixture(scope="module")
def trained_workspace(tmp_path_factory, _trained_cnn_state):
    """The quickstart's situation in small: a pretrained SmallCNN as the current model, then one short run."""
    from adt_finetune.utils import atomic_torch_save
    from adt_finetune.workspace import ModelRef, Workspace

    ws = Workspace(tmp_path_factory.mktemp("readme") / "ws")
    path = ws.model_path("fashion-mnist", "Linf", "quickstart-SmallCNN")
    atomic_torch_save(_trained_cnn_state, path)
    ws.set_current_model(ModelRef(name="quickstart-SmallCNN", arch="adt_finetune.models.small:SmallCNN",
                                  dataset="fashion-mnist", path=str(path), source="file", arch_kwargs={"width": 16}))
    return ws


_in_process = run_cli


def test_train_and_eval_blocks_have_the_shape_the_commands_print(blocks, trained_workspace):
    """The README's train and eval blocks, run on 64 training images and 20 test images with fewer attack
    steps: the same lines, tables and columns (numbers, run ids and dates may differ)."""
    ws = trained_workspace
    paths = {"/home/me/workspace": "WS", str(ws.root): "WS"}
    (train,) = [c for c in blocks if c.startswith("adt-ft train --method exp-am")]
    code, out, err = _in_process(*shlex.split(train)[1:], "--train-subset", "64", "--gen-width", "4", "--epochs", "1",
                                 "-w", ws.root)
    assert code == 0, err
    assert shape(out.splitlines(), paths) == shape(blocks[train], paths)
    assert len(shape(blocks[train], paths)) >= 7

    (evaluate,) = [c for c in blocks if c.startswith("adt-ft eval --attacks")]
    small = ["-n", "20", "--set", "pgd100.steps=3", "--set", "exp-am.steps=2", "--set", "pgd20.steps=2",
             "--set", "mim.steps=2", "--set", "cw.steps=2"]
    args = shlex.split(evaluate)[1:]
    args[args.index("-n") + 1] = "20"
    code, out, err = _in_process(*args, *small[2:], "-w", ws.root)
    assert code == 0, err
    assert shape(out.splitlines(), paths) == shape(blocks[evaluate], paths)
    assert len(shape(blocks[evaluate], paths)) >= 15


def test_network_blocks_have_the_shape_of_what_pull_prints(blocks):
    """`adt-ft pull Zhang2019` needs the network: its lines are the ones `pull` prints for a zoo model."""
    from adt_finetune.cli import zoo_cmd

    source = Path(zoo_cmd.__file__).read_text()
    shown = [line for line in blocks["adt-ft pull Zhang2019"] if line.strip()]
    assert shown[0] == "Zhang2019 resolved to Zhang2019Theoretically (cifar10/Linf)" and "resolved to" in source
    for line in shown[1:]:
        label = line.split(":")[0] + ":" if re.match(r"^[a-z]+:\s", line) else None
        if label:
            assert f'"{label}' in source or f"'{label}" in source or f"{label} " in source, label
    assert shown[-1].startswith("current model of workspace") and "current model of workspace" in source


@pytest.mark.slow
def test_quickstart_block_has_the_shape_the_command_prints(tmp_path):
    """The README's quickstart output, from `adt-ft quickstart` at a small fine-tuning and evaluation budget
    (the pretraining is the quickstart's own): the same lines, tables, columns and leaderboard rule."""
    text = README.read_text()
    start = text.index("[1/4] pretrain:")
    shown = text[start:text.index("\n```", start)].splitlines()
    ws = tmp_path / "workspace"
    code, out, err = _in_process("quickstart", "--train-subset", "256", "--epochs", "1", "-n", "50", "-w", ws)
    assert code == 0, err
    # -n 50 is not the default n, so the entry's name says so (README: Entry names)
    paths = {str(ws.resolve()): "workspace", str(ws): "workspace", "_quick_n50": "_quick"}
    assert shape(out.splitlines(), paths) == shape(shown, paths)
    assert len(shape(shown, paths)) >= 20
