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


def test_render_sorts_by_robust_accuracy(tmp_path):
    root = tmp_path / "leaderboard"
    mid = result(["fgsm"], [[1], [1], [0], [0]], CLEAN)                                   # A_rob 50
    top = result(["fgsm", "pgd20"], [[1, 1], [1, 1], [1, 1], [0, 0]], CLEAN)               # A_rob 75
    low = result(["fgsm", "pgd20"], [[0, -1], [1, 0], [1, 1], [0, 0]], CLEAN, mode="cascade")  # A_rob 25
    for name, res in (("mid", mid), ("top", top), ("low", low)):
        lb.write_entry(res, root=root, dataset="fashion-mnist", entry=name, context={"method": "exp", "base_model": "b"})
    # A RobustBench file of its own (no adt_ft block) ranks by its AutoAttack accuracy.
    rb_file = root / "fashion-mnist" / "Linf" / "Someone2020.json"
    rb_file.write_text(json.dumps({"name": "x", "clean_acc": "90.00", "autoattack_acc": "60.00"}))

    entries = lb.read_entries(root, "fashion-mnist", "Linf")
    assert [e.entry for e in lb.sort_entries(entries)] == ["top", "Someone2020", "mid", "low"]

    text = lb.render(entries, "table")
    assert [text.index(n) for n in ("top", "Someone2020", "mid", "low")] == \
        sorted(text.index(n) for n in ("top", "Someone2020", "mid", "low"))
    md = lb.render(entries, "markdown").splitlines()
    assert md[0].startswith("| entry | base model | method | clean | AutoAttack | A_rob | fgsm | pgd20 |")
    assert md[2].startswith("| top | b | exp | 75.00 | — | 75.00 | 75.00 | 75.00 |")
    assert "50.00*" in md[5]  # cascade columns are cumulative and say so
    rows = json.loads(lb.render(entries, "json"))
    assert [r["entry"] for r in rows] == ["top", "Someone2020", "mid", "low"]
    assert rows[0]["a_rob"] == 75.0 and rows[1]["autoattack"] == 60.0

    assert lb.read_entries(root, "cifar10") == []
    with pytest.raises(UserError, match="choose from"):
        lb.render(entries, "html")
    (root / "fashion-mnist" / "Linf" / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="broken.json"):
        lb.read_entries(root)


def test_entry_names_are_plain_file_names(tmp_path):
    for bad in ("../up", "a/b", "", ".hidden", "x.json"):
        with pytest.raises(UserError):
            write(tmp_path, PAPERISH, bad)


def test_plot_writes_an_image(tmp_path):
    root = tmp_path / "leaderboard"
    write(tmp_path, PAPERISH, "one")
    out = lb.plot(lb.read_entries(root), tmp_path / "board.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
