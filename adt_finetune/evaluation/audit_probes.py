"""What the audit measures on a model besides attack accuracies: input-gradient health,
softmax saturation, randomness, and attacks run directly on a subset of examples
(docs/evaluation.md, "Audit"). `audit_checks` judges the numbers.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import verdict
from ..nets import eval_mode
from ..perturb.linf import margin
from .audit_checks import VANISHING_GRADIENT


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def attack_flags(attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, rows: np.ndarray, *,
                 batch_size: int, device: torch.device, seed: int = 0) -> np.ndarray:
    """(len(rows),) bool: still correct after `attack` on x[rows]. The global RNG is seeded once
    (attacks that draw from it stay reproducible) and restored afterwards."""
    out = [np.zeros(0, dtype=bool)]
    idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for s in _batches(len(idx), batch_size):
            ids = idx[s]
            res = attack(model, x[ids].to(device), y[ids].to(device))
            out.append(res.robust.detach().cpu().numpy().astype(bool))
    return np.concatenate(out)


def transfer_flags(attack, surrogate: nn.Module, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   rows: np.ndarray, *, batch_size: int, device: torch.device) -> np.ndarray:
    """(len(rows),) bool: `model` still correct on the examples `attack` crafted against `surrogate`."""
    out = [np.zeros(0, dtype=bool)]
    idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    for s in _batches(len(idx), batch_size):
        xb, yb = x[idx[s]].to(device), y[idx[s]].to(device)
        x_adv = attack(surrogate, xb, yb).x_adv
        with torch.no_grad(), eval_mode(model):
            out.append(verdict(model(x_adv.float()), yb).cpu().numpy().astype(bool))
    return np.concatenate(out)


def _margin_and_ce_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Per-example margin loss, CE, and their input gradients (each example's loss depends on its input
    only: the model is in eval mode)."""
    x = x.clone().requires_grad_(True)
    logits = model(x).float()
    m = -margin(logits, y)  # max_{j≠y} z_j − z_y: what an attacker climbs, never saturates
    ce = F.cross_entropy(logits, y, reduction="none")
    g_m, = torch.autograd.grad(m.sum(), x, retain_graph=True)
    g_ce, = torch.autograd.grad(ce.sum(), x)
    return m.detach(), ce.detach(), g_m.flatten(1), g_ce.flatten(1), logits.detach()


def gradient_stats(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean: np.ndarray, *, eps: float,
                   batch_size: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Percentages of examples with NaN / zero / vanishing margin-loss input gradients at x and zero ones
    at a random point of the ε-ball, of those whose gradient is zero at both while the loss differs
    between them (a piecewise-constant, non-differentiable model), and of clean-correct examples whose
    float32 cross-entropy saturates (loss exactly 0 or a zero input gradient)."""
    g = torch.Generator().manual_seed(seed)
    counts = dict(nan=0, zero=0, vanishing=0, zero_random=0, non_differentiable=0, saturated=0)
    margins: list[np.ndarray] = []
    with eval_mode(model):
        for s in _batches(len(x), batch_size):
            xb, yb = x[s].to(device), y[s].to(device)
            m, ce, g_m, g_ce, logits = _margin_and_ce_grads(model, xb, yb)
            delta = (torch.rand(xb.shape, generator=g) * 2 - 1).to(device) * eps
            m_r, _, g_r, _, _ = _margin_and_ce_grads(model, (xb + delta).clamp(0, 1), yb)
            nan = ~torch.isfinite(g_m).all(1)
            zero = (g_m == 0).all(1) & ~nan
            zero_r = (g_r == 0).all(1) & torch.isfinite(g_r).all(1)
            counts["nan"] += int(nan.sum())
            counts["zero"] += int(zero.sum())
            counts["vanishing"] += int((~zero & ~nan & (g_m.abs().amax(1) < VANISHING_GRADIENT)).sum())
            counts["zero_random"] += int(zero_r.sum())
            counts["non_differentiable"] += int((zero & zero_r & ((m_r - m).abs() > 1e-6)).sum())
            cc = torch.from_numpy(clean[s]).to(device)
            sat = cc & ~zero & ((ce == 0) | (g_ce == 0).all(1))
            counts["saturated"] += int(sat.sum())
            top2 = logits.topk(2, dim=1).values
            margins.append((top2[:, 0] - top2[:, 1])[cc].cpu().numpy())
    n, n_clean = len(x), max(1, int(clean.sum()))
    out = {f"{k}_pct": 100.0 * v / n for k, v in counts.items() if k != "saturated"}
    out["saturated_pct"] = 100.0 * counts["saturated"] / n_clean
    all_margins = np.concatenate(margins) if margins else np.zeros(0)
    out["median_logit_margin"] = float(np.median(all_margins)) if len(all_margins) else 0.0
    return out


def randomness_probe(model: nn.Module, x: torch.Tensor, *, batch_size: int,
                     device: torch.device) -> tuple[float, float, bool]:
    """(largest logit difference, % of predictions that differ, randomised?) between two forward passes.
    A difference beyond float round-off (relative 1e-4 of the logits' scale) counts as randomness:
    nondeterministic GPU kernels differ by far less."""
    diff, scale, disagree = 0.0, 0.0, 0
    with torch.no_grad(), eval_mode(model):
        for s in _batches(len(x), batch_size):
            xb = x[s].to(device)
            a, b = model(xb).float(), model(xb).float()
            diff = max(diff, float((a - b).abs().max()))
            scale = max(scale, float(a.abs().max()))
            disagree += int((a.argmax(1) != b.argmax(1)).sum())
    return diff, 100.0 * disagree / len(x), diff > 1e-4 * (1.0 + scale)
