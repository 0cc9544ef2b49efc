"""Bad input found by a hostile-colleague campaign (issue 22, section 4): each case is one line on
stderr, exit code 2, no traceback and nothing half-written, or, where the command used to succeed
with a wrong result, a refusal."""
from __future__ import annotations

from pathlib import Path

import pytest

from test_compare import A_ROBUST, B_ROBUST, result, write
from test_evaluation import workspace  # noqa: F401


def one_line_error(code, err) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


def runs_left(ws: Path) -> list[Path]:
    runs = ws / "runs"  # a run's name is claimed with a hidden .<id>.lock beside its folder
    return sorted(p for p in runs.iterdir() if not p.name.startswith(".")) if runs.is_dir() else []


# ---------------------------------------------------------------- training settings

TRAIN = ["--method", "pgd-at", "--epochs", "1", "--train-subset", "64", "--batch-size", "32", "--max-steps", "1",
         "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("args,needle", [
    # torch's own ValueError, a traceback, before
    (["--momentum", "-1"], "momentum must be in [0, 1), got -1.0"),
    (["--weight-decay", "-1"], "weight_decay must be 0 or more"),
    (["--seed", "1180591620717411303424"], "seed must be a whole number in [0, 4294967295]"),
    (["--seed", "-1"], "seed must be a whole number"),
    (["--method", "exp-am", "--gen-betas", "2,0.9"], "gen_betas must both be in [0, 1), got 2,0.9"),
    # a run that trained with a setting no optimiser means, before
    (["--momentum", "2"], "momentum must be in [0, 1)"),
    (["--gamma", "-1"], "gamma must be positive"),
    (["--gamma", "0"], "gamma must be positive"),
    (["--beta", "-1"], "beta must be 0 or more"),
    (["--schedule", "step", "--milestones", "0"], "milestones are 1-based epoch numbers"),
    (["--arch-kwargs", '{"width": 8}'], "arch_kwargs applies to model 'scratch' or a checkpoint file"),
    (["--arch", "adt_finetune.models.small:SmallCNN"], "arch applies to model 'scratch' or a checkpoint file"),
    (["--model", "scratch", "--arch-kwargs", '{"width": 8}', "--dataset", "fashion-mnist"],
     "--model scratch needs --arch"),
])
def test_training_settings_out_of_range(args, needle, workspace, cli):  # noqa: F811
    code, out, err = cli("train", *TRAIN, *args, "-w", workspace.root)
    one_line_error(code, err)
    assert needle in err, err
    assert runs_left(workspace.root) == []


def test_in_range_settings_still_train(workspace, cli):  # noqa: F811
    """The bounds are the edges of what is allowed, not beyond: 0 momentum, 0 decay, β 0, the largest seed."""
    code, out, err = cli("train", *TRAIN, "--momentum", "0", "--weight-decay", "0", "--beta", "0", "--seed",
                         str(2**32 - 1), "--schedule", "step", "--milestones", "1", "--run-name", "edge",
                         "-w", workspace.root)
    assert code == 0, err
    assert [p.name for p in runs_left(workspace.root)] == ["edge"]


def test_a_recipe_that_is_not_utf8(workspace, cli):  # noqa: F811
    recipes = workspace.root / "recipes"
    recipes.mkdir()
    (recipes / "wide.yaml").write_bytes("description: UTF-16 text\nepochs: 1\n".encode("utf-16"))
    code, _, err = cli("train", *TRAIN, "--recipe", "wide", "-w", workspace.root)
    assert "wide.yaml is not UTF-8 text" in one_line_error(code, err)
    code, out, err = cli("recipes", "-w", workspace.root)
    assert code == 0, err
    assert any(line.startswith("wide ") and "(not UTF-8 text)" in line for line in out.splitlines()), out


# ---------------------------------------------------------------- evaluation options

EVAL = ["-n", "8", "--no-progress"]


@pytest.mark.parametrize("args,needle", [
    (["--attacks", "fgsm", "--set", "fgsm.eps=5"], "attack setting fgsm.eps: eps is the evaluation's"),
    (["--attacks", "fgsm", "--set", "fgsm.seed=5"], "attack setting fgsm.seed: seed is the evaluation's"),
    # ran fgsm only and wrote an entry, before
    (["--suite", "quick", "--attacks", "fgsm"], "give --suite quick or --attacks fgsm, not both"),
])
def test_eval_options_that_contradict(args, needle, workspace, cli):  # noqa: F811
    code, _, err = cli("eval", *EVAL, *args, "-w", workspace.root)
    assert needle in one_line_error(code, err), err
    assert not (workspace.root / "leaderboard").exists()


def test_the_library_refuses_a_suite_and_attacks_too(workspace):  # noqa: F811
    from adt_finetune.errors import UserError
    from adt_finetune.evaluation import EvalRequest

    with pytest.raises(UserError, match="not both"):
        EvalRequest(suite="quick", attacks="fgsm", n_examples=8, workspace=workspace.root)


def test_compare_resamples_are_capped(cli, tmp_path):
    ws = tmp_path / "ws"
    write(ws / "leaderboard", "a", result(A_ROBUST))
    write(ws / "leaderboard", "b", result(B_ROBUST))
    code, _, err = cli("compare", "a", "b", "--resamples", "100000000000", "-w", ws)
    assert "resamples 100000000000 is more than the 1,000,000" in one_line_error(code, err)
    code, _, err = cli("compare", "a", "b", "--seed", "-1", "-w", ws)
    assert "seed must be 0 or more" in one_line_error(code, err)
    code, out, err = cli("compare", "a", "b", "--resamples", "1000000", "--json", "-w", ws)
    assert code == 0, err


def test_bench_arch_arguments_torch_refuses(cli, tmp_path):
    code, _, err = cli("bench", "--arch-kwargs", '{"width": -3}', "--methods", "none", "--attacks", "fgsm")
    one_line_error(code, err)
    assert "cannot construct it with arguments" in err and "negative dimension" in err


# ---------------------------------------------------------------- an immutable workspace folder

def refuse_writes_under(monkeypatch, folder: Path) -> None:
    """Writing under `folder` fails as it does for a user without permission (chattr +i, or another
    user's folder). Root writes through a read-only mode, so the OS's refusal is simulated where files
    and folders are made: os.open (open with O_CREAT, mkstemp, file locks) and os.mkdir."""
    import os

    real_open, real_mkdir = os.open, os.mkdir

    def inside(path) -> bool:
        p = Path(os.fsdecode(path)).absolute()
        return p == folder or folder in p.parents

    def guarded_open(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and inside(path):
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path):
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


@pytest.mark.parametrize("folder", [".adt-ft", "runs"])
@pytest.mark.parametrize("command", ["train", "pull", "eval"])
def test_an_immutable_state_or_runs_folder(folder, command, workspace, cli, monkeypatch):  # noqa: F811
    (workspace.root / folder).mkdir(exist_ok=True)
    before = sorted(p.relative_to(workspace.root) for p in workspace.root.rglob("*"))
    import torch

    from adt_finetune.models import SmallCNN

    torch.save(SmallCNN().state_dict(), workspace.root.parent / "cnn.pt")
    refuse_writes_under(monkeypatch, workspace.root / folder)
    args = {"train": ["train", *TRAIN, "--run-name", "r"],
            "pull": ["pull", "--from-file", workspace.root.parent / "cnn.pt", "--arch",
                     "adt_finetune.models.small:SmallCNN", "--dataset", "fashion-mnist"],
            "eval": ["eval", *EVAL, "--attacks", "fgsm"]}[command]
    code, out, err = cli(*args, "-w", workspace.root)
    if code == 0:  # a command that never writes there
        assert folder == "runs" and command != "train", err
        return
    one_line_error(code, err)
    assert "Permission denied" in err and str(workspace.root / folder) in err, err
    assert sorted(p.relative_to(workspace.root) for p in workspace.root.rglob("*")) == before
