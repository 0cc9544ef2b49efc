"""Entries that differ only by seed, as one group: mean ± standard deviation over its members.

Two entries belong together when they share the base model, method, loss, scope,
epochs, suite, attacks, dataset, threat model, ε and number of evaluated examples (from
each JSON's "adt_ft" block). The training seed of each member is shown when it
is known: from the entry (`adt_ft.train_seed`), else from the run's run.json in
the workspace; an entry without an "adt_ft" block (a RobustBench file) stays alone.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import UserError
from ..run_folder import load_run
from ..utils import format_pct
from .entries import Entry
from .render import (Section, attack_columns, check_format, comparable_groups, notes, ranked_evaluation,
                     render_sections, section_title)

SEED_FIELDS = ("base_model", "method", "loss", "scope", "epochs", "suite")
GROUP_HEADERS = ["group", "base model", "seeds", "ε", "n", "clean", "AutoAttack", "A_rob"]
SPREAD_NOTE = ("mean ± sample standard deviation over the group's entries (one per seed); a single number "
               "is a group of one")


def seed_key(e: Entry) -> tuple:
    if not e.extra:
        return ("file", str(e.path))
    # The same evaluation too: entries with different attack sets are not seeds of one result.
    return e.comparable_key + tuple(e.extra.get(k) for k in SEED_FIELDS) + (tuple(e.attacks), ranked_evaluation(e))


def train_seed(entry: Entry, workspace: str | Path | None = None) -> int | None:
    """The seed the entry's model was trained with, when it is recorded anywhere."""
    if entry.train_seed is not None:
        return entry.train_seed
    run_id = entry.extra.get("run_id")
    if workspace is None or not run_id:
        return None
    try:
        seed = load_run(run_id, workspace, require_finished=False).meta.get("seed")
    except (UserError, OSError, ValueError, KeyError, TypeError):
        return None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


@dataclass
class Spread:
    mean: float | None
    sd: float | None          # None for fewer than two values
    values: list[float]

    def text(self) -> str:
        if self.mean is None:
            return format_pct(None)
        return format_pct(self.mean) + ("" if self.sd is None else f" ± {self.sd:.2f}")

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "sd": self.sd, "values": self.values}


def spread(values: Iterable[float | None]) -> Spread:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return Spread(None, None, [])
    return Spread(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, vals)


@dataclass
class SeedGroup:
    members: list[Entry]
    seeds: list[int | None]

    @property
    def first(self) -> Entry:
        return self.members[0]

    @property
    def label(self) -> str:
        x = self.first.extra
        parts = [str(x[k]) for k in ("method", "loss", "scope") if x.get(k)]
        if x.get("epochs") is not None:
            parts.append(f"{x['epochs']} ep")
        return " · ".join(parts) or (x.get("base_model") or self.first.entry)

    @property
    def comparable_key(self) -> tuple:
        return self.first.comparable_key

    def stat(self, value: Callable[[Entry], float | None]) -> Spread:
        return spread(value(e) for e in self.members)

    @property
    def robust(self) -> float | None:
        return self.stat(lambda e: e.robust).mean

    def seeds_text(self) -> str:
        return ",".join("?" if s is None else str(s) for s in self.seeds)


def group_by_seed(entries: Iterable[Entry], workspace: str | Path | None = None) -> list[SeedGroup]:
    """Seed groups in the order their first member appears."""
    by_key: dict[tuple, list[Entry]] = {}
    for e in entries:
        by_key.setdefault(seed_key(e), []).append(e)
    return [SeedGroup(m, [train_seed(e, workspace) for e in m]) for m in by_key.values()]


def group_ranked(g: SeedGroup) -> bool:
    """A seed group ranks when every member ran AutoAttack (standard) on every clean-correct example."""
    return all(ranked_evaluation(e) for e in g.members)


def group_rank_key(g: SeedGroup) -> tuple:
    """Mean AutoAttack first (ranked groups), then mean robust accuracy, as `render` ranks entries."""
    def num(v: float | None) -> float:
        return v if v is not None else -math.inf

    aa = g.stat(lambda e: e.autoattack).mean if group_ranked(g) else None
    return (-num(aa) if group_ranked(g) else 0.0, -num(g.robust), g.label)


def _group_row(g: SeedGroup, where: str, rank: int | None, attack_cols: list[str]) -> dict[str, Any]:
    x = g.first.extra
    row: dict[str, Any] = {
        "group": g.label, "members": [e.entry for e in g.members], "seeds": g.seeds,
        **{k: x.get(k) for k in SEED_FIELDS}, "dataset": g.first.dataset, "threat_model": g.first.threat_model,
        "eps": g.first.eps_label, "n": g.first.n,
        "clean": g.stat(lambda e: e.clean).to_json(), "autoattack": g.stat(lambda e: e.autoattack).to_json(),
        "a_rob": g.stat(lambda e: e.a_rob).to_json(), "robust": g.stat(lambda e: e.robust).to_json(),
        "comparability_group": where, "ranked": rank is not None, "rank_in_group": rank, "attacks": {}, "cumulative_columns": [],
    }
    for a in attack_cols:
        row["attacks"][a] = g.stat(lambda e: e.attack_value(a)[0]).to_json()
        if any(e.attack_value(a)[1] for e in g.members):
            row["cumulative_columns"].append(a)
    return row


def group_rows(groups: Iterable[SeedGroup]) -> tuple[list[str], list[dict[str, Any]]]:
    """Seed groups as plain rows, ranked by mean robust accuracy within each comparability group."""
    blocks = comparable_groups(groups, rank=group_rank_key, ranked=group_ranked)
    attack_cols = attack_columns([e for b in blocks for g in b.entries for e in g.members])
    return attack_cols, [_group_row(g, b.where, b.rank(i), attack_cols) for b in blocks
                         for i, g in enumerate(b.entries)]


def _cells(row: dict[str, Any], attack_cols: list[str]) -> list[str]:
    def txt(d: dict[str, Any]) -> str:
        return Spread(d["mean"], d["sd"], d["values"]).text()

    seeds = ",".join("?" if s is None else str(s) for s in row["seeds"])
    out = [row["group"], row["base_model"] or "", f"{len(row['members'])} ({seeds})", row["eps"] or "?",
           "?" if row["n"] is None else str(row["n"]), txt(row["clean"]), txt(row["autoattack"]), txt(row["a_rob"])]
    return out + [txt(row["attacks"][a]) + ("*" if a in row["cumulative_columns"] else "") for a in attack_cols]


def group_sections(groups: Iterable[SeedGroup]) -> tuple[list[Section], list[str]]:
    groups = list(groups)
    attack_cols, data = group_rows(groups)
    parts: list[Section] = []
    for b in comparable_groups(groups, rank=group_rank_key, ranked=group_ranked):
        mine = [r for r in data if r["comparability_group"] == b.where and r["ranked"] == b.ranked]
        title = section_title(b, len(mine), "group" + ("" if len(mine) == 1 else "s"))
        parts.append(Section(title, GROUP_HEADERS + attack_cols, [_cells(r, attack_cols) for r in mine]))
    flat = [{"cumulative": dict.fromkeys(r["cumulative_columns"])} for r in data]
    return parts, [SPREAD_NOTE] + notes(flat)


def render_groups(groups: Iterable[SeedGroup], fmt: str = "table", title: str | None = None) -> str:
    """Seed groups as text, Markdown or JSON, like `render` for single entries."""
    check_format(fmt)
    groups = list(groups)
    if fmt == "json":
        return json.dumps(group_rows(groups)[1], indent=2) + "\n"
    parts, notes_ = group_sections(groups)
    return render_sections(parts, notes_, fmt, title, n_text=2)

