"""`adt-ft eval` end to end: every suite through the CLI, and what eval refuses before any
attack runs (a broken model, an entry it would overwrite, a workspace it cannot write),
Ctrl-C, image folders. Small model (SmallCNN width 16 on Fashion-MNIST), few images,
cheap attack settings through --set.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from adt_finetune.attacks import ATTACKS, Attack, AttackResult
from adt_finetune.errors import UserError
from adt_finetune.evaluation import SUITES, default_entry_name, evaluate, evaluation_variant
from adt_finetune.evaluation.engine import clean_pass
from test_evaluation import EPS, N, TableModel, _one_line_error, encode, make_fake, workspace  # noqa: F401

LB = ("leaderboard", "fashion-mnist", "Linf")

# Cheap settings per attack, so that each suite runs in seconds on a CPU.
CHEAP = {
    "pgd20": ["pgd20.steps=2"], "pgd100": ["pgd100.steps=2"], "mim": ["mim.steps=2"], "cw": ["cw.steps=2"],
    "feature": ["feature.targets=2", "feature.steps=2", "feature.pool=20"],
    "autoattack": ["autoattack.attacks=apgd-ce"],
    "spsa": ["spsa.iterations=2", "spsa.samples=8"], "exp": ["exp.steps=2", "exp.samples=2"],
    "exp-am": ["exp-am.steps=2", "exp-am.width=4", "exp-am.batch=8"],
    "imp-am": ["imp-am.steps=2", "imp-am.width=4", "imp-am.batch=8"],
}


def cheap_settings(names) -> list[str]:
    return [a for n in names for s in CHEAP.get(n, []) for a in ("--set", s)]


def add_run(ws, name="r1", method="exp-am", generator=True):
    """A finished run of `method` whose fine-tuned model is a random SmallCNN(width=16),
    with a (tiny, untrained) co-trained generator when `generator`."""
    from adt_finetune.models import SmallCNN
    from adt_finetune.perturb.adt_networks import ExplicitGenerator, write_generator_file
    from adt_finetune.utils import atomic_torch_save
    from adt_finetune.workspace import ModelRef

    torch.manual_seed(1)
    folder = ws.runs_dir / name
    atomic_torch_save(SmallCNN(width=16).state_dict(), folder / "model.pt")
    tuned = ModelRef(name=name, arch="adt_finetune.models.small:SmallCNN", dataset="fashion-mnist",
                     path=str(folder / "model.pt"), source="run", arch_kwargs={"width": 16})
    meta = {"id": name, "status": "finished", "method": method, "loss": "ce", "scope": "full", "epochs": 1,
            "base_model": ws.current_model().to_dict(), "model": tuned.to_dict()}
    if generator:
        write_generator_file(folder / "generator.pt", ExplicitGenerator(in_channels=1, width=4), EPS)
        meta["generator"] = "generator.pt"
    (folder / "run.json").write_text(json.dumps(meta))
    ws.set_latest_run(name)
    return name


def fake_attack(monkeypatch, name, *, interrupt_on_call=None):
    """A registered attack that leaves x unchanged and calls every example robust; it raises
    KeyboardInterrupt on call number `interrupt_on_call` (0-based). Returns the list of batch sizes seen."""
    calls: list[int] = []

    class Fake(Attack):
        def perturb(self, model, x, y):
            if interrupt_on_call is not None and len(calls) == interrupt_on_call:
                raise KeyboardInterrupt
            calls.append(len(x))
            return AttackResult(x.clone(), torch.ones(len(x), dtype=torch.bool))

    Fake.name = name
    monkeypatch.setitem(ATTACKS._items, name, Fake)
    return calls


# ---------------------------------------------------------------- every suite, end to end

# aa-parts runs AutoAttack's four parts one by one (~20 s): in the full run only.
@pytest.mark.parametrize("suite", [pytest.param(s, marks=pytest.mark.slow) if s == "aa-parts" else s
                                   for s in sorted(SUITES)])
def test_every_suite_runs_through_the_cli(cli, workspace, suite):  # noqa: F811
    w = ["-w", workspace.root, "--no-progress"]
    if suite == "full":  # a run with a co-trained generator, so that `full` adds exp-am-cotrained
        add_run(workspace)
        label = "r1"
    else:
        label = "tiny"
    extra = ["--budgets", "0.05"] if suite == "wasserstein" else []
    code, out, err = cli("eval", "--suite", suite, "-n", "6", "-b", "4", *extra, *cheap_settings(SUITES[suite]), *w)
    assert code == 0, err
    assert "Traceback" not in err and "A_rob" in out and "wrote" in out
    # the default name says what differs from the suite's defaults (-n 6, the cheap --set values)
    [path] = [p for p in workspace.root.joinpath(*LB).glob(f"{label}_{suite}*.json")
              if p.name.startswith(f"{label}_{suite}_n6") or p.name == f"{label}_{suite}.json"]
    data = json.loads(path.read_text())
    x = data["adt_ft"]
    assert x["suite"] == suite and x["n_examples"] == 6
    if suite == "wasserstein":
        assert "W-PGD" in out and x["attacks"] == ["wpgd@0.05", "pgd20@0.05"]
        assert x["wasserstein"]["rows"][0]["budget"] == pytest.approx(0.05)
    else:
        assert x["attacks"] == [a for a in SUITES[suite] if a != "clean"] + (["exp-am-cotrained"] if suite == "full"
                                                                            else [])
    if suite == "full":
        # The retrained generators (and the feature attack's target pool) learn from training
        # images: a seeded sample of the TRAIN split, recorded in the entry.
        t = x["attack_training_data"]
        assert t["split"] == "train" and t["n_images"] == 2000 and t["of"] == 60000 and t["seed"] == 0
        assert set(t["attacks"]) >= {"exp-am", "imp-am"}
        assert x["attack_settings"]["exp-am-cotrained"]["path"].endswith("generator.pt")
    elif suite == "paper":  # the feature attack draws its target pool from training images
        assert x["attack_training_data"]["attacks"] == ["feature"]
    else:
        assert "attack_training_data" not in x


# ---------------------------------------------------------------- never report numbers from a broken model

def test_eval_refuses_a_model_with_non_finite_weights(cli, workspace, _trained_cnn_state):  # noqa: F811
    """A diverged run (BatchNorm running_var = inf) must not become an entry of plausible numbers."""
    from adt_finetune.utils import atomic_torch_save
    from adt_finetune.workspace import ModelRef

    state = {k: v.clone() for k, v in _trained_cnn_state.items()}
    key = next(k for k in state if k.endswith("running_var"))
    state[key][0] = float("inf")
    path = workspace.model_path("fashion-mnist", "Linf", "diverged")
    atomic_torch_save(state, path)
    workspace.set_current_model(ModelRef(name="diverged", arch="adt_finetune.models.small:SmallCNN",
                                         dataset="fashion-mnist", path=str(path), source="file",
                                         arch_kwargs={"width": 16}))
    code, out, err = cli("eval", "--suite", "quick", "-n", "20", "--no-progress", "-w", workspace.root)
    _one_line_error(code, err)
    assert "non-finite" in err and key in err
    assert not workspace.leaderboard_dir.exists() and "wrote" not in out


def test_non_finite_clean_logits_are_refused_before_any_attack(monkeypatch):
    class NaNOnSome(TableModel):
        def forward(self, x):
            out = super().forward(x)
            out[torch.tensor([i % 7 == 3 for i in range(len(x))])] = float("nan")
            return out

    y = torch.arange(N) % 10
    calls = make_fake(monkeypatch, "fa", {i: True for i in range(N)})
    with pytest.raises(UserError, match="non-finite logits"):
        evaluate(NaNOnSome(y), encode(N), y, attacks=["fa"], eps=EPS)
    assert calls == []
    # A finite model passes the check, which is recorded with the other sanity checks.
    r = evaluate(TableModel(y), encode(N), y, attacks=["fa"], eps=EPS)
    assert [c.ok for c in r.sanity if c.name == "finite"] == [True]


def test_a_nan_prediction_never_counts_as_correct():
    """argmax over NaN logits is class 0: for a class-0 image that would be 'correct'."""
    class AllNaN(torch.nn.Module):
        def forward(self, x):
            return torch.full((len(x), 10), float("nan"))

    y = torch.zeros(8, dtype=torch.long)
    run = clean_pass(AllNaN(), torch.rand(8, 1, 4, 4), y, 4, torch.device("cpu"))
    assert not run.correct.any() and run.n_bad == 8 and (run.predicted == -1).all()


# ---------------------------------------------------------------- never lose a result

def test_default_entry_names_differ_per_setting():
    names = {default_entry_name("m", "custom", attacks=a, eps=e, n_examples=n, mode=m)
             for a in (["clean", "fgsm"], ["clean", "pgd20"]) for e in (0.1, 8 / 255) for n in (20, 100)
             for m in ("independent", "cascade")}
    assert len(names) == 16
    assert default_entry_name("m", "custom", attacks=["clean", "fgsm", "pgd20"], eps=8 / 255,
                              n_examples=50) == "m_fgsm+pgd20_eps8-255_n50"
    assert default_entry_name("m", "quick") == "m_quick"
    # A suite's name says what differs from the suite's defaults, so that a `-n 200` entry never blocks
    # the default evaluation and two budget sets never share a name; the same settings give the same name.
    def suite_name(suite="paper", **kw):
        kw = {"custom": False, "eps": 0.1, "default_eps": 0.1, "n_examples": None, **kw}
        return default_entry_name("m", suite, variant=evaluation_variant(**kw))

    variants = [suite_name(), suite_name(n_examples=200), suite_name(eps=0.05), suite_name(mode="cascade"),
                suite_name(seed=1), suite_name(settings={"feature": {"targets": "20"}}),
                suite_name(settings={"feature": {"targets": "10"}}), suite_name(amp=True), suite_name(chunk_size=64),
                suite_name(data="/imgs/a"), suite_name(data="/imgs/b"),
                suite_name("wasserstein"), suite_name("wasserstein", budgets="0.05,0.1"),
                suite_name("wasserstein", budgets="0.2")]
    assert len(set(variants)) == len(variants)
    assert suite_name() == "m_paper" == suite_name(n_examples=1000) and suite_name(n_examples=200) == "m_paper_n200"
    assert suite_name("wasserstein", budgets="0.1, 0.05") == "m_wasserstein_budgets0.05+0.1"
    assert suite_name(settings={"a": {"x": "1", "y": "2"}}) == suite_name(settings={"a": {"y": "2", "x": "1"}})
    many = ["clean", "fgsm", "pgd20", "pgd100", "mim", "cw", "feature", "spsa", "exp"]
    assert len(default_entry_name("m", "custom", attacks=many, eps=0.1, n_examples=5)) < 40


def test_two_evals_keep_both_entries_and_nothing_is_overwritten_silently(cli, workspace):  # noqa: F811
    w = ["-n", "20", "--no-progress", "-w", workspace.root]
    folder = workspace.root.joinpath(*LB)
    assert cli("eval", "--attacks", "fgsm", *w)[0] == 0
    assert cli("eval", "--attacks", "pgd20", "--set", "pgd20.steps=2", *w)[0] == 0
    fgsm, (pgd,) = folder / "tiny_fgsm_eps0.1_n20.json", folder.glob("tiny_pgd20_eps0.1_n20_set-*.json")
    assert json.loads(fgsm.read_text())["adt_ft"]["attacks"] == ["fgsm"]
    assert json.loads(pgd.read_text())["adt_ft"]["attacks"] == ["pgd20"]

    before = fgsm.read_bytes()
    code, out, err = cli("eval", "--attacks", "fgsm", *w)  # the same evaluation again
    _one_line_error(code, err)
    assert "already exists" in err and "--overwrite" in err and "--entry" in err
    code, _, err = cli("eval", "--attacks", "pgd20", "--entry", "tiny_fgsm_eps0.1_n20", *w)
    _one_line_error(code, err)
    assert fgsm.read_bytes() == before

    code, _, err = cli("eval", "--attacks", "pgd20", "--set", "pgd20.steps=2", "--entry", "tiny_fgsm_eps0.1_n20",
                       "--overwrite", *w)
    assert code == 0, err
    assert json.loads(fgsm.read_text())["adt_ft"]["attacks"] == ["pgd20"]

    # Suites: another -n is another evaluation with its own default name; the same one again is recognised.
    q = ["--suite", "quick", "--set", "pgd20.steps=2", "--no-progress", "-w", workspace.root]
    assert cli("eval", *q, "-n", "20")[0] == 0
    assert cli("eval", *q, "-n", "30")[0] == 0
    assert len(list(folder.glob("tiny_quick_n20_set-*.json"))) == len(list(folder.glob("tiny_quick_n30_set-*.json"))) == 1
    code, _, err = cli("eval", *q, "-n", "20")
    _one_line_error(code, err)
    assert "already exists" in err


def test_a_leaderboard_that_is_a_file_is_found_before_any_attack(cli, workspace, monkeypatch):  # noqa: F811
    calls = fake_attack(monkeypatch, "probe")
    workspace.leaderboard_dir.write_text("not a folder")
    code, _, err = cli("eval", "--attacks", "probe", "-n", "8", "--no-progress", "-w", workspace.root)
    _one_line_error(code, err)
    assert "leaderboard" in err and "is a file" in err
    assert calls == []


def test_an_unwritable_workspace_is_found_before_any_attack(cli, workspace, monkeypatch):  # noqa: F811
    """A leaderboard folder the user cannot write to is reported before any attack runs. Root writes
    through a read-only mode, so there (CI runs as root) the OS's refusal is simulated at the one place
    the check asks the OS: creating a file in the folder."""
    import tempfile

    import adt_finetune.evaluation.entry_claims as run_module

    calls = fake_attack(monkeypatch, "probe")
    workspace.leaderboard_dir.mkdir()
    workspace.leaderboard_dir.chmod(0o500)
    if os.name != "posix" or os.geteuid() == 0:
        real_mkstemp = tempfile.mkstemp

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and workspace.leaderboard_dir in [Path(dir), *Path(dir).parents]:
                raise PermissionError(13, "Permission denied", str(dir))
            return real_mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(run_module.tempfile, "mkstemp", refuse)
    try:
        code, _, err = cli("eval", "--attacks", "probe", "-n", "8", "--no-progress", "-w", workspace.root)
    finally:
        workspace.leaderboard_dir.chmod(0o700)
    _one_line_error(code, err)
    assert "cannot write" in err and "Permission denied" in err and calls == []


# ---------------------------------------------------------------- Ctrl-C, --help

def test_ctrl_c_prints_a_resume_hint_and_resume_continues(cli, workspace, monkeypatch):  # noqa: F811
    w = ["--attacks", "probe", "-n", "24", "-b", "8", "--no-progress", "-w", workspace.root]
    fake_attack(monkeypatch, "probe", interrupt_on_call=1)
    code, out, err = cli("eval", *w)
    assert code != 0 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and "--resume" in err
    assert not list(workspace.leaderboard_dir.rglob("*.json"))  # no entry from a half-done evaluation

    calls = fake_attack(monkeypatch, "probe")
    code, out, err = cli("eval", *w, "--resume")
    assert code == 0, err
    first_batch = 8
    clean = json.loads(next(workspace.leaderboard_dir.rglob("*.json")).read_text())["adt_ft"]["clean_acc"]
    n_clean = round(clean * 24 / 100)
    assert sum(calls) == n_clean - first_batch  # the saved batch was not attacked again


def test_help_describes_batch_size_and_seed_with_their_defaults():
    import typer

    from adt_finetune.cli import app

    command = typer.main.get_command(app).commands["eval"]
    params = {p.name: p for p in command.params}
    for name, default in (("batch_size", 256), ("seed", 0)):
        p = params[name]
        assert p.help and p.default == default and p.show_default is not False, name


# ---------------------------------------------------------------- image folders

def _fmnist_folder(root, fmnist_test, classes, n_per_class=3):
    from PIL import Image

    from adt_finetune.data import FASHION_MNIST_CLASSES

    x, y = fmnist_test
    for c in classes:
        label = FASHION_MNIST_CLASSES.index(c)
        folder = root / c.replace("/", "-")
        folder.mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(y.numpy() == label)[:n_per_class]):
            Image.fromarray((x[i, 0].numpy() * 255).round().astype(np.uint8), mode="L").save(folder / f"{k}.png")
    return root


def test_image_folder_with_an_empty_class_folder(cli, workspace, tmp_path, fmnist_test):  # noqa: F811
    folder = _fmnist_folder(tmp_path / "imgs", fmnist_test, ["Trouser", "Bag"])
    (folder / "Coat").mkdir()  # a class the evaluated subset happens not to contain
    code, out, err = cli("eval", "--suite", "quick", "--set", "pgd20.steps=2", "--dataset", folder, "--no-progress",
                         "-w", workspace.root)
    assert code == 0, err
    (csv,) = workspace.root.joinpath(*LB).glob("tiny_quick_set-*_data-*.per-example.csv")
    csv = csv.read_text().splitlines()
    labels = sorted({int(line.split(",")[1]) for line in csv[1:]})
    assert labels == [1, 8] and len(csv) == 1 + 6  # Trouser, Bag: labels from the class names


def test_image_folder_with_a_file_that_is_not_an_image(cli, workspace, tmp_path, fmnist_test):  # noqa: F811
    folder = _fmnist_folder(tmp_path / "imgs", fmnist_test, ["Trouser", "Bag"])
    (folder / "Bag" / "notes.png").write_text("not an image")
    code, _, err = cli("eval", "--suite", "quick", "--dataset", folder, "--no-progress", "-w", workspace.root)
    _one_line_error(code, err)
    assert "notes.png" in err and "not an image" in err
    assert not workspace.leaderboard_dir.exists()


def test_training_images_for_attacks_are_a_seeded_sample_of_the_train_split():
    from adt_finetune.evaluation import load_attack_training_data
    from adt_finetune.evaluation.targets import training_sample_indices

    a = training_sample_indices(60000, 2000, seed=0)
    assert a == training_sample_indices(60000, 2000, seed=0) != training_sample_indices(60000, 2000, seed=1)
    assert len(set(a)) == 2000 and a == sorted(a) and max(a) >= 10000  # not just the first images
    x, y, record = load_attack_training_data("fashion-mnist", seed=0, n=50)
    assert x.shape == (50, 1, 28, 28) and record["split"] == "train" and record["n_images"] == 50
    idx = training_sample_indices(60000, 50, seed=0)
    assert record["indices_sha256"] == hashlib.sha256(",".join(map(str, idx)).encode()).hexdigest()


def test_nproc_checks_the_device_before_starting_torchrun(cli, workspace, monkeypatch):  # noqa: F811
    """The README's GPU example on a machine without CUDA: one line, exit 2, and no torchrun started."""
    import subprocess

    import torch

    started = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, **kw: started.append(cmd) or 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = cli("eval", "--nproc", "4", "--suite", "aa", "-n", "10", "--device", "cuda", "-w", workspace.root)
    _one_line_error(code, err)
    assert "no CUDA device" in err and started == []
    # On a usable device the same command runs under torchrun, with the options as given
    # (--run spelled --from-run, which torchrun leaves alone).
    code, _, err = cli("eval", "--nproc", "2", "--run", "r1", "--attacks", "fgsm", "--no-progress", "--set", "a.b=1",
                       "--set", "c.d=2", "-w", workspace.root)
    assert code == 0, err
    (cmd,) = started
    assert cmd[cmd.index("--standalone"):cmd.index("eval") + 1] == \
        ["--standalone", "--nproc-per-node=2", "-m", "adt_finetune", "eval"]
    rest = cmd[cmd.index("eval") + 1:]
    assert rest[:2] == ["--from-run", "r1"] and "--nproc" not in rest and "--no-progress" in rest
    assert rest[rest.index("--set") + 1] == "a.b=1" and rest.count("--set") == 2
