"""`adt-ft study report`: the study's write-up from its entries alone (no training, no attacks).

Reads the report folder that `study run` fills (entries and per-example CSVs `<model>_<kind>.*`,
`bench-<scope>.json`, `study.json` with the base model's rounds and the stage times) and writes
README.md (per-scope summary against the control with paired intervals, raw and Holm-adjusted
p-values, seed spread, cost ratios, the masking check), study.png (the forest plot) and
index.html (the same report as a page). Everything above "## Cost" depends only on the entries,
so two runs of the same study (any number of workers) give the same text there.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..utils import atomic_write_text
from .execute import reference_run
from .jobs import entry_name
from .masking import audit_text, column_at, masking_screen, masking_text, pgd20_alone
from .spec import StudySpec

KINDS = ("pointwise", "w")


class StudyResults:
    """The entries of a study's report folder, by kind, in the order of `spec.models()`."""

    def __init__(self, spec: StudySpec, folder: Path):
        from ..leaderboard import read_entry

        self.spec, self.folder = spec, folder
        self.entries: dict[str, list] = {}
        for kind in KINDS if spec.wasserstein else ("pointwise",):
            paths = [folder / f"{entry_name(spec, m, kind)}.json" for m in spec.models()]
            missing = [p.name for p in paths if not p.exists()]
            if missing:
                raise UserError(f"{folder} has no entry {missing[0]} (and {len(missing) - 1} more missing): run "
                                f"'adt-ft study run {spec.path}' first")
            self.entries[kind] = [read_entry(p, spec.dataset, spec.threat_model) for p in paths]
        meta = folder / "study.json"
        self.meta: dict[str, Any] = json.loads(meta.read_text()) if meta.exists() else {}
        self.at = {m: i for i, m in enumerate(spec.models())}

    def entry(self, kind: str, model: str):
        return self.entries[kind][self.at[model]]

    def parts_entry(self, model: str):
        from ..leaderboard import read_entry

        path = self.folder / f"{entry_name(self.spec, model, 'parts')}.json"
        return read_entry(path, self.spec.dataset, self.spec.threat_model) if path.exists() else None

    def bench_ratios(self, scope: str) -> dict[str, float | None]:
        path = self.folder / f"bench-{scope}.json"
        rows = json.loads(path.read_text())["rows"] if path.exists() else []
        return {f"{r['name']}/{r['loss']}": r["ratio"] for r in rows if r["kind"] == "method"}

    def side(self, kind: str, arm, scope: str, seed: int | None = None) -> list:
        return [self.entry(kind, name) for name, a, sc, sd in self.spec.runs()
                if a == arm and sc == scope and (seed is None or sd == seed)]


def summary(res: StudyResults, scope: str) -> str:
    """Markdown, one row per arm and measure: the control's and the arm's accuracy, B − A with its 95%
    paired bootstrap interval (seed groups), exact McNemar p per seed pair with its Holm adjustment over
    the table, and the bench's step-time ratio to the control."""
    from ..leaderboard.compare import compare_entries, format_p
    from .stats import holm

    s = res.spec
    seeds = s.seeds[scope]
    ratios = res.bench_ratios(scope)
    rows: list[tuple[list[str], list[float | None]]] = []
    for arm in [a for a in s.arms if a != s.control]:
        first = True
        for kind in res.entries:
            comp = compare_entries(res.side(kind, s.control, scope) + res.side(kind, arm, scope),
                                   group_seeds=len(seeds) > 1)[0]
            p_values: dict[str, list[float | None]] = {}
            for seed in seeds:
                for c in compare_entries(res.side(kind, s.control, scope, seed) + res.side(kind, arm, scope, seed))[0]\
                        .columns:
                    p_values.setdefault(c.column, []).append(c.p_value)
            for c in comp.columns:
                if (kind == "pointwise" and c.column not in ("clean", "A_rob")) or (kind == "w" and c.column == "clean"):
                    continue
                ratio = ratios.get(arm.label)
                cells = [arm.label if first else "", c.column if kind == "pointwise" else f"W: {c.column}", c.a.text(),
                         c.b.text(), f"{c.diff:+.2f}",
                         # W-PGD: outcomes coupled through the shared budget, no per-example interval or test
                         "n/a (coupled)" if c.ci is None else f"[{c.ci[0]:+.2f}, {c.ci[1]:+.2f}]",
                         " / ".join(format_p(p) for p in p_values.get(c.column, [])),
                         (f"{ratio:.2f}" if ratio else "—") if first else ""]
                rows.append((cells, p_values.get(c.column, [])))
                first = False
    adjusted = holm([p for _, ps in rows for p in ps])
    head = ["method", "measure", f"control ({s.control.label})", "method", "B − A (pp)", "95% CI",
            "McNemar p " + "/".join(f"s{x}" for x in seeds), "Holm-adjusted p", "step time × control"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    k = 0
    for cells, ps in rows:
        adj = " / ".join(format_p(p) for p in adjusted[k:k + len(ps)])
        k += len(ps)
        lines.append("| " + " | ".join(cells[:7] + [adj] + cells[7:]) + " |")
    return "\n".join(lines)


def versus_base(res: StudyResults) -> str:
    """Markdown, one row per run: B − A against the base model with exact McNemar p."""
    from ..leaderboard.compare import compare_entries, format_p

    s = res.spec
    base = {kind: res.entry(kind, s.base_name) for kind in res.entries}
    wpgd = column_at(base["w"], "wpgd", base["pointwise"].eps) if "w" in base else None
    head = ["run", "clean", "A_rob"] + ([f"W: {wpgd}" if wpgd else "W-PGD"] if "w" in base else [])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name in s.models()[1:]:
        cells = {}
        for kind in res.entries:
            for c in compare_entries([base[kind], res.entry(kind, name)])[0].columns:
                p = "" if c.p_value is None else f", p {format_p(c.p_value)}"  # none for coupled W-PGD columns
                cells[(kind, c.column)] = f"{c.b.text()} ({c.diff:+.1f}{p})"
        row = [name, cells.get(("pointwise", "clean"), "—"), cells.get(("pointwise", "A_rob"), "—")]
        if "w" in base:
            row.append(cells.get(("w", wpgd), "—"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def baseline_text(res: StudyResults) -> str:
    aa = res.entry("pointwise", res.spec.base_name)
    if "w" in res.entries:
        pgd = pgd20_alone(res.entry("w", res.spec.base_name), aa.eps)
    else:  # an independent-mode entry ran PGD-20 on every example itself
        pgd = aa.attack_value("pgd20")[0] if res.spec.pointwise["mode"] == "independent" else None

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{v:.1f}%"

    return (f"Baseline, the base model before fine-tuning ({aa.n} test images, ε = {aa.eps_label}): clean "
            f"{pct(aa.clean)}, PGD-20 {pct(pgd)}, AutoAttack {pct(aa.autoattack)}, A_rob {pct(aa.a_rob)}.")


def masking_section(res: StudyResults) -> str:
    s = res.spec
    if not s.masking or "w" not in res.entries:
        return ""
    rows = masking_screen([(m, res.entry("pointwise", m), res.entry("w", m)) for m in s.models()],
                          float(s.masking["screen_pp"]), reference_run(s), bool(s.masking.get("check_all", False)))
    first_scope = next(iter(s.seeds))
    control = [name for name, arm, scope, _ in s.runs() if arm == s.control and scope == first_scope]
    return masking_text(s.masking, s.pointwise["n_examples"], reference_run(s), control, rows, res.parts_entry)


def audit_section(res: StudyResults) -> str:
    """Each checked model's audit verdicts from its `_parts` entry ("" when the study has none)."""
    parts = {m: res.parts_entry(m) for m in res.spec.models()} if res.spec.masking else {}
    return audit_text({m: e for m, e in parts.items() if e is not None})


def write_report(spec: StudySpec, folder: Path | None = None, command: str | None = None) -> Path:
    """README.md, study.png and index.html in the report folder; the README's path."""
    from .document import readme_text, write_html
    from .plot import forest_plot

    folder = Path(folder or spec.out)
    res = StudyResults(spec, folder)
    forest_plot(res, folder / "study.png")
    text = readme_text(res, command or f"adt-ft study report {spec.path.name}")
    atomic_write_text(folder / "README.md", text)
    write_html(res, text, folder / "index.html")
    return folder / "README.md"
