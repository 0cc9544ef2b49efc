"""Reading leaderboard entries: type-checked JSON, and per-example files verified against their sha256."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import UserError
from ..utils import format_eps, parse_eps, sha256_file
from .write import finish_pending


def _text(v: Any) -> bool:
    return isinstance(v, str)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _flag(v: Any) -> bool:
    return isinstance(v, bool)


def _pct_text(v: Any) -> bool:
    """RobustBench writes percentages as strings ("55.80"); a number is accepted too."""
    if _number(v):
        return True
    try:
        float(v)
        return isinstance(v, str)
    except (TypeError, ValueError):
        return False


def _file_name(v: Any) -> bool:
    """A per-example file lies beside its JSON: a plain name, never a path."""
    return isinstance(v, str) and bool(v) and "/" not in v and "\\" not in v and v not in (".", "..")


def _text_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _accuracy_map(v: Any) -> bool:
    return isinstance(v, dict) and all(x is None or _number(x) for x in v.values())


def _severity_table(v: Any) -> bool:
    return isinstance(v, dict) and all(_accuracy_map(row) for row in v.values())


# What each field must be when present and not null, with the words an error message uses.
_TOP_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{k: (_text, "a string") for k in ("link", "name", "authors", "venue", "architecture", "footnote",
                                         "dataset", "eps")},
    **{k: (_flag, "true or false") for k in ("additional_data", "unreliable")},
    "number_forward_passes": (_integer, "an integer"),
    **{k: (_pct_text, "a percentage such as \"55.80\"") for k in ("clean_acc", "reported", "autoattack_acc",
                                                                  "external", "corruptions_acc")},
    "adt_ft": (lambda v: isinstance(v, dict), "an object"),
}
_BLOCK_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{k: (_text, "a string") for k in ("base_model", "method", "loss", "scope", "suite", "run_id", "recipe",
                                         "mode", "eps_str", "per_example_sha256", "data")},
    **{k: (_number, "a number") for k in ("a_rob", "clean_acc", "eps", "corruptions_acc")},
    **{k: (_integer, "an integer") for k in ("n_examples", "epochs", "seed", "train_seed")},
    "attacks": (_text_list, "a list of attack names"),
    **{k: (_accuracy_map, "an object of attack: accuracy") for k in ("per_attack", "cumulative")},
    "per_example_file": (_file_name, "a file name beside the JSON"),
    "baseline": (lambda v: isinstance(v, dict), "an object"),
    "per_corruption": (_accuracy_map, "an object of corruption: accuracy"),
    "corruptions": (_severity_table, "an object of corruption: {severity: accuracy}"),
}


def _check_fields(path: Path, data: dict[str, Any], spec: dict, prefix: str = "") -> None:
    for key, (ok, what) in spec.items():
        value = data.get(key)
        if value is not None and not ok(value):
            raise UserError(f"leaderboard entry {path}: field {prefix}{key} must be {what}, not "
                            f"{type(value).__name__} {json.dumps(value)[:40]}: fix or delete the file")


def validate(path: Path, data: Any) -> dict[str, Any]:
    """The entry's JSON object, or a UserError naming the first field of the wrong type."""
    if not isinstance(data, dict):
        raise UserError(f"leaderboard entry {path} is not a JSON object: fix or delete it")
    _check_fields(path, data, _TOP_FIELDS)
    block = data.get("adt_ft") or {}
    _check_fields(path, block, _BLOCK_FIELDS, "adt_ft.")
    if block.get("baseline"):
        _check_fields(path, block["baseline"], _BLOCK_FIELDS, "adt_ft.baseline.")
    return data


@dataclass
class Entry:
    entry: str
    path: Path
    dataset: str
    threat_model: str
    data: dict[str, Any]
    #: set by `verify_entries`: True/False when the per-example file was checked, None when not (or none exists)
    verified: bool | None = field(default=None, compare=False)
    problem: str | None = field(default=None, compare=False)

    @property
    def extra(self) -> dict[str, Any]:
        return self.data.get("adt_ft") or {}

    def _num(self, key: str) -> float | None:
        v = self.data.get(key)
        try:
            return None if v is None else float(v)
        except (TypeError, ValueError):
            return None

    @property
    def clean(self) -> float | None:
        return self._num("clean_acc")

    @property
    def autoattack(self) -> float | None:
        return self._num("autoattack_acc")

    @property
    def corruptions(self) -> float | None:
        """RobustBench's corruptions_acc: the mean accuracy over corruptions × severities (corruptions entries)."""
        return self._num("corruptions_acc")

    @property
    def is_corruptions(self) -> bool:
        return self.threat_model == "corruptions"

    @property
    def a_rob(self) -> float | None:
        v = self.extra.get("a_rob")
        return float(v) if v is not None else None

    @property
    def robust(self) -> float | None:
        """The number the leaderboard ranks by: A_rob, else RobustBench's external, else AutoAttack, else
        the mean corruption accuracy."""
        for v in (self.a_rob, self._num("external"), self.autoattack, self.corruptions):
            if v is not None:
                return v
        return None

    def attack_value(self, attack: str) -> tuple[float | None, bool]:
        """(accuracy, cumulative?) for an attack column ("corruptions": the mean corruption accuracy)."""
        if attack == "corruptions":
            return self.corruptions, False
        own = (self.extra.get("per_attack") or {}).get(attack)
        if own is not None:
            return float(own), False
        cum = (self.extra.get("cumulative") or {}).get(attack)
        return (float(cum), True) if cum is not None else (None, False)

    @property
    def attacks(self) -> list[str]:
        return list(self.extra.get("attacks") or [])

    @property
    def audit_verdict(self) -> str | None:
        """The recorded audit's verdict (pass, warn, fail; docs/evaluation.md, "Audit"), None when none ran,
        "n/a" for a corruptions entry (an audit checks attacks, and none ran)."""
        if self.is_corruptions:
            return "n/a"
        audit = self.extra.get("audit")
        verdict = audit.get("verdict") if isinstance(audit, dict) else None
        return verdict if verdict in ("pass", "warn", "fail") else None

    @property
    def eps(self) -> float | None:
        """The L∞ budget: adt-ft's float, else RobustBench's string ("8/255")."""
        v = self.extra.get("eps")
        if v is not None:
            return float(v)
        try:
            return parse_eps(self.data["eps"]) if self.data.get("eps") is not None else None
        except UserError:
            return None

    @property
    def eps_label(self) -> str | None:
        return None if self.eps is None else format_eps(self.eps)

    @property
    def n(self) -> int | None:
        """Number of evaluated examples (None for a RobustBench file of its own)."""
        v = self.extra.get("n_examples")
        return int(v) if v is not None else None

    @property
    def train_seed(self) -> int | None:
        v = self.extra.get("train_seed")
        return int(v) if v is not None else None

    @property
    def comparable_key(self) -> tuple:
        """Entries rank against each other only when all of this agrees."""
        return (self.dataset, self.threat_model, None if self.eps is None else round(self.eps, 8), self.n)


def read_entry(path: str | Path, dataset: str | None = None, threat_model: str | None = None) -> Entry:
    """One entry JSON; dataset and threat model default to its folders (`<dataset>/<threat_model>/x.json`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"leaderboard entry {path} is not valid JSON ({e}): fix or delete it") from None
    validate(path, data)
    ds = dataset or (data.get("dataset") if isinstance(data.get("dataset"), str) else None) or path.parent.parent.name
    return Entry(path.stem, path, ds, threat_model or path.parent.name, data)


def read_entries(root: str | Path, dataset: str | None = None, threat_model: str | None = None) -> list[Entry]:
    """Every entry under `root` (a leaderboard/ folder), optionally of one dataset and threat model."""
    root = Path(root)
    if not root.exists():
        return []
    if not root.is_dir():
        raise UserError(f"{root} is a file, not a leaderboard folder: move it away (entries go in "
                        f"{root}/<dataset>/<threat_model>/)")
    entries = []
    for path in sorted(root.glob("*/*/*.json")):
        ds, tm = path.parent.parent.name, path.parent.name
        if (dataset is not None and ds != dataset) or (threat_model is not None and tm != threat_model):
            continue
        entries.append(read_entry(path, ds, tm))
    return entries


@dataclass
class PerExampleCheck:
    path: Path | None     # the verified file; None when none is recorded or it failed
    problem: str | None   # None when it is fine (or there is nothing to check)


def check_per_example(entry: Entry, baseline: bool = False) -> PerExampleCheck:
    """Does the per-example file match the sha256 its JSON records? A write that
    stopped after its commit point is finished here (see `write`)."""
    block = entry.extra.get("baseline") if baseline else entry.extra
    name = (block or {}).get("per_example_file")
    if not name:
        return PerExampleCheck(None, None)
    sha = block.get("per_example_sha256")
    final = entry.path.with_name(name)
    if not sha:
        return PerExampleCheck(None, f"{entry.path.name} records no per_example_sha256 for {name}")
    if final.is_file() and sha256_file(final) == sha:
        return PerExampleCheck(final, None)
    try:
        if finish_pending(entry.path.parent, name, sha):
            return PerExampleCheck(final, None)
    except OSError:
        pass
    if not final.is_file():
        return PerExampleCheck(None, f"per-example file {name} is missing")
    return PerExampleCheck(None, f"per-example file {name} does not match the sha256 recorded in "
                                 f"{entry.path.name} (an interrupted or edited write)")


def verify_entries(entries: Iterable[Entry]) -> list[str]:
    """Check every entry's per-example file(s); marks each entry (`verified`, `problem`)
    and returns one warning line per entry that failed."""
    warnings = []
    for e in entries:
        checks = [check_per_example(e), check_per_example(e, baseline=True)]
        problems = [c.problem for c in checks if c.problem]
        recorded = any(c.path is not None for c in checks) or bool(problems)
        e.verified = None if not recorded else not problems
        e.problem = "; ".join(problems) or None
        if problems:
            warnings.append(f"entry {e.entry} ({e.path}): {e.problem}; its numbers cannot be checked "
                            f"per example: re-run its evaluation")
    return warnings


def find_entry(name: str | Path, root: str | Path) -> Entry:
    """An entry by name in the leaderboard folder `root`, or by the path of its JSON file."""
    text = str(name)
    as_path = Path(text).expanduser()
    if text.endswith(".json") or "/" in text or "\\" in text:
        if not as_path.is_file():
            raise UserError(f"no leaderboard entry file {text}: give an entry name or the path of an entry's JSON")
        return read_entry(as_path)
    matches = [e for e in read_entries(root) if e.entry == text]
    if len(matches) > 1:
        where = ", ".join(str(e.path) for e in matches)
        raise UserError(f"entry {text!r} exists more than once ({where}): give the path of its JSON instead")
    if not matches:
        known = sorted({e.entry for e in read_entries(root)})
        hint = f" (known: {', '.join(known[:6])}{', …' if len(known) > 6 else ''})" if known else ""
        raise UserError(f"no leaderboard entry {text!r} in {root}{hint}: give an entry name or a JSON path")
    return matches[0]
