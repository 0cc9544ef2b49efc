"""W-DAT's inner problem (docs/methods.md, "wdat"): the first-order split of a W_2 budget into
per-image l∞ budgets, and pointwise PGD inside each image's own budget.

The split. For the W_2 ball of radius δ under the l∞ ground cost, the first-order
worst case moves image i by δ_i = δ·‖g_i‖_1/Υ, where g_i is the gradient of a per-example
loss J at x_i and Υ = sqrt(mean_j ‖g_j‖_1²) over the reference set (Bai et al. 2023,
sensitivity analysis of W-DRO; the W-PGD direction of their released code has exactly
this per-image scale). Over the reference set these budgets have RMS δ, i.e. they use
the whole W_2 budget and no more. W-DAT (Bai, He, Jiang, Obłój 2025) fixes each image's
budget this way ("W-PGD-budget") and then attacks it pointwise inside that budget, so no
image's budget depends on which images share its batch.

The cap. A per-image cap κ·δ bounds how far one image may move (docs/methods.md says
why); the budget a capped image cannot use is given to the uncapped ones by scaling the
split up (water-filling), so over the reference set the budgets still have RMS exactly δ:
δ_i = min(κδ, c·‖g_i‖_1) with c ≥ δ/Υ the one scale that makes mean_i δ_i² = δ².
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..nets import eval_mode
from .distributional import resolve_loss
from .linf import project_linf


def gradient_l1_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str,
                      batch_size: int = 512) -> torch.Tensor:
    """‖∇_x J(x_i, y_i)‖_1 per image (float64), with the classifier in eval mode.

    The per-example loss is summed, not averaged, so each image's gradient is its own
    loss's and does not depend on how many images share its batch.
    """
    loss_fn = resolve_loss(loss)
    out = []
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_fn(model(xb), y[i:i + batch_size]).sum(), xb)
            out.append(grad.detach().flatten(1).abs().sum(1).double())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def upsilon_of(l1_norms: torch.Tensor) -> float:
    """Υ = sqrt(mean_i ‖g_i‖_1²) (q = 2)."""
    n = l1_norms.double()
    return float(n.pow(2).mean().sqrt()) if n.numel() else 0.0


def split_scale(l1_norms: torch.Tensor, budget: float, cap: float) -> float:
    """The scale c with mean_i min(cap, c·n_i)² = budget² over the reference norms n_i.

    Without a binding cap c = budget/Υ (the first-order split). With one, the largest k
    norms sit at the cap and c = sqrt((N·budget² − k·cap²)/Σ_{rest} n_i²) for the smallest
    k that is consistent. When the budget cannot be spent (cap < budget, or too many zero
    gradients) every image with a gradient gets the cap: c = inf.
    """
    n = l1_norms.double().flatten()
    if budget <= 0 or n.numel() == 0 or not bool((n > 0).any()):
        return 0.0
    total = n.numel() * budget * budget
    desc = n.sort(descending=True).values
    tail = desc.pow(2).flip(0).cumsum(0).flip(0)   # tail[k] = Σ_{i ≥ k} desc_i²
    for k in range(n.numel()):
        rest = total - k * cap * cap
        if rest <= 0 or tail[k] <= 0:
            break
        c = (rest / float(tail[k])) ** 0.5
        if c * float(desc[k]) <= cap * (1 + 1e-12):   # the (k+1)-th largest stays under the cap
            return c
    return float("inf")


def split_budgets(l1_norms: torch.Tensor, scale: float, cap: float) -> torch.Tensor:
    """δ_i = min(cap, scale·‖g_i‖_1); an image with no gradient gets no budget."""
    n = l1_norms.double()
    if scale == float("inf"):
        return torch.where(n > 0, torch.full_like(n, cap), torch.zeros_like(n))
    return (scale * n).clamp(max=cap)


@dataclass
class Split:
    """The reference statistics a split is made from (refreshed every few steps)."""
    upsilon: float      # Υ over the reference set
    scale: float        # c: δ_i = min(cap, c·‖g_i‖_1)
    cap: float          # κ·δ, pixel units
    n: int              # images in the reference set
    capped: float       # share of the reference set at the cap
    rms: float          # RMS of the reference set's budgets (= δ unless the budget cannot be spent)


def make_split(l1_norms: torch.Tensor, budget: float, cap: float) -> Split:
    scale = split_scale(l1_norms, budget, cap)
    b = split_budgets(l1_norms, scale, cap)
    capped = float((b >= cap * (1 - 1e-9)).double().mean()) if b.numel() else 0.0
    return Split(upsilon=upsilon_of(l1_norms), scale=scale, cap=cap, n=int(l1_norms.numel()),
                 capped=capped, rms=float(b.pow(2).mean().sqrt()) if b.numel() else 0.0)


def pgd_in_budgets(model: nn.Module, x: torch.Tensor, budgets: torch.Tensor,
                   objective: Callable[[torch.Tensor], torch.Tensor], *, steps: int, ratio: float,
                   start: torch.Tensor | None = None) -> torch.Tensor:
    """Pointwise sign-gradient ascent of the per-example `objective(logits)`, image i inside its
    own l∞ ball of radius budgets[i] (and [0, 1]), step ratio·budgets[i]/steps; the last iterate.

    The caller sets the model's mode. An image with budget 0 stays where it is.
    """
    eps = budgets.to(x.dtype).view(-1, *[1] * (x.dim() - 1))
    step = ratio * eps / steps
    x = x.detach()
    x_adv = x.clone() if start is None else project_linf(start.detach().clone(), x, eps)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(model(x_adv)).sum(), x_adv)
        x_adv = project_linf(x_adv.detach() + step * grad.sign(), x, eps)
    return x_adv.detach()
