"""The L2 threat model's perturbation step: projection onto the L2 ball, random starts inside it, and
projected normalised-gradient ascent (PGD-L2; one step of size ε from x is FGM-L2; the CW margin loss
gives CW-L2), the L2 counterpart of `linf.sign_gradient_ascent`.

As there, x' is always a leaf already inside the ball and [0, 1]; the model is differentiated at x'
and the projection happens after the step, outside autograd. The step is α·∇/‖∇‖₂ per example, as
in Madry et al.'s L2 PGD and torchattacks' PGDL2; the projection scales δ = x' − x back to norm ε when
it is longer, then clamps x' into [0, 1]. Clamping moves every pixel towards x (x itself lies in
[0, 1]), so it never lengthens δ: ‖x' − x‖₂ ≤ ε holds after it too.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .linf import LossFn, ce_loss

_TINY = 1e-12  # guards the division for a zero gradient or a zero δ


def l2_norms(t: torch.Tensor) -> torch.Tensor:
    """(B,) per-example L2 norm over every other dimension."""
    return t.flatten(1).norm(p=2, dim=1)


def _per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *[1] * (like.dim() - 1))


def project_l2(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Onto the L2 ball of radius ε around x (δ scaled down where longer), then into [0, 1]."""
    delta = x_adv - x
    scale = (eps / l2_norms(delta).clamp_min(_TINY)).clamp(max=1.0)
    return (x + delta * _per_example(scale, x)).clamp_(0.0, 1.0)


def l2_start(x: torch.Tensor, eps: float, generators: list[torch.Generator]) -> torch.Tensor:
    """x + δ with δ's direction uniform on the sphere and its norm ε·U(0, 1) (torchattacks' start),
    each example's draw from its own generator, projected into [0, 1]."""
    delta = torch.empty_like(x)
    radius = torch.empty(len(x), device=x.device, dtype=x.dtype)
    for i, g in enumerate(generators):
        delta[i].normal_(generator=g)
        radius[i:i + 1].uniform_(0.0, 1.0, generator=g)
    delta = delta / _per_example(l2_norms(delta).clamp_min(_TINY), x) * _per_example(radius * eps, x)
    return project_l2(x + delta, x, eps)


def l2_start_from_noise(x: torch.Tensor, eps: float, noise: torch.Tensor) -> torch.Tensor:
    """`l2_start`'s distribution from given standard-normal noise (training's per-example draws): the
    direction is the noise's, the radius ε·Φ(first element), Φ(z) being U(0, 1) for a standard normal z."""
    direction = noise / _per_example(l2_norms(noise).clamp_min(_TINY), x)
    radius = 0.5 * (1.0 + torch.erf(noise.flatten(1)[:, 0] / 2 ** 0.5))
    return project_l2(x + direction * _per_example(radius * eps, x), x, eps)


def normalized_gradient_ascent(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    loss_fn: LossFn = ce_loss,
    init: torch.Tensor | None = None,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """x' maximising loss_fn within the L2 ε-ball: `steps` steps of `step_size`·∇/‖∇‖₂ from `init`
    (projected onto the ball first) or from x itself. One forward and one backward per step; no
    gradient reaches the model's parameters; the caller decides the model's mode."""
    x = x.detach()
    x_adv = x.clone() if init is None else project_l2(init.detach().clone(), x, eps)
    for i in range(steps):
        x_adv.requires_grad_(True)
        loss = loss_fn(model(x_adv), y).sum()  # sum: each example's gradient is its own
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            step = grad / _per_example(l2_norms(grad).clamp_min(_TINY), grad)
            x_adv = project_l2(x_adv.detach() + step_size * step, x, eps)
        if on_step is not None:
            on_step(i + 1)
    return x_adv.detach()
