"""Leaderboard entries: RobustBench model_info JSON plus everything else under "adt_ft".

One file per entry at `leaderboard/<dataset>/<threat_model>/<entry>.json`, with
RobustBench's fields and types (the layout of RobustBench's `model_info/`
folders, so its own leaderboard code reads the folder):

    link, name, authors, venue, architecture, footnote   strings (footnote may be null)
    additional_data, unreliable                          bools
    number_forward_passes                                int
    dataset, eps                                         strings ("cifar10", "8/255" or "0.1")
    clean_acc, reported, autoattack_acc, external        percentages as strings with two decimals

- `autoattack_acc` is written only when AutoAttack ran on every clean-correct
  example (independent mode, or AutoAttack first in cascade): otherwise there is
  no AutoAttack accuracy to report, and writing another number under that name
  would be wrong.
- `external` (RobustBench's field for a stronger evaluation than AutoAttack)
  holds A_rob when AutoAttack ran together with other attacks: the per-example
  minimum over AutoAttack and more is at most AutoAttack's accuracy.
  RobustBench ranks by `external`, then `autoattack_acc`; an entry with neither
  (no AutoAttack in the suite) is listed by `adt-ft leaderboard` but cannot be
  ranked by RobustBench's own code.
- `reported` is this evaluation's A_rob (the robust accuracy the entry claims);
  `unreliable` is true when a sanity check failed.
- The per-example file sits beside the JSON as `<entry>.per-example.csv`
  (and `<entry>.baseline.per-example.csv` with --baseline), its sha256 in the JSON.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import UserError
from .utils import atomic_path, atomic_write_json, format_eps, versions

ROBUSTBENCH_FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                      "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "external", "footnote",
                      "unreliable")
_ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
FORMATS = ("table", "markdown", "json")


def check_entry_name(entry: str) -> str:
    if not _ENTRY_NAME.match(entry or "") or entry.endswith(".json"):
        raise UserError(f"entry name {entry!r} must be letters, digits, '.', '_', '+' or '-' (no path, no .json)")
    return entry


def entry_dir(root: str | Path, dataset: str, threat_model: str) -> Path:
    return Path(root) / dataset / threat_model


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
    CSV(s) beside it, all atomically; returns the JSON's path.

    `info` sets RobustBench's descriptive fields (name, link, authors, venue,
    architecture, additional_data, number_forward_passes, footnote); `context`
    goes under "adt_ft" (base_model, method, loss, scope, epochs, recipe, run_id,
    suite, ...). `baseline` is the base model's EvalResult on the same examples.
    """
    check_entry_name(entry)
    info = dict(info or {})
    context = dict(context or {})
    folder = entry_dir(root, dataset, threat_model)
    csv_path = folder / f"{entry}.per-example.csv"
    sha = result.write_csv(csv_path)

    aa = autoattack_accuracy(result)
    others = [result.attacks[k] for k in result.pointwise if result.attacks[k] != "autoattack"]
    suite = context.get("suite")
    footnote = info.pop("footnote", None) or _footnote(result, dataset, suite, context.get("data"))

    data: dict[str, Any] = {
        "link": str(info.pop("link", "") or ""),
        "name": str(info.pop("name", entry)),
        "authors": str(info.pop("authors", "") or ""),
        "additional_data": bool(info.pop("additional_data", False)),
        "number_forward_passes": int(info.pop("number_forward_passes", 1) or 1),
        "dataset": dataset,
        "venue": str(info.pop("venue", "") or "Unpublished"),
        "architecture": str(info.pop("architecture", "") or "unknown"),
        "eps": format_eps(result.eps),
        "clean_acc": _pct_str(result.clean_acc),
        "reported": _pct_str(result.a_rob),
    }
    if aa is not None:
        data["autoattack_acc"] = _pct_str(aa)
    if "autoattack" in result.attacks and others and result.a_rob is not None:
        data["external"] = _pct_str(result.a_rob)
    data["footnote"] = footnote
    data["unreliable"] = bool(result.unreliable or (baseline is not None and baseline.unreliable))
    if info:
        raise ValueError(f"unknown RobustBench field(s) {sorted(info)}")

    block: dict[str, Any] = {k: context.pop(k, None) for k in
                             ("base_model", "method", "loss", "scope", "epochs", "recipe", "run_id", "suite")}
    block.update(context)
    block.update(result.to_json())
    block["per_example_file"] = csv_path.name
    block["per_example_sha256"] = sha
    block["versions"] = versions()
    block["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if baseline is not None:
        base_csv = folder / f"{entry}.baseline.per-example.csv"
        base_sha = baseline.write_csv(base_csv)
        base_block = baseline.to_json()
        base_block.update(model=baseline_label, per_example_file=base_csv.name, per_example_sha256=base_sha)
        block["baseline"] = base_block
    data["adt_ft"] = block
    path = folder / f"{entry}.json"
    atomic_write_json(path, data)
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


# ---------------------------------------------------------------- reading and rendering

@dataclass
class Entry:
    entry: str
    path: Path
    dataset: str
    threat_model: str
    data: dict[str, Any]

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
    def a_rob(self) -> float | None:
        v = self.extra.get("a_rob")
        return float(v) if v is not None else None

    @property
    def robust(self) -> float | None:
        """The number the leaderboard ranks by: A_rob, else RobustBench's external, else AutoAttack."""
        for v in (self.a_rob, self._num("external"), self.autoattack):
            if v is not None:
                return v
        return None

    def attack_value(self, attack: str) -> tuple[float | None, bool]:
        """(accuracy, cumulative?) for an attack column."""
        own = (self.extra.get("per_attack") or {}).get(attack)
        if own is not None:
            return float(own), False
        cum = (self.extra.get("cumulative") or {}).get(attack)
        return (float(cum), True) if cum is not None else (None, False)

    @property
    def attacks(self) -> list[str]:
        return list(self.extra.get("attacks") or [])


def read_entries(root: str | Path, dataset: str | None = None, threat_model: str | None = None) -> list[Entry]:
    """Every entry under `root` (a leaderboard/ folder), optionally of one dataset and threat model."""
    root = Path(root)
    if not root.exists():
        return []
    entries = []
    for path in sorted(root.glob("*/*/*.json")):
        ds, tm = path.parent.parent.name, path.parent.name
        if (dataset is not None and ds != dataset) or (threat_model is not None and tm != threat_model):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"leaderboard entry {path} is not valid JSON ({e}): fix or delete it") from None
        if not isinstance(data, dict):
            raise UserError(f"leaderboard entry {path} is not a JSON object: fix or delete it")
        entries.append(Entry(path.stem, path, ds, tm, data))
    return entries


def sort_entries(entries: Iterable[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: (-(e.robust if e.robust is not None else -math.inf), e.entry))


def _attack_columns(entries: Sequence[Entry]) -> list[str]:
    cols: list[str] = []
    for e in entries:
        cols += [a for a in e.attacks if a not in cols and a != "autoattack"]
    return cols


def rows(entries: Iterable[Entry]) -> tuple[list[str], list[dict[str, Any]]]:
    """Sorted rows as plain values: (attack columns, [row dict])."""
    ordered = sort_entries(entries)
    attack_cols = _attack_columns(ordered)
    out = []
    for e in ordered:
        row: dict[str, Any] = {
            "entry": e.entry,
            "dataset": e.dataset,
            "threat_model": e.threat_model,
            "base_model": e.extra.get("base_model") or "",
            "method": e.extra.get("method") or "",
            "clean": e.clean,
            "autoattack": e.autoattack,
            "a_rob": e.a_rob,
            "robust": e.robust,
        }
        row["per_attack"] = {}
        row["cumulative"] = {}
        for a in attack_cols:
            v, cum = e.attack_value(a)
            (row["cumulative"] if cum else row["per_attack"])[a] = v
        out.append(row)
    return attack_cols, out


def _cells(row: dict[str, Any], attack_cols: list[str]) -> list[str]:
    def f(v):
        return "—" if v is None else f"{v:.2f}"

    cells = [row["entry"], row["base_model"], row["method"], f(row["clean"]), f(row["autoattack"]), f(row["a_rob"])]
    for a in attack_cols:
        if a in row["cumulative"]:
            cells.append(f(row["cumulative"][a]) + "*")
        else:
            cells.append(f(row["per_attack"].get(a)))
    return cells


HEADERS = ["entry", "base model", "method", "clean", "AutoAttack", "A_rob"]
CUMULATIVE_NOTE = "* cumulative (cascade mode): robust to this attack and every earlier one"


def table(entries: Iterable[Entry], title: str | None = None):
    """A rich Table of the entries, best robust accuracy first."""
    from rich.table import Table

    attack_cols, data = rows(entries)
    any_cum = any(r["cumulative"] for r in data)
    t = Table(title=title, caption=CUMULATIVE_NOTE if any_cum else None)
    for h in HEADERS + attack_cols:
        # Numbers never wrap or truncate; long names may wrap instead.
        numeric = h not in HEADERS[:3]
        t.add_column(h, justify="right" if numeric else "left", style="bold" if h == "A_rob" else None,
                     no_wrap=numeric, min_width=len(h) if numeric else min(20, max([len(h)] + [len(r[h.replace(" ", "_")]) for r in data])))
    for r in data:
        t.add_row(*_cells(r, attack_cols))
    return t


def render(entries: Iterable[Entry], fmt: str = "table", title: str | None = None) -> str:
    """The leaderboard as text: a terminal table, GitHub Markdown, or JSON rows."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}: choose from {', '.join(FORMATS)}")
    entries = list(entries)
    if fmt == "json":
        attack_cols, data = rows(entries)
        return json.dumps(data, indent=2) + "\n"
    if fmt == "markdown":
        attack_cols, data = rows(entries)
        header = HEADERS + attack_cols
        lines = []
        if title:
            lines += [f"### {title}", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|")
        for r in data:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(r, attack_cols)) + " |")
        if any(r["cumulative"] for r in data):
            lines += ["", CUMULATIVE_NOTE.replace("*", "\\*", 1)]
        return "\n".join(lines) + "\n"
    import io

    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=200, color_system=None).print(table(entries, title))
    return buf.getvalue()


def plot(entries: Iterable[Entry], path: str | Path) -> Path:
    """Clean vs robust accuracy scatter and per-attack bars, saved atomically (format from the suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attack_cols, data = rows(entries)
    if not data:
        raise UserError("no leaderboard entries to plot")
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for r in data:
        if r["clean"] is not None and r["robust"] is not None:
            ax1.scatter(r["clean"], r["robust"])
            ax1.annotate(r["entry"], (r["clean"], r["robust"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax1.set_xlabel("clean accuracy (%)")
    ax1.set_ylabel("robust accuracy (%) (A_rob, else AutoAttack)")
    ax1.set_title("clean vs robust")
    ax1.grid(alpha=0.3)
    cols = ["clean", *attack_cols, "A_rob"]
    width = 0.8 / max(1, len(data))
    for j, r in enumerate(data):
        vals = [r["clean"]] + [r["per_attack"].get(a, r["cumulative"].get(a)) for a in attack_cols] + [r["a_rob"]]
        xs = [i + j * width for i in range(len(cols))]
        ax2.bar(xs, [v if v is not None else 0.0 for v in vals], width=width, label=r["entry"])
    ax2.set_xticks([i + width * (len(data) - 1) / 2 for i in range(len(cols))])
    ax2.set_xticklabels(cols, rotation=45, ha="right")
    ax2.set_ylabel("accuracy (%)")
    ax2.set_title("per attack")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt)
    plt.close(fig)
    return path
