"""The study's gradient-masking check: a screen over every model (PGD-20 alone vs A_rob), then
AutoAttack's parts one by one on the screened models, each model's rate of examples that only the
gradient-free Square breaks tested against the control's (one-sided Fisher exact test, Bonferroni
over the models checked).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable

from ..evaluation.audit import audit_entry
from ..evaluation.audit_checks import BLACK_BOX_ALPHA_FAIL, BLACK_BOX_REFERENCE_RATE
from ..leaderboard.compare import format_p


def column_at(w_entry, attack: str, budget: float) -> str | None:
    """The Wasserstein entry's column `<attack>@<budget>` (e.g. wpgd@0.1), matched numerically."""
    return next((k for k in w_entry.extra.get("per_attack") or {}
                 if k.startswith(f"{attack}@") and abs(float(k.split("@")[1]) - budget) < 1e-9), None)


def pgd20_alone(w_entry, eps: float) -> float | None:
    """PGD-20 accuracy on every example, from the Wasserstein suite's pointwise reference at ε = δ
    (a cascade's PGD-20 only ran on what AutoAttack left)."""
    column = column_at(w_entry, "pgd20", eps)
    value = None if column is None else w_entry.extra["per_attack"][column]
    return None if value is None else float(value)


def masking_screen(models: list[tuple[str, Any, Any]], screen_pp: float, reference: str,
                   check_all: bool = False) -> list[dict[str, Any]]:
    """Per model (name, pointwise entry, Wasserstein entry): PGD-20 alone, A_rob, and their gap in pp.
    A gap above `screen_pp` means AutoAttack breaks much that PGD-20 misses: either PGD-20 is simply
    weaker (APGD's step-size schedule, the DLR loss) or the gradients are masked and only Square gets
    through. The parts one by one tell which; they run on the flagged models and on the `reference`
    model (the control), whose gap is what an unmasked model of this kind shows, or on every model
    with `check_all`."""
    rows = []
    for name, aa, w in models:
        pgd = pgd20_alone(w, aa.eps)
        gap = None if pgd is None or aa.a_rob is None else pgd - aa.a_rob
        flagged = gap is not None and gap > screen_pp
        rows.append({"name": name, "pgd20": pgd, "a_rob": aa.a_rob, "gap": gap, "flagged": flagged,
                     "check": flagged or name == reference or check_all})
    return rows


def black_box_only(per_example_csv: Path, attacks: list[str]) -> tuple[int, int]:
    """(examples broken by a black-box attack that every white-box attack missed, examples) from an
    independent-mode per-example file."""
    from ..attacks import ATTACKS

    black = [a for a in attacks if ATTACKS[a].black_box]
    white = [a for a in attacks if not ATTACKS[a].black_box]
    with open(per_example_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    # a clean error has every flag 0, so it never counts
    k = sum(1 for r in rows if all(r[a] == "1" for a in white) and any(r[a] == "0" for a in black))
    return k, len(rows)


def _pct(v: float | None, fmt: str = ".1f") -> str:
    return "—" if v is None else format(v, fmt)


def masking_text(masking: dict[str, Any], n_examples: int, reference: str, control_runs: list[str],
                 rows: list[dict[str, Any]], parts_entry: Callable[[str], Any]) -> str:
    """Markdown: the screen over every model, then AutoAttack's parts on the checked ones, each
    model's black-box-only rate tested against the control's runs pooled (`control_runs`).
    `parts_entry(name)` is the model's parts entry, or None when it has none."""
    from scipy.stats import fisher_exact

    from ..leaderboard.compare import format_p

    checked = ("every model is checked" if masking.get("check_all") else
               f"flagged models are checked, as is the control (`{reference}`) for reference")
    lines = [f"PGD-20 alone vs A_rob (AutoAttack + PGD-20 + CW) on the {n_examples} evaluated images; "
             f"a gap above {float(masking['screen_pp']):g} pp is flagged; {checked}.", "",
             "| model | PGD-20 alone | A_rob | gap (pp) | checked |", "|---|---:|---:|---:|---|"]
    for r in rows:
        mark = "flagged" if r["flagged"] else ("yes" if r["check"] else "")
        lines.append(f"| {r['name']} | {_pct(r['pgd20'])} | {_pct(r['a_rob'])} | {_pct(r['gap'], '+.1f')} | {mark} |")
    parts = {r["name"]: parts_entry(r["name"]) for r in rows if r["check"]}
    parts = {n: e for n, e in parts.items() if e is not None}
    if not parts:
        return "\n".join(lines)
    attacks = [a.strip() for a in str(masking["attacks"]).split(",") if a.strip()]
    found = {n: black_box_only(e.path.with_suffix(".per-example.csv"), attacks) for n, e in parts.items()}
    control = [c for c in control_runs if c in found]
    k_c, n_c = sum(found[c][0] for c in control), sum(found[c][1] for c in control)
    alpha = 0.05 / len(parts)
    lines += ["", f"AutoAttack's parts one by one (standard parameters, independent mode, first "
              f"{int(masking['n_examples'])} test images). *Square only*: examples broken by gradient-free Square "
              "that every white-box attack missed. *p*: one-sided Fisher exact test of that rate against the "
              f"control's runs pooled ({k_c} of {n_c}); *masked* when p < 0.05 / {len(parts)} (Bonferroni over the "
              "models checked). `adt-ft audit` tests the same rate against a fixed reference instead (next section).",
              "", "| model | clean | " + " | ".join(attacks) + " | Square only | p | verdict |",
              "|---|---:|" + "---:|" * len(attacks) + "---:|---:|---|"]
    for n, e in parts.items():
        k, total = found[n]
        p = float(fisher_exact([[k, total - k], [k_c, n_c - k_c]], alternative="greater").pvalue) if n_c else None
        verdict = "**masked**" if p is not None and p < alpha else "ok"
        cells = [_pct(e.attack_value(a)[0]) for a in attacks]
        lines.append(f"| {n} | {_pct(e.clean)} | " + " | ".join(cells) +
                     f" | {k} ({100 * k / total:.1f}%) | {format_p(p)} | {verdict} |")
    return "\n".join(lines)


AUDIT_HEADING = "## Audit verdicts (`adt-ft audit`)"


def audit_text(parts: dict[str, Any]) -> str:
    """Markdown: each model's `adt-ft audit` verdicts from its `_parts` entry (`parts`: model name ->
    entry): the checks an entry's flags alone support (docs/evaluation.md, "Audit")."""
    if not parts:
        return ""
    lines = ["`adt-ft audit --entry <model>_parts.json --no-write` on each `_parts` entry. From an entry alone the "
             "audit can only run its black-box vs white-box check: the Square-only rate tested against healthy "
             f"models' {100 * BLACK_BOX_REFERENCE_RATE:g}% (one-sided exact binomial test, fails at p < "
             f"{BLACK_BOX_ALPHA_FAIL:g}). The other checks need the models (`adt-ft audit --run <model>`), which are "
             "not part of the report. A failed model's W-PGD columns (`<model>_w`) are upper bounds, since W-PGD "
             "is a gradient attack.", "",
             "| model | Square only | p | audit verdict | W-PGD columns |", "|---|---:|---:|---|---|"]
    for name, entry in parts.items():
        report = audit_entry(entry)
        check = report.check("black-box vs white-box")
        if check is None:
            lines.append(f"| {name} | — | — | skipped: {report.skipped['black-box vs white-box']} | — |")
            continue
        verdict = f"**{report.verdict}**" if report.verdict == "fail" else report.verdict
        w = "upper bounds" if check.verdict != "pass" else "stand"
        lines.append(f"| {name} | {check.numbers['only_black_box']} of {check.numbers['n']} | "
                     f"{format_p(check.numbers['p_value'])} | {verdict} | {w} |")
    return "\n".join(lines)
