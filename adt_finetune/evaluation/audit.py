"""The robustness-evaluation audit (docs/evaluation.md, "Audit"): Carlini et al. 2019's checklist
("On Evaluating Adversarial Robustness") as a function, with calibrated verdicts.

`audit_model` attacks a model and judges every check; `audit_entry` judges what a
leaderboard entry's per-example flags alone support and says which checks it had to
skip; `audit_workspace` is `adt-ft audit` (and `eval --audit`) as a function. The
verdicts and their thresholds are in `audit_checks`; the probes in `audit_probes`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..attacks import ATTACKS, make_attack
from ..attacks.eot import ExpectationModel
from ..errors import UserError
from ..leaderboard import check_per_example
from ..progress import Reporter
from . import audit_checks as ac
from .audit_probes import attack_flags, gradient_stats, randomness_probe, transfer_flags
from .engine import clean_pass, evaluate
from .result import read_per_example_csv
from .sanity import check_finite_weights

#: the audit's own suite: the white-box attacks in order, then the gradient-free one (run in cascade, it
#: only attacks what every white-box attack left, which is all the black-box check counts)
WHITE_BOX = ["pgd20", "apgd-ce", "apgd-t"]
BLACK_BOX = ["square"]
#: the convergence check's stronger attack: PGD with this many steps, from this many random starts
STRONG_STEPS, STRONG_RESTARTS = 100, 3
DEFAULT_AUDIT_EXAMPLES = 200
ALL_CHECKS = ("black-box vs white-box", "unbounded attack", "convergence", "transfer", "gradient health",
              "saturated softmax", "randomness", "wasserstein upper bounds")


@dataclass
class AuditReport:
    checks: list[ac.AuditCheck]
    skipped: dict[str, str]          # check name -> why it did not run
    source: str                      # "model" (attacked here) or "entry" (judged from its flags)
    n_examples: int
    eps: float
    seed: int = 0
    time_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return ac.overall(self.checks)

    def check(self, name: str) -> ac.AuditCheck | None:
        return next((c for c in self.checks if c.name == name), None)

    @property
    def upper_bounds(self) -> list[str]:
        w = self.check("wasserstein upper bounds")
        return list(w.numbers.get("upper_bounds", [])) if w is not None else []

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "source": self.source, "n_examples": self.n_examples, "eps": self.eps,
                "seed": self.seed, "time_s": round(self.time_s, 3), "checks": [c.to_json() for c in self.checks],
                "skipped": [{"name": k, "reason": v} for k, v in self.skipped.items()],
                "upper_bounds": self.upper_bounds, **self.extra}


def _pct(k: int | float, n: int) -> float:
    return 100.0 * float(k) / n if n else 0.0


@dataclass
class _Ctx:
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    eps: float
    device: torch.device
    batch_size: int
    seed: int

    @property
    def n(self) -> int:
        return len(self.x)

    def flags(self, attack, rows: np.ndarray, model: nn.Module | None = None, seed: int | None = None) -> np.ndarray:
        return attack_flags(attack, model or self.model, self.x, self.y, rows, batch_size=self.batch_size,
                            device=self.device, seed=self.seed if seed is None else seed)


def _selected(checks: list[str] | None) -> set[str]:
    if checks is None:
        return set(ALL_CHECKS)
    unknown = [c for c in checks if c not in ALL_CHECKS]
    if unknown:
        raise UserError(f"unknown audit check {unknown[0]!r}: choose from {', '.join(ALL_CHECKS)}")
    return set(checks)


#: the checks that need the audit's own attack suite (white-box attacks, then Square, in cascade)
_NEED_SUITE = {"black-box vs white-box", "unbounded attack", "convergence", "transfer", "wasserstein upper bounds"}


def audit_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, device: str | torch.device = "cpu",
                batch_size: int = 256, seed: int = 0, surrogate: nn.Module | None = None,
                surrogate_label: str | None = None, entry: dict[str, Any] | None = None,
                checks: list[str] | None = None, reporter: Reporter | None = None) -> AuditReport:
    """The checks of the audit (`checks`: names from ALL_CHECKS; None: all) on (x, y) at budget `eps`.
    `surrogate`: the model that transfer attacks are crafted on (e.g. a run's base model; None skips
    the transfer check). `entry`: the leaderboard entry JSON whose W-PGD columns the Wasserstein
    check marks."""
    t0 = time.perf_counter()
    wanted = _selected(checks)
    device = torch.device(device)
    model = model.to(device).eval()
    check_finite_weights(model)
    ctx = _Ctx(model, x.detach().float().cpu(), y.detach().long().cpu(), float(eps), device, int(batch_size), seed)
    out: list[ac.AuditCheck] = []
    skipped: dict[str, str] = {}
    main = black_box = None
    extra: dict[str, Any] = {}
    if wanted & _NEED_SUITE:
        main = evaluate(model, ctx.x, ctx.y, attacks=["clean", *WHITE_BOX, *BLACK_BOX], eps=eps, mode="cascade",
                        batch_size=batch_size, seed=seed, device=device, reporter=reporter)
        black_box = _suite_checks(ctx, main, wanted, out, skipped, surrogate, surrogate_label)
        extra = {"clean_acc": main.clean_acc, "white_box_acc": main.cumulative[WHITE_BOX[-1]],
                 "attack_time_s": {k: round(v, 3) for k, v in main.timings_s.items()}}
    clean = main.clean if main is not None else clean_pass(model, ctx.x, ctx.y, batch_size, device)[0]
    if wanted & {"gradient health", "saturated softmax"}:
        stats = gradient_stats(model, ctx.x, ctx.y, clean, eps=eps, batch_size=batch_size, device=device, seed=seed)
        if "gradient health" in wanted:
            out.append(ac.gradient_check(stats))
        if "saturated softmax" in wanted:
            out.append(ac.saturation_check(stats["saturated_pct"], stats["median_logit_margin"]))
    if "randomness" in wanted:
        out.append(_randomness(ctx, main))
    if "wasserstein upper bounds" in wanted:
        _wasserstein(out, skipped, entry, black_box)
    for name in ALL_CHECKS:
        if name not in wanted:
            skipped[name] = "not asked for"
    order = {name: i for i, name in enumerate(ALL_CHECKS)}
    out.sort(key=lambda c: order[c.name])
    return AuditReport(out, dict(sorted(skipped.items(), key=lambda kv: order[kv[0]])), "model", ctx.n, float(eps),
                       seed, time.perf_counter() - t0, extra=extra)


def _suite_checks(ctx: _Ctx, main, wanted: set[str], out: list, skipped: dict[str, str],
                  surrogate: nn.Module | None, surrogate_label: str | None) -> ac.AuditCheck:
    """The checks built on the audit suite's flags; returns the black-box check (the Wasserstein one needs it)."""
    cols = main.attacks
    wb_robust = main.clean & np.all([main.flags[:, cols.index(a)] == 1 for a in WHITE_BOX], axis=0)
    black_box = ac.black_box_check(ac.only_broken_by(main.flags, cols, BLACK_BOX, WHITE_BOX), ctx.n, BLACK_BOX,
                                   WHITE_BOX)
    pgd20_acc, white_acc = main.cumulative["pgd20"], main.cumulative[WHITE_BOX[-1]]
    if "black-box vs white-box" in wanted:
        out.append(black_box)
    if "unbounded attack" in wanted:
        out.append(_unbounded(ctx, main.clean, pgd20_acc))
    if "convergence" in wanted:
        out.append(_convergence(ctx, wb_robust, white_acc, pgd20_acc))
    if "transfer" in wanted and surrogate is not None:
        out.append(_transfer(ctx, surrogate, surrogate_label or "the surrogate", main.clean, wb_robust, white_acc))
    elif "transfer" in wanted:
        skipped["transfer"] = "no surrogate model: audit a run (its base model is the surrogate) or name one"
    return black_box


def _unbounded(ctx: _Ctx, clean: np.ndarray, pgd20_acc: float) -> ac.AuditCheck:
    rows = np.flatnonzero(clean)
    unbounded = make_attack("pgd", 1.0, seed=ctx.seed, steps=20)
    acc1 = _pct(ctx.flags(unbounded, rows).sum(), ctx.n)
    sweep = {ctx.eps: pgd20_acc}
    for e in (ctx.eps / 2, min(1.0, 2 * ctx.eps)):
        if e not in sweep:
            sweep[e] = _pct(ctx.flags(make_attack("pgd20", e, seed=ctx.seed), rows).sum(), ctx.n)
    return ac.unbounded_check(acc1, sweep, ctx.n)


def _convergence(ctx: _Ctx, wb_robust: np.ndarray, white_acc: float, pgd20_acc: float) -> ac.AuditCheck:
    still = np.flatnonzero(wb_robust)
    for r in range(STRONG_RESTARTS):
        if not len(still):
            break
        # each restart is PGD with another seed: another random start per example
        attack = make_attack("pgd", ctx.eps, seed=ctx.seed + 1 + r, steps=STRONG_STEPS)
        still = still[ctx.flags(attack, still, seed=ctx.seed + 1 + r)]
    name = f"PGD-{STRONG_STEPS} × {STRONG_RESTARTS} restarts"
    return ac.convergence_check(white_acc, _pct(len(still), ctx.n), pgd20_acc, ctx.n, name)


def _transfer(ctx: _Ctx, surrogate: nn.Module, label: str, clean: np.ndarray, wb_robust: np.ndarray,
              white_acc: float) -> ac.AuditCheck:
    surrogate = surrogate.to(ctx.device).eval()
    rows = np.flatnonzero(clean)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        robust = transfer_flags(make_attack("pgd20", ctx.eps, seed=ctx.seed), surrogate, ctx.model, ctx.x, ctx.y,
                                rows, batch_size=ctx.batch_size, device=ctx.device)
    only = int((wb_robust[rows] & ~robust).sum())
    return ac.transfer_check(_pct(robust.sum(), ctx.n), white_acc, only, ctx.n, label)


def _randomness(ctx: _Ctx, main) -> ac.AuditCheck:
    diff, disagree, randomised = randomness_probe(ctx.model, ctx.x, batch_size=ctx.batch_size, device=ctx.device)
    if not randomised:
        return ac.randomness_check(diff, disagree, None, None)
    attacks = ["pgd20", "apgd-ce"]

    def run(model: nn.Module) -> dict[str, float]:
        res = evaluate(model, ctx.x, ctx.y, attacks=["clean", *attacks], eps=ctx.eps, mode="independent",
                       batch_size=ctx.batch_size, seed=ctx.seed, device=ctx.device)
        return {a: res.per_attack[a] for a in attacks}

    return ac.randomness_check(diff, disagree, run(ExpectationModel(ctx.model, ac.EOT_SAMPLES)), run(ctx.model))


def _w_columns(entry: dict[str, Any] | None) -> list[str]:
    extra = (entry or {}).get("adt_ft") or {}
    return [a for a in extra.get("attacks", []) if str(a).startswith("wpgd")]


def _wasserstein(checks: list, skipped: dict[str, str], entry: dict[str, Any] | None, black_box) -> None:
    columns = _w_columns(entry)
    if not columns:
        skipped["wasserstein upper bounds"] = "no W-PGD columns to judge"
    elif black_box is None:
        skipped["wasserstein upper bounds"] = "the black-box check could not run, so the W-PGD columns are unjudged"
    else:
        checks.append(ac.wasserstein_check(columns, black_box))


def _entry_flags(entry) -> tuple[np.ndarray, list[str]]:
    extra = entry.extra
    attacks = list(extra.get("attacks") or [])
    check = check_per_example(entry)
    if check.path is None:
        raise UserError(f"entry {entry.entry}: {check.problem or 'no per-example file is recorded'}; the audit "
                        "needs its per-example flags")
    table = read_per_example_csv(check.path)
    flags = np.array([[int(v) if v not in ("", None) else -1 for v in table[a]] for a in attacks],
                     dtype=np.int8).T.reshape(len(table["index"]), len(attacks))
    return flags, attacks


def audit_entry(entry) -> AuditReport:
    """What an entry's per-example flags alone support: the black-box check (when it has black-box
    and white-box columns, each black-box one after every white-box one if it ran in cascade) and
    the Wasserstein check; every other check needs the model and is listed as skipped."""
    t0 = time.perf_counter()
    extra = entry.extra
    flags, attacks = _entry_flags(entry)
    excluded = set(extra.get("excluded_from_a_rob") or [])
    pointwise = [a for a in attacks if a not in excluded and a in ATTACKS]
    bb = [a for a in pointwise if ATTACKS[a].black_box]
    wb = [a for a in pointwise if not ATTACKS[a].black_box]
    needs_model = "needs the model: give --model or --run with the entry"
    skipped = {name: needs_model for name in ALL_CHECKS[1:7]}
    checks: list[ac.AuditCheck] = []
    black_box = None
    ordered = extra.get("mode") == "independent" or all(attacks.index(b) > attacks.index(w) for b in bb for w in wb)
    if bb and wb and ordered:
        black_box = ac.black_box_check(ac.only_broken_by(flags, attacks, bb, wb), len(flags), bb, wb)
        checks.append(black_box)
    else:
        skipped["black-box vs white-box"] = ("the entry has no separate black-box and white-box columns (evaluate "
                                             "with --suite aa-parts, or audit the model)" if not (bb and wb) else
                                             "in cascade mode a black-box column ran before a white-box one")
    _wasserstein(checks, skipped, entry.data, black_box)
    return AuditReport(checks, skipped, "entry", len(flags), float(extra.get("eps") or 0.0),
                       int(extra.get("seed") or 0), time.perf_counter() - t0, extra={"entry": entry.entry})
