"""What one entry's page shows, as plain data for the template: headline numbers, per-attack
bars, the before → after against the base model, training and evaluation settings, sanity
checks, versions, and the per-example files."""
from __future__ import annotations

import json
from typing import Any

from ..leaderboard.entries import Entry
from ..leaderboard.render import ranked_evaluation
from ..utils import format_pct
from .board import AUTOATTACK, attack_value, board_attacks, cost_per_epoch
from .plots import Bar, bars_svg

# adt_ft fields shown in a section of their own; everything else lands under "other fields".
_TRAINING = ("base_model", "model_source", "method", "loss", "scope", "epochs", "recipe", "run_id", "train_seed",
             "train_examples", "train_device", "time_per_epoch_s", "mean_time_per_epoch_s")
_EVALUATION = ("suite", "mode", "data", "n_examples", "eps_str", "seed", "batch_size", "device", "amp",
               "amp_attacks", "excluded_from_a_rob", "per_attack_note")
_SHOWN = set(_TRAINING) | set(_EVALUATION) | {
    "attacks", "clean_acc", "per_attack", "cumulative", "a_rob", "timings_s", "max_linf", "max_l2", "attack_settings",
    "sanity", "unreliable", "versions", "created", "baseline", "per_example_file", "per_example_sha256", "eps",
    "wasserstein", "corruptions", "per_corruption", "corruptions_acc"}


def _value(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and all(isinstance(t, (int, float)) for t in v):
        return ", ".join(f"{t:.1f}" if isinstance(t, float) else str(t) for t in v) or "—"
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False, sort_keys=True)
    return str(v)


def _kv(block: dict[str, Any], keys) -> list[tuple[str, str]]:
    return [(k, _value(block[k])) for k in keys if k in block and block[k] not in (None, [], {})]


def _block_value(block: dict[str, Any], attack: str) -> tuple[float | None, bool]:
    own = (block.get("per_attack") or {}).get(attack)
    if own is not None:
        return float(own), False
    cum = (block.get("cumulative") or {}).get(attack)
    return (float(cum), True) if cum is not None else (None, False)


def _change(before: float | None, after: float | None) -> tuple[str, str]:
    if before is None or after is None:
        return "—", ""
    d = after - before
    return f"{d:+.2f}", "up" if d > 0 else "down" if d < 0 else ""


def before_after(e: Entry) -> dict[str, Any] | None:
    """Rows of (measure, before, after, change) against the base model, when the entry has a baseline."""
    base = e.extra.get("baseline")
    if not isinstance(base, dict):
        return None
    rows = []
    pairs = [("clean", base.get("clean_acc"), e.clean)]
    pairs += [("AutoAttack" if a == AUTOATTACK else a, _block_value(base, a)[0], attack_value(e, a)[0])
              for a in board_attacks([e])]
    pairs.append(("A_rob", base.get("a_rob"), e.a_rob))
    for label, before, after in pairs:
        change, cls = _change(before, after)
        rows.append({"label": label, "before": format_pct(before), "after": format_pct(after), "change": change,
                     "cls": cls})
    return {"model": base.get("model") or e.extra.get("base_model") or "base model", "rows": rows}


def _bars(e: Entry) -> tuple[str | None, bool]:
    """The per-attack bars as SVG, and whether any of them is cumulative (drawn hatched)."""
    base = e.extra.get("baseline") if isinstance(e.extra.get("baseline"), dict) else None
    bars = [Bar("clean", e.clean, None if base is None else base.get("clean_acc"))]
    for a in board_attacks([e]):
        v, cum = attack_value(e, a)
        bars.append(Bar("AutoAttack" if a == AUTOATTACK else a, v,
                        None if base is None else _block_value(base, a)[0], cum))
    bars.append(Bar("A_rob", e.a_rob, None if base is None else base.get("a_rob")))
    return bars_svg(bars), any(b.cumulative and b.value is not None for b in bars)


def _attack_rows(x: dict[str, Any]) -> list[dict[str, str]]:
    # An L2 entry records its distances as max_l2 (the page heads the column with the entry's norm).
    dist = x.get("max_l2") or x.get("max_linf") or {}
    settings, timings, linf = x.get("attack_settings") or {}, x.get("timings_s") or {}, dist
    rows = []
    for a in x.get("attacks") or []:
        own = {k: v for k, v in (settings.get(a) or {}).items() if k not in ("eps", "seed", "threat_model")}
        t, m = timings.get(a), linf.get(a)
        rows.append({"attack": a, "settings": _value(own) if own else "defaults",
                     "seconds": "—" if t is None else f"{t:.1f}", "max_linf": "—" if m is None else f"{m:.6g}"})
    return rows


def _sanity(x: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    for c in x.get("sanity") or []:
        if isinstance(c, dict):
            ok = c.get("ok")
            out.append({"name": str(c.get("name", "")), "detail": str(c.get("detail", "")),
                        "mark": "✓" if ok is True else "✗" if ok is False else "?",
                        "cls": "ok" if ok is True else "fail" if ok is False else "unknown"})
    return out


def _corruption_rows(x: dict[str, Any]) -> dict[str, Any] | None:
    """A corruptions entry's accuracies: one row per corruption (severities 1-5, mean), then the means."""
    table, means = x.get("corruptions"), x.get("per_corruption") or {}
    if not isinstance(table, dict) or not table:
        return None
    severities = list(next(iter(table.values())))
    rows = [{"name": c, "cells": [format_pct(row.get(s)) for s in severities] + [format_pct(means.get(c))]}
            for c, row in table.items()]
    per_severity = [sum(row.get(s) or 0.0 for row in table.values()) / len(table) for s in severities]
    rows.append({"name": "mean", "cells": [format_pct(v) for v in per_severity]
                 + [format_pct(x.get("corruptions_acc"))]})
    return {"severities": severities, "rows": rows}


def entry_view(e: Entry, files: dict[str, Any]) -> dict[str, Any]:
    """Everything the entry template needs; `files` names the copied per-example files."""
    x = e.extra
    cost = cost_per_epoch(e)
    cards = [("clean", format_pct(e.clean)), ("A_rob", format_pct(e.a_rob)),
             ("AutoAttack", format_pct(e.autoattack)), ("ε", e.eps_label or "—"),
             ("n", "—" if e.n is None else str(e.n)), ("s / epoch", "—" if cost is None else f"{cost:.1f}")]
    if e.is_corruptions:  # no attack ran: the mean corruption accuracy stands where A_rob would
        cards[1:3] = [("corruptions", format_pct(e.corruptions))]
    top = {k: v for k, v in e.data.items() if k != "adt_ft"}
    other = sorted(k for k in x if k not in _SHOWN)
    bars, hatched = _bars(e)
    return {
        "entry": e.entry, "name": e.data.get("name") or e.entry, "dataset": e.dataset,
        "threat_model": e.threat_model, "norm": "₂" if e.threat_model == "L2" else "∞", "unreliable": bool(e.data.get("unreliable")),
        "problem": e.problem, "cards": cards, "bars_svg": bars, "hatched": hatched,
        "weaker": not ranked_evaluation(e), "before_after": before_after(e),
        "training": _kv(x, _TRAINING), "evaluation": _kv(x, _EVALUATION), "attacks": _attack_rows(x),
        "sanity": _sanity(x), "versions": _kv(x.get("versions") or {}, list((x.get("versions") or {}).keys())),
        "created": x.get("created"), "robustbench": [(k, _value(v)) for k, v in top.items()],
        "wasserstein": None if not x.get("wasserstein") else json.dumps(x["wasserstein"], indent=2,
                                                                        ensure_ascii=False),
        "other": _kv(x, other), "files": files, "corruptions": _corruption_rows(x),
    }
