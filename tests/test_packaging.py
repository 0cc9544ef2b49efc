"""A non-editable install carries what the package needs at run time (recipes, the zoo table)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip install .` (a real wheel build, no editable link) into a folder outside the checkout."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(REPO)],
                   check=True, capture_output=True, text=True, timeout=300)
    return target


def _run(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    code = ("import sys, adt_finetune; print('package at', adt_finetune.__file__, flush=True); "
            "from adt_finetune.cli import main; main(sys.argv[1:])")
    env = dict(os.environ, PYTHONPATH=str(installed), ADT_FT_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_installed_package_finds_its_shipped_recipes(installed, tmp_path):
    shipped = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    assert shipped and (REPO / "recipes").resolve() == (REPO / "adt_finetune" / "recipes").resolve()
    out = _run(installed, tmp_path, "recipes")
    assert out.returncode == 0, out.stderr
    assert f"package at {installed}" in out.stdout  # the wheel's copy, not the checkout
    for name in shipped:
        assert name in out.stdout
    # `train --recipe NAME` resolves the recipe inside the installed package: the run then stops at
    # the first setting that cannot run (--epochs 0), not at "no recipe".
    out = _run(installed, tmp_path, "train", "--recipe", "zhang2019-finetune-full", "--epochs", "0")
    assert out.returncode == 2 and "epochs must be positive" in out.stderr, out.stderr
    out = _run(installed, tmp_path, "train", "--recipe", "no-such-recipe")
    assert out.returncode == 2 and "no recipe" in out.stderr
