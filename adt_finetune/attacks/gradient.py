"""The ADT paper's white-box gradient attacks (docs/evaluation.md, "Attacks"; Dong et al. 2020, §5.1): fgsm, pgd/pgd20/pgd100, mim, cw.

All of them are `sign_gradient_ascent` with a loss, a step count and a start:
x' stays a leaf inside the ε-ball and [0, 1] and is projected after each step, so
no gradient ever passes through a clamp. Random starts are drawn per example
(`example_generators`), so an example's result does not depend on its batch.

In the L2 threat model (threat_model="L2") fgsm, pgd*, and cw run the L2 step of `perturb.l2` instead:
normalised-gradient ascent with the same loss, step count and step size (ε/4, in L2), from a random start
in the L2 ball (FGM-L2, PGD-L2, CW-L2 margin). mim's momentum is defined for the sign step only: L∞ alone.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .base import Attack, bool_setting, example_generators, float_setting, int_setting, register_attack
from ..perturb.l2 import l2_start, normalized_gradient_ascent
from ..perturb.linf import ce_loss, margin_loss, sign_gradient_ascent, uniform_start


class SignGradientAttack(Attack):
    """An iterative L∞ sign-gradient attack (L2: normalised-gradient); subclasses fix the loss and the defaults."""

    threat_models = ("Linf", "L2")
    default_steps: ClassVar[int] = 20
    default_random_start: ClassVar[bool] = True
    amp_search = True  # fixed step count, last iterate: nothing is decided from the logits

    def __init__(self, eps: float, *, seed: int = 0, steps: Any = None, step_size: Any = None,
                 random_start: Any = None, **settings: Any):
        super().__init__(eps, seed=seed, **settings)
        self.steps = int_setting(self.name, "steps", self.default_steps if steps is None else steps, 1)
        # α = ε/4: the paper's step for every iterative attack of the suite.
        self.step_size = float_setting(self.name, "step_size", self.eps / 4 if step_size is None else step_size)
        self.random_start = bool_setting(self.name, "random_start",
                                         self.default_random_start if random_start is None else random_start)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ce_loss(logits, y)

    def momentum(self) -> float | None:
        return None

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # The base __call__ has put the model in eval mode and detached x.
        start = l2_start if self.threat_model == "L2" else uniform_start
        init = start(x, self.eps, example_generators(x, f"{self.name}:{self.seed}")) if self.random_start else None
        steps = self.steps
        if self.threat_model == "L2":
            return normalized_gradient_ascent(model, x, y, eps=self.eps, step_size=self.step_size, steps=steps,
                                              loss_fn=self.loss, init=init,
                                              on_step=lambda i: self.within_batch(i / steps, f"step {i}/{steps}"))
        return sign_gradient_ascent(model, x, y, eps=self.eps, step_size=self.step_size, steps=steps,
                                    loss_fn=self.loss, start=None, momentum=self.momentum(), init=init,
                                    on_step=lambda i: self.within_batch(i / steps, f"step {i}/{steps}"))


@register_attack("fgsm")
class FGSM(Attack):
    """One step of ε·sign(∇x CE) from x itself (no random start, no settings); in L2 one step of
    ε·∇/‖∇‖₂ (FGM-L2)."""

    amp_search = True
    threat_models = ("Linf", "L2")

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.threat_model == "L2":
            return normalized_gradient_ascent(model, x, y, eps=self.eps, step_size=self.eps, steps=1)
        return sign_gradient_ascent(model, x, y, eps=self.eps, step_size=self.eps, steps=1, start=None)


@register_attack("pgd")
class PGD(SignGradientAttack):
    """PGD on cross-entropy: uniform random start in the ε-ball, `steps` steps of ε/4."""

    default_steps = 20


@register_attack("pgd20")
class PGD20(PGD):
    default_steps = 20


@register_attack("pgd100")
class PGD100(PGD):
    default_steps = 100


@register_attack("mim")
class MIM(SignGradientAttack):
    """Momentum iterative attack: g ← decay·g + ∇/mean|∇| per example, step ε/4·sign(g). L∞ only."""

    default_steps = 20
    threat_models = ("Linf",)

    def __init__(self, eps: float, *, decay: Any = 1.0, **settings: Any):
        super().__init__(eps, **settings)
        self.decay = float_setting(self.name, "decay", decay)

    def momentum(self) -> float | None:
        return self.decay


@register_attack("cw")
class CW(SignGradientAttack):
    """PGD on the CW margin loss with confidence κ (the ADT paper's 'CW∞')."""

    default_steps = 30

    def __init__(self, eps: float, *, kappa: Any = 50.0, **settings: Any):
        super().__init__(eps, **settings)
        self.kappa = float_setting(self.name, "kappa", kappa)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return margin_loss(logits, y, self.kappa)
