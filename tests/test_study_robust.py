"""The robust-base study (scripts/study_robust.py, recipes/studies/study-robust-fmnist.yaml).

The study runs for hours; these checks catch a recipe the script would only trip
over after the base had already been paid for, and run the whole pipeline at a
tiny size once.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from adt_finetune.attacks import make_attack
from adt_finetune.config import list_recipes
from adt_finetune.evaluation import check_attack_names, parse_attack_list
from adt_finetune.methods import METHODS, MethodContext, make_method
from adt_finetune.models import SmallResNet
from adt_finetune.nets import find_feature_map, find_last_linear
from adt_finetune.training import build_config, resolve_loss, validate_config
from adt_finetune.zoo import build_architecture

REPO = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("study_robust", REPO / "scripts" / "study_robust.py")
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
    check_attack_names(parse_attack_list(s.attacks))
    assert {"autoattack", "pgd20", "cw"} <= set(parse_attack_list(s.attacks))
    assert len(s.w_budgets.split(",")) == 2 and all(0 < float(b) <= 1 for b in s.w_budgets.split(","))
    assert s.control == ("pgd-at", "ce")
    # the masking check needs the gradient-free part beside white-box ones
    masking = parse_attack_list(s.masking["attacks"])
    assert "square" in masking and {"pgd20", "apgd-ce"} <= set(masking) and float(s.masking["screen_pp"]) > 0
    assert len(s.seeds["full"]) >= 2 and len(s.seeds["last-layer"]) >= 1
    assert len({j.run_name for j in s.jobs}) == len(s.jobs)
    if smoke:
        assert s.n_examples <= 32 and s.train_subset <= 512
    else:
        assert s.n_examples >= 1000 and s.attack_settings["autoattack"] == {"version": "standard"}
        assert s.base["train_subset"] is None  # the base trains on the full training set
        assert int(s.base["heldout"]) + s.n_examples <= 10_000  # held-out images never evaluated
        assert set(s.methods) == {("pgd-at", "ce"), ("trades", "trades"), ("exp", "ce"), ("exp-am", "ce"),
                                  ("exp-am", "trades"), ("imp-am", "ce"), ("wdat", "trades")}
        assert len(s.jobs) == 7 * 3


@pytest.mark.parametrize("smoke", [False, True])
def test_every_run_is_accepted_by_the_trainer(study, smoke):
    s = study.load_settings(study.RECIPE, smoke=smoke)
    model = build_architecture(s.base["arch"], s.dataset, "Linf", dict(s.base["arch_kwargs"]))
    _, head = find_last_linear(model, torch.zeros(1, 1, 28, 28))
    base = s.base_config(1, None)
    validate_config(base)
    assert base.model == "scratch" and base.method == "pgd-at" and base.schedule == "constant"
    assert s.base_config(2, "runs/base-r01/model.pt").model == "runs/base-r01/model.pt"
    for job in s.jobs:
        cfg = s.train_config(job)
        validate_config(cfg)
        assert resolve_loss(cfg) == job.loss and cfg.seed == job.seed
        flags = {k: v for k, v in cfg.to_dict().items() if k in ("method", "loss", "scope", "epochs", "lr",
                                                                  "train_subset", "gen_width", "batch_size")}
        assert build_config(None, flags).loss == job.loss
        assert job.method in METHODS and job.loss in METHODS[job.method].accepts_loss
        ctx = MethodContext(eps=0.1, in_channels=1, num_classes=10, image_size=28, device=torch.device("cpu"),
                            head=head)
        assert make_method(replace(cfg, eps="0.1"), ctx).name == job.method


def test_study_recipe_is_not_listed_as_a_training_recipe():
    assert "study-robust-fmnist" not in {name for name, _, _ in list_recipes()}


@pytest.mark.parametrize("kwargs", [{}, {"width": 8, "stages": 3, "stem_stride": 2}, {"width": 4, "stages": 2}])
def test_small_resnet_has_a_pre_pool_map_the_feature_attack_taps(kwargs):
    torch.manual_seed(0)
    model = SmallResNet(**kwargs).eval()
    x = torch.rand(4, 1, 28, 28)
    assert model(x).shape == (4, 10)
    name, head = find_last_linear(model, x)
    assert head is model.fc
    found = find_feature_map(model, x, head)
    assert found is not None and found[0].startswith("stages.")  # the last stage's map, not the pooled vector
    attack = make_attack("feature", 0.1, targets=2, pool=8)
    attack.prepare(model, x, torch.arange(4))
    assert attack.tap.startswith("pre-pool")


def test_small_resnet_is_buildable_from_the_recipe_arch_string():
    m = build_architecture("adt_finetune.models.small:SmallResNet", "fashion-mnist", "Linf", {"width": 4})
    assert isinstance(m, SmallResNet) and m.fc.out_features == 10
    with pytest.raises(ValueError):
        SmallResNet(stem_stride=3)


@pytest.fixture
def one_thread():
    # The smoke run's tensors are tiny: a second thread only adds overhead (measured: 61 s vs 21 s).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_smoke_run_produces_entries_and_the_table(study, tmp_path, one_thread):
    ws, out = tmp_path / "ws", tmp_path / "out"
    assert study.main(["--smoke", "--no-progress", "--workspace", str(ws), "--out", str(out)]) == 0
    s = study.load_settings(study.RECIPE, smoke=True)
    names = [study.BASE_NAME] + [j.run_name for j in s.jobs]
    for name in names:
        for kind in ("aa", "w"):
            assert (out / f"{name}_{kind}.json").exists() and (out / f"{name}_{kind}.per-example.csv").exists()
    aa = json.loads((out / f"{names[1]}_aa.json").read_text())
    assert aa["adt_ft"]["n_examples"] == s.n_examples and aa["adt_ft"]["time_per_epoch_s"]
    readme = (out / "README.md").read_text()
    assert "McNemar" in readme and "scope full" in readme and "scope last-layer" in readme
    base_aa = json.loads((out / f"{study.BASE_NAME}_aa.json").read_text())
    base_pgd = json.loads((out / f"{study.BASE_NAME}_w.json").read_text())["adt_ft"]["per_attack"]["pgd20@0.1"]
    assert (f"clean {float(base_aa['clean_acc']):.1f}%, PGD-20 {base_pgd:.1f}%, AutoAttack "
            f"{float(base_aa['autoattack_acc']):.1f}%") in readme  # the baseline row
    for scope in ("full", "last-layer"):
        bench = json.loads((out / f"bench-{scope}.json").read_text())
        assert bench["config_overrides"]["scope"] == scope and bench["batch_size"] == s.batch_size
        ratios = {(r["name"], r["loss"]): r["ratio"] for r in bench["rows"]}
        assert ratios[("pgd-at", "ce")] == 1.0 and ratios[("exp-am", "ce")] > 0
        # the summary row of exp-am: its A_rob against the control, and the measured step-time ratio
        summary = readme.split(f"## Summary, scope {scope}")[1].split("##")[0]
        rows = summary.strip().splitlines()
        first = next(i for i, line in enumerate(rows) if line.startswith("| exp-am/ce | clean |"))
        assert rows[first].endswith(f"| {ratios[('exp-am', 'ce')]:.2f} |")
        assert rows[first + 1].startswith("|  | A_rob |") and "W: wpgd@" in summary
    # the gradient-masking check: the control's first run is always checked, part by part
    ref = f"{study.Study(s, ws, out, '', None, False).reference_run()}_parts"
    parts = json.loads((out / f"{ref}.json").read_text())["adt_ft"]
    assert parts["mode"] == "independent" and parts["n_examples"] == s.masking["n_examples"]
    assert parts["attacks"] == parse_attack_list(s.masking["attacks"])[1:]
    assert any(c["name"] == "black-box vs white-box" for c in parts["sanity"])
    masking = readme.split("## Gradient-masking check")[1].split("\n## ")[0]
    row = next(line for line in masking.splitlines() if line.startswith(f"| {ref[:-6]} | {parts['clean_acc']:.1f} |"))
    cells = row.split(" | ")
    assert [f"{parts['per_attack'][a]:.1f}" for a in parts["attacks"]] == cells[2:2 + len(parts["attacks"])]
    engine = next(c["detail"] for c in parts["sanity"] if c["name"] == "black-box vs white-box")
    only = int(cells[2 + len(parts["attacks"])].split()[0])
    assert engine.startswith(f"{only} example(s)") or f"broke {only} example(s)" in engine  # the engine's count
    assert (out / "study.png").stat().st_size > 0
    hist = json.loads((ws / ".adt-ft" / "study-base.json").read_text())
    assert hist["stopped"] and hist["best"] in {r["run"] for r in hist["rounds"]}
    times = json.loads((ws / ".adt-ft" / "study-times.json").read_text())
    # Resumable by stage: a second invocation trains and evaluates nothing again.
    assert study.main(["--smoke", "--no-progress", "--workspace", str(ws), "--out", str(out)]) == 0
    again = json.loads((ws / ".adt-ft" / "study-times.json").read_text())
    assert {k: v for k, v in again.items() if k != "publish"} == {k: v for k, v in times.items() if k != "publish"}


def test_masking_screen_flags_a_pgd20_to_a_rob_gap_above_the_threshold(study):
    from types import SimpleNamespace as NS

    def model(name, pgd20, a_rob):
        aa = NS(eps=0.1, a_rob=a_rob)
        w = NS(extra={"per_attack": {"pgd20@0.05": 90.0, "pgd20@0.1": pgd20, "wpgd@0.1": 10.0}})
        return name, aa, w

    rows = study.masking_screen([model("ctrl", 75.5, 73.0), model("masked", 73.1, 58.2), model("edge", 78.0, 73.0),
                                 model("fine", 76.0, 74.0)], 5.0, reference="ctrl")
    by = {r["name"]: r for r in rows}
    assert by["masked"]["gap"] == pytest.approx(14.9) and by["masked"]["flagged"] and by["masked"]["check"]
    assert by["ctrl"]["gap"] == pytest.approx(2.5) and not by["ctrl"]["flagged"] and by["ctrl"]["check"]
    assert not by["edge"]["flagged"]  # exactly 5 pp: not above the threshold
    assert not by["fine"]["check"] and by["fine"]["pgd20"] == 76.0  # PGD-20 at ε, not at ε/2
    every = study.masking_screen([model("fine", 76.0, 74.0)], 5.0, reference="ctrl", check_all=True)
    assert every[0]["check"] and not every[0]["flagged"]


def test_black_box_only_counts_what_square_alone_broke(study, tmp_path):
    csv = tmp_path / "x.per-example.csv"
    csv.write_text("index,label,clean,pgd20,apgd-ce,square,robust,first_broken_by\n"
                   "0,1,1,1,1,0,0,square\n"      # Square alone: counted
                   "1,1,1,0,1,0,0,pgd20\n"       # a white-box attack broke it too: not counted
                   "2,1,1,1,1,1,1,\n"            # robust to all
                   "3,1,0,0,0,0,0,clean\n"       # wrong on the clean image: every flag 0, not counted
                   "4,1,1,1,1,0,0,square\n")
    assert study.black_box_only(csv, ["pgd20", "apgd-ce", "square"]) == (2, 5)


def test_entry_locks_keep_an_eval_worker_and_the_study_apart(study, tmp_path):
    import os
    import subprocess

    s = study.load_settings(study.RECIPE, smoke=True)
    st = study.Study(s, tmp_path / "ws", tmp_path / "out", "cmd", None, progress=False)
    assert st._claim("e")
    assert not st._claim("e")  # held by a live process (this one)
    st._release("e")
    assert st._claim("e")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = st.state / "locks" / "e.lock"
    lock.write_text(str(gone.pid))
    assert st._claim("e") and lock.read_text() == str(os.getpid())  # a lock whose process is gone is stale
    # A run another process is still setting up is not finished, and is left alone.
    (st.ws.runs_dir / "robust-x").mkdir(parents=True)
    assert not st._finished("robust-x") and (st.ws.runs_dir / "robust-x").is_dir()
    assert not st._finished(None)  # the base is not registered yet


def test_only_and_reuse_rerun_one_method_and_take_the_rest_from_committed_entries(study, tmp_path):
    s = study.load_settings(study.RECIPE)
    st = study.Study(s, tmp_path / "ws", tmp_path / "out", "cmd", None, progress=False)
    st.only, st.reuse = {("wdat", "trades")}, REPO / "leaderboard" / "robust-base"
    rerun = [j.run_name for j in s.jobs if st.selected(j)]
    assert rerun == ["robust-wdat-trades-full-s0", "robust-wdat-trades-full-s1", "robust-wdat-trades-last-layer-s0"]
    copied = st.reuse_entries()
    assert copied and not any(c.startswith(("robust-wdat", study.BASE_NAME)) for c in copied)
    assert {f"robust-pgd-at-ce-full-s0_{k}" for k in ("aa", "w", "parts")} <= set(copied)
    assert all(st.entry_path(c).exists() and st.entry_path(c).with_suffix(".per-example.csv").exists()
               for c in copied)
    assert st.reuse_entries() == []  # already there: nothing copied twice
    # The wdat section reads each run's per-epoch budget diagnostics from its run.json.
    run = st.ws.runs_dir / "robust-wdat-trades-full-s0"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"diagnostics": [
        {"upsilon": 8.2, "budget_median": 0.07, "budget_p95": 0.2, "budget_max": 0.2, "share_beyond_eps": 0.31,
         "share_capped": 0.12}]}))
    text = study.wdat_text(st)
    assert "| robust-wdat-trades-full-s0 | 1 | 8.2 | 0.0700 | 0.2000 | 0.2000 | 31.0% | 12.0% |" in text
    assert "Ours (guesses" in text and "arXiv:2502.09352" in text
