"""ADT-EXP's distribution as an attack (docs/evaluation.md, "Attacks"): fit the per-example tanh-Gaussian
over δ against the fixed model (T steps, k samples per step), then draw k samples;
an example is broken if any of them is misclassified.

The fitting is the training method's own (`perturb.exp_distribution.fit_exp_distribution`),
so attack and training cannot drift apart. Every example draws its noise from its own
generator (`example_generators`: attack name, seed and the example's pixels), and the
fitting is per example, so an example's result does not depend on the batch size or on
which other examples share its batch, as for the pointwise attacks.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..perturb.exp_distribution import fit_exp_distribution, sample_exp
from .base import (Attack, AttackResult, bool_setting, example_generators, float_setting, int_setting,
                   register_attack, verdict)
from ..perturb.linf import margin, project_linf


def worst_of_samples(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     x_samples: torch.Tensor) -> AttackResult:
    """x_samples (k, B, ...): broken if any sample is misclassified (that sample is returned),
    else the sample closest to the decision boundary. One forward of the k·B samples."""
    k = x_samples.shape[0]
    with torch.no_grad():
        logits = model(x_samples.flatten(0, 1))
        # row s·B + i is sample s of example i
        wrong = (~verdict(logits, y.repeat(k))).view(k, -1)
        margins = margin(logits, y.repeat(k)).view(k, -1)
    broken = wrong.any(0)
    pick = torch.where(broken, wrong.float().argmax(0), margins.argmin(0))
    x_adv = x_samples[pick, torch.arange(x.shape[0], device=x.device)]
    return AttackResult(x_adv, ~broken)


@register_attack("exp")
class EXPAttack(Attack):
    """Settings: steps (T, 20), samples (k, 10: per fitting step and at the end), lr (0.3),
    lam (entropy weight λ, 0.01), accumulate (the released code's running gradient sum, true)."""

    def __init__(self, eps: float, *, seed: int = 0, steps: Any = 20, samples: Any = 10, lr: Any = 0.3,
                 lam: Any = 0.01, accumulate: Any = True, **settings: Any):
        super().__init__(eps, seed=seed, **settings)
        self.steps = int_setting(self.name, "steps", steps, 1)
        self.samples = int_setting(self.name, "samples", samples, 1)
        self.lr = float_setting(self.name, "lr", lr)
        self.lam = float_setting(self.name, "lam", lam)
        self.accumulate = bool_setting(self.name, "accumulate", accumulate)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        generator = example_generators(x, f"{self.name}:{self.seed}")
        mu, v = fit_exp_distribution(model, x, y, eps=self.eps, steps=self.steps, samples=self.samples,
                                     lr=self.lr, lam=self.lam, accumulate=self.accumulate, generator=generator,
                                     on_step=lambda i: self.within_batch(i / self.steps, f"step {i}/{self.steps}"))
        deltas = sample_exp(mu, v, self.eps, self.samples, generator=generator)
        # |δ| ≤ ε already; the projection is x' = clip(x + δ) plus a guard against round-off.
        x_samples = project_linf(x.unsqueeze(0) + deltas.to(x.dtype), x.unsqueeze(0), self.eps)
        return worst_of_samples(model, x, y, x_samples)
