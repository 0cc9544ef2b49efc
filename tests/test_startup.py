"""Start-up and output polish of the `adt-ft` command.

`--help`, every command's `--help` and `models` must not import torch (nor the other
heavy libraries): that is what makes them answer in a fraction of a second. The
check is on which modules load (`python -X importtime`), not on a clock, so it is
deterministic on a loaded machine.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from rich.table import Table

HEAVY = ("torch", "torchvision", "robustbench", "numpy", "matplotlib", "autoattack")
# Run the console script's entry point, with the given arguments, in a fresh interpreter.
ENTRY = "import sys; from adt_finetune.cli import main; main(sys.argv[1:])"


def run_cli(*args: str, cwd) -> tuple[subprocess.CompletedProcess, set[str]]:
    """`adt-ft ARGS` in a subprocess under -X importtime: the result and the modules it imported."""
    env = {**os.environ, "ADT_FT_OFFLINE": "1", "COLUMNS": "80"}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", ENTRY, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:") and line.count("|") == 2}
    return proc, imported


def heavy(imported: set[str]) -> list[str]:
    return sorted(m for m in imported if m.split(".")[0] in HEAVY)


def test_the_importtime_check_sees_torch(tmp_path):
    # Guards the tests below: a command that does load torch must be caught.
    proc, imported = run_cli("bench", "--methods", "none", "--attacks", "none", "--set", "gen_width=abc",
                             cwd=tmp_path)
    assert "adt_finetune.cli" in imported and "torch" in heavy(imported)
    assert proc.returncode == 2 and "gen_width must be a whole number" in proc.stderr


def _commands() -> list[str]:
    import typer.main

    from adt_finetune.cli import app

    return sorted(typer.main.get_command(app).commands)


@pytest.mark.parametrize("args", [["--help"], *[[c, "--help"] for c in _commands()]], ids=" ".join)
def test_help_does_not_import_torch(args, tmp_path):
    proc, imported = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Usage" in proc.stdout
    assert "adt_finetune.cli" in imported
    assert heavy(imported) == [], f"adt-ft {' '.join(args)} imported {heavy(imported)[:5]}"


def test_models_does_not_import_torch_and_prints_whole_rows(tmp_path):
    proc, imported = run_cli("models", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert heavy(imported) == [], heavy(imported)[:5]
    # Piped output: the table is printed at the width it needs, not squeezed to 80
    # columns, so every row keeps its name and architecture on one line.
    rows = [line for line in proc.stdout.splitlines() if line.startswith("│ ")]
    assert len(rows) > 50
    assert any("Zhang2019Theoretically" in r and "WideResNet-34-10" in r for r in rows)
    assert max(len(line) for line in proc.stdout.splitlines()) > 80


def test_pipe_output_never_wraps_a_path():
    from adt_finetune.cli.common import CliConsole

    out = io.StringIO()  # not a terminal, like a file or a pipe
    console = CliConsole(file=out, width=40)
    path = "runs/20261122-053558-exp-am-ce-full/" + "very-long-folder-name/" * 4 + "model.pt"
    console.print(f"wrote {path}", highlight=False)
    table = Table(title="t")
    table.add_column("file")
    table.add_row(path)
    console.print(table)
    lines = out.getvalue().splitlines()
    assert lines[0] == f"wrote {path}"
    assert sum(path in line for line in lines) == 2  # the table's cell too, whole on one line


def test_terminal_output_still_fits_the_window():
    from adt_finetune.cli.common import CliConsole

    out = io.StringIO()
    console = CliConsole(file=out, width=40, force_terminal=True, color_system=None)
    console.print("word " * 20, highlight=False)
    assert max(len(line) for line in out.getvalue().splitlines()) <= 40


def test_fashion_mnist_work_does_not_import_torchvision(tmp_path):
    """Reading Fashion-MNIST's IDX files needs no torchvision: importing it (its models, ops and
    torch._dynamo) cost every eval and train process, and every torchrun rank, more than the work.
    The check is the whole `eval` command on a Fashion-MNIST model, which loads the data."""
    setup = ("import torch, sys; from adt_finetune.models import SmallCNN; from adt_finetune.utils import "
             "atomic_torch_save; from adt_finetune.workspace import ModelRef, Workspace; ws = Workspace(sys.argv[1]); "
             "p = ws.model_path('fashion-mnist', 'Linf', 'tiny'); atomic_torch_save(SmallCNN(width=4).state_dict(), p);"
             " ws.set_current_model(ModelRef(name='tiny', arch='adt_finetune.models.small:SmallCNN', "
             "dataset='fashion-mnist', path=str(p), source='file', arch_kwargs={'width': 4}))")
    subprocess.run([sys.executable, "-c", setup, str(tmp_path / "ws")], check=True, timeout=120)
    proc, imported = run_cli("eval", "--attacks", "fgsm", "-n", "4", "--no-progress", "-w", str(tmp_path / "ws"),
                             cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tiny_fgsm" in proc.stdout and "torch" in heavy(imported)  # it did the work
    assert not [m for m in imported if m.split(".")[0] == "torchvision"], "eval imported torchvision"
