"""The evaluation engine (per-example flags, A_rob, modes, resume, sanity checks) and `adt-ft eval`.

Most engine tests use fake attacks whose per-example outcome is a table the test
controls, on a model whose prediction for example i is a table too: then every
number the engine reports can be computed by hand.
"""
from __future__ import annotations

import hashlib
import json
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from adt_finetune.attacks import ATTACKS, Attack, AttackResult
from adt_finetune.errors import UserError
from adt_finetune.evaluation import (SUITES, EvalResult, evaluate, parse_attack_list, read_per_example_csv,
                                     suite_attacks)
from adt_finetune.nets import PassCounter

EPS = 0.1
N = 40


# ---------------------------------------------------------------- a table model and table attacks

def encode(n: int) -> torch.Tensor:
    """n tiny images whose first pixel encodes their index (so fakes can look outcomes up)."""
    x = torch.full((n, 1, 4, 4), 0.5)
    x[:, 0, 0, 0] = torch.arange(n) / 1000.0
    return x


def decode(x: torch.Tensor) -> list[int]:
    return [int(round(v * 1000)) for v in x[:, 0, 0, 0].tolist()]


class TableModel(nn.Module):
    """Predicts `pred[i]` for the image encoding index i."""

    def __init__(self, pred: torch.Tensor):
        super().__init__()
        self.register_buffer("pred", pred.clone())

    def forward(self, x):
        idx = torch.tensor(decode(x))
        return nn.functional.one_hot(self.pred[idx], 10).float() * 10


def make_fake(monkeypatch, name: str, robust_of: dict[int, bool], *, black_box=False, shift=0.0, value=None,
              dataset_level=False, linf_bounded=True, fail_on_call: int | None = None, amp_search=False,
              autocast_seen: list | None = None):
    """Register an attack `name` that never runs the model: example i is robust iff robust_of[i].
    `calls` records the indices of every call; `shift`/`value` move x' (to break the sanity checks)."""
    calls: list[list[int]] = []

    class Fake(Attack):
        def perturb(self, model, x, y):
            idx = decode(x)
            if fail_on_call is not None and len(calls) == fail_on_call:
                raise RuntimeError("simulated crash")
            calls.append(idx)
            if autocast_seen is not None:
                autocast_seen.append(torch.is_autocast_enabled("cpu"))
            x_adv = x.clone()
            x_adv[:, :, 1:, :] = (x_adv[:, :, 1:, :] + EPS).clamp(0, 1)  # a legal perturbation, index pixel kept
            if shift:
                x_adv[:, :, 1:, :] += shift
            if value is not None:
                x_adv[:, :, 1, 1] = value
            return AttackResult(x_adv, torch.tensor([bool(robust_of[i]) for i in idx]))

    Fake.name = name
    Fake.black_box = black_box
    Fake.dataset_level = dataset_level
    Fake.linf_bounded = linf_bounded
    Fake.amp_search = amp_search
    monkeypatch.setitem(ATTACKS._items, name, Fake)  # the registry refuses overwrites
    return calls


@pytest.fixture
def tables():
    """Clean predictions (about 20% wrong) and three attacks' robust tables, fixed by a seed."""
    rng = np.random.default_rng(0)
    y = torch.tensor(rng.integers(0, 10, N))
    wrong = rng.random(N) < 0.2
    pred = torch.where(torch.tensor(wrong), (y + 1) % 10, y)
    robust = {a: {i: bool(rng.random() < p) for i in range(N)} for a, p in (("fa", 0.8), ("fb", 0.6), ("fc", 0.7))}
    return encode(N), y, TableModel(pred), ~torch.tensor(wrong).numpy(), robust


# ---------------------------------------------------------------- A_rob and the two modes

def test_a_rob_is_the_per_example_minimum(monkeypatch, tables):
    x, y, model, clean, robust = tables
    calls = {a: make_fake(monkeypatch, a, robust[a]) for a in robust}
    r = evaluate(model, x, y, attacks=["clean", "fa", "fb", "fc"], eps=EPS, batch_size=16)

    table = {a: np.array([robust[a][i] for i in range(N)]) for a in robust}
    by_hand = clean & table["fa"] & table["fb"] & table["fc"]
    assert r.clean_acc == pytest.approx(100 * clean.mean())
    assert r.a_rob == pytest.approx(100 * by_hand.mean())
    for a in robust:
        assert r.per_attack[a] == pytest.approx(100 * (clean & table[a]).mean())
        assert r.a_rob <= r.per_attack[a]
    assert (r.robust == by_hand).all()
    # Clean errors are never attacked, and count as broken under every attack.
    for a in robust:
        seen = sorted(i for batch in calls[a] for i in batch)
        assert seen == list(np.flatnonzero(clean))
    assert (r.flags[~clean] == 0).all()
    for i, first in enumerate(r.first_broken_by):
        expected = "clean" if not clean[i] else next((a for a in ("fa", "fb", "fc") if not table[a][i]), "")
        assert first == expected


def test_cascade_attacks_only_still_robust_examples_and_agrees(monkeypatch, tables):
    x, y, model, clean, robust = tables
    calls = {a: make_fake(monkeypatch, a, robust[a]) for a in robust}
    ind = evaluate(model, x, y, attacks=["fa", "fb", "fc"], eps=EPS, batch_size=16)
    for c in calls.values():
        c.clear()
    cas = evaluate(model, x, y, attacks=["fa", "fb", "fc"], eps=EPS, mode="cascade", batch_size=16)

    still = clean.copy()
    for a in ("fa", "fb", "fc"):
        seen = sorted(i for batch in calls[a] for i in batch)
        assert seen == list(np.flatnonzero(still)), a
        still &= np.array([robust[a][i] for i in range(N)])
    assert cas.a_rob == ind.a_rob
    assert (cas.robust == ind.robust).all()
    assert cas.first_broken_by == ind.first_broken_by
    assert cas.cumulative == ind.cumulative
    # Cascade columns cover only part of the examples: no per-attack accuracy is claimed.
    assert all(v is None for v in cas.per_attack.values())
    assert cas.to_json()["per_attack"] == {"fa": None, "fb": None, "fc": None}
    assert (cas.flags == -1).any() and not (ind.flags == -1).any()


def test_clean_logits_are_computed_once(monkeypatch, tables):
    x, y, model, clean, robust = tables
    for a in robust:
        make_fake(monkeypatch, a, robust[a])  # these never run the model
    with PassCounter(model) as pc:
        evaluate(model, x, y, attacks=["fa", "fb", "fc"], eps=EPS, batch_size=16)
    assert pc.images_forward == N
    assert pc.forward == math.ceil(N / 16)


def test_dataset_level_attack_sees_every_example_and_stays_out_of_a_rob(monkeypatch, tables):
    x, y, model, clean, robust = tables
    make_fake(monkeypatch, "fa", robust["fa"])
    everything = {i: True for i in range(N)}
    calls = make_fake(monkeypatch, "fw", everything, dataset_level=True, linf_bounded=False, shift=0.3)
    r = evaluate(model, x, y, attacks=["fa", "fw"], eps=EPS, batch_size=8, mode="cascade")
    assert [sorted(c) for c in calls] == [list(range(N))]  # one call, all examples, clean errors included
    assert r.excluded_from_a_rob == ["fw"]
    assert r.a_rob == pytest.approx(100 * (clean & np.array([robust["fa"][i] for i in range(N)])).mean())
    assert r.per_attack["fw"] == pytest.approx(100 * clean.mean())  # a clean error stays an error
    assert all(c.ok for c in r.sanity)  # its x' leaves the ε-ball by design, which is not a failure


# ---------------------------------------------------------------- resume

def test_resume_skips_finished_attacks_and_batches(monkeypatch, tables, tmp_path):
    x, y, model, clean, robust = tables
    resume = tmp_path / "partial"
    calls_a = make_fake(monkeypatch, "fa", robust["fa"])
    make_fake(monkeypatch, "fb", robust["fb"], fail_on_call=1)  # crashes on its second batch
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(model, x, y, attacks=["fa", "fb"], eps=EPS, batch_size=8, resume_dir=resume)
    assert len(calls_a) > 0

    calls_a = make_fake(monkeypatch, "fa", robust["fa"])
    calls_b = make_fake(monkeypatch, "fb", robust["fb"])
    resumed = evaluate(model, x, y, attacks=["fa", "fb"], eps=EPS, batch_size=8, resume_dir=resume)
    assert calls_a == []  # finished attack: not run again
    pool = list(np.flatnonzero(clean))
    assert sorted(i for c in calls_b for i in c) == pool[8:]  # only the batches after the saved one

    fresh = evaluate(model, x, y, attacks=["fa", "fb"], eps=EPS, batch_size=8)
    assert (resumed.flags == fresh.flags).all() and resumed.a_rob == fresh.a_rob

    # Saved flags belong to one model, example set and settings: anything else is refused.
    with pytest.raises(UserError, match="different model"):
        evaluate(model, x, y, attacks=["fa", "fb"], eps=0.05, batch_size=8, resume_dir=resume)
    other = TableModel(model.pred.roll(1))
    with pytest.raises(UserError, match="different model"):
        evaluate(other, x, y, attacks=["fa", "fb"], eps=EPS, batch_size=8, resume_dir=resume)


# ---------------------------------------------------------------- sanity checks

def _check(result: EvalResult, name: str):
    return next(c for c in result.sanity if c.name == name)


def test_sanity_checks_catch_out_of_ball_and_out_of_range(monkeypatch, tables):
    x, y, model, clean, robust = tables
    make_fake(monkeypatch, "fa", robust["fa"])
    good = evaluate(model, x, y, attacks=["fa"], eps=EPS)
    assert _check(good, "linf").ok and _check(good, "range").ok and not good.unreliable

    make_fake(monkeypatch, "fa", robust["fa"], shift=0.05)
    far = evaluate(model, x, y, attacks=["fa"], eps=EPS)
    assert _check(far, "linf").ok is False and far.unreliable

    make_fake(monkeypatch, "fa", robust["fa"], value=-0.02)
    below = evaluate(model, x, y, attacks=["fa"], eps=EPS)
    assert _check(below, "range").ok is False and below.unreliable


def test_linf_check_prints_the_comparison_it_makes():
    """A distance a hair above ε passes within the float32 tolerance: the line must show the bound it was
    compared with, never "0.0313726 ≤ ε = 0.0313725"."""
    import re

    from adt_finetune.evaluation.sanity import LINF_TOLERANCE, sanity_checks

    eps = 8 / 255
    for d, ok in ((eps + 0.4 * LINF_TOLERANCE, True), (eps, True), (eps + 2 * LINF_TOLERANCE, False)):
        r = EvalResult(attacks=["fgsm"], indices=np.arange(2), labels=np.zeros(2, dtype=np.int64),
                       clean=np.ones(2, dtype=bool), flags=np.ones((2, 1), dtype=np.int8), eps=eps, mode="independent",
                       seed=0, batch_size=2, device="cpu", max_linf={"fgsm": d})
        (check,) = [c for c in sanity_checks(r, {}, set()) if c.name == "linf"]
        assert check.ok is ok
        shown = re.match(r"max ‖x'−x‖∞ = ([0-9.e-]+) \(fgsm\) ([≤>]) ε \+ 1e-06 = ([0-9.e-]+) \(ε = 0.03137255", check.detail)
        assert shown, check.detail
        left, sign, right = float(shown[1]), shown[2], float(shown[3])
        assert (left <= right) is ok and sign == ("≤" if ok else ">")


# ---------------------------------------------------------------- degenerate models (issue 22)

def _degenerate_cnn(constant_class=None):
    """A SmallCNN whose weights are all zero: every logit 0 (a tie), or, with `constant_class`, a
    bias that makes it answer that class for every image."""
    from adt_finetune.models import SmallCNN

    model = SmallCNN(width=8).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        if constant_class is not None:
            model.fc.bias[constant_class] = 1.0
    return model


def test_tied_logits_are_never_a_correct_prediction():
    """argmax breaks a tie towards class 0: an all-zero model would be 'right' on every class-0 image."""
    from adt_finetune.attacks import verdict
    from adt_finetune.evaluation.engine import clean_pass

    y = torch.tensor([0, 0, 1, 2])
    logits = torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 1.0], [1.0, 3.0, 3.0], [0.0, 1.0, 2.0]])
    assert verdict(logits, y).tolist() == [False, False, False, True]
    run = clean_pass(_degenerate_cnn(), torch.rand(6, 1, 28, 28), torch.zeros(6, dtype=torch.long), 4,
                     torch.device("cpu"))
    assert not run.correct.any() and (run.predicted == -1).all() and run.n_bad == 0


def test_an_all_zero_model_fails_its_sanity_checks(fmnist_test):
    x, y = fmnist_test[0][:100], fmnist_test[1][:100]
    r = evaluate(_degenerate_cnn(), x, y, attacks=["fgsm", "pgd20"], eps=EPS)
    assert r.clean_acc == 0 and r.a_rob == 0 and set(r.per_attack.values()) == {0.0}
    assert _check(r, "predictions").ok is False and "tied logits" in _check(r, "predictions").detail
    assert _check(r, "above chance").ok is False and r.unreliable


def test_a_constant_class_model_fails_its_sanity_checks_in_the_entry_and_on_the_leaderboard(fmnist_test, tmp_path):
    from adt_finetune import leaderboard as lb
    from adt_finetune.publish import build_site

    x, y = fmnist_test[0][:100], fmnist_test[1][:100]
    r = evaluate(_degenerate_cnn(constant_class=3), x, y, attacks=["fgsm"], eps=EPS)
    share = float((y == 3).float().mean() * 100)
    assert r.clean_acc == pytest.approx(share) and r.per_attack["fgsm"] == pytest.approx(share)
    assert _check(r, "predictions").ok is False and "class 3 on 100.0%" in _check(r, "predictions").detail
    assert _check(r, "above chance").ok is False and r.unreliable
    root = tmp_path / "leaderboard"
    path = lb.write_entry(r, root=root, dataset="fashion-mnist", entry="constant")
    data = json.loads(path.read_text())
    assert data["unreliable"] is True and "not above chance" in data["footnote"]
    assert {c["name"]: c["ok"] for c in data["adt_ft"]["sanity"]}["predictions"] is False
    entries = lb.read_entries(root)
    for fmt in ("table", "markdown"):
        text = lb.render(entries, fmt)
        assert "constant ⚠" in text and "a sanity check failed" in text
    assert json.loads(lb.render(entries, "json"))[0]["unreliable"] is True
    site = build_site(entries, tmp_path / "site")
    board = (site.root / "fashion-mnist" / "Linf" / "index.html").read_text()
    assert re.search(r'<tr class="[^"]*\bunreliable\b', board)
    page = (site.root / "fashion-mnist" / "Linf" / "constant.html").read_text()
    assert "unreliable: a sanity check failed" in page and "not above chance" in page


def test_healthy_models_pass_the_degenerate_model_checks(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:100], fmnist_test[1][:100]
    r = evaluate(trained_cnn, x, y, attacks=["fgsm"], eps=EPS)
    assert _check(r, "predictions").ok and _check(r, "above chance").ok and not r.unreliable
    few = evaluate(trained_cnn, x[:1], y[:1], attacks=["fgsm"], eps=EPS)  # one image cannot tell
    assert _check(few, "predictions").ok is None and _check(few, "above chance").ok is None


def test_a_model_trained_at_a_huge_lr_fails_the_chance_check(tmp_path, fmnist_test):
    """lr 5: the loss explodes but stays finite, training finishes, and the model is at chance."""
    from test_trainer import _small, _workspace

    from adt_finetune import train

    run = train(_small(lr=5.0, train_subset=256, pgd_steps=1), workspace=_workspace(tmp_path))
    assert run.final_metrics["loss"] > 5  # far above a trained model's
    r = evaluate(run.model, fmnist_test[0][:100], fmnist_test[1][:100], attacks=["fgsm"], eps=EPS)
    assert _check(r, "above chance").ok is False and r.unreliable


def test_pgd100_must_not_beat_pgd20(monkeypatch, tables):
    x, y, model, clean, robust = tables
    some = {i: i % 2 == 0 for i in range(N)}
    more = {i: True for i in range(N)}
    make_fake(monkeypatch, "pgd20", some)
    make_fake(monkeypatch, "pgd100", more)
    bad = evaluate(model, x, y, attacks=["pgd20", "pgd100"], eps=EPS)
    assert _check(bad, "pgd100 ≤ pgd20").ok is False and bad.unreliable
    make_fake(monkeypatch, "pgd100", some)
    ok = evaluate(model, x, y, attacks=["pgd20", "pgd100"], eps=EPS)
    assert _check(ok, "pgd100 ≤ pgd20").ok


def test_black_box_far_below_white_box_warns(monkeypatch, tables):
    x, y, model, clean, robust = tables
    make_fake(monkeypatch, "fa", {i: True for i in range(N)})
    make_fake(monkeypatch, "fbb", {i: i % 3 != 0 for i in range(N)}, black_box=True)
    masked = evaluate(model, x, y, attacks=["fa", "fbb"], eps=EPS)
    check = _check(masked, "black-box vs white-box")
    assert check.ok is False and "gradient" in check.detail
    make_fake(monkeypatch, "fa", {i: i % 3 != 0 for i in range(N)})
    fine = evaluate(model, x, y, attacks=["fa", "fbb"], eps=EPS)
    assert _check(fine, "black-box vs white-box").ok


# ---------------------------------------------------------------- per-example file

def test_per_example_csv_round_trip(monkeypatch, tables, tmp_path):
    import pandas as pd

    x, y, model, clean, robust = tables
    for a in robust:
        make_fake(monkeypatch, a, robust[a])
    r = evaluate(model, x, y, attacks=["fa", "fb", "fc"], eps=EPS, mode="cascade",
                 indices=range(100, 100 + N))
    path = tmp_path / "e.per-example.csv"
    sha = r.write_csv(path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()

    df = pd.read_csv(path)
    assert list(df.columns) == ["index", "label", "clean", "fa", "fb", "fc", "robust", "first_broken_by"]
    assert df["index"].tolist() == list(range(100, 100 + N))
    assert df["label"].tolist() == y.tolist()
    assert (df["clean"].to_numpy() == clean).all()
    for k, a in enumerate(["fa", "fb", "fc"]):
        col = df[a].to_numpy()
        unrun = r.flags[:, k] == -1
        assert np.isnan(col[unrun]).all()  # cascade: not attacked, written as an empty cell
        assert (col[~unrun] == r.flags[~unrun, k]).all()
    assert df["robust"].mean() * 100 == pytest.approx(r.a_rob)
    assert df["first_broken_by"].fillna("").tolist() == r.first_broken_by
    cols = read_per_example_csv(path)
    assert cols["robust"] == [str(int(v)) for v in r.robust]


# ---------------------------------------------------------------- suites and names

def test_suites_and_attack_lists():
    assert SUITES["paper"] == ["clean", "fgsm", "pgd20", "pgd100", "mim", "cw", "feature", "autoattack"]
    # `full` retrains both generators against the model and adds the run's own (co-trained) one.
    assert SUITES["full"] == SUITES["paper"] + ["spsa", "exp", "exp-am", "imp-am"]
    assert suite_attacks("full", generator_method="exp-am")[-1] == "exp-am-cotrained"
    assert suite_attacks("full", generator_method="imp-am")[-1] == "imp-am-cotrained"
    assert suite_attacks("full") == SUITES["full"]
    assert parse_attack_list(" fgsm, pgd20 ") == ["clean", "fgsm", "pgd20"]
    for name in (a for s in SUITES.values() for a in s):
        assert name in ("clean", "wasserstein") or name in ATTACKS
    with pytest.raises(UserError, match="choose from.*fgsm"):
        parse_attack_list("fgsm,nope")
    with pytest.raises(UserError, match="paper, aa, aa-parts, quick, full, wasserstein"):
        suite_attacks("nope")


# ---------------------------------------------------------------- real attacks

def test_exp_flags_do_not_depend_on_the_batch_size(trained_cnn, fmnist_test):
    """`eval --attacks exp -b 16` and `-b 100` on the same images: the same per-example flags
    (its noise is drawn per example; keyed to the batch, 6 of these 100 flags flipped)."""
    x, y = fmnist_test[0][:100], fmnist_test[1][:100]
    settings = {"exp": {"steps": 3, "samples": 2}}
    small = evaluate(trained_cnn, x, y, attacks=["exp"], eps=EPS, batch_size=16, attack_settings=settings)
    whole = evaluate(trained_cnn, x, y, attacks=["exp"], eps=EPS, batch_size=100, attack_settings=settings)
    assert small.csv_text() == whole.csv_text()
    assert 0 < small.per_attack["exp"] < small.clean_acc


def test_real_fgsm_pgd20_cascade_equals_independent(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:64], fmnist_test[1][:64]
    ind = evaluate(trained_cnn, x, y, attacks=["fgsm", "pgd20"], eps=EPS, batch_size=32)
    cas = evaluate(trained_cnn, x, y, attacks=["fgsm", "pgd20"], eps=EPS, batch_size=32, mode="cascade")
    assert ind.per_attack["fgsm"] < ind.clean_acc and ind.per_attack["pgd20"] < ind.clean_acc
    assert ind.a_rob == pytest.approx(100 * (ind.clean & (ind.flags == 1).all(1)).mean())
    assert ind.a_rob <= min(ind.per_attack.values())
    # Attacks seed each example from its own pixels, so the batch an example sits in changes nothing.
    assert cas.a_rob == ind.a_rob and (cas.robust == ind.robust).all()
    assert all(c.ok for c in ind.sanity), ind.sanity
    assert ind.max_linf["pgd20"] <= EPS + 1e-6


def test_wasserstein_suite_columns_are_reported_outside_a_rob(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:16], fmnist_test[1][:16]
    r = evaluate(trained_cnn, x, y, attacks=suite_attacks("wasserstein"), eps=EPS, budgets="0.05", batch_size=16)
    assert r.attacks == ["wpgd@0.05", "pgd20@0.05"] and r.excluded_from_a_rob == r.attacks
    assert r.a_rob is None  # no pointwise attack at ε ran
    assert (r.flags[~r.clean] == 0).all()
    assert r.per_attack["wpgd@0.05"] < r.clean_acc
    assert r.wasserstein["rows"][0]["budget"] == pytest.approx(0.05)
    assert r.to_json()["wasserstein"]["clean"]["upsilon"] > 0


# ---------------------------------------------------------------- the CLI

@pytest.fixture
def workspace(tmp_path, _trained_cnn_state):
    """A workspace whose current model is the trained SmallCNN(width=16)."""
    from adt_finetune.utils import atomic_torch_save
    from adt_finetune.workspace import ModelRef, Workspace

    ws = Workspace(tmp_path / "ws")
    path = ws.model_path("fashion-mnist", "Linf", "tiny")
    atomic_torch_save(_trained_cnn_state, path)
    ref = ModelRef(name="tiny", arch="adt_finetune.models.small:SmallCNN", dataset="fashion-mnist",
                   path=str(path), source="file", arch_kwargs={"width": 16})
    ws.set_current_model(ref)
    return ws


def _one_line_error(code, err):
    assert code == 2, err
    assert err.strip().count("\n") == 0, err
    assert "Traceback" not in err


def test_cli_bad_input(cli, workspace, tmp_path):
    w = ["-w", workspace.root, "--no-progress"]
    code, _, err = cli("eval", "--attacks", "fgsm,nope", *w)
    _one_line_error(code, err)
    assert "nope" in err and "pgd20" in err and "autoattack" in err
    code, _, err = cli("eval", "--suite", "everything", *w)
    _one_line_error(code, err)
    assert "paper, aa, aa-parts, quick, full, wasserstein" in err
    code, _, err = cli("eval", "--eps", "eight/255", *w)
    _one_line_error(code, err)
    assert "ε" in err
    code, _, err = cli("eval", "--suite", "quick", "--n-examples", "20000", *w)
    _one_line_error(code, err)
    assert "20000" in err and "10000" in err
    code, _, err = cli("eval", "--mode", "sideways", *w)
    _one_line_error(code, err)
    code, _, err = cli("eval", "--baseline", "--suite", "quick", *w)
    _one_line_error(code, err)
    assert "--baseline needs a run" in err
    code, _, err = cli("eval", "--suite", "wasserstein", "--budgets", "lots", *w)
    _one_line_error(code, err)
    assert "lots" in err
    code, _, err = cli("eval", "--model", "Zhang2019", "--arch", "x.y:Z", *w)
    _one_line_error(code, err)

    empty = tmp_path / "empty"
    code, _, err = cli("eval", "-w", empty)
    _one_line_error(code, err)
    assert "no run and no current model" in err

    folder = tmp_path / "pets"
    from PIL import Image

    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(folder / cls / "0.png")
    code, _, err = cli("eval", "--suite", "quick", "--dataset", folder, *w)
    _one_line_error(code, err)
    assert "fashion-mnist" in err and "cifar10" in err

    run = workspace.runs_dir / "half"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"id": "half", "status": "running", "method": "exp-am",
                                              "base_model": workspace.current_model().to_dict()}))
    workspace.set_latest_run("half")
    code, _, err = cli("eval", "--suite", "quick", *w)
    _one_line_error(code, err)
    assert "half" in err and "no final model" in err


def test_cli_eval_writes_entry_and_leaderboard_shows_it(cli, workspace):
    w = ["-w", workspace.root]
    code, out, err = cli("eval", "--suite", "quick", "--n-examples", "100", "--no-progress", *w)
    assert code == 0, err
    assert "A_rob" in out and "pgd20" in out and "✓ linf" in out
    folder = workspace.leaderboard_dir / "fashion-mnist" / "Linf"
    data = json.loads((folder / "tiny_quick_n100.json").read_text())
    csv = folder / "tiny_quick_n100.per-example.csv"
    assert data["adt_ft"]["per_example_sha256"] == hashlib.sha256(csv.read_bytes()).hexdigest()
    assert data["adt_ft"]["n_examples"] == 100 and data["adt_ft"]["attacks"] == ["fgsm", "pgd20"]
    assert data["eps"] == "0.1" and "autoattack_acc" not in data
    assert f"{data['adt_ft']['a_rob']:.2f}" == data["reported"]
    assert workspace.current_model().name == "tiny"
    assert not (workspace.root / ".adt-ft" / "eval" / "fashion-mnist" / "Linf" / "tiny_quick_n100").exists()

    code, out, err = cli("leaderboard", *w)
    assert code == 0, err
    assert "tiny_quick_n100" in out and data["reported"] in out
    code, out, _ = cli("leaderboard", "--format", "json", *w)
    rows = json.loads(out)
    assert rows[0]["entry"] == "tiny_quick_n100" and rows[0]["a_rob"] == data["adt_ft"]["a_rob"]


def test_cli_baseline_and_checkpoint_file(cli, workspace, tmp_path):
    from adt_finetune.models import SmallCNN
    from adt_finetune.utils import atomic_torch_save
    from adt_finetune.workspace import ModelRef

    # A finished run whose fine-tuned model is a different (random) SmallCNN(width=16).
    torch.manual_seed(1)
    tuned_path = workspace.runs_dir / "r1" / "model.pt"
    atomic_torch_save(SmallCNN(width=16).state_dict(), tuned_path)
    tuned = ModelRef(name="r1", arch="adt_finetune.models.small:SmallCNN", dataset="fashion-mnist",
                     path=str(tuned_path), source="run", arch_kwargs={"width": 16})
    meta = {"id": "r1", "status": "finished", "method": "exp-am", "loss": "ce", "scope": "full", "epochs": 1,
            "base_model": workspace.current_model().to_dict(), "model": tuned.to_dict()}
    (workspace.runs_dir / "r1" / "run.json").write_text(json.dumps(meta))
    workspace.set_latest_run("r1")

    code, out, err = cli("eval", "--attacks", "fgsm", "--n-examples", "50", "--baseline", "--no-progress",
                         "-w", workspace.root)
    assert code == 0, err
    assert "before: tiny" in out and "after: r1" in out and "change" in out
    data = json.loads((workspace.leaderboard_dir / "fashion-mnist" / "Linf" / "r1_fgsm_eps0.1_n50.json").read_text())
    extra = data["adt_ft"]
    assert extra["run_id"] == "r1" and extra["method"] == "exp-am" and extra["base_model"] == "tiny"
    assert extra["baseline"]["model"] == "tiny"
    # The trained base model is far better than the random fine-tune on clean images.
    assert extra["baseline"]["clean_acc"] > extra["clean_acc"]

    # A checkpoint file: evaluated without becoming the workspace's current model.
    ckpt = tmp_path / "plain.pt"
    atomic_torch_save(SmallCNN().state_dict(), ckpt)
    code, out, err = cli("eval", "--model", ckpt, "--arch", "adt_finetune.models.small:SmallCNN", "--dataset",
                         "fashion-mnist", "--attacks", "fgsm", "-n", "20", "--no-progress", "-w", workspace.root)
    assert code == 0, err
    assert (workspace.leaderboard_dir / "fashion-mnist" / "Linf" / "plain_fgsm_eps0.1_n20.json").exists()
    assert workspace.current_model().name == "tiny"
    code, _, err = cli("eval", "--model", ckpt, "--attacks", "fgsm", "-w", workspace.root)
    _one_line_error(code, err)
    assert "--arch" in err



def test_amp_flags_are_the_fp32_models_verdict(monkeypatch):
    """--amp: a fixed-step attack searches under autocast, but the recorded flag is what the fp32
    model says about the returned x' — not the attack's own (reduced-precision) claim."""
    y = torch.arange(N) % 10
    model = TableModel(y)                        # right on every image, perturbed or not
    x = encode(N)
    seen: list[bool] = []
    make_fake(monkeypatch, "liar", {i: False for i in range(N)}, amp_search=True, autocast_seen=seen)
    plain = evaluate(model, x, y, attacks=["liar"], eps=EPS)
    amp = evaluate(model, x, y, attacks=["liar"], eps=EPS, amp=True)
    assert seen and not seen[0] and all(seen[1:])  # plain run without autocast, --amp run under it
    assert plain.per_attack["liar"] == 0.0       # without --amp the attack's verdict stands
    assert amp.per_attack["liar"] == 100.0 and amp.a_rob == 100.0
    assert amp.to_json()["amp"] is True and amp.to_json()["amp_attacks"] == ["liar"]


def test_amp_keeps_attacks_that_decide_from_logits_in_fp32(monkeypatch):
    """An attack that stops early or picks among samples (feature, spsa, exp, autoattack) would
    decide from bf16 logits and then be re-judged on one point only: it must not run under autocast."""
    from adt_finetune.attacks import ATTACKS as registry

    assert [n for n in ("fgsm", "pgd20", "pgd100", "mim", "cw") if not registry[n].amp_search] == []
    assert [n for n in ("feature", "spsa", "exp", "autoattack", "exp-am", "imp-am") if registry[n].amp_search] == []
    y = torch.arange(N) % 10
    seen: list[bool] = []
    make_fake(monkeypatch, "stopper", {i: i % 2 == 0 for i in range(N)}, autocast_seen=seen)
    res = evaluate(TableModel(y), encode(N), y, attacks=["stopper"], eps=EPS, amp=True)
    assert seen and not any(seen)
    assert res.per_attack["stopper"] == 50.0     # its own verdict, made in fp32
    assert res.to_json()["amp_attacks"] == []


def test_amp_search_agrees_with_fp32(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:150], fmnist_test[1][:150]
    fp32 = evaluate(trained_cnn, x, y, attacks=["fgsm", "pgd20"], eps=0.1)
    amp = evaluate(trained_cnn, x, y, attacks=["fgsm", "pgd20"], eps=0.1, amp=True)
    assert amp.clean_acc == fp32.clean_acc
    for name in ("fgsm", "pgd20"):  # bf16 rounding may flip a few borderline examples, no more
        assert abs(amp.per_attack[name] - fp32.per_attack[name]) <= 4.0, (name, amp.per_attack, fp32.per_attack)


@pytest.mark.slow
def test_cli_eval_real_cifar10_checkpoint_on_an_image_folder_with_autoattack(cli, tmp_path, image_folder,
                                                                            pyautoattack_checkpoint):
    """`adt-ft eval --model model_test.pt --arch pyautoattack.examples.resnet:ResNet18 --dataset FOLDER
    --suite aa`: pyautoattack's shipped (not robust) CIFAR-10 ResNet-18 on real CIFAR-10 test images."""
    from adt_finetune.data import CIFAR10_CLASSES

    ckpt = pyautoattack_checkpoint
    folder, labels = image_folder(tmp_path / "cifar10-images", CIFAR10_CLASSES)
    ws = tmp_path / "ws"
    code, out, err = cli("eval", "--model", ckpt, "--arch", "pyautoattack.examples.resnet:ResNet18",
                         "--dataset", folder, "--suite", "aa", "-n", "3", "--no-progress", "-w", ws)
    assert code == 0, err
    (entry,) = (ws / "leaderboard" / "cifar10" / "Linf").glob("*.json")
    data = json.loads(entry.read_text())
    x = data["adt_ft"]
    assert data["dataset"] == "cifar10" and data["eps"] == "8/255" and x["n_examples"] == 3
    assert x["attacks"] == ["autoattack"]
    clean, aa = float(data["clean_acc"]), float(data["autoattack_acc"])
    assert clean >= 50.0, f"a real CIFAR-10 classifier on real CIFAR-10 images: clean {clean}%"
    # A standard (not adversarially trained) ResNet-18 falls to AutoAttack at 8/255.
    assert aa < clean and aa <= 20.0, (clean, aa)
    assert x["a_rob"] == aa and "autoattack" in out


def test_amp_without_bf16_is_refused(monkeypatch):
    """fp16 attack gradients underflow without loss scaling (a stalled attack reports too high a
    number), so --amp on a device without bf16 is one clear error, not a silent fp16 search."""
    import adt_finetune.evaluation.engine as ev

    monkeypatch.setattr(ev, "amp_dtype_name", lambda device, amp: "fp16" if amp else "fp32")
    y = torch.arange(N) % 10
    make_fake(monkeypatch, "any", {i: True for i in range(N)})
    with pytest.raises(UserError, match="bf16"):
        evaluate(TableModel(y), encode(N), y, attacks=["any"], eps=EPS, amp=True)
    assert evaluate(TableModel(y), encode(N), y, attacks=["any"], eps=EPS).a_rob == 100.0


def test_resumed_evaluation_keeps_what_prepare_resolved(monkeypatch, trained_cnn, fmnist_test, tmp_path):
    """Settings an attack resolves in `prepare` (the feature attack's tap and target pool) are recorded
    even when the attack had finished before the interruption and is not prepared again on --resume."""
    x, y = fmnist_test[0][:16], fmnist_test[1][:16]
    make_fake(monkeypatch, "crash", {i: True for i in range(16)}, fail_on_call=0)
    resume = tmp_path / "partial"
    settings = {"feature": {"targets": "2", "steps": "2", "pool": "20"}}
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(trained_cnn, x, y, attacks=["feature", "crash"], eps=EPS, resume_dir=resume,
                 attack_settings=settings)
    make_fake(monkeypatch, "crash", {i: True for i in range(16)})
    result = evaluate(trained_cnn, x, y, attacks=["feature", "crash"], eps=EPS, resume_dir=resume,
                      attack_settings=settings)
    assert result.attack_settings["feature"]["tap"] is not None
    assert result.attack_settings["feature"]["target_pool"] is not None
