"""Writing one leaderboard entry: its JSON and per-example CSV(s), consistent after any interruption.

An entry is two or three files (JSON, per-example CSV, baseline CSV) and no
filesystem renames two files at once. The JSON is the commit point:

1. each CSV is written (atomically) under a hidden staging name that carries its
   sha256: `.<entry>.per-example.csv.<sha16>.staged`;
2. the JSON, which records each CSV's final name and sha256, is renamed into place;
3. each staged CSV is renamed to its final name.

Killed before step 2, the old JSON and the old CSV are still on disk and still
agree (the orphaned staged file is removed by the next write of that entry).
Killed between 2 and 3, the JSON is new and the staged CSV that matches it is
there: readers (`entries.check_per_example`) finish the rename. A reader
therefore never pairs a JSON with a CSV of another evaluation without noticing.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..utils import atomic_write_json, atomic_write_text, format_eps, versions
from ..workspace import check_plain_name

_ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_CONTEXT_FIRST = ("base_model", "method", "loss", "scope", "epochs", "recipe", "run_id", "suite")


def check_entry_name(entry: str) -> str:
    if not isinstance(entry, str) or not _ENTRY_NAME.match(entry) or entry.endswith(".json"):
        raise UserError(f"entry name {entry!r} must be letters, digits, '.', '_', '+' or '-' (no path, no .json)")
    return entry


def entry_dir(root: str | Path, dataset: str, threat_model: str) -> Path:
    return Path(root) / dataset / threat_model


def staged_name(csv_name: str, sha: str) -> str:
    """The hidden name a per-example file has between staging and commit (see the module docstring)."""
    return f".{csv_name}.{sha[:16]}.staged"


def _pct_str(v: float | None) -> str | None:
    return None if v is None else f"{v:.2f}"


def autoattack_accuracy(result) -> float | None:
    """AutoAttack's own accuracy, or None when it did not run on every clean-correct example."""
    if "autoattack" not in result.attacks:
        return None
    own = result.per_attack.get("autoattack")
    if own is not None:
        return own
    pointwise = [result.attacks[k] for k in result.pointwise]
    if pointwise and pointwise[0] == "autoattack":  # cascade, but AutoAttack went first
        return result.cumulative["autoattack"]
    return None


def _stage_csv(folder: Path, csv_name: str, result) -> tuple[Path, str]:
    """Step 1: the per-example file under its staging name; returns (staged path, sha256)."""
    data = result.csv_text().encode("utf-8")
    sha = hashlib.sha256(data).hexdigest()
    staged = folder / staged_name(csv_name, sha)
    atomic_write_text(staged, data.decode("utf-8"))
    return staged, sha


def _finish(staged: Path, final: Path) -> None:
    """Step 3: the committed CSV takes its final name."""
    os.replace(staged, final)


def finish_pending(folder: Path, csv_name: str, sha: str) -> bool:
    """Step 3 of a write that was interrupted after its commit: when the staged file
    that the JSON names is there, give it its final name. True when it was."""
    staged = folder / staged_name(csv_name, sha)
    if not staged.is_file():
        return False
    _finish(staged, folder / csv_name)
    return True


def _committed_files(json_path: Path) -> list[tuple[str, str]]:
    """(per-example file, sha256) pairs that an existing entry JSON records; [] when unreadable."""
    try:
        block = json.loads(json_path.read_text()).get("adt_ft") or {}
        pairs = [block, block.get("baseline") or {}]
        return [(p["per_example_file"], p["per_example_sha256"]) for p in pairs
                if isinstance(p.get("per_example_file"), str) and isinstance(p.get("per_example_sha256"), str)]
    except (OSError, ValueError, AttributeError, TypeError):
        return []


def _settle_previous(folder: Path, entry: str, csv_names: list[str]) -> None:
    """Complete an earlier write of this entry that stopped after its commit, then drop
    staged files that no JSON refers to (writes stopped before their commit)."""
    for name, sha in _committed_files(folder / f"{entry}.json"):
        if name in csv_names:
            finish_pending(folder, name, sha)
    for name in csv_names:
        for stale in folder.glob(f".{name}.*.staged"):
            stale.unlink(missing_ok=True)
    # The temporaries of atomic writes (`.<file>.<8 random>.tmp`) a killed write of this entry left: the
    # command writing now holds the entry's name, so none of them is another command's write in progress.
    for pattern in (f".{entry}.json.????????.tmp", *(f"..{name}.*.staged.????????.tmp" for name in csv_names)):
        for stale in folder.glob(pattern):
            stale.unlink(missing_ok=True)


def _descriptive_fields(info: dict[str, Any], entry: str, dataset: str) -> dict[str, Any]:
    """RobustBench's descriptive fields, taken out of `info`."""
    return {
        "link": str(info.pop("link", "") or ""),
        "name": str(info.pop("name", entry)),
        "authors": str(info.pop("authors", "") or ""),
        "additional_data": bool(info.pop("additional_data", False)),
        "number_forward_passes": int(info.pop("number_forward_passes", 1) or 1),
        "dataset": dataset,
        "venue": str(info.pop("venue", "") or "Unpublished"),
        "architecture": str(info.pop("architecture", "") or "unknown"),
    }


def _robustbench_fields(result, dataset: str, entry: str, info: dict[str, Any], footnote: str,
                        unreliable: bool) -> dict[str, Any]:
    aa = autoattack_accuracy(result)
    others = [result.attacks[k] for k in result.pointwise if result.attacks[k] != "autoattack"]
    data: dict[str, Any] = _descriptive_fields(info, entry, dataset)
    data.update(eps=format_eps(result.eps), clean_acc=_pct_str(result.clean_acc), reported=_pct_str(result.a_rob))
    if aa is not None:
        data["autoattack_acc"] = _pct_str(aa)
    if "autoattack" in result.attacks and others and result.a_rob is not None:
        data["external"] = _pct_str(result.a_rob)
    data["footnote"] = footnote
    data["unreliable"] = unreliable
    if info:
        raise ValueError(f"unknown RobustBench field(s) {sorted(info)}")
    return data


def write_entry(
    result,
    *,
    root: str | Path,
    dataset: str,
    entry: str,
    threat_model: str = "Linf",
    info: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
    baseline=None,
    baseline_label: str | None = None,
) -> Path:
    """Write `<root>/<dataset>/<threat_model>/<entry>.json` and the per-example
    CSV(s) beside it, in the order the module docstring explains; returns the JSON's path.

    `info` sets RobustBench's descriptive fields (name, link, authors, venue,
    architecture, additional_data, number_forward_passes, footnote); `context`
    goes under "adt_ft" (base_model, method, loss, scope, epochs, recipe, run_id,
    train_seed, suite, ...). `baseline` is the base model's EvalResult on the same examples.
    """
    check_entry_name(entry)
    check_plain_name(dataset, "the entry's dataset")  # folder names: never a path out of `root`
    check_plain_name(threat_model, "the entry's threat model")
    info = dict(info or {})
    context = dict(context or {})
    folder = entry_dir(root, dataset, threat_model)
    footnote = info.pop("footnote", None) or _footnote(result, dataset, context.get("suite"), context.get("data"))
    unreliable = bool(result.unreliable or (baseline is not None and baseline.unreliable))
    data = _robustbench_fields(result, dataset, entry, info, footnote, unreliable)

    csv_name = f"{entry}.per-example.csv"
    base_name = f"{entry}.baseline.per-example.csv"
    _settle_previous(folder, entry, [csv_name, base_name])
    stages = []
    staged, sha = _stage_csv(folder, csv_name, result)
    stages.append((staged, folder / csv_name))

    block: dict[str, Any] = {k: context.pop(k, None) for k in _CONTEXT_FIRST}
    block.update(context)
    block.update(result.to_json())
    block["per_example_file"] = csv_name
    block["per_example_sha256"] = sha
    block["versions"] = versions()
    block["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if baseline is not None:
        base_staged, base_sha = _stage_csv(folder, base_name, baseline)
        stages.append((base_staged, folder / base_name))
        base_block = baseline.to_json()
        base_block.update(model=baseline_label, per_example_file=base_name, per_example_sha256=base_sha)
        block["baseline"] = base_block
    data["adt_ft"] = block
    path = folder / f"{entry}.json"
    atomic_write_json(path, data)  # the commit point
    for staged_path, final in stages:
        _finish(staged_path, final)
    return path


#: the folder of RobustBench's corruptions leaderboard, beside Linf and L2
CORRUPTIONS = "corruptions"


def write_corruption_entry(result, *, root: str | Path, dataset: str, entry: str, info: dict[str, Any] | None = None,
                           context: dict[str, Any] | None = None) -> Path:
    """Write `<root>/<dataset>/corruptions/<entry>.json` and its per-example CSV for a corruptions
    evaluation (`evaluation.corruptions.CorruptionResult`), in the order the module docstring explains.
    RobustBench's fields: `corruptions_acc` (the mean over corruptions × severities, also `reported`),
    `clean_acc` (null when the clean test set was not evaluated), no ε."""
    check_entry_name(entry)
    check_plain_name(dataset, "the entry's dataset")
    info, context = dict(info or {}), dict(context or {})
    folder = entry_dir(root, dataset, CORRUPTIONS)
    footnote = info.pop("footnote", None) or (
        f"adt-ft eval (suite corruptions) on the {context.get('data') or f'first {result.n_examples} test images'}: "
        "accuracy under each of RobustBench's 15 corruptions at severities 1-5; corruptions_acc is the mean of the "
        f"75 accuracies. Clean: {result.clean_note}.")
    if result.unreliable:
        footnote += " Sanity check failed: " + "; ".join(c.detail for c in result.sanity if c.ok is False)
    data = _descriptive_fields(info, entry, dataset)
    data.update(eps=None, clean_acc=_pct_str(result.clean_acc), corruptions_acc=_pct_str(result.corruptions_acc),
                reported=_pct_str(result.corruptions_acc), footnote=footnote, unreliable=bool(result.unreliable))
    if info:
        raise ValueError(f"unknown RobustBench field(s) {sorted(info)}")
    csv_name = f"{entry}.per-example.csv"
    _settle_previous(folder, entry, [csv_name])
    staged, sha = _stage_csv(folder, csv_name, result)
    block: dict[str, Any] = {k: context.pop(k, None) for k in _CONTEXT_FIRST}
    block.update(context)
    block.update(result.to_json())
    block.update(per_example_file=csv_name, per_example_sha256=sha, versions=versions(),
                 created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    data["adt_ft"] = block
    path = folder / f"{entry}.json"
    atomic_write_json(path, data)  # the commit point
    _finish(staged, folder / csv_name)
    return path


def _footnote(result, dataset: str, suite: str | None, data: str | None) -> str:
    attacks = ", ".join(result.attacks[k] for k in result.pointwise) or "none"
    data = data or f"first {result.n_examples} {dataset} test images"
    text = (f"adt-ft eval{f' (suite {suite})' if suite else ''}, {result.mode} mode, on the {data}; "
            f"robust accuracy is the per-example minimum over {attacks}.")
    if result.unreliable:
        failed = "; ".join(c.detail for c in result.sanity if c.ok is False)
        text += f" Sanity check failed: {failed}"
    return text


def set_audit(json_path: str | Path, audit: dict[str, Any]) -> None:
    """Record an audit (docs/evaluation.md, "Audit") under the entry's `adt_ft.audit`, atomically.
    The per-example file is untouched, so its recorded sha256 still holds."""
    path = Path(json_path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read leaderboard entry {path} ({e}): the audit was not recorded") from None
    if not isinstance(data, dict):
        raise UserError(f"leaderboard entry {path} is not a JSON object: the audit was not recorded")
    data.setdefault("adt_ft", {})["audit"] = audit
    atomic_write_json(path, data)
