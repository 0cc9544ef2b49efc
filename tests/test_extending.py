"""A new method or attack is one new file (docs/extending.md): the registry finds it, and the CLI's help,
`train`, `eval` and `bench` take it, with no other file touched.

The toy method and attack are dropped into a copy of the package (the checkout stays as it is); the
commands run on that copy in a fresh interpreter, as a user would after adding the file.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adt_finetune.attacks import ATTACKS
from adt_finetune.cli.common import attack_names, method_names
from adt_finetune.methods import METHODS
from adt_finetune.models import SmallCNN
from adt_finetune.registry import declared_names
from adt_finetune.zoo import register_model

PACKAGE = Path(__file__).resolve().parent.parent / "adt_finetune"

TOY_METHOD = '''
"""A toy method with a network of its own and no `.generator`: random-sign noise scaled by a learnt gain."""
import torch
from torch import nn

from .base import StepOutput, TrainMethod, register_method
from .losses import training_loss


@register_method("toy-noise")
class ToyNoise(TrainMethod):
    accepts_loss = ("ce",)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.gain = nn.Linear(1, 1).to(ctx.device)
        self.opt = torch.optim.SGD(self.gain.parameters(), lr=0.1)

    def modules(self):
        return {"gain": self.gain}

    def optimizers(self):
        return {"gain": self.opt}

    def step(self, model, x, y):
        scale = torch.sigmoid(self.gain(torch.ones(1, 1, device=x.device))).reshape(())
        x_adv = (x + self.ctx.eps * scale * torch.randn_like(x).sign()).clamp(0, 1)
        loss = training_loss(self.cfg.loss, model(x_adv), y)
        return StepOutput(loss, {"loss": loss.item()}, x_adv.detach())
'''

TOY_ATTACK = '''
"""A toy attack: x' = x + ε·sign(noise), one draw per example."""
import torch

from .base import Attack, example_generators, register_attack


@register_attack("toy-sign")
class ToySign(Attack):
    def perturb(self, model, x, y):
        noise = torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device)
                             for g in example_generators(x, f"{self.name}:{self.seed}")])
        return (x + self.eps * noise.sign()).clamp(0, 1)
'''


def test_help_lists_exactly_the_registered_names():
    """What the CLI reads from the source (no import, no torch) is what importing the packages registers."""
    assert method_names() == sorted(METHODS) and "exp-am" in method_names()
    assert attack_names() == sorted(ATTACKS) and "square" in attack_names()


def test_declared_names_reads_decorators_and_calls(tmp_path):
    (tmp_path / "a.py").write_text('@register_thing("one")\nclass A: ...\nregister_thing("two")(B)\n'
                                   'register_thing(NAME)(C)\nother("three")\n')
    assert declared_names(tmp_path, "register_thing") == ["one", "two"]


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    """A copy of the package with one new method file and one new attack file, and a workspace."""
    root = tmp_path_factory.mktemp("extended")
    shutil.copytree(PACKAGE, root / "adt_finetune", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "adt_finetune" / "methods" / "toy_noise.py").write_text(TOY_METHOD)
    (root / "adt_finetune" / "attacks" / "toy_sign.py").write_text(TOY_ATTACK)
    ws = root / "ws"
    torch.manual_seed(1)
    register_model(SmallCNN(width=8), name="base", arch="adt_finetune.models.small:SmallCNN",
                   arch_kwargs={"width": 8}, dataset="fashion-mnist", workspace=ws)
    return root, ws


def _adt_ft(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200", "ADT_FT_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "adt_finetune", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)


def _help_text(out: str) -> str:
    return " ".join(out.replace("│", " ").split())


def test_the_new_files_are_the_only_change(extended):
    root, _ = extended
    ours = {p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    theirs = {p.relative_to(root / "adt_finetune") for p in (root / "adt_finetune").rglob("*.py")
              if "__pycache__" not in p.parts}
    assert theirs - ours == {Path("methods/toy_noise.py"), Path("attacks/toy_sign.py")}
    for rel in ours:
        assert (root / "adt_finetune" / rel).read_bytes() == (PACKAGE / rel).read_bytes(), rel


@pytest.mark.slow
def test_a_new_method_file_is_listed_trained_and_benchmarked(extended):
    root, ws = extended
    helps = {cmd: _adt_ft(root, cmd, "--help") for cmd in ("train", "bench", "eval")}
    assert all(h.returncode == 0 for h in helps.values()), {c: h.stderr[-500:] for c, h in helps.items()}
    assert "toy-noise" in _help_text(helps["train"].stdout) and "toy-noise" in _help_text(helps["bench"].stdout)
    assert "toy-sign" in _help_text(helps["eval"].stdout) and "toy-sign" in _help_text(helps["bench"].stdout)

    out = _adt_ft(root, "train", "--method", "toy-noise", "--train-subset", "64", "--batch-size", "32",
                  "--max-steps", "2", "--epochs", "1", "--device", "cpu", "--no-progress", "--run-name", "toy",
                  "--workspace", str(ws))
    assert out.returncode == 0, out.stderr[-3000:]
    run = ws / "runs" / "toy"
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "finished" and meta["method"] == "toy-noise" and meta["generator"] is None
    # The method's own network is saved as the base class does it (not as an ADT generator file).
    saved = torch.load(run / "networks.pt", weights_only=True)
    assert set(saved) == {"gain"} and set(saved["gain"]) == {"weight", "bias"}
    assert not (run / "generator.pt").exists()

    out = _adt_ft(root, "eval", "--attacks", "toy-sign,fgsm", "-n", "16", "--batch-size", "16", "--device", "cpu",
                  "--no-progress", "--workspace", str(ws))
    assert out.returncode == 0, out.stderr[-3000:]
    entry = json.loads(next((ws / "leaderboard").rglob("*.json")).read_text())
    assert "toy-sign" in json.dumps(entry) and "toy-sign" in out.stdout

    out = _adt_ft(root, "bench", "--methods", "toy-noise", "--attacks", "toy-sign", "--batch-size", "2",
                  "--steps", "1", "--device", "cpu", "--arch-kwargs", '{"width": 4}')
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    assert {"toy-noise", "toy-sign", "pgd-at", "pgd20"} <= set(rows), out.stdout
