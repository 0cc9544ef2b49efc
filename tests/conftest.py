"""Shared fixtures: real Fashion-MNIST tensors and a small CNN trained on them once per session."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# As the CLI does (adt_finetune/cli/__init__.py): spinning OpenMP threads slow everything down several
# times when the two cores are shared; must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F

from adt_finetune.data import as_tensors, load_dataset
from adt_finetune.models import SmallCNN

os.environ.setdefault("ADT_FT_OFFLINE", "1")  # tests never download
# Architectures a test names are remembered as trusted (zoo/trust.py) in this folder, never in the user's home.
os.environ.setdefault("ADT_FT_CONFIG_DIR", tempfile.mkdtemp(prefix="adt-ft-test-config-"))

FMNIST_EPS = 0.1


@pytest.fixture(scope="session")
def fmnist_train():
    """The first 4,000 Fashion-MNIST training images (real data, Debian's files)."""
    return as_tensors(load_dataset("fashion-mnist", "train", augment=False), 4000)


@pytest.fixture(scope="session")
def fmnist_test():
    """The first 500 Fashion-MNIST test images."""
    return as_tensors(load_dataset("fashion-mnist", "test"), 500)


def standard_train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


@pytest.fixture(scope="session")
def _trained_cnn_state(fmnist_train):
    torch.manual_seed(0)
    model = standard_train(SmallCNN(width=16), *fmnist_train)
    return model.state_dict()


@pytest.fixture
def trained_cnn(_trained_cnn_state):
    """A standard-trained (not robust) SmallCNN(width=16): ~80% clean, attackable. A fresh copy per test."""
    model = SmallCNN(width=16)
    model.load_state_dict(_trained_cnn_state)
    return model.eval()


@pytest.fixture
def cli(capsys):
    """Run `adt-ft ARGS...` in-process; returns (exit_code, stdout, stderr)."""
    from adt_finetune.cli import main

    def run(*args: str):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def run_cli(*args) -> tuple[int, str, str]:
    """`adt-ft ARGS` in-process for module-scoped fixtures (the `cli` fixture is per test)."""
    import contextlib
    import io

    from adt_finetune.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def foolbox_cifar10_pngs() -> list[Path]:
    """foolbox's 20 real CIFAR-10 test images, named cifar10_<index>_<label>.png."""
    import foolbox

    files = sorted((Path(foolbox.__file__).parent / "data").glob("cifar10_*.png"))
    assert len(files) == 20
    return files


@pytest.fixture
def cifar10_pngs() -> list[Path]:
    return foolbox_cifar10_pngs()


@pytest.fixture
def pyautoattack_checkpoint() -> Path:
    """pyautoattack's shipped CIFAR-10 ResNet-18 state dict (class: pyautoattack.examples.resnet:ResNet18)."""
    import importlib.util

    return Path(importlib.util.find_spec("pyautoattack").origin).parent / "examples" / "model_test.pt"


@pytest.fixture
def image_folder():
    """make(root, class_names): foolbox's CIFAR-10 PNGs sorted into one subfolder per class
    (ImageFolder layout); returns (root, {file name: CIFAR-10 label})."""

    def make(root: Path, class_names) -> tuple[Path, dict[str, int]]:
        labels = {}
        for f in foolbox_cifar10_pngs():
            label = int(f.stem.split("_")[2])
            (root / class_names[label]).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / class_names[label] / f.name)
            labels[f.name] = label
        return root, labels

    return make


def import_isolated(name: str):
    """A test-only library that scripts/setup-env.sh installs into <venv>/isolated/<name> because its
    wheel ships other top-level packages (torchattacks ships its own robustbench/ and autoattack/).
    Its folder goes at the END of sys.path, so the venv's real robustbench always wins."""
    import importlib
    import sys

    folder = Path(sys.prefix) / "isolated" / name
    if not (folder / name).is_dir():
        raise RuntimeError(f"{folder} is missing: run scripts/setup-env.sh test (it installs {name} there)")
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    return importlib.import_module(name)
