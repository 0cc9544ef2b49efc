"""The robustness-evaluation audit (docs/evaluation.md, "Audit") on models known to be masked and
known to be healthy, built here from real Fashion-MNIST: a small PGD-trained CNN (healthy), the same
behind input rounding (zero gradient almost everywhere), with its logits ×1000 (saturated softmax),
behind a Gaussian-noise input layer (randomised); and the robust-base study's committed entries.

AutoAttack's parts run with fewer queries and iterations here (`cheap_autoattack`) so that the file
takes about a minute on a CPU; the audit's own logic and thresholds are unchanged.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adt_finetune.evaluation import audit_checks as ac
from adt_finetune.evaluation.audit import ALL_CHECKS, audit_entry, audit_model
from adt_finetune.leaderboard import find_entry
from adt_finetune.models import SmallCNN
from adt_finetune.perturb.linf import sign_gradient_ascent

EPS = 0.1
STUDY = Path(__file__).resolve().parent.parent / "leaderboard" / "robust-base"
MASKED = ("robust-exp-am-trades-full-s0",)  # the first wdat (replaced) was the other; its entries left


@pytest.fixture(autouse=True)
def cheap_autoattack(monkeypatch):
    from pyautoattack.autoattack import AutoAttack

    standard = AutoAttack._set_version

    def cheap(self, version="standard"):
        standard(self, version)
        self.square.n_queries = 300            # 5,000 in the standard version
        self.apgd_targeted.n_target_classes = 3  # 9
        self.apgd.n_iter = self.apgd_targeted.n_iter = 25  # 100

    monkeypatch.setattr(AutoAttack, "_set_version", cheap)


@pytest.fixture(scope="session")
def _pgd_state(fmnist_train):
    """PGD-AT (5 steps of ε/4 at ε = 0.1) of a SmallCNN(width=8): 2 epochs on 3,000 training images."""
    torch.manual_seed(0)
    model = SmallCNN(width=8)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    x, y = fmnist_train[0][:3000], fmnist_train[1][:3000]
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 100):
            idx = perm[i:i + 100]
            model.eval()
            x_adv = sign_gradient_ascent(model, x[idx], y[idx], eps=EPS, step_size=EPS / 4, steps=5)
            model.train()
            loss = F.cross_entropy(model(x_adv), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval().state_dict()


@pytest.fixture
def pgd_cnn(_pgd_state):
    model = SmallCNN(width=8)
    model.load_state_dict(_pgd_state)
    return model.eval()


class Rounded(nn.Module):
    """Input quantisation: round(2x)/2, whose gradient is zero almost everywhere."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 2) / 2)


class Scaled(nn.Module):
    def __init__(self, net, factor: float):
        super().__init__()
        self.net, self.factor = net, factor

    def forward(self, x):
        return self.net(x) * self.factor


class Noisy(nn.Module):
    """A Gaussian-noise input layer, random in eval mode too (a randomised defence)."""

    def __init__(self, net, sigma: float):
        super().__init__()
        self.net, self.sigma, self.calls = net, sigma, 0

    def forward(self, x):
        self.calls += 1
        return self.net((x + self.sigma * torch.randn_like(x)).clamp(0, 1))


def _verdicts(report) -> dict[str, str]:
    return {c.name: c.verdict for c in report.checks}


# ---------------------------------------------------------------- calibration of the black-box test

def test_black_box_test_false_alarm_rate_is_at_most_alpha_and_masked_counts_fail():
    for n in (50, 200, 500, 1000):
        assert ac.false_alarm_rate(n) <= ac.BLACK_BOX_ALPHA_FAIL
    # simulated healthy models at the reference rate: the share that fails is the false-alarm rate
    rng = np.random.default_rng(0)
    counts = rng.binomial(200, ac.BLACK_BOX_REFERENCE_RATE, size=2000)
    fails = np.mean([ac.black_box_test(int(k), 200)[0] == "fail" for k in counts])
    assert fails <= ac.BLACK_BOX_ALPHA_FAIL + 0.006  # + 3 standard errors of the simulation
    # the study: healthy models had 0–5 Square-only examples of 200, the two masked ones 16 and 19
    assert all(ac.black_box_test(k, 200)[0] == "pass" for k in range(6))
    assert ac.black_box_test(16, 200)[0] == ac.black_box_test(19, 200)[0] == "fail"
    # the old fixed rule (fail from max(2, 1% of n) examples) fired on 2 of 200; the test does not
    assert ac.black_box_test(2, 200)[0] == "pass"


# ---------------------------------------------------------------- healthy and masked models

def test_a_healthy_pgd_trained_model_passes_every_check(pgd_cnn, trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:200], fmnist_test[1][:200]
    report = audit_model(pgd_cnn, x, y, eps=EPS, surrogate=trained_cnn, surrogate_label="standard CNN")
    verdicts = _verdicts(report)
    assert set(verdicts) == set(ALL_CHECKS) - {"wasserstein upper bounds"}, report.skipped
    assert all(v == "pass" for v in verdicts.values()), [c.detail for c in report.checks if c.verdict != "pass"]
    assert report.verdict == "pass" and report.extra["white_box_acc"] > 20  # it is robust, not trivially so
    unbounded = report.check("unbounded attack").numbers
    assert unbounded["accuracy_eps1_pct"] <= ac.UNBOUNDED_MAX_PCT
    sweep = [unbounded["sweep_pct"][k] for k in sorted(unbounded["sweep_pct"], key=float)]
    assert sweep == sorted(sweep, reverse=True)
    json.dumps(report.to_json())  # what the entry records is JSON


def test_the_false_alarm_rate_holds_over_seeds_on_a_healthy_model(pgd_cnn, fmnist_test):
    """Other images and attack seeds: the black-box check still passes (its false-alarm rate ≤ 1%)."""
    x, y = fmnist_test[0][200:400], fmnist_test[1][200:400]
    for seed, rows in ((1, slice(0, 100)), (2, slice(100, 200))):
        report = audit_model(pgd_cnn, x[rows], y[rows], eps=EPS, seed=seed, checks=["black-box vs white-box"])
        assert _verdicts(report) == {"black-box vs white-box": "pass"}, report.checks[0].detail


def test_input_rounding_fails_the_black_box_and_gradient_health_checks(pgd_cnn, fmnist_test):
    x, y = fmnist_test[0][:100], fmnist_test[1][:100]
    report = audit_model(Rounded(pgd_cnn).eval(), x, y, eps=EPS,
                         checks=["black-box vs white-box", "gradient health", "unbounded attack"])
    verdicts = _verdicts(report)
    assert verdicts["black-box vs white-box"] == "fail" and verdicts["gradient health"] == "fail", report.checks
    assert verdicts["unbounded attack"] == "fail"  # PGD cannot even win with ε = 1
    grads = report.check("gradient health").numbers
    assert grads["zero_pct"] > 90 and grads["non_differentiable_pct"] > 50
    assert report.verdict == "fail" and "convergence" in report.skipped


def test_logits_times_a_large_factor_warn_of_a_saturated_softmax(pgd_cnn, fmnist_test):
    x, y = fmnist_test[0][:100], fmnist_test[1][:100]
    checks = ["gradient health", "saturated softmax"]
    scaled = audit_model(Scaled(pgd_cnn, 1000.0).eval(), x, y, eps=EPS, checks=checks)
    assert _verdicts(scaled) == {"gradient health": "pass", "saturated softmax": "warn"}
    assert "margin" in scaled.check("saturated softmax").detail
    plain = audit_model(pgd_cnn, x, y, eps=EPS, checks=checks)
    assert _verdicts(plain) == {"gradient health": "pass", "saturated softmax": "pass"}


def test_a_noise_layer_fires_the_randomness_check_and_eot_runs(pgd_cnn, fmnist_test, monkeypatch):
    from adt_finetune.attacks import eot

    x, y = fmnist_test[0][:24], fmnist_test[1][:24]
    seen = []
    original = eot.ExpectationModel.forward
    monkeypatch.setattr(eot.ExpectationModel, "forward", lambda self, xb: seen.append(len(xb)) or original(self, xb))
    noisy = Noisy(pgd_cnn, 0.1).eval()
    report = audit_model(noisy, x, y, eps=EPS, checks=["randomness"])
    check = report.check("randomness")
    assert check.verdict == "warn" and "EOT" in check.detail
    assert check.numbers["eot_samples"] == ac.EOT_SAMPLES and set(check.numbers["eot_pct"]) == {"pgd20", "apgd-ce"}
    assert len(seen) > 20  # the gradient attacks ran on the EOT model, not once
    assert _verdicts(audit_model(pgd_cnn, x, y, eps=EPS, checks=["randomness"])) == {"randomness": "pass"}


def test_unknown_check_names_are_refused(pgd_cnn, fmnist_test):
    from adt_finetune.errors import UserError

    with pytest.raises(UserError, match="unknown audit check"):
        audit_model(pgd_cnn, fmnist_test[0][:4], fmnist_test[1][:4], eps=EPS, checks=["colour"])


# ---------------------------------------------------------------- the study's committed entries

def test_the_study_entries_flag_exactly_the_masked_model():
    verdicts = {}
    for path in sorted(STUDY.glob("*_parts.json")):
        report = audit_entry(find_entry(path, STUDY))
        verdicts[path.name[:-len("_parts.json")]] = report.verdict
        assert report.source == "entry" and "gradient health" in report.skipped
    assert {k for k, v in verdicts.items() if v == "fail"} == set(MASKED)
    assert len(verdicts) > 10 and all(v == "pass" for k, v in verdicts.items() if k not in MASKED)
    # The W-DAT re-run (per-image budgets) on a regenerated base: no model is masked.
    rerun = STUDY.parent / "robust-base-wdat"
    verdicts = {p.name: audit_entry(find_entry(p, rerun)).verdict for p in sorted(rerun.glob("*_parts.json"))}
    assert len(verdicts) == 10 and set(verdicts.values()) == {"pass"}, verdicts


def test_cli_audit_of_an_entry_records_it_and_the_leaderboard_marks_it(cli, tmp_path):
    folder = tmp_path / "lb"
    folder.mkdir()
    for name in (f"{MASKED[0]}_parts", "robust-pgd-at-ce-full-s0_parts"):
        for suffix in (".json", ".per-example.csv"):
            shutil.copy(STUDY / f"{name}{suffix}", folder / f"{name}{suffix}")
    masked = folder / f"{MASKED[0]}_parts.json"
    code, out, err = cli("audit", "--entry", masked, "--no-progress", "-w", tmp_path)
    assert code == 1, err
    assert "black-box vs white-box" in out and "fail" in out and "skipped convergence" in out
    audit = json.loads(masked.read_text())["adt_ft"]["audit"]
    assert audit["verdict"] == "fail" and audit["source"] == "entry"
    assert {c["name"]: c["verdict"] for c in audit["checks"]} == {"black-box vs white-box": "fail"}
    assert find_entry(masked, folder).audit_verdict == "fail"
    assert find_entry(folder / "robust-pgd-at-ce-full-s0_parts.json", folder).audit_verdict is None


def test_leaderboard_marks_and_compare_refuses_a_failed_audit(cli, tmp_path):
    from adt_finetune.leaderboard import render

    folder = tmp_path / "ws" / "leaderboard" / "fashion-mnist" / "Linf"
    folder.mkdir(parents=True)
    names = [f"{MASKED[0]}_parts", "robust-pgd-at-ce-full-s0_parts", "robust-SmallResNet_parts"]
    for name in names:
        for suffix in (".json", ".per-example.csv"):
            shutil.copy(STUDY / f"{name}{suffix}", folder / f"{name}{suffix}")
    for name in names[:2]:
        assert cli("audit", "--entry", name, "--no-progress", "-w", tmp_path / "ws")[0] in (0, 1)
    entries = [find_entry(folder / f"{n}.json", folder) for n in names]
    marks = {n: next(line for line in render(entries, "table").splitlines() if line.startswith(n + " "))
             for n in names}
    assert "✗" in marks[names[0]] and "°" in marks[names[2]]
    assert "✗" not in marks[names[1]] and "°" not in marks[names[1]]  # its audit passed
    code, out, err = cli("compare", names[1], names[0], "-w", tmp_path / "ws")
    assert code == 2 and "failed its robustness-evaluation audit" in err and "--allow-failed-audit" in err
    code, out, err = cli("compare", names[1], names[0], "--allow-failed-audit", "--resamples", "200",
                         "-w", tmp_path / "ws")
    assert code == 0, err
    assert cli("compare", names[1], names[2], "--resamples", "200", "-w", tmp_path / "ws")[0] == 0
    code, out, err = cli("leaderboard", "--html", tmp_path / "site", "-w", tmp_path / "ws")
    assert code == 0, err
    html = "\n".join(p.read_text() for p in (tmp_path / "site").rglob("*.html"))
    assert "audit-failed" in html and "no audit ran" in html
    assert "audit-failed" in html and "unaudited" in html


def test_the_study_readme_states_each_models_audit_verdicts():
    from adt_finetune.study.masking import AUDIT_HEADING, audit_text

    parts = {p.name[:-len("_parts.json")]: find_entry(p, STUDY) for p in sorted(STUDY.glob("*_parts.json"))}
    section = audit_text(parts)
    readme = (STUDY / "README.md").read_text()
    assert f"{AUDIT_HEADING}\n\n" in readme
    rows = {line.split(" | ")[0][2:]: line for line in section.splitlines() if line.startswith("| robust-")}
    assert len(rows) == len(parts) > 10
    assert all(line in readme for line in rows.values())  # `adt-ft study report` wrote these rows
    assert {name for name, line in rows.items() if "**fail**" in line} == set(MASKED)


def test_eval_with_audit_records_the_audit_in_the_entry(cli, tmp_path, _pgd_state):
    from adt_finetune.utils import atomic_torch_save
    from adt_finetune.workspace import ModelRef, Workspace

    ws = Workspace(tmp_path / "ws")
    path = ws.model_path("fashion-mnist", "Linf", "pgd-cnn")
    atomic_torch_save(_pgd_state, path)
    ws.set_current_model(ModelRef(name="pgd-cnn", arch="adt_finetune.models.small:SmallCNN", dataset="fashion-mnist",
                                  path=str(path), source="file", arch_kwargs={"width": 8}))
    code, out, err = cli("eval", "--attacks", "pgd20", "-n", "16", "--entry", "e", "--audit", "--no-progress",
                         "-w", ws.root)
    assert code == 0, err
    assert "audit verdict:" in out + err and "gradient health" in out
    data = json.loads((ws.leaderboard_dir / "fashion-mnist" / "Linf" / "e.json").read_text())
    audit = data["adt_ft"]["audit"]
    assert audit["source"] == "model" and audit["n_examples"] == 16 and audit["verdict"] in ("pass", "warn", "fail")
    assert {c["name"] for c in audit["checks"]} >= {"black-box vs white-box", "convergence", "randomness"}
    assert {s["name"] for s in audit["skipped"]} == {"transfer", "wasserstein upper bounds"}
