"""Paired comparison of entries evaluated on the same images (`adt-ft compare`).

Every entry keeps, per example, whether the model was correct on the clean image,
under each attack, and under all of them (A_rob). Two entries evaluated on the
same images are therefore paired data, and a difference in accuracy can be
tested on the examples where they disagree:

- difference B − A in percentage points, with a 95% paired bootstrap interval:
  examples are resampled with replacement (the same draw for A and B), seeded.
  The resampled mean of d_i = b_i − a_i only depends on how many times each
  distinct value of d is drawn, so the draws are taken as multinomial counts over
  those values: the same distribution as resampling indices, at a fraction of the cost;
- McNemar's exact test (Edwards 1948; McNemar 1947): under "no difference" the
  examples robust for A only and for B only are a fair coin's outcomes, so the
  two-sided p-value is scipy's exact binomial test on the discordant counts;
- the counts themselves (robust for A only / for B only).

With seed groups (`group_seeds`) each side is several entries (one per seed):
accuracies are mean ± standard deviation over seeds, the interval resamples
examples of the seed-averaged outcomes (it covers the choice of images, not of
seeds), the counts are means over seed pairs, and no p-value is given.

W-PGD columns (`wpgd@δ`) get the difference only. W-PGD spends one W_2 budget on
the whole evaluation set, so whether one image is broken depends on every other
image: the outcomes are not independent, and both the per-example McNemar test and
a bootstrap that resamples images assume they are. (A valid test would re-run
W-PGD on each resampled set, at the cost of one attack per resample.)

Several tests against one control in one table (several entries, several columns)
are a family: each p-value is also shown Holm-adjusted over every McNemar p-value
of the call (statsmodels' `multipletests`, method "holm"), which controls the
family-wise error rate without assuming the tests independent.
"""
from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import UserError
from ..utils import format_eps
from .entries import Entry, check_per_example
from .render import Section, render_sections
from .seeds import Spread, group_by_seed, spread

DEFAULT_RESAMPLES = 10_000
CONFIDENCE = 0.95
HEADERS = ["column", "A (control)", "B", "B − A", "95% CI", "McNemar p", "Holm p", "A only", "B only"]
#: columns whose per-example outcomes are coupled through a budget shared by the whole set
COUPLED_PREFIXES = ("wpgd@",)
CORRECTION = "holm"


# ---------------------------------------------------------------- statistics

MAX_RESAMPLES = 1_000_000


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (1.0 when there are none)."""
    from scipy.stats import binomtest

    n = int(a_only) + int(b_only)
    if n == 0:
        return 1.0
    return float(binomtest(min(int(a_only), int(b_only)), n, 0.5, alternative="two-sided").pvalue)


def coupled(column: str) -> bool:
    """Whether a column's outcomes share one budget over the set (no per-example statistics)."""
    return column.startswith(COUPLED_PREFIXES)


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (statsmodels), in the order given."""
    if not len(p_values):
        return []
    from statsmodels.stats.multitest import multipletests

    return [float(v) for v in multipletests(list(p_values), method=CORRECTION)[1]]


def bootstrap_interval(d: np.ndarray, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int | Sequence[int] = 0,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of the mean of the paired differences `d` (one per example),
    over `n_resamples` resamples of the examples; in the units of `d`."""
    d = np.asarray(d, dtype=np.float64)
    if len(d) == 0:
        raise ValueError("no examples to resample")
    values, counts = np.unique(d, return_counts=True)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(d), counts / len(d), size=int(n_resamples))
    means = draws @ values / len(d)
    tail = (1.0 - confidence) / 2
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


# ---------------------------------------------------------------- per-example outcomes

@dataclass
class Outcomes:
    """One entry's verified per-example results, in the order of the example indices."""
    entry: Entry
    index: np.ndarray
    labels: np.ndarray
    columns: dict[str, np.ndarray]   # column -> bool per example: correct under it ("clean", attacks, "A_rob")


def _int_column(path: Path, table: dict[str, list[str]], name: str) -> np.ndarray:
    try:
        return np.array([int(v) for v in table[name]], dtype=np.int64)
    except (KeyError, ValueError):
        raise UserError(f"per-example file {path} has no readable {name!r} column: re-run its evaluation") from None


def load_outcomes(entry: Entry) -> Outcomes:
    """The entry's per-example file, verified against its recorded sha256 and parsed."""
    if not entry.extra.get("per_example_file"):
        raise UserError(f"entry {entry.entry} ({entry.path}) has no per-example file: compare needs entries "
                        "written by 'adt-ft eval'")
    if entry.is_corruptions:
        raise UserError(f"entry {entry.entry} is a corruptions entry: compare pairs attack columns per image, and "
                        "corruptions entries have none; the leaderboard ranks them by mean corruption accuracy")
    check = check_per_example(entry)
    if check.problem:
        raise UserError(f"entry {entry.entry}: {check.problem}: re-run its evaluation before comparing it")
    with open(check.path, newline="") as fh:
        body = list(csv.reader(fh))
    header = body[0] if body else []
    table = {h: [r[j] if j < len(r) else "" for r in body[1:]] for j, h in enumerate(header)}
    index = _int_column(check.path, table, "index")
    order = np.argsort(index, kind="stable")
    if len(np.unique(index)) != len(index):
        raise UserError(f"per-example file {check.path} lists an example index twice: re-run its evaluation")
    columns = {"clean": _int_column(check.path, table, "clean") == 1}
    per_attack = entry.extra.get("per_attack") or {}
    for a in entry.attacks:
        # An attack's column is its own accuracy only when it ran on every clean-correct
        # example (independent mode, or outside A_rob); cascade columns are not comparable.
        if a in table and per_attack.get(a) is not None:
            columns[a] = np.array([v == "1" for v in table[a]], dtype=bool)
    if entry.a_rob is not None:
        columns["A_rob"] = _int_column(check.path, table, "robust") == 1
    return Outcomes(entry, index[order], _int_column(check.path, table, "label")[order],
                    {k: v[order] for k, v in columns.items()})


def check_same_images(outcomes: Sequence[Outcomes]) -> None:
    """Paired statistics need the same examples with the same labels, at the same ε."""
    first = outcomes[0]
    for o in outcomes[1:]:
        a, b = first.entry, o.entry
        if (a.eps is None) != (b.eps is None) or (a.eps is not None and abs(a.eps - b.eps) > 1e-9):
            raise UserError(f"{a.entry} (ε = {a.eps_label}) and {b.entry} (ε = {b.eps_label}) were evaluated at "
                            "different ε: compare entries evaluated at the same budget")
        if len(o.index) != len(first.index) or not (np.array_equal(o.index, first.index)
                                                    and np.array_equal(o.labels, first.labels)):
            raise UserError(f"{a.entry} ({len(first.index)} examples) and {b.entry} ({len(o.index)} examples) "
                            "were not evaluated on the same images: compare entries evaluated on the same "
                            "examples (same dataset, `n_examples` and data)")


# ---------------------------------------------------------------- comparisons

@dataclass
class Side:
    label: str
    members: list[Outcomes]

    @property
    def names(self) -> list[str]:
        return [m.entry.entry for m in self.members]

    def rate(self, column: str) -> np.ndarray:
        """Per example: the fraction of members correct under `column`."""
        return np.mean([m.columns[column] for m in self.members], axis=0)


@dataclass
class ColumnStats:
    column: str
    a: Spread                 # control accuracy (%), over the side's members
    b: Spread
    diff: float               # B − A, percentage points
    ci: tuple[float, float] | None   # paired bootstrap interval of diff; None for a coupled (W-PGD) column
    p_value: float | None     # exact McNemar; None for seed groups and coupled columns
    a_only: float             # examples correct for A only (mean over seed pairs for groups)
    b_only: float
    p_adjusted: float | None = None  # Holm over every p-value of the comparison call

    @property
    def coupled(self) -> bool:
        return coupled(self.column)


@dataclass
class Comparison:
    control: Side
    other: Side
    eps: float | None
    n: int
    columns: list[ColumnStats] = field(default_factory=list)
    n_resamples: int = DEFAULT_RESAMPLES
    seed: int = 0
    confidence: float = CONFIDENCE

    def to_json(self) -> dict[str, Any]:
        return {"control": self.control.label, "control_entries": self.control.names,
                "entry": self.other.label, "entries": self.other.names,
                "eps": None if self.eps is None else format_eps(self.eps), "n": self.n,
                "bootstrap": {"resamples": self.n_resamples, "seed": self.seed, "confidence": self.confidence},
                "correction": CORRECTION,
                "columns": [{**asdict(c), "a": c.a.to_json(), "b": c.b.to_json(),
                             "ci": None if c.ci is None else list(c.ci), "coupled": c.coupled}
                            for c in self.columns]}


def _column_stats(a: Side, b: Side, column: str, *, n_resamples: int, seed: int, confidence: float) -> ColumnStats:
    ra, rb = a.rate(column), b.rate(column)
    a_only, b_only = float(np.sum(ra * (1 - rb))), float(np.sum(rb * (1 - ra)))
    single = len(a.members) == 1 and len(b.members) == 1
    ci, p = None, None
    if not coupled(column):  # coupled outcomes: neither resampling images nor McNemar is valid
        # A fresh generator per column: a column's interval does not depend on which other columns are
        # compared, and two columns with the same outcomes (AutoAttack alone and A_rob) get the same interval.
        lo, hi = bootstrap_interval(rb - ra, n_resamples=n_resamples, seed=seed, confidence=confidence)
        ci = (100.0 * lo, 100.0 * hi)
        p = mcnemar_exact(round(a_only), round(b_only)) if single else None
    return ColumnStats(column, spread(100.0 * m.columns[column].mean() for m in a.members),
                       spread(100.0 * m.columns[column].mean() for m in b.members),
                       float(100.0 * np.mean(rb - ra)), ci, p, a_only, b_only)


def compare_sides(a: Side, b: Side, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                  confidence: float = CONFIDENCE) -> Comparison:
    """B against the control A, for every column both sides have (clean, shared attacks, A_rob)."""
    shared = [c for c in a.members[0].columns if all(c in m.columns for m in a.members + b.members)]
    first = a.members[0]
    comp = Comparison(a, b, first.entry.eps, len(first.index), n_resamples=n_resamples, seed=seed,
                      confidence=confidence)
    comp.columns = [_column_stats(a, b, c, n_resamples=n_resamples, seed=seed, confidence=confidence)
                    for c in shared]
    return comp


def compare_entries(entries: Sequence[Entry], *, group_seeds: bool = False, workspace: str | Path | None = None,
                    n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE,
                    allow_failed_audit: bool = False) -> list[Comparison]:
    """Each entry (or seed group) against the first one, the control. An entry whose recorded audit
    failed (docs/evaluation.md, "Audit") is refused unless `allow_failed_audit`."""
    if len(entries) < 2:
        raise UserError("compare needs at least two entries: the control first, then the entries to compare")
    failed = [e for e in entries if e.audit_verdict == "fail"]
    if failed and not allow_failed_audit:
        raise UserError(f"entry {failed[0].entry} failed its robustness-evaluation audit, so its robust accuracy is "
                        "likely over-reported and is not ranked: re-evaluate it (see 'adt-ft audit'), or give "
                        "`allow_failed_audit` to compare it anyway")
    if n_resamples < 100:
        raise UserError(f"`resamples` {n_resamples} is too few for a 95% interval: give at least 100")
    if n_resamples > MAX_RESAMPLES:
        # Each resample is a row of counts in memory; past a million the interval's own Monte Carlo
        # error (~1/sqrt(resamples) of its width) is far below the last digit printed.
        raise UserError(f"resamples {n_resamples} is more than the {MAX_RESAMPLES:,} that memory allows and a "
                        "95% interval needs: give at most that")
    if seed < 0:
        raise UserError(f"the bootstrap seed must be 0 or more, got {seed}")
    outcomes = [load_outcomes(e) for e in entries]
    check_same_images(outcomes)
    by_path = {id(o.entry): o for o in outcomes}
    if group_seeds:
        sides = [Side(g.label, [by_path[id(e)] for e in g.members]) for g in group_by_seed(entries, workspace)]
        if len(sides) < 2:
            raise UserError("every entry given falls in one seed group: give entries of at least two "
                            "configurations (the control's first)")
    else:
        sides = [Side(o.entry.entry, [o]) for o in outcomes]
    comps = [compare_sides(sides[0], s, n_resamples=n_resamples, seed=seed, confidence=confidence)
             for s in sides[1:]]
    adjust_family(comps)
    return comps


def adjust_family(comps: Sequence[Comparison]) -> None:
    """Set every column's Holm-adjusted p-value, over all the p-values of `comps` (one family)."""
    tested = [c for comp in comps for c in comp.columns if c.p_value is not None]
    for c, adjusted in zip(tested, holm_adjust([c.p_value for c in tested])):
        c.p_adjusted = adjusted


# ---------------------------------------------------------------- rendering

def format_p(p: float | None) -> str:
    if p is None:
        return "—"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def _count_text(x: float) -> str:
    return str(int(round(x))) if abs(x - round(x)) < 1e-9 else f"{x:.1f}"


def comparison_section(c: Comparison) -> Section:
    eps = "?" if c.eps is None else format_eps(c.eps)
    title = f"B = {c.other.label} vs A = {c.control.label} (control), ε = {eps}, n = {c.n}"
    body = [[s.column, s.a.text(), s.b.text(), f"{s.diff:+.2f}",
             "n/a (coupled)" if s.ci is None else f"[{s.ci[0]:+.2f}, {s.ci[1]:+.2f}]",
             "n/a (coupled)" if s.coupled else format_p(s.p_value), format_p(s.p_adjusted),
             _count_text(s.a_only), _count_text(s.b_only)] for s in c.columns]
    return Section(title, list(HEADERS), body)


def comparison_notes(comps: Sequence[Comparison]) -> list[str]:
    c = comps[0]
    out = [f"accuracy (%) on the same n images; B − A in percentage points; {round(100 * c.confidence)}% CI: paired bootstrap over examples "
           f"({c.n_resamples} resamples, seed {c.seed}); McNemar p: exact two-sided test on the examples correct "
           "for A only vs B only"]
    k = sum(s.p_value is not None for x in comps for s in x.columns)
    if k:
        out.append(f"Holm p: the McNemar p-value adjusted by Holm's step-down method over the {k} test"
                   f"{'' if k == 1 else 's'} of this table (statsmodels multipletests, method 'holm'), which "
                   "controls the chance of any false positive among them")
    if any(s.coupled for x in comps for s in x.columns):
        out.append("wpgd@δ columns: the difference only. W-PGD spends one Wasserstein budget on the whole set, so "
                   "an image's outcome depends on every other image's; McNemar and a bootstrap over images assume "
                   "independent outcomes, so neither p-value nor interval would be valid (\"n/a (coupled)\")")
    if any(len(x.control.members) > 1 or len(x.other.members) > 1 for x in comps):
        out.append("seed groups: accuracy mean ± sd over seeds; the interval resamples examples of the "
                   "seed-averaged outcomes; A only / B only are means over seed pairs; no p-value")
    return out


def render_comparisons(comps: Sequence[Comparison], fmt: str = "table") -> str:
    """Comparisons as aligned text, Markdown or JSON."""
    import json

    if fmt == "json":
        return json.dumps([c.to_json() for c in comps], indent=2) + "\n"
    return render_sections([comparison_section(c) for c in comps], comparison_notes(comps), fmt, n_text=1)

