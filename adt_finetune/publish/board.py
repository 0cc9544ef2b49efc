"""What a leaderboard page shows, as plain data for the templates: tables of cells, one per
comparability group (dataset, threat model, ε, n; entries at different ε or n are never ranked
together; in each, the entries with AutoAttack standard are ranked by it and the weaker evaluations
are a table of their own, not ranked), the seed groups as mean ± standard deviation, and the
clean-vs-robust scatter."""
from __future__ import annotations

import os
import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..leaderboard.entries import Entry
from ..leaderboard.render import CORRUPTIONS_NOTE, RANKING_NOTE, attack_columns, comparable_groups, section_title
from ..leaderboard.seeds import SeedGroup, group_rank_key, group_ranked
from ..utils import format_pct
from .plots import Point, scatter_svg

AUTOATTACK = "autoattack"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def slug(text: str) -> str:
    """A file name that needs no URL quoting (entry names are already close to this)."""
    return _UNSAFE.sub("-", text).strip(".") or "entry"


def cost_per_epoch(e: Entry) -> float | None:
    """Training seconds per epoch, as the run measured it (adt_ft.time_per_epoch_s)."""
    x = e.extra
    mean = x.get("mean_time_per_epoch_s")
    if isinstance(mean, (int, float)) and not isinstance(mean, bool):
        return float(mean)
    times = [t for t in (x.get("time_per_epoch_s") or []) if isinstance(t, (int, float))]
    return statistics.fmean(times) if times else None


@dataclass
class Cell:
    text: str
    sort: str = ""        # the value the browser sorts by ("" sorts below every number)
    num: bool = False
    cls: str = ""
    href: str | None = None
    title: str | None = None


@dataclass
class Column:
    label: str
    num: bool = False
    title: str | None = None


@dataclass
class Table:
    id: str
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]]      # {"cells": [Cell], "cls": str}
    notes: list[str] = field(default_factory=list)


def _num(v: float | None, *, cls: str = "", suffix: str = "", title: str | None = None) -> Cell:
    return Cell(format_pct(v) + suffix, "" if v is None else repr(float(v)), True, cls, title=title)


def _seconds(v: float | None) -> Cell:
    return Cell("—" if v is None else f"{v:.1f}", "" if v is None else repr(float(v)), True)


def _text(v: Any, href: str | None = None, cls: str = "") -> Cell:
    return Cell("" if v is None else str(v), "" if v is None else str(v), False, cls, href)


def board_attacks(entries: Sequence[Entry]) -> list[str]:
    """Attack columns in suite order, AutoAttack last (its own column)."""
    cols = attack_columns(list(entries))
    if any(AUTOATTACK in e.attacks or e.autoattack is not None for e in entries):
        cols.append(AUTOATTACK)
    return cols


def attack_value(e: Entry, attack: str) -> tuple[float | None, bool]:
    """(accuracy, cumulative?) of one attack column; AutoAttack falls back to autoattack_acc."""
    v, cum = e.attack_value(attack)
    if attack == AUTOATTACK and v is None:
        return e.autoattack, False
    return v, cum


def _attack_cell(e: Entry, attack: str) -> Cell:
    v, cum = attack_value(e, attack)
    return _num(v, cls="cum" if cum else "", suffix="*" if cum else "",
                title="cumulative: robust to this attack and every earlier one" if cum else None)


def _columns(attacks: list[str], first: list[Column], last: list[Column]) -> list[Column]:
    """The table's columns; ε and n are the same on every row of a table and stand in its title."""
    return first + [Column("clean", True), Column("A_rob", True, "per-example minimum over every attack")] + \
        [Column("AutoAttack" if a == AUTOATTACK else a, True) for a in attacks] + last + [Column("s / epoch", True, "training time per epoch")]


AUDIT_NOTE = ("✗ audit failed: the robust accuracy is likely over-reported (e.g. masked gradients); ° no audit "
              "ran: run 'adt-ft audit --entry NAME' with the model")
#: the entry cell's classes: the site marks a failed audit (✗) and a missing one (°) after the name
_AUDIT_CLASS = {"fail": "entry audit-failed", None: "entry unaudited"}
ENTRY_FIRST = [Column("#", True, "rank by AutoAttack (standard) accuracy within this table; — for a weaker "
                                 "evaluation, which is never ranked"), Column("entry")]
ENTRY_LAST = [Column("method"), Column("loss"), Column("scope"), Column("base model")]


def _rank_cell(rank: int | None) -> Cell:
    if rank is None:
        return Cell("—", "", True, title="not ranked: a weaker evaluation (no AutoAttack standard)")
    return Cell(str(rank), str(rank), True)


def entry_table(table_id: str, title: str, entries: Sequence[Entry], hrefs: dict[str, str],
                ranked: bool = True) -> Table:
    attacks = board_attacks(entries)
    rows = []
    for rank, e in enumerate(entries, 1):
        x = e.extra
        cost = cost_per_epoch(e)
        name = _text(e.entry, hrefs[e.entry], _AUDIT_CLASS.get(e.audit_verdict, "entry"))
        cells = [_rank_cell(rank if ranked else None), name, _num(e.clean),
                 _num(e.a_rob, cls="key")]
        cells += [_attack_cell(e, a) for a in attacks]
        cells += [_text(x.get(k)) for k in ("method", "loss", "scope", "base_model")]
        cells.append(_seconds(cost))
        cls = " ".join(c for c in ("unreliable" if e.data.get("unreliable") else "",
                                   "unverified" if e.verified is False else "", "" if ranked else "weaker") if c)
        rows.append({"cells": cells, "cls": cls, "entry": e.entry, "members": None})
    notes = []
    if any(c.cls == "cum" for r in rows for c in r["cells"]):
        notes.append("* cumulative (cascade mode): robust to this attack and every earlier one")
    if any(e.verified is False for e in entries):
        notes.append("an entry marked unverified has a per-example file that does not match its JSON")
    if any(e.audit_verdict in ("fail", None) for e in entries):
        notes.append(AUDIT_NOTE)
    notes.append(RANKING_NOTE)
    if any(e.is_corruptions for e in entries):
        notes.append(CORRUPTIONS_NOTE)
    return Table(table_id, title, _columns(attacks, ENTRY_FIRST, ENTRY_LAST), rows, notes)


def _spread_cell(g: SeedGroup, value) -> Cell:
    s = g.stat(value)
    if s.mean is None:
        return Cell("—", "", True)
    text = format_pct(s.mean) + ("" if s.sd is None else f" ± {s.sd:.2f}")
    return Cell(text, repr(s.mean), True, title=", ".join(format_pct(v) for v in s.values))


def group_table(table_id: str, title: str, groups: Sequence[SeedGroup], hrefs: dict[str, str],
                ranked: bool = True) -> Table:
    members = [e for g in groups for e in g.members]
    attacks = board_attacks(members)
    rows = []
    for rank, g in enumerate(groups, 1):
        first = g.first
        links = [{"text": e.entry, "href": hrefs[e.entry]} for e in g.members]
        cost = [c for c in (cost_per_epoch(e) for e in g.members) if c is not None]
        cells = [_rank_cell(rank if ranked else None), Cell(g.label, g.label, cls="group"),
                 Cell(f"{len(g.members)} ({g.seeds_text()})", str(len(g.members)), True),
                 _spread_cell(g, lambda e: e.clean), _spread_cell(g, lambda e: e.a_rob)]
        cells += [_spread_cell(g, lambda e, a=a: attack_value(e, a)[0]) for a in attacks]
        cells += [_text(first.extra.get("base_model")),
                  _seconds(statistics.fmean(cost) if cost else None)]
        rows.append({"cells": cells, "cls": "" if ranked else "weaker", "members": links})
    columns = _columns(attacks, [ENTRY_FIRST[0], Column("group"), Column("seeds", True, "members (training seeds)")],
                       [Column("base model")])
    return Table(table_id, title, columns, rows,
                 ["mean ± sample standard deviation over the group's entries, one per seed; hover a cell for "
                  "the single values", RANKING_NOTE.replace("ranked by AutoAttack", "ranked by mean AutoAttack", 1)])



def board_tables(entries: Sequence[Entry], groups: Sequence[SeedGroup], hrefs: dict[str, str]
                 ) -> tuple[list[Table], list[Table]]:
    """(entry tables, seed-group tables): one of each per comparability group; seed groups
    only where at least two entries differ by seed alone."""
    tables, group_tables = [], []
    for i, g in enumerate(comparable_groups(entries)):
        n = len(g.entries)
        tables.append(entry_table(f"entries-{i}", section_title(g, n, "entr" + ("y" if n == 1 else "ies")),
                                  g.entries, hrefs, g.ranked))
    many = [sg for sg in groups if len(sg.members) > 1]
    for i, g in enumerate(comparable_groups(many, rank=group_rank_key, ranked=group_ranked)):
        n = len(g.entries)
        group_tables.append(group_table(f"groups-{i}", section_title(g, n, "seed group" + ("" if n == 1 else "s")),
                                        g.entries, hrefs, g.ranked))
    return tables, group_tables


def short_labels(names: Sequence[str]) -> dict[str, str]:
    """Names without the prefix and suffix they all share (up to a '-', '_' or '.'), for crowded plots."""
    names = list(dict.fromkeys(names))
    if len(names) < 2:
        return {n: n for n in names}
    head = os.path.commonprefix(names)
    tail = os.path.commonprefix([n[::-1] for n in names])[::-1]
    cut_head = max((head.rfind(c) + 1 for c in "-_."), default=0)
    cut_tail = min((i for i in (tail.find(c) for c in "-_.") if i >= 0), default=len(tail))
    tail_len = len(tail) - cut_tail
    out = {}
    for n in names:
        short = n[cut_head:len(n) - tail_len] if tail_len else n[cut_head:]
        out[n] = short or n
    return out if len(set(out.values())) == len(out) else {n: n for n in names}


def board_scatter(entries: Sequence[Entry], hrefs: dict[str, str]) -> str | None:
    labels = short_labels([e.entry for e in entries])
    points = []
    for g in comparable_groups(entries):
        series = f"ε = {g.where.split('ε = ', 1)[1]}" if "ε = " in g.where else g.where
        series += "" if g.ranked else ", weaker (not ranked)"
        points += [Point(labels[e.entry], e.clean, e.robust, hrefs[e.entry], series) for e in g.entries
                   if e.clean is not None and e.robust is not None]
    return scatter_svg(points)
