"""SPSA (Uesato et al. 2018), the gradient-free attack of the suite (docs/evaluation.md, "Attacks").

It never asks the model for a gradient: each iteration estimates ∇x of the margin
z_y − max_{j≠y} z_j from antithetic Rademacher finite differences (each pixel's
difference divided by how far its two clipped probes really are apart) and takes an
Adam step that lowers it, projecting onto the ε-ball and [0, 1]. An example stops
as soon as it is misclassified (broken); the evaluation compares this black-box
number with the white-box ones to spot gradient masking.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..nets import eval_mode
from .base import Attack, AttackResult, example_generators, float_setting, int_setting, register_attack, verdict
from ..perturb.linf import margin, project_linf

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def probe_reciprocal(step: torch.Tensor) -> torch.Tensor:
    """1 / (x⁺ − x⁻) per pixel, 0 where the pair did not move the pixel.

    A pixel at 0 or 1 moves by δ in only one of the two clipped probes, so its
    finite difference spans δ, not 2δ: dividing by the distance the probes really
    are apart keeps its gradient estimate at full scale (dividing every pixel by 2δ
    halved it exactly where Fashion-MNIST's black background lies). Unclipped pixels
    get sign/(2δ), the textbook SPSA estimate.
    """
    return torch.where(step != 0, 1.0 / torch.where(step != 0, step, torch.ones_like(step)), torch.zeros_like(step))


@register_attack("spsa")
class SPSA(Attack):
    """Settings: iterations (100), samples (256 per draw = 128 antithetic pairs), delta (0.001),
    lr (Adam, 0.01), chunk (images per forward, 4096: bounds memory, not results)."""

    black_box = True

    def __init__(self, eps: float, *, seed: int = 0, iterations: Any = 100, samples: Any = 256, delta: Any = 0.001,
                 lr: Any = 0.01, chunk: Any = 4096, **settings: Any):
        super().__init__(eps, seed=seed, **settings)
        self.iterations = int_setting(self.name, "iterations", iterations, 0)
        self.samples = int_setting(self.name, "samples", samples, 2)
        if self.samples % 2:
            raise UserError(f"attack 'spsa': samples must be even (antithetic pairs), got {samples!r}")
        self.delta = float_setting(self.name, "delta", delta)
        if self.delta == 0:
            raise UserError("attack 'spsa': delta (the finite-difference size) must be > 0")
        self.lr = float_setting(self.name, "lr", lr)
        self.chunk = int_setting(self.name, "chunk", chunk, 1)

    @torch.no_grad()
    def _gradient_estimate(self, model: nn.Module, x_cur: torch.Tensor, y: torch.Tensor,
                           generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """(misclassified now, estimated ∇x margin) for each row, in one forward per group.

        The current point rides along with its probes, so the early-stop check costs
        no pass of its own.
        """
        pairs = self.samples // 2
        per_group = max(1, self.chunk // (self.samples + 1))
        wrong = torch.empty(len(x_cur), dtype=torch.bool, device=x_cur.device)
        grad = torch.empty_like(x_cur)
        for lo in range(0, len(x_cur), per_group):
            xg, yg = x_cur[lo:lo + per_group], y[lo:lo + per_group]
            n = len(xg)
            signs = torch.stack([torch.randint(0, 2, (pairs, *xg.shape[1:]), generator=g, device=g.device)
                                 for g in generators[lo:lo + n]]).to(xg.dtype).mul_(2).sub_(1)
            # Probes are queries a black-box attacker could make: valid images only.
            plus = (xg[:, None] + self.delta * signs).clamp_(0.0, 1.0)
            minus = (xg[:, None] - self.delta * signs).clamp_(0.0, 1.0)
            logits = model(torch.cat([xg, plus.flatten(0, 1), minus.flatten(0, 1)]))
            wrong[lo:lo + n] = ~verdict(logits[:n], yg)
            y_probe = yg.repeat_interleave(pairs)
            m_plus = margin(logits[n:n + n * pairs], y_probe).view(n, pairs)
            m_minus = margin(logits[n + n * pairs:], y_probe).view(n, pairs)
            rise = (m_plus - m_minus).view(n, pairs, *[1] * (xg.dim() - 1))
            grad[lo:lo + n] = (rise * probe_reciprocal(plus - minus)).mean(1)
        return wrong, grad

    @torch.no_grad()
    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        x_adv, robust = x.clone(), torch.ones(len(x), dtype=torch.bool, device=x.device)
        generators = example_generators(x, f"{self.name}:{self.seed}")
        active = torch.arange(len(x), device=x.device)
        x_cur = x.clone()
        adam_m, adam_v = torch.zeros_like(x), torch.zeros_like(x)
        with eval_mode(model):
            for it in range(self.iterations):
                gens = [generators[i] for i in active.tolist()]
                wrong, grad = self._gradient_estimate(model, x_cur[active], y[active], gens)
                broken = active[wrong]
                x_adv[broken], robust[broken] = x_cur[broken], False
                active, grad = active[~wrong], grad[~wrong]
                if len(active) == 0:
                    return AttackResult(x_adv, robust)
                # Adam on the perturbation, descending the margin; t counts from 1 for
                # every example still here, since all started together.
                t = it + 1
                m = adam_m[active].mul_(ADAM_BETAS[0]).add_(grad, alpha=1 - ADAM_BETAS[0])
                v = adam_v[active].mul_(ADAM_BETAS[1]).addcmul_(grad, grad, value=1 - ADAM_BETAS[1])
                adam_m[active], adam_v[active] = m, v
                update = (m / (1 - ADAM_BETAS[0] ** t)) / ((v / (1 - ADAM_BETAS[1] ** t)).sqrt_() + ADAM_EPS)
                x_cur[active] = project_linf(x_cur[active] - self.lr * update, x[active], self.eps)
                self.within_batch(t / self.iterations, f"iteration {t}/{self.iterations}, {len(active)} left")
            # The last step's point has not been checked yet: one forward of the survivors.
            final_wrong = ~verdict(model(x_cur[active]), y[active])
        x_adv[active] = x_cur[active]
        robust[active] = ~final_wrong
        return AttackResult(x_adv, robust)
