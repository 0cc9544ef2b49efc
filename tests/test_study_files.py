"""The shipped study files (recipes/studies/*.yaml) against what the trainer and evaluator accept, the
robust-base study end to end at its smoke size, and the masking check's pieces.

The real studies run for hours; these checks catch a study file that would only fail after the
first jobs had already been paid for."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch

from adt_finetune.attacks import make_attack
from adt_finetune.config import list_recipes
from adt_finetune.evaluation import SUITES, check_attack_names, parse_attack_list
from adt_finetune.methods import METHODS, MethodContext, make_method
from adt_finetune.models import SmallResNet
from adt_finetune.nets import find_feature_map, find_last_linear
from adt_finetune.study import JobRunner, load_study, plan
from adt_finetune.study.base_rounds import round_config
from adt_finetune.study.masking import black_box_only, masking_screen
from adt_finetune.training import build_config, resolve_loss, validate_config
from adt_finetune.workspace import Workspace
from adt_finetune.zoo import build_architecture

REPO = Path(__file__).resolve().parent.parent
STUDIES = REPO / "recipes" / "studies"


ROBUST_ARMS = {"robust-base.yaml": ({"pgd-at/ce", "trades/trades", "exp/ce", "exp-am/ce", "exp-am/trades", "imp-am/ce"},
                                    "robust-pgd-at-ce-full-s0"),
               "robust-base-wdat.yaml": ({"pgd-at/ce", "trades/trades", "wdat/trades"}, "rbw-pgd-at-ce-full-s0")}


@pytest.mark.parametrize("name", sorted(ROBUST_ARMS))
@pytest.mark.parametrize("smoke", [False, True])
def test_robust_base_file(smoke, name):
    s = load_study(STUDIES / name, smoke=smoke)
    check_attack_names(parse_attack_list(s.pointwise["attacks"]))
    assert {"autoattack", "pgd20", "cw"} <= set(parse_attack_list(s.pointwise["attacks"]))
    budgets = str(s.wasserstein["budgets"]).split(",")
    assert len(budgets) == 2 and all(0 < float(b) <= 1 for b in budgets)
    assert s.control.label == "pgd-at/ce" and s.base_kind == "train"
    masking = parse_attack_list(s.masking["attacks"])  # the gradient-free part beside white-box ones
    assert "square" in masking and {"pgd20", "apgd-ce"} <= set(masking) and float(s.masking["screen_pp"]) > 0
    assert len(s.seeds["full"]) >= 2 and len(s.seeds["last-layer"]) >= 1
    if smoke:
        assert s.pointwise["n_examples"] <= 32 and s.finetune["train_subset"] <= 512
    else:
        assert s.pointwise["n_examples"] >= 1000 and s.pointwise["attack_settings"]["autoattack"] == {
            "version": "standard"}
        assert s.base["train"]["train_subset"] is None  # the base trains on the full training set
        assert int(s.base["train"]["heldout"]) + s.pointwise["n_examples"] <= 10_000  # held out: never evaluated
        arms, first_run = ROBUST_ARMS[name]
        assert {a.label for a in s.arms} == arms
        assert len(s.runs()) == len(arms) * 3 and s.runs()[0][0] == first_run  # the committed names


def test_the_wdat_rerun_differs_from_the_robust_base_study_only_in_its_arms():
    """Its controls are re-run on a base trained again, so everything else must be the first study's."""
    import yaml

    first, rerun = (yaml.safe_load((STUDIES / n).read_text()) for n in ("robust-base.yaml", "robust-base-wdat.yaml"))
    own = {"study", "title", "description", "arms", "report"}
    assert {k: v for k, v in first.items() if k not in own | {"base", "smoke"}} == \
        {k: v for k, v in rerun.items() if k not in own | {"base", "smoke"}}
    assert first["base"]["train"] == rerun["base"]["train"] and set(first) == set(rerun)
    assert "wdat/trades" in rerun["arms"] and "wdat/trades" not in first["arms"]


@pytest.mark.parametrize("smoke", [False, True])
def test_fmnist_paper_file(smoke):
    s = load_study(STUDIES / "fmnist-paper.yaml", smoke=smoke)
    assert s.pointwise["suite"] == "paper" and s.pointwise["mode"] == "independent" and s.base_kind == "pretrain"
    check_attack_names(SUITES[s.pointwise["suite"]])
    assert s.pointwise["attack_settings"]["feature"]["targets"] < 200  # reduced, and the report says so
    if not smoke:
        assert len(s.runs()) == 12 and s.runs()[0][0] == "study-pgd-at-ce-last-layer"  # the committed names


@pytest.mark.parametrize("name", ["robust-base.yaml", "robust-base-wdat.yaml", "fmnist-paper.yaml"])
def test_every_run_is_accepted_by_the_trainer(name, tmp_path):
    s = load_study(STUDIES / name)
    runner = JobRunner(s, Workspace(tmp_path))
    arch, kwargs = runner.base_arch()
    _, head = find_last_linear(build_architecture(arch, s.dataset, "Linf", kwargs), torch.zeros(1, 1, 28, 28))
    for job in [j for j in plan(s) if j.kind == "train"]:
        cfg = runner.train_config(job)
        validate_config(cfg)
        arm = job.detail["arm"]
        assert resolve_loss(cfg) == arm.loss and cfg.seed == job.detail["seed"] and cfg.run_name == job.model
        flags = {k: v for k, v in cfg.to_dict().items() if k in ("method", "loss", "scope", "epochs", "lr",
                                                                  "train_subset", "gen_width", "batch_size")}
        assert build_config(None, flags).loss == arm.loss
        assert arm.method in METHODS and arm.loss in METHODS[arm.method].accepts_loss
        ctx = MethodContext(eps=0.1, in_channels=1, num_classes=10, image_size=28, device=torch.device("cpu"),
                            head=head)
        cfg.eps = "0.1"
        assert make_method(cfg, ctx).name == arm.method
    if s.base_kind == "train":
        first = round_config(runner, 1, None)
        validate_config(first)
        assert first.model == "scratch" and first.method == "pgd-at" and first.schedule == "constant"


def test_study_files_are_not_listed_as_training_recipes():
    names = {name for name, _, _ in list_recipes()}
    assert not names & {"robust-base", "fmnist-paper"}


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
def test_robust_base_smoke_run_produces_entries_and_the_report(cli, tmp_path, one_thread):
    ws, out = tmp_path / "ws", tmp_path / "out"
    args = ["study", "run", str(STUDIES / "robust-base.yaml"), "--smoke", "--no-progress", "-w", str(ws), "--out",
            str(out), "--poll", "0.2"]
    code, stdout, err = cli(*args)
    assert code == 0, err
    s = load_study(STUDIES / "robust-base.yaml", smoke=True)
    names = s.models()
    for name in names:
        for kind in ("aa", "w"):
            assert (out / f"{name}_{kind}.json").exists() and (out / f"{name}_{kind}.per-example.csv").exists()
    aa = json.loads((out / f"{names[1]}_aa.json").read_text())
    assert aa["adt_ft"]["n_examples"] == s.pointwise["n_examples"] and aa["adt_ft"]["time_per_epoch_s"]
    readme = (out / "README.md").read_text()
    assert "McNemar" in readme and "Holm-adjusted p" in readme and "scope last-layer" in readme
    base_aa = json.loads((out / f"{s.base_name}_aa.json").read_text())
    base_pgd = json.loads((out / f"{s.base_name}_w.json").read_text())["adt_ft"]["per_attack"]["pgd20@0.1"]
    assert (f"clean {float(base_aa['clean_acc']):.1f}%, PGD-20 {base_pgd:.1f}%, AutoAttack "
            f"{float(base_aa['autoattack_acc']):.1f}%") in readme  # the baseline row
    for scope in ("full", "last-layer"):
        bench = json.loads((out / f"bench-{scope}.json").read_text())
        assert bench["config_overrides"]["scope"] == scope and bench["batch_size"] == s.finetune["batch_size"]
        ratios = {(r["name"], r["loss"]): r["ratio"] for r in bench["rows"]}
        assert ratios[("pgd-at", "ce")] == 1.0 and ratios[("exp-am", "ce")] > 0
        summary = readme.split(f"## Summary, scope {scope}")[1].split("##")[0]
        rows = summary.strip().splitlines()
        first = next(i for i, line in enumerate(rows) if line.startswith("| exp-am/ce | clean |"))
        assert rows[first].endswith(f"| {ratios[('exp-am', 'ce')]:.2f} |")  # the measured step-time ratio
        assert rows[first + 1].startswith("|  | A_rob |") and "W: wpgd@" in summary
    # the masking check: the control's first run is always checked, part by part
    ref = "robust-pgd-at-ce-full-s0_parts"
    parts = json.loads((out / f"{ref}.json").read_text())["adt_ft"]
    assert parts["mode"] == "independent" and parts["n_examples"] == s.masking["n_examples"]
    assert parts["attacks"] == parse_attack_list(s.masking["attacks"])[1:]
    masking = readme.split("## Gradient-masking check")[1].split("\n## ")[0]
    row = next(line for line in masking.splitlines() if line.startswith(f"| {ref[:-6]} | {parts['clean_acc']:.1f} |"))
    cells = row.split(" | ")
    assert [f"{parts['per_attack'][a]:.1f}" for a in parts["attacks"]] == cells[2:2 + len(parts["attacks"])]
    assert (out / "study.png").stat().st_size > 0 and "<table>" in (out / "index.html").read_text()
    meta = json.loads((out / "study.json").read_text())
    assert meta["base"]["stopped"] and meta["base"]["best"] in {r["run"] for r in meta["base"]["rounds"]}
    # Resumable: a second invocation trains and evaluates nothing again (no job starts).
    events = ws / ".adt-ft" / "study" / s.name / "events.jsonl"
    before = events.read_text()
    code, _, err = cli(*args)
    assert code == 0, err
    assert events.read_text() == before
    code, stdout, _ = cli("study", "status", str(STUDIES / "robust-base.yaml"), "--smoke", "-w", str(ws))
    assert code == 0 and f"{len(plan(s))} of {len(plan(s))} jobs done" in stdout


def test_masking_screen_flags_a_pgd20_to_a_rob_gap_above_the_threshold():
    def model(name, pgd20, a_rob):
        aa = NS(eps=0.1, a_rob=a_rob)
        w = NS(extra={"per_attack": {"pgd20@0.05": 90.0, "pgd20@0.1": pgd20, "wpgd@0.1": 10.0}})
        return name, aa, w

    rows = masking_screen([model("ctrl", 75.5, 73.0), model("masked", 73.1, 58.2), model("edge", 78.0, 73.0),
                           model("fine", 76.0, 74.0)], 5.0, reference="ctrl")
    by = {r["name"]: r for r in rows}
    assert by["masked"]["gap"] == pytest.approx(14.9) and by["masked"]["flagged"] and by["masked"]["check"]
    assert by["ctrl"]["gap"] == pytest.approx(2.5) and not by["ctrl"]["flagged"] and by["ctrl"]["check"]
    assert not by["edge"]["flagged"]  # exactly 5 pp: not above the threshold
    assert not by["fine"]["check"] and by["fine"]["pgd20"] == 76.0  # PGD-20 at ε, not at ε/2
    every = masking_screen([model("fine", 76.0, 74.0)], 5.0, reference="ctrl", check_all=True)
    assert every[0]["check"] and not every[0]["flagged"]


def test_black_box_only_counts_what_square_alone_broke(tmp_path):
    csv = tmp_path / "x.per-example.csv"
    csv.write_text("index,label,clean,pgd20,apgd-ce,square,robust,first_broken_by\n"
                   "0,1,1,1,1,0,0,square\n"      # Square alone: counted
                   "1,1,1,0,1,0,0,pgd20\n"       # a white-box attack broke it too: not counted
                   "2,1,1,1,1,1,1,\n"            # robust to all
                   "3,1,0,0,0,0,0,clean\n"       # wrong on the clean image: every flag 0, not counted
                   "4,1,1,1,1,0,0,square\n")
    assert black_box_only(csv, ["pgd20", "apgd-ce", "square"]) == (2, 5)
