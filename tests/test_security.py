"""A workspace or run folder someone shares is data, never code (issue 12): an architecture read
from state.json or run.json is only imported when it is a zoo name, adt-ft's own, or one the user
has named with --arch; and whatever is named must be an nn.Module class before anything is called."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adt_finetune.models import SmallCNN
from adt_finetune.workspace import ModelRef, Workspace

SMALL_CNN = "adt_finetune.models.small:SmallCNN"


def _hostile_workspace(tmp_path: Path, arch: str, kwargs: dict) -> tuple[Workspace, Path]:
    ws = Workspace(tmp_path / "ws")
    ckpt = tmp_path / "weights.pt"
    torch.save(SmallCNN().state_dict(), ckpt)
    ws.set_current_model(ModelRef(name="shared", arch=arch, dataset="fashion-mnist", path=str(ckpt), source="file",
                                  arch_kwargs=kwargs))
    return ws, tmp_path / "PWNED"


@pytest.mark.parametrize("arch,kwargs", [("os:system", {"command": "touch {pwned}"}),
                                         ("subprocess:Popen", {"args": ["touch", "{pwned}"]}),
                                         ("tests_evil_module_that_does_not_exist:Net", {})])
def test_state_json_architecture_is_never_imported(tmp_path, cli, arch, kwargs):
    pwned = tmp_path / "PWNED"
    kwargs = json.loads(json.dumps(kwargs).replace("{pwned}", str(pwned)))
    ws, _ = _hostile_workspace(tmp_path, arch, kwargs)
    for args in (["train", "--method", "pgd-at", "--epochs", "1", "--train-subset", "64"],
                 ["eval", "--attacks", "fgsm", "-n", "8"]):
        code, out, err = cli(*args, "-w", ws.root)
        assert code == 2, (args, out, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert arch in err and "--arch" in err
        assert not pwned.exists()


def test_run_json_architecture_is_never_imported(tmp_path, cli):
    """A run folder (inside or outside the workspace) whose run.json names code is refused too."""
    pwned = tmp_path / "PWNED"
    run = tmp_path / "shared-run"
    run.mkdir()
    torch.save(SmallCNN().state_dict(), run / "model.pt")
    ref = {"name": "shared-run", "arch": "os:system", "dataset": "fashion-mnist", "threat_model": "Linf",
           "path": str(run / "model.pt"), "source": "run", "arch_kwargs": {"command": f"touch {pwned}"}}
    (run / "run.json").write_text(json.dumps({"id": "shared-run", "status": "finished", "base_model": ref,
                                              "model": ref, "method": "pgd-at", "dataset": "fashion-mnist"}))
    code, out, err = cli("eval", "--run", run, "--attacks", "fgsm", "-n", "8", "--baseline", "-w", tmp_path / "ws")
    assert code == 2 and "os:system" in err and not pwned.exists(), (out, err)


def test_an_architecture_the_user_names_is_built_and_then_trusted(tmp_path, cli, monkeypatch):
    """Naming --arch on the command line is the user's decision (like `python -m`): it works, and a
    later command reading the same architecture from the workspace works too; before the user named
    it, the same workspace record was refused."""
    from adt_finetune.zoo import trust

    monkeypatch.setenv("ADT_FT_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setattr(trust, "_session", set())
    # A model class outside adt_finetune.models, so that trust matters.
    (tmp_path / "tests_trusted_arch.py").write_text("from adt_finetune.models.small import SmallCNN as Net\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    arch = "tests_trusted_arch:Net"
    ckpt = tmp_path / "m.pt"
    torch.save(SmallCNN().state_dict(), ckpt)
    ws = Workspace(tmp_path / "ws")
    ws.set_current_model(ModelRef(name="m", arch=arch, dataset="fashion-mnist", path=str(ckpt), source="file"))
    code, _, err = cli("eval", "--attacks", "fgsm", "-n", "8", "-w", ws.root, "--no-progress")
    assert code == 2 and arch in err

    code, out, err = cli("pull", "--from-file", ckpt, "--arch", arch, "--dataset", "fashion-mnist", "-w", ws.root)
    assert code == 0, err
    assert arch in (tmp_path / "config" / trust.TRUST_FILE).read_text()
    monkeypatch.setattr(trust, "_session", set())  # as in a new process: only the config file remembers
    code, out, err = cli("eval", "--attacks", "fgsm", "-n", "8", "-w", ws.root, "--no-progress")
    assert code == 0, err


def test_non_module_targets_are_refused_before_they_are_called(tmp_path):
    from adt_finetune.errors import UserError
    from adt_finetune.zoo import build_architecture

    marker = tmp_path / "called"
    with pytest.raises(UserError, match="not a torch.nn.Module class"):
        build_architecture("os:system", "fashion-mnist", arch_kwargs={"command": f"touch {marker}"})
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"hello world\nthis is text\n", b'{"a": 1}\n', b"", b"\x80\x02}q\x00.",
                                     b"PK\x03\x04garbage"])
def test_files_that_are_not_checkpoints_are_one_line(tmp_path, cli, content):
    """A text file (or garbage) renamed .pt: one line, exit 2, for pull --from-file and eval --model
    (a text file used to surface as a KeyError/IndexError traceback from torch's unpickler)."""
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    for args in (["pull", "--from-file", path, "--arch", SMALL_CNN, "--dataset", "fashion-mnist"],
                 ["eval", "--model", path, "--arch", SMALL_CNN, "--dataset", "fashion-mnist", "-n", "4",
                  "--attacks", "fgsm", "--no-progress"]):
        code, out, err = cli(*args, "-w", tmp_path / "ws")
        assert code == 2, (args, out, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
