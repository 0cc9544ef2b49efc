"""Leaderboard JSON: RobustBench's fields and types (checked with RobustBench's own code), rendering, plots."""
from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from adt_finetune import leaderboard as lb
from adt_finetune.errors import UserError
from adt_finetune.evaluation import EvalResult, SanityCheck

PCT = re.compile(r"^\d{1,3}\.\d\d$")
# RobustBench model_info types (its template's example and its published files):
# percentages and eps are strings, flags bools, the pass count an int.
RB_TYPES = {"link": str, "name": str, "authors": str, "additional_data": bool, "number_forward_passes": int,
            "dataset": str, "venue": str, "architecture": str, "eps": str, "clean_acc": str, "reported": str,
            "autoattack_acc": str, "external": str, "footnote": (str, type(None)), "unreliable": bool}


def result(attacks, flags, clean, *, mode="independent", eps=8 / 255, sanity=()):
    flags = np.asarray(flags, dtype=np.int8).reshape(len(clean), len(attacks))
    n = len(clean)
    return EvalResult(attacks=list(attacks), indices=np.arange(n), labels=np.zeros(n, dtype=np.int64),
                      clean=np.asarray(clean, dtype=bool), flags=flags, eps=eps, mode=mode, seed=0, batch_size=8,
                      device="cpu", sanity=list(sanity))


# 4 examples; the 4th is a clean error. fgsm breaks #0, autoattack breaks #0 and #1.
CLEAN = [1, 1, 1, 0]
PAPERISH = result(["fgsm", "autoattack"], [[0, 0], [1, 0], [1, 1], [0, 0]], CLEAN)


def write(tmp_path, res, entry="e1", **kw):
    kw.setdefault("info", {"name": "fine-tune of Zhang2019Theoretically", "architecture": "WideResNet-34-10"})
    kw.setdefault("context", {"base_model": "Zhang2019Theoretically", "method": "exp-am", "suite": "paper"})
    return lb.write_entry(res, root=tmp_path / "leaderboard", dataset="cifar10", entry=entry, **kw)


def test_entry_has_robustbench_fields_with_robustbench_types(tmp_path):
    from adt_finetune.zoo.robustbench_compat import import_robustbench

    import_robustbench()
    from robustbench.leaderboard.template import generate_leaderboard

    # The type table above agrees with the example in RobustBench's own template docstring.
    doc = generate_leaderboard.__doc__
    example = json.loads(doc[doc.index("{"):doc.index("}") + 1])
    for key, value in example.items():
        assert isinstance(value, RB_TYPES[key]), key

    path = write(tmp_path, PAPERISH)
    data = json.loads(path.read_text())
    assert path == tmp_path / "leaderboard" / "cifar10" / "Linf" / "e1.json"
    for key, value in data.items():
        if key != "adt_ft":
            assert key in RB_TYPES and isinstance(value, RB_TYPES[key]), key
    assert set(example) <= set(data)
    assert data["eps"] == "8/255" and data["dataset"] == "cifar10"
    for key in ("clean_acc", "reported", "autoattack_acc", "external"):
        assert PCT.match(data[key]), (key, data[key])
    assert (data["clean_acc"], data["autoattack_acc"], data["external"]) == ("75.00", "25.00", "25.00")
    assert data["unreliable"] is False

    extra = data["adt_ft"]
    for key in ("base_model", "method", "loss", "scope", "epochs", "recipe", "run_id", "suite", "mode",
                "n_examples", "seed", "eps", "per_attack", "a_rob", "per_example_file", "per_example_sha256",
                "timings_s", "versions", "device", "created", "sanity"):
        assert key in extra, key
    assert extra["per_attack"] == {"fgsm": 50.0, "autoattack": 25.0} and extra["a_rob"] == 25.0
    csv = path.with_name(extra["per_example_file"])
    assert csv.name == "e1.per-example.csv"
    assert extra["per_example_sha256"] == hashlib.sha256(csv.read_bytes()).hexdigest()
    assert "torch" in extra["versions"]


def test_autoattack_acc_only_when_autoattack_ran_on_every_example(tmp_path):
    quick = result(["fgsm", "pgd20"], [[0, 0], [1, 1], [1, 0], [0, 0]], CLEAN)
    data = json.loads(write(tmp_path, quick, "quick").read_text())
    assert "autoattack_acc" not in data and "external" not in data
    assert data["reported"] == "25.00"

    # Cascade with AutoAttack last: its column is cumulative, not AutoAttack's accuracy.
    late = result(["fgsm", "autoattack"], [[0, -1], [1, 0], [1, 1], [0, 0]], CLEAN, mode="cascade")
    data = json.loads(write(tmp_path, late, "late").read_text())
    assert "autoattack_acc" not in data and data["external"] == "25.00"

    first = result(["autoattack", "fgsm"], [[0, -1], [0, -1], [1, 1], [0, 0]], CLEAN, mode="cascade")
    data = json.loads(write(tmp_path, first, "first").read_text())
    assert data["autoattack_acc"] == "25.00"

    aa_only = result(["autoattack"], [[0], [0], [1], [0]], CLEAN)
    data = json.loads(write(tmp_path, aa_only, "aa").read_text())
    assert data["autoattack_acc"] == "25.00" and "external" not in data


def test_failed_sanity_check_marks_entry_unreliable(tmp_path):
    bad = result(["fgsm"], [[0], [1], [1], [0]], CLEAN,
                 sanity=[SanityCheck("linf", False, "max ‖x'−x‖∞ = 0.2 (fgsm) > ε = 0.03")])
    data = json.loads(write(tmp_path, bad, "bad").read_text())
    assert data["unreliable"] is True and "Sanity check failed" in data["footnote"]


def test_robustbench_code_reads_our_folder(tmp_path, monkeypatch):
    """RobustBench's leaderboard generator and LaTeX table run on our files.

    The PyPI wheel of RobustBench 1.1.1 lacks the HTML template its generator
    loads, so the loader is given a minimal template over the same fields.
    """
    from jinja2 import DictLoader

    from adt_finetune.zoo.robustbench_compat import import_robustbench

    import_robustbench()
    import robustbench.leaderboard.template as tpl
    import robustbench.utils as rb_utils

    root = tmp_path / "model_info"
    better = result(["fgsm", "autoattack"], [[1, 1], [1, 1], [1, 0], [0, 0]], CLEAN)
    for name, res in (("worse", PAPERISH), ("better", better)):
        lb.write_entry(res, root=root, dataset="cifar10", entry=name, info={"name": name, "architecture": "WRN"})
    # RobustBench reads every *.json of the folder: the per-example CSVs beside them must not disturb it.
    assert (root / "cifar10" / "Linf" / "worse.per-example.csv").exists()

    template = ("{% for model in models %}{{ loop.index }}|{{ model.name }}|{{ model.link }}|{{ model.clean_acc }}|"
                "{{ model[acc_field] }}|{{ model.additional_data }}|{{ model.architecture }}|{{ model.venue }}|"
                "{{ model.footnote }}\n{% endfor %}")
    monkeypatch.setattr(tpl, "PackageLoader", lambda *a, **k: DictLoader({"leaderboard.html.j2": template}))
    html = tpl.generate_leaderboard("cifar10", "Linf", str(root))
    lines = html.strip().splitlines()
    assert [line.split("|")[1] for line in lines] == ["better", "worse"]
    assert lines[0].split("|")[3:5] == ["75.00", "50.00"]

    monkeypatch.chdir(tmp_path)
    latex = rb_utils.get_leaderboard_latex("cifar10", "Linf")
    assert latex.index("better") < latex.index("worse")


def mixed_workspace(root):
    """Entries on the same 4 images at ε = 8/255: two with AutoAttack standard (AA 50 and 25), and two
    weaker evaluations with a higher A_rob (FGSM + PGD-20 only; AutoAttack `plus` is not standard); and
    two RobustBench files of their own (no n), ranked by their AutoAttack accuracy among their own kind."""
    fast = result(["fgsm", "pgd20"], [[1, 1], [1, 1], [1, 1], [0, 0]], CLEAN)                 # A_rob 75, no AA
    top = result(["autoattack"], [[1], [1], [0], [0]], CLEAN)                                  # AA 50
    low = result(["fgsm", "autoattack"], [[1, 1], [0, 0], [1, 0], [0, 0]], CLEAN)              # AA 25
    cascade = result(["fgsm", "pgd20"], [[1, 1], [1, 0], [1, -1], [0, 0]], CLEAN, mode="cascade")  # A_rob 25
    plus = result(["autoattack"], [[1], [1], [1], [0]], CLEAN)                                 # AA 75, but plus
    for name, res in (("fast", fast), ("top", top), ("low", low), ("cascade", cascade), ("plus", plus)):
        lb.write_entry(res, root=root, dataset="fashion-mnist", entry=name, context={"method": "exp", "base_model": "b"})
    path = root / "fashion-mnist" / "Linf" / "plus.json"
    data = json.loads(path.read_text())
    data["adt_ft"]["attack_settings"] = {"autoattack": {"version": "plus", "attacks": None}}
    path.write_text(json.dumps(data))
    (root / "fashion-mnist" / "Linf" / "Someone2020.json").write_text(json.dumps(
        {"name": "x", "eps": "8/255", "clean_acc": "90.00", "autoattack_acc": "60.00"}))
    (root / "fashion-mnist" / "Linf" / "Other2019.json").write_text(json.dumps(
        {"name": "y", "eps": "8/255", "clean_acc": "80.00", "autoattack_acc": "70.00", "external": "65.00"}))
    return lb.read_entries(root, "fashion-mnist", "Linf")


MIXED_ORDER = ["top", "low", "fast", "plus", "cascade", "Other2019", "Someone2020"]


def test_only_autoattack_standard_entries_are_ranked_in_every_format(tmp_path):
    entries = mixed_workspace(tmp_path / "leaderboard")
    assert [e.entry for e in lb.sort_entries(entries)] == MIXED_ORDER
    groups = lb.comparable_groups(entries)
    assert [([e.entry for e in g.entries], g.ranked) for g in groups] == \
        [(["top", "low"], True), (["fast", "plus", "cascade"], False), (["Other2019", "Someone2020"], True)]

    text = lb.render(entries, "table")
    assert [text.index(n) for n in MIXED_ORDER] == sorted(text.index(n) for n in MIXED_ORDER)
    assert "ε = 8/255, n = 4: 2 entries\n" in text and "ε = 8/255, n = ?: 2 entries" in text
    weaker = "ε = 8/255, n = 4: 3 entries, not ranked, weaker evaluations (no AutoAttack standard)"
    assert weaker in text
    assert text.index("top") < text.index(weaker) < text.index("fast")
    assert text.rstrip().endswith(lb.RANKING_NOTE) and "ranked by AutoAttack (standard)" in lb.RANKING_NOTE

    md = lb.render(entries, "markdown").splitlines()
    assert md[0] == "### fashion-mnist / Linf, ε = 8/255, n = 4: 2 entries"
    assert md[2].startswith("| entry | base model | method | ε | n | clean | AutoAttack | A_rob | fgsm | pgd20 |")
    assert md[4].startswith("| top ° | b | exp | 8/255 | 4 | 75.00 | 50.00 | 50.00 |")
    assert "° no audit recorded" in lb.render(entries, "markdown")  # none of these entries was audited
    assert f"### fashion-mnist / Linf, {weaker}" in md
    fast_row = md.index(f"### fashion-mnist / Linf, {weaker}") + 4
    assert md[fast_row].startswith("| fast ° | b | exp | 8/255 | 4 | 75.00 | — | 75.00 | 75.00 | 75.00 |")
    assert any("25.00*" in line for line in md)  # cascade columns are cumulative and say so
    assert md[-1] == lb.RANKING_NOTE

    rows = json.loads(lb.render(entries, "json"))
    assert [r["entry"] for r in rows] == MIXED_ORDER
    assert [(r["ranked"], r["rank_in_group"]) for r in rows] == \
        [(True, 1), (True, 2), (False, None), (False, None), (False, None), (True, 1), (True, 2)]
    assert rows[0]["group"] == "fashion-mnist / Linf, ε = 8/255, n = 4"
    assert rows[0]["autoattack"] == 50.0 and rows[2]["a_rob"] == 75.0 and rows[5]["robust"] == 65.0

    # Seed groups follow the same rule; only the same evaluation (attack set) makes a group.
    groups_json = json.loads(lb.render_groups(lb.group_by_seed(entries), "json"))
    assert [(g["members"], g["rank_in_group"]) for g in groups_json] == \
        [(["top"], 1), (["low"], 2), (["plus"], None), (["cascade", "fast"], None),
         (["Other2019"], 1), (["Someone2020"], 2)]
    grouped = lb.render_groups(lb.group_by_seed(entries), "markdown")
    assert "n = 4: 2 groups, not ranked, weaker evaluations" in grouped and lb.RANKING_NOTE in grouped


def test_render_reads_robustbench_files(tmp_path):
    root = tmp_path / "leaderboard"
    entries = mixed_workspace(root)
    assert lb.read_entries(root, "cifar10") == []
    with pytest.raises(UserError, match="choose from"):
        lb.render(entries, "html")
    (root / "fashion-mnist" / "Linf" / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="broken.json"):
        lb.read_entries(root)


def test_entries_at_different_eps_or_n_are_never_ranked_together(tmp_path):
    """An ε = 8/255 entry on 4 images must not top ε = 0.1 entries on 8 (or 4) images."""
    root = tmp_path / "leaderboard"
    all_robust = result(["autoattack"], [[1], [1], [1], [1]], [1, 1, 1, 1], eps=8 / 255)          # A_rob 100, n 4
    half = result(["autoattack"], [[1], [1], [0], [0]] * 2, [1] * 8, eps=0.1)                    # A_rob 50, n 8
    quarter = result(["autoattack"], [[1], [0], [0], [0]] * 2, [1] * 8, eps=0.1)                 # A_rob 25, n 8
    small = result(["autoattack"], [[1], [1], [1], [0]], [1, 1, 1, 1], eps=0.1)                  # A_rob 75, n 4
    for name, res in (("tiny-eps", all_robust), ("half", half), ("quarter", quarter), ("small-n", small)):
        lb.write_entry(res, root=root, dataset="fashion-mnist", entry=name)
    entries = lb.read_entries(root)
    groups = lb.comparable_groups(entries)
    assert [[e.entry for e in g.entries] for g in groups] == [["tiny-eps"], ["half", "quarter"], ["small-n"]]
    assert [g.title for g in groups] == ["fashion-mnist / Linf, ε = 8/255, n = 4",
                                         "fashion-mnist / Linf, ε = 0.1, n = 8", "fashion-mnist / Linf, ε = 0.1, n = 4"]
    rows = json.loads(lb.render(entries, "json"))
    assert {r["entry"]: r["rank_in_group"] for r in rows} == {"tiny-eps": 1, "half": 1, "quarter": 2, "small-n": 1}
    md = lb.render(entries, "markdown")
    assert md.count("### ") == 3 and "| half ° |  |  | 0.1 | 8 | 100.00 |" in md


def test_entry_names_are_plain_file_names(tmp_path):
    for bad in ("../up", "a/b", "", ".hidden", "x.json"):
        with pytest.raises(UserError):
            write(tmp_path, PAPERISH, bad)


def test_plot_writes_an_image(tmp_path):
    root = tmp_path / "leaderboard"
    write(tmp_path, PAPERISH, "one")
    out = lb.plot(lb.read_entries(root), tmp_path / "board.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- interrupted writes, verification, bad input

def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _interrupt_replace(monkeypatch, suffix):
    """Make the rename onto a file ending in `suffix` fail like a kill at that moment."""
    import os

    real = os.replace

    def replace(src, dst, *a, **k):
        if str(dst).endswith(suffix):
            raise KeyboardInterrupt("killed")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)


SECOND = result(["fgsm", "autoattack"], [[1, 1], [1, 1], [1, 0], [0, 0]], CLEAN)  # differs from PAPERISH


def test_write_killed_before_the_json_keeps_the_old_json_and_csv_together(tmp_path, monkeypatch):
    path = write(tmp_path, PAPERISH, "e1")
    csv = path.with_name("e1.per-example.csv")
    with monkeypatch.context() as m:
        _interrupt_replace(m, ".json")
        with pytest.raises(KeyboardInterrupt):
            write(tmp_path, SECOND, "e1")
    data = json.loads(path.read_text())
    assert data["adt_ft"]["per_example_sha256"] == _sha(csv)
    assert csv.read_text() == PAPERISH.csv_text() and data["adt_ft"]["a_rob"] == PAPERISH.a_rob
    entries = lb.read_entries(tmp_path / "leaderboard")
    assert lb.verify_entries(entries) == [] and entries[0].verified is True

    # The next write of that entry cleans up the orphaned staged file and lands whole.
    write(tmp_path, SECOND, "e1")
    data = json.loads(path.read_text())
    assert data["adt_ft"]["per_example_sha256"] == _sha(csv) and csv.read_text() == SECOND.csv_text()
    assert not list(path.parent.glob(".*"))


def test_write_killed_after_the_json_is_finished_by_the_reader(tmp_path, monkeypatch):
    path = write(tmp_path, PAPERISH, "e1", baseline=PAPERISH, baseline_label="base")
    with monkeypatch.context() as m:
        _interrupt_replace(m, ".per-example.csv")
        with pytest.raises(KeyboardInterrupt):
            write(tmp_path, SECOND, "e1", baseline=SECOND, baseline_label="base")
    csv = path.with_name("e1.per-example.csv")
    data = json.loads(path.read_text())
    assert data["adt_ft"]["a_rob"] == SECOND.a_rob and csv.read_text() == PAPERISH.csv_text()  # new JSON, old CSV
    (entry,) = lb.read_entries(tmp_path / "leaderboard")
    check = lb.check_per_example(entry)
    assert check.problem is None and check.path == csv
    assert csv.read_text() == SECOND.csv_text() and _sha(csv) == data["adt_ft"]["per_example_sha256"]
    assert lb.verify_entries([entry]) == []  # the baseline file too
    base = path.with_name("e1.baseline.per-example.csv")
    assert _sha(base) == data["adt_ft"]["baseline"]["per_example_sha256"]
    assert not list(path.parent.glob(".*"))


def test_leaderboard_warns_once_per_entry_whose_csv_does_not_match(tmp_path, cli):
    ws = tmp_path / "ws"
    for name in ("good", "bad", "gone"):
        write(ws, PAPERISH, name)
    folder = ws / "leaderboard" / "cifar10" / "Linf"
    (folder / "bad.per-example.csv").write_text(SECOND.csv_text())  # e.g. an old interrupted write
    (folder / "gone.per-example.csv").unlink()
    code, out, err = cli("leaderboard", "-w", ws)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "entry bad " in warnings[0] and "does not match" in warnings[0]
    assert "entry gone " in warnings[1] and "missing" in warnings[1]
    assert "bad !" in out and "good !" not in out
    code, out, err = cli("leaderboard", "-w", ws, "--format", "json")
    assert {r["entry"]: r["per_example_ok"] for r in json.loads(out)} == {"good": True, "bad": False, "gone": False}


def _one_line_error(code, err):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("field,value", [
    ("adt_ft.a_rob", [1]), ("adt_ft.per_attack", [50]), ("adt_ft.attacks", 3), ("adt_ft", "x"),
    ("clean_acc", {"v": 1}), ("adt_ft.n_examples", "1000"), ("adt_ft.per_example_file", "../../x.csv"),
    ("unreliable", "no"),
])
def test_entry_with_wrong_field_types_is_one_line(tmp_path, cli, field, value):
    ws = tmp_path / "ws"
    path = write(ws, PAPERISH, "e1")
    data = json.loads(path.read_text())
    *parents, key = field.split(".")
    target = data
    for p in parents:
        target = target[p]
    target[key] = value
    path.write_text(json.dumps(data))
    code, _, err = cli("leaderboard", "-w", ws)
    _one_line_error(code, err)
    assert "e1.json" in err and key in err


def test_plot_with_unknown_type_and_leaderboard_file_are_one_line(tmp_path, cli):
    ws = tmp_path / "ws"
    write(ws, PAPERISH, "e1")
    code, out, err = cli("leaderboard", "-w", ws, "--plot", tmp_path / "board.xyz")
    _one_line_error(code, err)
    assert ".xyz" in err and ".png" in err and out == "" and not (tmp_path / "board.xyz").exists()
    with pytest.raises(UserError, match="png"):
        lb.plot(lb.read_entries(ws / "leaderboard"), tmp_path / "board.docx")

    other = tmp_path / "other"
    other.mkdir()
    (other / "leaderboard").write_text("not a folder")
    code, _, err = cli("leaderboard", "-w", other)
    _one_line_error(code, err)
    assert "is a file" in err


def test_group_seeds_shows_mean_and_sd(tmp_path, cli):
    ws = tmp_path / "ws"
    ctx = {"base_model": "b", "method": "exp", "loss": "ce", "scope": "full", "epochs": 2, "suite": "paper"}
    a_rob_50 = result(["fgsm", "autoattack"], [[1, 1], [1, 1], [0, 0], [0, 0]], CLEAN)
    for name, res, seed in (("exp-s0", a_rob_50, 0), ("exp-s1", PAPERISH, 1)):
        write(ws, res, name, context={**ctx, "train_seed": seed})
    write(ws, SECOND, "pgd", context={**ctx, "method": "pgd-at"})
    groups = lb.group_by_seed(lb.read_entries(ws / "leaderboard"))
    assert [[e.entry for e in g.members] for g in groups] == [["exp-s0", "exp-s1"], ["pgd"]]
    assert groups[0].seeds == [0, 1] and groups[1].seeds == [None]
    a_rob = groups[0].stat(lambda e: e.a_rob)
    assert a_rob.mean == pytest.approx(37.5) and a_rob.sd == pytest.approx(((12.5 ** 2) * 2) ** 0.5)
    code, out, err = cli("leaderboard", "-w", ws, "--group-seeds")
    assert code == 0, err
    assert "37.50 ± 17.68" in out and "2 (0,1)" in out and "1 (?)" in out
    code, out, _ = cli("leaderboard", "-w", ws, "--group-seeds", "--format", "json")
    rows = json.loads(out)
    assert [r["members"] for r in rows] == [["pgd"], ["exp-s0", "exp-s1"]]  # pgd's AutoAttack 50 ranks first
    assert rows[1]["a_rob"]["values"] == [50.0, 25.0]
