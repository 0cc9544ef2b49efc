"""The amortised ADT generators as attacks (docs/evaluation.md, "Attacks").

`exp-am`, `imp-am` — the paper's attacks (Dong et al. 2020, extended version §5.4,
Table 4: "we retrain the generator networks for each pretrained defense"): `prepare`
trains a fresh generator against the fixed evaluated model on training images (never
the evaluated ones; the engine hands them over), then the test images are attacked
with draws from it. The training budget (steps, width, batch, lr, λ) is a setting and
is recorded with the result. With a cache folder from the engine the trained
generator is saved there and reused by a resumed evaluation.

`exp-am-cotrained`, `imp-am-cotrained` — draw from the generator an ADT-EXP-AM /
ADT-IMP-AM run trained alongside its classifier (`path`, set automatically for a run).
That generator was trained against the classifier as it was during training, so it is
a weaker attack on any other model (e.g. the run's base model with `--baseline`).

Both feed the generator the evaluated model's gradients g1, g2. With samples > 1 an
example is broken if any draw is misclassified. Each example's draws come from its own
generator (`example_generators`), so its result does not depend on its batch (as for `exp`).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..nets import eval_mode
from ..perturb.amortised import default_lambda
from ..perturb.generator_training import GeneratorBudget, fit_generator
from ..perturb.adt_networks import gradient_features, load_generator, read_generator_file, write_generator_file
from ..perturb.linf import project_linf
from .base import Attack, AttackResult, example_generators, float_setting, int_setting, register_attack
from .exp_attack import worst_of_samples

CACHE_FILE = "generator.pt"


class _GeneratorAttack(Attack):
    """Draws from `self._gen` (set by `prepare`): `samples` per example, worst one kept."""

    kind: str = ""

    def __init__(self, eps: float, *, seed: int = 0, samples: Any = 1, **settings: Any):
        super().__init__(eps, seed=seed, **settings)
        self.samples = int_setting(self.name, "samples", samples, 1)
        self._gen: nn.Module | None = None

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        if self._gen is None:
            raise RuntimeError(f"attack {self.name!r}: prepare(model, x, y) must run first")
        gen = self._gen.to(x.device)
        generators = example_generators(x, f"{self.name}:{self.seed}")
        # g1, g2 once for all draws
        g1, g2, _ = gradient_features(model, x, y, self.eps)
        with torch.no_grad(), eval_mode(gen):
            deltas = torch.stack([gen.sample_delta(x, g1, g2, self.eps, generator=generators)
                                  for _ in range(self.samples)])
            x_samples = project_linf(x.unsqueeze(0) + deltas.to(x.dtype), x.unsqueeze(0), self.eps)
        return worst_of_samples(model, x, y, x_samples)


class CotrainedGeneratorAttack(_GeneratorAttack):
    """Settings: path (the run's generator.pt, required), samples (draws per example, 1)."""

    def __init__(self, eps: float, *, seed: int = 0, path: Any = None, samples: Any = 1, **settings: Any):
        super().__init__(eps, seed=seed, samples=samples, **settings)
        if path is None or str(path).strip() == "":
            raise UserError(f"attack {self.name!r} needs path= to the generator.pt of an "
                            f"{self.kind} training run (method {self.kind})")
        self.path = str(path)

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """Load the generator once, so a bad path fails before any attack runs."""
        if self._gen is None:
            gen, meta = load_generator(self.path, x.device)
            if meta.get("kind") != self.kind:
                raise UserError(f"{self.path} holds an {meta.get('kind')} generator, not {self.kind}: "
                                f"use attack '{meta.get('kind')}-cotrained' for it")
            self._gen = gen


class RetrainedGeneratorAttack(_GeneratorAttack):
    """Settings: steps (100), width (8), batch (64), lr (2e-3), lam (the training method's default λ:
    0.01 exp-am, 10 imp-am), z_dim (64, imp-am), samples (draws per example, 1). Needs training images.
    The defaults are CPU-sized (`perturb.generator_training.GeneratorBudget`)."""

    uses_training_data = True

    def __init__(self, eps: float, *, seed: int = 0, steps: Any = None, width: Any = None, batch: Any = None,
                 lr: Any = None, lam: Any = None, z_dim: Any = None, samples: Any = 1, **settings: Any):
        if self.kind == "exp-am" and z_dim is not None:
            raise UserError("attack 'exp-am' has no setting 'z_dim' (the exp-am generator takes no noise input)")
        super().__init__(eps, seed=seed, samples=samples, **settings)
        d = GeneratorBudget()
        self.steps = int_setting(self.name, "steps", d.steps if steps is None else steps, 1)
        self.width = int_setting(self.name, "width", d.width if width is None else width, 1)
        self.batch = int_setting(self.name, "batch", d.batch if batch is None else batch, 1)
        self.lr = float_setting(self.name, "lr", d.lr if lr is None else lr)
        self.lam = float_setting(self.name, "lam", default_lambda(self.kind) if lam is None else lam)
        if self.kind == "imp-am":
            self.z_dim = int_setting(self.name, "z_dim", d.z_dim if z_dim is None else z_dim, 1)
        self._train_x: torch.Tensor | None = None
        self._train_y: torch.Tensor | None = None

    def budget(self) -> GeneratorBudget:
        return GeneratorBudget(steps=self.steps, width=self.width, batch=self.batch, lr=self.lr, lam=self.lam,
                               z_dim=getattr(self, "z_dim", GeneratorBudget.z_dim))

    def _cache_key(self, model: nn.Module) -> str:
        """What the cached generator was trained for: model weights, training images, settings."""
        h = hashlib.sha256(json.dumps(self.settings(), sort_keys=True, default=str).encode())
        for t in [*model.state_dict().values(), self._train_x, self._train_y]:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """Train the generator against `model` (or reuse the one cached for this very model,
        training set and budget)."""
        if self._train_x is None or len(self._train_x) == 0:
            raise UserError(f"attack {self.name!r} trains a generator against the model on training images first: "
                            "evaluate through `adt-ft eval` (it loads them), or call set_training_data(x, y)")
        cache = self._cache_dir / CACHE_FILE if self._cache_dir is not None else None
        key = self._cache_key(model) if cache is not None else None
        if cache is not None and cache.exists():
            gen, extra = read_generator_file(cache, x.device)
            if extra.get("cache_key") == key and gen.kind == self.kind:
                self._reporter.message(f"{self.name}: reusing the generator trained before the interruption")
                self._gen = gen
                return
        adversary = fit_generator(model, self.kind, self._train_x, self._train_y, eps=self.eps, budget=self.budget(),
                                  seed=self.seed, reporter=self._reporter, task=f"{self.name} generator")
        self._gen = adversary.generator
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_generator_file(cache, adversary.generator, self.eps, extra={"cache_key": key})


@register_attack("exp-am")
class EXPAMAttack(RetrainedGeneratorAttack):
    kind = "exp-am"


@register_attack("imp-am")
class IMPAMAttack(RetrainedGeneratorAttack):
    kind = "imp-am"


@register_attack("exp-am-cotrained")
class EXPAMCotrainedAttack(CotrainedGeneratorAttack):
    kind = "exp-am"


@register_attack("imp-am-cotrained")
class IMPAMCotrainedAttack(CotrainedGeneratorAttack):
    kind = "imp-am"
