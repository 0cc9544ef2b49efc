"""The study recipe (recipes/studies/study-fmnist.yaml) against what the trainer and evaluator accept.

The study itself runs for over an hour; these checks catch a recipe the script
would only trip over after the first runs had already been paid for.
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from adt_finetune.config import list_recipes
from adt_finetune.evaluation import SUITES, check_attack_names
from adt_finetune.methods import METHODS, MethodContext, make_method
from adt_finetune.models import SmallCNN
from adt_finetune.nets import find_last_linear
from adt_finetune.training import build_config, resolve_loss, validate_config

REPO = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("study_fmnist", REPO / "scripts" / "study_fmnist.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study():
    return _script()


@pytest.mark.parametrize("smoke", [False, True])
def test_recipe_parses_into_the_study_settings(study, smoke):
    s = study.load_settings(study.RECIPE, smoke=smoke)
    assert s.suite == "paper" and s.mode == "independent"
    assert set(s.scopes) == {"last-layer", "full"} and set(s.lr) >= set(s.scopes)
    check_attack_names(SUITES[s.suite])
    assert s.attack_settings["feature"]["targets"] < 200  # reduced, and README/output say so
    if smoke:
        assert s.n_examples <= 100 and s.train_subset <= 512
    else:
        assert s.n_examples == 1000 and s.attack_settings["autoattack"]["version"] == "standard"
        assert set(s.methods) == {("pgd-at", "ce"), ("trades", "trades"), ("exp", "ce"), ("exp-am", "ce"),
                                  ("imp-am", "ce"), ("exp-am", "trades")}
        assert len(s.jobs) == 12 and len({j.run_name for j in s.jobs}) == 12


@pytest.mark.parametrize("smoke", [False, True])
def test_every_run_is_accepted_by_the_trainer(study, smoke):
    s = study.load_settings(study.RECIPE, smoke=smoke)
    _, head = find_last_linear(SmallCNN(width=4), torch.zeros(1, 1, 28, 28))
    for job in s.jobs:
        cfg = s.train_config(job)
        validate_config(cfg)
        assert resolve_loss(cfg) == job.loss  # a loss the method does not take would raise or be swapped
        # What `adt-ft train` would build from the same settings must agree, loss included.
        flags = {k: v for k, v in cfg.to_dict().items() if k in ("method", "loss", "scope", "epochs", "lr",
                                                                  "train_subset", "gen_width", "batch_size")}
        assert build_config(None, flags).loss == job.loss
        assert job.method in METHODS and job.loss in METHODS[job.method].accepts_loss
        ctx = MethodContext(eps=0.1, in_channels=1, num_classes=10, image_size=28, device=torch.device("cpu"),
                            head=head)
        assert make_method(replace(cfg, eps="0.1"), ctx).name == job.method


def test_study_recipe_is_not_listed_as_a_training_recipe():
    assert "study-fmnist" not in {name for name, _, _ in list_recipes()}
