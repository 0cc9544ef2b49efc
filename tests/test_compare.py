"""`adt-ft compare`: paired statistics between entries on the same images, against hand-computed answers."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from adt_finetune import leaderboard as lb
from adt_finetune.errors import UserError
from adt_finetune.evaluation import EvalResult
from adt_finetune.leaderboard.compare import bootstrap_interval, compare_entries, mcnemar_exact

REPO = Path(__file__).resolve().parent.parent
STUDY = REPO / "leaderboard" / "fashion-mnist" / "Linf"  # committed entries: read, never written


def result(robust, *, clean=None, eps=0.1, indices=None, labels=None, attacks=("fgsm",)):
    """An independent-mode EvalResult whose every attack column is `robust` (so A_rob is its mean)."""
    robust = np.asarray(robust, dtype=bool)
    n = len(robust)
    clean = np.ones(n, dtype=bool) if clean is None else np.asarray(clean, dtype=bool)
    flags = np.repeat((robust & clean)[:, None], len(attacks), axis=1).astype(np.int8)
    return EvalResult(attacks=list(attacks), indices=np.arange(n) if indices is None else np.asarray(indices),
                      labels=np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels),
                      clean=clean, flags=flags, eps=eps, mode="independent", seed=0, batch_size=8, device="cpu")


def write(root, name, res, **context):
    return lb.write_entry(res, root=root, dataset="fashion-mnist", entry=name, context=context or None)


def mcnemar_by_hand(b: int, c: int) -> float:
    """Two-sided exact McNemar: 2·P(Binom(b + c, 1/2) ≤ min(b, c)), at most 1."""
    n, k = b + c, min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


# 40 images: robust for A only on 10, for B only on 2, for both on 8, for neither on 20.
A_ROBUST = [1] * 10 + [0] * 2 + [1] * 8 + [0] * 20
B_ROBUST = [0] * 10 + [1] * 2 + [1] * 8 + [0] * 20


def test_mcnemar_exact_matches_the_binomial_tail_by_hand():
    assert mcnemar_by_hand(10, 2) == pytest.approx(158 / 4096)
    assert mcnemar_exact(10, 2) == pytest.approx(0.0386, abs=5e-5)
    for b, c in ((10, 2), (2, 10), (29, 2), (5, 5), (0, 7), (1, 0), (40, 25)):
        assert mcnemar_exact(b, c) == pytest.approx(mcnemar_by_hand(b, c), rel=1e-9), (b, c)
    assert mcnemar_exact(0, 0) == 1.0


def test_bootstrap_interval_contains_the_difference_and_narrows_with_n():
    d = np.array([-1] * 30 + [1] * 20 + [0] * 150, dtype=float)  # observed mean −0.05
    lo, hi = bootstrap_interval(d, n_resamples=20_000, seed=0)
    assert lo < d.mean() < hi
    assert bootstrap_interval(d, n_resamples=20_000, seed=0) == (lo, hi)  # seeded
    lo16, hi16 = bootstrap_interval(np.tile(d, 16), n_resamples=20_000, seed=0)
    assert lo16 < d.mean() < hi16
    assert 0.15 < (hi16 - lo16) / (hi - lo) < 0.35  # ~1/sqrt(16)

    # The multinomial shortcut is the same distribution as resampling example indices.
    rng = np.random.default_rng(1)
    naive = d[rng.integers(0, len(d), size=(20_000, len(d)))].mean(axis=1)
    assert np.quantile(naive, [0.025, 0.975]) == pytest.approx([lo, hi], abs=0.0051)


def test_compare_two_entries_by_hand(tmp_path):
    root = tmp_path / "leaderboard"
    a = lb.read_entry(write(root, "a", result(A_ROBUST)))
    b = lb.read_entry(write(root, "b", result(B_ROBUST)))
    (comp,) = compare_entries([a, b], n_resamples=5000)
    assert [c.column for c in comp.columns] == ["clean", "fgsm", "A_rob"]
    rob = comp.columns[-1]
    assert (rob.a.mean, rob.b.mean) == (pytest.approx(45.0), pytest.approx(25.0))
    assert rob.diff == pytest.approx(-20.0) and (rob.a_only, rob.b_only) == (10, 2)
    assert rob.p_value == pytest.approx(mcnemar_by_hand(10, 2))
    assert rob.ci[0] < -20.0 < rob.ci[1] and rob.ci[1] < 0
    clean = comp.columns[0]
    assert clean.diff == 0 and clean.p_value == 1.0 and clean.ci == (0.0, 0.0)
    out = json.loads(lb_render(comp, "json"))
    assert out[0]["control"] == "a" and out[0]["columns"][2]["a_only"] == 10


def lb_render(comp, fmt):
    from adt_finetune.leaderboard.compare import render_comparisons

    return render_comparisons([comp], fmt)


def test_refuses_entries_on_different_images(tmp_path):
    root = tmp_path / "leaderboard"
    base = lb.read_entry(write(root, "base", result(A_ROBUST)))
    others = {
        "fewer": result(A_ROBUST[:20]),
        "shifted": result(A_ROBUST, indices=np.arange(40) + 100),
        "relabelled": result(A_ROBUST, labels=np.arange(40) % 10),
        "wider": result(A_ROBUST, eps=8 / 255),
    }
    for name, res in others.items():
        other = lb.read_entry(write(root, name, res))
        with pytest.raises(UserError, match="same images|different ε") as e:
            compare_entries([base, other])
        assert "\n" not in str(e.value)
    # The same images in another order are the same images.
    order = np.arange(40)[::-1]
    rev = lb.read_entry(write(root, "reversed", result(np.asarray(B_ROBUST)[order], indices=order)))
    (comp,) = compare_entries([base, rev], n_resamples=200)
    assert (comp.columns[-1].a_only, comp.columns[-1].b_only) == (10, 2)


def test_per_example_file_is_verified_before_use(tmp_path):
    root = tmp_path / "leaderboard"
    a = lb.read_entry(write(root, "a", result(A_ROBUST)))
    b_path = write(root, "b", result(B_ROBUST))
    csv = b_path.with_name("b.per-example.csv")
    csv.write_text(csv.read_text().replace("\n11,0,1,1,1,\n", "\n11,0,1,0,0,clean\n"))
    with pytest.raises(UserError, match="does not match the sha256"):
        compare_entries([a, lb.read_entry(b_path)])


def test_seed_groups_mean_and_sd(tmp_path):
    root = tmp_path / "leaderboard"
    ctx = dict(base_model="m", loss="ce", scope="full", epochs=2, suite="quick")
    entries = [
        lb.read_entry(write(root, "pgd-s0", result(A_ROBUST), method="pgd-at", train_seed=0, **ctx)),
        lb.read_entry(write(root, "exp-s0", result(B_ROBUST), method="exp", train_seed=0, **ctx)),
        lb.read_entry(write(root, "pgd-s1", result(B_ROBUST), method="pgd-at", train_seed=1, **ctx)),
        lb.read_entry(write(root, "exp-s1", result(B_ROBUST), method="exp", train_seed=1, **ctx)),
    ]
    (comp,) = compare_entries(entries, group_seeds=True, n_resamples=2000)
    assert comp.control.names == ["pgd-s0", "pgd-s1"] and comp.other.names == ["exp-s0", "exp-s1"]
    rob = comp.columns[-1]
    assert rob.a.values == [45.0, 25.0] and rob.a.mean == pytest.approx(35.0)
    assert rob.a.sd == pytest.approx(math.sqrt(2 * 10.0 ** 2))  # sample sd of 45 and 25
    assert rob.b.mean == pytest.approx(25.0) and rob.b.sd == pytest.approx(0.0)
    assert rob.diff == pytest.approx(-10.0) and rob.p_value is None
    # Means over the four seed pairs: A-only 10, 0, 10, 0 → 5; B-only 2, 0, 2, 0 → 1.
    assert (rob.a_only, rob.b_only) == (pytest.approx(5.0), pytest.approx(1.0))
    assert rob.ci[0] <= -10.0 <= rob.ci[1]
    with pytest.raises(UserError, match="one seed group"):
        compare_entries([entries[0], entries[2]], group_seeds=True)


def test_train_seed_from_the_run_when_the_entry_has_none(tmp_path):
    ws = tmp_path / "ws"
    run = ws / "runs" / "r7"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"id": "r7", "status": "finished", "seed": 7, "base_model": {
        "name": "m", "arch": "adt_finetune.models.small:SmallCNN", "dataset": "fashion-mnist"}}))
    e = lb.read_entry(write(ws / "leaderboard", "r7_quick", result(A_ROBUST), run_id="r7"))
    assert lb.group_by_seed([e], ws)[0].seeds == [7]
    assert lb.group_by_seed([e])[0].seeds == [None]  # no workspace: unknown


# ---------------------------------------------------------------- CLI

def _one_line_error(code, err):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_cli_compare_on_the_committed_study_entries(cli, tmp_path):
    pgd, exp = STUDY / "study-pgd-at-ce-full_paper.json", STUDY / "study-exp-ce-full_paper.json"
    before = {p: p.read_bytes() for p in STUDY.iterdir()}
    code, out, err = cli("compare", pgd, exp, "--json", "-w", tmp_path)
    assert code == 0, err
    (comp,) = json.loads(out)
    assert comp["control"] == "study-pgd-at-ce-full_paper" and comp["n"] == 1000 and comp["eps"] == "0.1"
    cols = {c["column"]: c for c in comp["columns"]}
    assert list(cols) == ["clean", "fgsm", "pgd20", "pgd100", "mim", "cw", "feature", "autoattack", "A_rob"]
    pgd_data, exp_data = (json.loads(p.read_text())["adt_ft"] for p in (pgd, exp))
    for name, c in cols.items():
        key = pgd_data["per_attack"].get(name)
        want_a = pgd_data["a_rob"] if name == "A_rob" else pgd_data["clean_acc"] if name == "clean" else key
        assert c["a"]["mean"] == pytest.approx(want_a)
        # Paired counts explain the difference exactly, and McNemar's p is the hand-computed tail.
        assert c["diff"] == pytest.approx((c["b_only"] - c["a_only"]) / 10)
        assert c["p_value"] == pytest.approx(mcnemar_by_hand(int(c["a_only"]), int(c["b_only"])), rel=1e-9)
        assert c["ci"][0] <= c["diff"] <= c["ci"][1]
    assert cols["A_rob"]["b"]["mean"] == pytest.approx(exp_data["a_rob"])

    code, out, err = cli("compare", pgd, exp, STUDY / "study-exp-am-ce-full_paper.json", "-w", tmp_path)
    assert code == 0, err
    assert out.count("vs A = study-pgd-at-ce-full_paper (control)") == 2 and "A_rob" in out and "McNemar" in out
    code, out, err = cli("compare", pgd, exp, "--markdown", "-w", tmp_path)
    assert code == 0 and out.startswith("### B = study-exp-ce-full_paper vs A = study-pgd-at-ce-full_paper")
    assert "| A_rob | 40.20 | 37.50 | -2.70 |" in out
    assert {p: p.read_bytes() for p in STUDY.iterdir()} == before  # read-only


def test_cli_compare_by_name_and_one_line_errors(cli, tmp_path):
    ws = tmp_path / "ws"
    write(ws / "leaderboard", "a", result(A_ROBUST))
    write(ws / "leaderboard", "b", result(B_ROBUST))
    write(ws / "leaderboard", "small", result(A_ROBUST[:10]))
    code, out, err = cli("compare", "a", "b", "--json", "--resamples", "500", "-w", ws)
    assert code == 0, err
    assert json.loads(out)[0]["columns"][-1]["p_value"] == pytest.approx(mcnemar_by_hand(10, 2))

    for args, words in ((["a", "nope"], "no leaderboard entry 'nope'"), (["a", "small"], "same images"),
                        (["a"], "at least two"), (["a", "b", "--json", "--markdown"], "exclude"),
                        (["a", str(tmp_path / "missing.json")], "no leaderboard entry file")):
        code, _, err = cli("compare", *args, "-w", ws)
        _one_line_error(code, err)
        assert words in err, err

    # The same name in two datasets is ambiguous: a path picks one.
    other = ws / "leaderboard" / "cifar10" / "Linf"
    other.mkdir(parents=True)
    for f in (ws / "leaderboard" / "fashion-mnist" / "Linf").glob("b.*"):
        shutil.copy(f, other / f.name)
    code, _, err = cli("compare", "a", "b", "-w", ws)
    _one_line_error(code, err)
    assert "more than once" in err


# ---------------------------------------------------------------- coupled columns and Holm (issue 24)

ROBUST_BASE = REPO / "leaderboard" / "robust-base"  # committed entries: read, never written


def test_holm_adjustment_by_hand_and_against_statsmodels():
    from statsmodels.stats.multitest import multipletests

    from adt_finetune.leaderboard.compare import holm_adjust

    # By hand: sorted 0.01, 0.03, 0.04 times 3, 2, 1 = 0.03, 0.06, 0.04, then made non-decreasing: 0.06.
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjust([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    ps = [0.0386, 0.2, 0.001, 0.049, 0.7, 0.012]
    assert holm_adjust(ps) == pytest.approx(list(multipletests(ps, method="holm")[1]), rel=1e-12)
    assert holm_adjust([]) == []


def test_a_table_of_several_entries_is_holm_adjusted_as_one_family(tmp_path):
    from statsmodels.stats.multitest import multipletests

    root = tmp_path / "leaderboard"
    rng = np.random.default_rng(3)
    entries = [lb.read_entry(write(root, "control", result(A_ROBUST)))]
    for k in range(3):
        flips = rng.random(40) < 0.2 * (k + 1)
        entries.append(lb.read_entry(write(root, f"b{k}", result(np.asarray(A_ROBUST, bool) ^ flips))))
    comps = compare_entries(entries, n_resamples=200)
    cols = [c for comp in comps for c in comp.columns if c.p_value is not None]
    assert len(cols) == 3 * 3  # clean, fgsm, A_rob for each of three entries
    expected = multipletests([c.p_value for c in cols], method="holm")[1]
    assert [c.p_adjusted for c in cols] == pytest.approx(list(expected), rel=1e-12)
    assert any(c.p_adjusted > c.p_value for c in cols)  # the correction did something
    text = lb_render_all(comps, "table")
    assert "Holm p" in text and "Holm's step-down method over the 9 tests" in text
    out = json.loads(lb_render_all(comps, "json"))
    assert out[0]["correction"] == "holm" and out[0]["columns"][-1]["p_adjusted"] == pytest.approx(cols[2].p_adjusted)


def lb_render_all(comps, fmt):
    from adt_finetune.leaderboard.compare import render_comparisons

    return render_comparisons(comps, fmt)


def test_wpgd_columns_get_the_difference_without_per_example_statistics(tmp_path):
    root = tmp_path / "leaderboard"
    attacks = ("wpgd@0.1", "pgd20@0.1")
    a = lb.read_entry(write(root, "a", result(A_ROBUST, attacks=attacks)))
    b = lb.read_entry(write(root, "b", result(B_ROBUST, attacks=attacks)))
    (comp,) = compare_entries([a, b], n_resamples=500)
    cols = {c.column: c for c in comp.columns}
    w, p = cols["wpgd@0.1"], cols["pgd20@0.1"]
    assert w.diff == pytest.approx(-20.0) and w.p_value is None and w.ci is None and w.p_adjusted is None
    assert p.p_value == pytest.approx(mcnemar_by_hand(10, 2)) and p.ci is not None  # pointwise: tested
    text = lb_render(comp, "table")
    row = next(line for line in text.splitlines() if "wpgd@0.1" in line)
    assert "n/a (coupled)" in row and "0.0386" not in row and "-20.00" in row
    assert "independent outcomes" in text
    # Only the tested columns form the Holm family: the W-PGD column is not in it.
    assert "over the 3 tests" in text


def test_cli_compare_on_committed_wasserstein_entries_prints_no_wpgd_p_value(cli, tmp_path):
    control = ROBUST_BASE / "robust-pgd-at-ce-full-s0_w.json"
    other = ROBUST_BASE / "robust-trades-trades-full-s0_w.json"
    code, out, err = cli("compare", control, other, "--json", "-w", tmp_path)
    assert code == 0, err
    cols = {c["column"]: c for c in json.loads(out)[0]["columns"]}
    assert {"wpgd@0.05", "wpgd@0.1", "pgd20@0.1"} <= set(cols)
    for name in ("wpgd@0.05", "wpgd@0.1"):
        assert cols[name]["p_value"] is None and cols[name]["ci"] is None and cols[name]["coupled"]
    assert cols["pgd20@0.1"]["p_value"] is not None and cols["pgd20@0.1"]["p_adjusted"] >= cols["pgd20@0.1"]["p_value"]
    code, out, err = cli("compare", control, other, "-w", tmp_path)
    assert code == 0, err
    for line in out.splitlines():
        if "wpgd@" in line:
            assert "n/a (coupled)" in line
