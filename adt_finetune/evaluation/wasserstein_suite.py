"""The `wasserstein` evaluation suite: clean statistics, W-PGD per budget, the
first-order estimate and the pointwise PGD-20 reference (docs/evaluation.md,
"Distributional robustness"). The algorithms are in `perturb.distributional`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..attacks import verdict
from ..nets import eval_mode
from ..progress import Reporter, as_reporter
from ..perturb.linf import sign_gradient_ascent
from ..perturb.distributional import (DEFAULT_LOSS, DEFAULT_RATIO, DEFAULT_STEPS, CleanStats, _check_q, _check_set,
                                      _device_of, _json_float, clean_statistics, default_budgets, first_order_estimate,
                                      parse_budgets, resolve_loss, wpgd)
from ..utils import format_eps

REFERENCE_PGD_STEPS = 20
TASK = "wasserstein"  # the reporter's key for the suite's one progress task


@dataclass
class WassersteinReport:
    eps: float
    q: int
    loss: str
    steps: int
    ratio: float
    budgets: list[float]
    clean: CleanStats
    rows: list[dict[str, Any]]                      # budget, wpgd_acc, first_order, pgd_acc, wpgd_distance, wpgd_best_step
    flags: dict[str, torch.Tensor]                  # "wpgd@δ", "pgd20@δ" -> (N,) bool
    clean_flags: torch.Tensor | None = None         # (N,) bool

    def to_json(self) -> dict[str, Any]:
        """Clean statistics and one row per budget, JSON-safe (NaN -> null); accuracies are fractions."""
        return {
            "threat_model": "W2-Linf" if self.q == 2 else "Winf-Linf",
            "q": self.q,
            "loss": self.loss,
            "steps": self.steps,
            "ratio": self.ratio,
            "eps": self.eps,
            "pgd_reference": f"pgd{REFERENCE_PGD_STEPS}: CE, step budget/4, uniform random start",
            "clean": self.clean.to_json(),
            "rows": [{k: _json_float(v) for k, v in row.items()} for row in self.rows],
        }

    def to_markdown(self) -> str:
        """The suite as a markdown table (accuracies in %), e.g. for a report."""
        lines = [f"clean accuracy {100 * self.clean.accuracy:.2f}%, V(0) {self.clean.v0:.4f}, "
                 f"W(0) {self.clean.w0:.4f}, Υ {self.clean.upsilon:.4f} ({self.clean.loss}, q={self.q}, "
                 f"n={self.clean.n})", "",
                 "| budget δ | W-PGD acc | first-order est. | PGD-20 acc (pointwise, ε=δ) |",
                 "| --- | --- | --- | --- |"]
        for row in self.rows:
            fo = row["first_order"]
            fo_text = "n/a" if fo is None or not math.isfinite(fo) else f"{100 * fo:.2f}%"
            lines.append(f"| {format_budget(row['budget'])} | {100 * row['wpgd_acc']:.2f}% "
                         f"| {fo_text} | {100 * row['pgd_acc']:.2f}% |")
        return "\n".join(lines)


def format_budget(budget: float) -> str:
    """'0.2' and '0.025' as typed; '8/255' for budgets that are only short as 255ths."""
    short = f"{budget:.4g}"
    return short if float(short) == budget else format_eps(budget)


def flag_key(attack: str, budget: float) -> str:
    return f"{attack}@{format_budget(budget)}"


def _pointwise_pgd_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, budget: float, batch_size: int,
                         dev: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=dev).manual_seed(seed)
    flags = []
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev)
            xa = sign_gradient_ascent(model, xb, yb, eps=budget, step_size=budget / 4, steps=REFERENCE_PGD_STEPS,
                                      start="uniform", generator=gen)
            with torch.no_grad():
                flags.append(verdict(model(xa), yb).cpu())
    return torch.cat(flags)


def wasserstein_suite(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                      budgets: Sequence[float] | str | None = None, batch_size: int = 256,
                      device: str | torch.device | None = "cpu", seed: int = 0, reporter: Reporter | None = None,
                      q: int = 2, loss: str = DEFAULT_LOSS, steps: int = DEFAULT_STEPS,
                      ratio: float = DEFAULT_RATIO) -> WassersteinReport:
    """Clean statistics, then per budget: W-PGD accuracy, the first-order estimate,
    and pointwise PGD-20 (CE, step δ/4, uniform random start) at ε = δ.

    `budgets=None` uses `default_budgets(eps)`. Per-example flags are keyed
    "wpgd@δ" and "pgd20@δ" (`format_budget`: "wpgd@0.1", "wpgd@8/255").
    `reporter` receives progress (None: silent).
    """
    q = _check_q(q)
    resolve_loss(loss)
    budget_list = default_budgets(eps) if budgets is None else parse_budgets(budgets)
    _check_set(x, y, batch_size)
    dev = _device_of(model, device)
    x, y = x.detach().to(dev), y.to(dev)

    rep = as_reporter(reporter)
    with rep:
        rep.start(TASK, "wasserstein", total=len(budget_list) * (steps + 2) + 1, status="clean statistics")
        clean = clean_statistics(model, x, y, loss=loss, q=q, batch_size=batch_size, device=dev)
        with torch.no_grad(), eval_mode(model):
            clean_flags = torch.cat([verdict(model(x[i:i + batch_size]), y[i:i + batch_size]).cpu()
                                     for i in range(0, len(x), batch_size)])
        rep.advance(TASK, 1, "clean statistics")
        rows, flags = [], {}
        for budget in budget_list:
            row, budget_flags = _budget_row(model, x, y, budget, clean, rep, q=q, steps=steps, ratio=ratio, loss=loss,
                                            batch_size=batch_size, dev=dev, seed=seed)
            rows.append(row)
            flags.update(budget_flags)
        rep.finish(TASK)
    return WassersteinReport(eps=float(eps), q=q, loss=str(loss).lower(), steps=int(steps), ratio=float(ratio),
                             budgets=budget_list, clean=clean, rows=rows, flags=flags, clean_flags=clean_flags)


def _budget_row(model, x, y, budget: float, clean: CleanStats, rep: Reporter, *, q, steps, ratio, loss, batch_size,
                dev, seed) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """W-PGD, the first-order estimate and pointwise PGD-20 at one budget δ."""
    label = format_budget(budget)
    res = wpgd(model, x, y, budget=budget, q=q, steps=steps, ratio=ratio, loss=loss, batch_size=batch_size,
               device=dev, progress=lambda t, acc: rep.advance(TASK, 1, f"W-PGD δ={label} acc {acc:.3f}"))
    rep.advance(TASK, steps + 1 - len(res.accuracies), f"W-PGD δ={label}")  # an early stop skips iterates
    pgd_flags = _pointwise_pgd_flags(model, x, y, budget, batch_size, dev, seed)
    rep.advance(TASK, 1, f"PGD-20 δ={label}")
    flags = {flag_key("wpgd", budget): res.robust.cpu(), flag_key(f"pgd{REFERENCE_PGD_STEPS}", budget): pgd_flags}
    row = {
        "budget": budget,
        "wpgd_acc": res.accuracy,
        "first_order": first_order_estimate(clean.accuracy, clean.v0, clean.w0, clean.upsilon, budget),
        "pgd_acc": float(pgd_flags.double().mean()),
        "wpgd_distance": res.distance,
        "wpgd_best_step": res.best_step,
    }
    return row, flags
