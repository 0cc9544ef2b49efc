"""The amortised ADT generators as attacks (docs/evaluation.md, "Attacks"): `exp-am` and `imp-am` load the
generator saved with an ADT-EXP-AM / ADT-IMP-AM run and draw adversarial inputs
from it for the model under evaluation (its gradients g1, g2 are the generator's input).

With samples > 1 an example is broken if any draw is misclassified. The draws'
noise comes from one generator per batch, so an example's result can depend on
its batch (as for `exp`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..nets import eval_mode
from .base import Attack, AttackResult, int_setting, register_attack
from .exp import batch_generator, worst_of_samples
from ..perturb.generators import gradient_features, load_generator
from ..perturb.linf import project_linf


class GeneratorAttack(Attack):
    """Settings: path (the run's generator.pt, required), samples (draws per example, 1)."""

    def __init__(self, eps: float, *, seed: int = 0, path: Any = None, samples: Any = 1, **settings: Any):
        super().__init__(eps, seed=seed, **settings)
        if path is None or str(path).strip() == "":
            raise UserError(f"attack {self.name!r} needs path= to the generator.pt of an "
                            f"`adt-ft train --method {self.name}` run")
        self.path = str(path)
        self.samples = int_setting(self.name, "samples", samples, 1)
        self._gen: nn.Module | None = None

    def _generator_on(self, device: torch.device) -> nn.Module:
        if self._gen is None:
            gen, meta = load_generator(self.path, device)
            if meta.get("kind") != self.name:
                raise UserError(f"{self.path} holds an {meta.get('kind')} generator, not {self.name}: "
                                f"use attack {meta.get('kind')!r} for it")
            self._gen = gen
        return self._gen.to(device)

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """Load the generator once, so a bad path fails before any attack runs."""
        self._generator_on(x.device)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        gen = self._generator_on(x.device)
        generator = batch_generator(x, f"{self.name}:{self.seed}")
        # g1, g2 once for all draws
        g1, g2, _ = gradient_features(model, x, y, self.eps)
        with torch.no_grad(), eval_mode(gen):
            deltas = torch.stack([gen.sample_delta(x, g1, g2, self.eps, generator=generator)
                                  for _ in range(self.samples)])
            x_samples = project_linf(x.unsqueeze(0) + deltas.to(x.dtype), x.unsqueeze(0), self.eps)
        return worst_of_samples(model, x, y, x_samples)


@register_attack("exp-am")
class EXPAMAttack(GeneratorAttack):
    pass


@register_attack("imp-am")
class IMPAMAttack(GeneratorAttack):
    pass
