"""Leaderboard rows and their plain-text renderings (aligned text, GitHub Markdown, JSON).

Entries rank against each other only within a comparability group: same dataset,
threat model, ε and number of evaluated examples. An ε = 8/255 result on 20
images and an ε = 0.1 result on 1,000 are different measurements, so they go in
different groups (sections of the table), each ranked on its own.

Within a group only entries evaluated with AutoAttack (standard) on every
clean-correct example are ranked, by that accuracy, as RobustBench ranks: an
entry that ran only FGSM and PGD-20 would otherwise top entries that faced a
much stronger attack. The others are weaker (or different) evaluations: they
form a group of their own, listed by their robust accuracy but never ranked.
The CLI draws the same rows as rich tables (`adt_finetune.cli.leaderboard_cmd`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..errors import UserError
from ..utils import format_eps, format_pct
from .entries import Entry

FORMATS = ("table", "markdown", "json")
HEADERS = ["entry", "base model", "method", "ε", "n", "clean", "AutoAttack", "A_rob"]
#: how many leading columns hold text (left-aligned); the rest are numbers
TEXT_COLUMNS = 3
CUMULATIVE_NOTE = "* cumulative (cascade mode): robust to this attack and every earlier one"
RANKING_NOTE = ("ranked by AutoAttack (standard) accuracy, as RobustBench ranks, within each group of equal dataset, "
                "threat model, ε and n; entries without AutoAttack (standard) on every clean-correct example are "
                "weaker evaluations: listed apart by A_rob, never ranked; entries at different ε or n are not "
                "comparable and are never ranked together")
#: added under tables that hold corruptions entries (so that boards without them read as before)
CORRUPTIONS_NOTE = ("corruptions entries (no ε) are ranked by their mean accuracy over the 15 corruptions × 5 "
                    "severities (RobustBench's corruptions_acc), in groups of equal dataset and n")
UNRANKED_TITLE = "not ranked, weaker evaluations (no AutoAttack standard)"
AUTOATTACK = "autoattack"
UNVERIFIED_NOTE = "! per-example file does not match its entry (see the warning)"
UNRELIABLE_NOTE = ("⚠ unreliable: a sanity check failed (the entry's sanity list says which; e.g. a collapsed model "
                   "or clean accuracy at chance), so its numbers should not be trusted")
AUDIT_FAILED_NOTE = "✗ audit failed: the robust accuracy is likely over-reported (adt-ft audit --entry NAME shows why)"
UNAUDITED_NOTE = "° no audit recorded: run 'adt-ft audit' (or eval --audit) to check the number for gradient masking"
AUDIT_MARKS = {"fail": " ✗", None: " °"}


@dataclass
class Group:
    """Entries that may be ranked against each other, best first."""
    dataset: str
    threat_model: str
    eps: float | None
    n: int | None
    entries: list[Any]
    #: False for the weaker evaluations of a comparability group: listed, never ranked
    ranked: bool = True

    @property
    def where(self) -> str:
        """Dataset, threat model, ε and n."""
        eps = "?" if self.eps is None else format_eps(self.eps)
        n = "?" if self.n is None else str(self.n)
        if self.threat_model == "corruptions":  # no ε: 15 corruptions × 5 severities of the first n images
            return f"{self.dataset} / corruptions, n = {n}"
        return f"{self.dataset} / {self.threat_model}, ε = {eps}, n = {n}"

    @property
    def title(self) -> str:
        return self.where if self.ranked else f"{self.where}, {UNRANKED_TITLE}"

    def rank(self, i: int) -> int | None:
        """The rank of the i-th member (0-based), None in a group that is not ranked."""
        return i + 1 if self.ranked else None


def autoattack_standard(e: Entry) -> bool:
    """Did AutoAttack (standard, all four parts) run on every clean-correct example? Only then is
    `autoattack_acc` written; a RobustBench file of its own (no "adt_ft" block) is taken at its word."""
    if e.autoattack is None:
        return False
    settings = (e.extra.get("attack_settings") or {}).get(AUTOATTACK) or {}
    return settings.get("version", "standard") == "standard" and not settings.get("attacks")


def ranked_evaluation(e: Entry) -> bool:
    """Ranked in its group: AutoAttack (standard) on every clean-correct example, or a corruptions entry
    with its mean corruption accuracy (its group holds corruptions entries only: the threat model differs)."""
    return autoattack_standard(e) or (e.is_corruptions and e.corruptions is not None)


def _num(v: float | None) -> float:
    return v if v is not None else -math.inf


def _rank_key(e: Entry) -> tuple:
    """AutoAttack first (the ranked groups), then A_rob; the name breaks ties."""
    return (-_num(e.autoattack) if autoattack_standard(e) else 0.0, -_num(e.robust), e.entry)


def _group_order(key: tuple) -> tuple:
    ds, tm, eps, n, ranked = key
    return (ds, tm, eps is None, eps if eps is not None else 0.0, n is None, -(n or 0), not ranked)


def comparable_groups(items: Iterable[Any], key=lambda e: e.comparable_key, rank=_rank_key,
                      ranked=ranked_evaluation) -> list[Group]:
    """Split into comparability groups (dataset, threat model, ε, n), each sorted by `rank`; the members
    for which `ranked` is false form a group of their own after it (listed, not ranked)."""
    by_key: dict[tuple, list[Any]] = {}
    for item in items:
        by_key.setdefault((*key(item), bool(ranked(item))), []).append(item)
    return [Group(*k[:4], sorted(members, key=rank), k[4])
            for k, members in sorted(by_key.items(), key=lambda kv: _group_order(kv[0]))]


def sort_entries(entries: Iterable[Entry]) -> list[Entry]:
    """Within each comparability group the ranked entries, best AutoAttack first, then the weaker
    evaluations by robust accuracy; the groups one after another."""
    return [e for g in comparable_groups(entries) for e in g.entries]


def attack_columns(entries: Sequence[Entry]) -> list[str]:
    cols: list[str] = []
    for e in entries:
        cols += [a for a in e.attacks if a not in cols and a != "autoattack"]
    if any(e.is_corruptions for e in entries):
        cols.append("corruptions")
    return cols


def _row(e: Entry, group: Group, rank: int | None, attack_cols: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "entry": e.entry,
        "dataset": e.dataset,
        "threat_model": e.threat_model,
        "base_model": e.extra.get("base_model") or "",
        "method": e.extra.get("method") or "",
        "eps": e.eps_label,
        "n": e.n,
        "clean": e.clean,
        "autoattack": e.autoattack,
        "a_rob": e.a_rob,
        "robust": e.robust,
        "group": group.where,
        "ranked": group.ranked,
        "rank_in_group": rank,
        "per_example_ok": e.verified,
        "unreliable": bool(e.data.get("unreliable")),
        "audit": e.audit_verdict,
        "per_attack": {},
        "cumulative": {},
    }
    for a in attack_cols:
        v, cum = e.attack_value(a)
        (row["cumulative"] if cum else row["per_attack"])[a] = v
    return row


def rows(entries: Iterable[Entry]) -> tuple[list[str], list[dict[str, Any]]]:
    """Rows as plain values, group by group, best first in each: (attack columns, [row dict]).
    Each row says its comparability group, whether it is ranked and its rank (null when not)."""
    groups = comparable_groups(entries)
    attack_cols = attack_columns([e for g in groups for e in g.entries])
    return attack_cols, [_row(e, g, g.rank(i), attack_cols) for g in groups for i, e in enumerate(g.entries)]


def cells(row: dict[str, Any], attack_cols: list[str]) -> list[str]:
    """A row's table cells, in HEADERS + attack columns order."""
    name = row["entry"] + (" ⚠" if row.get("unreliable") else "") + (" !" if row.get("per_example_ok") is False else "") \
        + AUDIT_MARKS.get(row.get("audit"), "")
    out = [name, row["base_model"], row["method"], row["eps"] or "?", "?" if row["n"] is None else str(row["n"]),
           format_pct(row["clean"]), format_pct(row["autoattack"]), format_pct(row["a_rob"])]
    for a in attack_cols:
        if a in row["cumulative"]:
            out.append(format_pct(row["cumulative"][a]) + "*")
        else:
            out.append(format_pct(row["per_attack"].get(a)))
    return out


@dataclass
class Section:
    """One table of a rendering: a title, a header and rows of cells."""
    title: str
    header: list[str]
    body: list[list[str]]


def sections(entries: Iterable[Entry]) -> tuple[list[Section], list[str]]:
    """One section per comparability group, and the notes that go under the tables."""
    groups = comparable_groups(entries)
    attack_cols = attack_columns([e for g in groups for e in g.entries])
    out, all_rows = [], []
    for g in groups:
        group_rows = [_row(e, g, g.rank(i), attack_cols) for i, e in enumerate(g.entries)]
        all_rows += group_rows
        n = len(group_rows)
        out.append(Section(section_title(g, n, "entr" + ("y" if n == 1 else "ies")), HEADERS + attack_cols,
                           [cells(r, attack_cols) for r in group_rows]))
    return out, notes(all_rows)


def section_title(g: Group, n: int, what: str) -> str:
    """"<where>: 3 entries", or for the weaker evaluations "<where>: 2 entries, not ranked, …"."""
    return f"{g.where}: {n} {what}" + ("" if g.ranked else f", {UNRANKED_TITLE}")


def notes(all_rows: list[dict[str, Any]]) -> list[str]:
    out = []
    if any(r["cumulative"] for r in all_rows):
        out.append(CUMULATIVE_NOTE)
    if any(r.get("per_example_ok") is False for r in all_rows):
        out.append(UNVERIFIED_NOTE)
    if any(r.get("unreliable") for r in all_rows):
        out.append(UNRELIABLE_NOTE)
    if any(r.get("audit") == "fail" for r in all_rows):
        out.append(AUDIT_FAILED_NOTE)
    if any(r.get("audit") is None for r in all_rows):
        out.append(UNAUDITED_NOTE)
    return out + [RANKING_NOTE] + ([CORRUPTIONS_NOTE] if any(r.get("threat_model") == "corruptions" for r in all_rows)
                                   else [])


def text_table(section: Section, n_text: int = TEXT_COLUMNS) -> list[str]:
    """Aligned plain-text lines: text columns left, numbers right."""
    widths = [max(len(x) for x in [h] + [r[j] for r in section.body]) for j, h in enumerate(section.header)]

    def line(cells_: list[str]) -> str:
        return "  ".join(c.ljust(w) if j < n_text else c.rjust(w) for j, (c, w) in enumerate(zip(cells_, widths)))

    return [section.title, line(section.header), "  ".join("-" * w for w in widths)] + \
        [line(r).rstrip() for r in section.body]


def markdown_table(section: Section, n_text: int = TEXT_COLUMNS, heading: str = "###") -> list[str]:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    n = len(section.header)
    return ([f"{heading} {section.title}", "", "| " + " | ".join(esc(h) for h in section.header) + " |",
             "|" + "|".join(["---"] * n_text + ["---:"] * (n - n_text)) + "|"]
            + ["| " + " | ".join(esc(c) for c in r) + " |" for r in section.body])


def render_sections(parts: list[Section], notes_: list[str], fmt: str, title: str | None = None,
                    n_text: int = TEXT_COLUMNS) -> str:
    """Sections and notes as Markdown (`fmt="markdown"`) or aligned plain text."""
    lines: list[str] = []
    if fmt == "markdown":
        if title:
            lines += [f"## {title}", ""]
        for s in parts:
            lines += markdown_table(s, n_text) + [""]
        for n in notes_:  # one paragraph each; a leading * would start a Markdown list
            lines += [n.replace("*", "\\*", 1) if n.startswith("*") else n, ""]
    else:
        if title:
            lines += [title, ""]
        for s in parts:
            lines += text_table(s, n_text) + [""]
        lines += notes_
    return "\n".join(lines).rstrip("\n") + "\n"


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}: choose from {', '.join(FORMATS)}")
    return fmt


def render(entries: Iterable[Entry], fmt: str = "table", title: str | None = None) -> str:
    """The leaderboard as text: an aligned plain-text table, GitHub Markdown, or JSON rows,
    one table per comparability group."""
    check_format(fmt)
    entries = list(entries)
    if fmt == "json":
        return json.dumps(rows(entries)[1], indent=2) + "\n"
    parts, notes_ = sections(entries)
    return render_sections(parts, notes_, fmt, title)
