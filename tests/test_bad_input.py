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


def test_bench_seed_out_of_range(cli, tmp_path):
    code, _, err = cli("bench", "--methods", "none", "--attacks", "fgsm", "--seed", "1180591620717411303424",
                       "-w", tmp_path)
    assert "seed must be a whole number in [0, 4294967295]" in one_line_error(code, err)


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


@pytest.mark.parametrize("command,folder", [("train", ".adt-ft"), ("train", "runs"), ("pull", ".adt-ft"),
                                            ("eval", ".adt-ft")])  # every command that writes there
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
    one_line_error(code, err)
    assert "Permission denied" in err and str(workspace.root / folder) in err, err
    assert sorted(p.relative_to(workspace.root) for p in workspace.root.rglob("*")) == before


# ---------------------------------------------------------------- what a killed command leaves behind

def _age(path: Path, seconds: float) -> None:
    import os
    import time

    os.utime(path, (time.time() - seconds, time.time() - seconds))


def test_a_state_write_killed_midway_is_cleaned_by_the_next(workspace, cli):  # noqa: F811
    state_dir = workspace.root / ".adt-ft"
    stale = state_dir / ".state.json.k1ll3d00.tmp"
    stale.write_text('{"current_model": ')  # what kill -9 during atomic_write_json leaves
    other = state_dir / "keep.txt"
    other.write_text("not adt-ft's")
    model = workspace.current_model()
    workspace.set_current_model(model)  # any command that records state
    assert not stale.exists() and other.exists()
    assert workspace.current_model() == model


def test_run_folders_of_killed_starts_are_removed_and_resume_finds_the_unfinished_run(workspace, cli):  # noqa: F811
    """A start killed before run.json leaves runs/<id>/ with nothing resumable in it; the next train
    removes it (not one a live start may still be making). A bare --resume continues the newest
    unfinished run even when the latest run has finished."""
    import json

    code, _, err = cli("train", *TRAIN, "--run-name", "a", "-w", workspace.root)
    assert code == 0, err
    meta_path = workspace.root / "runs" / "a" / "run.json"
    meta = json.loads(meta_path.read_text())
    meta["status"] = "running"  # as a kill during training leaves it
    meta_path.write_text(json.dumps(meta))
    dead = workspace.root / "runs" / "20260101-000000-pgd-at-ce-full"
    dead.mkdir()
    (dead / ".init.pt.k1ll3d00.tmp").write_bytes(b"half")
    _age(dead, 3600)
    young = workspace.root / "runs" / "20260101-000001-pgd-at-ce-full"
    young.mkdir()  # a start that has just made its folder
    code, _, err = cli("train", *TRAIN, "--run-name", "b", "-w", workspace.root)
    assert code == 0, err
    assert not dead.exists() and young.exists()
    assert workspace.latest_run().name == "b"

    code, out, err = cli("train", "--resume", "--device", "cpu", "--no-progress", "-w", workspace.root)
    assert code == 0, err
    assert "run a finished" in out
    assert json.loads(meta_path.read_text())["status"] == "finished"
    code, _, err = cli("train", "--resume", "--device", "cpu", "--no-progress", "-w", workspace.root)
    assert "run a already finished: nothing to resume" in one_line_error(code, err)  # the latest, both finished


def test_resume_under_nproc_is_checked_before_torchrun_starts(workspace, cli, monkeypatch):  # noqa: F811
    """torchrun would wrap each process's refusal in its ChildFailedError banner."""
    import json
    import subprocess

    started, real_popen = [], subprocess.Popen

    def popen(command, *args, **kwargs):
        if "torch.distributed.run" in command:
            started.append(command)
            pytest.fail("torchrun started")
        return real_popen(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    code, _, err = cli("train", *TRAIN, "--run-name", "r1", "-w", workspace.root)
    assert code == 0, err
    code, _, err = cli("train", "--resume", "r1", "--nproc", "2", "-w", workspace.root)
    assert "run r1 already finished: nothing to resume" in one_line_error(code, err)
    meta_path = workspace.root / "runs" / "r1" / "run.json"
    meta_path.write_text(json.dumps(dict(json.loads(meta_path.read_text()), status="running")))
    code, _, err = cli("train", "--resume", "r1", "--nproc", "2", "-w", workspace.root)
    assert "trained by 1 process(es), --nproc is 2" in one_line_error(code, err)
    code, _, err = cli("train", *TRAIN, "--momentum", "2", "--nproc", "2", "-w", workspace.root)
    assert "momentum must be in [0, 1)" in one_line_error(code, err)
    assert started == []


def test_a_rerun_of_an_evaluation_removes_what_a_killed_one_left(workspace, cli):  # noqa: F811
    folder = workspace.root / "leaderboard" / "fashion-mnist" / "Linf"
    folder.mkdir(parents=True)
    entry = "e"
    leftovers = [folder / f".{entry}.json.k1ll3d00.tmp",
                 folder / f"..{entry}.per-example.csv.0123456789abcdef.staged.k1ll3d01.tmp"]
    neighbour = folder / ".other.json.k1ll3d02.tmp"  # another entry's: not this command's to remove
    for f in [*leftovers, neighbour]:
        f.write_text("half")
    code, _, err = cli("eval", *EVAL, "--attacks", "fgsm", "--entry", entry, "-w", workspace.root)
    assert code == 0, err
    assert (folder / f"{entry}.json").is_file() and (folder / f"{entry}.per-example.csv").is_file()
    assert [f for f in leftovers if f.exists()] == [] and neighbour.exists()


# ---------------------------------------------------------------- models that do not fit

SMALL = "adt_finetune.models.small:SmallCNN"


@pytest.mark.parametrize("dataset", [["--dataset", "cifar10"], []], ids=["cifar10", "default"])
def test_pull_of_a_model_for_other_images(dataset, cli, tmp_path):
    """A 1-channel model pulled as CIFAR-10 (the default dataset) was recorded, and failed later."""
    import torch

    from adt_finetune.models import SmallCNN

    torch.save(SmallCNN().state_dict(), tmp_path / "one.pt")
    code, _, err = cli("pull", "--from-file", tmp_path / "one.pt", "--arch", SMALL, *dataset, "-w", tmp_path / "ws")
    one_line_error(code, err)
    assert "does not take cifar10's 3×32×32 images" in err and "--dataset" in err
    assert not (tmp_path / "ws" / ".adt-ft" / "state.json").exists()
    code, _, err = cli("pull", "--from-file", tmp_path / "one.pt", "--arch", SMALL, "--dataset", "fashion-mnist",
                       "-w", tmp_path / "ws")
    assert code == 0, err


def test_a_model_for_other_images_on_an_image_folder(workspace, cli, tmp_path, image_folder):  # noqa: F811
    """A 1-channel model evaluated on a folder of colour images: torch's RuntimeError mid-evaluation,
    and empty leaderboard folders left behind, before."""
    import torch

    from adt_finetune.data import CIFAR10_CLASSES
    from adt_finetune.models import SmallCNN

    root, _ = image_folder(tmp_path / "colour", CIFAR10_CLASSES)
    torch.save(SmallCNN().state_dict(), tmp_path / "one.pt")
    code, _, err = cli("eval", *EVAL, "--attacks", "fgsm", "--model", tmp_path / "one.pt", "--arch", SMALL,
                       "--dataset", root, "-w", workspace.root)
    assert "does not take cifar10's 3×32×32 images" in one_line_error(code, err)
    assert not (workspace.root / "leaderboard").exists()
    assert not (workspace.root / ".adt-ft" / "eval").exists()


def test_integer_weights_are_not_cast_into_a_model(cli, tmp_path):
    """An all-int64 state dict was cast into an all-zero model, which then evaluated without complaint."""
    import torch

    from adt_finetune.models import SmallCNN

    torch.save({k: v.long() for k, v in SmallCNN().state_dict().items()}, tmp_path / "ints.pt")
    code, _, err = cli("pull", "--from-file", tmp_path / "ints.pt", "--arch", SMALL, "--dataset", "fashion-mnist",
                       "-w", tmp_path / "ws")
    assert "are not floating point where SmallCNN's are: features.0.weight (int64)" in one_line_error(code, err)
    assert not (tmp_path / "ws" / ".adt-ft" / "state.json").exists()


# ---------------------------------------------------------------- damaged data

@pytest.mark.parametrize("cache", ["unset", "empty-string", "empty-folder"])
@pytest.mark.parametrize("damage", ["garbage-raw", "truncated-gz"])
def test_damaged_dataset_files_are_one_line(damage, cache, workspace, cli, monkeypatch, tmp_path):  # noqa: F811
    """Garbage in <data-dir>/FashionMNIST/raw was torchvision's AssertionError; a truncated archive with
    an empty XDG_CACHE_HOME printed only 'Aborted.' (click's answer to an EOFError)."""
    if cache == "unset":
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        (tmp_path / "cache").mkdir()
        monkeypatch.setenv("XDG_CACHE_HOME", "" if cache == "empty-string" else str(tmp_path / "cache"))
    mine = tmp_path / "mine"
    if damage == "garbage-raw":
        (mine / "FashionMNIST" / "raw").mkdir(parents=True)
        for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte",
                     "train-labels-idx1-ubyte"):
            (mine / "FashionMNIST" / "raw" / name).write_bytes(b"\x00\x00\x08\x03garbage")
        words = "has other content (MD5 mismatch)"
    else:
        mine.mkdir()
        for f in Path("/usr/share/datasets/fashion-mnist").glob("t10k-*.gz"):
            data = f.read_bytes()
            (mine / f.name).write_bytes(data[:100])
        words = "is truncated or not gzip data"
    code, _, err = cli("eval", *EVAL, "--attacks", "fgsm", "--data-dir", mine, "-w", workspace.root)
    assert words in one_line_error(code, err) and str(mine) in err
    assert not (workspace.root / "leaderboard").exists()
    assert not (tmp_path / "cache" / "adt-ft").exists()


# ---------------------------------------------------------------- quickstart

def test_quickstart_with_damaged_data_writes_nothing(cli, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    for f in Path("/usr/share/datasets/fashion-mnist").glob("*.gz"):
        data = f.read_bytes()
        (mine / f.name).write_bytes(data[:len(data) // 2] if f.name.startswith("train-images") else data)
    ws = tmp_path / "ws"
    code, _, err = cli("quickstart", "--data-dir", mine, "--no-progress", "-w", ws)
    assert "train-images-idx3-ubyte.gz is truncated" in one_line_error(code, err)
    assert not ws.exists() or list(ws.iterdir()) == []


def test_quickstart_records_a_data_dir_path_as_text(tmp_path):
    """--data-dir reaches the library as a Path, and run.json is JSON (it was 'PosixPath is not JSON
    serializable' after the pretrained model was already written)."""
    import json

    from adt_finetune.quickstart import QuickstartSettings, quickstart

    mine = tmp_path / "mine"
    mine.mkdir()
    for f in Path("/usr/share/datasets/fashion-mnist").glob("*.gz"):
        (mine / f.name).symlink_to(f)
    s = QuickstartSettings(width=4, pretrain_images=64, pretrain_epochs=1, finetune_images=64, finetune_epochs=1,
                           gen_width=4, n_examples=8)
    res = quickstart(tmp_path / "ws", settings=s, data_dir=mine, log=lambda m: None)
    meta = json.loads((res.workspace / "runs" / res.run_id / "run.json").read_text())
    assert meta["config"]["data_dir"] == str(mine)
    assert res.record.json_path.is_file()
