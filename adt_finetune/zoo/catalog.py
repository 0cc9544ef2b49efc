"""RobustBench's model zoo as data: the shipped metadata table, name resolution, aliases.

Reading the table never imports RobustBench (which costs seconds), so listing and
resolving names stays fast. The table (`model_info.json`) is generated from
RobustBench's model_info files by `scripts/make_model_table.py`.
"""
from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

TABLE_PATH = Path(__file__).with_name("model_info.json")

# Short names researchers use for well-known entries. Each applies only where its
# target exists for the requested dataset and threat model.
ALIASES: dict[str, str] = {
    # The TRADES WRN-34-10 that the distributional fine-tuning paper used as its case study.
    "Zhang2019": "Zhang2019Theoretically",
    "TRADES": "Zhang2019Theoretically",
}

# Columns of model_info.json rows, in order.
COLUMNS = ("name", "architecture", "clean_acc", "autoattack_acc", "corruptions_acc", "reported", "additional_data",
           "venue", "title", "authors", "link", "eps", "footnote", "number_forward_passes", "unreliable", "checkpoint",
           "gdrive_id")

_DATASET_SPELLINGS = {"cifar-10": "cifar10", "cifar-100": "cifar100", "image-net": "imagenet"}


@dataclass(frozen=True)
class ZooEntry:
    """One RobustBench leaderboard entry.

    Accuracies are percentages as floats (None where RobustBench reports none);
    `title` is the paper's title (RobustBench calls it `name`). `checkpoint` says how
    RobustBench serves the weights: "gdrive" (one file), "ensemble" (several files
    `<Name>.pt_m<i>.pt`), "timm" (from the Hugging Face Hub through timm), "torchvision"
    (torchvision's pretrained weights: ImageNet's Standard_R50), or None for
    leaderboard-only entries that have no loadable checkpoint.
    """

    name: str
    dataset: str
    threat_model: str
    architecture: str
    clean_acc: float | None
    autoattack_acc: float | None
    additional_data: bool
    venue: str
    title: str
    authors: str
    link: str
    eps: float | None
    footnote: str | None
    number_forward_passes: int
    corruptions_acc: float | None = None
    reported: float | None = None
    unreliable: bool = False
    checkpoint: str | None = None
    gdrive_id: str | tuple[str, ...] | None = None

    @property
    def robust_acc(self) -> float | None:
        """The leaderboard's robustness number: AutoAttack, or corruption accuracy for 'corruptions'."""
        return self.autoattack_acc if self.autoattack_acc is not None else self.corruptions_acc

    @property
    def loadable(self) -> bool:
        return self.checkpoint is not None

    def describe(self) -> str:
        """'Name (architecture, AA 53.08%)' — how candidates are listed in messages."""
        acc = self.robust_acc
        label = "AA" if self.autoattack_acc is not None else "robust"
        return f"{self.name} ({self.architecture}, {label} {acc:.2f}%)" if acc is not None else \
            f"{self.name} ({self.architecture})"


@functools.lru_cache(maxsize=None)
def _table() -> dict[str, dict[str, tuple[ZooEntry, ...]]]:
    try:
        raw = json.loads(TABLE_PATH.read_text())
    except (OSError, json.JSONDecodeError) as e:  # a broken install, not user input
        raise RuntimeError(f"the packaged zoo table {TABLE_PATH} is unreadable: {e}") from e
    columns = raw["columns"]
    table: dict[str, dict[str, tuple[ZooEntry, ...]]] = {}
    for dataset, by_tm in raw["models"].items():
        table[dataset] = {}
        for tm, rows in by_tm.items():
            entries = []
            for row in rows:
                rec: dict[str, Any] = dict(zip(columns, row))
                if isinstance(rec.get("gdrive_id"), list):
                    rec["gdrive_id"] = tuple(rec["gdrive_id"])
                entries.append(ZooEntry(dataset=dataset, threat_model=tm, **rec))
            table[dataset][tm] = tuple(entries)
    return table


def _available() -> str:
    return "; ".join(f"{ds}: {', '.join(tms)}" for ds, tms in _table().items())


def normalize_dataset(dataset: str) -> str:
    """The zoo's spelling of a dataset name; UserError when the zoo has no such dataset."""
    key = dataset.strip().lower()
    key = _DATASET_SPELLINGS.get(key, key)
    if key not in _table():
        raise UserError(f"the RobustBench zoo has no {dataset!r} models (it has {_available()}): "
                        "use `from_file` with your own checkpoint for other datasets")
    return key


def normalize_threat_model(dataset: str, threat_model: str) -> str:
    """The zoo's spelling of a threat model for a dataset; UserError when that pair does not exist."""
    ds = normalize_dataset(dataset)
    by_lower = {tm.lower(): tm for tm in _table()[ds]}
    tm = by_lower.get(threat_model.strip().lower())
    if tm is None:
        raise UserError(f"the RobustBench zoo has no {ds} models for threat model {threat_model!r} "
                        f"(it has {_available()})")
    return tm


def catalog(dataset: str | None = None, threat_model: str | None = None) -> list[ZooEntry]:
    """All zoo entries, optionally for one dataset and/or threat model, in table order."""
    out: list[ZooEntry] = []
    datasets = [normalize_dataset(dataset)] if dataset is not None else list(_table())
    for ds in datasets:
        if threat_model is not None:
            tms = [normalize_threat_model(ds, threat_model)] if dataset is not None else \
                [tm for tm in _table()[ds] if tm.lower() == threat_model.strip().lower()]
        else:
            tms = list(_table()[ds])
        for tm in tms:
            out.extend(_table()[ds][tm])
    if dataset is None and threat_model is not None and not out:
        raise UserError(f"the RobustBench zoo has no models for threat model {threat_model!r} (it has {_available()})")
    return out


def search(query: str | None, dataset: str | None = "cifar10", threat_model: str | None = "Linf") -> list[ZooEntry]:
    """Entries whose name, alias, architecture, title or venue contains `query` (case-insensitive)."""
    entries = catalog(dataset, threat_model)
    if not query:
        return entries
    q = query.strip().lower()
    aliased = {target for alias, target in ALIASES.items() if q in alias.lower()}
    return [e for e in entries
            if q in e.name.lower() or e.name in aliased or q in e.architecture.lower() or q in e.title.lower()
            or q in e.venue.lower()]


def _listing(entries: list[ZooEntry], limit: int = 8) -> str:
    shown = ", ".join(e.describe() for e in entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def resolve_name(name: str, dataset: str = "cifar10", threat_model: str = "Linf") -> ZooEntry:
    """A zoo entry for a user-typed name.

    Order: exact name, the alias table, exact name ignoring case, unique
    case-insensitive prefix. Anything else is a UserError that lists the candidates
    (ambiguous prefix) or the closest names (unknown name).
    """
    ds = normalize_dataset(dataset)
    tm = normalize_threat_model(ds, threat_model)
    entries = _table()[ds][tm]
    by_name = {e.name: e for e in entries}
    query = name.strip()
    if not query:
        raise UserError("empty model name: give a RobustBench name such as Zhang2019Theoretically (adt-ft models lists them)")
    if query in by_name:
        return by_name[query]
    alias = {k.lower(): v for k, v in ALIASES.items()}.get(query.lower())
    if alias in by_name:
        return by_name[alias]
    lower = query.lower()
    same = [e for e in entries if e.name.lower() == lower]
    if len(same) == 1:
        return same[0]
    prefixed = [e for e in entries if e.name.lower().startswith(lower)]
    if len(prefixed) == 1:
        return prefixed[0]
    if prefixed:
        raise UserError(f"{query!r} is ambiguous among {ds}/{tm} models: {_listing(prefixed)}; give more of the name")
    lowered = {e.name.lower(): e for e in entries}
    close = difflib.get_close_matches(lower, list(lowered), n=5, cutoff=0.5)
    contains = [e.name.lower() for e in entries if lower in e.name.lower() and e.name.lower() not in close]
    suggestions = [lowered[n] for n in close + contains][:5]
    hint = f"did you mean {_listing(suggestions)}? " if suggestions else ""
    raise UserError(f"unknown model {query!r} for {ds}/{tm}: {hint}(adt-ft models `dataset` {ds} "
                    f"`threat_model` {tm} lists all {len(entries)})")
