"""Projected sign-gradient ascent: the loop under FGSM, PGD, MIM, CW and the
training-time attacks (PGD-AT, TRADES).

`torch.clamp`'s gradient is zero where its input sits exactly at a bound, so an
attack that differentiates through `clamp(x', 0, 1)` freezes every pixel already
at 0 or 1 (on Fashion-MNIST's black backgrounds that costs PGD-20 about 8 points
of strength). Here x' is always a leaf already inside the ε-ball and [0, 1]; the
model is differentiated at x' and the projection happens after the step, outside
autograd.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, y) -> per-example loss


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Onto the ε-ball around x, then into [0, 1] (the intersection of two boxes)."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def random_start(x: torch.Tensor, eps: float, kind: str | None, generator: torch.Generator | None = None):
    if kind is None or kind == "none":
        return x.clone()
    if kind == "uniform":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        return project_linf(x + eps * noise, x, eps)
    if kind == "normal":  # TRADES' start: x + 0.001·N(0, I)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return project_linf(x + 0.001 * noise, x, eps)
    raise ValueError(f"unknown random start {kind!r}")


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def sign_gradient_ascent(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    loss_fn: LossFn = ce_loss,
    start: str | None = "uniform",
    momentum: float | None = None,
    generator: torch.Generator | None = None,
    init: torch.Tensor | None = None,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """x' maximising loss_fn within the L∞ ε-ball: `steps` sign steps of `step_size`.

    With `momentum`, the MIM update: g ← μ·g + ∇/mean|∇| (per example), step sign(g).
    One forward and one backward per step; no gradient reaches the model's
    parameters. The caller decides the model's mode (attacks use eval mode).
    `init`, when given, is the starting point instead of `start` (projected onto
    the ball first): the evaluation attacks draw their random starts per example.
    `on_step(i)` is called after step i (1-based): attacks report their progress with it.
    """
    x = x.detach()
    x_adv = random_start(x, eps, start, generator) if init is None else project_linf(init.detach().clone(), x, eps)
    velocity = torch.zeros_like(x) if momentum is not None else None
    for i in range(steps):
        x_adv.requires_grad_(True)
        loss = loss_fn(model(x_adv), y).sum()  # sum: each example's gradient is its own
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            if velocity is not None:
                norm = grad.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
                velocity.mul_(momentum).add_(grad / norm)
                grad = velocity
            x_adv = project_linf(x_adv.detach() + step_size * grad.sign(), x, eps)
        if on_step is not None:
            on_step(i + 1)
    return x_adv.detach()


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example z_y − max_{j≠y} z_j: negative exactly when the example is misclassified."""
    true_logit = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return true_logit - others.max(1).values


def margin_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float = 50.0) -> torch.Tensor:
    """Per-example CW loss −max(z_y − max_{j≠y} z_j + κ, 0), which the attacker maximises.

    Maximising it pushes the true logit below the best other one; the hinge stops
    the push once the margin is below −κ (with κ = 50, practically never).
    """
    return -torch.relu(margin(logits, y) + kappa)


def uniform_start(x: torch.Tensor, eps: float, generators: list[torch.Generator]) -> torch.Tensor:
    """x + U(−ε, ε) noise, each example's noise from its own generator, projected into [0, 1]."""
    noise = torch.empty_like(x)
    for row, g in zip(noise, generators):
        row.uniform_(-1.0, 1.0, generator=g)
    return project_linf(x + eps * noise, x, eps)


def verdict(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) bool: classified correctly, the one rule every accuracy and robust flag in adt-ft uses.

    Correct means the true logit is strictly above every other one and every logit is
    finite. A tie is not correct: argmax breaks it towards the lowest class index, so an
    all-zero (or constant) model would otherwise score that class's share of the data.
    A row with a NaN or infinite logit is never correct either: argmax over NaN picks an
    arbitrary class. For real-valued logits of a trained model exact ties do not occur,
    so this agrees with `argmax == y` there.
    """
    k = logits.shape[1]
    label = y.clamp(0, k - 1)[:, None]  # a label the model has no logit for is never correct
    others = logits.scatter(1, label, float("-inf")).max(1).values
    return (y >= 0) & (y < k) & (logits.gather(1, label).squeeze(1) > others) & torch.isfinite(logits).all(1)


def predicted_class(logits: torch.Tensor) -> torch.Tensor:
    """(B,) long: the class whose logit is strictly above every other one, −1 where there is
    none (a tie at the top, or a non-finite logit): what `verdict` counts as a prediction."""
    top2 = logits.topk(min(2, logits.shape[1]), dim=1)
    pred = top2.indices[:, 0].clone()
    no_winner = ~torch.isfinite(logits).all(1)
    if logits.shape[1] > 1:
        no_winner |= ~(top2.values[:, 0] > top2.values[:, 1])
    pred[no_winner] = -1
    return pred


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The share of rows `verdict` counts as correct (training's clean/adv accuracy metrics)."""
    return verdict(logits.detach(), y).float().mean().item()
