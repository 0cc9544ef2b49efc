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


# ---------------------------------------------------------------- issue 22: nothing in a file names code

HUB_LOAD = "adt_finetune.models.small:nn.modules.module.torch.hub.load"
TORCH_SAVE = "adt_finetune.models.small:nn.modules.module.torch.save"


def _one_line(code: int, err: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def _nothing_outside(outside: Path) -> None:
    assert not outside.exists() or not any(outside.iterdir()), sorted(outside.iterdir())


@pytest.fixture
def hostile(tmp_path, trained_cnn):
    """A workspace whose files someone else wrote: a hubconf.py that would leave a marker when imported,
    a trained model, and a folder outside the workspace where nothing may appear."""
    ws = Workspace(tmp_path / "ws")
    (ws.root / "hub").mkdir(parents=True)
    marker = tmp_path / "outside" / "PWNED"
    marker.parent.mkdir()
    (ws.root / "hub" / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                                "def Net(**kw):\n    return None\n")
    ckpt = tmp_path / "weights.pt"
    torch.save(trained_cnn.state_dict(), ckpt)
    return {"ws": ws, "marker": marker, "outside": marker.parent, "ckpt": ckpt, "tmp": tmp_path}


def _attacks(h) -> list[tuple[str, dict]]:
    return [(HUB_LOAD, {"repo_or_dir": str(h["ws"].root / "hub"), "model": "Net", "source": "local"}),
            (TORCH_SAVE, {"obj": {"x": 1}, "f": str(h["outside"] / "written.pt")}),
            ("subprocess:getoutput", {"cmd": f"touch {h['marker']}"})]


def test_a_dotted_architecture_in_state_json_runs_nothing(hostile, cli):
    """`module:a.b.c` used to walk from adt-ft's own module to torch.hub.load (running <ws>/hub/hubconf.py)
    or torch.save (writing outside): refused before any import, for train and eval."""
    h = hostile
    for arch, kwargs in _attacks(h):
        h["ws"].set_current_model(ModelRef(name="m", arch=arch, dataset="fashion-mnist", path=str(h["ckpt"]),
                                           source="file", arch_kwargs=kwargs))
        for args in (["train", "--method", "pgd-at", "--epochs", "1", "--train-subset", "32"],
                     ["eval", "--attacks", "fgsm", "-n", "8", "--no-progress"]):
            code, _, err = cli(*args, "-w", h["ws"].root)
            _one_line(code, err)
            assert arch in err
            _nothing_outside(h["outside"])


def _finished_run(h, arch: str, kwargs: dict) -> Path:
    run = h["ws"].runs_dir / "shared"
    run.mkdir(parents=True, exist_ok=True)
    torch.save(SmallCNN(width=16).state_dict(), run / "model.pt")
    ref = {"name": "shared", "arch": arch, "dataset": "fashion-mnist", "threat_model": "Linf",
           "path": "runs/shared/model.pt", "source": "run", "arch_kwargs": kwargs}
    (run / "run.json").write_text(json.dumps({"id": "shared", "status": "finished", "base_model": ref, "model": ref,
                                              "method": "pgd-at", "dataset": "fashion-mnist"}))
    return run


def test_a_dotted_architecture_in_run_json_runs_nothing(hostile, cli):
    h = hostile
    for arch, kwargs in _attacks(h):
        _finished_run(h, arch, kwargs)
        for args in (["eval", "--run", "shared"], ["eval", "--run", h["ws"].runs_dir / "shared", "--baseline"]):
            code, _, err = cli(*args, "--attacks", "fgsm", "-n", "8", "-w", h["ws"].root, "--no-progress")
            _one_line(code, err)
            assert arch in err and "run.json" in err
            _nothing_outside(h["outside"])


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory):
    """A real scratch run stopped after its first step (checkpoint written): `train --resume` material."""
    from adt_finetune import TrainConfig, train

    root = tmp_path_factory.mktemp("unfinished")

    def stop(step: int) -> None:
        raise KeyboardInterrupt

    cfg = TrainConfig(model="scratch", arch=SMALL_CNN, arch_kwargs={"width": 8}, dataset="fashion-mnist",
                      method="pgd-at", epochs=1, batch_size=16, train_subset=64, run_name="rr", pgd_steps=1)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, workspace=root, on_step=stop)
    return root / "runs" / "rr"


def _copy_run(run: Path, ws: Workspace) -> Path:
    import shutil

    dest = ws.runs_dir / run.name
    shutil.copytree(run, dest)
    return dest


@pytest.mark.parametrize("checkpoint", [True, False])
def test_resume_never_builds_an_architecture_its_run_json_names(hostile, cli, unfinished_run, checkpoint):
    """run.json's config (and base model) said `subprocess:getoutput` with a command as its argument:
    `train --resume` ran it. Now the recorded architecture is data: refused unless trusted."""
    h = hostile
    for arch, kwargs in _attacks(h):
        run = _copy_run(unfinished_run, h["ws"])
        meta = json.loads((run / "run.json").read_text())
        meta["config"].update(arch=arch, arch_kwargs=kwargs)
        meta["base_model"].update(arch=arch, arch_kwargs=kwargs)
        (run / "run.json").write_text(json.dumps(meta))
        if not checkpoint:
            (run / "checkpoint.pt").unlink()
        code, _, err = cli("train", "--resume", "rr", "-w", h["ws"].root, "--no-progress")
        _one_line(code, err)
        assert arch in err
        _nothing_outside(h["outside"])
        import shutil

        shutil.rmtree(run)


def test_the_user_still_resumes_a_run_of_a_trusted_architecture(tmp_path, cli, unfinished_run):
    ws = Workspace(tmp_path / "ws")
    _copy_run(unfinished_run, ws)
    code, out, err = cli("train", "--resume", "rr", "-w", ws.root, "--no-progress")
    assert code == 0, err
    assert json.loads((ws.runs_dir / "rr" / "run.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("spec", ["adt_finetune.models.small:nn.Module", "adt_finetune.models:small.SmallCNN",
                                  "adt_finetune.models.small:SmallCNN.__init__", "adt_finetune.models.small:nn",
                                  "../evil:Net", "adt_finetune.models.small:"])
def test_a_named_architecture_is_a_direct_model_class_attribute(spec, tmp_path):
    """Also on the command line: no dotted path after ':', and adt-ft's own modules offer only their classes."""
    from adt_finetune.errors import UserError
    from adt_finetune.zoo import build_architecture

    with pytest.raises(UserError):
        build_architecture(spec, "fashion-mnist")


def test_a_function_is_built_only_when_the_user_named_it(tmp_path):
    """pyautoattack's ResNet18 is a function: fine when named, refused when a file names it untrusted."""
    from adt_finetune.errors import UserError
    from adt_finetune.zoo import build_architecture, trust

    with pytest.raises(UserError, match="never named it"):
        build_architecture("tests_never_named_module:ResNet18", "cifar10", source="run.json")
    assert trust.is_trusted(SMALL_CNN) and not trust.is_trusted("tests_never_named_module:ResNet18")


# ---------------------------------------------------------------- issue 22: nothing written outside the workspace

@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, _trained_cnn_state):
    """A workspace with the trained CNN as its current model and one leaderboard entry (entry 'e')."""
    from adt_finetune.evaluation import EvalRequest, evaluate_workspace
    from adt_finetune.zoo import register_model

    root = tmp_path_factory.mktemp("evaluated") / "ws"
    model = SmallCNN(width=16)
    model.load_state_dict(_trained_cnn_state)
    register_model(model, name="cnn", arch=SMALL_CNN, arch_kwargs={"width": 16}, dataset="fashion-mnist",
                   workspace=root)
    evaluate_workspace(EvalRequest(attacks="fgsm", n_examples=16, entry="e", workspace=root))
    return root


def _copy_ws(src: Path, tmp_path: Path) -> tuple[Workspace, Path]:
    import shutil

    shutil.copytree(src, tmp_path / "ws", symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    return Workspace(tmp_path / "ws"), outside


def _eval(cli, ws: Workspace, *extra):
    return cli("eval", "--attacks", "fgsm", "-n", "8", "--entry", "new", "-w", ws.root, "--no-progress", *extra)


@pytest.mark.parametrize("field,value", [("threat_model", "../../../outside/x"), ("dataset", "{outside}"),
                                         ("dataset", "../../outside")])
def test_path_fields_of_the_current_model_are_plain_names(tmp_path, cli, evaluated, field, value):
    """current_model.threat_model "../../../outside/x" made eval write its entry outside; a dataset
    "/abs/folder" wrote into that folder."""
    ws, outside = _copy_ws(evaluated, tmp_path)
    st = json.loads(ws.state_path.read_text())
    st["current_model"][field] = value.format(outside=outside)
    ws.state_path.write_text(json.dumps(st))
    code, _, err = _eval(cli, ws)
    _one_line(code, err)
    assert field in err and "plain name" in err
    _nothing_outside(outside)


def test_path_fields_of_a_run_are_plain_names(tmp_path, cli, evaluated):
    ws, outside = _copy_ws(evaluated, tmp_path)
    run = ws.runs_dir / "r"
    run.mkdir(parents=True)
    torch.save(SmallCNN(width=16).state_dict(), run / "model.pt")
    ref = {"name": "r", "arch": SMALL_CNN, "dataset": "fashion-mnist", "threat_model": "../../../outside/x",
           "path": "runs/r/model.pt", "source": "run", "arch_kwargs": {"width": 16}}
    (run / "run.json").write_text(json.dumps({"id": "r", "status": "finished", "base_model": ref, "model": ref,
                                              "method": "pgd-at", "dataset": "fashion-mnist"}))
    code, _, err = _eval(cli, ws, "--run", "r")
    _one_line(code, err)
    _nothing_outside(outside)


@pytest.mark.parametrize("field,value", [("threat_model", "../../../outside/x"), ("dataset", "{outside}")])
def test_a_shard_file_cannot_send_merge_outside(tmp_path, cli, evaluated, field, value):
    ws, outside = _copy_ws(evaluated, tmp_path)
    shards = tmp_path / "shards"
    for k in range(2):
        code, _, err = _eval(cli, ws, "--shard", f"{k}/2", "--shard-dir", shards)
        assert code == 0, err
    for f in shards.glob("*.json"):
        data = json.loads(f.read_text())
        data["meta"][field] = value.format(outside=outside)
        f.write_text(json.dumps(data))
    code, _, err = cli("merge", shards, "-w", ws.root)
    _one_line(code, err)
    assert field in err
    _nothing_outside(outside)
    assert not (ws.leaderboard_dir / "fashion-mnist" / "Linf" / "new.json").exists()


@pytest.mark.parametrize("link", ["leaderboard/fashion-mnist/Linf", "leaderboard", ".adt-ft", ".adt-ft/eval"])
def test_eval_never_writes_through_a_link_out_of_the_workspace(tmp_path, cli, evaluated, link):
    import shutil

    ws, outside = _copy_ws(evaluated, tmp_path)
    if link.startswith(".adt-ft"):
        # state.json stays readable where it points to, so that eval gets as far as writing
        shutil.copytree(ws.root / link, outside, dirs_exist_ok=True)
        shutil.rmtree(ws.root / link)
    else:
        shutil.rmtree(ws.root / link)
    before = sorted(p.relative_to(outside) for p in outside.rglob("*"))
    (ws.root / link).symlink_to(outside, target_is_directory=True)
    code, _, err = _eval(cli, ws)
    _one_line(code, err)
    assert "outside workspace" in err and "link" in err
    assert sorted(p.relative_to(outside) for p in outside.rglob("*")) == before


def test_train_and_pull_never_write_through_a_link_out_of_the_workspace(tmp_path, cli, evaluated):
    import shutil

    ws, outside = _copy_ws(evaluated, tmp_path)
    (ws.root / "runs").symlink_to(outside, target_is_directory=True)
    code, _, err = cli("train", "--method", "pgd-at", "--epochs", "1", "--train-subset", "32", "--run-name", "x",
                       "-w", ws.root, "--no-progress")
    _one_line(code, err)
    assert "outside workspace" in err
    _nothing_outside(outside)

    state_copy = tmp_path / "state-outside"
    shutil.copytree(ws.root / ".adt-ft", state_copy)
    shutil.rmtree(ws.root / ".adt-ft")
    (ws.root / ".adt-ft").symlink_to(state_copy, target_is_directory=True)
    before = (state_copy / "state.json").read_text()
    ckpt = tmp_path / "cnn.pt"
    torch.save(SmallCNN().state_dict(), ckpt)
    code, _, err = cli("pull", "--from-file", ckpt, "--arch", SMALL_CNN, "--dataset", "fashion-mnist", "-w", ws.root)
    _one_line(code, err)
    assert (state_copy / "state.json").read_text() == before


def test_register_model_never_writes_through_a_link(tmp_path):
    from adt_finetune.errors import UserError
    from adt_finetune.zoo import register_model

    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "models").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UserError, match="outside workspace"):
        register_model(SmallCNN(), name="m", arch=SMALL_CNN, dataset="fashion-mnist", workspace=tmp_path / "ws")
    _nothing_outside(outside)


def test_html_never_publishes_a_file_reached_through_a_link(tmp_path, cli, evaluated):
    """A per-example CSV replaced by a link to a private file got a checksum warning, and the site held
    a copy of the private file."""
    ws, outside = _copy_ws(evaluated, tmp_path)
    secret = outside / "secret.txt"
    secret.write_text("PRIVATE-MARKER-1234\n")
    csv = ws.leaderboard_dir / "fashion-mnist" / "Linf" / "e.per-example.csv"
    csv.unlink()
    csv.symlink_to(secret)
    site = tmp_path / "site"
    code, out, err = cli("leaderboard", "--html", site, "-w", ws.root)
    assert code == 0, err
    files = [p for p in site.rglob("*") if p.is_file()]
    assert files and not any("PRIVATE-MARKER" in p.read_text(errors="replace") for p in files)
    assert any(p.name == "e.html" for p in files)


# ---------------------------------------------------------------- issue 22 §3: one command per run or entry name

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["train", "--model", "scratch", "--arch", SMALL_CNN, "--arch-kwargs", '{"width": 8}', "--dataset",
              "fashion-mnist", "--method", "pgd-at", "--pgd-steps", "1", "--epochs", "1", "--batch-size", "16",
              "--train-subset", "64", "--no-progress"]


def _adt_ft(*args):
    """`adt-ft ARGS` in a process of its own (a second user in the same workspace)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO), "ADT_FT_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "adt_finetune", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600)


def _while_running(action):
    """A hook that runs `action` once, from inside a command that is under way; the result is kept."""
    seen: dict = {}

    def hook(*_args, **_kwargs):
        if "result" not in seen:
            seen["result"] = action()
    return hook, seen


def _refused_busy(proc, what: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert what in lines[0] and "another adt-ft command" in lines[0], lines[0]


@pytest.mark.slow  # a second adt-ft process (a few seconds of start-up)
def test_a_run_name_belongs_to_one_train_at_a_time(tmp_path):
    """Two `train --run-name same` at once: both used to exit 0, one run lost. The second one started
    while the first trains is refused in one line, and the first run is whole."""
    from adt_finetune import TrainConfig, train

    ws = tmp_path / "ws"
    hook, seen = _while_running(lambda: _adt_ft(*TINY_TRAIN, "--run-name", "same", "--seed", "7", "-w", ws))
    cfg = TrainConfig(model="scratch", arch=SMALL_CNN, arch_kwargs={"width": 8}, dataset="fashion-mnist",
                      method="pgd-at", pgd_steps=1, epochs=1, batch_size=16, train_subset=64, run_name="same")
    result = train(cfg, workspace=ws, on_step=hook)
    _refused_busy(seen["result"], "run same")
    meta = json.loads((ws / "runs" / "same" / "run.json").read_text())
    assert meta["status"] == "finished" and meta["seed"] == 0 and result.run_id == "same"
    assert [p.name for p in (ws / "runs").iterdir() if p.is_dir()] == ["same"]


@pytest.mark.slow  # a second adt-ft process (a few seconds of start-up)
def test_a_run_is_resumed_by_one_command_at_a_time(tmp_path, unfinished_run):
    """Two `train --resume rr` at once both trained the same folder."""
    from adt_finetune import train

    ws = Workspace(tmp_path / "ws")
    _copy_run(unfinished_run, ws)
    hook, seen = _while_running(lambda: _adt_ft("train", "--resume", "rr", "-w", ws.root, "--no-progress"))
    train(workspace=ws.root, resume="rr", on_step=hook)
    _refused_busy(seen["result"], "run rr")
    meta = json.loads((ws.runs_dir / "rr" / "run.json").read_text())
    assert meta["status"] == "finished" and len(meta["resumed"]) == 1


@pytest.mark.slow  # a second adt-ft process (a few seconds of start-up)
def test_an_entry_name_belongs_to_one_eval_at_a_time(tmp_path, evaluated):
    """Two `eval --entry same` at once with different attacks, no --overwrite: both exited 0 and one
    result was gone. The second is refused in one line; the entry is the first one's."""
    from adt_finetune.evaluation import EvalRequest, evaluate_workspace
    from adt_finetune.progress import Reporter

    ws, _ = _copy_ws(evaluated, tmp_path)
    hook, seen = _while_running(lambda: _adt_ft("eval", "--attacks", "pgd", "-n", "8", "--entry", "same",
                                                "-w", ws.root, "--no-progress"))

    class DuringTheAttack(Reporter):
        advance = hook

    evaluate_workspace(EvalRequest(attacks="fgsm", n_examples=8, entry="same", workspace=ws.root),
                       reporter=DuringTheAttack())
    _refused_busy(seen["result"], "leaderboard entry same")
    entry = json.loads((ws.leaderboard_dir / "fashion-mnist" / "Linf" / "same.json").read_text())
    assert "fgsm" in entry["adt_ft"]["attacks"] and "pgd" not in entry["adt_ft"]["attacks"]


def test_merge_waits_for_no_one_and_overwrites_nothing_in_use(tmp_path, cli, evaluated):
    """`adt-ft merge` claims the entry name as eval does: refused in one line while an eval holds it."""
    from adt_finetune.evaluation.workspace_eval import claim_entry

    ws, _ = _copy_ws(evaluated, tmp_path)
    shards = tmp_path / "shards"
    for k in range(2):
        code, _, err = _eval(cli, ws, "--shard", f"{k}/2", "--shard-dir", shards)
        assert code == 0, err
    lock = claim_entry(ws, "fashion-mnist", "Linf", "new", overwrite=False)  # an eval --entry new under way
    try:
        code, _, err = cli("merge", shards, "-w", ws.root)
        _one_line(code, err)
        assert "another adt-ft command" in err
        assert not (ws.leaderboard_dir / "fashion-mnist" / "Linf" / "new.json").exists()
    finally:
        lock.release()
    code, _, err = cli("merge", shards, "-w", ws.root)
    assert code == 0, err


@pytest.mark.slow  # a second adt-ft process (a few seconds of start-up)
def test_nproc_never_imports_from_the_current_folder(tmp_path):
    """`train --nproc` starts `python -m torch.distributed.run ... -m adt_finetune`, and `python -m`
    puts the current folder (by default the workspace) first on sys.path: a numpy.py there ran."""
    import os
    import subprocess
    import sys

    marker = tmp_path / "outside" / "PWNED"
    marker.parent.mkdir()
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "numpy.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError('not numpy')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "ADT_FT_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # The console script, as users run it: its own folder, not the current one, is on its sys.path.
    script = Path(sys.executable).parent / "adt-ft"
    proc = subprocess.run([str(script), "train", "--nproc", "1", "--resume", "-w", "."], cwd=ws,
                          env=env, capture_output=True, text=True, timeout=600)
    assert not marker.exists(), proc.stderr[-2000:]
    assert "nothing to resume" in proc.stderr, proc.stderr[-2000:]  # the process under torchrun got that far


def test_resume_downloads_nothing_into_a_data_dir_its_run_json_names(hostile, cli, unfinished_run, monkeypatch):
    """run.json's config.data_dir is a path from a file: a place to read data from, never to download to."""
    from adt_finetune import data

    h = hostile
    run = _copy_run(unfinished_run, h["ws"])
    meta = json.loads((run / "run.json").read_text())
    meta["config"]["data_dir"] = str(h["outside"])
    (run / "run.json").write_text(json.dumps(meta))
    monkeypatch.delenv("ADT_FT_OFFLINE", raising=False)
    asked = []

    def no_network(make, name, roots, hint, download):
        asked.append(download)
        raise data._missing(name, roots, hint)

    monkeypatch.setattr(data, "_try_download", no_network)
    code, _, err = cli("train", "--resume", "rr", "-w", h["ws"].root, "--no-progress")
    _one_line(code, err)
    assert asked == [False]
    _nothing_outside(h["outside"])


def test_resume_never_writes_into_a_run_linked_out_of_the_workspace(tmp_path, cli, unfinished_run):
    """runs/rr -> a folder elsewhere: resuming it by id (or as the latest run) would write there; a run
    folder the user names by its path is theirs to resume."""
    import shutil

    ws = Workspace(tmp_path / "ws")
    elsewhere = tmp_path / "outside" / "rr"
    shutil.copytree(unfinished_run, elsewhere)
    before = {p.name: p.stat().st_mtime_ns for p in elsewhere.iterdir()}
    ws.runs_dir.mkdir(parents=True)
    (ws.runs_dir / "rr").symlink_to(elsewhere, target_is_directory=True)
    ws.set_latest_run("rr")
    for args in (["--resume", "rr"], ["--resume"]):
        code, _, err = cli("train", *args, "-w", ws.root, "--no-progress")
        _one_line(code, err)
        assert "outside workspace" in err
        assert {p.name: p.stat().st_mtime_ns for p in elsewhere.iterdir()} == before


def test_partial_results_and_lock_files_are_never_links(tmp_path, cli, evaluated):
    """A link planted where eval keeps an entry's partial results, or where a lock file goes (older
    filelock versions truncate what a lock file links to), is refused; its target is untouched."""
    ws, outside = _copy_ws(evaluated, tmp_path)
    precious = outside / "precious.txt"
    precious.write_text("keep me\n")
    partial = ws.root / ".adt-ft" / "eval" / "fashion-mnist" / "Linf"
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "new").symlink_to(outside, target_is_directory=True)
    code, _, err = _eval(cli, ws, "--resume")
    _one_line(code, err)
    assert "outside workspace" in err
    (partial / "new").unlink()
    (partial / "new.lock").unlink(missing_ok=True)
    (partial / "new.lock").symlink_to(precious)
    code, _, err = _eval(cli, ws)
    _one_line(code, err)
    assert "is a link" in err
    assert precious.read_text() == "keep me\n" and sorted(p.name for p in outside.iterdir()) == ["precious.txt"]


def test_pull_never_downloads_through_a_link(tmp_path, cli, monkeypatch):
    """models/ -> elsewhere: a zoo download would land there; refused before RobustBench is asked."""
    from adt_finetune.zoo import robustbench_compat

    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "models").symlink_to(outside, target_is_directory=True)
    monkeypatch.delenv("ADT_FT_OFFLINE", raising=False)
    asked = []
    monkeypatch.setattr(robustbench_compat, "robustbench_utils", lambda: asked.append(1))
    code, _, err = cli("pull", "Zhang2019Theoretically", "-w", tmp_path / "ws")
    _one_line(code, err)
    assert "outside workspace" in err and not asked
    _nothing_outside(outside)
